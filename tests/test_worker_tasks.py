# -*- test-case-name: tests.test_worker_tasks -*-
"""
Tests for L{anvil.worker.tasks}: the task-handler registry, and the worker
registry building the node's services and C{run-once} passes from one
context (over the real S3 stack of L{tests.s3fixture}).
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anvil.cluster.membership import Member, Membership
from anvil.errors import InvalidArgument
from anvil.worker.loop import PeriodicWorker, TaskWorker
from anvil.worker.queue import Task
from anvil.worker.scrub import STATE_FILE, Scrubber
from anvil.worker.tasks import (
    DEFAULT_PRIORITIES,
    DEFAULT_PRIORITY,
    REGISTRY,
    TaskHandlers,
    WorkerContext,
    WorkerRegistry,
    WorkerSpec,
    _kind_worker,
    _summarize_tasks,
)
from tests.s3fixture import S3Stack
from tests.test_scrub import flip_byte


async def _noop(task: Task) -> None:
    """
    A handler that does nothing.
    """


class TaskHandlersTests(SynchronousTestCase):
    """
    L{TaskHandlers}: kinds, handlers and priorities.
    """

    def test_register(self) -> None:
        """
        Registered kinds are a mapping to their handlers, with the default
        priorities of the design's kinds (repairs first) unless given.
        """
        handlers = TaskHandlers()
        handlers.register("rebalance", _noop)
        handlers.register("repair", _noop)
        handlers.register("custom", _noop)
        handlers.register("urgent", _noop, priority=-1)
        self.assertEqual(sorted(handlers), ["custom", "rebalance", "repair", "urgent"])
        self.assertIs(handlers["repair"], _noop)
        self.assertEqual(
            handlers.priorities,
            {
                "rebalance": DEFAULT_PRIORITIES["rebalance"],
                "repair": 0,
                "custom": DEFAULT_PRIORITY,
                "urgent": -1,
            },
        )
        self.assertLess(DEFAULT_PRIORITIES["repair"], DEFAULT_PRIORITIES["rebalance"])

    def test_duplicate_and_empty_refused(self) -> None:
        """
        A kind can have one handler; an empty kind is refused.
        """
        handlers = TaskHandlers()
        handlers.register("repair", _noop)
        self.assertRaises(ValueError, handlers.register, "repair", _noop)
        self.assertRaises(ValueError, handlers.register, "", _noop)

    def test_only(self) -> None:
        """
        C{only} keeps the named kinds that have handlers, with their
        priorities.
        """
        handlers = TaskHandlers()
        handlers.register("repair", _noop)
        handlers.register("rebalance", _noop)
        subset = handlers.only(["repair", "evacuate"])
        self.assertEqual((list(subset), subset.priorities), (["repair"], {"repair": 0}))
        self.assertEqual(len(handlers.only([])), 0)


class RegistryTests(SynchronousTestCase):
    """
    The node's L{REGISTRY} and a fresh L{WorkerRegistry}.
    """

    def test_node_registry(self) -> None:
        """
        The node runs gc, scrub, the sweep, the orphan collector, the task
        queue and the gauges; the command offers gc, orphans, scrub, sweep,
        repair and rebalance; repair, evacuate and member_down tasks have
        handlers.
        """
        daemon = sorted(name for name, spec in REGISTRY.workers.items() if spec.daemon)
        self.assertEqual(daemon, ["gc", "orphans", "rebalance", "scrub", "stats", "sweep", "task-stats", "tasks"])
        self.assertEqual(REGISTRY.command_names(), ["gc", "orphans", "rebalance", "repair", "scrub", "sweep"])
        self.assertEqual(REGISTRY.task_kinds, ["collect", "evacuate", "member_down", "repair"])

    def test_planned_and_unknown_refused(self) -> None:
        """
        Running a planned worker or an unknown one raises L{InvalidArgument}
        with a sentence saying why.
        """
        ctx: Any = None
        registry = WorkerRegistry()
        registry.planned["defrag"] = "Defragmenting is not in this build yet."
        with self.assertRaises(InvalidArgument) as planned:
            registry.build("defrag", ctx)
        self.assertIn("not in this build", str(planned.exception))
        with self.assertRaises(InvalidArgument) as unknown:
            REGISTRY.build("defrag", ctx)
        self.assertIn("gc, orphans, rebalance, repair, scrub, sweep", str(unknown.exception))

    def test_registering_a_planned_worker(self) -> None:
        """
        Registering a worker of a planned name makes it available: one
        registration is all it takes.
        """
        registry = WorkerRegistry()
        registry.planned["sweep"] = "not yet"
        self.assertEqual(registry.command_names(), ["sweep"])
        spec = WorkerSpec("sweep", lambda ctx: ctx, lambda config: 300.0, lambda task, result: {})
        registry.add_worker(spec)
        self.assertEqual(registry.planned, {})
        self.assertEqual(registry.workers["sweep"], spec)
        self.assertRaises(ValueError, registry.add_worker, spec)

    def test_handler_factories(self) -> None:
        """
        Handler factories are built once per context, into its handlers.
        """
        registry = WorkerRegistry()
        built: list[object] = []

        def factory(ctx: Any) -> Any:
            built.append(ctx)
            return _noop

        registry.add_handler("evacuate", factory)
        self.assertRaises(ValueError, registry.add_handler, "evacuate", factory)
        ctx = WorkerContext(None, None, "n1", None, None, None, None)  # type: ignore[arg-type]
        handlers = registry.handlers(ctx)
        registry.handlers(ctx)
        self.assertEqual((built, list(handlers)), ([ctx], ["evacuate"]))
        self.assertEqual(registry.task_kinds, ["evacuate"])


class ContextTests(TestCase):
    """
    The node's workers built from one context over a real S3 stack.
    """

    async def setUp(self) -> None:
        self.stack = await S3Stack.start(self, stripe_size=16 * 1024)
        self.ctx = self.context()

    def context(self, paced: bool = True) -> WorkerContext:
        stack = self.stack
        return WorkerContext(
            config=stack.config,
            clock=reactor,
            node_id="node-a",
            metrics=stack.metrics,
            io=stack.io,
            global_db=stack.global_db,
            s3=stack.service,
            membership=Membership(Member("node-a", stack.region, "http://a", "a:7443")),
            paced=paced,
        )

    def test_services(self) -> None:
        """
        The node's services are periodic workers named after their tasks,
        at the configured intervals; the scrubber's budget is the scrub rate
        times its interval, and it keeps its state in the data directory.
        """
        services = REGISTRY.build_services(self.ctx)
        self.assertEqual(
            sorted(services), ["gc", "orphans", "rebalance", "scrub", "stats", "sweep", "task-stats", "tasks"]
        )
        for name, service in services.items():
            self.assertIsInstance(service, PeriodicWorker)
            self.assertEqual(service.name, f"worker-{name}")
        config = self.stack.config
        self.assertEqual(services["scrub"]._interval, config.worker.scrub_interval)
        self.assertEqual(services["gc"]._interval, config.worker.gc_interval)
        self.assertEqual(services["tasks"]._interval, config.worker.task_poll_interval)
        scrubber = services["scrub"]._task
        assert isinstance(scrubber, Scrubber)
        self.assertEqual(
            scrubber.budget_bytes, int(config.worker.scrub_rate * 1e6 * config.worker.scrub_interval)
        )
        self.assertTrue(scrubber.paced)
        self.assertEqual(scrubber._state_path, os.path.join(config.node.data_dir, STATE_FILE))
        self.assertIsInstance(services["tasks"]._task, TaskWorker)

    async def test_run_once_scrub_is_unpaced_with_the_same_budget(self) -> None:
        """
        C{run_once("scrub")} runs one pass of the node's scrubber, unpaced
        in a command context, and returns its report; the corrupt shard's
        repair is in the queue.
        """
        client = self.stack.client(await self.stack.create_app("acme", "web"))
        await self.stack.call(client.create_bucket, Bucket="bkt")
        await self.stack.call(client.put_object, Bucket="bkt", Key="k", Body=os.urandom(70_000))
        [shard] = [loc for loc in self.stack.shards.list_shards() if loc.shard_index == 5]
        flip_byte(shard.path, stripe=0)
        summary = await REGISTRY.run_once("scrub", self.context(paced=False))
        self.assertEqual(
            (summary["files_checked"], summary["corrupt_found"], summary["repairs_enqueued"]), (6, 1, 1)
        )
        [task] = await self.ctx.queue.list()
        self.assertEqual((task.kind, task.payload["shard_index"]), ("repair", 5))

    async def test_run_once_repair_runs_registered_handler_only(self) -> None:
        """
        C{run_once("repair")} runs the pending repair tasks through the
        registered handler and leaves other kinds alone; without a handler
        it runs nothing and says so.
        """
        queue = self.ctx.queue
        repair_id = await queue.enqueue("repair", {"content_hash": "ab", "shard_index": 1})
        rebalance_id = await queue.enqueue("rebalance", {})

        # Rebalancing is a periodic worker, not a task kind: a worker for
        # queued "rebalance" tasks has no handler to run them with.
        registry = WorkerRegistry()
        registry.add_worker(
            WorkerSpec("rebalance", _kind_worker("rebalance"), lambda config: 10.0, _summarize_tasks)
        )
        empty = await registry.run_once("rebalance", self.context())
        self.assertEqual((empty["tasks_run"], empty["kinds"]), (0, []))
        self.assertIn("no handler is registered for rebalance tasks", empty["note"])
        self.assertEqual((await queue.get(rebalance_id)).state, "pending")
        self.assertEqual((await queue.get(repair_id)).state, "pending")

        seen: list[Task] = []

        async def repair(task: Task) -> None:
            seen.append(task)

        ctx = self.context()
        ctx.handlers.register("repair", repair)
        ctx.handlers.register("rebalance", repair)
        summary = await REGISTRY.run_once("repair", ctx)
        self.assertEqual(
            summary, {"tasks_run": 1, "done": 1, "retry": 0, "failed": 0, "lost": 0, "kinds": ["repair"]}
        )
        self.assertEqual([t.id for t in seen], [repair_id])
        self.assertEqual((await queue.get(repair_id)).state, "done")
        self.assertEqual((await queue.get(rebalance_id)).state, "pending")
        value = self.stack.metrics.registry.get_sample_value(
            "anvil_task_runs_total", {"kind": "repair", "outcome": "done"}
        )
        self.assertEqual(value, 1.0)
