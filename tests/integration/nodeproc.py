# -*- test-case-name: tests.integration.test_twistd -*-
"""
Run real C{twistd -n --pidfile= anvil} processes for end-to-end tests.

Tests talk to the node over real sockets with blocking HTTP calls: the node
is another process, so there is no reactor in the test to keep turning.
"""

from __future__ import annotations

import collections
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any, Mapping

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

#: The source tree, so the child finds the same anvil and plugin as the tests.
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
ADMIN = [sys.executable, "-m", "anvil.scripts.admin"]


def free_port() -> int:
    """
    A TCP port that was free a moment ago on 127.0.0.1.

    Taken below the kernel's ephemeral range (32768 and up here): a port
    from that range can be handed to any outgoing connection or C{tcp:0}
    listener (nodes talk to each other all the time) between this check and
    the node binding it. Each trial worker (C{--jobs}: they run in
    C{_trial_temp/0}, C{_trial_temp/1}, ...) draws from its own slice of
    that space, so two workers never hand out the same port. Within a
    worker a port is not handed out again soon: a cluster's ports are all
    chosen before its first node binds any, so "free a moment ago" alone
    could give one node's API port to another node's cluster listener.
    """
    low = 20000 + _WORKER * _SLICE
    while True:
        port = _ports.randrange(low, low + _SLICE)
        if port in _recently_handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _recently_handed_out.append(port)
        return port


def _worker_index() -> int:
    name = os.path.basename(os.getcwd())
    return int(name) % 4 if name.isdigit() else 0


_SLICE = 3000
_WORKER = _worker_index()
_ports = random.Random(os.getpid() ^ int(time.time() * 1000))
_recently_handed_out: collections.deque[int] = collections.deque(maxlen=_SLICE // 3)


def short_tmpdir(testcase: SynchronousTestCase) -> str:
    """
    A fresh directory under /tmp that the unprivileged PostgreSQL user can
    reach (the trial temp dir may be under /root), removed after the test.
    """
    path = tempfile.mkdtemp(prefix="anvil-", dir="/tmp")
    os.chmod(path, 0o755)
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """
    The environment of a child process: ours minus Anvil settings, plus
    C{extra}, with the source tree first on the path.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ANVIL_", "API_", "CLUSTER_", "GLOBAL_", "REGIONAL_"))
        and k not in ("REGION", "PUBLIC_API_ADDR", "PUBLIC_CLUSTER_ADDRS",
                      "BOOTSTRAP_ADDRS", "INIT_CLUSTER")
    }
    env["PYTHONPATH"] = SOURCE_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    # Never the default cluster port: tests run nodes side by side.
    env["CLUSTER_LISTEN_ADDR"] = "tcp:0:interface=127.0.0.1"
    env.update(extra)
    return env


def http(method: str, url: str, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """
    One blocking HTTP request; returns status, headers and body (also for
    error statuses).
    """
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, _lower(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, _lower(e.headers), e.read()


def _lower(headers: object) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}  # type: ignore[attr-defined]


#: Samples of a C{/metrics} page: (sample name, its labels) -> value.
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape_metrics(url: str) -> tuple[set[str], Samples]:
    """
    A node's C{/metrics}, parsed with prometheus-client's parser.

    @param url: the node's API URL.
    @return: the family names and every sample.
    """
    status, _, body = http("GET", url + "/metrics")
    assert status == 200, status
    names: set[str] = set()
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        names.add(family.name)
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return names, samples


def metric_value(samples: Samples, name: str, **labels: str) -> float:
    """
    One sample's value, 0 when absent.
    """
    return samples.get((name, frozenset(labels.items())), 0.0)


class NodeProcess:
    """
    One C{twistd -n --pidfile= anvil} child process.
    """

    def __init__(self, testcase: SynchronousTestCase, data_dir: str,
                 env: Mapping[str, str] | None = None, args: list[str] | None = None) -> None:
        self.testcase = testcase
        self.data_dir = data_dir
        self.api_port = free_port()
        self.cluster_port = free_port()
        self.env = child_env(
            {
                "ANVIL_DATA_DIR": data_dir,
                "API_LISTEN_ADDR": f"tcp:{self.api_port}:interface=127.0.0.1",
                "CLUSTER_LISTEN_ADDR": f"tcp:{self.cluster_port}:interface=127.0.0.1",
                **(env or {}),
            }
        )
        self.args = args or []
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(data_dir, "twistd.log")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self) -> "NodeProcess":
        """
        Start the process (output goes to a log file in the data dir).
        """
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            TWISTD + ["-n", "--pidfile=", "anvil"] + self.args,
            env=self.env,
            cwd=self.data_dir,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        self.testcase.addCleanup(self.kill)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """
        Wait until C{/ready} answers 200.
        """
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"node exited with {self.process.returncode}:\n{self.output()}"
                )
            try:
                status, _, body = http("GET", self.url + "/ready", timeout=5)
                if status == 200:
                    return
                last = (status, body)
            except OSError as e:
                last = e
            time.sleep(0.2)
        raise AssertionError(f"node not ready after {timeout}s ({last!r}):\n{self.output()}")

    def terminate(self, timeout: float = 30.0) -> int:
        """
        Send SIGTERM and wait for the exit status.
        """
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """
        SIGKILL the node if it still runs, and stop an embedded PostgreSQL it
        may have left (cleanup after failed tests only).
        """
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        stop_embedded(self.data_dir)

    def output(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def credentials(self) -> dict[str, str]:
        with open(os.path.join(self.data_dir, "credentials.json")) as f:
            return json.load(f)

    def client(self) -> Any:
        """
        A boto3 S3 client with the node's first-start credentials (path
        style, no retries: a failure must show, not be retried away).
        """
        import boto3
        from botocore.config import Config

        creds = self.credentials()
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.url,
            region_name=creds["region"],
            aws_access_key_id=creds["access_key_id"],
            aws_secret_access_key=creds["secret_access_key"],
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """
        Run C{anvil-admin --data-dir <this node's dir> ARGS} with this
        node's environment (commands that talk to the node find its
        cluster listener there).
        """
        result = subprocess.run(
            ADMIN + ["--data-dir", self.data_dir, *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"anvil-admin {args} failed: {result.stderr}")
        return result


def postgres_processes(data_dir: str) -> list[int]:
    """
    PIDs of postmasters serving the embedded cluster of C{data_dir}.
    """
    pgdata = os.path.join(data_dir, "postgres").encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"postgres") and pgdata in argv:
            pids.append(int(entry))
    return pids


def stop_embedded(data_dir: str) -> None:
    """
    Stop the embedded PostgreSQL of C{data_dir} if it runs.
    """
    if not os.path.isdir(os.path.join(data_dir, "postgres")):
        return
    from anvil.meta.embedded import EmbeddedPostgres

    try:
        EmbeddedPostgres.for_data_dir(data_dir).stop()
    except Exception:
        for pid in postgres_processes(data_dir):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
