# -*- test-case-name: tests.test_embedded -*-
"""
The embedded PostgreSQL server: a private cluster inside a node's data dir.

With no database URLs configured, a node (and C{anvil-admin --data-dir})
runs PostgreSQL from the machine's server binaries in C{<data-dir>/postgres}.
PostgreSQL refuses to run as root, so a node running as root runs the server
binaries as an unprivileged user (C{postgres} by default).

The server listens on a Unix socket in a directory only its owner can enter
(local connections are trusted there), and on a loopback TCP port when one is
configured so other local nodes can share it; TCP connections need the
password kept in C{<data-dir>/postgres-password} (mode 0600).

Every method here blocks (it runs C{initdb}, C{pg_ctl}, psycopg2): the node
calls them from a thread, the admin CLI and the test-suite call them directly.
"""

from __future__ import annotations

import glob
import hashlib
import os
import pwd
import re
import secrets
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.sql

from anvil.errors import AnvilError

#: The PostgreSQL superuser role the embedded cluster is created with.
SUPERUSER = "anvil"

#: Socket paths are limited to 107 bytes (C{sun_path}); PostgreSQL appends
#: C{/.s.PGSQL.NNNNN} (up to 16 bytes) to the socket directory.
_MAX_SOCKET_DIR = 107 - len("/.s.PGSQL.65535") - 1

_SEARCH_GLOB = "/usr/lib/postgresql/*/bin"

_INSTALL_HINT = (
    "install the PostgreSQL server package (Debian/Ubuntu: "
    "'apt-get install postgresql'; Fedora: 'dnf install postgresql-server') "
    "or configure GLOBAL_DATABASE_URL and REGIONAL_DATABASE_URL"
)


class EmbeddedPostgresError(AnvilError):
    """
    The embedded PostgreSQL server could not be found, set up or started.
    """


def find_server_binaries(path: str | None = None) -> str:
    """
    Find the directory holding C{initdb}, C{pg_ctl} and C{postgres}.

    C{PATH} is searched first, then C{/usr/lib/postgresql/*/bin} (newest
    major version first), as Debian installs the server binaries off PATH.

    @param path: the search path to use instead of C{$PATH}.
    @return: the directory containing the three binaries.
    @raise EmbeddedPostgresError: when no directory holds all three.
    """
    wanted = ("initdb", "pg_ctl", "postgres")
    found = shutil.which("pg_ctl", path=path)
    if found is not None:
        directory = os.path.dirname(found)
        if all(os.access(os.path.join(directory, b), os.X_OK) for b in wanted):
            return directory

    def major(d: str) -> tuple[int, ...]:
        version = d.split("/")[-2]
        return tuple(int(p) for p in re.findall(r"\d+", version))

    for directory in sorted(glob.glob(_SEARCH_GLOB), key=major, reverse=True):
        if all(os.access(os.path.join(directory, b), os.X_OK) for b in wanted):
            return directory
    raise EmbeddedPostgresError(
        "No PostgreSQL server binaries (initdb, pg_ctl, postgres) were found "
        f"on PATH or under {_SEARCH_GLOB}; {_INSTALL_HINT}."
    )


def socket_dir_for(data_dir: str) -> str:
    """
    Choose the Unix socket directory for the embedded server of C{data_dir}.

    It is C{<data-dir>/run} when that path is short enough for a Unix
    socket, otherwise a directory under C{/tmp} named after a hash of the
    data dir, so the node and C{anvil-admin} always agree on it.
    """
    data_dir = os.path.abspath(data_dir)
    preferred = os.path.join(data_dir, "run")
    if len(preferred) <= _MAX_SOCKET_DIR:
        return preferred
    digest = hashlib.sha256(data_dir.encode("utf-8")).hexdigest()[:16]
    return f"/tmp/anvil-pg-{digest}"


