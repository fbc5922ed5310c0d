# -*- test-case-name: tests.test_logs -*-
"""
Log observers for C{twistd anvil}.

Text output is twistd's own.  With C{node.log_format = "json"} every event is
written as one flat JSON object per line, the shape journald and log shippers
index directly::

    {"time": "2026-11-28T04:31:13.201Z", "level": "info",
     "namespace": "anvil.node.NodeService",
     "message": "Anvil node 8b8d... serving S3 on http://127.0.0.1:50051",
     "node_id": "8b8d...", "url": "http://127.0.0.1:50051"}

The named fields of Anvil's format-string log events are kept as top-level
keys (when they are JSON values), so a shipper can filter on C{request_id}
or C{content_hash} without parsing messages.  A failure's traceback goes in
C{"traceback"}.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import ILogObserver, LogEvent, formatEvent
from zope.interface import implementer

#: Keys Twisted puts in every event that are not the caller's fields.
_INTERNAL = frozenset(
    {
        "log_logger", "log_level", "log_namespace", "log_source", "log_format",
        "log_time", "log_failure", "log_flattened", "log_text", "log_io",
        "log_system", "log_trace", "message", "isError", "format", "time",
        "system", "why", "failure",
    }
)

_PLAIN = (str, int, float, bool, type(None))


@implementer(ILogObserver)
class JsonLinesObserver:
    """
    Writes each log event as one line of flat JSON.
    """

    def __init__(self, stream: IO[str]) -> None:
        """
        @param stream: where the lines go (flushed after each event).
        """
        self._stream = stream

    def __call__(self, event: LogEvent) -> None:
        """
        Write C{event}.
        """
        self._stream.write(json.dumps(event_to_json(event), ensure_ascii=False) + "\n")
        self._stream.flush()


def event_to_json(event: LogEvent) -> dict[str, Any]:
    """
    The flat JSON object for one log event.
    """
    level = event.get("log_level")
    moment = datetime.fromtimestamp(event.get("log_time", 0.0), timezone.utc)
    record: dict[str, Any] = {
        "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": getattr(level, "name", "info"),
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if key in _INTERNAL or key in record or key.startswith("_"):
            continue
        if isinstance(value, _PLAIN):
            record[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, _PLAIN) for v in value):
            record[key] = list(value)
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return record


def json_observer(stream: IO[str] | None = None) -> ILogObserver:
    """
    An observer writing each event as one line of JSON to C{stream}
    (standard output by default).
    """
    return JsonLinesObserver(stream or sys.stdout)
