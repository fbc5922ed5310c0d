# -*- test-case-name: tests.test_worker_loop -*-
"""
Tests for L{anvil.worker.loop} (L{PeriodicWorker} in simulated time,
L{TaskWorker} on a real PostgreSQL) and L{anvil.meta.listen.Listener}
(C{LISTEN/NOTIFY} waking an idle worker on the real reactor).
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anvil.meta.listen import Listener
from anvil.worker.loop import PeriodicWorker, TaskWorker
from anvil.metrics import Metrics
from anvil.worker.queue import CHANNEL, Task, TaskQueue
from tests.test_queue import QueueTestMixin


class _Task:
    """
    A worker task whose passes finish when the test says so.

    @ivar started: how many passes started.
    @ivar pending: the Deferreds of passes not yet finished.
    @ivar active: passes running right now (never above 1).
    """

    name = "fake"

    def __init__(self, synchronous: bool = False, fail_on: tuple[int, ...] = ()) -> None:
        self.synchronous = synchronous
        self.fail_on = fail_on
        self.started = 0
        self.active = 0
        self.max_active = 0
        self.pending: list[Deferred[None]] = []

    async def run_once(self) -> None:
        self.started += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            if self.started in self.fail_on:
                raise RuntimeError(f"pass {self.started} broke")
            if not self.synchronous:
                d: Deferred[None] = Deferred()
                self.pending.append(d)
                await d
        finally:
            self.active -= 1

    def finish(self) -> None:
        self.pending.pop(0).callback(None)


class PeriodicWorkerTests(SynchronousTestCase):
    """
    L{PeriodicWorker} in simulated time.
    """

    def setUp(self) -> None:
        self.clock = Clock()

    def start(self, task: _Task, interval: float = 10, now: bool = False) -> PeriodicWorker:
        worker = PeriodicWorker(task, interval, self.clock, now=now)
        worker.startService()
        return worker

    def test_runs_periodically(self) -> None:
        """
        A pass runs every interval, the first one interval after the start
        (or at once with now=True).
        """
        task = _Task(synchronous=True)
        worker = self.start(task)
        self.assertEqual(task.started, 0)
        self.clock.advance(10)
        self.assertEqual(task.started, 1)
        self.clock.pump([10, 10, 10])
        self.assertEqual((task.started, worker.passes, worker.failures), (4, 4, 0))
        eager = _Task(synchronous=True)
        self.start(eager, now=True)
        self.assertEqual(eager.started, 1)

    def test_never_overlaps(self) -> None:
        """
        A pass longer than the interval delays the next one instead of
        running beside it.
        """
        task = _Task()
        self.start(task)
        self.clock.advance(10)
        self.clock.pump([10] * 5)
        self.assertEqual((task.started, task.max_active), (1, 1))
        task.finish()
        self.clock.advance(10)
        self.assertEqual((task.started, task.max_active), (2, 1))

    def test_survives_exceptions(self) -> None:
        """
        A pass that raises is logged and counted, and the next passes run.
        """
        task = _Task(synchronous=True, fail_on=(1, 2))
        worker = self.start(task)
        self.clock.pump([10] * 4)
        self.assertEqual((task.started, worker.passes, worker.failures), (4, 4, 2))
        errors = self.flushLoggedErrors(RuntimeError)
        self.assertEqual([str(e.value) for e in errors], ["pass 1 broke", "pass 2 broke"])

    def test_wake_runs_at_once(self) -> None:
        """
        wake() runs a pass immediately, without waiting for the interval.
        """
        task = _Task(synchronous=True)
        worker = self.start(task, interval=3600)
        worker.wake()
        self.assertEqual(task.started, 1)
        worker.wake()
        self.assertEqual(task.started, 2)

    def test_wake_coalesces(self) -> None:
        """
        Wake-ups during a pass cause exactly one more pass right after it,
        and a periodic tick during a pass waits for it.
        """
        task = _Task()
        worker = self.start(task)
        worker.wake()
        self.assertEqual(task.started, 1)
        for _ in range(5):
            worker.wake()
        self.clock.advance(10)
        self.assertEqual(task.started, 1)
        task.finish()
        self.assertEqual((task.started, task.max_active), (2, 1))
        task.finish()
        self.assertEqual(task.started, 2)
        self.assertFalse(worker.busy)

    def test_stop_waits_for_running_pass(self) -> None:
        """
        stopService fires only when the running pass has finished, and no
        pass starts afterwards, not even one asked for by wake().
        """
        task = _Task()
        worker = self.start(task)
        self.clock.advance(10)
        worker.wake()
        stopped = worker.stopService()
        self.assertNoResult(stopped)
        task.finish()
        self.successResultOf(stopped)
        self.clock.pump([10] * 3)
        worker.wake()
        self.assertEqual(task.started, 1)

    def test_stop_waits_for_woken_pass(self) -> None:
        """
        stopService also waits for a pass that wake() started between ticks.
        """
        task = _Task()
        worker = self.start(task)
        worker.wake()
        stopped = worker.stopService()
        self.assertNoResult(stopped)
        task.finish()
        self.successResultOf(stopped)

    def test_stop_when_idle(self) -> None:
        """
        Stopping an idle worker finishes at once.
        """
        worker = self.start(_Task(synchronous=True))
        self.successResultOf(worker.stopService())


async def _until(condition: Any, timeout: float = 5.0) -> None:
    """
    Wait (on the real reactor) until C{condition()} is true.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await deferLater(reactor, 0.01)


