# -*- test-case-name: tests.integration.test_cluster_e2e -*-
"""
A harness for multi-node tests: N real C{twistd -n --pidfile= anvil}
processes forming one cluster on one real PostgreSQL.

The nodes share the suite's PostgreSQL (L{tests.pg.test_postgres}) through
two fresh databases (global and regional) created for the test and dropped
after it, and are started exactly as the cluster contract says (issue 4):
C{GLOBAL_DATABASE_URL}, C{REGIONAL_DATABASE_URL}, C{REGION},
C{ANVIL_SECRET_ENCRYPTION_KEY}, C{CLUSTER_SECRET}, their own
C{ANVIL_DATA_DIR}, C{API_LISTEN_ADDR}, C{CLUSTER_LISTEN_ADDR},
C{PUBLIC_API_ADDR}, C{PUBLIC_CLUSTER_ADDRS}, and C{INIT_CLUSTER=true} for
the first node, C{BOOTSTRAP_ADDRS} (the first node's cluster address) for
the others.  Gossip timers are shortened (L{FAST_GOSSIP}) so failure
detection takes about a second.

Each node is a L{tests.integration.nodeproc.NodeProcess} (composition: the
harness only adds the cluster settings), so starting, waiting for
C{/ready}, SIGTERM and SIGKILL behave as in the single-node tests; nodes
start in parallel.

Tests talk to the nodes over real sockets with blocking calls (boto3,
C{anvil-admin cluster status --json} subprocesses): they are
L{SynchronousTestCase}s, and the nodes are other processes.
"""

from __future__ import annotations

import glob
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import psycopg2
from twisted.trial.unittest import SynchronousTestCase

from anvil.storage.placement import ShardMap
from tests.integration.nodeproc import ADMIN, NodeProcess, child_env, short_tmpdir

T = TypeVar("T")

#: Gossip settings that make failure detection fast: a probe every 0.2 s,
#: 0.1 s for an ack, dead one second after suspicion.
FAST_GOSSIP: dict[str, str] = {
    "ANVIL_GOSSIP_PERIOD": "0.2",
    "ANVIL_GOSSIP_ACK_TIMEOUT": "0.1",
    "ANVIL_GOSSIP_INDIRECT_PROBES": "2",
    "ANVIL_SUSPICION_TIMEOUT": "1",
    "ANVIL_PEER_TIMEOUT": "5",
}

#: Gossip at the default pace, which tolerates a loaded machine (the tests
#: run beside others): a member is declared dead five seconds after it is
#: suspected, so a busy node is not mistaken for a dead one (whose shards
#: readers skip and a repair takes for gone). For tests that do not wait
#: for a failure to be detected quickly.
PATIENT_GOSSIP: dict[str, str] = {
    "ANVIL_GOSSIP_PERIOD": "1",
    "ANVIL_GOSSIP_ACK_TIMEOUT": "0.5",
    "ANVIL_GOSSIP_INDIRECT_PROBES": "2",
    "ANVIL_SUSPICION_TIMEOUT": "5",
    "ANVIL_PEER_TIMEOUT": "10",
}

#: A committed shard file: <hash>.<index> (temporaries end in .tmp).
_SHARD_FILE = re.compile(r"^[0-9a-f]{64}\.[0-9]{1,3}$")


class _Fatal(Exception):
    """
    Raised by a L{wait_until} check when waiting longer cannot help.
    """


