# -*- test-case-name: tests.integration.test_prometheus -*-
"""
A real Prometheus server scraping a real Anvil node.

The node is a C{twistd -n --pidfile= anvil} child on the embedded default;
Prometheus (Debian package C{prometheus}, which CI installs; missing, the
test fails rather than skips) runs with its own temporary configuration,
scraping the node every second and loading C{etc/prometheus/anvil-rules.yml}.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.nodeproc import NodeProcess, free_port, http, short_tmpdir
from tests.test_prometheus_rules import (
    DASHBOARD,
    RULES,
    dashboard_expressions,
    grafana_to_promql,
    rules,
)

T = TypeVar("T")

#: Scrape and rule evaluation interval of the test server.
INTERVAL = "1s"


class PrometheusProcess:
    """
    One C{prometheus} server child process with a temporary configuration
    and storage.
    """

    def __init__(self, testcase: SynchronousTestCase, directory: str, target: str) -> None:
        """
        @param testcase: The test; cleanup stops the server.
        @param directory: A fresh directory for configuration, data and log.
        @param target: C{host:port} of the node's API listener.
        """
        self.testcase = testcase
        self.directory = directory
        self.port = free_port()
        self.config_path = os.path.join(directory, "prometheus.yml")
        self.log_path = os.path.join(directory, "prometheus.log")
        # The same job name and rules file as etc/prometheus/prometheus.yml,
        # at test speed.
        with open(self.config_path, "w") as f:
            f.write(
                "global:\n"
                f"  scrape_interval: {INTERVAL}\n"
                f"  evaluation_interval: {INTERVAL}\n"
                "rule_files:\n"
                f"  - {json.dumps(RULES)}\n"
                "scrape_configs:\n"
                "  - job_name: anvil\n"
                "    metrics_path: /metrics\n"
                "    static_configs:\n"
                f"      - targets: [{json.dumps(target)}]\n"
            )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """
        The base URL of the server's HTTP API.
        """
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "PrometheusProcess":
        """
        Start the server; cleanup stops it.
        """
        binary = shutil.which("prometheus")
        if binary is None:
            raise AssertionError(
                "prometheus not found on PATH: install the Debian package 'prometheus' "
                "(apt-get install prometheus), as .ci/run does"
            )
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={os.path.join(self.directory, 'data')}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    # Nothing else from /usr/share/prometheus is needed.
                    f"--web.console.templates={self.directory}",
                    f"--web.console.libraries={self.directory}",
                ],
                cwd=self.directory,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.testcase.addCleanup(self.stop)
        return self

    def stop(self) -> None:
        """
        Stop the server: SIGTERM, then SIGKILL if it does not exit in time.
        """
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def output(self) -> str:
        """
        The server's log so far, for failure messages.
        """
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def api(self, path: str, **params: str) -> Any:
        """
        One call of the HTTP API.

        @param path: E.g. C{"/api/v1/query"}.
        @param params: Query parameters.
        @return: The C{data} member of a successful answer.
        @raise AssertionError: if the answer is not a success.
        """
        url = self.url + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, _, body = http("GET", url)
        answer = json.loads(body)
        if status != 200 or answer.get("status") != "success":
            raise AssertionError(f"GET {url}: {status} {answer}")
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """
        Evaluate an instant query.

        @param expr: PromQL.
        @return: The result vector.
        """
        data = self.api("/api/v1/query", query=expr)
        if data["resultType"] != "vector":
            raise AssertionError(f"{expr}: {data['resultType']} result")
        return data["result"]

    def wait_for(self, what: str, check: Callable[[], T | None], timeout: float = 60.0) -> T:
        """
        Poll C{check} until it returns something other than C{None}.

        @param what: What is awaited, for the failure message.
        @param check: Returns the awaited value or C{None}; an
            C{OSError} or C{AssertionError} counts as not yet.
        @param timeout: Seconds to wait.
        @return: What C{check} returned.
        """
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"prometheus exited with {self.process.returncode}:\n{self.output()}"
                )
            try:
                result = check()
                if result is not None:
                    return result
            except (OSError, AssertionError, ValueError) as e:
                last = e
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what} ({last!r}):\n{self.output()[-4000:]}")


class PrometheusScrapeTests(SynchronousTestCase):
    """
    Prometheus scrapes a node, sees its metrics and loads Anvil's rules.
    """

    def test_scrapes_node_and_loads_rules(self) -> None:
        """
        A real Prometheus scraping a real node gets C{up == 1} and the
        node's C{anvil_node_info} series, has loaded every Anvil rule
        group with its rules healthy, evaluates the recording rules from
        the node's data, raises no alert for a healthy node, and answers
        every dashboard query.
        """
        node_dir = short_tmpdir(self)
        node = NodeProcess(self, node_dir).start()
        node.wait_ready(90)
        _, _, info_body = http("GET", node.url + "/metrics")
        self.assertIn(b"anvil_node_info{", info_body)

        prometheus_dir = short_tmpdir(self)
        server = PrometheusProcess(self, prometheus_dir, f"127.0.0.1:{node.api_port}").start()

        def ready() -> bool | None:
            status, _, _ = http("GET", server.url + "/-/ready", timeout=2)
            return True if status == 200 else None

        server.wait_for("Prometheus to be ready", ready)

        def node_info() -> dict[str, str] | None:
            result = server.query('anvil_node_info{job="anvil"}')
            return result[0]["metric"] if result else None

        labels = server.wait_for("anvil_node_info to be scraped", node_info)
        self.assertEqual(labels["instance"], f"127.0.0.1:{node.api_port}")
        self.assertEqual(labels["region"], "us-east-1")
        with open(os.path.join(node_dir, "node_id")) as f:
            self.assertEqual(labels["node_id"], f.read().strip())

        up = server.query('up{job="anvil"}')
        self.assertEqual([sample["value"][1] for sample in up], ["1"])
        ready_value = server.wait_for(
            "anvil_node_ready == 1",
            lambda: server.query("anvil_node_ready == 1") or None,
        )
        self.assertEqual(ready_value[0]["value"][1], "1")

        # Every rule group of the file is loaded and every rule evaluated
        # without error.
        expected = rules()
        groups = server.wait_for(
            "the rules to be evaluated",
            lambda: self._evaluated_groups(server, len(expected)),
        )
        self.assertEqual(
            {g["name"] for g in groups}, {r.group for r in expected}
        )
        loaded = {rule["name"] for g in groups for rule in g["rules"]}
        self.assertEqual(loaded, {r.name for r in expected})
        for group in groups:
            for rule in group["rules"]:
                self.assertEqual(rule["health"], "ok", rule)

        # The recording rules compute from the node's real gauges: the disk
        # holding the shard directory is partly used.
        ratio = server.wait_for(
            "anvil:storage_used:ratio",
            lambda: server.query("anvil:storage_used:ratio") or None,
        )
        self.assertTrue(0 < float(ratio[0]["value"][1]) < 1, ratio)

        # A healthy node fires nothing (the disk may really be nearly full
        # on a crowded test machine: those alerts are allowed).
        alerts = server.api("/api/v1/alerts")["alerts"]
        self.assertEqual(
            [a for a in alerts if not a["labels"]["alertname"].startswith("AnvilDisk")], []
        )

        # The dashboard's queries are accepted by a real server, and the
        # ones charting per-node gauges return the node's data.
        with open(DASHBOARD) as f:
            queries = dashboard_expressions(json.load(f))
        for _, expr in queries:
            server.query(grafana_to_promql(expr))
        self.assertTrue(
            server.query(grafana_to_promql('sum(anvil_node_ready{job=~"$job", instance=~"$instance"})'))
        )

    def _evaluated_groups(self, server: PrometheusProcess, count: int) -> list[dict[str, Any]] | None:
        """
        The rule groups once every rule has been evaluated at least once.

        @param server: The Prometheus server.
        @param count: How many rules there should be.
        @return: The groups of C{/api/v1/rules}, or C{None} while some rule
            was not evaluated yet.
        """
        groups = server.api("/api/v1/rules")["groups"]
        evaluated = [
            rule
            for group in groups
            for rule in group["rules"]
            if not rule.get("lastEvaluation", "").startswith("0001-")
        ]
        return groups if len(evaluated) == count else None