class TaskWorkerTests(QueueTestMixin, TestCase):
    """
    L{TaskWorker} claiming and running tasks from a real queue.
    """

    async def setUp(self) -> None:
        await self.open_database()

    async def test_runs_handlers_and_settles(self) -> None:
        """
        A pass runs every runnable task of its kinds with its payload:
        successes are done, failures back off with their error recorded,
        other kinds are left alone.
        """
        q = self.queue()
        seen: list[dict[str, Any]] = []

        async def gc(task: Task) -> None:
            seen.append(task.payload)

        async def repair(task: Task) -> None:
            raise ValueError("no healthy shards")

        worker = TaskWorker(q, {"gc": gc, "repair": repair}, self.clock, region=None)
        ok = await q.enqueue("gc", {"n": 1})
        bad = await q.enqueue("repair", {"c": "x"})
        other = await q.enqueue("scrub", {})
        self.assertEqual(await worker.run_once(), 2)
        self.assertEqual(seen, [{"n": 1}])
        self.assertEqual((await q.get(ok)).state, "done")
        failed = await q.get(bad)
        self.assertEqual((failed.state, failed.last_error), ("pending", "ValueError: no healthy shards"))
        self.assertTrue(failed.run_after > self.now())
        self.assertEqual((await q.get(other)).state, "pending")
        self.assertEqual(worker.outcomes, {("gc", "done"): 1, ("repair", "retry"): 1})
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(await worker.run_once(), 0)

    async def test_renews_lease_while_running(self) -> None:
        """
        While a handler runs past its lease, the worker keeps renewing it,
        so no other worker takes the task over.
        """
        q = self.queue("runner", lease_seconds=9)
        other = self.queue("other", lease_seconds=9)
        release: Deferred[None] = Deferred()

        async def slow(task: Task) -> None:
            await release

        worker = TaskWorker(q, {"gc": slow}, self.clock, region=None)
        task_id = await q.enqueue("gc", {})
        running = Deferred.fromCoroutine(worker.run_once())
        await _until(lambda: release.callbacks)
        for _ in range(4):
            before = (await q.get(task_id)).lease_expires_at
            self.clock.advance(3)
            await _until_async(lambda: q.get(task_id), lambda t: t.lease_expires_at > before)
            self.assertIsNone(await other.claim(None, None))
        release.callback(None)
        self.assertEqual(await running, 1)
        task = await q.get(task_id)
        self.assertEqual((task.state, task.attempts), ("done", 1))

    async def test_lost_lease_discards_result(self) -> None:
        """
        A task cancelled while its handler runs is counted as lost and stays
        cancelled.
        """
        q = self.queue()
        release: Deferred[None] = Deferred()

        async def slow(task: Task) -> None:
            await release

        worker = TaskWorker(q, {"gc": slow}, self.clock, region=None)
        task_id = await q.enqueue("gc", {})
        running = Deferred.fromCoroutine(worker.run_once())
        await _until(lambda: release.callbacks)
        await q.cancel(task_id)
        release.callback(None)
        await running
        self.assertEqual((await q.get(task_id)).state, "cancelled")
        self.assertEqual(worker.outcomes, {("gc", "lost"): 1})


    async def test_outcomes_counted_in_metrics(self) -> None:
        """
        Every outcome moves C{anvil_task_runs_total} for its kind: done,
        retry (backing off) and failed (parked).
        """
        q = self.queue()
        metrics = Metrics()

        async def ok(task: Task) -> None:
            pass

        async def broken(task: Task) -> None:
            raise RuntimeError("disk on fire")

        worker = TaskWorker(q, {"gc": ok, "repair": broken}, self.clock, region=None, metrics=metrics)
        await q.enqueue("gc", {})
        await q.enqueue("repair", {}, max_attempts=2)

        def runs(kind: str, outcome: str) -> float | None:
            return metrics.registry.get_sample_value(
                "anvil_task_runs_total", {"kind": kind, "outcome": outcome}
            )

        await worker.run_once()
        self.assertEqual((runs("gc", "done"), runs("repair", "retry")), (1.0, 1.0))
        self.assertIsNone(runs("repair", "failed"))
        self.clock.advance(3600)
        await worker.run_once()
        self.assertEqual(runs("repair", "failed"), 1.0)
        self.assertEqual(runs("repair", "retry"), 1.0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)

    async def test_urgent_kinds_first(self) -> None:
        """
        A repair enqueued after rebalances runs before them, and before the
        rest of the backlog once the first rebalance has finished.
        """
        q = self.queue()
        order: list[str] = []

        async def handle(task: Task) -> None:
            order.append(f"{task.kind}{task.payload['n']}")
            if task.payload["n"] == 1 and task.kind == "rebalance":
                await q.enqueue("repair", {"n": 2})

        await q.enqueue("rebalance", {"n": 1})
        await q.enqueue("rebalance", {"n": 2})
        await q.enqueue("repair", {"n": 1})
        worker = TaskWorker(
            q, {"repair": handle, "rebalance": handle}, self.clock, region=None,
            priorities={"repair": 0, "rebalance": 5},
        )
        self.assertEqual(worker.kind_groups(), [["repair"], ["rebalance"]])
        self.assertEqual(await worker.run_once(), 4)
        self.assertEqual(order, ["repair1", "rebalance1", "repair2", "rebalance2"])

    async def test_handlers_added_later_are_served(self) -> None:
        """
        The worker keeps the handler mapping by reference: a kind registered
        after it was built is claimed at its next pass.
        """
        q = self.queue()
        handlers: dict[str, Any] = {}
        worker = TaskWorker(q, handlers, self.clock, region=None)
        task_id = await q.enqueue("evacuate", {})
        self.assertEqual(await worker.run_once(), 0)
        seen: list[int] = []

        async def evacuate(task: Task) -> None:
            seen.append(task.id)

        handlers["evacuate"] = evacuate
        self.assertEqual(await worker.run_once(), 1)
        self.assertEqual(seen, [task_id])


