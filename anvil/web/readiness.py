# -*- test-case-name: tests.test_readiness -*-
"""
Readiness: may a load balancer send this node traffic right now?

A node is ready when every one of a fixed set of checks succeeds within a
short timeout. The node supplies the checks ("global database", "regional
database", "membership"); this module only runs them, bounds them in time
and reports which failed, for C{GET /ready} (see L{anvil.web.root}).

Checks are plain callables, so this module knows nothing about PostgreSQL
or gossip and can be tested with a L{Clock} and hand-made Deferreds.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

Check = Callable[[], "Deferred[Any] | Coroutine[Any, Any, Any]"]
"""
A readiness check: called with no arguments, returns a Deferred or a
coroutine that succeeds (with any value) when the check passes and fails
when it does not. Raising synchronously also counts as failing.
"""

_MAX_MESSAGE = 200
"""
Longest failure message kept, in characters. C{/ready} is unauthenticated
and meant for humans glancing at a probe result, not for tracebacks.
"""


class _CheckTimedOut(Exception):
    """
    A check ran out of time and was cancelled.
    """


def _timed_out(value: object, timeout: float) -> object:
    """
    Replace the outcome of a check cancelled by its timeout.

    @param value: What the cancelled check's Deferred fired with (normally
        a L{CancelledError} failure; a check may also settle with something
        else when cancelled).
    @param timeout: The timeout that expired.
    @raise _CheckTimedOut: Always: whatever the check did when cancelled,
        it did not pass in time.
    """
    raise _CheckTimedOut(timeout)


class CheckFailure(NamedTuple):
    """
    One failed readiness check.

    @ivar name: The check's name, e.g. C{"global database"}.
    @ivar message: One short line saying why, e.g. C{"timed out after 2.0s"}.
    """

    name: str
    message: str


@dataclass(frozen=True)
class ReadinessResult:
    """
    The outcome of running every readiness check once.

    @ivar ok: C{True} when every check passed.
    @ivar failures: The checks that failed, in the order the checks were
        given; empty exactly when C{ok} is C{True}.
    """

    ok: bool
    failures: tuple[CheckFailure, ...]


def _describe(reason: Failure) -> str:
    """
    Turn a check's failure into one short line.

    Database drivers raise multi-line messages (psycopg2 appends hints on
    further lines); the first line names the problem.

    @param reason: Why the check failed.
    @return: The first non-empty line of the exception's message, or the
        exception's class name when the message is empty.
    """
    lines = [line.strip() for line in str(reason.value).splitlines()]
    text = next((line for line in lines if line), "")
    if not text:
        text = type(reason.value).__name__
    if len(text) > _MAX_MESSAGE:
        text = text[: _MAX_MESSAGE - 3] + "..."
    return text


class Readiness:
    """
    Run a node's readiness checks concurrently, each bounded by a timeout.

    Each call to L{check} runs every check afresh; nothing is cached, so
    C{/ready} turns back to 200 as soon as a database comes back.
    """

    _log = Logger()

    def __init__(
        self,
        checks: Sequence[tuple[str, Check]],
        timeout: float,
        clock: IReactorTime,
    ) -> None:
        """
        @param checks: C{(name, check)} pairs; names appear in the C{/ready}
            body and in logs.
        @param timeout: Seconds each check may take before it counts as
            failed (and is cancelled).
        @param clock: Provides time for the timeouts.
        """
        self._checks = tuple(checks)
        self._timeout = float(timeout)
        self._clock = clock
        # None until the first check, so the first result is always logged.
        self._last_ok: bool | None = None

    async def check(self) -> ReadinessResult:
        """
        Run every check at once and collect the failures.

        Cancelling the returned coroutine's Deferred (as C{/ready} does when
        its client hangs up) cancels every check still running.

        @return: Whether all checks passed, and which did not.
        """
        running = [self._run(name, check) for name, check in self._checks]
        messages = await _all_settled(running)
        failures = tuple(
            CheckFailure(name, message)
            for (name, _), message in zip(self._checks, messages)
            if message is not None
        )
        result = ReadinessResult(ok=not failures, failures=failures)
        self._log_transition(result)
        return result

    def _run(self, name: str, check: Check) -> Deferred[str | None]:
        """
        Start one check with its timeout.

        @param name: The check's name (for the log only).
        @param check: The check to call.
        @return: A Deferred that never fails: it fires with C{None} when the
            check passed and with a failure message otherwise.
        """
        started: Deferred[Any] = maybeDeferred(check)
        # addTimeout cancels the check when the clock runs out; the
        # onTimeoutCancel hook then replaces the CancelledError with our own
        # marker, so a check that itself fails with some TimeoutError keeps
        # its own message. A check whose Deferred has no canceller still
        # settles at once: Deferred.cancel errbacks it with CancelledError.
        started.addTimeout(self._timeout, self._clock, onTimeoutCancel=_timed_out)

        def passed(_: object) -> None:
            return None

        def failed(reason: Failure) -> str:
            if reason.check(_CheckTimedOut):
                return f"timed out after {self._timeout}s"
            if reason.check(CancelledError):
                return "cancelled"
            return _describe(reason)

        return started.addCallbacks(passed, failed)

    def _log_transition(self, result: ReadinessResult) -> None:
        """
        Log when the node becomes ready or stops being ready.

        Probes hit C{/ready} every few seconds, so only changes are logged.

        @param result: The result just computed.
        """
        if result.ok == self._last_ok:
            return
        self._last_ok = result.ok
        if result.ok:
            self._log.info("Node is ready")
        else:
            self._log.warn(
                "Node is not ready: {failures}",
                failures="; ".join(f"{f.name}: {f.message}" for f in result.failures),
            )


def _all_settled(running: Sequence[Deferred[str | None]]) -> Deferred[list[str | None]]:
    """
    Wait for Deferreds that never fail, keeping their order.

    Unlike L{gatherResults}, cancelling the result cancels the inputs and
    then fails with L{CancelledError} rather than firing with whatever the
    cancelled inputs turned into, so a caller that gave up is not handed a
    result full of "cancelled" entries.

    @param running: Deferreds that only ever succeed (see L{Readiness._run}).
    @return: A Deferred firing with their results in input order.
    """
    results: list[str | None] = [None] * len(running)
    remaining = len(running)
    cancelled = False

    def cancel(_: Deferred[list[str | None]]) -> None:
        nonlocal cancelled
        # Set first: cancelling an input settles it synchronously, which
        # would otherwise fire the aggregate with a success.
        cancelled = True
        for d in running:
            d.cancel()

    settled: Deferred[list[str | None]] = Deferred(cancel)

    def one(value: str | None, index: int) -> None:
        nonlocal remaining
        results[index] = value
        remaining -= 1
        if remaining == 0 and not cancelled:
            settled.callback(results)

    if not running:
        settled.callback(results)
    for index, d in enumerate(running):
        d.addCallback(one, index)
    return settled
