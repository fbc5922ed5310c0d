# -*- test-case-name: tests.integration.test_twistd -*-
"""
End-to-end tests of real C{twistd -n --pidfile= anvil} processes on the
embedded default: start-up, health endpoints, admin CLI against a running
node, readiness while PostgreSQL goes away and comes back, SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from anvil.config import KEYS
from anvil.meta.embedded import EmbeddedPostgres
from tests.integration.nodeproc import (
    TWISTD,
    NodeProcess,
    child_env,
    http,
    postgres_processes,
    short_tmpdir,
)


class EmbeddedNodeTests(SynchronousTestCase):
    """
    A node on the embedded default, driven as an operator would.
    """

    def test_health_ready_metrics_and_sigterm(self) -> None:
        """
        A fresh node becomes ready, answers C{/}, C{/ready} and C{/metrics},
        writes its credentials (mode 0600), and on SIGTERM exits 0 leaving no
        PostgreSQL process behind.
        """
        data_dir = short_tmpdir(self)
        node = NodeProcess(self, data_dir).start()
        node.wait_ready(60)

        status, headers, body = http("GET", node.url + "/")
        self.assertEqual(status, 200)
        self.assertTrue(headers.get("x-amz-request-id"))
        status, _, body = http("GET", node.url + "/ready")
        self.assertEqual((status, body.strip()), (200, b"ready"))

        status, headers, body = http("GET", node.url + "/metrics")
        self.assertEqual(status, 200)
        self.assertIn("text/plain", headers["content-type"])
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        self.assertIn("anvil_api_requests", families)
        self.assertIn("anvil_api_request_duration_seconds", families)
        self.assertIn("process_resident_memory_bytes", families)
        health = [
            s.value
            for s in families["anvil_api_requests"].samples
            if s.name == "anvil_api_requests_total"
            and s.labels.get("operation") == "Health"
            and s.labels.get("status") == "2xx"
        ]
        self.assertEqual(health, [1.0])
        # Gauges refreshed by the node's loops, not per scrape.
        self.assertEqual(
            [s.value for s in families["anvil_cluster_members"].samples
             if s.labels["state"] == "alive"],
            [1.0],
        )
        capacity = families["anvil_storage_capacity_bytes"].samples
        self.assertEqual([s.labels["path"] for s in capacity], [data_dir])
        self.assertGreater(capacity[0].value, 0)
        self.assertIn("anvil_gc_passes", families)

        path = os.path.join(data_dir, "credentials.json")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        credentials = node.credentials()
        for key in ("access_key_id", "secret_access_key", "region", "endpoint"):
            self.assertTrue(credentials[key], key)
        self.assertEqual(credentials["region"], "us-east-1")
        self.assertEqual(credentials["endpoint"], node.url)
        self.assertIn(path, node.output())
        with open(os.path.join(data_dir, "node_id")) as f:
            self.assertEqual(len(f.read().strip()), 32)

        self.assertTrue(postgres_processes(data_dir))
        self.assertEqual(node.terminate(30), 0)
        self.assertEqual(postgres_processes(data_dir), [])

    def test_admin_cli_while_running_and_restart_reuse(self) -> None:
        """
        C{anvil-admin --data-dir} manages tenants, apps and policies while the
        node runs; a restart reuses the cluster and keeps the credentials and
        what was created.
        """
        data_dir = short_tmpdir(self)
        node = NodeProcess(self, data_dir).start()
        node.wait_ready(60)
        first = node.credentials()

        node.admin("tenant", "create", "acme")
        created = json.loads(
            node.admin("app", "create", "--tenant-name", "acme", "--app-name", "web", "--json").stdout
        )
        self.assertTrue(created["client_id"])
        self.assertTrue(created["client_secret"])
        node.admin("policy", "grant", "--app-name", "web", "--action", "*", "--resource", "*")
        duplicate = node.admin("tenant", "create", "acme", check=False)
        self.assertEqual(duplicate.returncode, 2)
        self.assertEqual(len(duplicate.stderr.strip().splitlines()), 1)
        self.assertEqual(node.terminate(30), 0)

        node2 = NodeProcess(self, data_dir).start()
        node2.wait_ready(60)
        second = node2.credentials()
        self.assertEqual(first["access_key_id"], second["access_key_id"])
        tenants = json.loads(node2.admin("tenant", "list", "--json").stdout)
        names = {t["name"] for t in (tenants["tenants"] if isinstance(tenants, dict) else tenants)}
        self.assertEqual(names, {"default", "acme"})
        self.assertEqual(node2.terminate(30), 0)
        self.assertEqual(postgres_processes(data_dir), [])

    def test_ready_follows_postgres(self) -> None:
        """
        C{/ready} turns 503, naming the databases, while PostgreSQL is down and
        200 again once it is back, without restarting the node; C{/} stays
        200 throughout.
        """
        data_dir = short_tmpdir(self)
        node = NodeProcess(self, data_dir).start()
        node.wait_ready(60)
        server = EmbeddedPostgres.for_data_dir(data_dir)
        server.stop()

        deadline = time.monotonic() + 30
        status, body = 0, b""
        while time.monotonic() < deadline:
            status, _, body = http("GET", node.url + "/ready")
            if status == 503:
                break
            time.sleep(0.2)
        self.assertEqual(status, 503)
        self.assertIn(b"global database", body)
        self.assertIn(b"regional database", body)
        self.assertNotIn(b"membership", body)
        self.assertEqual(http("GET", node.url + "/")[0], 200)

        server.start()
        node.wait_ready(60)
        self.assertEqual(node.terminate(30), 0)

    def test_crash_leaves_stale_pid(self) -> None:
        """
        After the node and its PostgreSQL are killed with SIGKILL (a stale
        C{postmaster.pid} remains), the next start recovers and serves.
        """
        data_dir = short_tmpdir(self)
        node = NodeProcess(self, data_dir).start()
        node.wait_ready(60)
        node.process.kill()
        node.process.wait()
        for pid in postgres_processes(data_dir):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while postgres_processes(data_dir) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertTrue(os.path.exists(os.path.join(data_dir, "postgres", "postmaster.pid")))

        node2 = NodeProcess(self, data_dir).start()
        node2.wait_ready(60)
        self.assertEqual(node2.terminate(30), 0)
        self.assertEqual(postgres_processes(data_dir), [])

    def test_sigterm_with_idle_keepalive_connection(self) -> None:
        """
        An idle keep-alive connection does not hold up SIGTERM: the node
        closes it, stops listening and exits 0 promptly.
        """
        data_dir = short_tmpdir(self)
        node = NodeProcess(self, data_dir).start()
        node.wait_ready(60)
        conn = socket.create_connection(("127.0.0.1", node.api_port))
        conn.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        response = b""
        conn.settimeout(10)
        while b"\r\n\r\n" not in response:
            response += conn.recv(65536)
        self.assertTrue(response.startswith(b"HTTP/1.1 200"))
        # The kept-alive idle connection must not hold up shutdown.
        start = time.monotonic()
        self.assertEqual(node.terminate(30), 0)
        self.assertLess(time.monotonic() - start, 10)
        conn.close()
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", node.api_port), timeout=2).close()


class StartupErrorTests(SynchronousTestCase):
    """
    Invalid configurations stop C{twistd anvil} with one sentence and a
    non-zero status, without a traceback.
    """

    def run_twistd(
        self, env: dict[str, str], *args: str, data_dir: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """
        Run C{twistd -n --pidfile= anvil ARGS} to completion.
        """
        data_dir = data_dir or short_tmpdir(self)
        return subprocess.run(
            TWISTD + ["-n", "--pidfile=", "anvil", *args],
            env=child_env({"ANVIL_DATA_DIR": data_dir, **env}),
            cwd=data_dir,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def assertOneSentence(self, result: subprocess.CompletedProcess[str], *words: str) -> None:
        self.assertNotEqual(result.returncode, 0)
        output = result.stdout + result.stderr
        self.assertNotIn("Traceback", output)
        errors = [line for line in result.stderr.splitlines() if line.startswith("anvil:")]
        self.assertEqual(len(errors), 1, output)
        for word in words:
            self.assertIn(word, errors[0])

    def test_invalid_values(self) -> None:
        """
        A malformed endpoint, a bad encryption key, an unwritable data dir and
        an unknown option each give one sentence naming the key.
        """
        self.assertOneSentence(self.run_twistd({"API_LISTEN_ADDR": "tcp:nope"}), "api.listen")
        self.assertOneSentence(
            self.run_twistd({"ANVIL_SECRET_ENCRYPTION_KEY": "12ab"}),
            "ANVIL_SECRET_ENCRYPTION_KEY",
        )
        self.assertOneSentence(
            self.run_twistd({"ANVIL_DATA_DIR": "/proc/anvil"}), "node.data_dir"
        )

    def test_unknown_key_in_file(self) -> None:
        """
        An unknown key in the TOML file is named.
        """
        path = os.path.join(short_tmpdir(self), "anvil.toml")
        with open(path, "w") as f:
            f.write("[api]\nlisen = 'tcp:1'\n")
        self.assertOneSentence(self.run_twistd({}, "--config", path), "api.lisen")

    def test_unreachable_database(self) -> None:
        """
        A database URL nothing answers names the key.
        """
        port = socket.socket()
        port.bind(("127.0.0.1", 0))
        number = port.getsockname()[1]
        port.close()
        url = f"postgresql://anvil@127.0.0.1:{number}/x"
        self.assertOneSentence(
            self.run_twistd(
                {
                    "GLOBAL_DATABASE_URL": url,
                    "REGIONAL_DATABASE_URL": url,
                    "ANVIL_SECRET_ENCRYPTION_KEY": "0" * 64,
                }
            ),
            "GLOBAL_DATABASE_URL",
            "cannot be reached",
        )

    def test_wrong_encryption_key(self) -> None:
        """
        Restarting a node with another encryption key than its secrets were
        encrypted with stops with a clear error and leaves no PostgreSQL.
        """
        data_dir = short_tmpdir(self)
        node = NodeProcess(self, data_dir).start()
        node.wait_ready(60)
        self.assertEqual(node.terminate(30), 0)
        result = self.run_twistd(
            {
                "API_LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
                "ANVIL_SECRET_ENCRYPTION_KEY": "ab" * 32,
            },
            data_dir=data_dir,
        )
        self.assertOneSentence(result, "ANVIL_SECRET_ENCRYPTION_KEY")
        self.assertEqual(postgres_processes(data_dir), [])

    def test_port_in_use(self) -> None:
        """
        An API port already taken is a clear start-up error.
        """
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        port = taken.getsockname()[1]
        data_dir = short_tmpdir(self)
        result = self.run_twistd(
            {"API_LISTEN_ADDR": f"tcp:{port}:interface=127.0.0.1"}, data_dir=data_dir
        )
        self.assertOneSentence(result, "api.listen")
        self.assertEqual(postgres_processes(data_dir), [])


class PluginTests(SynchronousTestCase):
    """
    The package as installed ships the twistd plugin and documents every
    option.
    """

    def test_installed_package_provides_plugin(self) -> None:
        """
        After a (non-editable) install of the project into a fresh target
        directory, C{twistd --help} run outside the source tree lists
        C{anvil}, and C{twistd anvil --help} documents every option.
        """
        from tests.integration.nodeproc import SOURCE_ROOT

        target = short_tmpdir(self)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
             "--no-build-isolation", "--target", target, SOURCE_ROOT],
            check=True,
            capture_output=True,
            timeout=300,
        )
        self.assertTrue(
            os.path.exists(os.path.join(target, "twisted", "plugins", "anvil_plugin.py"))
        )
        env = dict(os.environ, PYTHONPATH=target)
        listing = subprocess.run(
            TWISTD + ["--help"], env=env, cwd="/", capture_output=True, text=True, timeout=60
        )
        self.assertIn("anvil", listing.stdout)
        anvil_help = subprocess.run(
            TWISTD + ["anvil", "--help"], env=env, cwd="/", capture_output=True,
            text=True, timeout=60,
        )
        self.assertEqual(anvil_help.returncode, 0, anvil_help.stderr)
        for key in KEYS:
            if key.option:
                self.assertIn(f"--{key.option}", anvil_help.stdout)
        self.assertIn("--config", anvil_help.stdout)
        # The migrations ship in the wheel too.
        schema = os.path.join(target, "anvil", "meta", "schema")
        self.assertTrue(any(f.endswith(".sql") for f in os.listdir(os.path.join(schema, "global"))))


class ExternalDatabaseTests(SynchronousTestCase):
    """
    Nodes on configured (external) databases.
    """

    def test_two_nodes_start_at_once(self) -> None:
        """
        Two nodes started at the same moment on one fresh pair of databases
        both come up (migrations run once, under the advisory lock), nothing
        embedded starts, and anvil-admin with the same environment manages the
        cluster.
        """
        import psycopg2

        from tests.pg import fresh_database

        env = {
            "GLOBAL_DATABASE_URL": fresh_database(self),
            "REGIONAL_DATABASE_URL": fresh_database(self),
            "ANVIL_SECRET_ENCRYPTION_KEY": "5e" * 32,
            "REGION": "eu-central-1",
        }
        nodes = [
            NodeProcess(self, short_tmpdir(self), env=env) for _ in range(2)
        ]
        for node in nodes:
            node.start()
        for node in nodes:
            node.wait_ready(60)
        for node in nodes:
            self.assertFalse(os.path.exists(os.path.join(node.data_dir, "postgres")))
            self.assertFalse(os.path.exists(os.path.join(node.data_dir, "credentials.json")))
            self.assertEqual(postgres_processes(node.data_dir), [])

        conn = psycopg2.connect(env["GLOBAL_DATABASE_URL"])
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT version, count(*) FROM schema_migrations GROUP BY version")
                self.assertTrue(all(count == 1 for _, count in cur.fetchall()))
                cur.execute("SELECT name FROM regions")
                self.assertEqual(cur.fetchall(), [("eu-central-1",)])
        finally:
            conn.close()

        admin = subprocess.run(
            [sys.executable, "-m", "anvil.scripts.admin", "tenant", "create", "acme"],
            env=child_env(env), capture_output=True, text=True, timeout=60,
        )
        self.assertEqual(admin.returncode, 0, admin.stderr)
        listing = subprocess.run(
            [sys.executable, "-m", "anvil.scripts.admin", "tenant", "list", "--json"],
            env=child_env(env), capture_output=True, text=True, timeout=60,
        )
        self.assertIn("acme", listing.stdout)
        for node in nodes:
            self.assertEqual(node.terminate(30), 0)


class GarbageCollectionTests(SynchronousTestCase):
    """
    A running node removes the data of deleted objects by itself.
    """

    def test_deleted_object_shards_disappear(self) -> None:
        """
        After DeleteObject, the object's shard files vanish from the data
        directory within a few garbage-collection passes, while a second
        object with the same content (deduplicated) stays readable until it
        is deleted too.
        """
        data_dir = short_tmpdir(self)
        node = NodeProcess(
            self, data_dir, env={"ANVIL_GC_INTERVAL": "0.5", "ANVIL_GC_GRACE": "0"}
        ).start()
        node.wait_ready(60)
        s3 = node.client()
        body = os.urandom(3 * 1024 * 1024 + 5)
        s3.create_bucket(Bucket="gc-bucket")
        s3.put_object(Bucket="gc-bucket", Key="a", Body=body)
        s3.put_object(Bucket="gc-bucket", Key="b", Body=body)

        def shard_files() -> list[str]:
            found = []
            for root, _, files in os.walk(os.path.join(data_dir, "shards")):
                found += [os.path.join(root, f) for f in files]
            return found

        self.assertEqual(len(shard_files()), 6)
        s3.delete_object(Bucket="gc-bucket", Key="a")
        time.sleep(3)
        self.assertEqual(len(shard_files()), 6)
        self.assertEqual(s3.get_object(Bucket="gc-bucket", Key="b")["Body"].read(), body)

        s3.delete_object(Bucket="gc-bucket", Key="b")
        deadline = time.monotonic() + 30
        while shard_files() and time.monotonic() < deadline:
            time.sleep(0.2)
        self.assertEqual(shard_files(), [])
        self.assertEqual(node.terminate(30), 0)

    def test_admin_worker_run_once_gc(self) -> None:
        """
        C{anvil-admin worker run-once gc}, run beside a node whose own loop is
        idle, collects a deleted object's shard files in one pass, exits 0 and
        prints its report as JSON.
        """
        data_dir = short_tmpdir(self)
        node = NodeProcess(self, data_dir, env={"ANVIL_GC_INTERVAL": "3600"}).start()
        node.wait_ready(60)
        s3 = node.client()
        s3.create_bucket(Bucket="gc-once")
        s3.put_object(Bucket="gc-once", Key="a", Body=os.urandom(2 * 1024 * 1024))
        s3.delete_object(Bucket="gc-once", Key="a")
        shards = os.path.join(data_dir, "shards")
        self.assertEqual(sum(len(f) for _, _, f in os.walk(shards)), 6)

        result = subprocess.run(
            [sys.executable, "-m", "anvil.scripts.admin", "--data-dir", data_dir,
             "worker", "run-once", "gc", "--json"],
            env=child_env({"ANVIL_GC_GRACE": "0"}), capture_output=True, text=True, timeout=120,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        report = json.loads(result.stdout)
        self.assertEqual(report["worker"], "gc")
        self.assertEqual(report["contents_removed"], 1)
        self.assertEqual(report["shard_files_deleted"], 6)
        self.assertEqual(sum(len(f) for _, _, f in os.walk(shards)), 0)
        self.assertEqual(node.terminate(30), 0)