@dataclass(frozen=True)
class _RunAs:
    """
    The OS account the server binaries run as.

    @ivar uid: user id, or C{None} to run as the current user.
    """

    uid: int | None
    gid: int | None
    name: str
    groups: tuple[int, ...] = field(default=())

    @classmethod
    def resolve(cls, user: str) -> "_RunAs":
        """
        Run as C{user} when we are root (PostgreSQL refuses root), else as
        ourselves.
        """
        if os.geteuid() != 0:
            return cls(None, None, pwd.getpwuid(os.geteuid()).pw_name)
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise EmbeddedPostgresError(
                f"database.embedded_user: the user {user!r} does not exist; "
                "PostgreSQL refuses to run as root, so the embedded server "
                "needs an unprivileged account (create it, or name another "
                "one)."
            ) from None
        if entry.pw_uid == 0:
            raise EmbeddedPostgresError(
                f"database.embedded_user: {user!r} is root; PostgreSQL "
                "refuses to run as root, name an unprivileged account."
            )
        return cls(entry.pw_uid, entry.pw_gid, user, (entry.pw_gid,))

    def chown(self, path: str) -> None:
        """
        Give C{path} to this account (a no-op when running as ourselves).
        """
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    def can_traverse(self, path: str) -> bool:
        """
        Whether this account may enter C{path} and every directory above it.
        """
        if self.uid is None:
            return True
        current = os.path.abspath(path)
        while True:
            st = os.stat(current)
            if st.st_uid == self.uid:
                ok = bool(st.st_mode & 0o100)
            elif st.st_gid in self.groups:
                ok = bool(st.st_mode & 0o010)
            else:
                ok = bool(st.st_mode & 0o001)
            if not ok:
                return False
            parent = os.path.dirname(current)
            if parent == current:
                return True
            current = parent


