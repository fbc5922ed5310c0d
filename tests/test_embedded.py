# -*- test-case-name: tests.test_embedded -*-
"""
Tests for L{anvil.meta.embedded}: a real private PostgreSQL from the
machine's server binaries.
"""

from __future__ import annotations

import os
import signal
import stat
import time

import psycopg2
from twisted.trial.unittest import SynchronousTestCase

from anvil.meta.embedded import (
    EmbeddedPostgres,
    EmbeddedPostgresError,
    find_server_binaries,
    socket_dir_for,
)
from tests.integration.nodeproc import free_port, postgres_processes, short_tmpdir


class FindBinariesTests(SynchronousTestCase):
    """
    Locating the server binaries.
    """

    def test_found_off_path(self) -> None:
        """
        With nothing on PATH, the binaries are found under
        C{/usr/lib/postgresql/*/bin}.
        """
        directory = find_server_binaries(path="/nonexistent")
        self.assertTrue(os.access(os.path.join(directory, "initdb"), os.X_OK))

    def test_missing_names_the_package(self) -> None:
        """
        Without binaries anywhere, the error names the package to install.
        """
        import anvil.meta.embedded as embedded

        self.patch(embedded, "_SEARCH_GLOB", "/nonexistent/*/bin")
        e = self.assertRaises(
            EmbeddedPostgresError, find_server_binaries, path="/nonexistent"
        )
        self.assertIn("apt-get install postgresql", str(e))
        self.assertIn("GLOBAL_DATABASE_URL", str(e))


class SocketDirTests(SynchronousTestCase):
    """
    The socket directory fits a Unix socket path.
    """

    def test_short_data_dir(self) -> None:
        """
        A short data dir keeps its socket inside it.
        """
        self.assertEqual(socket_dir_for("/var/lib/anvil"), "/var/lib/anvil/run")

    def test_long_data_dir(self) -> None:
        """
        A long data dir gets a stable short directory under /tmp.
        """
        long = "/srv/" + "x" * 120
        first = socket_dir_for(long)
        self.assertTrue(first.startswith("/tmp/anvil-pg-"))
        self.assertEqual(first, socket_dir_for(long))
        self.assertLess(len(first) + len("/.s.PGSQL.65535"), 107)


class EmbeddedPostgresTests(SynchronousTestCase):
    """
    Start, reuse, crash recovery and stop of a real embedded server.
    """

    def setUp(self) -> None:
        self.data_dir = short_tmpdir(self)
        self.server = EmbeddedPostgres.for_data_dir(
            self.data_dir, tcp_port=free_port()
        )
        self.addCleanup(self.server.stop)

    def query(self, dsn: str, sql: str) -> object:
        conn = psycopg2.connect(dsn, connect_timeout=5)
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchone()[0]
        finally:
            conn.close()

    def test_start_creates_and_serves(self) -> None:
        """
        The first start creates the cluster; it accepts connections over the
        Unix socket and over loopback TCP with the generated password, which
        is kept mode 0600.
        """
        self.server.start()
        self.assertTrue(self.server.is_initialised())
        self.assertTrue(self.server.is_running())
        self.assertEqual(self.query(self.server.dsn(), "SELECT 1"), 1)
        password_file = os.path.join(self.data_dir, "postgres-password")
        self.assertEqual(stat.S_IMODE(os.stat(password_file).st_mode), 0o600)
        url = self.server.tcp_url("postgres")
        self.assertEqual(self.query(url, "SELECT current_user"), "anvil")
        bad = url.replace("anvil:", "anvil:wrong", 1)
        self.assertRaises(psycopg2.OperationalError, psycopg2.connect, bad)

    def test_restart_reuses(self) -> None:
        """
        Data written before a stop is there after the next start (no
        re-initialisation); create_database is idempotent.
        """
        self.server.start()
        self.assertTrue(self.server.create_database("keep"))
        self.assertFalse(self.server.create_database("keep"))
        conn = psycopg2.connect(self.server.dsn("keep"))
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE TABLE t (v int); INSERT INTO t VALUES (42)")
        conn.close()
        self.server.stop()
        self.assertFalse(self.server.is_running())
        self.server.start()
        self.assertEqual(self.query(self.server.dsn("keep"), "SELECT v FROM t"), 42)

    def test_start_twice_is_noop(self) -> None:
        """
        Starting a running server changes nothing (another process — the node
        or anvil-admin — may have started it).
        """
        self.server.start()
        pids = postgres_processes(self.data_dir)
        self.server.start()
        self.assertEqual(postgres_processes(self.data_dir), pids)

    def test_stale_pid_after_crash(self) -> None:
        """
        After the postmaster is killed (leaving C{postmaster.pid} and the
        socket lock behind), the next start recovers.
        """
        self.server.start()
        for pid in postgres_processes(self.data_dir):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while postgres_processes(self.data_dir) and time.monotonic() < deadline:
            time.sleep(0.05)
        pid_file = os.path.join(self.server.pgdata, "postmaster.pid")
        self.assertTrue(os.path.exists(pid_file))
        self.assertFalse(self.server.is_running())
        self.server.start()
        self.assertEqual(self.query(self.server.dsn(), "SELECT 1"), 1)

    def test_pid_file_naming_another_process(self) -> None:
        """
        A stale pid file whose pid now belongs to an unrelated process (as
        after a reboot) does not count as a running server.
        """
        self.server.start()
        self.server.stop()
        with open(os.path.join(self.server.pgdata, "postmaster.pid"), "w") as f:
            f.write(f"{os.getpid()}\n{self.server.pgdata}\n")
        self.assertFalse(self.server.is_running())
        self.server.start()
        self.assertTrue(self.server.is_running())

    def test_stop_leaves_nothing(self) -> None:
        """
        Stopping leaves no postgres process; stopping again is a no-op.
        """
        self.server.start()
        self.server.stop()
        self.assertEqual(postgres_processes(self.data_dir), [])
        self.server.stop()

    def test_unreachable_data_dir(self) -> None:
        """
        As root, a data dir the unprivileged user cannot reach is a clear
        error naming the user.
        """
        if os.geteuid() != 0:
            self.skipTest("only root runs the server as another user")
        private = os.path.join(self.data_dir, "private")
        os.makedirs(private, mode=0o700)
        os.chmod(private, 0o700)
        server = EmbeddedPostgres.for_data_dir(os.path.join(private, "d"))
        e = self.assertRaises(EmbeddedPostgresError, server.start)
        self.assertIn("'postgres'", str(e))
        self.assertIn("cannot reach", str(e))
