# -*- test-case-name: tests.test_scrub -*-
"""
Tests for L{anvil.worker.scrub}: real shard files written through
L{LocalShardStore} and L{ErasureCodec}, repairs enqueued in a real
PostgreSQL task queue, a GET served from parity after a quarantine (the S3
fixture), and C{anvil-admin worker run-once scrub} as a subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any

import psycopg2
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from anvil.meta.database import Database
from anvil.meta.migrate import apply_migrations
from anvil.metrics import Metrics
from anvil.storage.cpu import CpuPool
from anvil.storage.erasure import ErasureCodec, ErasureParams
from anvil.storage.shardfile import HEADER_SIZE, TRAILER_SIZE, ShardReader
from anvil.storage.shardstore import LocalShardStore, ShardLocation
from anvil.worker.loop import PeriodicWorker
from anvil.worker.queue import TaskQueue
from anvil.worker.scrub import QUARANTINE_DIR, STATE_FILE, ScrubCursor, Scrubber
from tests.pg import fresh_database
from tests.s3fixture import S3Stack
from tests.test_admin import KEY, run_admin

#: Small stripes so that a content spans several blocks per shard.
PARAMS = ErasureParams(4, 2, 4096)


def write_content(store: LocalShardStore, data: bytes) -> tuple[bytes, list[ShardLocation]]:
    """
    Encode C{data} and commit all its shards.

    @return: the content hash and the shards' locations.
    """
    digest = hashlib.sha256(data).digest()
    codec = ErasureCodec(PARAMS)
    writers = [store.open_writer(i, PARAMS, digest) for i in range(PARAMS.total)]
    for offset in range(0, len(data), PARAMS.stripe_size):
        for writer, block in zip(writers, codec.encode_stripe(data[offset : offset + PARAMS.stripe_size])):
            writer.write_block(block)
    return digest, [store.commit(w, digest, len(data)) for w in writers]


def flip_byte(path: str, stripe: int = 1, delta: int = 5) -> None:
    """
    Flip one byte inside the block of C{stripe} of a shard file.
    """
    with ShardReader(path) as reader:
        offset = reader.header.block_offset(stripe) + delta
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def corrupt_total(metrics: Metrics) -> float:
    """
    The value of C{anvil_shards_corrupt_total}.
    """
    value = metrics.registry.get_sample_value("anvil_shards_corrupt_total")
    return value or 0.0


class ScrubTestMixin:
    """
    A shard store over three directories, a migrated global database and a
    queue on a simulated clock, and scrubber factories.
    """

    async def prepare(self) -> None:
        t: TestCase = self  # type: ignore[assignment]
        base = os.path.abspath(t.mktemp())
        self.data_dir = base
        self.store = LocalShardStore([os.path.join(base, f"disk{i}") for i in range(3)])
        self.db = await Database.connect(fresh_database(t, "g"), reactor, pool_size=2)
        t.addCleanup(self.db.close)
        await apply_migrations(self.db, "global")
        self.clock = Clock()
        self.clock.advance(time.time())
        self.queue = TaskQueue(self.db, self.clock, "scrub-test")
        self.metrics = Metrics()
        self.io = CpuPool.synchronous()

    def scrubber(self, budget: int = 10**9, queue: Any = "default", **kwargs: Any) -> Scrubber:
        options: dict[str, Any] = {
            "node_id": "node-a",
            "region": "us-east-1",
            "state_path": os.path.join(self.data_dir, STATE_FILE),
            "budget_bytes": budget,
            "rate_bytes": 1e9,
            "paced": False,
        }
        options.update(kwargs)
        return Scrubber(
            self.store,
            self.io,
            self.queue if queue == "default" else queue,
            self.metrics,
            self.clock,
            **options,
        )

    def file_sizes(self) -> dict[str, int]:
        return {loc.path: os.path.getsize(loc.path) for loc in self.store.list_shards()}


class ScrubTests(ScrubTestMixin, TestCase):
    """
    Finding, quarantining and reporting corrupt shards.
    """

    async def setUp(self) -> None:
        await self.prepare()

    async def test_clean_pass_reads_everything(self) -> None:
        """
        A pass with enough budget checks every file once, reading every
        byte of each, finds nothing, and completes the cycle.
        """
        write_content(self.store, os.urandom(5 * 4096 + 100))
        write_content(self.store, os.urandom(3 * 4096))
        sizes = self.file_sizes()
        report = await self.scrubber().run_once()
        self.assertEqual(
            report.to_json(),
            {
                "files_checked": 12,
                "bytes_read": sum(sizes.values()),
                "corrupt_found": 0,
                "quarantined": 0,
                "repairs_enqueued": 0,
                "errors": 0,
                "cycle_completed": True,
            },
        )
        self.assertEqual(corrupt_total(self.metrics), 0)
        self.assertEqual(await self.queue.list(), [])

    async def test_flipped_byte_quarantined_and_repaired_once(self) -> None:
        """
        A flipped byte is found, the file moved to the quarantine with its
        name, counted, and one repair task enqueued naming the shard; the
        next pass finds nothing more and enqueues nothing.
        """
        digest, locations = write_content(self.store, os.urandom(4 * 4096))
        bad = locations[2]
        flip_byte(bad.path, stripe=2)
        scrubber = self.scrubber()
        report = await scrubber.run_once()
        self.assertEqual(
            (report.files_checked, report.corrupt_found, report.quarantined, report.repairs_enqueued),
            (6, 1, 1, 1),
        )
        self.assertFalse(os.path.exists(bad.path))
        quarantined = os.path.join(bad.data_dir, QUARANTINE_DIR, os.path.basename(bad.path))
        self.assertTrue(os.path.exists(quarantined))
        self.assertIsNone(self.store.locate(digest, bad.shard_index))
        self.assertEqual(corrupt_total(self.metrics), 1)
        tasks = await self.queue.list()
        self.assertEqual(len(tasks), 1)
        task = tasks[0]
        self.assertEqual((task.kind, task.region, task.state), ("repair", "us-east-1", "pending"))
        self.assertEqual(
            {k: task.payload[k] for k in ("content_hash", "shard_index", "node_id")},
            {"content_hash": digest.hex(), "shard_index": bad.shard_index, "node_id": "node-a"},
        )
        self.assertIn("stripe 2", task.payload["reason"])

        again = await scrubber.run_once()
        self.assertEqual((again.files_checked, again.corrupt_found, again.repairs_enqueued), (5, 0, 0))
        self.assertEqual(len(await self.queue.list()), 1)
        self.assertEqual(corrupt_total(self.metrics), 1)

    async def test_same_shard_corrupt_again_while_repair_pending(self) -> None:
        """
        When the same shard is found corrupt again before its repair ran,
        the evidence is kept under a new name and no second repair task is
        enqueued.
        """
        data = os.urandom(2 * 4096)
        _, locations = write_content(self.store, data)
        flip_byte(locations[0].path, stripe=0)
        scrubber = self.scrubber()
        self.assertEqual((await scrubber.run_once()).repairs_enqueued, 1)
        # The shard comes back (say, a re-upload of the same content) and
        # rots again.
        write_content(self.store, data)
        flip_byte(locations[0].path, stripe=1)
        report = await scrubber.run_once()
        self.assertEqual((report.corrupt_found, report.quarantined, report.repairs_enqueued), (1, 1, 0))
        quarantine = os.path.join(locations[0].data_dir, QUARANTINE_DIR)
        name = os.path.basename(locations[0].path)
        self.assertEqual(sorted(os.listdir(quarantine)), [name, f"{name}.1"])
        self.assertEqual(len(await self.queue.list()), 1)
        self.assertEqual(corrupt_total(self.metrics), 2)

    async def test_bad_header_and_size(self) -> None:
        """
        A truncated file and a file whose header names another shard are
        corrupt too.
        """
        digest, locations = write_content(self.store, os.urandom(3 * 4096))
        with open(locations[1].path, "r+b") as f:
            f.truncate(os.path.getsize(locations[1].path) - 3)
        # A valid shard under another shard's name.
        os.replace(locations[4].path, locations[5].path)
        report = await self.scrubber().run_once()
        self.assertEqual((report.corrupt_found, report.quarantined, report.repairs_enqueued), (2, 2, 2))
        reasons = sorted(t.payload["reason"] for t in await self.queue.list())
        self.assertIn("truncated", reasons[1])
        self.assertIn("another shard", reasons[0])

    async def test_budget_respected_and_cycle_covers_all(self) -> None:
        """
        With a budget of a few blocks, no pass reads more than the budget,
        passes resume where the last one stopped, and one cycle checks each
        file exactly once.
        """
        for _ in range(3):
            write_content(self.store, os.urandom(4 * 4096 + 10))
        sizes = self.file_sizes()
        budget = 2 * max(sizes.values()) + 100
        scrubber = self.scrubber(budget=budget)
        reports = []
        for _ in range(50):
            report = await scrubber.run_once()
            reports.append(report)
            self.assertLessEqual(report.bytes_read, budget)
            self.assertGreater(report.files_checked + (report.bytes_read > 0), 0)
            if report.cycle_completed:
                break
        self.assertTrue(reports[-1].cycle_completed)
        self.assertGreater(len(reports), 3)
        self.assertEqual(sum(r.files_checked for r in reports), len(sizes))
        # Every byte once, plus a header read again where a pass resumes a
        # file or stops at one whose next block no longer fits.
        read = sum(r.bytes_read for r in reports)
        self.assertGreaterEqual(read, sum(sizes.values()))
        self.assertLessEqual(read, sum(sizes.values()) + 2 * HEADER_SIZE * len(reports))
        self.assertIsNone(scrubber.cursor)

    async def test_large_file_resumes_mid_file(self) -> None:
        """
        A file larger than the budget is verified across passes, stripe by
        stripe, and a bad block near its end is found by a later pass.
        """
        write_content(self.store, os.urandom(40 * 4096))
        # The first file of the walk (the store lists in the same order).
        first_file = next(iter(self.store.list_shards()))
        flip_byte(first_file.path, stripe=38)
        block = PARAMS.block_size + TRAILER_SIZE
        budget = HEADER_SIZE + 10 * block
        scrubber = self.scrubber(budget=budget)
        first = await scrubber.run_once()
        self.assertEqual((first.files_checked, first.corrupt_found, first.bytes_read), (0, 0, budget))
        cursor = scrubber.cursor
        assert cursor is not None
        self.assertEqual((cursor, cursor.stripe), (ScrubCursor.at(first_file, 10), 10))
        found = None
        for _ in range(3):
            report = await scrubber.run_once()
            self.assertLessEqual(report.bytes_read, budget)
            if report.corrupt_found:
                found = report
                break
        assert found is not None
        self.assertEqual(found.repairs_enqueued, 1)
        self.assertIn("stripe 38", (await self.queue.list())[0].payload["reason"])

    async def test_restart_resumes_from_state_file(self) -> None:
        """
        A new scrubber (a restarted node) reads the cursor from the state
        file and continues the walk rather than starting over.
        """
        for _ in range(2):
            write_content(self.store, os.urandom(2 * 4096))
        sizes = self.file_sizes()
        budget = 3 * max(sizes.values())
        first = self.scrubber(budget=budget)
        done = (await first.run_once()).files_checked
        self.assertEqual(done, 3)
        with open(os.path.join(self.data_dir, STATE_FILE)) as f:
            saved = json.load(f)
        self.assertEqual(ScrubCursor.from_json(saved["cursor"]), first.cursor)

        restarted = self.scrubber(budget=budget)
        while True:
            report = await restarted.run_once()
            done += report.files_checked
            if report.cycle_completed:
                break
        self.assertEqual(done, len(sizes))

    async def test_unreadable_state_starts_over(self) -> None:
        """
        A damaged state file is ignored (logged): the walk starts from the
        beginning.
        """
        write_content(self.store, os.urandom(4096))
        with open(os.path.join(self.data_dir, STATE_FILE), "w") as f:
            f.write("{not json")
        report = await self.scrubber().run_once()
        self.assertEqual((report.files_checked, report.cycle_completed), (6, True))

    async def test_repair_kept_until_queue_reachable(self) -> None:
        """
        A repair request that could not be enqueued is kept in the state
        file and enqueued by the next pass (here: of a restarted scrubber).
        """
        digest, locations = write_content(self.store, os.urandom(4096))
        flip_byte(locations[3].path, stripe=0)
        offline = self.scrubber(queue=None)
        report = await offline.run_once()
        self.assertEqual((report.quarantined, report.repairs_enqueued), (1, 0))
        self.assertEqual([p["shard_index"] for p in offline.pending_repairs], [3])

        online = self.scrubber()
        report = await online.run_once()
        self.assertEqual((report.corrupt_found, report.repairs_enqueued), (0, 1))
        self.assertEqual(online.pending_repairs, [])
        [task] = await self.queue.list()
        self.assertEqual((task.payload["content_hash"], task.payload["shard_index"]), (digest.hex(), 3))

    async def test_file_replaced_during_check_not_quarantined(self) -> None:
        """
        A file replaced after its check (an identical content committed
        again) is left in place: the bad bytes were in the old file.
        """
        data = os.urandom(4096)
        _, locations = write_content(self.store, data)
        target = locations[0]
        flip_byte(target.path, stripe=0)
        scrubber = self.scrubber()
        check = scrubber._check_file(target, 0, 10**9, True)
        self.assertIsNotNone(check.corrupt)
        write_content(self.store, data)
        self.assertIsNone(scrubber._quarantine(target, check.identity))
        self.assertTrue(os.path.exists(target.path))
        with ShardReader(target.path) as reader:
            self.assertEqual(reader.verify(), [])


class PacingTests(ScrubTestMixin, TestCase):
    """
    A paced pass holds the configured rate and can be interrupted.
    """

    async def setUp(self) -> None:
        await self.prepare()

    async def test_paced_pass_waits_for_the_rate(self) -> None:
        """
        At 4 KiB/s, a pass over about 26 KiB of shards sleeps about six
        seconds of (simulated) time before it finishes.
        """
        write_content(self.store, os.urandom(4 * 4096))
        total = sum(self.file_sizes().values())
        scrubber = self.scrubber(rate_bytes=4096.0, paced=True)
        running = Deferred.fromCoroutine(scrubber.run_once())
        self.assertFalse(running.called)
        self.clock.advance(total / 4096 - 1.5)
        self.assertFalse(running.called)
        self.clock.advance(2)
        report = await running
        self.assertEqual((report.files_checked, report.bytes_read), (6, total))

    async def test_stopping_worker_interrupts_paced_pass(self) -> None:
        """
        Stopping the periodic worker during a paced pass ends the pass at
        once, keeping its position for the next one.
        """
        for _ in range(2):
            write_content(self.store, os.urandom(4096))
        scrubber = self.scrubber(rate_bytes=100.0, paced=True)
        service = PeriodicWorker(scrubber, 60, self.clock, now=True)
        service.startService()
        self.assertTrue(service.busy)
        stopped = service.stopService()
        await stopped
        self.assertFalse(service.busy)
        self.assertEqual(service.passes, 1)
        cursor = scrubber.cursor
        assert cursor is not None
        self.assertIsNone(cursor.stripe)


class ScrubThroughS3Tests(TestCase):
    """
    A shard of an object uploaded through S3 is damaged; the scrub finds and
    quarantines it, and the object still reads back byte-exact.
    """

    async def test_get_after_quarantine(self) -> None:
        """
        After the scrub quarantined a damaged data shard, GetObject rebuilds
        the object from the remaining shards (parity included).
        """
        stack = await S3Stack.start(self, stripe_size=16 * 1024)
        app = await stack.create_app("acme", "web")
        client = stack.client(app)
        await stack.call(client.create_bucket, Bucket="photos")
        body = os.urandom(100_000)
        await stack.call(client.put_object, Bucket="photos", Key="cat.jpg", Body=body)
        shards = list(stack.shards.list_shards())
        self.assertEqual(len(shards), 6)
        data_shard = next(loc for loc in shards if loc.shard_index == 1)
        flip_byte(data_shard.path, stripe=3)

        queue = TaskQueue(stack.global_db, reactor, "node-a/1")
        scrubber = Scrubber(
            stack.shards,
            stack.io,
            queue,
            stack.metrics,
            reactor,
            node_id="node-a",
            region=stack.region,
            state_path=os.path.join(stack.config.node.data_dir, STATE_FILE),
            budget_bytes=10**9,
            rate_bytes=1e9,
            paced=False,
        )
        report = await scrubber.run_once()
        self.assertEqual((report.corrupt_found, report.quarantined, report.repairs_enqueued), (1, 1, 1))
        self.assertFalse(os.path.exists(data_shard.path))
        self.assertEqual(corrupt_total(stack.metrics), 1)

        def get() -> bytes:
            data: bytes = client.get_object(Bucket="photos", Key="cat.jpg")["Body"].read()
            return data

        self.assertEqual(await stack.call(get), body)
        [task] = await queue.list()
        self.assertEqual(task.payload["shard_index"], 1)


class RunOnceScrubTests(TestCase):
    """
    C{anvil-admin worker run-once scrub|repair|sweep} as a subprocess against
    a real data directory and databases.
    """

    def setUp(self) -> None:
        self.data_dir = os.path.abspath(self.mktemp())
        os.makedirs(self.data_dir)
        self.global_dsn = fresh_database(self, "g")
        self.env = {
            "GLOBAL_DATABASE_URL": self.global_dsn,
            "REGIONAL_DATABASE_URL": fresh_database(self, "r"),
            "ANVIL_SECRET_ENCRYPTION_KEY": KEY,
            "ANVIL_DATA_DIR": self.data_dir,
        }

    def tasks(self) -> list[tuple[str, dict[str, Any]]]:
        conn = psycopg2.connect(self.global_dsn)
        try:
            with conn, conn.cursor() as cur:
                cur.execute("SELECT kind, payload FROM tasks ORDER BY id")
                return [(kind, payload) for kind, payload in cur.fetchall()]
        finally:
            conn.close()

    async def test_run_once_scrub_json(self) -> None:
        """
        run-once scrub checks the node's shard files, quarantines the
        damaged one, enqueues its repair and prints the JSON summary; a
        second run finds nothing more.  run-once repair runs the task (its
        content has no row: nothing to rebuild, done), and run-once sweep,
        which needs the node's member list, refuses with one error line
        when the node is not running.
        """
        store = LocalShardStore([self.data_dir])
        digest, locations = write_content(store, os.urandom(6 * 4096))
        flip_byte(locations[4].path, stripe=5)
        result = await run_admin(["worker", "run-once", "scrub", "--json"], self.env)
        self.assertEqual((result.status, result.err), (0, ""), result)
        summary = result.json()
        self.assertEqual(
            {k: summary[k] for k in ("worker", "files_checked", "corrupt_found", "quarantined", "repairs_enqueued")},
            {"worker": "scrub", "files_checked": 6, "corrupt_found": 1, "quarantined": 1, "repairs_enqueued": 1},
        )
        self.assertTrue(summary["cycle_completed"])
        self.assertTrue(os.path.exists(os.path.join(self.data_dir, QUARANTINE_DIR, f"{digest.hex()}.4")))
        self.assertTrue(os.path.exists(os.path.join(self.data_dir, STATE_FILE)))
        [(kind, payload)] = self.tasks()
        self.assertEqual((kind, payload["content_hash"], payload["shard_index"]), ("repair", digest.hex(), 4))

        again = await run_admin(["worker", "run-once", "scrub"], self.env)
        self.assertEqual((again.status, again.err), (0, ""), again)
        self.assertIn("scrub: files checked 5,", again.out)
        self.assertIn("corrupt found 0", again.out)

        repair = await run_admin(["worker", "run-once", "repair", "--json"], self.env)
        self.assertEqual((repair.status, repair.err), (0, ""), repair)
        self.assertEqual((repair.json()["tasks_run"], repair.json()["done"]), (1, 1))
        self.assertEqual(len(self.tasks()), 1)

        sweep = await run_admin(["worker", "run-once", "sweep"], self.env)
        self.assertNotEqual(sweep.status, 0, sweep)
        self.assertEqual(sweep.out, "", sweep)
        self.assertIn("needs the node running", sweep.err)
