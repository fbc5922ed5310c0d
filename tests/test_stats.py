# -*- test-case-name: tests.test_stats -*-
"""
Tests for L{anvil.worker.stats.UsageStats}, the L{anvil.metrics} families
it sets and L{anvil.metrics.Metrics.record_gc}, read back through the
Prometheus text exposition as a scraper would.
"""

from __future__ import annotations

import os
import shutil

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anvil.cluster.membership import Member, Membership, MemberState
from anvil.meta.buckets import BucketStore
from anvil.meta.database import Database
from anvil.meta.migrate import apply_migrations
from anvil.meta.objects import ObjectStore
from anvil.meta.secrets import SecretBox
from anvil.meta.store import GlobalStore
from anvil.metrics import Metrics
from anvil.storage.cpu import CpuPool
from anvil.storage.shardstore import LocalShardStore
from anvil.worker.gc import GcReport
from anvil.errors import DatabaseUnavailable
from anvil.worker.queue import STATES, TaskQueue
from anvil.worker.stats import RecordedGc, TaskQueueStats, UsageStats
from tests.pg import fresh_database
from tests.test_metrics import sample_value, scrape
from tests.test_objects import put, regional_database


def member(node_id: str, state: MemberState) -> Member:
    """
    A member record in C{state}.
    """
    return Member(node_id, "us-east-1", f"http://{node_id}", f"{node_id}:7443", state=state)


def labelled(metrics: Metrics, family: str) -> dict[tuple[tuple[str, str], ...], float]:
    """
    Every sample of a gauge family, by its sorted label pairs.
    """
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for sample in scrape(metrics).get(family, [])
    }


class RecordGcTests(SynchronousTestCase):
    """
    L{Metrics.record_gc} counts passes, removed contents and freed bytes.
    """

    def test_counters_start_at_zero(self) -> None:
        """
        The collector counters are exported at 0 before any pass.
        """
        metrics = Metrics()
        for name in ("anvil_gc_passes", "anvil_gc_removed_contents", "anvil_gc_freed_bytes"):
            self.assertEqual(sample_value(metrics, name, name + "_total"), 0.0)

    def test_record_gc(self) -> None:
        """
        Each report adds one pass and its contents and bytes.
        """
        metrics = Metrics()
        metrics.record_gc(GcReport(contents_removed=3, bytes_freed=1000, shard_files_deleted=18))
        metrics.record_gc(GcReport())
        metrics.record_gc(GcReport(contents_removed=1, bytes_freed=24))
        self.assertEqual(sample_value(metrics, "anvil_gc_passes", "anvil_gc_passes_total"), 3.0)
        self.assertEqual(
            sample_value(metrics, "anvil_gc_removed_contents", "anvil_gc_removed_contents_total"),
            4.0,
        )
        self.assertEqual(
            sample_value(metrics, "anvil_gc_freed_bytes", "anvil_gc_freed_bytes_total"), 1024.0
        )


class ScriptedCollector:
    """
    A collector task answering each pass with the next of some reports
    (or raising an exception given in their place).
    """

    name = "gc"

    def __init__(self, *reports: GcReport | Exception) -> None:
        """
        @param reports: the results of the passes, in order.
        """
        self._reports = list(reports)

    async def run_once(self) -> GcReport:
        """
        The next scripted result.
        """
        result = self._reports.pop(0)
        if isinstance(result, Exception):
            raise result
        return result


class RecordedGcTests(TestCase):
    """
    L{RecordedGc} records every finished pass of the collector it wraps.
    """

    async def test_passes_recorded(self) -> None:
        """
        Finished passes are counted and returned; a failed one is not
        counted and its exception propagates (for the worker to count).
        """
        metrics = Metrics()
        first = GcReport(contents_removed=2, bytes_freed=100)
        task = RecordedGc(
            ScriptedCollector(first, RuntimeError("database gone"), GcReport(bytes_freed=5)),
            metrics,
        )
        self.assertEqual(task.name, "gc")
        self.assertIs(await task.run_once(), first)
        with self.assertRaises(RuntimeError):
            await task.run_once()
        await task.run_once()
        self.assertEqual(sample_value(metrics, "anvil_gc_passes", "anvil_gc_passes_total"), 2.0)
        self.assertEqual(
            sample_value(metrics, "anvil_gc_removed_contents", "anvil_gc_removed_contents_total"),
            2.0,
        )
        self.assertEqual(
            sample_value(metrics, "anvil_gc_freed_bytes", "anvil_gc_freed_bytes_total"), 105.0
        )


