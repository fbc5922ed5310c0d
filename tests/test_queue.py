# -*- test-case-name: tests.test_queue -*-
"""
Tests for L{anvil.worker.queue} against a real PostgreSQL.

The queue takes its time from a L{Clock} (started at the real time, so the
timestamps are sensible), which lets the tests expire leases and back-offs
without sleeping; the database connections run on the real reactor.
"""

from __future__ import annotations

import time
from typing import Any
from datetime import UTC, datetime, timedelta

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from anvil.errors import InvalidArgument, NotFound
from anvil.meta.database import Database
from anvil.meta.migrate import apply_migrations
from anvil.worker.queue import LeaseLost, Task, TaskQueue
from tests.pg import fresh_database


class QueueTestMixin:
    """
    A migrated global database, a clock at the real time, and queue
    factories.
    """

    async def open_database(self) -> None:
        t: TestCase = self  # type: ignore[assignment]
        self.dsn = fresh_database(t, "q")
        self.db = await self.connect()
        await apply_migrations(self.db, "global")
        self.clock = Clock()
        self.clock.advance(time.time())

    async def connect(self, pool_size: int = 4) -> Database:
        """
        Another connection pool to the test database, closed in cleanup.
        """
        db = await Database.connect(self.dsn, reactor, pool_size=pool_size)
        self.addCleanup(db.close)  # type: ignore[attr-defined]
        return db

    def queue(self, owner: str = "w1", db: Database | None = None, **kwargs: Any) -> TaskQueue:
        return TaskQueue(db or self.db, self.clock, owner, **kwargs)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), UTC)


class EnqueueTests(QueueTestMixin, TestCase):
    """
    Adding, reading, listing and counting tasks.
    """

    async def setUp(self) -> None:
        await self.open_database()

    async def test_enqueue_and_get(self) -> None:
        """
        An enqueued task is pending with its kind, payload, region and
        defaults, runnable now.
        """
        q = self.queue()
        task_id = await q.enqueue("delete_object", {"bucket": "b", "key": "k"}, region="eu")
        task = await q.get(task_id)
        self.assertEqual(
            (task.kind, task.payload, task.region, task.state, task.attempts, task.max_attempts),
            ("delete_object", {"bucket": "b", "key": "k"}, "eu", "pending", 0, 10),
        )
        self.assertEqual(task.run_after, self.now())
        self.assertIsNone(task.lease_owner)

    async def test_default_max_attempts(self) -> None:
        """
        A queue made with C{default_max_attempts} (the node passes
        C{worker.task_max_attempts}) gives it to the tasks it enqueues
        without their own, plain and unique ones alike; an explicit value
        still wins.
        """
        q = self.queue(default_max_attempts=3)
        plain = await q.get(await q.enqueue("repair", {"content_hash": "a"}))
        unique_id, _ = await q.enqueue_unique("repair", {"content_hash": "b"}, ["content_hash"])
        explicit = await q.get(await q.enqueue("repair", {"content_hash": "c"}, max_attempts=7))
        self.assertEqual(
            (plain.max_attempts, (await q.get(unique_id)).max_attempts, explicit.max_attempts), (3, 3, 7)
        )

    async def test_get_unknown(self) -> None:
        """
        Getting a task that does not exist raises NotFound naming it.
        """
        with self.assertRaises(NotFound) as e:
            await self.queue().get(12345)
        self.assertIn("12345", str(e.exception))

    async def test_list_and_depth(self) -> None:
        """
        list filters by state and kind in id order; depth counts by kind
        and state.
        """
        q = self.queue()
        a = await q.enqueue("gc", {})
        b = await q.enqueue("repair", {"content": "x"})
        c = await q.enqueue("gc", {})
        claimed = await q.claim(["repair"], None)
        assert claimed is not None
        self.assertEqual(claimed.id, b)
        self.assertEqual([t.id for t in await q.list()], [a, b, c])
        self.assertEqual([t.id for t in await q.list(state="pending")], [a, c])
        self.assertEqual([t.id for t in await q.list(kind="repair")], [b])
        self.assertEqual([t.id for t in await q.list(limit=1)], [a])
        self.assertEqual(await q.depth(), {("gc", "pending"): 2, ("repair", "running"): 1})
        with self.assertRaises(InvalidArgument):
            await q.list(state="sleeping")


