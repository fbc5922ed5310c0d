# -*- test-case-name: tests.test_database -*-
"""
Tests for L{anvil.meta.database}: the reconnecting txpostgres pool, on a real
PostgreSQL.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from typing import Any

import psycopg2
import psycopg2.errors
import psycopg2.extensions
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from anvil.errors import DatabaseUnavailable, InvalidArgument
from anvil.meta.database import Database, backoff_delays, describe_dsn
from tests.pg import fresh_database


def terminate_other_sessions(dsn: str) -> int:
    """
    Make the server close every other session on the database of C{dsn},
    as an administrator or a server restart would.

    @return: how many sessions were terminated.
    """
    conn = psycopg2.connect(dsn)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            return len(cur.fetchall())
    finally:
        conn.close()


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    """
    Poll C{predicate()} on the reactor until it is true or C{timeout} passes.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} seconds")
        await deferLater(reactor, 0.01)


class DescribeTests(SynchronousTestCase):
    """
    Messages name the database without its password.
    """

    def test_key_value(self) -> None:
        """
        A key/value DSN is described by host, port and database.
        """
        self.assertEqual(
            describe_dsn("host=db.example port=6432 dbname=anvil_global password=hunter2"),
            "PostgreSQL at db.example:6432, database 'anvil_global'",
        )

    def test_url(self) -> None:
        """
        A URL's password is not repeated; defaults fill in the rest.
        """
        described = describe_dsn("postgresql://u:hunter2@10.0.0.1/g")
        self.assertEqual(described, "PostgreSQL at 10.0.0.1:5432, database 'g'")

    def test_invalid_dsn(self) -> None:
        """
        An unparsable DSN is refused without quoting it.
        """
        e = self.assertRaises(InvalidArgument, Database, "password=hunter2 nonsense", reactor)
        self.assertNotIn("hunter2", str(e))

    def test_backoff(self) -> None:
        """
        Reconnection delays grow exponentially, with jitter, up to a cap.
        """
        delays = backoff_delays(initial=1.0, maximum=8.0, factor=2.0, jitter=0.1)
        taken = [next(delays) for _ in range(6)]
        for got, nominal in zip(taken, [1, 2, 4, 8, 8, 8]):
            self.assertTrue(nominal * 0.9 <= got <= nominal * 1.1, (got, nominal))


class QueryTests(TestCase):
    """
    Queries, operations and interactions.
    """

    async def _database(self, pool_size: int = 2) -> Database:
        db = await Database.connect(fresh_database(self), reactor, pool_size=pool_size)
        self.addCleanup(db.close)
        await db.run_operation("CREATE TABLE items (name TEXT PRIMARY KEY)")
        return db

    async def test_query_and_operation(self) -> None:
        """
        C{run_operation} changes rows, C{run_query} returns them as tuples,
        with parameters passed separately from the SQL.
        """
        db = await self._database()
        await db.run_operation("INSERT INTO items (name) VALUES (%s), (%s)", ("a", "it's"))
        self.assertEqual(
            await db.run_query("SELECT name FROM items ORDER BY name"), [("a",), ("it's",)]
        )
        self.assertEqual(await db.run_query("SELECT 1 + %s", (2,)), [(3,)])

    async def test_interaction_commits(self) -> None:
        """
        An interaction's statements commit together and its result is
        returned; it may return a Deferred, a coroutine or a plain value.
        """
        db = await self._database()

        async def insert(cursor: Any, name: str) -> str:
            await cursor.execute("INSERT INTO items (name) VALUES (%s)", (name,))
            await cursor.execute("INSERT INTO items (name) VALUES (%s)", (name + "2",))
            return name

        self.assertEqual(await db.run_interaction(insert, "x"), "x")
        self.assertEqual(
            await db.run_interaction(lambda cursor: cursor.execute("SELECT 1").addCallback(lambda c: c.fetchall())),
            [(1,)],
        )
        self.assertEqual(await db.run_interaction(lambda cursor: succeed(7)), 7)
        self.assertEqual(await db.run_interaction(lambda cursor: 8), 8)
        self.assertEqual(await db.run_query("SELECT count(*) FROM items"), [(2,)])

    async def test_interaction_rolls_back(self) -> None:
        """
        When an interaction raises, its statements are rolled back and the
        exception is passed on; the connection stays usable.
        """
        db = await self._database(pool_size=1)

        async def fail(cursor: Any) -> None:
            await cursor.execute("INSERT INTO items (name) VALUES ('gone')")
            raise ValueError("changed my mind")

        with self.assertRaises(ValueError):
            await db.run_interaction(fail)

        async def duplicate(cursor: Any) -> None:
            await cursor.execute("INSERT INTO items (name) VALUES ('d')")
            await cursor.execute("INSERT INTO items (name) VALUES ('d')")

        with self.assertRaises(psycopg2.errors.UniqueViolation):
            await db.run_interaction(duplicate)
        self.assertEqual(await db.run_query("SELECT count(*) FROM items"), [(0,)])
        self.assertTrue(db.available)

    async def test_sql_error_passes_through(self) -> None:
        """
        An SQL error is raised as psycopg2 raised it, not as an outage, and
        does not cost the pool its connection.
        """
        db = await self._database(pool_size=1)
        with self.assertRaises(psycopg2.errors.UndefinedTable):
            await db.run_query("SELECT * FROM missing")
        self.assertEqual(await db.run_query("SELECT 1"), [(1,)])

    async def test_queued_callers(self) -> None:
        """
        More concurrent callers than connections wait their turn and all
        get answers.
        """
        db = await self._database(pool_size=2)
        results = await Deferred.fromCoroutine(_gather([db.run_query("SELECT %s", (i,)) for i in range(10)]))
        self.assertEqual(results, [[(i,)] for i in range(10)])

    async def test_ping(self) -> None:
        """
        C{ping} succeeds on a healthy database.
        """
        db = await self._database()
        await db.ping(2.0)

    async def test_closed(self) -> None:
        """
        After C{close}, calls fail with L{DatabaseUnavailable}.
        """
        db = await self._database()
        db.close()
        with self.assertRaises(DatabaseUnavailable):
            await db.run_query("SELECT 1")


