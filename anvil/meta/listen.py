# -*- test-case-name: tests.test_worker_loop -*-
"""
C{LISTEN/NOTIFY} on a dedicated connection.

The pooled connections of L{anvil.meta.database.Database} run transactions
for whoever borrows them; a C{LISTEN} belongs to one session for its whole
life, so it gets a connection of its own here.  txpostgres delivers
notifications to observers as the socket becomes readable: nothing blocks
the reactor.

When the connection is lost (the server restarted, the network broke) it
is reopened with exponential backoff.  Notifications sent while it was
down are gone, so the callback is also called once after every
(re)connection: its user (a worker) then looks for work it may have missed,
which is what it would have done on the notification.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from psycopg2 import sql
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import txpostgres

from anvil.meta.database import backoff_delays, describe_dsn, with_keepalives


class _ListenConnection(txpostgres.Connection):  # type: ignore[misc]
    """
    A txpostgres connection that reports its loss once, whether the socket
    closed or psycopg2 raised while reading an idle connection (which
    txpostgres would leave to the reactor to log as an unhandled error).
    """

    def __init__(self, reactor: Any, on_lost: Callable[[_ListenConnection, Failure], None]) -> None:
        super().__init__(reactor=reactor)
        self._on_lost = on_lost

    def doRead(self) -> None:
        try:
            super().doRead()
        except Exception:
            self._on_lost(self, Failure())  # type: ignore[no-untyped-call]
            return
        conn = self.pollable()
        if conn is None or conn.closed:
            self._on_lost(self, Failure(ConnectionError("the connection closed")))  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self._on_lost(self, reason)


class Listener:
    """
    Listen on one channel and call C{callback(payload)} for every
    notification on it, reconnecting when the connection is lost.

    @ivar connected: whether the C{LISTEN} is in place right now.
    """

    _log = Logger()

    reconnect_initial_delay = 0.25
    reconnect_max_delay = 10.0

    def __init__(
        self,
        dsn: str,
        reactor: Any,
        channel: str,
        callback: Callable[[str], object],
        connect_timeout: float = 5.0,
    ) -> None:
        """
        @param dsn: a libpq key/value string or URL (the global database).
        @param reactor: provides C{IReactorTime} and C{IReactorFDSet}.
        @param channel: the channel to C{LISTEN} on.
        @param callback: called with each notification's payload, and with
            C{""} after every (re)connection.  Exceptions are logged.
        @param connect_timeout: seconds to wait for one connection attempt.
        """
        # As in the pool: TCP keepalives notice a server that vanished
        # without closing the socket, which an idle LISTEN connection would
        # otherwise never see.
        self._dsn = with_keepalives(dsn)
        self._reactor = reactor
        self._channel = channel
        self._callback = callback
        self._connect_timeout = connect_timeout
        self.description = describe_dsn(dsn)
        self._connection: _ListenConnection | None = None
        self._delays: Iterator[float] | None = None
        self._retry: Any = None
        self._stopped = True
        self.connected = False

    def start(self) -> Deferred[None]:
        """
        Connect and start listening.

        @return: a L{Deferred} that fires after the first attempt, whether
            it succeeded or not (on failure reconnection goes on in the
            background): a node must start even while the database is
            briefly away.
        """
        self._stopped = False
        self._delays = None
        return Deferred.fromCoroutine(self._attempt())

    def stop(self) -> None:
        """
        Close the connection and stop reconnecting.
        """
        self._stopped = True
        self.connected = False
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        connection, self._connection = self._connection, None
        if connection is not None:
            _close_quietly(connection)

    def _notified(self, notify: Any) -> None:
        if notify.channel == self._channel:
            self._call(notify.payload)

    def _call(self, payload: str) -> None:
        try:
            self._callback(payload)
        except Exception:
            self._log.failure("The {channel} listener's callback failed", channel=self._channel)

    async def _attempt(self) -> None:
        """
        One connection attempt; on failure, schedule the next.
        """
        self._retry = None
        if self._stopped:
            return
        connection = _ListenConnection(self._reactor, self._lost)
        self._connection = connection

        def expire() -> None:
            # Closing fails the pending connect; txpostgres' own cancel
            # would call psycopg2's blocking cancel().
            _close_quietly(connection)

        timer = self._reactor.callLater(self._connect_timeout, expire)
        try:
            await connection.connect(self._dsn)
            connection.addNotifyObserver(self._notified)
            await connection.runOperation(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
        except Exception as e:
            if timer.active():
                timer.cancel()
            _close_quietly(connection)
            if self._connection is connection:
                self._connection = None
            if not self._stopped:
                self._log.warn(
                    "Cannot listen for {channel} on {database}: {error}; retrying",
                    channel=self._channel,
                    database=self.description,
                    error=" ".join(str(e).split()) or type(e).__name__,
                )
                self._schedule()
            return
        if timer.active():
            timer.cancel()
        if self._stopped or self._connection is not connection:
            _close_quietly(connection)
            return
        was_retrying = self._delays is not None
        self._delays = None
        self.connected = True
        if was_retrying:
            self._log.info("Listening for {channel} again", channel=self._channel)
        # Anything notified while we were not listening is lost: let the
        # user look for it.
        self._call("")

    def _schedule(self) -> None:
        if self._delays is None:
            self._delays = backoff_delays(self.reconnect_initial_delay, self.reconnect_max_delay)
        self._retry = self._reactor.callLater(
            next(self._delays), lambda: Deferred.fromCoroutine(self._attempt())
        )

    def _lost(self, connection: _ListenConnection, reason: Failure) -> None:
        """
        Called by a connection that broke: reconnect unless stopped or
        already replaced.
        """
        if connection is not self._connection or not self.connected:
            return
        self._connection = None
        self.connected = False
        _close_quietly(connection)
        if self._stopped:
            return
        self._log.warn(
            "Lost the {channel} listener's connection to {database}: {error}; reconnecting",
            channel=self._channel,
            database=self.description,
            error=" ".join(reason.getErrorMessage().split()),
        )
        self._schedule()


def _close_quietly(connection: _ListenConnection) -> None:
    try:
        pollable = connection.pollable()
        if pollable is not None and not pollable.closed:
            connection.close()
    except Exception:
        # Discarded anyway; a socket that will not close has nothing to say.
        pass
