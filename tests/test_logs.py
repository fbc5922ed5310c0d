# -*- test-case-name: tests.test_logs -*-
"""
Tests for L{anvil.logs}: one flat JSON object per log line.
"""

from __future__ import annotations

import io
import json

from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from anvil.logs import json_observer


class JsonObserverTests(SynchronousTestCase):
    """
    The JSON log format keeps messages and named fields.
    """

    def test_one_line_per_event_with_fields(self) -> None:
        """
        Each event is one line holding time, level, namespace, the formatted
        message and the event's named fields.
        """
        stream = io.StringIO()
        log = Logger(namespace="anvil.test", observer=json_observer(stream))
        log.info("shard {index} of {content} missing", index=3, content="ab12")
        log.warn("second {n}", n=[1, 2])
        lines = stream.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        first = json.loads(lines[0])
        self.assertEqual(first["message"], "shard 3 of ab12 missing")
        self.assertEqual(first["level"], "info")
        self.assertEqual(first["namespace"], "anvil.test")
        self.assertEqual((first["index"], first["content"]), (3, "ab12"))
        self.assertTrue(first["time"].endswith("Z"))
        self.assertEqual(json.loads(lines[1])["n"], [1, 2])

    def test_failure_traceback(self) -> None:
        """
        A logged failure carries its traceback in one JSON line.
        """
        stream = io.StringIO()
        log = Logger(namespace="anvil.test", observer=json_observer(stream))
        try:
            1 / 0
        except ZeroDivisionError:
            log.failure("it broke")
        (line,) = stream.getvalue().splitlines()
        record = json.loads(line)
        self.assertEqual(record["level"], "critical")
        self.assertIn("ZeroDivisionError", record["traceback"])
