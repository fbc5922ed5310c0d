# -*- test-case-name: tests.test_metrics -*-
"""
Prometheus metrics of one Anvil node.

Every metric the node exports is defined here, on a L{Metrics} object that
owns its own L{CollectorRegistry}. Nothing is registered on
prometheus_client's process-wide default registry, so several nodes can run
in one process (the in-process cluster tests do) without their numbers
mixing or their registrations colliding.

Code elsewhere records at domain boundaries through the methods below (the
web layer calls L{Metrics.observe_request} once per finished request); it
never defines metrics of its own. Names follow
C{anvil_<subsystem>_<thing>_<unit>} and are part of the operator contract
(alert rules and dashboards in C{etc/} use them), so renaming one is a
breaking change.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    # Only for the annotation: the collector imports much of the node.
    from anvil.worker.gc import GcReport

API_S3 = "s3"
"""The C{api} label value of requests to the S3 API."""

API_NODE = "node"
"""The C{api} label value of the node's own endpoints (C{/}, C{/ready}, C{/metrics})."""

NODE_OPERATIONS = ("Health", "Ready", "Metrics")
"""The C{operation} label values of the node endpoints."""

STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx")
"""The values the C{status} label takes."""

REQUEST_DURATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
"""
Upper bounds (seconds) of the request latency histogram buckets.

From 1 ms (a cached HEAD or a health probe) to 60 s (a large object
streamed to a slow client); anything longer lands in C{+Inf}, which is still
counted in C{_count} and C{_sum}.
"""


def status_class(status_code: int) -> str:
    """
    Map an HTTP status code to the C{status} label value.

    Keeping the class rather than the code bounds the label's cardinality
    while keeping 4xx (client errors) and 5xx (our errors) apart, which is
    what alerting needs.

    @param status_code: The HTTP status code sent (or, for a request the
        client abandoned, the pseudo-code the web layer chose).
    @return: C{"2xx"}, C{"3xx"}, C{"4xx"} or C{"5xx"}. A final response
        never has a 1xx code, and nothing outside 100-599 is HTTP, so any
        code outside 200-599 can only come from a bug and counts as
        C{"5xx"}.
    """
    if 200 <= status_code < 600:
        return f"{status_code // 100}xx"
    return "5xx"


