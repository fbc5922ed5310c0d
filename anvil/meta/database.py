# -*- test-case-name: tests.test_database -*-
"""
A small pool of asynchronous PostgreSQL connections (txpostgres) that
reconnects on its own.

Every query goes through txpostgres, which drives psycopg2's asynchronous
connections from the reactor: nothing here blocks the reactor thread.  (Host
names are resolved with the reactor's resolver first, since libpq would look
them up with a blocking call.)

A connection that is found dead (the server closed it, a query failed
because the socket broke, it did not answer a ping in time) is closed and
reopened in the background with exponential backoff on the injected
reactor.  While no connection is alive every call fails at once with
L{DatabaseUnavailable} instead of waiting: the S3 layer turns that into
C{503 ServiceUnavailable} and C{/ready} into a failing check.
"""

from __future__ import annotations

import inspect
import ipaddress
import random
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, TypeVar

import psycopg2
import psycopg2.extensions
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.logger import Logger
from twisted.python.failure import Failure
from txpostgres import txpostgres

from anvil.errors import DatabaseUnavailable, InvalidArgument

_T = TypeVar("_T")

#: Errors that mean "the connection is gone" when the psycopg2 connection
#: reports itself closed afterwards.  A psycopg2 error on a connection that
#: is still open (a constraint violation, a serialization failure) is an
#: ordinary query error and is passed through unchanged.
_LOST_ERRORS = (
    psycopg2.OperationalError,
    psycopg2.InterfaceError,
    ConnectionDone,
    ConnectionLost,
    txpostgres.RollbackFailed,
)

#: TCP keepalives, so a server that vanished without closing the socket (a
#: crashed host, a dropped network) is noticed within about half a minute
#: even on an idle connection.  Explicit settings in the DSN win.
_KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
}


def with_keepalives(dsn: str) -> str:
    """
    @return: C{dsn} with the L{_KEEPALIVES} settings it does not set itself.
    """
    given = psycopg2.extensions.parse_dsn(dsn)
    extra = {k: v for k, v in _KEEPALIVES.items() if k not in given}
    return str(psycopg2.extensions.make_dsn(dsn, **extra))


def describe_dsn(dsn: str) -> str:
    """
    Describe where a DSN points, for messages: host, port and database, never
    the password.

    @param dsn: a libpq key/value string or URL.
    @return: for example C{"PostgreSQL at 127.0.0.1:5432, database
        'anvil_global'"}.
    """
    try:
        params = psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError:
        return "PostgreSQL (unparsable connection string)"
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = params.get("port") or "5432"
    where = f"PostgreSQL at {host}:{port}"
    if params.get("dbname"):
        where += f", database {params['dbname']!r}"
    return where


def _one_line(error: BaseException | None) -> str:
    """
    Collapse a (often multi-line) libpq message into one line.
    """
    if error is None:
        return "unknown error"
    lines = [" ".join(line.split()) for line in str(error).splitlines()]
    return "; ".join(line for line in lines if line) or type(error).__name__


def backoff_delays(
    initial: float = 0.25,
    maximum: float = 10.0,
    factor: float = 2.0,
    jitter: float = 0.1,
) -> Iterator[float]:
    """
    Yield reconnection delays growing exponentially up to C{maximum}, each
    randomised by up to C{jitter} (a fraction) so that many nodes losing the
    same server do not reconnect in lockstep.
    """
    delay = initial
    while True:
        yield delay * (1 + random.uniform(-jitter, jitter))
        delay = min(delay * factor, maximum)


class _Connection(txpostgres.Connection):  # type: ignore[misc]
    """
    A txpostgres connection that reports its own death to its slot.

    txpostgres keeps every idle connection registered as a reader (to see
    C{NOTIFY}s); when the server closes an idle connection, psycopg2's
    C{poll()} raises inside C{doRead} and the reactor would log that as an
    unhandled error.  Here it is reported to the pool instead, which
    reconnects.
    """

    def __init__(self, reactor: Any, on_lost: Callable[[Failure], None]) -> None:
        super().__init__(reactor=reactor)
        self._on_lost = on_lost

    def doRead(self) -> None:
        try:
            super().doRead()
        except Exception:
            self._on_lost(Failure())  # type: ignore[no-untyped-call]

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        self._on_lost(reason)

    def is_broken(self) -> bool:
        """
        Whether the underlying psycopg2 connection is closed or broken.
        """
        conn = self.pollable()
        return conn is None or bool(conn.closed)


