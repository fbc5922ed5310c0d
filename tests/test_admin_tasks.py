# -*- test-case-name: tests.test_admin_tasks -*-
"""
Tests for C{anvil-admin task list|show|retry|cancel}, run as real
subprocesses against a real PostgreSQL (see L{tests.test_admin}).
"""

from __future__ import annotations

import os
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from anvil.meta.database import Database
from anvil.meta.migrate import apply_migrations
from anvil.worker.queue import TaskQueue
from tests.pg import fresh_database
from tests.test_admin import KEY, AdminTestMixin, Result, run_admin


class TaskCommandTests(AdminTestMixin, TestCase):
    """
    The task commands against configured database URLs, with tasks put in
    place through L{TaskQueue}.
    """

    async def setUp(self) -> None:
        global_dsn = fresh_database(self, "g")
        self.env = {
            "GLOBAL_DATABASE_URL": global_dsn,
            "REGIONAL_DATABASE_URL": fresh_database(self, "r"),
            "ANVIL_SECRET_ENCRYPTION_KEY": KEY,
            "ANVIL_DATA_DIR": os.path.abspath(self.mktemp()),
        }
        db = await Database.connect(global_dsn, reactor, pool_size=1)
        self.addCleanup(db.close)
        await apply_migrations(db, "global")
        clock = Clock()
        clock.advance(time.time())
        self.queue = TaskQueue(db, clock, "test-worker")
        # A done, a parked (failed), a running and a pending task.
        self.done = await self.queue.enqueue("gc", {"key": "a"})
        await self.queue.complete(await self._claim())
        self.failed = await self.queue.enqueue("repair", {"content": "c"}, max_attempts=1)
        await self.queue.fail(await self._claim(), "no healthy shards")
        self.running = await self.queue.enqueue("gc", {"key": "b"}, region="eu")
        self.running_task = await self._claim()
        self.pending = await self.queue.enqueue("gc", {"key": "c"})

    async def _claim(self) -> Any:
        task = await self.queue.claim(None, "eu")
        assert task is not None
        return task

    def admin(self, *argv: str) -> Deferred[Result]:
        return run_admin(list(argv), self.env)

    async def test_list(self) -> None:
        """
        C{task list} shows every task oldest first; --state and --kind
        filter; --json gives the records.
        """
        result = await self.admin("task", "list")
        self.assertSucceeded(result)
        lines = result.out.splitlines()
        self.assertEqual(lines[0].split()[:4], ["ID", "KIND", "STATE", "ATTEMPTS"])
        self.assertEqual(
            [line.split()[:4] for line in lines[1:]],
            [
                [str(self.done), "gc", "done", "1/10"],
                [str(self.failed), "repair", "failed", "1/1"],
                [str(self.running), "gc", "running", "1/10"],
                [str(self.pending), "gc", "pending", "0/10"],
            ],
        )
        self.assertIn("no healthy shards", result.out)
        failed = await self.admin("task", "list", "--state", "failed", "--json")
        self.assertSucceeded(failed)
        [record] = failed.json()
        self.assertEqual(
            {k: record[k] for k in ("id", "kind", "state", "attempts", "last_error", "payload")},
            {
                "id": self.failed,
                "kind": "repair",
                "state": "failed",
                "attempts": 1,
                "last_error": "no healthy shards",
                "payload": {"content": "c"},
            },
        )
        gc = await self.admin("--json", "task", "list", "--kind", "gc", "--state", "pending")
        self.assertEqual([t["id"] for t in gc.json()], [self.pending])

    async def test_show(self) -> None:
        """
        C{task show ID} prints the task's fields; --json its record.
        """
        result = await self.admin("task", "show", str(self.running))
        self.assertSucceeded(result)
        self.assertIn("state:            running", result.out)
        self.assertIn("lease_owner:      test-worker", result.out)
        self.assertIn('payload:          {"key": "b"}', result.out)
        self.assertIn("region:           eu", result.out)
        record = (await self.admin("task", "show", str(self.running), "--json")).json()
        self.assertEqual((record["id"], record["state"], record["region"]), (self.running, "running", "eu"))
        self.assertIsNotNone(record["lease_expires_at"])

    async def test_retry(self) -> None:
        """
        C{task retry} makes a parked task pending with its attempts reset;
        retrying a running or done task is a one-line error.
        """
        result = await self.admin("task", "retry", str(self.failed))
        self.assertSucceeded(result)
        self.assertIn(f"Task {self.failed} (repair) is pending again", result.out)
        task = await self.queue.get(self.failed)
        self.assertEqual((task.state, task.attempts), ("pending", 0))
        as_json = await self.admin("task", "retry", str(self.failed), "--json")
        self.assertEqual(as_json.json()["state"], "pending")
        for task_id, state in ((self.running, "running"), (self.done, "done")):
            self.assertOneLineError(await self.admin("task", "retry", str(task_id)), f"Task {task_id} is {state}")

    async def test_cancel(self) -> None:
        """
        C{task cancel} cancels a pending or running task (the running
        worker loses its lease); a done task cannot be cancelled.
        """
        result = await self.admin("task", "cancel", str(self.pending), "--json")
        self.assertSucceeded(result)
        self.assertEqual(result.json()["state"], "cancelled")
        self.assertSucceeded(await self.admin("task", "cancel", str(self.running)))
        self.assertEqual((await self.queue.get(self.running)).state, "cancelled")
        self.assertIsNone(await self.queue.claim(None, "eu"))
        self.assertOneLineError(await self.admin("task", "cancel", str(self.done)), "cannot be cancelled")

    async def test_unknown_and_invalid(self) -> None:
        """
        An unknown id, a malformed id and an unknown state are one-line
        errors with exit status 2.
        """
        runs = [self.admin("task", "list", "--state", "asleep")]
        for command in ("show", "retry", "cancel"):
            runs += [self.admin("task", command, "999999"), self.admin("task", command, "abc")]
        # Concurrently: each run pays for a Python start-up.
        state, *results = await gatherResults(runs)
        self.assertOneLineError(state, "invalid choice")
        for unknown, malformed in zip(results[::2], results[1::2]):
            self.assertOneLineError(unknown, "Task '999999' does not exist")
            self.assertOneLineError(malformed, "invalid task id 'abc'")
