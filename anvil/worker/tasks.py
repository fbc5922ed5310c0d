# -*- test-case-name: tests.test_worker_tasks -*-
"""
What a node runs in the background, in one place: the registry of worker
kinds (periodic passes) and task kinds (handlers of queued tasks).

The node and C{anvil-admin worker run-once NAME} build their workers here,
from the same L{WorkerContext}, so a pass run by hand is exactly a pass of
the daemon's loop (issue 5: "the daemon's loop and this command share one
code path")::

    ctx = WorkerContext(config, reactor, node_id, metrics, io_pool, global_db, s3, membership)
    services = REGISTRY.build_services(ctx)        # the node: name -> PeriodicWorker
    summary = await REGISTRY.run_once("scrub", ctx)  # anvil-admin: one pass, a JSON summary

Workers (L{WorkerSpec}), each a name, a factory from the context, an
interval and a summary of a pass's result:

  - C{gc}: the garbage collector (L{anvil.worker.gc}), its passes recorded
    in the metrics;
  - C{scrub}: the scrubber (L{anvil.worker.scrub}), paced in the daemon,
    unpaced when run by hand;
  - C{tasks} (daemon): drains the task queue for every kind with a
    handler, most urgent first; C{repair} (command) runs the same
    L{TaskWorker} restricted to that kind;
  - C{rebalance}: moves shards towards the placement of the current
    members (L{anvil.worker.rebalance}), after membership changes in the
    daemon, at once when run by hand;
  - C{stats} and C{task-stats} (daemon): refresh the usage and task-queue
    gauges.

Task kinds (L{TaskHandlers}): a kind has a handler factory (context to
C{async handler(task)}) and a priority (lower runs first: repairs before
deletions before evacuations before rebalances).  A kind without a handler
is never claimed by this node: its tasks wait (visible in
C{anvil_tasks{state="pending"}}) rather than fail.

Adding a kind is one registration in the "Registrations" section below,
for example::

    REGISTRY.add_handler("repair", lambda ctx: Repairer.for_node(ctx).handle)

and adding a periodic worker (such as the sweep) one L{WorkerSpec}.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from twisted.logger import Logger

from anvil.errors import InvalidArgument
from anvil.metrics import Metrics
from anvil.worker.loop import Handler, IWorkerTask, PeriodicWorker, TaskWorker
from anvil.worker.queue import TaskQueue

__all__ = [
    "DEFAULT_PRIORITIES",
    "REGISTRY",
    "TaskHandlers",
    "WorkerContext",
    "WorkerRegistry",
    "WorkerSpec",
    "node_task_queue",
]

#: Priorities of the task kinds (lower runs first): redundancy lost is
#: repaired before anything else, collections free space, evacuations and
#: rebalances only move healthy shards.
DEFAULT_PRIORITIES: dict[str, int] = {
    "repair": 0,
    "collect": 10,
    "evacuate": 20,
    "rebalance": 30,
}

#: The priority of a kind that is not in L{DEFAULT_PRIORITIES}.
DEFAULT_PRIORITY = 15


class TaskHandlers(Mapping[str, Handler]):
    """
    Task kind to handler, with a priority per kind: what a L{TaskWorker}
    serves.  A mapping, kept by reference by the worker, so kinds
    registered after it was built are served too.

    @ivar priorities: kind to priority (lower first).
    """

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self.priorities: dict[str, int] = {}

    def register(self, kind: str, handler: Handler, priority: int | None = None) -> None:
        """
        Serve tasks of C{kind} with C{handler}.

        @param kind: the task kind.
        @param handler: an async callable taking the claimed
            L{anvil.worker.queue.Task}; it must be idempotent (a task may run
            twice, see L{TaskWorker}).
        @param priority: lower runs first; by default from
            L{DEFAULT_PRIORITIES}.
        @raise ValueError: the kind already has a handler.
        """
        if not kind:
            raise ValueError("a task kind must not be empty")
        if kind in self._handlers:
            raise ValueError(f"task kind {kind!r} already has a handler")
        self._handlers[kind] = handler
        self.priorities[kind] = (
            priority if priority is not None else DEFAULT_PRIORITIES.get(kind, DEFAULT_PRIORITY)
        )

    def only(self, kinds: Iterable[str]) -> TaskHandlers:
        """
        A new registry with the handlers of C{kinds} only (those that have
        one), for a worker restricted to them.
        """
        subset = TaskHandlers()
        for kind in kinds:
            if kind in self._handlers:
                subset.register(kind, self._handlers[kind], self.priorities[kind])
        return subset

    def __getitem__(self, kind: str) -> Handler:
        return self._handlers[kind]

    def __iter__(self) -> Iterator[str]:
        return iter(self._handlers)

    def __len__(self) -> int:
        return len(self._handlers)


@dataclass
class WorkerContext:
    """
    Everything a worker of this node is built from.

    @ivar config: the node's L{anvil.config.NodeConfig}.
    @ivar clock: the reactor (time, and threads for the pools).
    @ivar node_id: this node's id.
    @ivar metrics: the node's metrics.
    @ivar io: the node's I/O pool (L{anvil.storage.cpu.CpuPool}).
    @ivar global_db: the global database (the task queue).
    @ivar s3: the node's L{anvil.s3.service.S3Service} (its stores and
        storage engine).
    @ivar membership: the node's L{anvil.cluster.membership.Membership}, if
        any (the C{stats} worker needs it).
    @ivar cluster: the cluster service, for workers that talk to peers
        (repair, sweep, rebalance); L{None} where there is none.
    @ivar paced: whether rate-limited workers pace their passes (the daemon)
        or run them at full speed within the same budget (C{run-once}).
    @ivar handlers: the task handlers, filled by
        L{WorkerRegistry.handlers}.
    """

    config: Any
    clock: Any
    node_id: str
    metrics: Metrics
    io: Any
    global_db: Any
    s3: Any
    membership: Any = None
    cluster: Any = None
    paced: bool = True
    handlers: TaskHandlers = field(default_factory=TaskHandlers)
    task_queue: TaskQueue | None = field(default=None, repr=False)

    @property
    def shards(self) -> Any:
        """
        This node's L{anvil.storage.shardstore.LocalShardStore}.
        """
        return self.s3.engine.shards

    @property
    def queue(self) -> TaskQueue:
        """
        The task queue: C{task_queue} when given (the node shares its own),
        otherwise one made by L{node_task_queue} on first use.
        """
        if self.task_queue is None:
            self.task_queue = node_task_queue(self.config, self.global_db, self.clock, self.node_id)
        return self.task_queue


def node_task_queue(config: Any, global_db: Any, clock: Any, node_id: str) -> TaskQueue:
    """
    The task queue of this process: lease owner C{node/pid} (so an
    C{anvil-admin} run never looks like the node's own lease), and
    C{worker.task_max_attempts} for tasks enqueued without their own.
    """
    return TaskQueue(
        global_db,
        clock,
        f"{node_id}/{os.getpid()}",
        default_max_attempts=config.worker.task_max_attempts,
    )


@dataclass(frozen=True)
class WorkerSpec:
    """
    One kind of periodic worker.

    @ivar name: its name (service C{worker-NAME}, C{run-once NAME}).
    @ivar build: the worker task from the context.
    @ivar interval: seconds between passes, from the configuration.
    @ivar summarize: a JSON-ready summary of one pass from the worker task
        and what its C{run_once} returned.
    @ivar daemon: the node runs it.
    @ivar command: C{anvil-admin worker run-once} offers it.
    @ivar run_at_start: the daemon's first pass runs at start rather than
        one interval later.
    @ivar help: one line for C{--help}.
    """

    name: str
    build: Callable[[WorkerContext], IWorkerTask]
    interval: Callable[[Any], float]
    summarize: Callable[[Any, Any], dict[str, Any]]
    daemon: bool = True
    command: bool = True
    run_at_start: bool = False
    help: str = ""


HandlerFactory = Callable[[WorkerContext], Handler]


class WorkerRegistry:
    """
    The worker and task kinds a node runs (see the module docstring).

    @ivar planned: names of workers the design has but this build does not
        yet, to their explanation (C{run-once} refuses them with it).
    """

    _log = Logger()

    def __init__(self) -> None:
        self._workers: dict[str, WorkerSpec] = {}
        self._handlers: dict[str, tuple[HandlerFactory, int | None]] = {}
        self.planned: dict[str, str] = {}

    # -- registration ---------------------------------------------------------

    def add_worker(self, spec: WorkerSpec) -> None:
        """
        Register a periodic worker.

        @raise ValueError: the name is taken.
        """
        if spec.name in self._workers:
            raise ValueError(f"worker {spec.name!r} is already registered")
        self._workers[spec.name] = spec
        self.planned.pop(spec.name, None)

    def add_handler(self, kind: str, factory: HandlerFactory, priority: int | None = None) -> None:
        """
        Register the handler of a task kind.

        @param factory: builds the handler from the context (once per
            node, or per C{run-once}).
        @param priority: see L{TaskHandlers.register}.
        @raise ValueError: the kind is taken.
        """
        if kind in self._handlers:
            raise ValueError(f"task kind {kind!r} is already registered")
        self._handlers[kind] = (factory, priority)

    # -- queries ----------------------------------------------------------------

    @property
    def workers(self) -> Mapping[str, WorkerSpec]:
        """
        The registered workers by name.
        """
        return dict(self._workers)

    def command_names(self) -> list[str]:
        """
        The names C{worker run-once} accepts: registered command workers
        and planned ones (which it refuses with their explanation).
        """
        names = {name for name, spec in self._workers.items() if spec.command}
        return sorted(names | set(self.planned))

    @property
    def task_kinds(self) -> list[str]:
        """
        The task kinds with a registered handler.
        """
        return sorted(self._handlers)

    # -- building ---------------------------------------------------------------

    def handlers(self, ctx: WorkerContext) -> TaskHandlers:
        """
        Build every registered handler into C{ctx.handlers} (once) and
        return it.
        """
        for kind, (factory, priority) in sorted(self._handlers.items()):
            if kind not in ctx.handlers:
                ctx.handlers.register(kind, factory(ctx), priority)
        return ctx.handlers

    def build(self, name: str, ctx: WorkerContext) -> IWorkerTask:
        """
        Build one worker task, its handlers first.

        @raise InvalidArgument: no such worker, or a planned one.
        """
        spec = self._spec(name)
        self.handlers(ctx)
        return spec.build(ctx)

    def build_services(self, ctx: WorkerContext) -> dict[str, PeriodicWorker]:
        """
        The node's background services: one L{PeriodicWorker} per daemon
        worker (not started; the node makes them its children).

        @return: the services by worker name (C{"tasks"} is the one to
            L{PeriodicWorker.wake} on a task notification).
        """
        self.handlers(ctx)
        services: dict[str, PeriodicWorker] = {}
        for name, spec in sorted(self._workers.items()):
            if not spec.daemon:
                continue
            task = spec.build(ctx)
            services[name] = PeriodicWorker(
                task, spec.interval(ctx.config), ctx.clock, now=spec.run_at_start
            )
        return services

    async def run_once(self, name: str, ctx: WorkerContext) -> dict[str, Any]:
        """
        Build worker C{name} as the node does and run one pass.

        @return: the pass's summary.
        @raise InvalidArgument: no such worker, or a planned one.
        """
        spec = self._spec(name)
        self.handlers(ctx)
        task = spec.build(ctx)
        result = await task.run_once()
        return spec.summarize(task, result)

    def _spec(self, name: str) -> WorkerSpec:
        if name in self.planned:
            raise InvalidArgument(self.planned[name])
        spec = self._workers.get(name)
        if spec is None:
            raise InvalidArgument(
                f"Unknown worker {name!r}; use one of {', '.join(self.command_names())}."
            )
        return spec


# -- the built-in workers -----------------------------------------------------------


def _build_gc(ctx: WorkerContext) -> IWorkerTask:
    from anvil.worker.gc import GarbageCollector
    from anvil.worker.stats import RecordedGc

    return RecordedGc(GarbageCollector.for_node(ctx.config, ctx.s3, ctx.clock), ctx.metrics)


def _collect(ctx: WorkerContext) -> Any:
    """
    The handler of C{collect} tasks, which S3 deletes queue for the end of
    their grace period: one garbage-collection pass, the same as the
    periodic C{gc} worker's.
    """
    collector = _build_gc(ctx)

    async def handle(task: Any) -> None:
        await collector.run_once()

    return handle


def _build_scrub(ctx: WorkerContext) -> IWorkerTask:
    from anvil.worker.scrub import Scrubber

    return Scrubber.for_node(
        ctx.config, ctx.shards, ctx.io, ctx.queue, ctx.metrics, ctx.clock, ctx.node_id, paced=ctx.paced
    )


def _task_worker(ctx: WorkerContext, handlers: TaskHandlers) -> TaskWorker:
    return TaskWorker(
        ctx.queue,
        handlers,
        ctx.clock,
        region=ctx.config.node.region,
        priorities=handlers.priorities,
        metrics=ctx.metrics,
    )


def _kind_worker(kind: str) -> Callable[[WorkerContext], IWorkerTask]:
    """
    The factory of a worker running the queued tasks of one kind only.
    """

    def build(ctx: WorkerContext) -> IWorkerTask:
        worker = _task_worker(ctx, ctx.handlers.only([kind]))
        worker.name = kind
        return worker

    return build


def _summarize_tasks(task: Any, ran: int) -> dict[str, Any]:
    """
    The summary of a task-queue pass: how many ran, by outcome, and which
    kinds had a handler (none: the pass could do nothing, and says so).
    """
    outcomes: dict[str, int] = {"done": 0, "retry": 0, "failed": 0, "lost": 0}
    for (_, outcome), count in task.outcomes.items():
        outcomes[outcome] = outcomes.get(outcome, 0) + count
    kinds = [kind for group in task.kind_groups() for kind in group]
    summary: dict[str, Any] = {"tasks_run": ran, **outcomes, "kinds": kinds}
    if not kinds:
        summary["note"] = f"no handler is registered for {task.name} tasks in this build: nothing was done"
    return summary


def _build_rebalance(ctx: WorkerContext) -> IWorkerTask:
    from anvil.worker.rebalance import Rebalancer

    # The daemon's context is the paced one: its passes follow the daemon's
    # rules (one rebalancer per region, after membership changes), while
    # run-once does a pass at once.
    return Rebalancer.for_node(ctx, daemon=ctx.paced)


def _rebalance_interval() -> float:
    from anvil.worker.rebalance import CHECK_INTERVAL

    return CHECK_INTERVAL


def _build_stats(ctx: WorkerContext) -> IWorkerTask:
    from anvil.worker.stats import UsageStats

    s3 = ctx.s3
    return UsageStats(ctx.metrics, s3.objects, s3.buckets, s3.engine.shards, ctx.membership, ctx.io)


def _build_task_stats(ctx: WorkerContext) -> IWorkerTask:
    from anvil.worker.stats import TaskQueueStats

    return TaskQueueStats(ctx.metrics, ctx.queue, kinds=tuple(sorted(set(ctx.handlers) | set(DEFAULT_PRIORITIES))))


def _as_dict(task: Any, result: Any) -> dict[str, Any]:
    return asdict(result)


def _report_json(task: Any, result: Any) -> dict[str, Any]:
    summary: dict[str, Any] = result.to_json()
    return summary


def _nothing(task: Any, result: Any) -> dict[str, Any]:
    return {}


#: The node's registry.
REGISTRY = WorkerRegistry()

# -- Registrations --------------------------------------------------------------------
# Periodic workers.
REGISTRY.add_worker(
    WorkerSpec(
        "gc",
        _build_gc,
        lambda config: config.worker.gc_interval,
        _as_dict,
        help="remove deleted objects, unreferenced contents and stale uploads",
    )
)
REGISTRY.add_worker(
    WorkerSpec(
        "scrub",
        _build_scrub,
        lambda config: config.worker.scrub_interval,
        _report_json,
        help="verify the checksums of this node's shard files (one budget's worth)",
    )
)
REGISTRY.add_worker(
    WorkerSpec(
        "tasks",
        lambda ctx: _task_worker(ctx, ctx.handlers),
        lambda config: config.worker.task_poll_interval,
        _summarize_tasks,
        command=False,
        run_at_start=True,
    )
)
REGISTRY.add_worker(
    WorkerSpec(
        "repair",
        _kind_worker("repair"),
        lambda config: config.worker.task_poll_interval,
        _summarize_tasks,
        daemon=False,
        help="run the pending repair tasks of this region",
    )
)
REGISTRY.add_worker(
    WorkerSpec(
        "rebalance",
        _build_rebalance,
        lambda config: _rebalance_interval(),
        _report_json,
        help="move shards towards the placement of the region's current members (throttled)",
    )
)
# Usage and queue gauges are refreshed here, never computed per scrape.
REGISTRY.add_worker(
    WorkerSpec("stats", _build_stats, lambda config: 30.0, _nothing, command=False, run_at_start=True)
)
REGISTRY.add_worker(
    WorkerSpec(
        "task-stats", _build_task_stats, lambda config: 30.0, _nothing, command=False, run_at_start=True
    )
)
# Repair, evacuation, the sweep and the orphan collector (anvil.worker.repair,
# anvil.worker.sweep).  The three task kinds share one Repairer per context.


def _repairer(ctx: WorkerContext) -> Any:
    from anvil.worker.repair import Repairer

    repairer = getattr(ctx, "_repairer", None)
    if repairer is None:
        repairer = Repairer.for_node(ctx)
        setattr(ctx, "_repairer", repairer)
    return repairer


def _build_sweep(ctx: WorkerContext) -> IWorkerTask:
    from anvil.worker.sweep import Sweeper

    return Sweeper.for_node(ctx)


def _build_orphans(ctx: WorkerContext) -> IWorkerTask:
    from anvil.worker.sweep import OrphanCollector

    return OrphanCollector.for_node(ctx)


REGISTRY.add_worker(
    WorkerSpec(
        "sweep",
        _build_sweep,
        lambda config: config.worker.sweep_interval,
        _report_json,
        help="compare the region's shard maps with membership and the files nodes hold; enqueue repairs",
    )
)
REGISTRY.add_worker(
    WorkerSpec(
        "orphans",
        _build_orphans,
        lambda config: config.worker.sweep_interval,
        _report_json,
        help="remove this node's shard files no content records (older than gc_grace)",
    )
)
REGISTRY.add_handler("repair", lambda ctx: _repairer(ctx).handle)
REGISTRY.add_handler("evacuate", lambda ctx: _repairer(ctx).handle_evacuate)
REGISTRY.add_handler("member_down", lambda ctx: _repairer(ctx).handle_member_down)
REGISTRY.add_handler("collect", _collect)
# Deleted contents lose their shard files on every node through the
# collector (StorageEngine.delete_content asks the peers its shard map
# names), so there is no separate "delete_shards" kind.  Rebalancing is the
# periodic "rebalance" worker above (anvil.worker.rebalance), not a task
# kind.
