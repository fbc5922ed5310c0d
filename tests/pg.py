# -*- test-case-name: tests.test_embedded -*-
"""
A private PostgreSQL server for the test suite.

The first test that needs a database starts one throwaway cluster per test
process (with C{trial -j N}, one per worker) under C{/tmp}, using the same
L{EmbeddedPostgres} a node uses; it is stopped and removed when the process
exits.  Set C{ANVIL_TEST_DSN} to a libpq DSN of an existing server (a role
allowed to create databases) to use that instead.

Each test gets fresh, empty databases from L{fresh_database}, dropped again in
its cleanup, so tests never see each other's rows.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid

import psycopg2
import psycopg2.extensions
import psycopg2.sql
from twisted.trial.unittest import SynchronousTestCase

from anvil.meta.embedded import EmbeddedPostgres


class _TestServer:
    """
    The server the suite uses: either started here or given by
    C{ANVIL_TEST_DSN}.

    @ivar admin_dsn: a DSN of a maintenance database on the server.
    @ivar embedded: the server we started, or C{None}.
    """

    def __init__(self, admin_dsn: str, embedded: EmbeddedPostgres | None) -> None:
        self.admin_dsn = admin_dsn
        self.embedded = embedded

    def dsn(self, dbname: str) -> str:
        """
        The DSN of database C{dbname} on this server.
        """
        params = psycopg2.extensions.parse_dsn(self.admin_dsn)
        params["dbname"] = dbname
        return psycopg2.extensions.make_dsn(**params)

    def url(self, dbname: str) -> str:
        """
        The DSN of C{dbname}, usable wherever Anvil takes a database URL
        (libpq accepts key/value strings as well as URLs).
        """
        return self.dsn(dbname)

    def execute(self, sql: psycopg2.sql.Composable | str) -> None:
        """
        Run one statement outside a transaction (CREATE/DROP DATABASE).
        """
        conn = psycopg2.connect(self.admin_dsn, connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql)
        finally:
            conn.close()


_server: _TestServer | None = None


def test_postgres() -> _TestServer:
    """
    The process-wide test PostgreSQL server, started on first use.
    """
    global _server
    if _server is not None:
        return _server
    given = os.environ.get("ANVIL_TEST_DSN")
    if given:
        _server = _TestServer(given, None)
        return _server
    # /tmp, not the trial working directory: the server runs as the
    # unprivileged 'postgres' user when we are root and must be able to reach
    # it, and the Unix socket path must stay short.
    base = tempfile.mkdtemp(prefix="anvil-t-", dir="/tmp")
    os.chmod(base, 0o755)
    server = EmbeddedPostgres(
        os.path.join(base, "data"),
        os.path.join(base, "s"),
        settings={
            # Durability is pointless for throwaway test data; speed is not.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
        },
    )
    server.start()

    def _stop() -> None:
        try:
            server.stop()
        finally:
            shutil.rmtree(base, ignore_errors=True)

    atexit.register(_stop)
    _server = _TestServer(server.dsn("postgres"), server)
    return _server


# Not a test, whatever its name says.
test_postgres.__test__ = False  # type: ignore[attr-defined]


def fresh_database(testcase: SynchronousTestCase, prefix: str = "t") -> str:
    """
    Create an empty database for one test and drop it in the test's cleanup.

    @return: the new database's DSN.
    """
    server = test_postgres()
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    server.execute(
        psycopg2.sql.SQL("CREATE DATABASE {}").format(psycopg2.sql.Identifier(name))
    )

    def _drop() -> None:
        # FORCE disconnects sessions a failed test may have leaked.
        server.execute(
            psycopg2.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                psycopg2.sql.Identifier(name)
            )
        )

    testcase.addCleanup(_drop)
    return server.dsn(name)