def wait_until(
    check: Callable[[], T | None],
    timeout: float,
    what: str,
    interval: float = 0.2,
) -> T:
    """
    Call C{check} until it returns something truthy.

    @param what: what is awaited, for the failure message.
    @return: that value.
    @raise AssertionError: after C{timeout} seconds, naming C{what} and the
        last value (or exception) seen.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = check()
        except _Fatal as e:
            raise AssertionError(f"{what}: {e}") from None
        except Exception as e:  # noqa: BLE001 - reported if it never succeeds
            value, last = None, e
        else:
            last = value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout:.1f} s (last: {last!r})")
        time.sleep(interval)


class ClusterNode:
    """
    One node of a L{Cluster}: a L{NodeProcess} plus its cluster settings.

    @ivar index: the node's number in the cluster, from 1.
    @ivar proc: the process wrapper; C{proc.env} is the node's environment.
    """

    def __init__(self, cluster: "Cluster", index: int, data_dir: str, env: Mapping[str, str]) -> None:
        self.cluster = cluster
        self.index = index
        self.proc = NodeProcess(cluster.testcase, data_dir, env=env)
        self.proc.env.update(
            {
                "PUBLIC_API_ADDR": self.url,
                "PUBLIC_CLUSTER_ADDRS": self.cluster_addr,
            }
        )

    def __repr__(self) -> str:
        return f"<node {self.index} {self.url} {self.data_dir}>"

    # -- addresses

    @property
    def data_dir(self) -> str:
        """The node's data directory."""
        return self.proc.data_dir

    @property
    def env(self) -> dict[str, str]:
        """The node's full environment (what C{anvil-admin} gets too)."""
        return self.proc.env

    @property
    def url(self) -> str:
        """The S3 endpoint."""
        return self.proc.url

    @property
    def cluster_addr(self) -> str:
        """The cluster listener's host:port."""
        return f"127.0.0.1:{self.proc.cluster_port}"

    @property
    def node_id(self) -> str:
        """The id kept in C{<data dir>/node_id} (after the first start)."""
        with open(os.path.join(self.data_dir, "node_id")) as f:
            return f.read().strip()

    # -- joining

    def set_join(self, init: bool, bootstrap: Iterable[str]) -> None:
        """
        How the next start finds the cluster: C{INIT_CLUSTER} and/or
        C{BOOTSTRAP_ADDRS}.
        """
        self.proc.env.pop("INIT_CLUSTER", None)
        self.proc.env.pop("BOOTSTRAP_ADDRS", None)
        if init:
            self.proc.env["INIT_CLUSTER"] = "true"
        addrs = ",".join(bootstrap)
        if addrs:
            self.proc.env["BOOTSTRAP_ADDRS"] = addrs

    # -- lifecycle

    @property
    def running(self) -> bool:
        """Whether the process runs."""
        return self.proc.process is not None and self.proc.process.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id while it runs."""
        return self.proc.process.pid if self.running and self.proc.process else None

    def start(self) -> "ClusterNode":
        """Start the process (without waiting)."""
        self.proc.start()
        return self

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Wait until C{/ready} answers 200."""
        self.proc.wait_ready(timeout)

    def stop(self, timeout: float = 30.0) -> int:
        """
        SIGTERM (a graceful leave) and wait.

        @return: the exit status.
        """
        return self.proc.terminate(timeout)

    def kill(self) -> None:
        """SIGKILL (a crash) and reap."""
        assert self.proc.process is not None
        self.proc.process.send_signal(signal.SIGKILL)
        self.proc.process.wait(30)

    def restart(self, timeout: float = 90.0) -> None:
        """
        Start a stopped node again, joining through every other node (any
        of them may be the one that is down), and wait until it is ready.
        """
        assert not self.running, f"{self} is running"
        self.set_join(False, [n.cluster_addr for n in self.cluster.nodes if n is not self])
        self.start()
        self.wait_ready(timeout)

    # -- looking inside

    def output(self) -> str:
        """The node's log."""
        return self.proc.output()

    def log_tail(self, lines: int = 40) -> str:
        """The end of the node's log, for failure messages."""
        return "\n".join(self.output().splitlines()[-lines:])

    def shard_files(self) -> list[str]:
        """Committed shard files under the node's data directory."""
        found = []
        for path in glob.glob(os.path.join(self.data_dir, "**", "*"), recursive=True):
            if _SHARD_FILE.match(os.path.basename(path)) and os.path.isfile(path):
                found.append(path)
        return found

    def shard_hashes(self) -> set[str]:
        """Content hashes (hex) of which this node holds at least one shard."""
        return {os.path.basename(p).split(".")[0] for p in self.shard_files()}

    def admin(self, *args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """
        Run C{anvil-admin ARGS} with this node's environment.

        @raise AssertionError: when it fails and C{check} is set.
        """
        result = subprocess.run(
            ADMIN + list(args),
            env=self.env,
            cwd=self.data_dir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"anvil-admin {' '.join(args)} as node {self.index} failed "
                f"({result.returncode}): {result.stderr.strip()}"
            )
        return result


class Cluster:
    """
    N nodes on one PostgreSQL (two fresh databases), started in parallel.

    @ivar nodes: the nodes, C{nodes[0]} being node 1 (C{INIT_CLUSTER}).
    @ivar env: the settings every node shares.
    @ivar gossip: the gossip settings in force (seconds, as floats).
    """

    def __init__(
        self,
        testcase: SynchronousTestCase,
        size: int,
        *,
        k: int = 4,
        m: int = 2,
        region: str = "us-east-1",
        env: Mapping[str, str] | None = None,
        gossip: Mapping[str, str] = FAST_GOSSIP,
    ) -> None:
        """
        @param size: the number of nodes.
        @param env: further settings for every node (they win).
        """
        from tests.pg import fresh_database

        self.testcase = testcase
        self.region = region
        self.k, self.m = k, m
        self.root = short_tmpdir(testcase)
        # Runs after the nodes are stopped and before the directory goes.
        testcase.addCleanup(self.keep_logs)
        self.env: dict[str, str] = {
            "GLOBAL_DATABASE_URL": fresh_database(testcase, "cg"),
            "REGIONAL_DATABASE_URL": fresh_database(testcase, "cr"),
            "REGION": region,
            "ANVIL_SECRET_ENCRYPTION_KEY": secrets.token_hex(32),
            "CLUSTER_SECRET": secrets.token_urlsafe(24),
            "ANVIL_ERASURE_K": str(k),
            "ANVIL_ERASURE_M": str(m),
            **gossip,
            **(env or {}),
        }
        self.gossip = {
            "period": float(self.env.get("ANVIL_GOSSIP_PERIOD", "1.0")),
            "ack_timeout": float(self.env.get("ANVIL_GOSSIP_ACK_TIMEOUT", "0.5")),
            "suspicion_timeout": float(self.env.get("ANVIL_SUSPICION_TIMEOUT", "5.0")),
        }
        self.nodes: list[ClusterNode] = []
        self._strangers = 0
        self._stranger_nodes: list[ClusterNode] = []
        for _ in range(size):
            self.new_node()
        self.nodes[0].set_join(True, [])
        for node in self.nodes[1:]:
            node.set_join(False, [self.nodes[0].cluster_addr])
        self._credentials: dict[str, str] | None = None

    def new_node(self, env: Mapping[str, str] | None = None, member: bool = True) -> ClusterNode:
        """
        Prepare another node with the cluster's settings (plus C{env}); it
        joins through node 1 unless told otherwise with L{ClusterNode.set_join}.

        @param member: whether it belongs in L{nodes} (a stranger that must
            not get in does not).
        """
        if member:
            index = len(self.nodes) + 1
        else:
            self._strangers += 1
            index = 100 + self._strangers
        data_dir = os.path.join(self.root, f"node-{index}")
        os.makedirs(data_dir, mode=0o700)
        node = ClusterNode(self, index, data_dir, {**self.env, **(env or {})})
        if self.nodes:
            node.set_join(False, [self.nodes[0].cluster_addr])
        if member:
            self.nodes.append(node)
        else:
            self._stranger_nodes.append(node)
        return node

    # -- lifecycle

    def start(self, timeout: float = 90.0, converge: bool = True) -> "Cluster":
        """
        Start every node at once and wait until each is ready and, with
        C{converge}, until every node sees every other alive.
        """
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.wait_ready(timeout)
        if converge:
            self.wait_converged(timeout)
        return self

    def running(self) -> list[ClusterNode]:
        """The nodes whose process runs."""
        return [n for n in self.nodes if n.running]

    def wait_converged(self, timeout: float = 60.0, nodes: list[ClusterNode] | None = None) -> None:
        """
        Wait until each of C{nodes} (default: the running ones) sees all of
        them alive.
        """
        nodes = nodes if nodes is not None else self.running()
        expected = {n.node_id for n in nodes}

        def converged(node: ClusterNode) -> bool:
            if not node.running:
                raise _Fatal(f"node {node.index} exited:\n{node.log_tail()}")
            return expected <= self.alive_ids(node)

        for node in nodes:
            wait_until(
                lambda: converged(node),
                timeout,
                f"node {node.index} seeing {len(expected)} members alive",
                interval=0.3,
            )

    # -- cluster status

    def cluster_status(self, node: ClusterNode) -> dict[str, Any]:
        """
        C{anvil-admin cluster status --json} run with C{node}'s environment.

        @return: the parsed document (C{members}: node_id, region, state,
            api_addr, cluster_addr).
        """
        result = node.admin("cluster", "status", "--json")
        try:
            document: dict[str, Any] = json.loads(result.stdout)
        except ValueError:
            raise AssertionError(f"cluster status --json printed no JSON: {result.stdout!r}") from None
        return document

    def members(self, node: ClusterNode) -> dict[str, dict[str, Any]]:
        """node id -> member record, as C{node} sees them."""
        return {m["node_id"]: m for m in self.cluster_status(node)["members"]}

    def states(self, node: ClusterNode) -> dict[str, str]:
        """node id -> state, as C{node} sees them."""
        return {i: m["state"] for i, m in self.members(node).items()}

    def alive_ids(self, node: ClusterNode) -> set[str]:
        """The node ids C{node} sees alive."""
        return {i for i, s in self.states(node).items() if s == "alive"}

    def shard_maps(self) -> dict[str, ShardMap]:
        """
        Content hash to its recorded shard map, for every content with
        shards (the regional database's C{contents.shard_map}).
        """
        conn = psycopg2.connect(self.env["REGIONAL_DATABASE_URL"], connect_timeout=10)
        try:
            with conn.cursor() as cursor:
                cursor.execute("SELECT hash, shard_map FROM contents WHERE inline_data IS NULL")
                rows = cursor.fetchall()
        finally:
            conn.close()
        maps = {h: ShardMap.from_json(m or {}) for h, m in rows}
        return {h: m for h, m in maps.items() if m.targets}

    # -- S3

    def credentials(self) -> dict[str, str]:
        """
        An app allowed everything in tenant C{acme}, made once with
        C{anvil-admin} (with node 1's environment).
        """
        if self._credentials is None:
            admin = self.nodes[0].admin
            admin("tenant", "create", "acme")
            app = json.loads(admin("app", "create", "--tenant-name", "acme", "--app-name", "tester", "--json").stdout)
            admin("policy", "grant", "--app-name", "tester", "--action", "*", "--resource", "*")
            self._credentials = {"access_key_id": app["client_id"], "secret_access_key": app["client_secret"]}
        return self._credentials

    def client(self, node: ClusterNode | None = None, read_timeout: float = 60.0) -> Any:
        """
        A boto3 S3 client for C{node}'s endpoint (default node 1), path
        style, without retries (a failure must show, not be retried away).
        """
        import boto3
        from botocore.config import Config

        creds = self.credentials()
        node = node or self.nodes[0]
        return boto3.session.Session().client(
            "s3",
            endpoint_url=node.url,
            region_name=self.region,
            aws_access_key_id=creds["access_key_id"],
            aws_secret_access_key=creds["secret_access_key"],
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 1, "mode": "standard"},
                connect_timeout=10,
                read_timeout=read_timeout,
            ),
        )

    def keep_logs(self) -> None:
        """
        Copy every node's log to C{cluster-logs/<test id>/} in the trial
        working directory, for looking into failures after the data dirs
        are gone.
        """
        target = os.path.join(os.getcwd(), "cluster-logs", self.testcase.id())
        os.makedirs(target, exist_ok=True)
        for node in self.nodes + self._stranger_nodes:
            if os.path.exists(node.proc.log_path):
                shutil.copy(node.proc.log_path, os.path.join(target, f"node-{node.index}.log"))

    def logs(self) -> str:
        """The tails of every node's log, for failure messages."""
        return "\n".join(f"--- node {n.index} ({n.data_dir}) ---\n{n.log_tail()}" for n in self.nodes)


def foreign_ca_files(directory: str) -> tuple[str, str]:
    """
    Write a CA unrelated to any cluster (certificate and key PEM files) for
    C{ANVIL_CLUSTER_CA_CERT} and C{ANVIL_CLUSTER_CA_KEY}.

    @return: the two paths.
    """
    from anvil.cluster.ca import ClusterCA

    ca = ClusterCA.generate(time.time())
    os.makedirs(directory, mode=0o700, exist_ok=True)
    cert, key = os.path.join(directory, "ca.pem"), os.path.join(directory, "ca.key")
    with open(cert, "wb") as f:
        f.write(ca.certificate_pem())
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(ca.private_key_pem())
    return cert, key


__all__ = ["Cluster", "ClusterNode", "FAST_GOSSIP", "PATIENT_GOSSIP", "child_env", "foreign_ca_files", "wait_until"]