class UsageStatsTests(TestCase):
    """
    A pass of L{UsageStats} over a real global and regional database, real
    data directories and a membership view.
    """

    async def setUp(self) -> None:
        global_db = await Database.connect(fresh_database(self, "g"), reactor, pool_size=2)
        self.addCleanup(global_db.close)
        await apply_migrations(global_db, "global")
        admin = GlobalStore(global_db, SecretBox.from_hex("ab" * 32))
        await admin.create_region("us-east-1")
        self.acme = (await admin.create_tenant("acme"))["id"]
        self.beta = (await admin.create_tenant("beta"))["id"]
        self.buckets = BucketStore(global_db)
        _, regional_db = await regional_database(self)
        self.regional_db = regional_db
        self.objects = ObjectStore(regional_db)

        self.dirs = [os.path.abspath(self.mktemp()) for _ in range(2)]
        for d in self.dirs:
            os.makedirs(d)
        self.shards = LocalShardStore(self.dirs)
        self.membership = Membership(member("n1", MemberState.ALIVE))
        pool = CpuPool(reactor, max_threads=2, name="test-io")
        pool.startService()
        self.addCleanup(pool.stopService)
        self.metrics = Metrics()
        self.stats = UsageStats(
            self.metrics, self.objects, self.buckets, self.shards, self.membership, pool
        )

    def bucket_value(self, family: str, tenant: str, bucket: str) -> float | None:
        """
        One bucket's sample of C{family}, or C{None} if it has none.
        """
        return sample_value(self.metrics, family, family, tenant=tenant, bucket=bucket)

    def tenant_bytes(self, tenant: str) -> float | None:
        """
        A tenant's C{anvil_tenant_stored_bytes}, or C{None}.
        """
        return sample_value(
            self.metrics, "anvil_tenant_stored_bytes", "anvil_tenant_stored_bytes", tenant=tenant
        )

    def test_name(self) -> None:
        """
        The task is named C{stats}, which names its worker service.
        """
        self.assertEqual(self.stats.name, "stats")

    async def test_nothing_before_first_pass(self) -> None:
        """
        The gauges have no samples until a pass sets them: values are never
        computed by a scrape.
        """
        await put(self.objects, 1, "a", b"x")
        for family in (
            "anvil_storage_capacity_bytes",
            "anvil_storage_used_bytes",
            "anvil_bucket_stored_bytes",
            "anvil_bucket_objects",
            "anvil_tenant_stored_bytes",
            "anvil_cluster_members",
        ):
            self.assertEqual(labelled(self.metrics, family), {}, family)

    async def test_storage_per_directory(self) -> None:
        """
        Each data directory gets its filesystem's size and used bytes, as
        C{statvfs} reports them.
        """
        await self.stats.run_once()
        capacity = labelled(self.metrics, "anvil_storage_capacity_bytes")
        used = labelled(self.metrics, "anvil_storage_used_bytes")
        self.assertEqual(set(capacity), {(("path", d),) for d in self.dirs})
        self.assertEqual(set(used), {(("path", d),) for d in self.dirs})
        for d in self.dirs:
            st = os.statvfs(d)
            self.assertEqual(capacity[(("path", d),)], st.f_blocks * st.f_frsize)
            self.assertGreater(used[(("path", d),)], 0)
            self.assertLessEqual(used[(("path", d),)], capacity[(("path", d),)])

    async def test_unreadable_directory_loses_its_series(self) -> None:
        """
        A data directory whose C{statvfs} fails no longer exports a (stale)
        value; the other directories still do.
        """
        await self.stats.run_once()
        shutil.rmtree(self.dirs[1])
        await self.stats.run_once()
        self.assertEqual(
            set(labelled(self.metrics, "anvil_storage_capacity_bytes")), {(("path", self.dirs[0]),)}
        )
        self.assertEqual(
            set(labelled(self.metrics, "anvil_storage_used_bytes")), {(("path", self.dirs[0]),)}
        )

    async def test_members_by_state(self) -> None:
        """
        Every state is exported, zero included, and follows the membership.
        """
        await self.stats.run_once()
        self.assertEqual(
            labelled(self.metrics, "anvil_cluster_members"),
            {
                (("state", "alive"),): 1.0,
                (("state", "suspect"),): 0.0,
                (("state", "dead"),): 0.0,
                (("state", "left"),): 0.0,
            },
        )
        self.membership.update(
            [
                member("n2", MemberState.ALIVE),
                member("n3", MemberState.SUSPECT),
                member("n4", MemberState.DEAD),
                member("n5", MemberState.DEAD),
            ]
        )
        await self.stats.run_once()
        self.assertEqual(
            labelled(self.metrics, "anvil_cluster_members"),
            {
                (("state", "alive"),): 2.0,
                (("state", "suspect"),): 1.0,
                (("state", "dead"),): 2.0,
                (("state", "left"),): 0.0,
            },
        )

    async def test_usage_follows_objects(self) -> None:
        """
        Adding objects raises a bucket's bytes and object count and its
        tenant's bytes; replacing and deleting objects lowers them, to 0
        for an emptied bucket that still exists.
        """
        photos = await self.buckets.create_bucket("photos", self.acme, "us-east-1")
        logs = await self.buckets.create_bucket("logs", self.acme, "us-east-1")
        other = await self.buckets.create_bucket("other", self.beta, "us-east-1")
        await put(self.objects, photos.id, "a", b"12345")
        await put(self.objects, photos.id, "b", b"123")
        await put(self.objects, logs.id, "l", b"1234567890")
        await put(self.objects, other.id, "o", b"1")
        await self.stats.run_once()
        self.assertEqual(self.bucket_value("anvil_bucket_stored_bytes", "acme", "photos"), 8.0)
        self.assertEqual(self.bucket_value("anvil_bucket_objects", "acme", "photos"), 2.0)
        self.assertEqual(self.bucket_value("anvil_bucket_stored_bytes", "acme", "logs"), 10.0)
        self.assertEqual(self.bucket_value("anvil_bucket_objects", "acme", "logs"), 1.0)
        self.assertEqual(self.bucket_value("anvil_bucket_stored_bytes", "beta", "other"), 1.0)
        self.assertEqual(self.tenant_bytes("acme"), 18.0)
        self.assertEqual(self.tenant_bytes("beta"), 1.0)

        # More objects: up.
        await put(self.objects, photos.id, "c", b"1234567")
        await self.stats.run_once()
        self.assertEqual(self.bucket_value("anvil_bucket_stored_bytes", "acme", "photos"), 15.0)
        self.assertEqual(self.bucket_value("anvil_bucket_objects", "acme", "photos"), 3.0)
        self.assertEqual(self.tenant_bytes("acme"), 25.0)

        # A replacement counts once, with its new size; deletes go down.
        await put(self.objects, photos.id, "a", b"1")
        self.assertTrue(await self.objects.delete_object(photos.id, "b"))
        await self.stats.run_once()
        self.assertEqual(self.bucket_value("anvil_bucket_stored_bytes", "acme", "photos"), 8.0)
        self.assertEqual(self.bucket_value("anvil_bucket_objects", "acme", "photos"), 2.0)
        self.assertEqual(self.tenant_bytes("acme"), 18.0)

        # An emptied (live) bucket stays, at 0.
        self.assertEqual(await self.objects.delete_objects(other.id, ["o"]), {"o"})
        await self.stats.run_once()
        self.assertEqual(self.bucket_value("anvil_bucket_stored_bytes", "beta", "other"), 0.0)
        self.assertEqual(self.bucket_value("anvil_bucket_objects", "beta", "other"), 0.0)
        self.assertEqual(self.tenant_bytes("beta"), 0.0)

    async def test_deleted_bucket_series_vanish(self) -> None:
        """
        A deleted bucket's series, and its tenant's once it has no bucket
        left, are gone after the next pass, even while its objects still
        wait for the collector.
        """
        photos = await self.buckets.create_bucket("photos", self.acme, "us-east-1")
        other = await self.buckets.create_bucket("other", self.beta, "us-east-1")
        await put(self.objects, photos.id, "a", b"12345")
        await put(self.objects, other.id, "o", b"12")
        await self.stats.run_once()
        self.assertEqual(self.bucket_value("anvil_bucket_objects", "beta", "other"), 1.0)

        self.assertTrue(await self.buckets.delete_bucket(other.id))
        await self.stats.run_once()
        self.assertEqual(
            labelled(self.metrics, "anvil_bucket_stored_bytes"),
            {(("bucket", "photos"), ("tenant", "acme")): 5.0},
        )
        self.assertEqual(
            labelled(self.metrics, "anvil_bucket_objects"),
            {(("bucket", "photos"), ("tenant", "acme")): 1.0},
        )
        self.assertEqual(
            labelled(self.metrics, "anvil_tenant_stored_bytes"), {(("tenant", "acme"),): 5.0}
        )

    async def test_bucket_without_objects_absent(self) -> None:
        """
        A live bucket that never had objects in this region exports
        nothing: the aggregate names the buckets to report.
        """
        await self.buckets.create_bucket("empty", self.acme, "us-east-1")
        await self.stats.run_once()
        self.assertEqual(labelled(self.metrics, "anvil_bucket_objects"), {})
        self.assertEqual(labelled(self.metrics, "anvil_tenant_stored_bytes"), {})

    async def test_database_outage(self) -> None:
        """
        When the regional database is unreachable the pass fails, but
        membership and storage are refreshed and the bucket gauges keep
        the last values found.
        """
        photos = await self.buckets.create_bucket("photos", self.acme, "us-east-1")
        await put(self.objects, photos.id, "a", b"12345")
        await self.stats.run_once()
        self.regional_db.close()
        self.membership.update([member("n2", MemberState.SUSPECT)])
        with self.assertRaises(DatabaseUnavailable):
            await self.stats.run_once()
        self.assertEqual(
            sample_value(
                self.metrics, "anvil_cluster_members", "anvil_cluster_members", state="suspect"
            ),
            1.0,
        )
        self.assertEqual(self.bucket_value("anvil_bucket_stored_bytes", "acme", "photos"), 5.0)
        self.assertEqual(self.tenant_bytes("acme"), 5.0)


