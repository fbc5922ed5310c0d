#!/usr/bin/env python3
"""
How long this machine takes to wake a process up: the round trip of one
byte between two processes over a socket pair.

Every small S3 request crosses such a boundary several times (client to
node, node to PostgreSQL and back, node to client), so on a machine where a
wake-up is slow, or varies with what the host is doing, small-object rates
vary with it. Run it next to the small-object benchmark to tell a slower
node from a slower machine::

    python bench/wakeup.py --count 20000

It prints one line: the median and 99th-percentile round trip and the CPU
time one side spent per round trip.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time


def measure(count: int) -> tuple[float, float, float]:
    """
    Bounce one byte between this process and a child C{count} times.

    @return: median and 99th-percentile round trip, and this side's CPU
        time per round trip, in microseconds.
    """
    ours, theirs = socket.socketpair()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only echoes
        ours.close()
        try:
            for _ in range(count):
                theirs.recv(1)
                theirs.send(b"x")
        finally:
            os._exit(0)
    theirs.close()
    samples = []
    cpu_started = time.process_time()
    for _ in range(count):
        started = time.perf_counter()
        ours.send(b"x")
        ours.recv(1)
        samples.append(time.perf_counter() - started)
    cpu = time.process_time() - cpu_started
    os.waitpid(child, 0)
    ours.close()
    samples.sort()
    p99 = samples[min(len(samples) - 1, int(len(samples) * 0.99))]
    return statistics.median(samples) * 1e6, p99 * 1e6, cpu / count * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--count", type=int, default=20000, help="round trips (default 20000)")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    median, p99, cpu = measure(args.count)
    print(
        f"wakeup  {args.count} round trips  median {median:.1f} us  p99 {p99:.1f} us  "
        f"cpu {cpu:.1f} us per round trip"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