async def _gather(coroutines: list[Any]) -> list[Any]:
    from twisted.internet.defer import gatherResults

    return await gatherResults([Deferred.fromCoroutine(c) for c in coroutines])


class _Silent(Protocol):
    """
    Accepts a connection and never answers, like a hung server.
    """


class ConnectFailureTests(TestCase):
    """
    An unreachable database is reported at once, naming it.
    """

    async def test_refused(self) -> None:
        """
        A refused connection raises L{DatabaseUnavailable} naming host, port
        and database, but not the password.
        """
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        started = time.monotonic()
        with self.assertRaises(DatabaseUnavailable) as caught:
            await Database.connect(
                f"postgresql://anvil:hunter2@127.0.0.1:{port}/anvil_global", reactor
            )
        message = str(caught.exception)
        self.assertIn(f"127.0.0.1:{port}", message)
        self.assertIn("anvil_global", message)
        self.assertNotIn("hunter2", message)
        self.assertLess(time.monotonic() - started, 3.0)

    async def test_timeout(self) -> None:
        """
        A server that accepts but never answers is given up after the
        connect timeout.
        """
        listening = reactor.listenTCP(0, Factory.forProtocol(_Silent), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        port = listening.getHost().port
        started = time.monotonic()
        with self.assertRaises(DatabaseUnavailable) as caught:
            await Database.connect(
                f"host=127.0.0.1 port={port} dbname=x sslmode=disable", reactor, connect_timeout=0.3
            )
        self.assertIn("no answer within 0.3 seconds", str(caught.exception))
        self.assertLess(time.monotonic() - started, 3.0)


class ReconnectTests(TestCase):
    """
    Lost connections fail calls fast and come back on their own.
    """

    async def _database(self, pool_size: int, initial_delay: float) -> tuple[str, Database]:
        dsn = fresh_database(self)
        db = await Database.connect(dsn, reactor, pool_size=pool_size)
        db.reconnect_initial_delay = initial_delay
        self.addCleanup(db.close)
        return dsn, db

    async def test_terminated_sessions(self) -> None:
        """
        When the server closes every session, the pool notices, calls fail
        at once with L{DatabaseUnavailable}, and after the backoff the pool
        has reconnected and queries work again.
        """
        dsn, db = await self._database(pool_size=3, initial_delay=0.5)
        self.assertEqual(terminate_other_sessions(dsn), 3)
        await wait_for(lambda: not db.available)
        started = time.monotonic()
        with self.assertRaises(DatabaseUnavailable) as caught:
            await db.run_query("SELECT 1")
        self.assertLess(time.monotonic() - started, 0.1)
        self.assertIn("reconnecting", str(caught.exception))
        with self.assertRaises(DatabaseUnavailable):
            await db.ping(1.0)
        await wait_for(lambda: db.available)
        self.assertEqual(await db.run_query("SELECT 1"), [(1,)])
        await db.ping(1.0)

    async def test_lost_during_query(self) -> None:
        """
        A session terminated while its query runs fails that query with
        L{DatabaseUnavailable}; callers waiting for a connection are failed
        too instead of hanging; then the pool recovers.
        """
        dsn, db = await self._database(pool_size=1, initial_delay=0.2)
        running = Deferred.fromCoroutine(db.run_query("SELECT pg_sleep(30)"))
        waiting = Deferred.fromCoroutine(db.run_query("SELECT 1"))
        # Let the first query reach the server before cutting it off.
        await deferLater(reactor, 0.2)
        terminate_other_sessions(dsn)
        for d in (running, waiting):
            with self.assertRaises(DatabaseUnavailable):
                await d
        await wait_for(lambda: db.available)
        self.assertEqual(await db.run_query("SELECT 2"), [(2,)])

    async def test_ping_timeout_on_hung_server(self) -> None:
        """
        A server process that stops answering fails C{ping} after its
        timeout; the pool drops that connection and reconnects.
        """
        _, db = await self._database(pool_size=1, initial_delay=0.1)
        [(pid,)] = await db.run_query("SELECT pg_backend_pid()")
        if not _is_local_postgres(pid):
            raise SkipTest("the test server is not a local process")
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with self.assertRaises(DatabaseUnavailable) as caught:
                await db.ping(0.3)
            self.assertIn("did not answer within 0.3 seconds", str(caught.exception))
            self.assertLess(time.monotonic() - started, 2.0)
        finally:
            os.kill(pid, signal.SIGCONT)
        await wait_for(lambda: db.available)
        await db.ping(2.0)

    async def test_ping_waits_for_free_connection(self) -> None:
        """
        When every connection is busy for longer than the ping timeout,
        C{ping} fails rather than waiting, and the busy query is unharmed.
        """
        _, db = await self._database(pool_size=1, initial_delay=0.1)
        busy = Deferred.fromCoroutine(db.run_query("SELECT pg_sleep(0.5), 1"))
        with self.assertRaises(DatabaseUnavailable) as caught:
            await db.ping(0.1)
        self.assertIn("became free", str(caught.exception))
        self.assertEqual(await busy, [("", 1)])


def _is_local_postgres(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"postgres" in f.read()
    except OSError:
        return False


class CancellationTests(TestCase):
    """
    Callers that give up (a client disconnected) do not harm the pool.
    """

    async def test_cancel_running_query(self) -> None:
        """
        Cancelling a running query fails it at once with C{CancelledError};
        the statement finishes on the server and the connection is reused.
        """
        db = await Database.connect(fresh_database(self), reactor, pool_size=1)
        self.addCleanup(db.close)
        running = Deferred.fromCoroutine(db.run_query("SELECT pg_sleep(0.3)"))
        await deferLater(reactor, 0.05)
        running.cancel()
        self.failureResultOf(running, CancelledError)
        self.assertEqual(await db.run_query("SELECT 1"), [(1,)])
        self.assertTrue(db.available)

    async def test_cancel_waiting_caller(self) -> None:
        """
        Cancelling a caller that waits for a connection removes it from the
        queue; later callers still get the connection.
        """
        db = await Database.connect(fresh_database(self), reactor, pool_size=1)
        self.addCleanup(db.close)
        busy = Deferred.fromCoroutine(db.run_query("SELECT pg_sleep(0.2), 1"))
        waiting = Deferred.fromCoroutine(db.run_query("SELECT 2"))
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.assertEqual(await db.run_query("SELECT 3"), [(3,)])
        self.assertEqual(await busy, [("", 1)])


class HostNameTests(TestCase):
    """
    Host names are resolved off the reactor thread before libpq connects.
    """

    def test_what_is_resolved(self) -> None:
        """
        Only a single host name is looked up; sockets, addresses, host lists
        and explicit C{hostaddr} are passed to libpq as they are.
        """
        from anvil.meta.database import _host_name

        self.assertEqual(_host_name({"host": "db.example"}), "db.example")
        for params in (
            {},
            {"host": "/run/postgresql"},
            {"host": "127.0.0.1"},
            {"host": "::1"},
            {"host": "a.example,b.example"},
            {"host": "db.example", "hostaddr": "10.0.0.1"},
        ):
            self.assertIsNone(_host_name(params), params)

    async def test_resolved_host_in_messages(self) -> None:
        """
        A host name is resolved and connected to; messages keep naming the
        host as configured.
        """
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with self.assertRaises(DatabaseUnavailable) as caught:
            await Database.connect(f"postgresql://u:hunter2@localhost:{port}/g", reactor)
        message = str(caught.exception)
        self.assertIn(f"PostgreSQL at localhost:{port}", message)
        self.assertNotIn("hunter2", message)

    async def test_hostaddr(self) -> None:
        """
        The DSN libpq gets carries the resolved address as C{hostaddr} and
        the name as C{host}.
        """
        db = Database("host=localhost port=5432 dbname=g", reactor)
        params = psycopg2.extensions.parse_dsn(await db._resolved_dsn())
        self.assertEqual((params["host"], params["hostaddr"]), ("localhost", "127.0.0.1"))
        unix = Database("host=/run/postgresql dbname=g", reactor)
        self.assertNotIn("hostaddr", psycopg2.extensions.parse_dsn(await unix._resolved_dsn()))