class EnqueueUniqueTests(QueueTestMixin, TestCase):
    """
    L{TaskQueue.enqueue_unique}: one unfinished task per key.
    """

    async def setUp(self) -> None:
        await self.open_database()

    def repair(self, content: str, index: int, reason: str = "scrub") -> dict[str, object]:
        return {"content_hash": content, "shard_index": index, "reason": reason}

    async def test_second_enqueue_returns_first(self) -> None:
        """
        While a task with the same key fields is pending or running, a second
        enqueue returns its id without inserting; another key inserts.
        """
        q = self.queue()
        key = ("content_hash", "shard_index")
        first, created = await q.enqueue_unique("repair", self.repair("aa", 1), key, region="eu")
        self.assertTrue(created)
        again = await q.enqueue_unique("repair", self.repair("aa", 1, "sweep"), key, region="eu")
        self.assertEqual(again, (first, False))
        other_index, created = await q.enqueue_unique("repair", self.repair("aa", 2), key, region="eu")
        self.assertTrue(created)
        self.assertNotEqual(other_index, first)
        other_region, created = await q.enqueue_unique("repair", self.repair("aa", 1), key, region="us")
        self.assertTrue(created)
        await q.claim(["repair"], "eu")
        self.assertEqual(
            await q.enqueue_unique("repair", self.repair("aa", 1), key, region="eu"), (first, False)
        )
        self.assertEqual((await q.get(first)).payload, self.repair("aa", 1))
        self.assertEqual(len(await q.list(kind="repair")), 3)

    async def test_finished_task_does_not_block(self) -> None:
        """
        Once the task is done (or parked, or cancelled), the same key makes
        a new task.
        """
        q = self.queue()
        key = ("content_hash", "shard_index")
        first, _ = await q.enqueue_unique("repair", self.repair("bb", 0), key)
        task = await q.claim(["repair"], None)
        assert task is not None
        await q.complete(task)
        second, created = await q.enqueue_unique("repair", self.repair("bb", 0), key)
        self.assertTrue(created)
        await q.cancel(second)
        third, created = await q.enqueue_unique("repair", self.repair("bb", 0), key)
        self.assertTrue(created)
        self.assertEqual(len({first, second, third}), 3)

    async def test_concurrent_enqueuers_insert_one(self) -> None:
        """
        Many enqueuers of one key racing on separate connection pools create
        exactly one task.
        """
        queues = [self.queue(f"w{i}", db=await self.connect(pool_size=2)) for i in range(4)]
        key = ("content_hash", "shard_index")
        results = await gatherResults(
            [
                Deferred.fromCoroutine(q.enqueue_unique("repair", self.repair("cc", 3), key))
                for q in queues
                for _ in range(3)
            ]
        )
        self.assertEqual(len({task_id for task_id, _ in results}), 1)
        self.assertEqual(sum(created for _, created in results), 1)
        self.assertEqual(await self.queue().depth(), {("repair", "pending"): 1})

    async def test_invalid_arguments(self) -> None:
        """
        A missing kind, an empty key or a payload without a key field is
        refused.
        """
        q = self.queue()
        for kind, payload, key in (
            ("", {"a": 1}, ("a",)),
            ("repair", {"a": 1}, ()),
            ("repair", {"a": 1}, ("a", "b")),
        ):
            with self.assertRaises(InvalidArgument):
                await q.enqueue_unique(kind, payload, key)
        self.assertEqual(await q.list(), [])


