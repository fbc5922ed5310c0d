# -*- test-case-name: tests.test_local_cluster -*-
"""
Tests for L{anvil.scripts.local_cluster}: the environment each node gets,
how nodes join on first and later starts, argument and error handling, the
state file, and one real two-node cluster started, driven and stopped as a
user would.
"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time

import psycopg2.extensions
from twisted.trial.unittest import SynchronousTestCase

from anvil.scripts import local_cluster as lc
from tests.integration import nodeproc
from tests.integration.nodeproc import SOURCE_ROOT, child_env, http, postgres_processes, short_tmpdir


def env_of(index: int, init: bool = False, bootstrap: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """Node C{index}'s environment in a cluster at base port 30000."""
    return lc.node_env(
        root="/tmp/c",
        index=index,
        base_port=30000,
        region="eu-west-3",
        global_url="postgresql://g",
        regional_url="postgresql://r",
        encryption_key="ab" * 32,
        cluster_secret="s3cret",
        k=4,
        m=2,
        init=init,
        bootstrap=bootstrap,
        extra=extra,
    )


class NodeEnvTests(SynchronousTestCase):
    """
    The environment of a node follows the cluster contract.
    """

    def test_first_node(self) -> None:
        """
        Node 1 gets every contract variable, its own ports and data dir, and
        C{INIT_CLUSTER=true} without bootstrap addresses.
        """
        self.assertEqual(
            env_of(1, init=True),
            {
                "GLOBAL_DATABASE_URL": "postgresql://g",
                "REGIONAL_DATABASE_URL": "postgresql://r",
                "REGION": "eu-west-3",
                "ANVIL_SECRET_ENCRYPTION_KEY": "ab" * 32,
                "CLUSTER_SECRET": "s3cret",
                "ANVIL_DATA_DIR": "/tmp/c/node-1",
                "API_LISTEN_ADDR": "tcp:30001:interface=127.0.0.1",
                "CLUSTER_LISTEN_ADDR": "tcp:30101:interface=127.0.0.1",
                "PUBLIC_API_ADDR": "http://127.0.0.1:30001",
                "PUBLIC_CLUSTER_ADDRS": "127.0.0.1:30101",
                "ANVIL_ERASURE_K": "4",
                "ANVIL_ERASURE_M": "2",
                "INIT_CLUSTER": "true",
            },
        )

    def test_joining_node_and_extra(self) -> None:
        """
        A joining node has C{BOOTSTRAP_ADDRS} and no C{INIT_CLUSTER};
        extra settings are added and win over the defaults.
        """
        env = env_of(3, bootstrap=("127.0.0.1:30101", "127.0.0.1:30102"), ANVIL_ERASURE_M="1", ANVIL_STRIPE_SIZE="65536")
        self.assertNotIn("INIT_CLUSTER", env)
        self.assertEqual(env["BOOTSTRAP_ADDRS"], "127.0.0.1:30101,127.0.0.1:30102")
        self.assertEqual(env["API_LISTEN_ADDR"], "tcp:30003:interface=127.0.0.1")
        self.assertEqual(env["PUBLIC_CLUSTER_ADDRS"], "127.0.0.1:30103")
        self.assertEqual(env["ANVIL_ERASURE_M"], "1")
        self.assertEqual(env["ANVIL_STRIPE_SIZE"], "65536")

    def test_env_is_valid_configuration(self) -> None:
        """
        The node's environment passes the node's own configuration checks.
        """
        from anvil.config import load_config

        config = load_config({}, env_of(2, bootstrap=(lc.cluster_addr(30000, 1),)))
        self.assertEqual(config.cluster.bootstrap_addrs, ("127.0.0.1:30101",))
        self.assertEqual(config.cluster.public_addrs, ("127.0.0.1:30102",))
        self.assertEqual(config.node.data_dir, "/tmp/c/node-2")
        self.assertFalse(config.embedded)

    def test_database_url(self) -> None:
        """
        The database URLs reach the cluster's PostgreSQL over its Unix
        socket, as libpq understands them.
        """
        url = lc.database_url("/tmp/c/run", 5432, "anvil_global", "anvil")
        self.assertEqual(
            psycopg2.extensions.parse_dsn(url),
            {"host": "/tmp/c/run", "port": "5432", "dbname": "anvil_global", "user": "anvil"},
        )
        self.assertEqual(lc.regional_database_name("eu-west-3"), "anvil_regional_eu_west_3")