class EmbeddedPostgres:
    """
    A private PostgreSQL cluster, created on first start and reused after.

    @ivar pgdata: the cluster's data directory.
    @ivar socket_dir: the directory of its Unix socket.
    @ivar port: the port number (names the socket; the TCP port when TCP is
        enabled).
    """

    def __init__(
        self,
        pgdata: str,
        socket_dir: str,
        *,
        tcp_port: int = 0,
        user: str = "postgres",
        password_file: str | None = None,
        settings: Mapping[str, str] | None = None,
        bindir: str | None = None,
        log_file: str | None = None,
    ) -> None:
        """
        @param pgdata: where the cluster lives (created on first start).
        @param socket_dir: where the Unix socket goes (keep it short).
        @param tcp_port: also listen on 127.0.0.1 at this port when non-zero.
        @param user: the OS account to run as when we are root.
        @param password_file: where the superuser's TCP password is kept
            (default: next to C{pgdata}).
        @param settings: extra C{postgresql.conf} settings (tests turn
            C{fsync} off).
        @param bindir: the server binaries (default: L{find_server_binaries}).
        @param log_file: the server log (default: inside C{pgdata}).
        """
        self.pgdata = os.path.abspath(pgdata)
        self.socket_dir = os.path.abspath(socket_dir)
        self.tcp_port = tcp_port
        self.port = tcp_port or 5432
        self._user = user
        self._password_file = password_file or os.path.join(
            os.path.dirname(self.pgdata), "postgres-password"
        )
        self._settings = dict(settings or {})
        self._bindir = bindir
        self.log_file = log_file or os.path.join(self.pgdata, "server.log")
        if len(self.socket_dir) > _MAX_SOCKET_DIR:
            raise EmbeddedPostgresError(
                f"The socket directory {self.socket_dir} is too long for a "
                f"Unix socket (at most {_MAX_SOCKET_DIR} bytes)."
            )

    @classmethod
    def for_data_dir(
        cls, data_dir: str, *, tcp_port: int = 0, user: str = "postgres"
    ) -> "EmbeddedPostgres":
        """
        The embedded server of a node's data directory, as the node and
        C{anvil-admin --data-dir} both find it.
        """
        data_dir = os.path.abspath(data_dir)
        return cls(
            os.path.join(data_dir, "postgres"),
            socket_dir_for(data_dir),
            tcp_port=tcp_port,
            user=user,
        )

    # -- queries -------------------------------------------------------

    def dsn(self, dbname: str = "postgres") -> str:
        """
        A libpq key/value connection string reaching C{dbname} over the
        Unix socket.
        """
        return psycopg2.extensions.make_dsn(
            host=self.socket_dir, port=self.port, user=SUPERUSER, dbname=dbname
        )

    def tcp_url(self, dbname: str) -> str | None:
        """
        The URL other local nodes use to share this server over TCP, or
        C{None} when TCP is off.  The password is read from its file.
        """
        if not self.tcp_port:
            return None
        with open(self._password_file) as f:
            password = f.read().strip()
        return (
            f"postgresql://{SUPERUSER}:{password}@127.0.0.1:{self.tcp_port}"
            f"/{dbname}"
        )

    def is_initialised(self) -> bool:
        """
        Whether C{initdb} has run for C{pgdata}.
        """
        return os.path.exists(os.path.join(self.pgdata, "PG_VERSION"))

    def is_running(self) -> bool:
        """
        Whether a live postmaster owns C{pgdata} (a stale pid file does not
        count).
        """
        pid = self._postmaster_pid()
        return pid is not None and self._is_our_postmaster(pid)

    # -- lifecycle -----------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """
        Create the cluster if needed, clear a stale pid file left by a crash,
        start the server and wait until it accepts connections.

        Starting a server that already runs is a no-op.
        """
        run_as = _RunAs.resolve(self._user)
        bindir = self._bindir or find_server_binaries()
        if self.is_running():
            return
        self._prepare_directories(run_as)
        if not self.is_initialised():
            self._initdb(run_as, bindir)
        self._write_settings(run_as)
        self._clear_stale_pid()
        options = " ".join(
            [
                "-c", shlex.quote(f"unix_socket_directories={self.socket_dir}"),
                "-c", shlex.quote(
                    "listen_addresses=" + ("127.0.0.1" if self.tcp_port else "")
                ),
                "-p", str(self.port),
            ]
        )
        self._run(
            run_as,
            [
                os.path.join(bindir, "pg_ctl"), "start", "-D", self.pgdata,
                "-l", self.log_file, "-w", "-t", str(int(timeout)),
                "-o", options,
            ],
            what="start",
        )
        self._wait_accepting(timeout)

    def stop(self, timeout: float = 60.0) -> None:
        """
        Stop the server (fast shutdown: sessions are rolled back) and wait
        until it has exited.  Stopping a stopped server is a no-op.
        """
        if not self.is_running():
            return
        run_as = _RunAs.resolve(self._user)
        bindir = self._bindir or find_server_binaries()
        self._run(
            run_as,
            [
                os.path.join(bindir, "pg_ctl"), "stop", "-D", self.pgdata,
                "-m", "fast", "-w", "-t", str(int(timeout)),
            ],
            what="stop",
        )

    def create_database(self, name: str) -> bool:
        """
        Create database C{name} unless it exists.

        @return: whether it was created.
        """
        conn = psycopg2.connect(self.dsn("postgres"), connect_timeout=10)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
                )
                if cur.fetchone():
                    return False
                try:
                    cur.execute(
                        psycopg2.sql.SQL("CREATE DATABASE {}").format(
                            psycopg2.sql.Identifier(name)
                        )
                    )
                except psycopg2.errors.DuplicateDatabase:
                    return False
                return True
        finally:
            conn.close()

    # -- internals -----------------------------------------------------

    def _prepare_directories(self, run_as: _RunAs) -> None:
        parent = os.path.dirname(self.pgdata)
        os.makedirs(parent, exist_ok=True)
        for directory in (self.pgdata, self.socket_dir):
            os.makedirs(directory, mode=0o700, exist_ok=True)
            run_as.chown(directory)
            # PostgreSQL insists on 0700 (or 0750) for its data directory;
            # the socket directory is 0700 so only its owner (and root) can
            # reach the trusted local socket.
            os.chmod(directory, 0o700)
            if not run_as.can_traverse(directory):
                raise EmbeddedPostgresError(
                    f"The embedded PostgreSQL runs as user {run_as.name!r}, "
                    f"who cannot reach {directory}: choose a data directory "
                    "outside private home directories such as /root, or make "
                    "its parents searchable (chmod o+x)."
                )

    def _initdb(self, run_as: _RunAs, bindir: str) -> None:
        password = secrets.token_urlsafe(24)
        password_file = self._password_file
        old_umask = os.umask(0o077)
        try:
            with open(password_file, "w") as f:
                f.write(password + "\n")
        finally:
            os.umask(old_umask)
        os.chmod(password_file, 0o600)
        # initdb reads the password file as the server's user: hand it a
        # copy inside pgdata's parent only it can read, then remove it.
        pwfile = os.path.join(self.pgdata, "..", ".initdb-pwfile")
        pwfile = os.path.abspath(pwfile)
        with open(pwfile, "w") as f:
            f.write(password + "\n")
        os.chmod(pwfile, 0o600)
        run_as.chown(pwfile)
        try:
            self._run(
                run_as,
                [
                    os.path.join(bindir, "initdb"), "-D", self.pgdata,
                    "--username", SUPERUSER, "--pwfile", pwfile,
                    "--auth-local", "trust", "--auth-host", "scram-sha-256",
                    "--encoding", "UTF8", "--locale", "C",
                ],
                what="initialise",
            )
        finally:
            os.unlink(pwfile)

    def _write_settings(self, run_as: _RunAs) -> None:
        """
        Write Anvil's settings to a file C{postgresql.conf} includes, so a
        restart with other settings (a TCP port, say) takes effect.
        """
        conf = os.path.join(self.pgdata, "postgresql.conf")
        include = "include_if_exists = 'anvil.conf'"
        with open(conf) as f:
            text = f.read()
        if include not in text:
            with open(conf, "a") as f:
                f.write(f"\n# Added by Anvil.\n{include}\n")
        settings = {
            "max_connections": "200",
            "shared_buffers": "128MB",
            "log_min_messages": "warning",
            **self._settings,
        }
        path = os.path.join(self.pgdata, "anvil.conf")
        with open(path, "w") as f:
            f.write("# Written by Anvil at every start; edits are lost.\n")
            for key, value in settings.items():
                f.write(f"{key} = '{value}'\n")
        run_as.chown(path)

    def _postmaster_pid(self) -> int | None:
        try:
            with open(os.path.join(self.pgdata, "postmaster.pid")) as f:
                first = f.readline().strip()
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            return None
        try:
            return int(first)
        except ValueError:
            return None

    def _is_our_postmaster(self, pid: int) -> bool:
        """
        Whether C{pid} is a live postgres serving C{pgdata}.  After a crash
        and reboot the pid in a stale file may belong to anything.
        """
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return False
        if not argv or b"postgres" not in os.path.basename(argv[0]):
            return False
        return self.pgdata.encode() in argv

    def _clear_stale_pid(self) -> None:
        pid_file = os.path.join(self.pgdata, "postmaster.pid")
        if os.path.exists(pid_file) and not self.is_running():
            os.unlink(pid_file)
            lock = os.path.join(self.socket_dir, f".s.PGSQL.{self.port}.lock")
            if os.path.exists(lock):
                os.unlink(lock)

    def _wait_accepting(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg2.connect(self.dsn("postgres"), connect_timeout=5).close()
                return
            except psycopg2.OperationalError as e:
                if time.monotonic() > deadline:
                    raise EmbeddedPostgresError(
                        "The embedded PostgreSQL started but does not accept "
                        f"connections: {str(e).strip()}"
                    ) from None
                time.sleep(0.05)

    def _run(self, run_as: _RunAs, argv: Sequence[str], what: str) -> None:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C",
            "LC_ALL": "C",
        }
        kwargs: dict[str, object] = {}
        if run_as.uid is not None:
            kwargs.update(user=run_as.uid, group=run_as.gid, extra_groups=[])
        result = subprocess.run(
            list(argv),
            env=env,
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            **kwargs,  # type: ignore[arg-type]
        )
        if result.returncode != 0:
            detail = _last_lines(result.stdout)
            if what == "start" and os.path.exists(self.log_file):
                try:
                    with open(self.log_file, errors="replace") as f:
                        detail = _last_lines(f.read()) or detail
                except OSError:
                    pass
            raise EmbeddedPostgresError(
                f"Could not {what} the embedded PostgreSQL in {self.pgdata}: "
                f"{detail}"
            )


def _last_lines(text: str, count: int = 3) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " / ".join(lines[-count:]) or "no output"