class ClaimTests(QueueTestMixin, TestCase):
    """
    Claiming: exclusivity, filters, leases and takeover.
    """

    async def setUp(self) -> None:
        await self.open_database()

    async def test_concurrent_claimers_never_share(self) -> None:
        """
        Two workers on two connection pools, claiming concurrently until the
        queue is empty, get disjoint sets of tasks that together are all of
        them.
        """
        ids = set()
        for i in range(50):
            ids.add(await self.queue().enqueue("gc", {"n": i}))
        workers = [self.queue("a", await self.connect()), self.queue("b", await self.connect())]
        claimed: dict[str, list[int]] = {"a": [], "b": []}

        async def drain(q: TaskQueue) -> None:
            while (task := await q.claim(["gc"], None)) is not None:
                claimed[q.owner].append(task.id)

        # Four concurrent claim loops per worker: every pool connection busy.
        await gatherResults([Deferred.fromCoroutine(drain(q)) for q in workers for _ in range(4)])
        everything = claimed["a"] + claimed["b"]
        self.assertEqual(len(everything), 50)
        self.assertEqual(set(everything), ids)
        self.assertFalse(set(claimed["a"]) & set(claimed["b"]))
        # Both really took part.
        self.assertTrue(claimed["a"] and claimed["b"], claimed)
        rows = await self.db.run_query("SELECT DISTINCT state, attempts FROM tasks")
        self.assertEqual(rows, [("running", 1)])

    async def test_claim_sets_lease(self) -> None:
        """
        A claim makes the task running, leased to the claimer until now plus
        the lease, with one attempt counted.
        """
        q = self.queue("node-1", lease_seconds=30)
        task_id = await q.enqueue("gc", {})
        task = await q.claim(None, None)
        assert task is not None
        self.assertEqual(
            (task.id, task.state, task.attempts, task.lease_owner, task.lease_expires_at),
            (task_id, "running", 1, "node-1", self.now() + timedelta(seconds=30)),
        )
        self.assertIsNone(await q.claim(None, None))

    async def test_claim_filters(self) -> None:
        """
        Only the given kinds, the worker's region (or none), and tasks whose
        run_after has passed are claimed.
        """
        q = self.queue()
        later = await q.enqueue("gc", {}, run_after=self.now() + timedelta(seconds=10))
        other_region = await q.enqueue("gc", {}, region="ap")
        other_kind = await q.enqueue("scrub", {})
        mine = await q.enqueue("gc", {}, region="eu")
        anywhere = await q.enqueue("gc", {})
        got = []
        while (task := await q.claim(["gc", "repair"], "eu")) is not None:
            got.append(task.id)
        self.assertEqual(sorted(got), sorted([mine, anywhere]))
        self.assertIsNone(await q.claim([], "eu"))
        self.clock.advance(10)
        task = await q.claim(["gc"], "eu")
        assert task is not None
        self.assertEqual(task.id, later)
        self.assertEqual({(await q.get(i)).state for i in (other_region, other_kind)}, {"pending"})

    async def test_expired_lease_taken_over(self) -> None:
        """
        When a worker stops renewing, another takes its task over after the
        lease expires (one more attempt), and the first one's late
        completion is refused.
        """
        dead = self.queue("dead", lease_seconds=10)
        alive = self.queue("alive", lease_seconds=10, db=await self.connect())
        task_id = await dead.enqueue("gc", {})
        first = await dead.claim(None, None)
        assert first is not None
        self.clock.advance(9)
        self.assertIsNone(await alive.claim(None, None))
        self.clock.advance(2)
        second = await alive.claim(None, None)
        assert second is not None
        self.assertEqual((second.id, second.attempts, second.lease_owner), (task_id, 2, "alive"))
        with self.assertRaises(LeaseLost):
            await dead.complete(first)
        with self.assertRaises(LeaseLost):
            await dead.renew(first)
        done = await alive.complete(second)
        self.assertEqual((done.state, done.lease_owner), ("done", None))

    async def test_renew_extends_lease(self) -> None:
        """
        Renewing moves the lease expiry forward, so nobody takes the task over.
        """
        q = self.queue("w", lease_seconds=10)
        other = self.queue("other", lease_seconds=10)
        await q.enqueue("gc", {})
        task = await q.claim(None, None)
        assert task is not None
        for _ in range(3):
            self.clock.advance(8)
            task = await q.renew(task)
            self.assertEqual(task.lease_expires_at, self.now() + timedelta(seconds=10))
            self.assertIsNone(await other.claim(None, None))

    async def test_expired_last_attempt_is_parked(self) -> None:
        """
        A task whose last allowed attempt lost its lease is parked as failed
        rather than run again.
        """
        q = self.queue(lease_seconds=5)
        task_id = await q.enqueue("gc", {}, max_attempts=2)
        for attempt in (1, 2):
            task = await q.claim(None, None)
            assert task is not None
            self.assertEqual(task.attempts, attempt)
            self.clock.advance(6)
        self.assertIsNone(await q.claim(None, None))
        task = await q.get(task_id)
        self.assertEqual((task.state, task.attempts), ("failed", 2))
        self.assertIn("lease", task.last_error or "")