class Metrics:
    """
    The metrics of one node, on a private registry.

    @ivar registry: The registry holding every collector of this node;
        L{render} serialises it.
    @ivar api_request_duration: Histogram C{anvil_api_request_duration_seconds}
        with labels C{api}, C{operation}.
    @ivar api_requests: Counter C{anvil_api_requests_total} with labels
        C{api}, C{operation}, C{status}.
    @ivar node_ready: Gauge C{anvil_node_ready}: 1 when the last readiness
        check passed, 0 otherwise (also before the first check).
    @ivar node_info: Gauge C{anvil_node_info} with labels C{version},
        C{region}, C{node_id}; one series with value 1 once
        L{set_node_info} was called.
    @ivar shards_corrupt: Counter C{anvil_shards_corrupt_total}.
    @ivar storage_capacity: Gauge C{anvil_storage_capacity_bytes} with label
        C{path}: size of the filesystem holding each data directory.
    @ivar storage_used: Gauge C{anvil_storage_used_bytes} with label
        C{path}: bytes in use on that filesystem (by anything, not only
        shards: what C{statvfs} reports, which is what fills the disk).
    @ivar tenant_stored: Gauge C{anvil_tenant_stored_bytes} with label
        C{tenant}.
    @ivar bucket_stored: Gauge C{anvil_bucket_stored_bytes} with labels
        C{tenant}, C{bucket}.
    @ivar bucket_objects: Gauge C{anvil_bucket_objects} with labels
        C{tenant}, C{bucket}.
    @ivar cluster_members: Gauge C{anvil_cluster_members} with label
        C{state}.
    @ivar gc_passes: Counter C{anvil_gc_passes_total}.
    @ivar gc_removed_contents: Counter C{anvil_gc_removed_contents_total}.
    @ivar gc_freed_bytes: Counter C{anvil_gc_freed_bytes_total}.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # The standard process_*, python_info and python_gc_* families,
        # bound to this registry instead of the global one.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

        self.api_request_duration = Histogram(
            "anvil_api_request_duration_seconds",
            "Time from receiving a request line to the end of its response, "
            "by API and operation.",
            ["api", "operation"],
            buckets=REQUEST_DURATION_BUCKETS,
            registry=self.registry,
        )
        # prometheus_client appends "_total" to counters itself; the
        # exported name is anvil_api_requests_total.
        self.api_requests = Counter(
            "anvil_api_requests",
            "Finished API requests by API, operation and status class "
            "(4xx also counts requests the client abandoned).",
            ["api", "operation", "status"],
            registry=self.registry,
        )
        self.node_ready = Gauge(
            "anvil_node_ready",
            "1 if the last readiness check of this node passed, else 0.",
            registry=self.registry,
        )
        self.node_info = Gauge(
            "anvil_node_info",
            "Constant 1, labelled with this node's version, region and id.",
            ["version", "region", "node_id"],
            registry=self.registry,
        )
        # Counters appear with value 0 from the start, so rate() and alerts
        # work before the first event.
        self.shards_corrupt = Counter(
            "anvil_shards_corrupt",
            "Corrupt or unreadable shard blocks found (on read or by the "
            "scrubber); each is served from parity instead.",
            registry=self.registry,
        )
        self.declare_operations(API_NODE, NODE_OPERATIONS)
        self._usage_metrics()

    def _usage_metrics(self) -> None:
        """
        Define the storage, usage, membership and collector families.

        The gauges are set by L{anvil.worker.stats.UsageStats} every few
        seconds, never computed per scrape: a scrape must not cost a
        database aggregate or a disk syscall.
        """
        self.storage_capacity = Gauge(
            "anvil_storage_capacity_bytes",
            "Size of the filesystem holding each shard data directory (statvfs).",
            ["path"],
            registry=self.registry,
        )
        self.storage_used = Gauge(
            "anvil_storage_used_bytes",
            "Bytes in use on the filesystem holding each shard data directory "
            "(statvfs; by anything, not only shards).",
            ["path"],
            registry=self.registry,
        )
        self.tenant_stored = Gauge(
            "anvil_tenant_stored_bytes",
            "Logical bytes of a tenant's live objects in this node's region.",
            ["tenant"],
            registry=self.registry,
        )
        self.bucket_stored = Gauge(
            "anvil_bucket_stored_bytes",
            "Logical bytes of a bucket's live objects.",
            ["tenant", "bucket"],
            registry=self.registry,
        )
        self.bucket_objects = Gauge(
            "anvil_bucket_objects",
            "Live objects in a bucket.",
            ["tenant", "bucket"],
            registry=self.registry,
        )
        self.cluster_members = Gauge(
            "anvil_cluster_members",
            "Cluster members this node knows of, by SWIM state.",
            ["state"],
            registry=self.registry,
        )
        self.gc_passes = Counter(
            "anvil_gc_passes",
            "Garbage collection passes finished.",
            registry=self.registry,
        )
        self.gc_removed_contents = Counter(
            "anvil_gc_removed_contents",
            "Unreferenced contents (with their shard files) the collector removed.",
            registry=self.registry,
        )
        self.gc_freed_bytes = Counter(
            "anvil_gc_freed_bytes",
            "Logical bytes of the contents the collector removed.",
            registry=self.registry,
        )

        self._maintenance_metrics()

    def _maintenance_metrics(self) -> None:
        """
        Define the cluster-event, task-queue, repair and redundancy families
        (ARCHITECTURE sections 6-8).
        """
        self.cluster_member_events = Counter(
            "anvil_cluster_member_events",
            "Membership changes this node observed, by event (join, leave, "
            "failure, recovery, suspect): peer churn.",
            ["event"],
            registry=self.registry,
        )
        for event in ("join", "leave", "failure", "recovery", "suspect"):
            self.cluster_member_events.labels(event=event)
        self.tasks = Gauge(
            "anvil_tasks",
            "Tasks in the queue, by kind and state (refreshed periodically).",
            ["kind", "state"],
            registry=self.registry,
        )
        self.task_runs = Counter(
            "anvil_task_runs",
            "Task runs finished on this node, by kind and outcome (done, "
            "retry, failed, lost).",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.shards_missing = Gauge(
            "anvil_shards_missing",
            "Shards recorded in shard maps that the last sweep found missing "
            "(on dead or removed members, or files gone).",
            registry=self.registry,
        )
        self.shard_repairs = Counter(
            "anvil_shard_repairs",
            "Shards rebuilt from healthy ones and placed anew.",
            registry=self.registry,
        )
        self.shard_repaired_bytes = Counter(
            "anvil_shard_repaired_bytes",
            "Bytes of shards rebuilt by repair.",
            registry=self.registry,
        )
        self.rebalance_moves = Counter(
            "anvil_rebalance_moves",
            "Shards moved towards the current placement.",
            registry=self.registry,
        )
        self.rebalance_moved_bytes = Counter(
            "anvil_rebalance_moved_bytes",
            "Bytes of shards moved by rebalancing.",
            registry=self.registry,
        )
        self.objects_by_redundancy = Gauge(
            "anvil_objects_by_redundancy",
            "Contents of this region by number of healthy shards (k+m is full "
            "redundancy; below k is lost), from the last sweep.",
            ["healthy_shards"],
            registry=self.registry,
        )
        self.objects_by_redundancy_state = Gauge(
            "anvil_objects_by_redundancy_state",
            "Contents of this region by what their healthy shards leave them, "
            "judged with each content's own k and m, from the last sweep: full "
            "(k+m healthy), degraded (more than k), no_spare (exactly k: one "
            "more loss makes them unreadable), lost (fewer than k).",
            ["state"],
            registry=self.registry,
        )
        self.peer_requests = Counter(
            "anvil_peer_requests",
            "Requests this node made to peers' cluster listeners, by kind "
            "(gossip, shard_put, shard_get, shard_commit, ...) and outcome "
            "(ok, error, timeout).",
            ["kind", "outcome"],
            registry=self.registry,
        )

    def record_gc(self, report: GcReport) -> None:
        """
        Count one finished garbage collection pass.

        @param report: What the pass removed.
        """
        self.gc_passes.inc()
        self.gc_removed_contents.inc(report.contents_removed)
        self.gc_freed_bytes.inc(report.bytes_freed)

    def declare_operations(self, api: str, operations: Iterable[str]) -> None:
        """
        Create the request series of known operations at zero.

        A series that does not exist yet is invisible to C{rate()} and to
        alert rules, so the first 5xx of an operation would only show up on
        the second scrape after it. Declaring every operation (and every
        status class) up front makes the first error count.

        @param api: The C{api} label value, e.g. L{API_S3}.
        @param operations: The operation names, e.g. C{"PutObject"}.
        """
        for operation in operations:
            self.api_request_duration.labels(api, operation)
            for status in STATUS_CLASSES:
                self.api_requests.labels(api, operation, status)

    def observe_request(
        self, api: str, operation: str, status_code: int, seconds: float
    ) -> None:
        """
        Record one finished request.

        @param api: L{API_S3} or L{API_NODE}.
        @param operation: The operation name (C{"PutObject"}, C{"Health"},
            ...). It becomes a label value, so callers must pass one of a
            small fixed set of names, never anything taken from the request.
        @param status_code: The HTTP status code of the response.
        @param seconds: How long the request took; negative values (a clock
            stepping backwards) are recorded as 0.
        """
        self.api_request_duration.labels(api, operation).observe(max(seconds, 0.0))
        self.api_requests.labels(api, operation, status_class(status_code)).inc()

    def set_ready(self, ready: bool) -> None:
        """
        Record the outcome of the latest readiness check.

        @param ready: Whether every readiness check passed.
        """
        self.node_ready.set(1 if ready else 0)

    def set_node_info(self, version: str, region: str, node_id: str) -> None:
        """
        Publish this node's identity as C{anvil_node_info}.

        Calling it again replaces the previous series rather than adding a
        second one, so the family always has exactly one sample.

        @param version: The Anvil version (C{anvil.__version__}).
        @param region: The region the node serves.
        @param node_id: The node's cluster identity.
        """
        self.node_info.clear()
        self.node_info.labels(version, region, node_id).set(1)

    def render(self) -> tuple[bytes, str]:
        """
        Serialise every metric in the Prometheus text exposition format.

        @return: The body and the C{Content-Type} value to serve it with.
        """
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
