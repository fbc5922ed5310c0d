# -*- test-case-name: tests.test_queue -*-
"""
The task queue: the C{tasks} table of the global database (ARCHITECTURE §7).

A task is a row with a kind, a JSON payload, an optional region, a state and
a lease.  Its life::

    pending --claim--> running --complete--> done
       ^                  |
       +------fail--------+ (attempts left: back off, run_after in the future)
                          +--fail--> failed (attempts used up; retry puts it back)
    pending/running/failed --cancel--> cancelled

Workers claim with C{SELECT ... FOR UPDATE SKIP LOCKED}, so two workers (on
one node or on many) never claim the same row: the second one skips the row
the first has locked and takes the next.  A claim sets a lease (owner and
expiry) that the worker renews while it runs the task; a worker that dies
stops renewing, and once the lease has expired any worker takes the task
over.  Every claim counts as an attempt, takeovers included, so a task that
kills its worker every time is still parked as failed eventually.

The pair (task id, attempts) identifies one lease: a takeover increments
C{attempts}, so a worker whose lease was taken over (or cancelled) finds its
renew, complete or fail refused with L{LeaseLost} instead of overwriting the
new owner's state.

Time comes from the injected clock, not from the database server's
C{now()}, so that tests can expire leases and back-offs with a
L{twisted.internet.task.Clock}.  Nodes therefore need reasonably synchronised
clocks (NTP); a lease is tens of seconds, far above usual skew.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg2.extras import Json
from twisted.logger import Logger

from anvil.errors import AnvilError, InvalidArgument, NotFound
from anvil.meta.database import Database

#: The notification channel a new (or retried) task is announced on; its
#: payload is the task's kind.
CHANNEL = "anvil_tasks"

#: Every state a task can be in (the table's CHECK constraint).
STATES = ("pending", "running", "done", "failed", "cancelled")

_COLUMNS = (
    "id, kind, payload, region, state, attempts, max_attempts, run_after, "
    "lease_owner, lease_expires_at, last_error, created_at, updated_at"
)

#: Longest last_error kept: a traceback's worth, not a megabyte of output.
_MAX_ERROR = 2000


class LeaseLost(AnvilError):
    """
    The worker no longer holds the task's lease: it expired and another
    worker took the task over, or an operator cancelled it.
    """


@dataclass(frozen=True)
class Task:
    """
    One row of the C{tasks} table.

    @ivar attempts: how many times the task has been claimed, including the
        current claim while it is running.
    """

    id: int
    kind: str
    payload: dict[str, Any]
    region: str | None
    state: str
    attempts: int
    max_attempts: int
    run_after: datetime
    lease_owner: str | None
    lease_expires_at: datetime | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Task:
        """
        Build a task from a row selected as C{_COLUMNS}.
        """
        return cls(*row)

    def to_json(self) -> dict[str, Any]:
        """
        The task as a JSON-ready dict (timestamps in ISO 8601).
        """
        result: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, datetime):
                value = value.astimezone(UTC).isoformat()
            result[name] = value
        return result


class TaskQueue:
    """
    Enqueue, claim and settle tasks in the global database.

    @ivar owner: this worker's identity, recorded as the lease owner (for
        example C{"node-id/pid"}).
    @ivar lease_seconds: how long a claim lasts without renewal.
    """

    _log = Logger()

    def __init__(
        self,
        global_db: Database,
        clock: Any,
        owner: str,
        lease_seconds: float = 60.0,
        backoff_base: float = 1.0,
        backoff_cap: float = 3600.0,
        backoff_jitter: float = 0.1,
        default_max_attempts: int | None = None,
    ) -> None:
        """
        @param global_db: the (migrated) global database.
        @param clock: an C{IReactorTime}; its C{seconds()} is the time
            recorded in the table.
        @param owner: the lease owner name of this worker.
        @param lease_seconds: how long a claim or renewal lasts.
        @param backoff_base: seconds of back-off after the first failure;
            after attempt C{n} the delay is C{min(cap, base * 2**n)}.
        @param backoff_cap: the longest back-off, in seconds.
        @param backoff_jitter: each back-off is shortened by a random
            fraction up to this, so that tasks failing together do not all
            come back at the same instant.
        @param default_max_attempts: attempts of tasks enqueued without
            their own C{max_attempts} (C{worker.task_max_attempts});
            C{None}: the table's default (10).
        """
        if lease_seconds <= 0:
            raise InvalidArgument(f"The task lease must be positive, not {lease_seconds}.")
        self._db = global_db
        self._clock = clock
        self.owner = owner
        self.lease_seconds = lease_seconds
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._backoff_jitter = backoff_jitter
        self.default_max_attempts = default_max_attempts

    # -- helpers ----------------------------------------------------------

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.seconds(), UTC)

    def _max_attempts(self, given: int | None) -> int | None:
        """
        @return: the attempts of a new task: C{given}, else this queue's
            default (C{None}: the table's).
        @raise InvalidArgument: for fewer than one.
        """
        max_attempts = self.default_max_attempts if given is None else given
        if max_attempts is not None and max_attempts < 1:
            raise InvalidArgument(f"max_attempts must be at least 1, not {max_attempts}.")
        return max_attempts

    def _lease_until(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self.lease_seconds)

    def backoff_delay(self, attempts: int) -> float:
        """
        The back-off after a failure of attempt number C{attempts},
        before jitter: C{min(cap, base * 2**attempts)}.
        """
        # min() before the power would overflow for absurd attempt counts.
        return float(min(self._backoff_cap, self._backoff_base * 2 ** min(attempts, 64)))

    # -- producers and operators -------------------------------------------

    async def enqueue(
        self,
        kind: str,
        payload: Mapping[str, Any],
        region: str | None = None,
        run_after: datetime | None = None,
        max_attempts: int | None = None,
    ) -> int:
        """
        Add a task and wake idle workers (C{NOTIFY anvil_tasks}, sent when
        the insert commits, in the same transaction).

        @param kind: what to do, for example C{"delete_object"}.
        @param payload: the task's arguments (JSON-serialisable).
        @param region: the region whose workers run it; C{None} for any.
        @param run_after: do not run before this time (default: now).
        @param max_attempts: attempts before it is parked as failed
            (default: the table's default).
        @return: the new task's id.
        """
        if not kind:
            raise InvalidArgument("A task needs a kind.")
        max_attempts = self._max_attempts(max_attempts)
        now = self._now()

        async def insert(cursor: Any) -> int:
            await cursor.execute(
                "INSERT INTO tasks (kind, payload, region, run_after, max_attempts, created_at, updated_at)"
                " VALUES (%s, %s, %s, %s, COALESCE(%s, 10), %s, %s) RETURNING id",
                (kind, Json(dict(payload)), region, run_after or now, max_attempts, now, now),
            )
            task_id: int = cursor.fetchall()[0][0]
            # Delivered to listeners only when this transaction commits.
            await cursor.execute("SELECT pg_notify(%s, %s)", (CHANNEL, kind))
            return task_id

        task_id: int = await self._db.run_interaction(insert)
        return task_id

    async def enqueue_unique(
        self,
        kind: str,
        payload: Mapping[str, Any],
        unique_on: Sequence[str],
        region: str | None = None,
        max_attempts: int | None = None,
        run_after: datetime | None = None,
    ) -> tuple[int, bool]:
        """
        Add a task unless an unfinished one (pending or running) of the same
        kind already has the same values for the payload fields
        C{unique_on}: two detections of one problem (a scrub and a sweep
        both finding a shard bad) then make one task, not two.

        Finished tasks do not count: a problem found again after its task
        was done, parked or cancelled deserves a new task.

        Enqueuers of the same key are serialised by a transaction-scoped
        advisory lock, so two of them racing (on different nodes) still
        insert only one row.

        @param kind: what to do, for example C{"repair"}.
        @param payload: the task's arguments (JSON-serialisable); it must
            hold every field of C{unique_on}.
        @param unique_on: the payload fields identifying the work, for
            example C{("content_hash", "shard_index")}.
        @param region: the region whose workers run it; C{None} for any.
        @param max_attempts: attempts before it is parked as failed.
        @param run_after: do not run a new task before this time (default:
            now); an unfinished task found keeps its own.
        @return: the task's id (the new one, or the unfinished one found)
            and whether it was created now.
        @raise InvalidArgument: without a kind or key field, or when the
            payload lacks a key field.
        """
        if not kind:
            raise InvalidArgument("A task needs a kind.")
        if not unique_on:
            raise InvalidArgument("unique_on must name at least one payload field.")
        missing = [name for name in unique_on if name not in payload]
        if missing:
            raise InvalidArgument(f"The payload lacks the key field(s) {', '.join(missing)}.")
        max_attempts = self._max_attempts(max_attempts)
        key = {name: payload[name] for name in sorted(unique_on)}
        lock_name = json.dumps([kind, region, key], sort_keys=True)
        now = self._now()

        async def insert(cursor: Any) -> tuple[int, bool]:
            await cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (lock_name,))
            # payload @> key: the key fields equal (JSON containment), the
            # rest of the payload may differ (another reason, another finder).
            await cursor.execute(
                "SELECT id FROM tasks WHERE kind = %s AND state IN ('pending', 'running')"
                " AND region IS NOT DISTINCT FROM %s AND payload @> %s ORDER BY id LIMIT 1",
                (kind, region, Json(key)),
            )
            rows = cursor.fetchall()
            if rows:
                return int(rows[0][0]), False
            await cursor.execute(
                "INSERT INTO tasks (kind, payload, region, run_after, max_attempts, created_at, updated_at)"
                " VALUES (%s, %s, %s, %s, COALESCE(%s, 10), %s, %s) RETURNING id",
                (kind, Json(dict(payload)), region, run_after or now, max_attempts, now, now),
            )
            task_id = int(cursor.fetchall()[0][0])
            await cursor.execute("SELECT pg_notify(%s, %s)", (CHANNEL, kind))
            return task_id, True

        result: tuple[int, bool] = await self._db.run_interaction(insert)
        return result

    async def get(self, task_id: int) -> Task:
        """
        One task.

        @raise NotFound: when there is no such task.
        """
        rows = await self._db.run_query(f"SELECT {_COLUMNS} FROM tasks WHERE id = %s", (task_id,))
        if not rows:
            raise NotFound("task", str(task_id))
        return Task.from_row(rows[0])

    async def list(
        self, state: str | None = None, kind: str | None = None, limit: int = 100
    ) -> list[Task]:
        """
        Tasks, oldest first, optionally only those in C{state} or of C{kind}.

        @raise InvalidArgument: for an unknown state or a limit below 1.
        """
        if state is not None and state not in STATES:
            raise InvalidArgument(f"Unknown task state {state!r}; use one of {', '.join(STATES)}.")
        if limit < 1:
            raise InvalidArgument(f"The limit must be at least 1, not {limit}.")
        rows = await self._db.run_query(
            f"SELECT {_COLUMNS} FROM tasks"
            " WHERE (%s::TEXT IS NULL OR state = %s) AND (%s::TEXT IS NULL OR kind = %s)"
            " ORDER BY id LIMIT %s",
            (state, state, kind, kind, limit),
        )
        return [Task.from_row(r) for r in rows]

    async def depth(self) -> dict[tuple[str, str], int]:
        """
        How many tasks there are, by C{(kind, state)} (for C{anvil_tasks}).
        """
        rows = await self._db.run_query("SELECT kind, state, count(*) FROM tasks GROUP BY kind, state")
        return {(kind, state): int(n) for kind, state, n in rows}

    async def retry(self, task_id: int) -> Task:
        """
        Put a failed, cancelled or backing-off task back to pending, to run
        now with all its attempts again.

        @raise NotFound: when there is no such task.
        @raise InvalidArgument: when it is running or done.
        """
        now = self._now()

        async def retry(cursor: Any) -> Task:
            await cursor.execute(f"SELECT {_COLUMNS} FROM tasks WHERE id = %s FOR UPDATE", (task_id,))
            rows = cursor.fetchall()
            if not rows:
                raise NotFound("task", str(task_id))
            task = Task.from_row(rows[0])
            if task.state not in ("pending", "failed", "cancelled"):
                raise InvalidArgument(
                    f"Task {task_id} is {task.state}; only pending, failed or cancelled tasks can be retried."
                )
            await cursor.execute(
                "UPDATE tasks SET state = 'pending', attempts = 0, run_after = %s,"
                " lease_owner = NULL, lease_expires_at = NULL, updated_at = %s"
                f" WHERE id = %s RETURNING {_COLUMNS}",
                (now, now, task_id),
            )
            updated = Task.from_row(cursor.fetchall()[0])
            await cursor.execute("SELECT pg_notify(%s, %s)", (CHANNEL, task.kind))
            return updated

        result: Task = await self._db.run_interaction(retry)
        return result

    async def cancel(self, task_id: int) -> Task:
        """
        Cancel a task that has not finished.  A running task's worker loses
        its lease: its result is discarded (the work it did is not undone,
        which is why every task must be idempotent).  Cancelling a
        cancelled task changes nothing.

        @raise NotFound: when there is no such task.
        @raise InvalidArgument: when it is done.
        """
        now = self._now()

        async def cancel(cursor: Any) -> Task:
            await cursor.execute(f"SELECT {_COLUMNS} FROM tasks WHERE id = %s FOR UPDATE", (task_id,))
            rows = cursor.fetchall()
            if not rows:
                raise NotFound("task", str(task_id))
            task = Task.from_row(rows[0])
            if task.state == "done":
                raise InvalidArgument(f"Task {task_id} is done; it cannot be cancelled.")
            if task.state == "cancelled":
                return task
            await cursor.execute(
                "UPDATE tasks SET state = 'cancelled', lease_owner = NULL, lease_expires_at = NULL,"
                f" updated_at = %s WHERE id = %s RETURNING {_COLUMNS}",
                (now, task_id),
            )
            return Task.from_row(cursor.fetchall()[0])

        result: Task = await self._db.run_interaction(cancel)
        return result

    # -- workers ----------------------------------------------------------

    async def claim(self, kinds: Sequence[str] | None, region: str | None) -> Task | None:
        """
        Claim the next runnable task: a pending one whose C{run_after} has
        passed, or a running one whose lease expired (its worker is presumed
        dead; this counts as a new attempt).

        @param kinds: claim only these kinds (C{None}: any kind).
        @param region: this worker's region; tasks of other regions are
            left alone, tasks without a region are claimed by anyone.
        @return: the claimed task (state C{running}, leased to this
            queue's owner), or C{None} when there is nothing to do.
        """
        now = self._now()
        kind_list = list(kinds) if kinds is not None else None
        if kind_list is not None and not kind_list:
            return None

        async def claim(cursor: Any) -> Task | None:
            # Park tasks whose last allowed attempt died with its worker:
            # taking them over would exceed max_attempts.  SKIP LOCKED here
            # too, so this never waits for another claimer.
            await cursor.execute(
                "UPDATE tasks SET state = 'failed', lease_owner = NULL, lease_expires_at = NULL,"
                " last_error = COALESCE(last_error || '; ', '') || 'the lease of the last attempt expired',"
                " updated_at = %s"
                " WHERE id IN (SELECT id FROM tasks WHERE state = 'running' AND lease_expires_at <= %s"
                "  AND attempts >= max_attempts FOR UPDATE SKIP LOCKED)",
                (now, now),
            )
            # The two branches are separate index scans (tasks_claim and
            # tasks_running_lease) rather than one OR over the table.
            await cursor.execute(
                "UPDATE tasks SET state = 'running', attempts = attempts + 1,"
                " lease_owner = %s, lease_expires_at = %s, updated_at = %s"
                " WHERE id = ("
                "  SELECT id FROM tasks"
                "  WHERE ((state = 'pending' AND run_after <= %s)"
                "      OR (state = 'running' AND lease_expires_at <= %s AND attempts < max_attempts))"
                "   AND (%s::TEXT[] IS NULL OR kind = ANY(%s::TEXT[]))"
                "   AND (region IS NULL OR region = %s)"
                "  ORDER BY run_after, id LIMIT 1 FOR UPDATE SKIP LOCKED)"
                f" RETURNING {_COLUMNS}",
                (self.owner, self._lease_until(now), now, now, now, kind_list, kind_list, region),
            )
            rows = cursor.fetchall()
            return Task.from_row(rows[0]) if rows else None

        task: Task | None = await self._db.run_interaction(claim)
        return task

    async def _settle(self, task: Task, assignments: str, params: Sequence[Any]) -> Task:
        """
        Update C{task} if this worker still holds the lease of this attempt.

        @raise LeaseLost: otherwise.
        """
        rows = await self._db.run_query(
            f"UPDATE tasks SET {assignments}"
            " WHERE id = %s AND state = 'running' AND lease_owner = %s AND attempts = %s"
            f" RETURNING {_COLUMNS}",
            (*params, task.id, self.owner, task.attempts),
        )
        if not rows:
            raise LeaseLost(
                f"The lease of task {task.id} (attempt {task.attempts}) is no longer held by {self.owner}."
            )
        return Task.from_row(rows[0])

    async def renew(self, task: Task) -> Task:
        """
        Extend the lease of a task this worker is running.

        @return: the task with its new lease expiry.
        @raise LeaseLost: when the lease was taken over or cancelled.
        """
        now = self._now()
        return await self._settle(
            task, "lease_expires_at = %s, updated_at = %s", (self._lease_until(now), now)
        )

    async def complete(self, task: Task) -> Task:
        """
        Mark a task this worker ran as done.

        @raise LeaseLost: when the lease was taken over or cancelled.
        """
        now = self._now()
        return await self._settle(
            task,
            "state = 'done', lease_owner = NULL, lease_expires_at = NULL, updated_at = %s",
            (now,),
        )

    async def fail(self, task: Task, error: str) -> Task:
        """
        Record a failed attempt: back off (C{run_after} = now + C{min(cap,
        base * 2**attempts)}, jittered) while attempts remain, otherwise
        park the task as C{failed}.

        @param error: what went wrong (one line preferred), kept as
            C{last_error}.
        @return: the task as updated.
        @raise LeaseLost: when the lease was taken over or cancelled.
        """
        now = self._now()
        error = error[:_MAX_ERROR]
        if task.attempts >= task.max_attempts:
            return await self._settle(
                task,
                "state = 'failed', lease_owner = NULL, lease_expires_at = NULL,"
                " last_error = %s, updated_at = %s",
                (error, now),
            )
        delay = self.backoff_delay(task.attempts)
        delay *= 1 - random.uniform(0, self._backoff_jitter)
        return await self._settle(
            task,
            "state = 'pending', lease_owner = NULL, lease_expires_at = NULL,"
            " last_error = %s, run_after = %s, updated_at = %s",
            (error, now + timedelta(seconds=delay), now),
        )
