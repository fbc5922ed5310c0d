# -*- test-case-name: tests.test_erasure -*-
"""
A bounded thread pool for CPU-bound work: zfec coding and hashing.

zfec, hashlib (for inputs over 2 KiB) and zlib.crc32 release the GIL while
they compute, so running them in a few threads uses every core while the
reactor thread keeps serving requests. The pool is bounded (by default to
the number of CPUs) so that a burst of uploads queues work instead of
creating threads that would only contend for the same cores; the queue
itself is bounded by the callers' flow control (one stripe in flight per
request).

Usage, from a coroutine on the reactor thread::

    pool = CpuPool(reactor, max_threads=2)
    pool.setServiceParent(node)          # or pool.startService()
    blocks = await pool.run(codec.encode_stripe, stripe)

Unit tests use L{CpuPool.synchronous}, which runs the function inline and
returns an already-fired Deferred, so they need neither threads nor a real
reactor (the Tahoe-LAFS C{disable_thread_pool_for_test} idea).

The same class serves as a bounded pool for blocking disk I/O (the shard
store's methods are synchronous); give that instance its own name so the
two kinds of work do not queue behind each other.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import ParamSpec, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

__all__ = ["CpuPool", "PoolStopped"]

_P = ParamSpec("_P")
_T = TypeVar("_T")


class PoolStopped(Exception):
    """
    Work was submitted to a L{CpuPool} that is stopping or stopped.
    """


class CpuPool(Service):
    """
    A bounded pool of worker threads, started and stopped as a service.

    Work submitted before L{startService} is queued and runs once the pool
    starts. L{stopService} refuses new work, waits for the work already
    submitted, then joins the threads.

    @ivar name: Thread-name prefix and service name.
    @ivar max_threads: Upper bound on worker threads (0 in synchronous mode).
    """

    _log = Logger()

    def __init__(
        self,
        reactor: IReactorFromThreads | None,
        max_threads: int | None = None,
        name: str = "anvil-cpu",
    ) -> None:
        """
        @param reactor: Delivers results back to the reactor thread; L{None}
            only for L{CpuPool.synchronous}.
        @param max_threads: Upper bound on worker threads; defaults to the
            number of CPUs.
        @param name: Thread-name prefix, and the service name.
        """
        if max_threads is None:
            max_threads = os.cpu_count() or 1
        if max_threads < 0 or (reactor is not None and max_threads < 1):
            raise ValueError(f"max_threads must be at least 1, not {max_threads}")
        self.name = name
        self.max_threads = max_threads
        self._reactor = reactor
        self._pool: ThreadPool | None = None
        if reactor is not None:
            self._pool = ThreadPool(minthreads=0, maxthreads=max_threads, name=name)
        self._stopping = False
        self._pending: set[Deferred[object]] = set()

    @classmethod
    def synchronous(cls, name: str = "anvil-cpu-inline") -> CpuPool:
        """
        A pool that runs each function inline, for unit tests.

        @param name: The service name.
        @return: A pool whose L{run} calls the function immediately.
        """
        return cls(None, max_threads=0, name=name)

    @property
    def is_synchronous(self) -> bool:
        """
        @return: Whether work runs inline on the calling thread.
        """
        return self._pool is None

    def run(self, fn: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> Deferred[_T]:
        """
        Run C{fn(*args, **kwargs)} in a worker thread.

        The result is a Deferred, which coroutines can C{await} and
        Twisted-style code can add callbacks to. It fires on the reactor
        thread.

        @param fn: A thread-safe callable; it must not touch the reactor.
        @return: A Deferred firing with C{fn}'s result or failing with its
            exception (or L{PoolStopped}).
        """
        if self._stopping:
            return fail(PoolStopped(f"{self.name} is stopped"))
        if self._pool is None:
            return maybeDeferred(fn, *args, **kwargs)
        assert self._reactor is not None
        d = deferToThreadPool(self._reactor, self._pool, fn, *args, **kwargs)
        pending: Deferred[object] = d  # type: ignore[assignment]
        self._pending.add(pending)

        def _done(result: _T) -> _T:
            self._pending.discard(pending)
            return result

        d.addBoth(_done)
        return d

    @property
    def pending(self) -> int:
        """
        @return: Calls submitted and not yet finished.
        """
        return len(self._pending)

    def startService(self) -> None:
        """
        Start the worker threads (they are created on demand, up to the bound).
        """
        super().startService()  # type: ignore[no-untyped-call]
        self._stopping = False
        if self._pool is not None:
            if self._pool.joined:
                # A stopped ThreadPool cannot start again; make a fresh one.
                self._pool = ThreadPool(minthreads=0, maxthreads=self.max_threads, name=self.name)
            self._pool.start()

    def stopService(self) -> Deferred[None]:
        """
        Refuse new work, wait for submitted work, then join the threads.

        @return: A Deferred that fires once the threads are gone.
        """
        super().stopService()  # type: ignore[no-untyped-call]
        self._stopping = True
        # consumeErrors: the callers see their own failures; shutdown only
        # waits for completion and must not log them a second time.
        waiting = DeferredList(list(self._pending), consumeErrors=True)

        def _join(_: object) -> None:
            if self._pool is not None and self._pool.started:
                # Threads are idle now, so the join inside stop() is short.
                self._pool.stop()

        return waiting.addCallback(_join)
