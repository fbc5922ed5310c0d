# -*- test-case-name: tests.test_metrics -*-
"""
Tests for L{anvil.metrics}.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from twisted.trial.unittest import SynchronousTestCase

from anvil.metrics import REQUEST_DURATION_BUCKETS, Metrics, status_class


def scrape(metrics: Metrics) -> dict[str, list[Sample]]:
    """
    Render C{metrics} and parse the text back, as Prometheus would.

    @return: Samples by family name.
    """
    body, _ = metrics.render()
    return {
        family.name: family.samples
        for family in text_string_to_metric_families(body.decode("utf-8"))
    }


def sample_value(
    metrics: Metrics, family: str, sample_name: str, **labels: str
) -> float | None:
    """
    Scrape C{metrics} and return one sample's value.

    @param family: The family name as the parser reports it.
    @param sample_name: The sample's full name (with C{_total},
        C{_bucket}, ... suffix).
    @param labels: The sample's exact label set.
    @return: The value, or C{None} if there is no such sample.
    """
    for sample in scrape(metrics).get(family, []):
        if sample.name == sample_name and sample.labels == labels:
            return sample.value
    return None


def requests_total(metrics: Metrics, api: str, operation: str, status: str) -> float | None:
    """
    The value of C{anvil_api_requests_total} for one label set.
    """
    return sample_value(
        metrics,
        "anvil_api_requests",
        "anvil_api_requests_total",
        api=api,
        operation=operation,
        status=status,
    )


class StatusClassTests(SynchronousTestCase):
    """
    Tests for L{status_class}.
    """

    def test_classes(self) -> None:
        """
        Codes map to their hundred's class.
        """
        self.assertEqual(
            [status_class(c) for c in (200, 206, 304, 404, 499, 500, 503)],
            ["2xx", "2xx", "3xx", "4xx", "4xx", "5xx", "5xx"],
        )

    def test_impossible_codes_are_server_errors(self) -> None:
        """
        Codes that cannot be a final HTTP status count as server errors.
        """
        self.assertEqual([status_class(c) for c in (0, 100, 600, 999)], ["5xx"] * 4)


class MetricsTests(SynchronousTestCase):
    """
    Tests for L{Metrics}.
    """

    def test_render_content_type(self) -> None:
        """
        The rendering comes with the Prometheus text format content type.
        """
        _, content_type = Metrics().render()
        self.assertTrue(content_type.startswith("text/plain; version="), content_type)

    def test_families_present(self) -> None:
        """
        The API families, node gauges and the process/platform/GC collectors
        are all exported.
        """
        families = scrape(Metrics())
        for name in (
            "anvil_api_request_duration_seconds",
            "anvil_api_requests",
            "anvil_node_ready",
            "anvil_node_info",
            "process_cpu_seconds",
            "python_info",
            "python_gc_objects_collected",
        ):
            self.assertIn(name, families)

    def test_observe_request_counts_by_status_class(self) -> None:
        """
        Each observed request increments the counter of its API, operation
        and status class, and only that one.
        """
        metrics = Metrics()
        metrics.observe_request("s3", "PutObject", 200, 0.1)
        metrics.observe_request("s3", "PutObject", 503, 0.1)
        metrics.observe_request("s3", "PutObject", 500, 0.1)
        metrics.observe_request("s3", "GetObject", 404, 0.1)
        self.assertEqual(requests_total(metrics, "s3", "PutObject", "2xx"), 1.0)
        self.assertEqual(requests_total(metrics, "s3", "PutObject", "5xx"), 2.0)
        self.assertEqual(requests_total(metrics, "s3", "GetObject", "4xx"), 1.0)
        self.assertIsNone(requests_total(metrics, "s3", "GetObject", "2xx"))

    def test_observe_request_histogram(self) -> None:
        """
        Durations land in the right buckets of the latency histogram, with
        count and sum.
        """
        metrics = Metrics()
        metrics.observe_request("s3", "GetObject", 200, 0.003)
        metrics.observe_request("s3", "GetObject", 200, 45.0)
        metrics.observe_request("s3", "GetObject", 200, 120.0)

        def bucket(le: str) -> float | None:
            return sample_value(
                metrics,
                "anvil_api_request_duration_seconds",
                "anvil_api_request_duration_seconds_bucket",
                api="s3",
                operation="GetObject",
                le=le,
            )

        self.assertEqual(bucket("0.001"), 0.0)
        self.assertEqual(bucket("0.005"), 1.0)
        self.assertEqual(bucket("30.0"), 1.0)
        self.assertEqual(bucket("60.0"), 2.0)
        self.assertEqual(bucket("+Inf"), 3.0)
        labels = {"api": "s3", "operation": "GetObject"}
        self.assertEqual(
            sample_value(
                metrics,
                "anvil_api_request_duration_seconds",
                "anvil_api_request_duration_seconds_count",
                **labels,
            ),
            3.0,
        )
        total = sample_value(
            metrics,
            "anvil_api_request_duration_seconds",
            "anvil_api_request_duration_seconds_sum",
            **labels,
        )
        assert total is not None
        self.assertAlmostEqual(total, 165.003)

    def test_buckets_span_millisecond_to_minute(self) -> None:
        """
        The histogram buckets run from 1 ms to 60 s in increasing order.
        """
        self.assertEqual(REQUEST_DURATION_BUCKETS[0], 0.001)
        self.assertEqual(REQUEST_DURATION_BUCKETS[-1], 60.0)
        self.assertEqual(list(REQUEST_DURATION_BUCKETS), sorted(REQUEST_DURATION_BUCKETS))

    def test_negative_duration_recorded_as_zero(self) -> None:
        """
        A negative duration (the clock stepped back) is recorded as zero
        instead of raising or skewing the sum.
        """
        metrics = Metrics()
        metrics.observe_request("s3", "HeadObject", 200, -5.0)
        self.assertEqual(
            sample_value(
                metrics,
                "anvil_api_request_duration_seconds",
                "anvil_api_request_duration_seconds_sum",
                api="s3",
                operation="HeadObject",
            ),
            0.0,
        )

    def test_node_operations_declared(self) -> None:
        """
        The node endpoints' series exist at zero before any request, every
        status class included.
        """
        metrics = Metrics()
        for operation in ("Health", "Ready", "Metrics"):
            for status in ("2xx", "3xx", "4xx", "5xx"):
                self.assertEqual(requests_total(metrics, "node", operation, status), 0.0)

    def test_declare_operations(self) -> None:
        """
        Declared operations get zero-valued series for every status class
        and an empty histogram.
        """
        metrics = Metrics()
        self.assertIsNone(requests_total(metrics, "s3", "DeleteObject", "5xx"))
        metrics.declare_operations("s3", ["DeleteObject"])
        self.assertEqual(requests_total(metrics, "s3", "DeleteObject", "5xx"), 0.0)
        self.assertEqual(
            sample_value(
                metrics,
                "anvil_api_request_duration_seconds",
                "anvil_api_request_duration_seconds_count",
                api="s3",
                operation="DeleteObject",
            ),
            0.0,
        )

    def test_node_ready(self) -> None:
        """
        C{anvil_node_ready} starts at 0 and follows L{Metrics.set_ready}.
        """
        metrics = Metrics()
        self.assertEqual(sample_value(metrics, "anvil_node_ready", "anvil_node_ready"), 0.0)
        metrics.set_ready(True)
        self.assertEqual(sample_value(metrics, "anvil_node_ready", "anvil_node_ready"), 1.0)
        metrics.set_ready(False)
        self.assertEqual(sample_value(metrics, "anvil_node_ready", "anvil_node_ready"), 0.0)

    def test_node_info_replaced(self) -> None:
        """
        C{anvil_node_info} has exactly one sample, labelled with the latest
        identity, with value 1.
        """
        metrics = Metrics()
        self.assertEqual(scrape(metrics)["anvil_node_info"], [])
        metrics.set_node_info("0.1.0", "us-east-1", "node-a")
        metrics.set_node_info("0.1.0", "eu-west-1", "node-b")
        self.assertEqual(
            scrape(metrics)["anvil_node_info"],
            [
                Sample(
                    "anvil_node_info",
                    {"version": "0.1.0", "region": "eu-west-1", "node_id": "node-b"},
                    1.0,
                )
            ],
        )

    def test_instances_independent(self) -> None:
        """
        Two Metrics objects in one process have separate registries: what
        one records does not show in the other, and creating the second does
        not collide with the first's registrations.
        """
        first, second = Metrics(), Metrics()
        first.observe_request("s3", "PutObject", 200, 0.01)
        first.set_ready(True)
        self.assertEqual(requests_total(first, "s3", "PutObject", "2xx"), 1.0)
        self.assertIsNone(requests_total(second, "s3", "PutObject", "2xx"))
        self.assertEqual(sample_value(second, "anvil_node_ready", "anvil_node_ready"), 0.0)

    def test_nothing_on_global_registry(self) -> None:
        """
        Creating a Metrics object registers nothing on prometheus_client's
        process-wide default registry.
        """
        from prometheus_client import REGISTRY

        Metrics().observe_request("s3", "PutObject", 200, 0.01)
        self.assertIsNone(
            REGISTRY.get_sample_value(
                "anvil_api_requests_total",
                {"api": "s3", "operation": "PutObject", "status": "2xx"},
            )
        )
