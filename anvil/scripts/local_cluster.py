# -*- test-case-name: tests.test_local_cluster -*-
"""
C{anvil-local-cluster}: an N-node Anvil cluster on one machine, for trying
failure and recovery in minutes.

C{anvil-local-cluster start --nodes 6 --dir DIR} starts one PostgreSQL for
the whole cluster (in C{DIR/postgres}, reached over a Unix socket), creates
the global and the regional database, generates the secret encryption key
and the cluster secret, applies the migrations, creates a tenant and an app
allowed everything, then starts N C{twistd -n --pidfile= anvil} nodes with
the environment of the cluster contract (issue 4): node 1 with
C{INIT_CLUSTER=true}, the others with C{BOOTSTRAP_ADDRS} naming node 1's
cluster listener.  Node I keeps its data in C{DIR/node-I}, logs to
C{DIR/node-I/node.log}, serves S3 on C{127.0.0.1:BASE+I} and its cluster
listener on C{127.0.0.1:BASE+100+I}.

Everything a user or a script needs is written to C{DIR/cluster.json}
(mode 0600: it holds the keys): the endpoints, the process ids, the S3
credentials and each node's environment.  Its C{state} is C{starting},
then C{running} once every node answers C{/ready}, then C{stopped}.

The command then supervises in the foreground, reporting nodes that stop
or come back, until Ctrl-C or SIGTERM, which stops every node (SIGTERM,
so they leave the cluster gracefully) and then PostgreSQL.  From another
terminal, C{stop-node DIR I [--kill]}, C{start-node DIR I}, C{status DIR}
and C{env DIR I} (C{export} lines for running C{anvil-admin cluster status}
as node I) act on the running cluster.  Starting again on the same
directory reuses its databases, keys and credentials.

Errors are one line, C{anvil-local-cluster: error: ...}, exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NoReturn, TextIO

PROG = "anvil-local-cluster"

#: Exit status for every error this command reports.
EXIT_ERROR = 2

#: The file describing a cluster, inside its directory.
STATE_FILE = "cluster.json"

#: Node I's API port is BASE + I, its cluster port BASE + this + I.
CLUSTER_PORT_OFFSET = 100

DEFAULT_BASE_PORT = 19000
DEFAULT_NODES = 6
DEFAULT_REGION = "us-east-1"
TENANT = "local"
APP = "admin"

#: Seconds a node gets to stop after SIGTERM before it is killed (the
#: node's own drain timeout is 15 s by default).
STOP_TIMEOUT = 30.0

#: Environment variables that configure a node: they are never inherited
#: from the caller's environment, only set from the cluster's description.
_ANVIL_PREFIXES = ("ANVIL_", "API_", "CLUSTER_", "GLOBAL_", "REGIONAL_")
_ANVIL_NAMES = (
    "REGION",
    "PUBLIC_API_ADDR",
    "PUBLIC_CLUSTER_ADDRS",
    "BOOTSTRAP_ADDRS",
    "INIT_CLUSTER",
)


class LocalClusterError(Exception):
    """
    Something an operator can fix went wrong; the message is one sentence.
    """


class UsageError(LocalClusterError):
    """
    The command line could not be parsed; the message is argparse's.
    """


class _Parser(argparse.ArgumentParser):
    """
    An argument parser raising L{UsageError} instead of exiting, so every
    error is reported the same way.
    """

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


# -- pure pieces: ports, addresses, environments ------------------------------


def api_port(base_port: int, index: int) -> int:
    """
    @param index: the node's number, from 1.
    @return: node C{index}'s S3 API port.
    """
    return base_port + index


def cluster_port(base_port: int, index: int) -> int:
    """
    @param index: the node's number, from 1.
    @return: node C{index}'s cluster listener port.
    """
    return base_port + CLUSTER_PORT_OFFSET + index


def cluster_addr(base_port: int, index: int) -> str:
    """
    @return: node C{index}'s cluster address as peers dial it (host:port).
    """
    return f"127.0.0.1:{cluster_port(base_port, index)}"


def node_dir(root: str, index: int) -> str:
    """
    @return: node C{index}'s data directory under the cluster directory.
    """
    return os.path.join(root, f"node-{index}")


def parse_env_assignments(pairs: Sequence[str]) -> dict[str, str]:
    """
    Parse C{KEY=VALUE} options (C{--env}).

    @raise LocalClusterError: for an item without C{=} or with an empty key.
    """
    parsed: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise LocalClusterError(f"--env {pair!r} must be KEY=VALUE.")
        parsed[key.strip()] = value
    return parsed


def check_layout(nodes: int, base_port: int, k: int, m: int) -> None:
    """
    Refuse a cluster shape that cannot work, before anything starts.

    @raise LocalClusterError: naming the option at fault.
    """
    if nodes < 1:
        raise LocalClusterError(f"--nodes must be at least 1, not {nodes}.")
    if nodes >= CLUSTER_PORT_OFFSET:
        raise LocalClusterError(
            f"--nodes must be below {CLUSTER_PORT_OFFSET} (the cluster ports "
            f"are the API ports + {CLUSTER_PORT_OFFSET})."
        )
    if k < 1 or m < 0:
        raise LocalClusterError(f"--k must be at least 1 and --m at least 0 (got {k} and {m}).")
    if not 1024 <= base_port or cluster_port(base_port, nodes) > 65535:
        raise LocalClusterError(
            f"--base-port {base_port} leaves the ports outside 1024-65535 for "
            f"{nodes} nodes."
        )


def node_env(
    *,
    root: str,
    index: int,
    base_port: int,
    region: str,
    global_url: str,
    regional_url: str,
    encryption_key: str,
    cluster_secret: str,
    k: int,
    m: int,
    init: bool,
    bootstrap: Sequence[str],
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """
    The Anvil environment of node C{index}, as the cluster contract names
    it (issue 4).

    @param init: start a new cluster (C{INIT_CLUSTER=true}); the node
        forms the cluster alone.
    @param bootstrap: cluster addresses to join through (C{BOOTSTRAP_ADDRS}).
    @param extra: further settings for every node (C{--env}); they win.
    @return: the variables, all strings.
    """
    env = {
        "GLOBAL_DATABASE_URL": global_url,
        "REGIONAL_DATABASE_URL": regional_url,
        "REGION": region,
        "ANVIL_SECRET_ENCRYPTION_KEY": encryption_key,
        "CLUSTER_SECRET": cluster_secret,
        "ANVIL_DATA_DIR": node_dir(root, index),
        "API_LISTEN_ADDR": f"tcp:{api_port(base_port, index)}:interface=127.0.0.1",
        "CLUSTER_LISTEN_ADDR": f"tcp:{cluster_port(base_port, index)}:interface=127.0.0.1",
        "PUBLIC_API_ADDR": f"http://127.0.0.1:{api_port(base_port, index)}",
        "PUBLIC_CLUSTER_ADDRS": cluster_addr(base_port, index),
        "ANVIL_ERASURE_K": str(k),
        "ANVIL_ERASURE_M": str(m),
    }
    if init:
        env["INIT_CLUSTER"] = "true"
    if bootstrap:
        env["BOOTSTRAP_ADDRS"] = ",".join(bootstrap)
    env.update(extra or {})
    return env


def join_plan(nodes: int, base_port: int, index: int, whole_cluster: bool, first: bool) -> tuple[bool, list[str]]:
    """
    How node C{index} finds the cluster: C{(init, bootstrap addresses)}.

    On the first start, node 1 initialises the cluster and the others
    join through node 1 (the contract's layout).  Later, a node restarted
    alone joins through every other node, since node 1 may be the one that
    is down, and a node 1 started with C{INIT_CLUSTER} would form a second
    cluster of its own.  When the whole cluster starts again, node 1
    initialises it again (reusing the CA) and the others join through all
    the others.

    @param whole_cluster: the whole cluster is starting, not one node.
    @param first: this is the cluster's first start.
    """
    if first:
        return (True, []) if index == 1 else (False, [cluster_addr(base_port, 1)])
    others = [cluster_addr(base_port, j) for j in range(1, nodes + 1) if j != index]
    if whole_cluster and index == 1:
        return True, []
    return False, others


def child_environ(base: Mapping[str, str], node: Mapping[str, str]) -> dict[str, str]:
    """
    The full environment of a node process: C{base} (the caller's) without
    any Anvil setting, plus the node's, with the directory holding this
    C{anvil} package first on C{PYTHONPATH} so the child runs the same code
    (and finds the same twistd plugin) even from a source checkout.
    """
    env = {
        k: v for k, v in base.items() if not k.startswith(_ANVIL_PREFIXES) and k not in _ANVIL_NAMES
    }
    root = _package_root()
    path = env.get("PYTHONPATH", "")
    if root not in path.split(os.pathsep):
        env["PYTHONPATH"] = root + (os.pathsep + path if path else "")
    env.update(node)
    return env


def _package_root() -> str:
    import anvil

    return os.path.dirname(os.path.dirname(os.path.abspath(anvil.__file__)))


def twistd_argv() -> list[str]:
    """
    The command starting one node: the C{twistd} of this Python
    environment when it has one, else the same through C{-c}.
    """
    script = os.path.join(os.path.dirname(sys.executable), "twistd")
    head = [script] if os.access(script, os.X_OK) else [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
    ]
    return head + ["-n", "--pidfile=", "anvil"]


def export_lines(env: Mapping[str, str]) -> list[str]:
    """
    @return: C{export KEY=VALUE} shell lines, values quoted, in key order.
    """
    return [f"export {key}={shlex.quote(value)}" for key, value in sorted(env.items())]


def database_url(socket_dir: str, port: int, dbname: str, user: str) -> str:
    """
    A libpq URL reaching C{dbname} over the Unix socket in C{socket_dir}.
    """
    return f"postgresql://{user}@/{dbname}?host={socket_dir}&port={port}"


def regional_database_name(region: str) -> str:
    """
    @return: the name of the regional database of C{region}.
    """
    return "anvil_regional_" + "".join(c if c.isalnum() else "_" for c in region.lower())


# -- the state file ------------------------------------------------------------


def state_path(root: str) -> str:
    """
    @return: where the cluster description lives.
    """
    return os.path.join(root, STATE_FILE)


def load_state(root: str) -> dict[str, Any]:
    """
    Read C{DIR/cluster.json}.

    @raise LocalClusterError: when there is none or it cannot be read.
    """
    path = state_path(root)
    try:
        with open(path) as f:
            state: dict[str, Any] = json.load(f)
    except FileNotFoundError:
        raise LocalClusterError(
            f"{path} does not exist: start a cluster there first ({PROG} start --dir {root})."
        ) from None
    except (OSError, ValueError) as e:
        raise LocalClusterError(f"{path} cannot be read: {e}.") from None
    return state


def save_state(root: str, state: Mapping[str, Any]) -> None:
    """
    Write C{DIR/cluster.json} atomically, readable by its owner only.
    """
    path = state_path(root)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def locked_state(root: str) -> Iterator[dict[str, Any]]:
    """
    Read, change and write back the state under a lock, so the supervisor
    and C{stop-node}/C{start-node} in other terminals never lose each
    other's updates.
    """
    with open(os.path.join(root, ".cluster.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            state = load_state(root)
            yield state
            save_state(root, state)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def node_record(state: Mapping[str, Any], index: int) -> dict[str, Any]:
    """
    @return: node C{index}'s entry of the state.
    @raise LocalClusterError: when the cluster has no such node.
    """
    for node in state["nodes"]:
        if node["index"] == index:
            return node  # type: ignore[no-any-return]
    raise LocalClusterError(f"the cluster has no node {index} (nodes 1 to {len(state['nodes'])}).")


# -- processes -----------------------------------------------------------------


def process_alive(pid: int | None, data_dir: str | None = None) -> bool:
    """
    Whether C{pid} runs (a zombie does not count) and, when C{data_dir} is
    given, is the node of that data directory (a recycled pid is not).
    """
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    if stat.rpartition(")")[2].split()[:1] == ["Z"]:
        return False
    if data_dir is None:
        return True
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read().split(b"\0")
    except OSError:
        # Not ours to read: then it is not our node either.
        return False
    return f"ANVIL_DATA_DIR={data_dir}".encode() in environ


def wait_gone(pid: int, timeout: float, child: subprocess.Popen[bytes] | None = None) -> bool:
    """
    Wait until process C{pid} has exited.

    @param child: its L{subprocess.Popen} when it is our child (to reap it).
    @return: whether it did within C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None:
            if child.poll() is not None:
                return True
        elif not process_alive(pid):
            return True
        time.sleep(0.05)
    return False


def http_status(url: str, timeout: float = 2.0) -> int | None:
    """
    @return: the HTTP status of a GET of C{url}, or C{None} when nothing
        answers.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (OSError, ValueError):
        return None


def port_in_use(port: int) -> bool:
    """
    Whether something already listens on 127.0.0.1:C{port}.
    """
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


# -- the cluster -----------------------------------------------------------------


class LocalCluster:
    """
    One local cluster: its directory, its PostgreSQL and its node
    processes.  The CLI drives it; benchmarks and scripts may too.

    @ivar root: the cluster directory (absolute).
    @ivar children: node processes this object started, by node number.
    """

    def __init__(self, root: str, out: TextIO | None = None, environ: Mapping[str, str] | None = None) -> None:
        """
        @param root: the cluster directory.
        @param out: where progress lines go (default: nowhere).
        @param environ: the environment nodes inherit (default: ours).
        """
        self.root = os.path.abspath(root)
        self._out = out
        self._environ = dict(os.environ if environ is None else environ)
        self.children: dict[int, subprocess.Popen[bytes]] = {}
        self._postgres: Any = None

    # -- output

    def say(self, line: str) -> None:
        """
        Print a progress line (when an output stream was given).
        """
        if self._out is not None:
            self._out.write(line + "\n")
            self._out.flush()

    # -- PostgreSQL

    def postgres(self, state: Mapping[str, Any]) -> Any:
        """
        The cluster's L{EmbeddedPostgres}, as the state describes it.
        """
        if self._postgres is None:
            from anvil.meta.embedded import EmbeddedPostgres

            pg = state["postgres"]
            self._postgres = EmbeddedPostgres(
                pg["pgdata"],
                pg["socket_dir"],
                user=pg["user"],
                settings={"max_connections": str(pg["max_connections"])},
            )
        return self._postgres

    # -- start

    def prepare(
        self,
        *,
        nodes: int | None,
        base_port: int | None,
        k: int | None,
        m: int | None,
        region: str | None,
        extra_env: Mapping[str, str],
        pg_user: str = "postgres",
    ) -> tuple[dict[str, Any], bool]:
        """
        Describe the cluster: a new one, or the one already in the
        directory (whose settings must then agree with those given).

        @return: the state and whether this is the cluster's first start.
        @raise LocalClusterError: when a cluster runs there already, or the
            options contradict the existing cluster.
        """
        from anvil.meta.embedded import socket_dir_for

        if os.path.exists(state_path(self.root)):
            state = load_state(self.root)
            if process_alive(state.get("supervisor_pid")) and state.get("state") != "stopped":
                raise LocalClusterError(
                    f"a cluster already runs in {self.root} (supervisor pid "
                    f"{state['supervisor_pid']}); stop it first (Ctrl-C or {PROG} stop {self.root})."
                )
            for record in state["nodes"]:
                if process_alive(record.get("pid"), record["data_dir"]):
                    raise LocalClusterError(
                        f"node {record['index']} of an earlier run still runs (pid "
                        f"{record['pid']}): stop it first ({PROG} stop {self.root})."
                    )
            for option, given, kept in (
                ("--nodes", nodes, len(state["nodes"])),
                ("--base-port", base_port, state["base_port"]),
                ("--k", k, state["k"]),
                ("--m", m, state["m"]),
                ("--region", region, state["region"]),
            ):
                if given is not None and given != kept:
                    raise LocalClusterError(
                        f"{self.root} holds a cluster with {option} {kept}; {option} "
                        f"{given} needs another --dir."
                    )
            if extra_env:
                state["extra_env"] = {**state.get("extra_env", {}), **extra_env}
            return state, False

        nodes = DEFAULT_NODES if nodes is None else nodes
        base_port = DEFAULT_BASE_PORT if base_port is None else base_port
        k = 4 if k is None else k
        m = 2 if m is None else m
        region = region or DEFAULT_REGION
        check_layout(nodes, base_port, k, m)
        os.makedirs(self.root, mode=0o755, exist_ok=True)
        if os.listdir(self.root):
            raise LocalClusterError(f"{self.root} is not empty and holds no {STATE_FILE}: choose a new --dir.")
        # The embedded PostgreSQL runs as an unprivileged user when we are
        # root; it must reach its data directory under this one.
        os.chmod(self.root, 0o755)
        socket_dir = socket_dir_for(self.root)
        # Every node keeps two pools (global and regional).
        max_connections = max(200, nodes * 2 * 8 + 60)
        state: dict[str, Any] = {
            "dir": self.root,
            "state": "new",
            "region": region,
            "k": k,
            "m": m,
            "base_port": base_port,
            "supervisor_pid": None,
            "secrets": {
                "encryption_key": secrets.token_hex(32),
                "cluster_secret": secrets.token_urlsafe(24),
            },
            "postgres": {
                "pgdata": os.path.join(self.root, "postgres"),
                "socket_dir": socket_dir,
                "port": 5432,
                "user": pg_user,
                "max_connections": max_connections,
                "global_url": database_url(socket_dir, 5432, "anvil_global", "anvil"),
                "regional_url": database_url(socket_dir, 5432, regional_database_name(region), "anvil"),
            },
            "extra_env": dict(extra_env),
            "credentials": None,
            "nodes": [
                {
                    "index": i,
                    "data_dir": node_dir(self.root, i),
                    "api_url": f"http://127.0.0.1:{api_port(base_port, i)}",
                    "cluster_addr": cluster_addr(base_port, i),
                    "log": os.path.join(node_dir(self.root, i), "node.log"),
                    "pid": None,
                    "env": {},
                }
                for i in range(1, nodes + 1)
            ],
        }
        save_state(self.root, state)
        return state, True

    def env_for(self, state: Mapping[str, Any], index: int, *, whole_cluster: bool, first: bool) -> dict[str, str]:
        """
        Node C{index}'s Anvil environment for this start.
        """
        nodes = len(state["nodes"])
        init, bootstrap = join_plan(nodes, state["base_port"], index, whole_cluster, first)
        return node_env(
            root=self.root,
            index=index,
            base_port=state["base_port"],
            region=state["region"],
            global_url=state["postgres"]["global_url"],
            regional_url=state["postgres"]["regional_url"],
            encryption_key=state["secrets"]["encryption_key"],
            cluster_secret=state["secrets"]["cluster_secret"],
            k=state["k"],
            m=state["m"],
            init=init,
            bootstrap=bootstrap,
            extra=state.get("extra_env"),
        )

    def start_postgres(self, state: Mapping[str, Any]) -> None:
        """
        Start the cluster's PostgreSQL and create its two databases.
        """
        from anvil.meta.embedded import EmbeddedPostgresError

        pg = self.postgres(state)
        self.say(f"Starting PostgreSQL in {state['postgres']['pgdata']} ...")
        try:
            pg.start()
            pg.create_database("anvil_global")
            pg.create_database(regional_database_name(state["region"]))
        except EmbeddedPostgresError as e:
            raise LocalClusterError(str(e)) from None

    def stop_postgres(self, state: Mapping[str, Any]) -> None:
        """
        Stop the cluster's PostgreSQL (a no-op when it is not running).
        """
        try:
            self.postgres(state).stop()
        except Exception as e:  # noqa: BLE001 - reported, shutdown goes on
            self.say(f"Could not stop PostgreSQL: {e}")

    def admin(self, state: Mapping[str, Any], *args: str) -> Any:
        """
        Run C{anvil-admin --json ARGS} with node 1's environment.

        @return: its JSON output.
        @raise LocalClusterError: when it fails (with its error line).
        """
        env = child_environ(self._environ, self.env_for(state, 1, whole_cluster=True, first=False))
        result = subprocess.run(
            [sys.executable, "-m", "anvil.scripts.admin", "--json", *args],
            env=env,
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if result.returncode != 0:
            detail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise LocalClusterError(f"anvil-admin {' '.join(args)} failed: {detail}")
        return json.loads(result.stdout) if result.stdout.strip() else None

    def setup_metadata(self, state: dict[str, Any]) -> None:
        """
        Apply the migrations, create the region, and on the first start a
        tenant and an app allowed everything, whose keys go in the state.
        """
        self.say("Applying migrations ...")
        self.admin(state, "migrate")
        self.admin(state, "region", "create", state["region"])
        if state.get("credentials"):
            return
        self.say(f"Creating tenant {TENANT!r} and app {APP!r} (all rights) ...")
        self.admin(state, "tenant", "create", TENANT)
        app = self.admin(state, "app", "create", "--tenant-name", TENANT, "--app-name", APP)
        self.admin(state, "policy", "grant", "--app-name", APP, "--action", "*", "--resource", "*")
        state["credentials"] = {
            "access_key_id": app["client_id"],
            "secret_access_key": app["client_secret"],
            "region": state["region"],
            "endpoint": state["nodes"][0]["api_url"],
            "tenant": TENANT,
            "app": APP,
        }
        save_state(self.root, state)

    def spawn(self, state: Mapping[str, Any], index: int, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
        """
        Start node C{index}'s process with C{env}, in its own session (a
        Ctrl-C in the terminal reaches the supervisor only, which stops
        the nodes in order).
        """
        record = node_record(state, index)
        os.makedirs(record["data_dir"], mode=0o700, exist_ok=True)
        port = api_port(state["base_port"], index)
        for p in (port, cluster_port(state["base_port"], index)):
            if port_in_use(p):
                raise LocalClusterError(
                    f"port {p} of node {index} is in use: stop what listens there "
                    f"or choose another --base-port."
                )
        with open(record["log"], "ab") as log:
            process = subprocess.Popen(
                twistd_argv(),
                env=child_environ(self._environ, env),
                cwd=record["data_dir"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.children[index] = process
        return process

    def wait_ready(self, state: Mapping[str, Any], indices: Sequence[int], timeout: float,
                   stop: threading.Event | None = None) -> None:
        """
        Wait until every node of C{indices} answers C{/ready} with 200.

        @raise LocalClusterError: when one exits or is not ready in time.
        """
        pending = set(indices)
        deadline = time.monotonic() + timeout
        while pending:
            for index in sorted(pending):
                record = node_record(state, index)
                child = self.children.get(index)
                if child is not None and child.poll() is not None:
                    raise LocalClusterError(
                        f"node {index} exited with status {child.returncode} while "
                        f"starting: {_last_line(record['log'])} (log: {record['log']})."
                    )
                if http_status(record["api_url"] + "/ready", timeout=2) == 200:
                    pending.discard(index)
            if not pending:
                return
            if stop is not None and stop.is_set():
                raise LocalClusterError("interrupted while the nodes were starting.")
            if time.monotonic() > deadline:
                names = ", ".join(str(i) for i in sorted(pending))
                logs = ", ".join(node_record(state, i)["log"] for i in sorted(pending))
                raise LocalClusterError(
                    f"node(s) {names} not ready after {timeout:.0f} s (logs: {logs})."
                )
            time.sleep(0.2)

    def start(
        self,
        *,
        nodes: int | None = None,
        base_port: int | None = None,
        k: int | None = None,
        m: int | None = None,
        region: str | None = None,
        extra_env: Mapping[str, str] | None = None,
        timeout: float = 120.0,
        stop: threading.Event | None = None,
        pg_user: str = "postgres",
    ) -> dict[str, Any]:
        """
        Start (or start again) the whole cluster and wait until every node
        is ready; on failure, stop whatever was started.

        @return: the state, also in C{DIR/cluster.json} with state
            C{running}.
        """
        state, first = self.prepare(
            nodes=nodes, base_port=base_port, k=k, m=m, region=region,
            extra_env=dict(extra_env or {}), pg_user=pg_user,
        )
        state["supervisor_pid"] = os.getpid()
        state["state"] = "starting"
        save_state(self.root, state)
        try:
            self.start_postgres(state)
            self.setup_metadata(state)
            count = len(state["nodes"])
            self.say(f"Starting {count} nodes ...")
            for record in state["nodes"]:
                index = record["index"]
                env = self.env_for(state, index, whole_cluster=True, first=first)
                process = self.spawn(state, index, env)
                with locked_state(self.root) as current:
                    entry = node_record(current, index)
                    entry["pid"], entry["env"] = process.pid, env
                record["pid"], record["env"] = process.pid, env
            self.wait_ready(state, [r["index"] for r in state["nodes"]], timeout, stop)
        except BaseException:
            self.shutdown()
            raise
        with locked_state(self.root) as current:
            current["state"] = "running"
            state = current
        return state

    # -- single nodes

    def stop_node(self, index: int, kill: bool = False, timeout: float = STOP_TIMEOUT) -> int | None:
        """
        Stop node C{index}: SIGTERM (it leaves the cluster gracefully) and
        wait, or SIGKILL (a crash) with C{kill}.

        @return: the pid stopped, or C{None} when it was not running.
        """
        state = load_state(self.root)
        record = node_record(state, index)
        pid = record.get("pid")
        if not process_alive(pid, record["data_dir"]):
            with locked_state(self.root) as current:
                node_record(current, index)["pid"] = None
            return None
        os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
        child = self.children.get(index)
        if child is not None and child.pid != pid:
            child = None
        if not wait_gone(pid, timeout, child):
            self.say(f"Node {index} did not stop within {timeout:.0f} s: killing it.")
            os.kill(pid, signal.SIGKILL)
            wait_gone(pid, 10.0, child)
        with locked_state(self.root) as current:
            if node_record(current, index).get("pid") == pid:
                node_record(current, index)["pid"] = None
        return int(pid)

    def start_node(self, index: int, wait: bool = True, timeout: float = 120.0) -> int:
        """
        Start node C{index} again, joining through every other node.

        While a supervisor runs (C{start} in another process), it is asked
        to start the node, so that the node is its child: it reaps it when
        it exits and stops it with the others.  Otherwise this process
        starts it.

        @return: its new pid.
        @raise LocalClusterError: when it is running already or does not
            become ready.
        """
        state = load_state(self.root)
        record = node_record(state, index)
        if process_alive(record.get("pid"), record["data_dir"]):
            raise LocalClusterError(f"node {index} is running already (pid {record['pid']}).")
        supervisor = state.get("supervisor_pid")
        if supervisor and supervisor != os.getpid() and process_alive(supervisor) and state.get("state") == "running":
            pid = self._ask_supervisor(index, supervisor)
        else:
            pid = self._start_node_here(index)
        if wait:
            self.wait_ready(load_state(self.root), [index], timeout)
        return pid

    def _start_node_here(self, index: int) -> int:
        """
        Start node C{index} as a child of this process.

        @return: its pid.
        """
        state = load_state(self.root)
        if not self.postgres(state).is_running():
            raise LocalClusterError(
                f"the cluster's PostgreSQL is not running: start the cluster ({PROG} start --dir {self.root})."
            )
        env = self.env_for(state, index, whole_cluster=False, first=False)
        process = self.spawn(state, index, env)
        with locked_state(self.root) as current:
            entry = node_record(current, index)
            entry["pid"], entry["env"] = process.pid, env
        return process.pid

    def _request_path(self, index: int) -> str:
        return os.path.join(self.root, f".start-node-{index}")

    def _ask_supervisor(self, index: int, supervisor: int, timeout: float = 30.0) -> int:
        """
        Ask the running supervisor to start node C{index} (a request file
        it polls), and wait for its answer in the state.

        @return: the new pid.
        """
        token = secrets.token_hex(8)
        path = self._request_path(index)
        with open(path + ".tmp", "w") as f:
            f.write(token)
        os.replace(path + ".tmp", path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            answer = node_record(load_state(self.root), index).get("start_result") or {}
            if answer.get("token") == token:
                if answer.get("error"):
                    raise LocalClusterError(answer["error"])
                return int(answer["pid"])
            if not process_alive(supervisor):
                break
            time.sleep(0.1)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise LocalClusterError(f"the supervisor (pid {supervisor}) did not start node {index}.")

    def serve_requests(self) -> None:
        """
        Start the nodes other processes asked for (L{start_node}), and
        record each outcome for the asker.
        """
        for record in load_state(self.root)["nodes"]:
            index = record["index"]
            path = self._request_path(index)
            try:
                with open(path) as f:
                    token = f.read().strip()
                os.unlink(path)
            except FileNotFoundError:
                continue
            result: dict[str, Any] = {"token": token}
            try:
                if process_alive(record.get("pid"), record["data_dir"]):
                    raise LocalClusterError(f"node {index} is running already (pid {record['pid']}).")
                result["pid"] = self._start_node_here(index)
            except LocalClusterError as e:
                result["error"] = str(e)
            with locked_state(self.root) as current:
                node_record(current, index)["start_result"] = result

    # -- the whole cluster

    def node_pids(self) -> dict[int, int]:
        """
        @return: node number -> pid of every node process running now
            (started by us or by C{start-node}).
        """
        pids: dict[int, int] = {}
        try:
            state = load_state(self.root)
        except LocalClusterError:
            state = {"nodes": []}
        for record in state["nodes"]:
            if process_alive(record.get("pid"), record["data_dir"]):
                pids[record["index"]] = record["pid"]
        for index, child in self.children.items():
            if child.poll() is None:
                pids.setdefault(index, child.pid)
        return pids

    def shutdown(self, timeout: float = STOP_TIMEOUT) -> None:
        """
        Stop every node (SIGTERM, all at once, SIGKILL after C{timeout}),
        then PostgreSQL, and mark the cluster stopped.
        """
        try:
            state = load_state(self.root)
        except LocalClusterError:
            return
        pids = self.node_pids()
        if pids:
            self.say(f"Stopping {len(pids)} node(s) ...")
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for index, pid in pids.items():
            child = self.children.get(index)
            child = child if child is not None and child.pid == pid else None
            if not wait_gone(pid, max(0.0, deadline - time.monotonic()), child):
                self.say(f"Node {index} did not stop within {timeout:.0f} s: killing it.")
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                wait_gone(pid, 10.0, child)
        for child in self.children.values():
            if child.poll() is None:
                child.kill()
                child.wait()
        self.say("Stopping PostgreSQL ...")
        self.stop_postgres(state)
        with locked_state(self.root) as current:
            for record in current["nodes"]:
                record["pid"] = None
            current["state"] = "stopped"
            current["supervisor_pid"] = None

    def supervise(self, stop: threading.Event, poll: float = 0.5) -> None:
        """
        Report nodes that stop or come back until C{stop} is set, start the
        nodes C{start-node} asks for, and reap our children meanwhile.
        """
        seen = self.node_pids()
        while not stop.wait(poll):
            self.serve_requests()
            now = self.node_pids()
            for index in sorted(set(seen) | set(now)):
                before, after = seen.get(index), now.get(index)
                if before and before != after:
                    child = self.children.get(index)
                    status = ""
                    if child is not None and child.pid == before and child.returncode is not None:
                        status = f" (exit status {child.returncode})"
                    self.say(f"node {index} (pid {before}) stopped{status}")
                if after and after != before:
                    self.say(f"node {index} running (pid {after})")
            seen = now


def _last_line(path: str) -> str:
    """
    The last non-empty line of a log file, or a placeholder.
    """
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f.read().splitlines()[-50:] if line.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "empty log"


# -- presentation ----------------------------------------------------------------


def usage_text(state: Mapping[str, Any]) -> str:
    """
    What C{start} prints once the cluster runs: endpoints, keys, and how to
    use and break it.
    """
    creds = state["credentials"]
    root = state["dir"]
    first = state["nodes"][0]
    last = state["nodes"][-1]["index"]
    lines = [
        f"Anvil cluster of {len(state['nodes'])} nodes running in {root} "
        f"(region {state['region']}, erasure {state['k']}+{state['m']}).",
        "",
        "  node  pid      S3 endpoint              cluster address",
    ]
    for record in state["nodes"]:
        lines.append(
            f"  {record['index']:<4}  {record['pid']!s:<7}  {record['api_url']:<23}  {record['cluster_addr']}"
        )
    lines += [
        "",
        "S3 credentials (tenant {tenant!r}, app {app!r}, allowed everything):".format(**creds),
        "",
        f"  export AWS_ACCESS_KEY_ID={creds['access_key_id']}",
        f"  export AWS_SECRET_ACCESS_KEY={creds['secret_access_key']}",
        f"  export AWS_DEFAULT_REGION={creds['region']}",
        f"  aws --endpoint-url {first['api_url']} s3 mb s3://demo",
        f"  aws --endpoint-url {first['api_url']} s3 cp ./some-file s3://demo/",
        "",
        "Any node's endpoint serves every bucket. From another terminal:",
        "",
        f"  {PROG} status {root}",
        f"  {PROG} stop-node {root} {last}          # SIGTERM: node {last} leaves gracefully",
        f"  {PROG} stop-node {root} {last} --kill   # SIGKILL: a crash",
        f"  {PROG} start-node {root} {last}",
        f"  eval \"$({PROG} env {root} 1)\" && anvil-admin cluster status",
        "",
        f"Everything above is in {state_path(root)}; node logs are {root}/node-N/node.log.",
        "Ctrl-C (or SIGTERM) stops the nodes and PostgreSQL.",
    ]
    return "\n".join(lines)


def status_rows(state: Mapping[str, Any]) -> list[dict[str, Any]]:
    """
    @return: one row per node: number, pid (when running), endpoints and
        whether C{/ready} answers 200.
    """
    rows = []
    for record in state["nodes"]:
        running = process_alive(record.get("pid"), record["data_dir"])
        ready = running and http_status(record["api_url"] + "/ready", timeout=2) == 200
        rows.append(
            {
                "index": record["index"],
                "pid": record["pid"] if running else None,
                "state": ("ready" if ready else "running") if running else "stopped",
                "api_url": record["api_url"],
                "cluster_addr": record["cluster_addr"],
                "data_dir": record["data_dir"],
            }
        )
    return rows


# -- the command line -------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """
    The C{anvil-local-cluster} argument parser.
    """
    parser = _Parser(
        prog=PROG,
        description="Run an Anvil cluster of several nodes on this machine, for trying it out.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    start = commands.add_parser(
        "start",
        help="start a cluster (or start again the one in --dir) and supervise it until Ctrl-C",
    )
    start.add_argument("--dir", required=True, metavar="DIR", help="the cluster's directory")
    start.add_argument("--nodes", type=int, metavar="N", help=f"number of nodes (default {DEFAULT_NODES})")
    start.add_argument(
        "--base-port",
        type=int,
        metavar="P",
        help=f"node I serves S3 on P+I and its cluster listener on P+{CLUSTER_PORT_OFFSET}+I "
        f"(default {DEFAULT_BASE_PORT})",
    )
    start.add_argument("--k", type=int, metavar="K", help="data shards (default 4)")
    start.add_argument("--m", type=int, metavar="M", help="parity shards (default 2)")
    start.add_argument("--region", metavar="NAME", help=f"the cluster's region (default {DEFAULT_REGION})")
    start.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a further setting for every node (repeatable), e.g. ANVIL_STRIPE_SIZE=262144",
    )
    start.add_argument(
        "--timeout", type=float, default=120.0, metavar="SECONDS", help="how long nodes may take to be ready"
    )

    for name, help in (
        ("stop-node", "stop node I (SIGTERM, or SIGKILL with --kill)"),
        ("start-node", "start node I again"),
        ("env", "print export lines with node I's environment (for anvil-admin)"),
    ):
        sub = commands.add_parser(name, help=help)
        sub.add_argument("dir", metavar="DIR")
        sub.add_argument("index", type=int, metavar="I", help="the node's number, from 1")
        if name == "stop-node":
            sub.add_argument("--kill", action="store_true", help="SIGKILL instead of SIGTERM")
        if name == "start-node":
            sub.add_argument("--no-wait", action="store_true", help="do not wait until it is ready")
            sub.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS")

    status = commands.add_parser("status", help="show the nodes and whether they are ready")
    status.add_argument("dir", metavar="DIR")
    status.add_argument("--json", action="store_true", help="print JSON")

    stop = commands.add_parser("stop", help="stop the whole cluster (its supervisor, or the nodes and PostgreSQL)")
    stop.add_argument("dir", metavar="DIR")
    return parser


def _cmd_start(args: argparse.Namespace, out: TextIO) -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    cluster = LocalCluster(args.dir, out)
    try:
        try:
            state = cluster.start(
                nodes=args.nodes,
                base_port=args.base_port,
                k=args.k,
                m=args.m,
                region=args.region,
                extra_env=parse_env_assignments(args.env),
                timeout=args.timeout,
                stop=stop,
            )
        except LocalClusterError:
            if stop.is_set():
                out.write("Interrupted; everything started was stopped.\n")
                return 0
            raise
        out.write("\n" + usage_text(state) + "\n")
        out.flush()
        cluster.supervise(stop)
        cluster.shutdown()
        out.write("Cluster stopped.\n")
        return 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _cmd_stop_node(args: argparse.Namespace, out: TextIO) -> int:
    pid = LocalCluster(args.dir, out).stop_node(args.index, kill=args.kill)
    if pid is None:
        out.write(f"Node {args.index} is not running.\n")
    else:
        how = "Killed" if args.kill else "Stopped"
        out.write(f"{how} node {args.index} (pid {pid}).\n")
    return 0


def _cmd_start_node(args: argparse.Namespace, out: TextIO) -> int:
    cluster = LocalCluster(args.dir, out)
    pid = cluster.start_node(args.index, wait=not args.no_wait, timeout=args.timeout)
    record = node_record(load_state(cluster.root), args.index)
    state = "started" if args.no_wait else "ready"
    out.write(f"Node {args.index} {state} (pid {pid}, {record['api_url']}).\n")
    return 0


def _cmd_env(args: argparse.Namespace, out: TextIO) -> int:
    record = node_record(load_state(os.path.abspath(args.dir)), args.index)
    if not record.get("env"):
        raise LocalClusterError(f"node {args.index} has never been started.")
    for line in export_lines(record["env"]):
        out.write(line + "\n")
    return 0


def _cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    state = load_state(os.path.abspath(args.dir))
    rows = status_rows(state)
    if args.json:
        out.write(json.dumps({"state": state.get("state"), "dir": state["dir"], "nodes": rows}, indent=2) + "\n")
        return 0
    supervisor = state.get("supervisor_pid")
    running = process_alive(supervisor) and state.get("state") != "stopped"
    out.write(
        f"Cluster in {state['dir']}: {state.get('state')}"
        + (f" (supervisor pid {supervisor})" if running else "")
        + "\n"
    )
    out.write(f"  {'node':<4}  {'state':<8}  {'pid':<7}  {'S3 endpoint':<23}  cluster address\n")
    for row in rows:
        out.write(
            f"  {row['index']:<4}  {row['state']:<8}  {row['pid']!s:<7}  {row['api_url']:<23}  {row['cluster_addr']}\n"
        )
    return 0


def _cmd_stop(args: argparse.Namespace, out: TextIO) -> int:
    root = os.path.abspath(args.dir)
    state = load_state(root)
    supervisor = state.get("supervisor_pid")
    if supervisor and supervisor != os.getpid() and process_alive(supervisor):
        os.kill(supervisor, signal.SIGTERM)
        if not wait_gone(supervisor, STOP_TIMEOUT + 30):
            raise LocalClusterError(f"the supervisor (pid {supervisor}) did not stop.")
        out.write("Cluster stopped.\n")
        return 0
    LocalCluster(root, out).shutdown()
    out.write("Cluster stopped.\n")
    return 0


_COMMANDS = {
    "start": _cmd_start,
    "stop-node": _cmd_stop_node,
    "start-node": _cmd_start_node,
    "env": _cmd_env,
    "status": _cmd_status,
    "stop": _cmd_stop,
}


def run(argv: Sequence[str], out: TextIO, err: TextIO) -> int:
    """
    Run one command.

    @param argv: the arguments, without the program name.
    @return: the exit status: 0, or 2 after printing one error line.
    """
    try:
        args = build_parser().parse_args(list(argv))
        return _COMMANDS[args.command](args, out)
    except LocalClusterError as e:
        err.write(f"{PROG}: error: {' '.join(str(e).split())}\n")
        return EXIT_ERROR


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """
    The C{anvil-local-cluster} console script.
    """
    raise SystemExit(run(sys.argv[1:] if argv is None else argv, sys.stdout, sys.stderr))


if __name__ == "__main__":
    main()
