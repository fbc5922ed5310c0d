# -*- test-case-name: tests.test_lint -*-
"""
The source tree passes the project's lint rules (C{[tool.ruff.lint]} in
C{pyproject.toml}): no syntax errors, undefined names, or unused imports and
variables.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKED = ("anvil", "tests", "bench", os.path.join("twisted", "plugins"))


class LintTests(SynchronousTestCase):
    """
    C{ruff check} over the code, as C{tox -e lint} runs it.
    """

    def test_clean(self) -> None:
        """
        C{ruff check} finds nothing in the package, the tests, the
        benchmarks or the twistd plugin.
        """
        done = subprocess.run(
            [sys.executable, "-m", "ruff", "check", "--no-cache", *CHECKED],
            cwd=SOURCE_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