class JoinPlanTests(SynchronousTestCase):
    """
    How nodes find the cluster on each kind of start.
    """

    def test_first_start(self) -> None:
        """
        On the first start node 1 initialises the cluster and the others
        join through node 1.
        """
        self.assertEqual(lc.join_plan(3, 30000, 1, whole_cluster=True, first=True), (True, []))
        self.assertEqual(lc.join_plan(3, 30000, 3, whole_cluster=True, first=True), (False, ["127.0.0.1:30101"]))

    def test_single_restart(self) -> None:
        """
        A node restarted alone, node 1 included, joins through all the
        others and never initialises a second cluster.
        """
        self.assertEqual(
            lc.join_plan(3, 30000, 1, whole_cluster=False, first=False),
            (False, ["127.0.0.1:30102", "127.0.0.1:30103"]),
        )
        self.assertEqual(
            lc.join_plan(3, 30000, 2, whole_cluster=False, first=False),
            (False, ["127.0.0.1:30101", "127.0.0.1:30103"]),
        )

    def test_whole_cluster_restart(self) -> None:
        """
        When the whole cluster starts again node 1 initialises it and the
        others join through every other node.
        """
        self.assertEqual(lc.join_plan(3, 30000, 1, whole_cluster=True, first=False), (True, []))
        self.assertEqual(
            lc.join_plan(3, 30000, 3, whole_cluster=True, first=False),
            (False, ["127.0.0.1:30101", "127.0.0.1:30102"]),
        )


class HelperTests(SynchronousTestCase):
    """
    Argument helpers and the child environment.
    """

    def test_parse_env_assignments(self) -> None:
        """
        C{--env KEY=VALUE} items become a dict; values may hold C{=} or be
        empty.
        """
        self.assertEqual(
            lc.parse_env_assignments(["A=1", "B=x=y", "C="]), {"A": "1", "B": "x=y", "C": ""}
        )
        for bad in ("novalue", "=1"):
            self.assertRaises(lc.LocalClusterError, lc.parse_env_assignments, [bad])

    def test_check_layout(self) -> None:
        """
        Node counts, erasure parameters and ports out of range are refused
        with the option named.
        """
        lc.check_layout(6, 19000, 4, 2)
        for args, option in (
            ((0, 19000, 4, 2), "--nodes"),
            ((100, 19000, 4, 2), "--nodes"),
            ((3, 19000, 0, 2), "--k"),
            ((3, 65500, 4, 2), "--base-port"),
            ((3, 80, 4, 2), "--base-port"),
        ):
            with self.assertRaises(lc.LocalClusterError) as caught:
                lc.check_layout(*args)
            self.assertIn(option, str(caught.exception))

    def test_child_environ(self) -> None:
        """
        A node's process inherits the caller's environment minus every
        Anvil setting, gets the node's settings, and finds this checkout's
        C{anvil} first on C{PYTHONPATH}.
        """
        base = {
            "PATH": "/bin",
            "PYTHONPATH": "/elsewhere",
            "ANVIL_DATA_DIR": "/wrong",
            "GLOBAL_DATABASE_URL": "postgresql://wrong",
            "BOOTSTRAP_ADDRS": "10.0.0.1:1",
            "REGION": "wrong",
        }
        env = lc.child_environ(base, {"REGION": "eu-west-3", "ANVIL_DATA_DIR": "/right"})
        self.assertEqual(env["PATH"], "/bin")
        self.assertEqual(env["REGION"], "eu-west-3")
        self.assertEqual(env["ANVIL_DATA_DIR"], "/right")
        self.assertNotIn("GLOBAL_DATABASE_URL", env)
        self.assertNotIn("BOOTSTRAP_ADDRS", env)
        self.assertEqual(env["PYTHONPATH"], SOURCE_ROOT + os.pathsep + "/elsewhere")

    def test_export_lines(self) -> None:
        """
        C{env} prints one shell-quoted C{export} per variable, sorted.
        """
        self.assertEqual(
            lc.export_lines({"B": "two words", "A": "x&y", "C": "plain"}),
            ["export A='x&y'", "export B='two words'", "export C=plain"],
        )

    def test_twistd_argv(self) -> None:
        """
        Nodes run C{twistd -n --pidfile= anvil} of this Python environment.
        """
        argv = lc.twistd_argv()
        self.assertEqual(argv[-3:], ["-n", "--pidfile=", "anvil"])
        self.assertTrue(argv[0] == sys.executable or argv[0].startswith(os.path.dirname(sys.executable)))