class _Slot:
    """
    One place in the pool: a connection that is idle, lent out, or being
    reopened.

    @ivar state: C{"connecting"}, C{"idle"}, C{"busy"}, C{"dead"} (waiting
        for its next reconnection attempt) or C{"closed"}.
    @ivar abandoned: why the pool gave up on the connection while it was
        lent out (a ping timeout), used in the error its user sees.
    """

    def __init__(self, index: int) -> None:
        self.index = index
        self.connection: _Connection | None = None
        self.opening: _Connection | None = None
        self.state = "connecting"
        self.delays: Iterator[float] | None = None
        # An IDelayedCall (typed loosely: zope interfaces need mypy-zope).
        self.retry: Any = None
        self.abandoned: str | None = None


class Database:
    """
    A pool of txpostgres connections to one PostgreSQL database.

    Create it with L{Database.connect}.  Statements use psycopg2's
    C{%s} placeholders and are always formatted with their parameters, so a
    literal C{%} in SQL must be written C{%%}.

    @ivar description: where the database is (no password), for messages.
    """

    _log = Logger()

    #: Reconnection backoff (seconds); a class attribute so tests and
    #: operators' subclasses can tune it.
    reconnect_initial_delay = 0.25
    reconnect_max_delay = 10.0

    def __init__(
        self,
        dsn: str,
        reactor: Any,
        pool_size: int = 4,
        connect_timeout: float = 5.0,
    ) -> None:
        """
        Use L{Database.connect}, which also opens the connections.

        @param dsn: a libpq key/value string or URL.
        @param reactor: provides L{IReactorTime} and L{IReactorFDSet}.
        @param pool_size: how many connections to keep open.
        @param connect_timeout: seconds to wait for one connection attempt.
        """
        if pool_size < 1:
            raise InvalidArgument(f"The database pool size must be at least 1, not {pool_size}.")
        try:
            given = psycopg2.extensions.parse_dsn(dsn)
        except psycopg2.ProgrammingError:
            # The libpq message may quote parts of the string, which can
            # include a password: do not repeat it.
            raise InvalidArgument(
                "The database URL is not a valid libpq connection string or URL."
            ) from None
        self._dsn: str = with_keepalives(dsn)
        self._host_to_resolve = _host_name(given)
        self._reactor = reactor
        # IReactorTime and IReactorFDSet; typed loosely because zope
        # interfaces need the mypy-zope plugin to type-check.
        self._clock: Any = reactor
        self._connect_timeout = connect_timeout
        self.description = describe_dsn(dsn)
        self._slots = [_Slot(i) for i in range(pool_size)]
        self._idle: deque[_Slot] = deque()
        self._waiters: deque[Deferred[_Slot]] = deque()
        self._closed = False

    @property
    def dsn(self) -> str:
        """
        @return: The connection string this pool uses (for a LISTEN
            connection to the same database).
        """
        return self._dsn

    @classmethod
    async def connect(
        cls,
        dsn: str,
        reactor: Any,
        pool_size: int = 4,
        connect_timeout: float = 5.0,
    ) -> Database:
        """
        Open C{pool_size} connections to C{dsn}.

        @param dsn: a libpq key/value string or URL.
        @param reactor: the reactor to do I/O and timing with.
        @param pool_size: how many connections to keep open.
        @param connect_timeout: seconds to wait for each connection.
        @return: the connected pool.
        @raise DatabaseUnavailable: when the database cannot be reached; the
            message names the host, port and database, never the password.
        @raise InvalidArgument: when C{dsn} cannot be parsed.
        """
        db = cls(dsn, reactor, pool_size, connect_timeout)
        # Open connections one after the other: the first failure says all
        # there is to say, and a server near max_connections is not hit by a
        # burst.
        for slot in db._slots:
            try:
                connection = await db._open(slot)
            except DatabaseUnavailable:
                db.close()
                raise
            slot.connection = connection
            slot.state = "idle"
            db._idle.append(slot)
        return db

    # -- public API ----------------------------------------------------

    @property
    def available(self) -> bool:
        """
        Whether at least one connection is believed to be alive.
        """
        return any(s.state in ("idle", "busy") for s in self._slots)

    async def run_query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """
        Run one statement in its own transaction and return its rows.

        @raise DatabaseUnavailable: when no connection is alive or the
            connection broke during the statement.
        """

        async def query(connection: _Connection) -> list[tuple[Any, ...]]:
            cursor = connection.cursor()
            await cursor.execute(sql, tuple(params))
            rows: list[tuple[Any, ...]] = cursor.fetchall()
            return rows

        return await self._with_connection(query)

    async def run_operation(self, sql: str, params: Sequence[Any] = ()) -> None:
        """
        Run one statement in its own transaction, discarding any rows.

        @raise DatabaseUnavailable: as L{run_query}.
        """

        async def operation(connection: _Connection) -> None:
            await connection.cursor().execute(sql, tuple(params))

        await self._with_connection(operation)

    async def run_interaction(
        self,
        fn: Callable[..., Any],
        *args: Any,
    ) -> Any:
        """
        Run C{fn(cursor, *args)} inside one transaction.

        C{fn} receives a txpostgres C{Cursor} (whose C{execute} returns a
        L{Deferred}) and may return a L{Deferred}, a coroutine or a plain
        value.  The transaction commits when it succeeds and rolls back when
        it raises; its result (or exception) is passed on.  C{fn} must use
        only its cursor: calling this L{Database} from inside C{fn} waits for
        a second connection (and never gets one with a pool of one).

        @raise DatabaseUnavailable: as L{run_query}.
        """

        async def interaction(connection: _Connection) -> Any:
            cursor = connection.cursor()
            await cursor.execute("BEGIN")
            try:
                result = fn(cursor, *args)
                if isinstance(result, Deferred) or inspect.isawaitable(result):
                    result = await result
            except BaseException:
                if not connection.is_broken():
                    try:
                        await cursor.execute("ROLLBACK")
                    except Exception as rollback_error:
                        # The transaction state is now unknown: close the
                        # connection so that _use replaces it rather than
                        # lending it out again.
                        self._log.warn(
                            "Rollback failed on {database}: {error}",
                            database=self.description,
                            error=_one_line(rollback_error),
                        )
                        _close_quietly(connection)
                raise
            await cursor.execute("COMMIT")
            return result

        return await self._with_connection(interaction)

    async def ping(self, timeout: float) -> None:
        """
        Check that the database answers C{SELECT 1} within C{timeout}
        seconds (waiting for a free connection counts).

        A connection that does not answer in time is closed and reopened in
        the background: a server that hangs is treated as a lost one.

        @raise DatabaseUnavailable: when it does not.
        """
        deadline = self._clock.seconds() + timeout
        slot = await self._acquire(timeout)
        remaining = max(deadline - self._clock.seconds(), 0.0)

        def give_up() -> None:
            if slot.state == "busy" and slot.connection is not None:
                slot.abandoned = (
                    f"{self.description} did not answer within {timeout:g} seconds"
                )
                # Closing the socket fails the outstanding query at once;
                # psycopg2's cancel() would block the reactor.
                _close_quietly(slot.connection)

        timer = self._clock.callLater(remaining, give_up)
        try:
            await _shielded(Deferred.fromCoroutine(self._use(slot, self._select_one)))
        finally:
            if timer.active():
                timer.cancel()

    def close(self) -> None:
        """
        Close every connection and stop reconnecting.  Later calls fail with
        L{DatabaseUnavailable}; calls in progress fail the same way.
        """
        if self._closed:
            return
        self._closed = True
        self._fail_waiters(f"The connection pool to {self.description} is closed.")
        self._idle.clear()
        for slot in self._slots:
            previous, slot.state = slot.state, "closed"
            if slot.retry is not None and slot.retry.active():
                slot.retry.cancel()
            if slot.connection is not None and previous != "closed":
                _close_quietly(slot.connection)
            if slot.opening is not None:
                # Fails the pending connect, which then sees the pool closed.
                _close_quietly(slot.opening)

    # -- lending connections -------------------------------------------

    @staticmethod
    async def _select_one(connection: _Connection) -> None:
        cursor = connection.cursor()
        await cursor.execute("SELECT 1")
        cursor.fetchall()

    async def _with_connection(self, fn: Callable[[_Connection], Awaitable[_T]]) -> _T:
        slot = await self._acquire(None)
        return await _shielded(Deferred.fromCoroutine(self._use(slot, fn)))

    async def _use(self, slot: _Slot, fn: Callable[[_Connection], Awaitable[_T]]) -> _T:
        """
        Run C{fn} with C{slot}'s connection, then give the slot back (or have
        it reconnected when the connection broke).
        """
        connection = slot.connection
        assert connection is not None
        try:
            return await fn(connection)
        except _LOST_ERRORS as e:
            if not connection.is_broken() and not self._closed:
                raise
            reason = slot.abandoned or f"the connection to {self.description} was lost ({_one_line(e)})"
            self._lost(slot, connection, reason)
            raise DatabaseUnavailable(_sentence(reason)) from None
        except BaseException:
            # An error that left the connection broken (rare outside the
            # cases above) still must not put a dead connection back.
            if connection.is_broken():
                self._lost(slot, connection, f"the connection to {self.description} broke")
            raise
        finally:
            if slot.state == "busy" and slot.connection is connection:
                if connection.is_broken():
                    self._lost(slot, connection, f"the connection to {self.description} broke")
                else:
                    self._release(slot)

    async def _acquire(self, timeout: float | None) -> _Slot:
        """
        Take an idle connection, or wait for a busy one when there is no idle
        one.  Fail at once when none is alive.
        """
        if self._closed:
            raise DatabaseUnavailable(f"The connection pool to {self.description} is closed.")
        if self._idle:
            slot = self._idle.popleft()
            slot.state = "busy"
            slot.abandoned = None
            return slot
        if not any(s.state == "busy" for s in self._slots):
            raise DatabaseUnavailable(
                f"No connection to {self.description} is available; reconnecting."
            )

        def forget(waiter: Deferred[_Slot]) -> None:
            # A cancelled caller gives up its place in the queue.
            if waiter in self._waiters:
                self._waiters.remove(waiter)

        waiter: Deferred[_Slot] = Deferred(forget)
        self._waiters.append(waiter)
        timer = None
        if timeout is not None:

            def expire() -> None:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                    waiter.errback(
                        DatabaseUnavailable(
                            f"No connection to {self.description} became free "
                            f"within {timeout:g} seconds."
                        )
                    )

            timer = self._clock.callLater(timeout, expire)
        try:
            slot = await waiter
        finally:
            if timer is not None and timer.active():
                timer.cancel()
        slot.abandoned = None
        return slot

    def _release(self, slot: _Slot) -> None:
        """
        Hand a healthy connection to the next waiter, or put it back.
        """
        if self._closed:
            return
        if self._waiters:
            slot.state = "busy"
            self._waiters.popleft().callback(slot)
        else:
            slot.state = "idle"
            self._idle.append(slot)

    def _fail_waiters(self, message: str) -> None:
        waiters, self._waiters = self._waiters, deque()
        for waiter in waiters:
            waiter.errback(DatabaseUnavailable(message))

    # -- losing and reopening connections ------------------------------

    def _connection_died(self, slot: _Slot, connection: _Connection, reason: Failure) -> None:
        """
        Called by a connection whose socket closed or failed on its own.
        Only idle connections are handled here: a lent-out connection's
        failure surfaces in the query that uses it (see L{_use}).
        """
        if slot.connection is connection and slot.state == "idle":
            self._lost(slot, connection, f"the connection to {self.description} was lost ({_one_line(reason.value)})")

    def _lost(self, slot: _Slot, connection: _Connection, reason: str) -> None:
        """
        Take a broken connection out of service and start reopening it.
        """
        if slot.connection is not connection or slot.state in ("dead", "connecting", "closed"):
            return
        if slot in self._idle:
            self._idle.remove(slot)
        slot.state = "dead"
        slot.connection = None
        _close_quietly(connection)
        self._log.warn("{reason}; reconnecting", reason=_sentence(reason).rstrip("."))
        if not self.available:
            # Nobody is going to give a connection back: callers waiting for
            # one must not hang.
            self._fail_waiters(f"No connection to {self.description} is available; reconnecting.")
        slot.delays = backoff_delays(self.reconnect_initial_delay, self.reconnect_max_delay)
        self._schedule_reconnect(slot)

    def _schedule_reconnect(self, slot: _Slot) -> None:
        assert slot.delays is not None
        delay = next(slot.delays)
        slot.retry = self._clock.callLater(delay, self._reconnect, slot)

    def _reconnect(self, slot: _Slot) -> None:
        slot.retry = None
        if self._closed or slot.state != "dead":
            return
        slot.state = "connecting"
        d = Deferred.fromCoroutine(self._open(slot))

        def opened(connection: _Connection) -> None:
            if self._closed:
                _close_quietly(connection)
                return
            slot.connection = connection
            was_available = self.available
            slot.state = "busy"
            self._release(slot)
            if not was_available:
                self._log.info("Reconnected to {database}", database=self.description)

        def failed(failure: Failure) -> None:
            if self._closed:
                return
            slot.state = "dead"
            self._log.debug(
                "Reconnecting to {database} failed: {error}",
                database=self.description,
                error=failure.getErrorMessage(),
            )
            self._schedule_reconnect(slot)

        d.addCallbacks(opened, failed)

    async def _resolved_dsn(self) -> str:
        """
        The DSN to connect with: with a host name resolved on the reactor's
        (threaded) resolver and passed as C{hostaddr}, because libpq would
        resolve it with a blocking C{getaddrinfo()} on the reactor thread.
        C{host} stays, for authentication and TLS checks.  When the lookup
        fails (or finds no IPv4 address), libpq is left to do it and report.
        """
        host = self._host_to_resolve
        resolve = getattr(self._reactor, "resolve", None)
        if host is None or resolve is None:
            return self._dsn
        try:
            address = await resolve(host, timeout=(self._connect_timeout,))
        except Exception as e:
            self._log.debug("Resolving {host} failed: {error}", host=host, error=_one_line(e))
            return self._dsn
        return str(psycopg2.extensions.make_dsn(self._dsn, hostaddr=address))

    async def _open(self, slot: _Slot) -> _Connection:
        """
        Open one connection for C{slot}, giving up after the connect
        timeout.

        @raise DatabaseUnavailable: when it cannot be opened.
        """
        dsn = await self._resolved_dsn()
        if self._closed:
            raise DatabaseUnavailable(f"The connection pool to {self.description} is closed.")
        holder: list[_Connection] = []

        def on_lost(reason: Failure) -> None:
            if holder:
                self._connection_died(slot, holder[0], reason)

        connection = _Connection(self._reactor, on_lost)
        holder.append(connection)
        timed_out = False

        def expire() -> None:
            nonlocal timed_out
            timed_out = True
            # Closing fails the pending connect; txpostgres' own cancel would
            # call psycopg2's blocking cancel().
            _close_quietly(connection)

        timer = self._clock.callLater(self._connect_timeout, expire)
        slot.opening = connection
        try:
            await connection.connect(dsn)
        except Exception as e:
            _close_quietly(connection)
            if timed_out:
                detail = f"no answer within {self._connect_timeout:g} seconds"
            else:
                detail = _one_line(e)
            raise DatabaseUnavailable(
                _sentence(f"Cannot connect to {self.description}: {detail}")
            ) from None
        finally:
            slot.opening = None
            if timer.active():
                timer.cancel()
        return connection