async def _until_async(fetch: Any, condition: Any, timeout: float = 5.0) -> None:
    """
    Wait until C{condition(await fetch())} is true.
    """
    deadline = time.monotonic() + timeout
    while not condition(await fetch()):
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await deferLater(reactor, 0.01)


class NotifyTests(QueueTestMixin, TestCase):
    """
    C{LISTEN/NOTIFY} wakes an idle worker (real reactor, real time).
    """

    async def setUp(self) -> None:
        await self.open_database()

    def listener(self, callback: Any) -> Listener:
        listener = Listener(self.dsn, reactor, CHANNEL, callback)
        listener.reconnect_initial_delay = 0.05
        self.addCleanup(listener.stop)
        return listener

    async def test_notify_wakes_idle_worker(self) -> None:
        """
        A worker polling once an hour runs a task within a second of its
        enqueue, because the listener wakes it.
        """
        q = TaskQueue(self.db, reactor, "node")
        ran: list[float] = []

        async def gc(task: Task) -> None:
            ran.append(time.monotonic())

        service = PeriodicWorker(TaskWorker(q, {"gc": gc}, reactor, region=None), 3600, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        listener = self.listener(lambda payload: service.wake())
        await listener.start()
        self.assertTrue(listener.connected)
        await _until(lambda: not service.busy)
        passes = service.passes
        enqueued = time.monotonic()
        task_id = await q.enqueue("gc", {})
        await _until(lambda: ran, timeout=1.0)
        self.assertLess(ran[0] - enqueued, 1.0)
        await _until(lambda: service.passes > passes)
        self.assertEqual((await q.get(task_id)).state, "done")

    async def test_listener_reconnects(self) -> None:
        """
        When the server drops the listening connection, the listener
        reconnects, calls back once (work may have been missed), and
        receives notifications again.
        """
        payloads: list[str] = []
        listener = self.listener(payloads.append)
        await listener.start()
        self.assertEqual(payloads, [""])
        await self.queue().enqueue("gc", {})
        await _until(lambda: payloads == ["", "gc"])
        await self.db.run_query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE query LIKE 'LISTEN%%' AND datname = current_database()"
        )
        await _until(lambda: payloads == ["", "gc", ""])
        self.assertTrue(listener.connected)
        await self.queue().enqueue("repair", {})
        await _until(lambda: payloads == ["", "gc", "", "repair"])
        self.flushLoggedErrors()

    async def test_listener_retries_until_reachable(self) -> None:
        """
        A listener whose database is unreachable does not fail its start; it
        keeps retrying in the background until stopped.
        """
        listener = Listener("host=127.0.0.1 port=1 dbname=x", reactor, CHANNEL, lambda p: None)
        listener.reconnect_initial_delay = 0.01
        self.addCleanup(listener.stop)
        await listener.start()
        self.assertFalse(listener.connected)
        self.assertIsNotNone(listener._retry)
        listener.stop()
        self.assertIsNone(listener._retry)


