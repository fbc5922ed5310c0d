# -*- test-case-name: tests.test_listener -*-
"""
The API listener as a service that drains on shutdown.

Stopping it stops accepting connections at once, closes idle keep-alive
connections, lets requests in flight finish for up to a bounded time, and
then aborts whatever is left, so SIGTERM neither cuts a transfer short
needlessly nor hangs forever on a stuck client.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.http import HTTPChannel
from twisted.web.server import Site


def track_channels(site: Site) -> set[HTTPChannel]:
    """
    Make C{site} record each connection it serves in the returned set (and
    forget it when the connection closes).
    """
    channels: set[HTTPChannel] = set()
    build = site.buildProtocol

    def buildProtocol(addr: Any) -> Any:
        protocol = build(addr)
        if protocol is None:
            return None
        # Site wraps HTTPChannel in a protocol negotiator; the channel that
        # knows about requests is the one actually handling the connection.
        channels.add(protocol)
        lost = protocol.connectionLost

        def connectionLost(reason: Any) -> None:
            channels.discard(protocol)
            lost(reason)

        protocol.connectionLost = connectionLost
        return protocol

    site.buildProtocol = buildProtocol  # type: ignore[method-assign]
    return channels


def _channel(protocol: Any) -> Any:
    """
    The L{HTTPChannel} behind the protocol a L{Site} built.
    """
    return getattr(protocol, "_channel", protocol)


def _busy(protocol: Any) -> bool:
    """
    Whether a connection has a request in flight.
    """
    return bool(getattr(_channel(protocol), "requests", None))


class DrainingListener(Service):
    """
    A listening port whose C{stopService} drains its connections.
    """

    _log = Logger()

    def __init__(
        self,
        port: IListeningPort,
        channels: set[Any],
        clock: IReactorTime,
        drain_timeout: float,
        name: str = "api",
    ) -> None:
        """
        @param port: the port, already listening.
        @param channels: the live connections (see L{track_channels}).
        @param clock: the reactor's clock.
        @param drain_timeout: seconds in-flight requests get to finish.
        """
        self.setName(name)
        self._port = port
        self._channels = channels
        self._clock = clock
        self._drain_timeout = drain_timeout

    def stopService(self) -> Deferred[None]:
        """
        Stop accepting, close idle connections, wait for busy ones up to the
        drain timeout, then abort the rest.
        """
        super().stopService()
        stopped: Deferred[None] = Deferred.fromCoroutine(self._drain())
        return stopped

    async def _drain(self) -> None:
        await self._port.stopListening()
        deadline = self._clock.seconds() + self._drain_timeout
        done: Deferred[None] = Deferred()

        def check() -> None:
            for protocol in list(self._channels):
                if not _busy(protocol):
                    _channel(protocol).transport.loseConnection()
            if not self._channels:
                poll.stop()
            elif self._clock.seconds() >= deadline:
                self._log.warn(
                    "aborting {count} connections still busy after {timeout}s",
                    count=len(self._channels),
                    timeout=self._drain_timeout,
                )
                for protocol in list(self._channels):
                    _channel(protocol).transport.abortConnection()
                poll.stop()

        poll = LoopingCall(check)
        poll.clock = self._clock
        finished = poll.start(0.05, now=True)
        finished.addBoth(lambda _: done.callback(None))
        await done