def _shielded(d: Deferred[_T]) -> Deferred[_T]:
    """
    Follow C{d} without passing cancellation on to it.

    Cancelling the result (an S3 client went away, say) fails it at once
    with C{CancelledError}, while the statement on C{d}'s connection runs to
    its end and the connection goes back to the pool: cancelling a
    txpostgres query would call psycopg2's blocking C{cancel()} and leave
    the connection mid-protocol.
    """
    follower: Deferred[_T] = Deferred()

    def forward(result: object) -> None:
        if not follower.called:
            if isinstance(result, Failure):
                follower.errback(result)
            else:
                follower.callback(result)  # type: ignore[arg-type]
        # Otherwise the follower was cancelled and nobody wants the result
        # (or the error) any more.

    d.addBoth(forward)
    return follower


def _host_name(params: dict[str, str]) -> str | None:
    """
    The host name libpq would look up for these connection parameters, or
    C{None} when there is nothing to look up (a Unix socket, an address,
    several hosts, or an explicit C{hostaddr}).
    """
    host = params.get("host", "")
    if not host or params.get("hostaddr") or "," in host or host.startswith(("/", "@")):
        return None
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host
    return None


def _close_quietly(connection: _Connection) -> None:
    """
    Close a connection whose state may be anything, ignoring errors from an
    already broken socket.
    """
    try:
        if connection.pollable() is not None:
            connection.close()
    except Exception as e:
        # Nothing to do about a socket that will not even close; it is
        # being discarded anyway.
        Database._log.debug("Closing a connection failed: {error}", error=_one_line(e))


def _sentence(text: str) -> str:
    """
    Capitalise C{text} and end it with a full stop.
    """
    text = text.strip()
    if not text:
        return text
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "?", "!")) else text + "."