class TaskQueueStatsTests(TestCase):
    """
    L{TaskQueueStats} sets C{anvil_tasks{kind,state}} from a real queue.
    """

    async def setUp(self) -> None:
        db = await Database.connect(fresh_database(self, "g"), reactor, pool_size=2)
        self.addCleanup(db.close)
        await apply_migrations(db, "global")
        self.queue = TaskQueue(db, reactor, "n1/1")
        self.metrics = Metrics()
        self.stats = TaskQueueStats(self.metrics, self.queue, kinds=("repair",))

    def tasks(self) -> dict[tuple[tuple[str, str], ...], float]:
        return labelled(self.metrics, "anvil_tasks")

    def test_name(self) -> None:
        """
        The task is named C{task-stats}.
        """
        self.assertEqual(self.stats.name, "task-stats")

    async def test_gauges_follow_the_queue(self) -> None:
        """
        Every state of every kind known or seen is exported, zeros included;
        the values move as tasks are claimed and finished, and a kind whose
        tasks are gone stays at zero.
        """
        self.assertEqual(self.tasks(), {})
        await self.stats.run_once()
        self.assertEqual(
            self.tasks(), {(("kind", "repair"), ("state", state)): 0.0 for state in STATES}
        )
        await self.queue.enqueue("repair", {"n": 1}, max_attempts=1)
        await self.queue.enqueue("repair", {"n": 2})
        gc_id = await self.queue.enqueue("delete_shards", {})
        await self.stats.run_once()
        values = self.tasks()
        self.assertEqual(len(values), 2 * len(STATES))
        self.assertEqual(values[(("kind", "repair"), ("state", "pending"))], 2.0)
        self.assertEqual(values[(("kind", "delete_shards"), ("state", "pending"))], 1.0)

        task = await self.queue.claim(["repair"], None)
        assert task is not None
        await self.queue.fail(task, "boom")
        await self.queue.cancel(gc_id)
        await self.stats.run_once()
        values = self.tasks()
        self.assertEqual(values[(("kind", "repair"), ("state", "pending"))], 1.0)
        self.assertEqual(values[(("kind", "repair"), ("state", "running"))], 0.0)
        self.assertEqual(values[(("kind", "repair"), ("state", "failed"))], 1.0)
        self.assertEqual(values[(("kind", "delete_shards"), ("state", "pending"))], 0.0)
        self.assertEqual(values[(("kind", "delete_shards"), ("state", "cancelled"))], 1.0)
