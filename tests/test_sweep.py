# -*- test-case-name: tests.test_sweep -*-
"""
Tests for L{anvil.worker.sweep}: the sweep over a real PostgreSQL and a
real shard store (this node, C{"local"}, holding every shard; other members
simulated), the interval claim, and the orphan collector.
"""

from __future__ import annotations

import os
import time

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anvil.cluster.membership import MemberState
from anvil.meta.contents import ContentStore
from anvil.meta.records import ContentRecord
from anvil.metrics import Metrics
from anvil.storage.placement import ShardMap
from anvil.worker.queue import TaskQueue
from anvil.worker.repair import ClusterAccess
from anvil.worker.sweep import OrphanCollector, Sweeper, _Listing, redundancy_state
from tests.s3fixture import S3Stack
from tests.test_repair import insert_content, member, shard_map


class ListingTests(TestCase):
    """
    L{_Listing}: a node's shards read alongside contents in hash order.
    """

    async def test_merge(self) -> None:
        """
        The indices of each content come from pages fetched as the walk
        advances, a page at a time, wherever page boundaries fall.
        """
        shards = [("a", 0), ("a", 3), ("b", 1), ("c", 0), ("c", 1), ("c", 2), ("e", 5)]
        asked: list[str] = []

        async def fetch(after: str, limit: int) -> list[tuple[str, int]]:
            asked.append(after)
            start = 0
            if after:
                h, i = after.rsplit(".", 1)
                start = shards.index((h, int(i))) + 1
            return shards[start : start + limit]

        listing = _Listing(fetch, limit=2)
        self.assertEqual(await listing.indices("a"), {0, 3})
        self.assertEqual(await listing.indices("c"), {0, 1, 2})
        self.assertEqual(await listing.indices("d"), set())
        self.assertEqual(await listing.indices("e"), {5})
        self.assertEqual(await listing.indices("f"), set())
        # The last page was short: nothing more is asked for.
        self.assertEqual(asked, ["", "a.3", "c.0", "c.2"])

    async def test_failure(self) -> None:
        """
        A failed fetch marks the listing failed; it answers L{None} after.
        """

        async def fetch(after: str, limit: int) -> list[tuple[str, int]]:
            raise OSError("no")

        listing = _Listing(fetch)
        with self.assertRaises(OSError):
            await listing.indices("a")
        self.assertTrue(listing.failed)
        self.assertIsNone(await listing.indices("b"))


