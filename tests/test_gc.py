# -*- test-case-name: tests.test_gc -*-
"""
Tests for L{anvil.worker.gc.GarbageCollector} on a real PostgreSQL (a
global and a regional database) and a real L{StorageEngine} over three
temporary data directories, with a L{Clock} for the collector's time.

Objects are written through the S3 layer's own commit step
(L{anvil.s3.handlers.object.commit_content}), so the dedup write-commit
protocol the collector must not break is the real one.
"""

from __future__ import annotations

import hashlib
import os
import time
from types import SimpleNamespace
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.logger import capturedLogs
from twisted.trial.unittest import TestCase

from anvil.meta.buckets import BucketStore
from anvil.meta.database import Database
from anvil.meta.migrate import apply_migrations
from anvil.meta.objects import ObjectStore
from anvil.meta.records import ContentRecord, ManifestPart, ObjectRecord, Part
from anvil.meta.secrets import SecretBox
from anvil.meta.store import GlobalStore
from anvil.s3.handlers.object import StagedContent, commit_content
from anvil.storage.cpu import CpuPool
from anvil.storage.engine import StorageEngine
from anvil.storage.erasure import ErasureParams
from anvil.storage.placement import LocalPlacement
from anvil.storage.shardstore import LocalShardStore
from anvil.worker.gc import GarbageCollector, GcReport
from anvil.worker.loop import PeriodicWorker
from tests.pg import fresh_database
from tests.test_objects import WHEN, refcount_errors, regional_database

GRACE = 300.0
STALE = 7 * 86400.0
#: Contents up to this size are inline (kept in the database).
INLINE = 32
#: A body stored as shard files (two stripes of 64 bytes and a bit).
BIG = bytes(range(256)) * 2 + b"tail"


class _Service:
    """
    What L{commit_content} needs of an S3 call: C{call.service.objects}.
    """

    def __init__(self, objects: Any) -> None:
        self.service = SimpleNamespace(objects=objects)


