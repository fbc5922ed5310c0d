# -*- test-case-name: tests.test_prometheus_rules -*-
"""
Tests of the operations material in C{etc/prometheus} and C{etc/grafana}.

The Prometheus files are checked by C{promtool} itself (Debian package
C{prometheus}; CI installs it, and a missing one fails these tests rather
than skipping them), and every metric name and label the alert rules and the
dashboard use is checked against what L{anvil.metrics.Metrics} exports, so
that renaming a metric cannot silently disable an alert or blank a panel.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.metrics import MetricWrapperBase
from twisted.trial.unittest import SynchronousTestCase

from anvil.cluster.membership import MemberState
from anvil.metrics import API_NODE, API_S3, STATUS_CLASSES, Metrics
from anvil.worker.queue import STATES as TASK_STATES
from anvil.worker.sweep import REDUNDANCY_STATES

SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMETHEUS_DIR = os.path.join(SOURCE_ROOT, "etc", "prometheus")
RULES = os.path.join(PROMETHEUS_DIR, "anvil-rules.yml")
RULES_TESTS = os.path.join(PROMETHEUS_DIR, "anvil-rules.test.yml")
CONFIG = os.path.join(PROMETHEUS_DIR, "prometheus.yml")
DASHBOARD = os.path.join(SOURCE_ROOT, "etc", "grafana", "anvil-dashboard.json")

#: Families the specification's key signals need an alert on (issue 5).
ALERTED_FAMILIES = (
    "up",
    "anvil_node_ready",
    "anvil_api_requests_total",
    "anvil_cluster_members",
    "anvil_cluster_member_events_total",
    "anvil_tasks",
    "anvil_task_runs_total",
    "anvil_shards_missing",
    "anvil_shards_corrupt_total",
    "anvil_objects_by_redundancy_state",
    "anvil_storage_used_bytes",
    "anvil_storage_capacity_bytes",
)

#: Families the dashboard must chart (the specification's section 9.2).
CHARTED_FAMILIES = (
    "anvil_api_requests_total",
    "anvil_api_request_duration_seconds_bucket",
    "anvil_cluster_members",
    "anvil_cluster_member_events_total",
    "anvil_storage_capacity_bytes",
    "anvil_storage_used_bytes",
    "anvil_tenant_stored_bytes",
    "anvil_bucket_stored_bytes",
    "anvil_bucket_objects",
    "anvil_tasks",
    "anvil_task_runs_total",
    "anvil_shards_missing",
    "anvil_shards_corrupt_total",
    "anvil_shard_repairs_total",
    "anvil_shard_repaired_bytes_total",
    "anvil_rebalance_moves_total",
    "anvil_rebalance_moved_bytes_total",
    "anvil_objects_by_redundancy",
)

#: Labels every scraped series has (Prometheus adds them), besides its own.
TARGET_LABELS = frozenset({"job", "instance"})

#: Label values the rules may name, per label: a typo here would make an
#: alert match nothing.
KNOWN_LABEL_VALUES = {
    "status": frozenset(STATUS_CLASSES),
    "api": frozenset({API_S3, API_NODE, "cluster"}),
    "state": frozenset(TASK_STATES)
    | frozenset(s.value for s in MemberState)
    | frozenset(REDUNDANCY_STATES),
    "event": frozenset({"join", "leave", "failure", "recovery", "suspect"}),
    "outcome": frozenset({"done", "retry", "failed", "lost"}),
}

#: PromQL words that look like identifiers but are not metric names.
PROMQL_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
     "group_left", "group_right", "inf", "nan", "atan2"}
)


def promtool() -> str:
    """
    The path of C{promtool}.

    @return: Its absolute path.
    @raise AssertionError: (failing the calling test, never skipping it)
        when it is not installed.
    """
    path = shutil.which("promtool")
    if path is None:
        raise AssertionError(
            "promtool not found on PATH: install the Debian package 'prometheus' "
            "(apt-get install prometheus), as .ci/run does"
        )
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """
    Run C{promtool ARGS} in the source tree.

    @param args: Its arguments.
    @return: The finished process, output captured as text.
    """
    return subprocess.run(
        [promtool(), *args], cwd=SOURCE_ROOT, capture_output=True, text=True, timeout=120
    )


@dataclass(frozen=True)
class Family:
    """
    One metric family Anvil exports.

    @ivar samples: The sample names it appears under (C{_total},
        C{_bucket}, ...).
    @ivar labels: Its own label names.
    """

    samples: frozenset[str]
    labels: frozenset[str]


def exported_families() -> dict[str, Family]:
    """
    Every sample name a node's C{/metrics} can contain, mapped to its family.

    Built from a fresh L{Metrics}: the collectors declared on it (with their
    label names) and the standard process/platform/GC collectors on its
    registry.

    @return: Sample name to L{Family}.
    """
    metrics = Metrics()
    by_family: dict[str, Family] = {}
    for family in metrics.registry.collect():
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_count", "_sum", "_created"),
            "summary": ("_count", "_sum", "_created"),
        }.get(family.type, ("",))
        names = {family.name + suffix for suffix in suffixes}
        names.update(sample.name for sample in family.samples)
        labels = {label for sample in family.samples for label in sample.labels}
        by_family[family.name] = Family(frozenset(names), frozenset(labels))
    # Families with labels have no samples until a child exists: take their
    # label names from the collectors themselves.
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            family = by_family[value._name]
            by_family[value._name] = Family(
                family.samples, family.labels | frozenset(value._labelnames)
            )
    exported: dict[str, Family] = {}
    for family in by_family.values():
        for name in family.samples:
            labels = family.labels | {"le"} if name.endswith("_bucket") else family.labels
            exported[name] = Family(family.samples, frozenset(labels))
    return exported


@dataclass(frozen=True)
class Selector:
    """
    One metric reference in a PromQL expression.

    @ivar name: The metric name.
    @ivar matchers: C{(label, operator, value)} of its label matchers.
    """

    name: str
    matchers: tuple[tuple[str, str, str], ...]


_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.$])([A-Za-z_:][A-Za-z0-9_:]*)(?![\w:]|\s*\()")


def selectors(expr: str) -> list[Selector]:
    """
    The metric references in a PromQL expression.

    This is not a PromQL parser (promtool checks the syntax); it finds
    metric names and their label matchers, which is what can go stale when
    a metric is renamed.

    @param expr: The expression.
    @return: One L{Selector} per reference, in order.
    """
    found: list[Selector] = []
    # Metric names with label matchers first, then with the braces, range
    # selectors and grouping clauses removed, bare names.
    for match in _SELECTOR.finditer(expr):
        if match.group(1):
            found.append(Selector(match.group(1), tuple(_MATCHER.findall(match.group(2)))))
    rest = _SELECTOR.sub(" ", expr)
    rest = re.sub(r"\[[^\]]*\]", " ", rest)
    rest = _GROUPING.sub(" ", rest)
    for name in _IDENTIFIER.findall(rest):
        if name.lower() not in PROMQL_KEYWORDS:
            found.append(Selector(name, ()))
    return found


@dataclass(frozen=True)
class Rule:
    """
    One rule of C{anvil-rules.yml}.

    @ivar kind: C{"alert"} or C{"record"}.
    @ivar name: The alert's or recorded series' name.
    @ivar expr: Its PromQL expression.
    @ivar group: The name of its group.
    """

    kind: str
    name: str
    expr: str
    group: str


def rules(path: str = RULES) -> list[Rule]:
    """
    Read the rules of a rules file.

    PyYAML is not a dependency of Anvil, and the file is ours, so this reads
    the layout it keeps (C{- alert:}/C{- record:} items with a one-line or
    C{|} block C{expr}); L{RulesFileTests.test_parsed_all_rules} holds it
    to promtool's own count.

    @param path: The rules file.
    @return: Its rules in order.
    """
    with open(path) as f:
        lines = f.read().splitlines()
    found: list[Rule] = []
    group = ""
    kind = name = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith("- name:"):
            group = stripped.split(":", 1)[1].strip()
        elif stripped.startswith(("- alert:", "- record:")):
            kind, name = (part.strip() for part in stripped[2:].split(":", 1))
        elif stripped.startswith("expr:"):
            value = stripped.split(":", 1)[1].strip()
            if value == "|":
                indent = len(line) - len(line.lstrip())
                block = []
                while i + 1 < len(lines) and (
                    not lines[i + 1].strip()
                    or len(lines[i + 1]) - len(lines[i + 1].lstrip()) > indent
                ):
                    i += 1
                    block.append(lines[i].strip())
                value = " ".join(part for part in block if part)
            found.append(Rule(kind, name, value, group))
        i += 1
    return found


def rule_tests(path: str = RULES_TESTS) -> Iterator[tuple[str, str, bool]]:
    """
    The alert checks of a promtool rules test file.

    @param path: The test file (in the layout PyYAML's C{safe_dump} writes).
    @return: C{(alertname, eval_time, fires)} per C{alert_rule_test} entry;
        C{fires} is whether any alert is expected.
    """
    with open(path) as f:
        lines = f.read().splitlines()
    eval_time = alertname = ""
    for line in lines:
        stripped = line.strip().lstrip("- ")
        if stripped.startswith("eval_time:"):
            eval_time = stripped.split(":", 1)[1].strip()
        elif stripped.startswith("alertname:"):
            alertname = stripped.split(":", 1)[1].strip()
        elif stripped.startswith("exp_alerts:"):
            yield alertname, eval_time, stripped.split(":", 1)[1].strip() != "[]"


def dashboard_expressions(dashboard: dict) -> list[tuple[str, str]]:
    """
    Every query of a Grafana dashboard.

    @param dashboard: The parsed dashboard JSON.
    @return: C{(panel title, expr)} per target.
    """
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def grafana_to_promql(expr: str) -> str:
    """
    Replace the dashboard's variables with values Prometheus accepts.

    @param expr: A dashboard query.
    @return: The query as Prometheus would receive it for job "anvil", every
        node and a one-minute rate interval.
    """
    return (
        expr.replace("$__rate_interval", "1m").replace("$job", "anvil").replace("$instance", ".*")
    )


class CheckReferences:
    """
    Check metric references against what Anvil exports (a mixin for the
    test cases below).
    """

    def assert_references_exported(
        self, where: str, expr: str, extra_names: frozenset[str] = frozenset()
    ) -> None:
        """
        Fail unless every metric C{expr} names is exported (or one of
        C{extra_names}), with only labels it has and known label values.

        @param where: What C{expr} belongs to, for the failure message.
        @param expr: A PromQL expression.
        @param extra_names: Further allowed names (C{up}, recorded series).
        """
        exported = exported_families()
        refs = selectors(expr)
        self.assertTrue(refs, f"{where}: no metric found in {expr!r}")  # type: ignore[attr-defined]
        for ref in refs:
            if ref.name in extra_names:
                continue
            if ref.name not in exported:
                raise AssertionError(f"{where}: {ref.name} is not a metric Anvil exports ({expr!r})")
            allowed = exported[ref.name].labels | TARGET_LABELS
            for label, op, value in ref.matchers:
                if label not in allowed:
                    raise AssertionError(
                        f"{where}: {ref.name} has no label {label!r} (it has {sorted(allowed)})"
                    )
                known = KNOWN_LABEL_VALUES.get(label)
                if known is None or value.startswith("$"):
                    continue
                values = value.split("|") if op in ("=~", "!~") else [value]
                for v in values:
                    if v not in known:
                        raise AssertionError(
                            f"{where}: {label}={v!r} is never exported (known: {sorted(known)})"
                        )


class SelectorTests(SynchronousTestCase):
    """
    The metric-reference finder the other tests rely on.
    """

    def test_finds_names_and_matchers(self) -> None:
        """
        Names with and without matchers are found; functions, grouping
        labels, keywords, ranges and numbers are not.
        """
        refs = selectors(
            'sum by (job, api) (rate(anvil_api_requests_total{api!="node", status="5xx"}[5m]))'
            " / on (job) group_left (region) anvil_node_info > 0.5 and up == 1"
        )
        self.assertEqual(
            refs,
            [
                Selector("anvil_api_requests_total", (("api", "!=", "node"), ("status", "=", "5xx"))),
                Selector("anvil_node_info", ()),
                Selector("up", ()),
            ],
        )

    def test_exported_families(self) -> None:
        """
        The exported names carry the suffixes Prometheus sees, and labelled
        families their label names even before any sample exists.
        """
        exported = exported_families()
        self.assertIn("anvil_api_requests_total", exported)
        self.assertNotIn("anvil_api_requests", exported)
        self.assertIn("anvil_api_request_duration_seconds_bucket", exported)
        self.assertEqual(exported["anvil_tasks"].labels, {"kind", "state"})
        self.assertIn("le", exported["anvil_api_request_duration_seconds_bucket"].labels)
        self.assertIn("process_resident_memory_bytes", exported)


class PromtoolTests(SynchronousTestCase):
    """
    promtool accepts the configuration, the rules, and the rules' unit tests.
    """

    def assert_success(self, result: subprocess.CompletedProcess[str]) -> None:
        """
        Fail with promtool's output unless it exited 0.

        @param result: The finished promtool process.
        """
        if result.returncode != 0:
            self.fail(f"promtool {result.args[1:]} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")

    def test_check_rules(self) -> None:
        """
        C{promtool check rules} with every lint finds no problem.
        """
        result = run_promtool("check", "rules", "--lint=all", "--lint-fatal", RULES)
        self.assert_success(result)
        self.assertIn("SUCCESS", result.stdout)

    def test_check_config(self) -> None:
        """
        C{promtool check config} accepts the scrape configuration and the
        rules file it loads.
        """
        result = run_promtool("check", "config", CONFIG)
        self.assert_success(result)
        self.assertIn("1 rule files found", result.stdout)

    def test_rules_unit_tests(self) -> None:
        """
        C{promtool test rules} passes.
        """
        result = run_promtool("test", "rules", RULES_TESTS)
        self.assert_success(result)
        self.assertIn("SUCCESS", result.stdout)

    def test_unit_tests_catch_a_broken_rule(self) -> None:
        """
        The unit tests fail for rules that alert on the wrong thing (here,
        5xx answers of C{/ready} counted as API errors), so they really
        exercise the rules.
        """
        with open(RULES) as f:
            text = f.read()
        broken = text.replace('{api!="node", status="5xx"}', '{status="5xx"}').replace(
            '{api!="node"}[5m]', "[5m]"
        )
        self.assertNotEqual(broken, text)
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        with open(os.path.join(tmp, "anvil-rules.yml"), "w") as f:
            f.write(broken)
        shutil.copy(RULES_TESTS, tmp)
        result = run_promtool("test", "rules", os.path.join(tmp, "anvil-rules.test.yml"))
        self.assertNotEqual(result.returncode, 0, result.stdout)
        self.assertIn("AnvilHigh5xxRate", result.stdout + result.stderr)

    def test_dashboard_queries_parse(self) -> None:
        """
        Every dashboard query is valid PromQL (promtool checks them as
        recording rules).
        """
        with open(DASHBOARD) as f:
            exprs = dashboard_expressions(json.load(f))
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp)
        path = os.path.join(tmp, "dashboard-rules.yml")
        with open(path, "w") as f:
            f.write("groups:\n  - name: dashboard\n    rules:\n")
            for i, (_, expr) in enumerate(exprs):
                f.write(f"      - record: dashboard_query_{i}\n")
                f.write(f"        expr: {json.dumps(grafana_to_promql(expr))}\n")
        result = run_promtool("check", "rules", path)
        self.assert_success(result)
        self.assertIn(f"{len(exprs)} rules found", result.stdout)


class RulesFileTests(SynchronousTestCase, CheckReferences):
    """
    The alert rules use Anvil's real metrics and cover the key signals.
    """

    def test_parsed_all_rules(self) -> None:
        """
        L{rules} finds as many rules as promtool does, so the checks below
        see every expression.
        """
        result = run_promtool("check", "rules", RULES)
        count = re.search(r"SUCCESS: (\d+) rules found", result.stdout)
        self.assertIsNotNone(count, result.stdout + result.stderr)
        assert count is not None
        self.assertEqual(len(rules()), int(count.group(1)))

    def test_rules_reference_exported_metrics(self) -> None:
        """
        Every metric a rule names is exported by Anvil (or is C{up}, or a
        series the file records itself), with existing labels and values.
        """
        all_rules = rules()
        recorded = frozenset(r.name for r in all_rules if r.kind == "record")
        for rule in all_rules:
            self.assert_references_exported(rule.name, rule.expr, recorded | {"up"})

    def test_key_signals_alerted(self) -> None:
        """
        Every family behind a key signal of the specification is used by an
        alert, directly or through a recording rule.
        """
        all_rules = rules()
        recorded = {r.name: r for r in all_rules if r.kind == "record"}
        used: set[str] = set()
        for rule in all_rules:
            if rule.kind != "alert":
                continue
            for ref in selectors(rule.expr):
                if ref.name in recorded:
                    used.update(s.name for s in selectors(recorded[ref.name].expr))
                used.add(ref.name)
        for family in ALERTED_FAMILIES:
            self.assertIn(family, used)

    def test_alerts_have_severity_and_runbook(self) -> None:
        """
        Every alert has a severity label and summary, description and
        runbook annotations.
        """
        with open(RULES) as f:
            text = f.read()
        blocks = re.split(r"\n\s*- (?=alert:|record:)", text)
        alerts = [b for b in blocks if b.startswith("alert:")]
        self.assertEqual(len(alerts), len([r for r in rules() if r.kind == "alert"]))
        for block in alerts:
            name = block.split("\n", 1)[0]
            self.assertRegex(block, r"severity: (warning|critical)\n", name)
            for annotation in ("summary", "description", "runbook"):
                self.assertIn(f"{annotation}: ", block, name)

    def test_every_alert_tested_firing_and_not(self) -> None:
        """
        The promtool test file shows every alert both firing and not firing,
        and tests no alert that does not exist.
        """
        alerts = {r.name for r in rules() if r.kind == "alert"}
        firing: set[str] = set()
        silent: set[str] = set()
        for alertname, _, fires in rule_tests():
            (firing if fires else silent).add(alertname)
        self.assertEqual(firing, alerts)
        self.assertEqual(silent, alerts)

    def test_redundancy_rules_need_no_erasure_code(self) -> None:
        """
        The redundancy recording rules read the sweep's per-content verdict
        (which uses each content's own k and m), never shard counts, so
        they hold for any erasure code.
        """
        expected = {
            "anvil:objects_below_full_redundancy": ("!=", "full"),
            "anvil:objects_without_redundancy": ("=", "no_spare"),
            "anvil:objects_lost": ("=", "lost"),
        }
        recorded = {r.name: r for r in rules() if r.kind == "record"}
        for name, (op, value) in expected.items():
            [ref] = selectors(recorded[name].expr)
            self.assertEqual(ref.name, "anvil_objects_by_redundancy_state")
            self.assertEqual(ref.matchers, (("state", op, value),))


class DashboardTests(SynchronousTestCase, CheckReferences):
    """
    The Grafana dashboard is well formed and charts Anvil's real metrics.
    """

    def setUp(self) -> None:
        """
        Load the dashboard.
        """
        with open(DASHBOARD) as f:
            self.dashboard = json.load(f)

    def test_structure(self) -> None:
        """
        The dashboard has a title, a uid, a recent schema version, a
        Prometheus data source variable every query uses, unique panel ids,
        panels inside the 24-column grid, and queries with ref ids.
        """
        d = self.dashboard
        self.assertEqual(d["title"], "Anvil")
        self.assertTrue(d["uid"])
        self.assertGreaterEqual(d["schemaVersion"], 36)
        variables = {v["name"]: v for v in d["templating"]["list"]}
        self.assertEqual(variables["datasource"]["type"], "datasource")
        self.assertEqual(variables["datasource"]["query"], "prometheus")
        self.assertIn("instance", variables)
        ids = [p["id"] for p in d["panels"]]
        self.assertEqual(len(ids), len(set(ids)))
        for panel in d["panels"]:
            grid = panel["gridPos"]
            self.assertLessEqual(grid["x"] + grid["w"], 24, panel["title"])
            if panel["type"] == "row":
                continue
            self.assertIn(panel["type"], ("timeseries", "stat"))
            self.assertEqual(panel["datasource"], {"type": "prometheus", "uid": "${datasource}"})
            self.assertTrue(panel["targets"], panel["title"])
            refs = [t["refId"] for t in panel["targets"]]
            self.assertEqual(len(refs), len(set(refs)), panel["title"])
            for target in panel["targets"]:
                self.assertEqual(target["datasource"], panel["datasource"])
                self.assertIn('instance=~"$instance"', target["expr"], panel["title"])

    def test_panels_do_not_overlap(self) -> None:
        """
        No two panels occupy the same grid cell.
        """
        taken: dict[tuple[int, int], str] = {}
        for panel in self.dashboard["panels"]:
            grid = panel["gridPos"]
            for x in range(grid["x"], grid["x"] + grid["w"]):
                for y in range(grid["y"], grid["y"] + grid["h"]):
                    self.assertNotIn((x, y), taken, f"{panel['title']} overlaps {taken.get((x, y))}")
                    taken[(x, y)] = panel["title"]

    def test_queries_reference_exported_metrics(self) -> None:
        """
        Every metric a dashboard query names is exported by Anvil (or is
        C{up}), with existing labels and values.
        """
        for title, expr in dashboard_expressions(self.dashboard):
            self.assert_references_exported(title, expr, frozenset({"up"}))

    def test_charts_the_specification_signals(self) -> None:
        """
        Every family of the specification's key areas is charted.
        """
        used = {
            ref.name
            for _, expr in dashboard_expressions(self.dashboard)
            for ref in selectors(expr)
        }
        for family in CHARTED_FAMILIES:
            self.assertIn(family, used)