class SweepTests(TestCase):
    """
    L{Sweeper} over a real engine and databases.
    """

    async def setUp(self) -> None:
        self.stack = await S3Stack.start(self, stripe_size=16 * 1024)
        self.engine = self.stack.service.engine
        self.contents = ContentStore(self.stack.regional_db)
        self.clock = Clock()
        self.clock.advance(time.time())
        self.queue = TaskQueue(self.stack.global_db, self.clock, "test")
        self.members = [member("local")]

    def sweeper(self, node_id: str = "local", forced: bool = True, metrics: Metrics | None = None) -> Sweeper:
        """
        A sweeper of this stack (as node C{node_id}).
        """
        access = ClusterAccess(node_id, "us-east-1", lambda: list(self.members), self.engine, None)

        async def get() -> ClusterAccess:
            return access

        return Sweeper(
            self.contents, self.stack.global_db, self.queue, get, metrics or self.stack.metrics,
            self.stack.io, self.stack.shards, self.clock, node_id=node_id, region="us-east-1",
            interval=300.0, dead_after=1800.0, default_total=6, forced=forced,
        )

    async def store(self, data: bytes, nodes: dict[int, str] | None = None) -> ContentRecord:
        """
        Write a content's shards and record it, with the map's entries
        C{nodes} replaced.
        """
        writer = self.engine.new_writer()
        await writer.write(data)
        record: ContentRecord = await writer.finish()
        await writer.commit()
        document = record.shard_map
        if nodes:
            parsed = ShardMap.from_json(document)
            names = [t.node for t in parsed.targets]
            for index, node in nodes.items():
                names[index] = node
            document = shard_map(names, parsed.key)
        await insert_content(self.stack.regional_db, record.hash, document, size=record.size)
        # Rows inserted "now" are skipped by a sweep that started now.
        self.clock.advance(1)
        return record

    def gauge(self, metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float | None:
        """
        One sample of C{metrics}, or L{None} when it is not set.
        """
        return metrics.registry.get_sample_value(name, labels or {})

    async def test_missing_file_enqueues_repair_and_sets_gauges(self) -> None:
        """
        A content missing a file on an alive node gets a repair task; the
        gauges count the missing shard and the contents by healthy shards,
        every label from 0 to k+m set.
        """
        healthy = [await self.store(os.urandom(40_000)) for _ in range(2)]
        damaged = await self.store(os.urandom(40_000))
        os.unlink(self.stack.shards.locate(bytes.fromhex(damaged.hash), 1))
        report = await self.sweeper().run_once()
        self.assertEqual((report.swept, report.contents, report.shards_missing), (True, 3, 1))
        self.assertEqual(report.repairs_enqueued, 1)
        self.assertEqual(report.redundancy, {"0": 0, "1": 0, "2": 0, "3": 0, "4": 0, "5": 1, "6": 2})
        [task] = await self.queue.list(kind="repair")
        self.assertEqual(task.payload["content_hash"], damaged.hash)
        metrics = self.stack.metrics
        self.assertEqual(self.gauge(metrics, "anvil_shards_missing"), 1.0)
        for label in range(7):
            expected = {5: 1.0, 6: 2.0}.get(label, 0.0)
            self.assertEqual(
                self.gauge(metrics, "anvil_objects_by_redundancy", {"healthy_shards": str(label)}), expected
            )
        self.assertEqual(report.states, {"full": 2, "degraded": 1, "no_spare": 0, "lost": 0})
        for state, expected in {"full": 2.0, "degraded": 1.0, "no_spare": 0.0, "lost": 0.0}.items():
            self.assertEqual(
                self.gauge(metrics, "anvil_objects_by_redundancy_state", {"state": state}), expected
            )
        again = await self.sweeper().run_once()
        self.assertEqual(again.repairs_enqueued, 0)
        self.assertEqual(len(healthy), 2)

    async def test_states_follow_each_contents_own_code(self) -> None:
        """
        Losing two shards leaves a 4+2 content with no spare shard; losing
        three makes it lost; the state gauge says so without knowing the
        code.
        """
        no_spare = await self.store(os.urandom(40_000))
        lost = await self.store(os.urandom(40_000))
        for index in (0, 1):
            os.unlink(self.stack.shards.locate(bytes.fromhex(no_spare.hash), index))
        for index in (0, 1, 2):
            os.unlink(self.stack.shards.locate(bytes.fromhex(lost.hash), index))
        report = await self.sweeper().run_once()
        self.assertEqual(report.states, {"full": 0, "degraded": 0, "no_spare": 1, "lost": 1})
        self.assertEqual(report.lost, 1)
        metrics = self.stack.metrics
        self.assertEqual(self.gauge(metrics, "anvil_objects_by_redundancy_state", {"state": "no_spare"}), 1.0)
        self.assertEqual(self.gauge(metrics, "anvil_objects_by_redundancy_state", {"state": "lost"}), 1.0)

    async def test_removed_and_never_stored_enqueue_repairs(self) -> None:
        """
        Shards on a removed node or never stored are missing and repaired.
        """
        await self.stack.global_db.run_operation("INSERT INTO removed_nodes (node_id) VALUES ('gone')")
        first = await self.store(os.urandom(20_000), {0: "gone"})
        second = await self.store(os.urandom(20_000), {3: ""})
        report = await self.sweeper().run_once()
        self.assertEqual((report.shards_missing, report.repairs_enqueued, report.removed), (2, 2, ["gone"]))
        tasks = await self.queue.list(kind="repair")
        self.assertEqual(sorted(t.payload["content_hash"] for t in tasks), sorted([first.hash, second.hash]))

    async def test_down_member_waits_then_is_called_off(self) -> None:
        """
        A dead member's shards are counted missing but not repaired at
        once: a C{member_down} task is due C{dead_member_repair_after}
        later, enqueued once, and cancelled when the member is seen alive.
        """
        self.members.append(member("sleepy", MemberState.DEAD))
        await self.store(os.urandom(20_000), {2: "sleepy"})
        report = await self.sweeper().run_once()
        self.assertEqual((report.shards_missing, report.repairs_enqueued), (1, 0))
        self.assertEqual(report.members_down, ["sleepy"])
        await self.sweeper().run_once()
        [task] = await self.queue.list(kind="member_down", state="pending")
        self.assertEqual(task.payload["node_id"], "sleepy")
        due = task.run_after.timestamp() - self.clock.seconds()
        self.assertTrue(1790 < due < 1801, due)
        self.members[-1] = member("sleepy")
        await self.sweeper().run_once()
        self.assertEqual((await self.queue.get(task.id)).state, "cancelled")

    async def test_unknown_member_only_once_joined(self) -> None:
        """
        A node that knows no other member yet counts shards on members it
        does not know as healthy; once it sees another member alive, an
        unknown member is down like a dead one.
        """
        await self.store(os.urandom(20_000), {4: "stranger"})
        alone = await self.sweeper().run_once()
        self.assertEqual((alone.shards_missing, alone.members_down), (0, []))
        self.assertEqual(await self.queue.list(kind="member_down"), [])
        self.members.append(member("peer"))
        joined = await self.sweeper().run_once()
        self.assertEqual((joined.shards_missing, joined.members_down), (1, ["stranger"]))
        self.assertEqual(len(await self.queue.list(kind="member_down")), 1)

    async def test_one_sweep_per_interval(self) -> None:
        """
        Of several nodes ticking at once, one claims the interval and
        sweeps; the others set their gauges from its recorded result; after
        most of an interval the next claim succeeds.
        """
        await self.store(os.urandom(20_000), {1: ""})
        metrics = [Metrics() for _ in range(3)]
        reports = await gatherResults(
            [
                Deferred.fromCoroutine(self.sweeper(f"n{i}", forced=False, metrics=metrics[i]).run_once())
                for i in range(3)
            ]
        )
        self.assertEqual(sum(r.swept for r in reports), 1)
        late = await self.sweeper("n9", forced=False, metrics=metrics[0]).run_once()
        self.assertFalse(late.swept)
        self.assertEqual(late.shards_missing, 1)
        self.assertEqual(self.gauge(metrics[0], "anvil_shards_missing"), 1.0)
        self.assertEqual(self.gauge(metrics[0], "anvil_objects_by_redundancy", {"healthy_shards": "5"}), 1.0)
        self.assertEqual(
            self.gauge(metrics[0], "anvil_objects_by_redundancy_state", {"state": "degraded"}), 1.0
        )
        self.clock.advance(0.8 * 300)
        self.assertTrue((await self.sweeper("n9", forced=False).run_once()).swept)
        self.assertTrue((await self.sweeper("n8", forced=True).run_once()).swept)


class OrphanTests(TestCase):
    """
    L{OrphanCollector} over a real shard store and regional database.
    """

    async def setUp(self) -> None:
        self.stack = await S3Stack.start(self, stripe_size=16 * 1024)
        self.engine = self.stack.service.engine
        self.contents = ContentStore(self.stack.regional_db)
        self.clock = Clock()
        self.clock.advance(time.time() + 1000)

    def collector(self) -> OrphanCollector:
        """
        The collector under test: node C{"local"}, grace 300 s, pages of 4.
        """
        return OrphanCollector(
            self.contents, self.stack.shards, self.stack.io, self.clock, node_id="local", grace=300.0, page=4
        )

    async def write(self, data: bytes) -> ContentRecord:
        """
        Write and commit a content's shards without recording it.
        """
        writer = self.engine.new_writer()
        await writer.write(data)
        record: ContentRecord = await writer.finish()
        await writer.commit()
        return record

    def files(self, record: ContentRecord) -> set[int]:
        """
        The shard indices of a content present on disk.
        """
        digest = bytes.fromhex(record.hash)
        return {i for i in range(6) if self.stack.shards.locate(digest, i) is not None}

    def age(self, record: ContentRecord, seconds: float) -> None:
        """
        Make a content's shard files look C{seconds} old.
        """
        digest = bytes.fromhex(record.hash)
        for index in range(6):
            path = self.stack.shards.locate(digest, index)
            if path is not None:
                moment = self.clock.seconds() - seconds
                os.utime(path, (moment, moment))

    async def test_orphans_removed_after_grace(self) -> None:
        """
        Old files of a content without a row, and old files of indices the
        map gives to another node, are removed; young orphans and recorded
        shards stay.
        """
        recorded = await self.write(os.urandom(30_000))
        parsed = ShardMap.from_json(recorded.shard_map)
        names = [t.node for t in parsed.targets]
        names[4] = "elsewhere"
        await insert_content(self.stack.regional_db, recorded.hash, shard_map(names, parsed.key), size=recorded.size)
        unrecorded = await self.write(os.urandom(30_000))
        young = await self.write(os.urandom(30_000))
        self.age(recorded, 1000)
        self.age(unrecorded, 1000)
        self.age(young, 10)
        report = await self.collector().run_once()
        self.assertEqual(self.files(recorded), {0, 1, 2, 3, 5})
        self.assertEqual(self.files(unrecorded), set())
        self.assertEqual(self.files(young), set(range(6)))
        self.assertEqual((report.files_checked, report.orphans_removed, report.young_orphans), (18, 7, 6))
        self.assertGreater(report.bytes_freed, 0)

    async def test_empty_database_removes_nothing(self) -> None:
        """
        With no content recorded at all, old shard files are not taken for
        orphans: the database is more likely wrong than the disks.
        """
        record = await self.write(os.urandom(20_000))
        self.age(record, 1000)
        report = await self.collector().run_once()
        self.assertTrue(report.skipped)
        self.assertEqual((report.orphans_removed, self.files(record)), (0, set(range(6))))

    async def test_replaced_file_is_put_back(self) -> None:
        """
        A file replaced at the same path after it was judged an orphan (a
        new inode) is not removed.
        """
        record = await self.write(os.urandom(20_000))
        path = self.stack.shards.locate(bytes.fromhex(record.hash), 0)
        assert path is not None
        stale_inode = os.stat(path).st_ino + 1_000_000
        data_dir = next(d for d in self.stack.shards.data_dirs if path.startswith(d))
        removed, _, errors = self.collector()._remove([(path, data_dir, (stale_inode, 0.0, 10))])
        self.assertEqual((removed, errors), (0, 0))
        self.assertTrue(os.path.exists(path))
        self.assertEqual(os.listdir(os.path.join(data_dir, "tmp")), [])


class RedundancyStateTests(SynchronousTestCase):
    """
    L{redundancy_state} for codes other than the default.
    """

    def test_states(self) -> None:
        """
        Full at k+m, degraded above k, no spare at k, lost below, for any
        k and m.
        """
        for k, m in ((4, 2), (8, 3), (1, 1), (10, 4)):
            self.assertEqual(redundancy_state(k + m, k, m), "full")
            self.assertEqual(redundancy_state(k, k, m), "no_spare")
            self.assertEqual(redundancy_state(k - 1, k, m), "lost")
            self.assertEqual(redundancy_state(0, k, m), "lost")
            for healthy in range(k + 1, k + m):
                self.assertEqual(redundancy_state(healthy, k, m), "degraded")