class GarbageCollectorTests(TestCase):
    """
    One pass of the collector removes exactly what nothing uses any more.
    """

    async def setUp(self) -> None:
        _, self.db = await regional_database(self, pool_size=4)
        self.objects = ObjectStore(self.db)
        self.global_db = await Database.connect(fresh_database(self), reactor, pool_size=2)
        self.addCleanup(self.global_db.close)
        await apply_migrations(self.global_db, "global")
        admin = GlobalStore(self.global_db, SecretBox.from_hex("ab" * 32))
        await admin.create_region("us-east-1")
        tenant = (await admin.create_tenant("acme"))["id"]
        self.buckets = BucketStore(self.global_db)
        self.bucket = (await self.buckets.create_bucket("photos", tenant, "us-east-1")).id
        self.tenant = tenant
        base = self.mktemp()
        self.dirs = [os.path.join(base, f"disk{i}") for i in range(3)]
        store = LocalShardStore(self.dirs)
        self.engine = StorageEngine(
            ErasureParams(4, 2, 64),
            store,
            CpuPool.synchronous(),
            CpuPool.synchronous(),
            INLINE,
            placement=LocalPlacement("node-1", store),
        )
        self.clock = Clock()
        self.clock.advance(time.time())
        self.gc = self.collector(self.engine)
        self.addCleanup(self._check_refcounts)

    async def _check_refcounts(self) -> None:
        self.assertEqual(await refcount_errors(self.db), [])

    def collector(self, engine: Any) -> GarbageCollector:
        """
        A collector over our stores, C{engine} and clock.
        """
        return GarbageCollector(
            self.objects,
            self.buckets,
            engine,
            self.clock,
            grace_seconds=GRACE,
            stale_upload_seconds=STALE,
            temp_file_seconds=3600,
            region="us-east-1",
            batch_size=2,
        )

    # -- helpers -------------------------------------------------------

    async def stage(self, data: bytes) -> StagedContent:
        """
        Write C{data} into a new engine writer, finished, not committed.
        """
        writer = self.engine.new_writer()
        await writer.write(data)
        content = await writer.finish()
        return StagedContent(content, hashlib.md5(data).hexdigest(), {}, writer)

    async def put(
        self, key: str, data: bytes, objects: Any = None, bucket: int | None = None
    ) -> ContentRecord:
        """
        PutObject's commit of C{data} under C{key}, through
        L{commit_content} (C{objects} answers its C{content_state}).
        """
        staged = await self.stage(data)
        record = ObjectRecord(
            bucket_id=self.bucket if bucket is None else bucket,
            key=key,
            size=len(data),
            etag=staged.md5_hex,
            content_type="binary/octet-stream",
            user_metadata={},
            system_metadata={},
            checksums={},
            manifest=[ManifestPart(staged.content.hash, 0, len(data))],
            last_modified=WHEN,
        )

        async def write(require_existing: bool) -> Any:
            return await self.objects.put_object(
                record, [staged.content], require_existing=[staged.content.hash] if require_existing else ()
            )

        await commit_content(_Service(objects or self.objects), staged, write)  # type: ignore[arg-type]
        return staged.content

    async def read(self, key: str) -> bytes:
        """
        The bytes of the live object C{key}, read from the shard files.
        """
        record = await self.objects.get_object(self.bucket, key)
        assert record is not None, key
        contents = await self.objects.get_contents([p.content_hash for p in record.manifest])
        chunks = []
        for piece in record.manifest:
            async for chunk in self.engine.read(contents[piece.content_hash]):
                chunks.append(chunk)
        return b"".join(chunks)

    def shard_files(self, content_hash: str) -> list[str]:
        """
        The shard files of a content, in every data directory.
        """
        found = []
        for data_dir in self.dirs:
            for root, _, names in os.walk(os.path.join(data_dir, "shards")):
                found.extend(os.path.join(root, n) for n in names if n.startswith(content_hash + "."))
        return found

    def temporaries(self) -> list[str]:
        """
        The temporary files of every data directory.
        """
        return [os.path.join(d, "tmp", n) for d in self.dirs for n in os.listdir(os.path.join(d, "tmp"))]

    async def content_row(self, content_hash: str) -> tuple[Any, ...] | None:
        """
        C{(refcount, released_at)} of a content, or C{None}.
        """
        rows = await self.db.run_query(
            "SELECT refcount, released_at FROM contents WHERE hash = %s", (content_hash,)
        )
        return rows[0] if rows else None

    async def count(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        """
        The single number a regional query returns.
        """
        return int((await self.db.run_query(sql, params))[0][0])

    def past_grace(self) -> None:
        """
        Move the collector's clock past the grace period.
        """
        self.clock.advance(GRACE + 1)

    # -- contents --------------------------------------------------------

    async def test_deleted_object_collected_after_grace(self) -> None:
        """
        A deleted object's content survives passes within the grace period
        and is gone, row and every shard file, in the first pass after it.
        """
        content = await self.put("a", BIG)
        self.assertEqual(len(self.shard_files(content.hash)), 6)
        self.assertEqual(len({os.path.dirname(os.path.dirname(p)) for p in self.shard_files(content.hash)}), 3)
        self.assertTrue(await self.objects.delete_object(self.bucket, "a"))
        report = await self.gc.run_once()
        self.assertEqual(report, GcReport())
        self.assertEqual(len(self.shard_files(content.hash)), 6)
        self.assertIsNotNone(await self.content_row(content.hash))

        self.past_grace()
        report = await self.gc.run_once()
        self.assertEqual(
            report,
            GcReport(contents_removed=1, bytes_freed=len(BIG), shard_files_deleted=6, objects_purged=1),
        )
        self.assertEqual(self.shard_files(content.hash), [])
        self.assertIsNone(await self.content_row(content.hash))
        self.assertEqual(await self.count("SELECT count(*) FROM objects"), 0)

    async def test_shared_content_survives_until_last_reference(self) -> None:
        """
        A content two objects share is kept while one of them lives, and
        collected once the last one is deleted.
        """
        content = await self.put("a", BIG)
        await self.put("b", BIG)
        self.assertEqual((await self.content_row(content.hash))[0], 2)
        await self.objects.delete_object(self.bucket, "a")
        self.past_grace()
        report = await self.gc.run_once()
        self.assertEqual(report.contents_removed, 0)
        self.assertEqual(await self.read("b"), BIG)
        self.assertEqual(len(self.shard_files(content.hash)), 6)

        await self.objects.delete_object(self.bucket, "b")
        self.past_grace()
        report = await self.gc.run_once()
        self.assertEqual((report.contents_removed, report.shard_files_deleted), (1, 6))
        self.assertEqual(self.shard_files(content.hash), [])

    async def test_inline_content_collected(self) -> None:
        """
        An inline content (no shard files) is collected by deleting its row.
        """
        content = await self.put("small", b"tiny")
        self.assertIsNotNone(content.inline_data)
        await self.objects.delete_object(self.bucket, "small")
        self.past_grace()
        report = await self.gc.run_once()
        self.assertEqual((report.contents_removed, report.bytes_freed, report.shard_files_deleted), (1, 4, 0))
        self.assertIsNone(await self.content_row(content.hash))

    async def test_inline_contents_collected_in_batches(self) -> None:
        """
        Many deleted small objects are collected in batches (two per
        statement here), all in one pass; an inline content another object
        still references is kept and readable.
        """
        for i in range(5):
            await self.put(f"small{i}", b"tiny %d" % i)
        await self.put("keep", b"tiny 0")
        for i in range(5):
            await self.objects.delete_object(self.bucket, f"small{i}")
        self.past_grace()
        report = await self.gc.run_once()
        self.assertEqual((report.contents_removed, report.bytes_freed), (4, 4 * len(b"tiny 1")))
        self.assertEqual(await self.count("SELECT count(*) FROM contents"), 1)
        self.assertEqual(await self.read("keep"), b"tiny 0")

    async def test_inline_content_locked_by_a_writer_is_skipped(self) -> None:
        """
        An unreferenced inline content whose row a writer holds locked is
        left for a later pass instead of being waited for or removed.
        """
        content = await self.put("small", b"tiny")
        await self.objects.delete_object(self.bucket, "small")
        self.past_grace()
        locked: Deferred[None] = Deferred()
        release: Deferred[None] = Deferred()

        async def hold(cursor: Any) -> None:
            await cursor.execute(
                "SELECT 1 FROM contents WHERE hash = %s FOR UPDATE", (content.hash,)
            )
            locked.callback(None)
            await release

        holding = Deferred.fromCoroutine(self.db.run_interaction(hold))
        await locked
        try:
            report = await self.gc.run_once()
        finally:
            release.callback(None)
            await holding
        self.assertEqual(report.contents_removed, 0)
        self.assertIsNotNone(await self.content_row(content.hash))
        report = await self.gc.run_once()
        self.assertEqual(report.contents_removed, 1)
        self.assertIsNone(await self.content_row(content.hash))

    async def test_replaced_object_content_collected(self) -> None:
        """
        Replacing an object releases its old content, which is collected
        while the new one stays readable.
        """
        old = await self.put("a", BIG)
        new = await self.put("a", BIG[::-1])
        self.past_grace()
        report = await self.gc.run_once()
        self.assertEqual((report.contents_removed, report.objects_purged), (1, 1))
        self.assertEqual(self.shard_files(old.hash), [])
        self.assertEqual(len(self.shard_files(new.hash)), 6)
        self.assertEqual(await self.read("a"), BIG[::-1])

    # -- the dedup write-commit protocol ---------------------------------

    async def test_reupload_deduplicated_before_collection(self) -> None:
        """
        An identical upload that references the released content before the
        collector looks at it keeps it: the collector's locked re-check sees
        the reference, and the writer dropped only its own temporaries.
        """
        content = await self.put("a", BIG)
        await self.objects.delete_object(self.bucket, "a")
        self.past_grace()
        await self.put("b", BIG)
        self.assertEqual(self.temporaries(), [])
        report = await self.gc.run_once()
        self.assertEqual(report.contents_removed, 0)
        self.assertEqual((await self.content_row(content.hash))[0], 1)
        self.assertEqual(await self.read("b"), BIG)

    async def test_reupload_collected_between_check_and_commit(self) -> None:
        """
        A writer that saw the content present, then lost it to a whole
        collector pass before its metadata commit, commits its own shards
        after all (ContentMissingError): its object is readable.
        """
        content = await self.put("a", BIG)
        await self.objects.delete_object(self.bucket, "a")
        self.past_grace()
        reports = []
        gc = self.gc
        objects = self.objects

        class CollectedAfterCheck:
            """
            Answers content_state, then lets a collector pass run.
            """

            async def content_state(self, content_hash: str) -> str:
                state = await objects.content_state(content_hash)
                reports.append(await gc.run_once())
                return state

        await self.put("b", BIG, objects=CollectedAfterCheck())
        self.assertEqual(reports[0].contents_removed, 1)
        self.assertEqual(await self.read("b"), BIG)
        self.assertEqual((await self.content_row(content.hash))[0], 1)
        self.assertEqual(len(self.shard_files(content.hash)), 6)
        self.assertEqual(self.temporaries(), [])

    async def test_reupload_while_collector_holds_the_row(self) -> None:
        """
        A writer that checks and commits while the collector has deleted
        the row but not yet unlinked the files nor committed waits for the
        collector, then stores its own shards: they land after the unlink,
        and its object is readable.
        """
        content = await self.put("a", BIG)
        await self.objects.delete_object(self.bucket, "a")
        self.past_grace()
        test = self
        writes: list[Deferred[Any]] = []

        class InterleavingEngine:
            """
            Starts a writer of the same bytes, waits until it waits for
            the row lock, then unlinks as the real engine does and returns
            (letting the collector commit).
            """

            async def delete_content(self, content_hash: str, shard_map: Any = None) -> int:
                writes.append(Deferred.fromCoroutine(test.put("b", BIG)))
                await test.wait_for_lock_waiter()
                # The writer cannot have committed anything yet: it waits.
                test.assertFalse(writes[0].called)
                removed = await test.engine.delete_content(content_hash, shard_map)
                test.assertEqual(test.shard_files(content_hash), [])
                return removed

            async def clean_temporary(self, older_than: float) -> int:
                """
                The real engine's.
                """
                return await test.engine.clean_temporary(older_than)

        report = await self.collector(InterleavingEngine()).run_once()
        await writes[0]
        self.assertEqual((report.contents_removed, report.shard_files_deleted), (1, 6))
        self.assertEqual(await self.read("b"), BIG)
        self.assertEqual((await self.content_row(content.hash))[0], 1)
        self.assertEqual(len(self.shard_files(content.hash)), 6)
        self.assertEqual(self.temporaries(), [])

    async def wait_for_lock_waiter(self, timeout: float = 10.0) -> None:
        """
        Wait until a session of the regional database waits for a lock.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            waiting = await self.count(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            if waiting:
                return
            await deferLater(reactor, 0.01, lambda: None)
        self.fail("no writer waited for the content row lock")

    # -- multipart -------------------------------------------------------

    async def put_part(self, upload_id: str, number: int, data: bytes) -> ContentRecord:
        """
        UploadPart's commit of C{data} as part C{number}.
        """
        staged = await self.stage(data)
        part = Part(number, staged.content.hash, len(data), staged.md5_hex, {}, WHEN)

        async def write(require_existing: bool) -> Any:
            return await self.objects.put_part(
                upload_id, part, staged.content, require_existing=require_existing
            )

        await commit_content(_Service(self.objects), staged, write)  # type: ignore[arg-type]
        return staged.content

    async def test_aborted_upload_parts_collected(self) -> None:
        """
        The parts of an aborted multipart upload are collected.
        """
        upload = await self.objects.create_upload(self.bucket, "big", {})
        one = await self.put_part(upload.upload_id, 1, BIG)
        two = await self.put_part(upload.upload_id, 2, BIG[::-1])
        await self.objects.abort_upload(upload.upload_id)
        self.past_grace()
        report = await self.gc.run_once()
        self.assertEqual((report.contents_removed, report.shard_files_deleted), (2, 12))
        self.assertEqual(self.shard_files(one.hash) + self.shard_files(two.hash), [])

    async def test_stale_upload_aborted(self) -> None:
        """
        An upload older than the stale age is aborted (a younger one is
        not), and its parts' contents are collected a grace period later.
        """
        upload = await self.objects.create_upload(self.bucket, "big", {})
        part = await self.put_part(upload.upload_id, 1, BIG)
        report = await self.gc.run_once()
        self.assertEqual(report.uploads_aborted, 0)
        self.assertIsNotNone(await self.objects.get_upload(upload.upload_id))

        fresh = await self.objects.create_upload(self.bucket, "other", {})
        # Initiated longer ago than the stale age, by the database's clock.
        await self.db.run_query(
            "UPDATE multipart_uploads SET created_at = created_at - %s * interval '1 second' "
            "WHERE upload_id = %s RETURNING 1",
            (STALE + 60, upload.upload_id),
        )
        report = await self.gc.run_once()
        self.assertEqual(report.uploads_aborted, 1)
        self.assertIsNone(await self.objects.get_upload(upload.upload_id))
        self.assertIsNotNone(await self.objects.get_upload(fresh.upload_id))
        # Released just now by the database's clock: still in its grace.
        self.assertEqual(report.contents_removed, 0)
        self.past_grace()
        report = await self.gc.run_once()
        self.assertEqual(report.contents_removed, 1)
        self.assertEqual(self.shard_files(part.hash), [])

    # -- buckets ---------------------------------------------------------

    async def test_deleted_bucket_purged(self) -> None:
        """
        A deleted bucket's objects (more than a batch) and uploads are
        removed, then its row, after the grace period; another bucket is
        untouched.
        """
        other = (await self.buckets.create_bucket("keep", self.tenant, "us-east-1")).id
        await self.put("kept", BIG, bucket=other)
        # Late writes that landed in the bucket after DeleteBucket checked
        # it was empty.
        contents = [await self.put(f"k{i}", BIG + bytes([i])) for i in range(3)]
        upload = await self.objects.create_upload(self.bucket, "big", {})
        await self.put_part(upload.upload_id, 1, b"part!" * 20)
        self.assertTrue(await self.buckets.delete_bucket(self.bucket))

        report = await self.gc.run_once()
        self.assertEqual((report.objects_purged, report.uploads_aborted, report.buckets_purged), (3, 1, 0))
        self.assertEqual(await self.objects.gc_bucket_keys(self.bucket, 10), [])

        self.past_grace()
        report = await self.gc.run_once()
        self.assertEqual((report.objects_purged, report.buckets_purged, report.contents_removed), (3, 1, 4))
        rows = await self.global_db.run_query("SELECT id FROM buckets ORDER BY id")
        self.assertEqual(rows, [(other,)])
        self.assertEqual(await self.count("SELECT count(*) FROM objects WHERE bucket_id = %s", (self.bucket,)), 0)
        for content in contents:
            self.assertEqual(self.shard_files(content.hash), [])
        record = await self.objects.get_object(other, "kept")
        self.assertIsNotNone(record)

    async def test_deleted_bucket_of_other_region_left(self) -> None:
        """
        A deleted bucket of another region is left to that region's
        collector.
        """
        admin = GlobalStore(self.global_db, SecretBox.from_hex("ab" * 32))
        await admin.create_region("eu-west-1")
        far = (await self.buckets.create_bucket("far", self.tenant, "eu-west-1")).id
        await self.buckets.delete_bucket(far)
        self.past_grace()
        report = await self.gc.run_once()
        self.assertEqual(report.buckets_purged, 0)
        rows = await self.global_db.run_query("SELECT id FROM buckets WHERE id = %s", (far,))
        self.assertEqual(rows, [(far,)])

    # -- temporaries and repetition --------------------------------------

    async def test_temporaries_removed(self) -> None:
        """
        Temporary shard files older than the age are removed; younger ones
        and those of a writer still open are kept.
        """
        old = os.path.join(self.dirs[0], "tmp", "crashed.0.tmp")
        young = os.path.join(self.dirs[1], "tmp", "recent.1.tmp")
        for path in (old, young):
            with open(path, "wb") as f:
                f.write(b"x")
        os.utime(old, (time.time() - 7200, time.time() - 7200))
        open_writer = await self.stage(BIG)
        self.addCleanup(lambda: Deferred.fromCoroutine(open_writer.writer.abort()))
        before = set(self.temporaries())
        report = await self.gc.run_once()
        self.assertEqual(report.temporaries_removed, 1)
        self.assertEqual(set(self.temporaries()), before - {old})

    async def test_run_twice_harmless(self) -> None:
        """
        A pass logs its report with named fields; a second pass right after
        it finds nothing to do and reports no error; live data is untouched.
        """
        await self.put("a", BIG)
        await self.put("b", BIG[::-1])
        await self.put("c", b"tiny")
        await self.objects.delete_objects(self.bucket, ["a", "c"])
        self.past_grace()
        with capturedLogs() as events:
            first = await self.gc.run_once()
        self.assertEqual((first.contents_removed, first.objects_purged, first.errors), (2, 2, 0))
        [logged] = [e for e in events if e.get("log_format", "").startswith("Garbage collection pass")]
        self.assertEqual(
            (logged["contents_removed"], logged["shard_files_deleted"], logged["objects_purged"]), (2, 6, 2)
        )
        second = await self.gc.run_once()
        self.assertEqual(second, GcReport())
        self.assertEqual(await self.read("b"), BIG[::-1])


    async def test_periodic_worker_runs_passes(self) -> None:
        """
        A PeriodicWorker runs the collector as its task, one pass per
        interval.
        """
        content = await self.put("a", BIG)
        await self.objects.delete_object(self.bucket, "a")
        self.past_grace()
        worker = PeriodicWorker(self.gc, 60, self.clock, now=True)
        worker.startService()
        self.addCleanup(worker.stopService)
        deadline = time.monotonic() + 10
        while worker.passes < 1 and time.monotonic() < deadline:
            await deferLater(reactor, 0.01, lambda: None)
        self.assertEqual((worker.name, worker.passes, worker.failures), ("worker-gc", 1, 0))
        self.assertIsNone(await self.content_row(content.hash))
        self.assertEqual(self.shard_files(content.hash), [])