def run(*argv: str) -> tuple[int, str, str]:
    """Run the command in-process; return status, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    status = lc.run(list(argv), out, err)
    return status, out.getvalue(), err.getvalue()


class CommandLineTests(SynchronousTestCase):
    """
    Errors are one line with status 2; the state file and the commands
    reading it.
    """

    def assertOneLineError(self, result: tuple[int, str, str], *words: str) -> None:
        """The command failed with status 2 and one error line holding C{words}."""
        status, out, err = result
        self.assertEqual(status, 2, (out, err))
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith("anvil-local-cluster: error: "), err)
        for word in words:
            self.assertIn(word, err)

    def test_usage_errors(self) -> None:
        """
        Unknown commands, missing and malformed arguments are one line.
        """
        self.assertOneLineError(run())
        self.assertOneLineError(run("explode"), "explode")
        self.assertOneLineError(run("start"), "--dir")
        self.assertOneLineError(run("stop-node", "/tmp/x", "two"), "two")
        self.assertOneLineError(run("start", "--dir", "/tmp/x", "--env", "oops"), "--env")

    def test_missing_cluster(self) -> None:
        """
        Commands on a directory without a cluster say so.
        """
        missing = os.path.join(short_tmpdir(self), "none")
        for command in (("stop-node", missing, "1"), ("start-node", missing, "1"), ("env", missing, "1"), ("status", missing)):
            self.assertOneLineError(run(*command), "cluster.json", "does not exist")

    def test_prepared_state(self) -> None:
        """
        A new cluster's description names every node with its endpoints and
        keys, is readable by its owner only, and commands use it: C{status}
        shows the nodes stopped, C{env} refuses a node never started,
        unknown node numbers and contradicting options are errors.
        """
        root = os.path.join(short_tmpdir(self), "c")
        cluster = lc.LocalCluster(root)
        state, first = cluster.prepare(nodes=3, base_port=31000, k=2, m=1, region=None, extra_env={"X": "1"})
        self.assertTrue(first)
        on_disk = lc.load_state(root)
        self.assertEqual(on_disk, state)
        self.assertEqual(os.stat(lc.state_path(root)).st_mode & 0o777, 0o600)
        self.assertEqual([n["api_url"] for n in state["nodes"]], [f"http://127.0.0.1:{31000 + i}" for i in (1, 2, 3)])
        self.assertEqual([n["cluster_addr"] for n in state["nodes"]], [f"127.0.0.1:{31100 + i}" for i in (1, 2, 3)])
        self.assertEqual(len(state["secrets"]["encryption_key"]), 64)
        int(state["secrets"]["encryption_key"], 16)
        self.assertTrue(state["secrets"]["cluster_secret"])
        self.assertEqual((state["k"], state["m"], state["region"]), (2, 1, "us-east-1"))
        env = cluster.env_for(state, 2, whole_cluster=True, first=True)
        self.assertEqual(env["X"], "1")
        self.assertEqual(env["ANVIL_ERASURE_K"], "2")
        self.assertEqual(env["BOOTSTRAP_ADDRS"], "127.0.0.1:31101")

        status, out, err = run("status", root, "--json")
        self.assertEqual(status, 0, err)
        self.assertEqual([n["state"] for n in json.loads(out)["nodes"]], ["stopped"] * 3)
        self.assertOneLineError(run("env", root, "2"), "never been started")
        self.assertOneLineError(run("stop-node", root, "4"), "no node 4")

        again, first = lc.LocalCluster(root).prepare(nodes=None, base_port=None, k=None, m=None, region=None, extra_env={})
        self.assertFalse(first)
        self.assertEqual(again["secrets"], state["secrets"])
        with self.assertRaises(lc.LocalClusterError) as caught:
            lc.LocalCluster(root).prepare(nodes=4, base_port=None, k=None, m=None, region=None, extra_env={})
        self.assertIn("--nodes 3", str(caught.exception))

    def test_non_empty_directory(self) -> None:
        """
        A directory holding other files and no cluster is refused.
        """
        root = short_tmpdir(self)
        with open(os.path.join(root, "precious"), "w") as f:
            f.write("x")
        self.assertOneLineError(run("start", "--dir", root, "--nodes", "1"), "not empty")


def free_base_port(nodes: int) -> int:
    """A base port whose API and cluster ports for C{nodes} nodes are free now."""
    # In this trial worker's own slice below the ephemeral range, as
    # tests.integration.nodeproc.free_port does.
    low = 20000 + nodeproc._WORKER * nodeproc._SLICE
    for _ in range(200):
        base = random.randrange(low, low + nodeproc._SLICE - 200, 200)
        ports = [lc.api_port(base, i) for i in range(1, nodes + 1)]
        ports += [lc.cluster_port(base, i) for i in range(1, nodes + 1)]
        if not any(lc.port_in_use(p) for p in ports):
            return base
    raise AssertionError("no free ports")


class RealClusterTests(SynchronousTestCase):
    """
    The command as a user runs it.
    """

    def test_start_use_and_stop(self) -> None:
        """
        C{start --nodes 2} brings up PostgreSQL and two ready nodes and
        writes C{cluster.json}; C{stop-node} and C{start-node} stop and
        restart a node; SIGTERM to the command stops the nodes and
        PostgreSQL and leaves no process behind; started again on the same
        directory the cluster has its keys and data, and C{stop} ends it.
        """
        root = os.path.join(short_tmpdir(self), "c")
        base = free_base_port(2)
        command = [sys.executable, "-m", "anvil.scripts.local_cluster"]
        output = open(os.path.join(os.path.dirname(root), "out.log"), "w+")
        self.addCleanup(output.close)
        supervisor = subprocess.Popen(
            command + ["start", "--nodes", "2", "--dir", root, "--base-port", str(base), "--env", "ANVIL_GOSSIP_PERIOD=0.8"],
            env=child_env({}),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

        def cleanup() -> None:
            if supervisor.poll() is None:
                supervisor.kill()
                supervisor.wait()
            subprocess.run(command + ["stop", root], env=child_env({}), capture_output=True, timeout=120)

        self.addCleanup(cleanup)

        state = self.wait_running(supervisor, root, output.name)

        nodes = state["nodes"]
        assert isinstance(nodes, list)
        pids = [n["pid"] for n in nodes]
        for node in nodes:
            self.assertEqual(http("GET", node["api_url"] + "/ready")[0], 200)
            self.assertEqual(node["env"]["ANVIL_DATA_DIR"], node["data_dir"])
        self.assertEqual(nodes[0]["env"]["INIT_CLUSTER"], "true")
        self.assertEqual(nodes[1]["env"]["BOOTSTRAP_ADDRS"], f"127.0.0.1:{base + 101}")
        self.assertEqual(nodes[1]["env"]["ANVIL_GOSSIP_PERIOD"], "0.8")
        creds = state["credentials"]
        assert isinstance(creds, dict)
        self.assertTrue(creds["access_key_id"] and creds["secret_access_key"])
        printed = open(output.name).read()
        self.assertIn(creds["access_key_id"], printed)
        self.assertIn(f"aws --endpoint-url http://127.0.0.1:{base + 1}", printed)

        # The credentials work against any node.
        import boto3

        for node in nodes:
            s3 = boto3.session.Session().client(
                "s3",
                endpoint_url=node["api_url"],
                region_name=creds["region"],
                aws_access_key_id=creds["access_key_id"],
                aws_secret_access_key=creds["secret_access_key"],
            )
            bucket = f"bucket-{node['index']}"
            s3.create_bucket(Bucket=bucket)
            s3.put_object(Bucket=bucket, Key="k", Body=b"hello")
            self.assertEqual(s3.get_object(Bucket=bucket, Key="k")["Body"].read(), b"hello")

        env_lines = subprocess.run(command + ["env", root, "1"], env=child_env({}), capture_output=True, text=True)
        self.assertEqual(env_lines.returncode, 0, env_lines.stderr)
        self.assertIn(f"export ANVIL_DATA_DIR={nodes[0]['data_dir']}", env_lines.stdout)

        stopped = subprocess.run(command + ["stop-node", root, "2", "--kill"], env=child_env({}), capture_output=True, text=True)
        self.assertEqual(stopped.returncode, 0, stopped.stderr)
        self.assertFalse(lc.process_alive(pids[1]))
        self.assertIsNone(http_or_none(nodes[1]["api_url"] + "/"))
        started = subprocess.run(
            command + ["start-node", root, "2"], env=child_env({}), capture_output=True, text=True, timeout=180
        )
        self.assertEqual(started.returncode, 0, started.stderr)
        restarted = lc.load_state(root)["nodes"][1]
        self.assertNotIn("INIT_CLUSTER", restarted["env"])
        self.assertEqual(restarted["env"]["BOOTSTRAP_ADDRS"], f"127.0.0.1:{base + 101}")
        self.assertEqual(http("GET", nodes[1]["api_url"] + "/ready")[0], 200)
        # The supervisor started it, so it reaps it and stops it with the rest.
        with open(f"/proc/{restarted['pid']}/stat") as f:
            self.assertEqual(int(f.read().rpartition(")")[2].split()[1]), supervisor.pid)

        supervisor.send_signal(signal.SIGTERM)
        self.assertEqual(supervisor.wait(90), 0, open(output.name).read())
        for pid in pids + [restarted["pid"]]:
            # Gone, not even a zombie: the supervisor reaped every node.
            self.assertFalse(os.path.exists(f"/proc/{pid}"), f"pid {pid} is left")
        self.assertEqual(postgres_processes(root), [])
        self.assertEqual(lc.load_state(root)["state"], "stopped")
        self.assertIn("Cluster stopped.", open(output.name).read())

        # Started again on the same directory, the cluster keeps its keys,
        # credentials and data; 'stop' ends it through its supervisor.
        again = subprocess.Popen(
            command + ["start", "--dir", root],
            env=child_env({}),
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.addCleanup(lambda: again.poll() is None and (again.kill(), again.wait()))
        restarted_state = self.wait_running(again, root, output.name)
        self.assertEqual(restarted_state["credentials"], creds)
        self.assertEqual(restarted_state["secrets"], state["secrets"])
        self.assertEqual(restarted_state["nodes"][1]["env"]["BOOTSTRAP_ADDRS"], f"127.0.0.1:{base + 101}")
        self.assertEqual(s3.get_object(Bucket=f"bucket-{nodes[-1]['index']}", Key="k")["Body"].read(), b"hello")
        stop = subprocess.run(command + ["stop", root], env=child_env({}), capture_output=True, text=True, timeout=120)
        self.assertEqual(stop.returncode, 0, stop.stderr)
        self.assertEqual(again.wait(30), 0)
        self.assertEqual(postgres_processes(root), [])
        for record in restarted_state["nodes"]:
            self.assertFalse(os.path.exists(f"/proc/{record['pid']}"))

    def wait_running(self, supervisor: subprocess.Popen[bytes], root: str, output: str) -> dict[str, object]:
        """
        Wait until the cluster's state file says C{running}, failing if the
        command exits first.

        @return: the state.
        """
        deadline = time.monotonic() + 180
        state: dict[str, object] = {}
        while time.monotonic() < deadline:
            self.assertIsNone(supervisor.poll(), open(output).read())
            try:
                state = lc.load_state(root)
            except lc.LocalClusterError:
                state = {}
            if state.get("state") == "running" and state.get("supervisor_pid") == supervisor.pid:
                return state
            time.sleep(0.3)
        self.fail(f"not running after 180 s:\n{open(output).read()}")


def http_or_none(url: str) -> int | None:
    """The status of a GET of C{url}, or C{None} when nothing listens."""
    try:
        return http("GET", url, timeout=2)[0]
    except OSError:
        return None