class FailureTests(QueueTestMixin, TestCase):
    """
    Back-off, parking, retry and cancel.
    """

    async def setUp(self) -> None:
        await self.open_database()

    async def claim(self, q: TaskQueue) -> Task:
        task = await q.claim(None, None)
        assert task is not None
        return task

    async def test_backoff_and_parking(self) -> None:
        """
        Each failure puts run_after at now + min(cap, base * 2**attempts);
        the task is not claimable before, and after max_attempts it is
        parked as failed with the last error.
        """
        q = self.queue(backoff_base=2, backoff_cap=5, backoff_jitter=0)
        task_id = await q.enqueue("gc", {}, max_attempts=3)
        for attempts, delay in ((1, 4), (2, 5)):
            task = await self.claim(q)
            self.assertEqual(task.attempts, attempts)
            failed = await q.fail(task, f"boom {attempts}")
            self.assertEqual(
                (failed.state, failed.run_after, failed.last_error, failed.lease_owner),
                ("pending", self.now() + timedelta(seconds=delay), f"boom {attempts}", None),
            )
            self.clock.advance(delay - 0.5)
            self.assertIsNone(await q.claim(None, None))
            self.clock.advance(0.5)
        task = await self.claim(q)
        parked = await q.fail(task, "boom 3")
        self.assertEqual((parked.id, parked.state, parked.attempts, parked.last_error), (task_id, "failed", 3, "boom 3"))
        self.clock.advance(3600)
        self.assertIsNone(await q.claim(None, None))

    async def test_backoff_jitter(self) -> None:
        """
        Jitter shortens the back-off by at most its fraction.
        """
        q = self.queue(backoff_base=10, backoff_cap=1000, backoff_jitter=0.5)
        await q.enqueue("gc", {})
        failed = await q.fail(await self.claim(q), "x")
        delay = (failed.run_after - self.now()).total_seconds()
        self.assertTrue(10 <= delay <= 20, delay)

    async def test_retry(self) -> None:
        """
        Retrying a parked task makes it pending and runnable now with its
        attempts reset; a running task cannot be retried; an unknown one is
        NotFound.
        """
        q = self.queue()
        task_id = await q.enqueue("gc", {}, max_attempts=1)
        task = await self.claim(q)
        with self.assertRaises(InvalidArgument):
            await q.retry(task_id)
        await q.fail(task, "broken")
        retried = await q.retry(task_id)
        self.assertEqual((retried.state, retried.attempts, retried.run_after), ("pending", 0, self.now()))
        self.assertEqual((await self.claim(q)).id, task_id)
        with self.assertRaises(NotFound):
            await q.retry(999)

    async def test_cancel(self) -> None:
        """
        Cancelling a pending task keeps it from running; cancelling a running
        one takes its worker's lease away; a done task cannot be cancelled.
        """
        q = self.queue()
        pending = await q.enqueue("gc", {})
        self.assertEqual((await q.cancel(pending)).state, "cancelled")
        self.assertEqual((await q.cancel(pending)).state, "cancelled")
        self.assertIsNone(await q.claim(None, None))
        running_id = await q.enqueue("gc", {})
        running = await self.claim(q)
        await q.cancel(running_id)
        with self.assertRaises(LeaseLost):
            await q.complete(running)
        self.assertEqual((await q.get(running_id)).state, "cancelled")
        done_id = await q.enqueue("gc", {})
        await q.complete(await self.claim(q))
        with self.assertRaises(InvalidArgument):
            await q.cancel(done_id)
        with self.assertRaises(NotFound):
            await q.cancel(999)

