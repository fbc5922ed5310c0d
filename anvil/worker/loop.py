# -*- test-case-name: tests.test_worker_loop -*-
"""
Background worker loops (STYLE.md, "Workers").

A worker task is anything with a C{name} and an async C{run_once()}: one
pass of work.  L{PeriodicWorker} runs passes on a L{LoopingCall}; unlike
Twisted's C{TimerService}, whose loop stops for good after its first
exception, it logs and counts a failed pass and carries on.  Passes never
overlap, and L{PeriodicWorker.wake} runs one at once (for example when
C{LISTEN/NOTIFY} announces a new task).

L{TaskWorker} is the task whose pass drains the task queue
(L{anvil.worker.queue}) for the kinds it has handlers for (usually a
L{anvil.worker.tasks.TaskHandlers} registry), most urgent kinds first, and
counts every outcome in C{anvil_task_runs_total}.
C{anvil-admin worker run-once} calls the same C{run_once} as the daemon.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from anvil.metrics import Metrics
from anvil.worker.queue import LeaseLost, Task, TaskQueue


class IWorkerTask(Protocol):
    """
    One unit of background work, run a pass at a time.

    @ivar name: a short name for logs and metrics (C{"gc"}, C{"scrub"}).
    """

    name: str

    def run_once(self) -> Awaitable[object]:
        """
        Do one pass of work; raising fails this pass only.

        A task may also have an C{interrupt()} method: the worker calls it
        when it stops during a pass, asking the pass to end early.
        """


class PeriodicWorker(Service):
    """
    Run C{task.run_once()} every C{interval} seconds, and at once on
    L{wake}.

    @ivar passes: passes finished (successfully or not).
    @ivar failures: passes that raised.
    """

    _log = Logger()

    def __init__(self, task: IWorkerTask, interval: float, clock: Any, now: bool = False) -> None:
        """
        @param task: the work; C{task.name} names the service.
        @param interval: seconds between the starts of passes (a pass that
            takes longer delays the next one; they never overlap).
        @param clock: an C{IReactorTime}.
        @param now: run the first pass when the service starts rather
            than one interval later.
        """
        self.setName(f"worker-{task.name}")
        self._task = task
        self._interval = interval
        self._clock = clock
        self._now = now
        self._loop: LoopingCall | None = None
        self._loop_done: Deferred[Any] | None = None
        # The pass in progress (with any reruns wake() asked for), or None.
        self._current: Deferred[None] | None = None
        self._again = False
        self.passes = 0
        self.failures = 0

    @property
    def busy(self) -> bool:
        """
        Whether a pass is running.
        """
        return self._current is not None

    def startService(self) -> None:
        super().startService()
        self._loop = LoopingCall(self._tick)
        self._loop.clock = self._clock
        self._loop_done = self._loop.start(self._interval, now=self._now)

    def stopService(self) -> Deferred[None]:
        """
        Stop the loop; the returned L{Deferred} fires once a pass in
        progress has finished (no new one starts).
        """
        super().stopService()
        # A task that can cut its pass short (a paced scrub sleeping towards
        # its rate) does, so that shutdown does not wait out the pass.
        interrupt = getattr(self._task, "interrupt", None)
        if self._current is not None and interrupt is not None:
            interrupt()
        waits: list[Deferred[Any]] = []
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._loop_done is not None:
            waits.append(self._loop_done)
            self._loop_done = None
        if self._current is not None:
            waits.append(_follow(self._current))
        d = DeferredList(waits)
        return d.addCallback(lambda _: None)

    def wake(self) -> None:
        """
        Run a pass now.  If one is running, run another right after it
        (however many times C{wake} is called meanwhile): whatever caused
        the wake-up may have arrived too late for the running pass to see.
        """
        if not self.running:
            return
        if self._current is not None:
            self._again = True
            return
        self._start_passes()

    def _tick(self) -> Deferred[None]:
        """
        The L{LoopingCall}'s call: start a pass, or wait for the one
        L{wake} started.  Returning its L{Deferred} makes the loop wait, so
        passes never overlap.
        """
        if self._current is not None:
            return _follow(self._current)
        return _follow(self._start_passes())

    def _start_passes(self) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._passes())

        def done(_: object) -> None:
            self._current = None

        d.addBoth(done)
        # A pass that finished synchronously leaves nothing to wait for.
        if not d.called:
            self._current = d
        return d

    async def _passes(self) -> None:
        """
        Run passes until no wake-up arrived during the last one.
        """
        while True:
            self._again = False
            await self._run_safely()
            if not (self._again and self.running):
                return

    async def _run_safely(self) -> None:
        """
        One pass; an exception is logged and counted, never propagated,
        so that the loop survives it.
        """
        try:
            await self._task.run_once()
        except Exception:
            self.failures += 1
            self._log.failure("{task} pass failed", task=self._task.name)
        finally:
            self.passes += 1


def _follow(d: Deferred[Any]) -> Deferred[None]:
    """
    A new L{Deferred} that fires (with C{None}) when C{d} does, without
    changing C{d}'s result for its other waiters.
    """
    follower: Deferred[None] = Deferred()

    def fire(result: object) -> object:
        follower.callback(None)
        return result

    d.addBoth(fire)
    return follower


#: A task handler: does the work of one claimed task (its kind, payload,
#: attempt); raising fails the attempt.
Handler = Callable[[Task], Awaitable[object]]


class TaskWorker:
    """
    Drain the task queue: claim tasks of the kinds it has handlers for,
    run each, and complete or fail it.  While a handler runs, its lease is
    renewed every C{renew_interval} seconds.

    Kinds with a lower priority number are claimed first: after every task
    the worker looks again from the most urgent kinds, so repairs queued
    behind a long rebalance backlog run before it (ARCHITECTURE §7).
    Handlers are looked up at each claim, so kinds registered after the
    worker was built are served from its next claim on.

    Handlers must be idempotent: a task whose worker died (or stalled past
    its lease) runs again elsewhere.

    @ivar outcomes: finished runs by C{(kind, outcome)}, outcome being
        C{"done"}, C{"retry"} (failed, will back off), C{"failed"}
        (parked) or C{"lost"} (the lease was lost meanwhile).
    """

    name = "tasks"
    _log = Logger()

    def __init__(
        self,
        queue: TaskQueue,
        handlers: Mapping[str, Handler],
        clock: Any,
        region: str | None,
        renew_interval: float | None = None,
        max_tasks_per_pass: int = 100,
        priorities: Mapping[str, int] | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """
        @param queue: the queue to claim from (its owner names this worker).
        @param handlers: task kind to async callable taking the claimed
            L{Task}; kept by reference (not copied), so a registry that
            grows later is seen.
        @param clock: an C{IReactorTime}, for lease renewals.
        @param region: this node's region.
        @param renew_interval: seconds between lease renewals (default: a
            third of the lease, so two renewals may fail before it expires).
        @param max_tasks_per_pass: a pass ends after this many tasks, so that
            a long queue does not keep one pass (and stopService) going.
        @param priorities: kind to priority, lower first; kinds missing
            here have priority 0.  Also kept by reference.
        @param metrics: where C{anvil_task_runs_total} is counted, if given.
        """
        self._queue = queue
        self._handlers = handlers
        self._priorities: Mapping[str, int] = priorities if priorities is not None else {}
        self._metrics = metrics
        self._clock = clock
        self._region = region
        self._renew_interval = renew_interval or queue.lease_seconds / 3
        self._max_tasks = max_tasks_per_pass
        self.outcomes: dict[tuple[str, str], int] = {}

    async def run_once(self) -> int:
        """
        Claim and run tasks until none is runnable (or the per-pass limit).

        @return: how many tasks were run.
        """
        ran = 0
        while ran < self._max_tasks:
            task = await self._claim_most_urgent()
            if task is None:
                break
            await self._run(task)
            ran += 1
        return ran

    def kind_groups(self) -> list[list[str]]:
        """
        The kinds this worker has handlers for, grouped by priority, most
        urgent group first.
        """
        groups: dict[int, list[str]] = {}
        for kind in sorted(self._handlers):
            groups.setdefault(self._priorities.get(kind, 0), []).append(kind)
        return [groups[p] for p in sorted(groups)]

    async def _claim_most_urgent(self) -> Task | None:
        """
        Claim a task of the most urgent group that has a runnable one.
        """
        for kinds in self.kind_groups():
            task = await self._queue.claim(kinds, self._region)
            if task is not None:
                return task
        return None

    def _count(self, task: Task, outcome: str) -> None:
        key = (task.kind, outcome)
        self.outcomes[key] = self.outcomes.get(key, 0) + 1
        if self._metrics is not None:
            self._metrics.task_runs.labels(task.kind, outcome).inc()

    async def _run(self, task: Task) -> None:
        """
        Run one claimed task with its lease kept alive, then settle it.
        """
        current = [task]

        async def renew() -> None:
            try:
                current[0] = await self._queue.renew(current[0])
            except LeaseLost:
                if renewer.running:
                    renewer.stop()
                self._log.warn(
                    "Lost the lease of task {task_id} ({kind}) while running it",
                    task_id=task.id,
                    kind=task.kind,
                )
            except Exception:
                # A database hiccup: keep the loop going, the next renewal
                # may succeed before the lease runs out.
                self._log.failure("Renewing the lease of task {task_id} failed", task_id=task.id)

        renewer = LoopingCall(lambda: Deferred.fromCoroutine(renew()))
        renewer.clock = self._clock
        renewer_done = renewer.start(self._renew_interval, now=False)
        error: str | None = None
        try:
            handler = self._handlers.get(task.kind)
            if handler is None:
                # Only if the registry lost the kind between claim and run.
                raise LookupError(f"no handler for task kind {task.kind!r}")
            await handler(task)
        except Exception as e:
            error = f"{type(e).__name__}: {' '.join(str(e).split())}"
            self._log.failure(
                "Task {task_id} ({kind}) attempt {attempts} failed",
                task_id=task.id,
                kind=task.kind,
                attempts=task.attempts,
            )
        finally:
            if renewer.running:
                renewer.stop()
            # Let a renewal in flight finish, so that it cannot land after
            # (and undo) the settlement below.
            await renewer_done
        try:
            if error is None:
                await self._queue.complete(current[0])
                self._count(task, "done")
            else:
                settled = await self._queue.fail(current[0], error)
                self._count(task, "failed" if settled.state == "failed" else "retry")
        except LeaseLost:
            self._count(task, "lost")
            self._log.warn(
                "Task {task_id} ({kind}) finished after its lease was lost; result discarded",
                task_id=task.id,
                kind=task.kind,
            )
