# -*- test-case-name: tests.test_node -*-
"""
Log observers for C{twistd anvil}.

Text output is twistd's own.  With C{node.log_format = "json"} every event is
written as one JSON object per line (no record separators), which journald and
log shippers read directly.  Both keep the named fields of Anvil's
format-string log events.
"""

from __future__ import annotations

import sys
from typing import IO

from twisted.logger import ILogObserver, jsonFileLogObserver


def json_observer(stream: IO[str] | None = None) -> ILogObserver:
    """
    An observer writing each event as one line of JSON to C{stream}
    (standard output by default).
    """
    return jsonFileLogObserver(stream or sys.stdout, recordSeparator="")
