# -*- test-case-name: tests.test_readiness -*-
"""
Tests for L{anvil.web.readiness}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from anvil.web.readiness import CheckFailure, Readiness, ReadinessResult


class _HungCheck:
    """
    A check that never answers until cancelled, counting its calls and
    cancellations.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.cancellations = 0

    def __call__(self) -> Deferred[None]:
        """
        Start the check; it only ends by cancellation.
        """
        self.calls += 1

        def cancelled(d: Deferred[None]) -> None:
            self.cancellations += 1

        return Deferred(cancelled)


def _passing() -> Deferred[None]:
    """
    A check that passes at once.
    """
    return succeed(None)


def _refused() -> Deferred[None]:
    """
    A check that fails like an unreachable database.
    """
    return fail(ConnectionRefusedError("connection refused"))


class ReadinessTests(SynchronousTestCase):
    """
    Tests for L{Readiness.check}.
    """

    def setUp(self) -> None:
        self.clock = Clock()

    def _check(self, checks: list[tuple[str, Any]], timeout: float = 2.0) -> Deferred[ReadinessResult]:
        """
        Start one readiness run over C{checks}.
        """
        readiness = Readiness(checks, timeout, self.clock)
        return Deferred.fromCoroutine(readiness.check())

    def test_all_pass(self) -> None:
        """
        When every check passes, the result is ok with no failures.
        """
        result = self.successResultOf(
            self._check([("global database", _passing), ("membership", _passing)])
        )
        self.assertEqual(result, ReadinessResult(ok=True, failures=()))

    def test_no_checks(self) -> None:
        """
        With no checks at all, the node is ready.
        """
        self.assertTrue(self.successResultOf(self._check([])).ok)

    def test_failures_named_in_order(self) -> None:
        """
        Exactly the failing checks are reported, in the order given, each
        with the first line of its error message.
        """

        async def regional() -> None:
            raise RuntimeError("could not connect to server\n\tIs the server running?")

        result = self.successResultOf(
            self._check(
                [
                    ("global database", _refused),
                    ("membership", _passing),
                    ("regional database", regional),
                ]
            )
        )
        self.assertFalse(result.ok)
        self.assertEqual(
            [f.name for f in result.failures], ["global database", "regional database"]
        )
        self.assertIn("connection refused", result.failures[0].message)
        self.assertEqual(result.failures[1].message, "could not connect to server")

    def test_synchronous_raise_is_failure(self) -> None:
        """
        A check that raises instead of returning a Deferred fails; an empty
        message is replaced by the exception's class name.
        """

        def broken() -> Deferred[None]:
            raise KeyError()

        def empty() -> Deferred[None]:
            raise ValueError("")

        result = self.successResultOf(self._check([("a", broken), ("b", empty)]))
        self.assertEqual(
            result.failures,
            (CheckFailure("a", "KeyError"), CheckFailure("b", "ValueError")),
        )

    def test_long_message_truncated(self) -> None:
        """
        Failure messages are cut to a short line.
        """

        def verbose() -> Deferred[None]:
            return fail(RuntimeError("x" * 1000))

        result = self.successResultOf(self._check([("a", verbose)]))
        self.assertEqual(len(result.failures[0].message), 200)
        self.assertTrue(result.failures[0].message.endswith("..."))

    def test_hung_check_times_out(self) -> None:
        """
        A check that does not answer within the timeout is cancelled and
        reported as timed out, in simulated time.
        """
        hung = _HungCheck()
        d = self._check([("membership", _passing), ("global database", hung)], timeout=2.0)
        self.clock.advance(1.9)
        self.assertNoResult(d)
        self.assertEqual(hung.cancellations, 0)
        self.clock.advance(0.1)
        result = self.successResultOf(d)
        self.assertEqual(
            result.failures, (CheckFailure("global database", "timed out after 2.0s"),)
        )
        self.assertEqual(hung.cancellations, 1)

    def test_check_without_canceller_times_out(self) -> None:
        """
        A hung check whose Deferred cannot be cancelled still counts as
        timed out when the time is up.
        """
        d = self._check([("regional database", lambda: Deferred())], timeout=0.5)
        self.clock.advance(0.5)
        self.assertEqual(
            self.successResultOf(d).failures,
            (CheckFailure("regional database", "timed out after 0.5s"),),
        )

    def test_own_timeout_error_keeps_message(self) -> None:
        """
        A check failing with its own timeout error is reported with its own
        message, not as having run out of the readiness timeout.
        """

        def slow() -> Deferred[None]:
            return fail(TimeoutError("query timeout"))

        result = self.successResultOf(self._check([("a", slow)]))
        self.assertEqual(result.failures, (CheckFailure("a", "query timeout"),))

    def test_checks_run_concurrently(self) -> None:
        """
        All checks start at once, so two hung checks both time out after one
        timeout, not two.
        """
        first, second = _HungCheck(), _HungCheck()
        d = self._check([("a", first), ("b", second)], timeout=2.0)
        self.assertEqual((first.calls, second.calls), (1, 1))
        self.clock.advance(2.0)
        self.assertEqual(
            [f.name for f in self.successResultOf(d).failures], ["a", "b"]
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_late_success_counts(self) -> None:
        """
        A check that answers before the timeout passes and its timer is
        cancelled.
        """
        answer: Deferred[None] = Deferred()
        d = self._check([("a", lambda: answer)], timeout=2.0)
        self.clock.advance(1.0)
        answer.callback(None)
        self.assertTrue(self.successResultOf(d).ok)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_each_check_runs_every_time(self) -> None:
        """
        Results are not cached: a check that recovers makes the next run
        pass.
        """
        outcomes = [_refused, _passing]
        readiness = Readiness([("a", lambda: outcomes.pop(0)())], 2.0, self.clock)
        first = self.successResultOf(Deferred.fromCoroutine(readiness.check()))
        second = self.successResultOf(Deferred.fromCoroutine(readiness.check()))
        self.assertEqual((first.ok, second.ok), (False, True))

    def test_cancel_cancels_checks(self) -> None:
        """
        Cancelling a readiness run cancels every check still running and
        fails the run with CancelledError.
        """
        hung = _HungCheck()
        d = self._check([("a", hung), ("b", _passing)])
        d.cancel()
        self.assertEqual(hung.cancellations, 1)
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_logs_transitions_only(self) -> None:
        """
        A change of readiness is logged once, repeated results are not.
        """
        outcomes = [_refused, _refused, _passing, _passing]
        readiness = Readiness([("global database", lambda: outcomes.pop(0)())], 2.0, self.clock)
        with capturedLogs() as events:
            for _ in range(4):
                self.successResultOf(Deferred.fromCoroutine(readiness.check()))
        messages = [(e["log_level"], e["log_format"]) for e in events]
        self.assertEqual(
            messages,
            [
                (LogLevel.warn, "Node is not ready: {failures}"),
                (LogLevel.info, "Node is ready"),
            ],
        )
        self.assertIn("global database: ", events[0]["failures"])
