# -*- test-case-name: tests.test_bench_wakeup -*-
"""
Smoke test for C{bench/wakeup.py}, so the machine's wake-up probe keeps
working.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

WAKEUP = os.path.join(os.path.dirname(__file__), "..", "bench", "wakeup.py")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, WAKEUP, *args], capture_output=True, text=True, timeout=120
    )


class WakeupTests(SynchronousTestCase):
    """
    The probe as a user runs it.
    """

    def test_prints_one_line_of_figures(self) -> None:
        """
        It bounces the byte as often as asked and prints positive figures.
        """
        done = run("--count", "300")
        self.assertEqual(done.returncode, 0, done.stderr)
        match = re.fullmatch(
            r"wakeup  300 round trips  median ([0-9.]+) us  p99 ([0-9.]+) us  "
            r"cpu ([0-9.]+) us per round trip\n",
            done.stdout,
        )
        self.assertIsNotNone(match, done.stdout)
        assert match is not None
        median, p99, _ = (float(v) for v in match.groups())
        self.assertGreater(median, 0)
        self.assertGreaterEqual(p99, median)

    def test_count_must_be_positive(self) -> None:
        """
        A count below one is refused with a usage error, not a traceback.
        """
        done = run("--count", "0")
        self.assertEqual(done.returncode, 2)
        self.assertIn("--count must be at least 1", done.stderr)
        self.assertNotIn("Traceback", done.stderr)
