# -*- test-case-name: tests.integration.test_metrics_families -*-
"""
Every metric family issue 5's contract names, scraped from a real node's
C{/metrics} and parsed with prometheus-client's own parser, exists from the
start and moves with the actions that should move it.

Movements that need several nodes (member events, rebalance moves, shard
repairs after a member is removed) are checked where those actions happen:
tests.test_cluster_service, tests.integration.test_rebalance and
tests.integration.test_cluster_repair.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.cluster import wait_until
from tests.integration.nodeproc import NodeProcess, metric_value, scrape_metrics, short_tmpdir

#: Family name (as parsed: counters without C{_total}) -> its label names.
CONTRACT = {
    "anvil_api_request_duration_seconds": {"api", "operation"},
    "anvil_api_requests": {"api", "operation", "status"},
    "anvil_cluster_members": {"state"},
    "anvil_cluster_member_events": {"event"},
    "anvil_storage_capacity_bytes": {"path"},
    "anvil_storage_used_bytes": {"path"},
    "anvil_tenant_stored_bytes": {"tenant"},
    "anvil_bucket_stored_bytes": {"tenant", "bucket"},
    "anvil_bucket_objects": {"tenant", "bucket"},
    "anvil_tasks": {"kind", "state"},
    "anvil_task_runs": {"kind", "outcome"},
    "anvil_shards_missing": set(),
    "anvil_shards_corrupt": set(),
    "anvil_shard_repairs": set(),
    "anvil_shard_repaired_bytes": set(),
    "anvil_rebalance_moves": set(),
    "anvil_rebalance_moved_bytes": set(),
    "anvil_objects_by_redundancy": {"healthy_shards"},
    "anvil_objects_by_redundancy_state": {"state"},
}


class MetricFamiliesTests(SynchronousTestCase):
    """
    The contract's metric families on a real node.
    """

    def test_families_exist_and_move(self) -> None:
        """
        Every family exists at start; requests move the request counters and
        latency histogram by operation and status class; stored data moves
        the tenant and bucket gauges; a corrupt shard met by a GET moves the
        corrupt counter, a repair task runs (task counters and repair
        counters move); a sweep sets the redundancy gauge.
        """
        from botocore.exceptions import ClientError

        node = NodeProcess(
            self, short_tmpdir(self), {"ANVIL_STRIPE_SIZE": str(64 * 1024), "ANVIL_SWEEP_INTERVAL": "2"}
        )
        node.start().wait_ready(90)
        names, before = scrape_metrics(node.url)
        for family in CONTRACT:
            self.assertIn(family, names)
        self.assertEqual(metric_value(before, "anvil_cluster_members", state="alive"), 1.0)
        data_dir = os.path.realpath(node.data_dir)
        self.assertGreater(metric_value(before, "anvil_storage_capacity_bytes", path=data_dir), 0)
        self.assertGreater(metric_value(before, "anvil_storage_used_bytes", path=data_dir), 0)

        client = node.client()
        client.create_bucket(Bucket="metered")
        body = hashlib.sha256(b"metered").digest() * 8192  # 256 KiB, four stripes
        client.put_object(Bucket="metered", Key="a", Body=body)
        with self.assertRaises(ClientError):
            client.get_object(Bucket="metered", Key="missing")
        _, after = scrape_metrics(node.url)
        put_ok = dict(api="s3", operation="PutObject", status="2xx")
        self.assertEqual(metric_value(after, "anvil_api_requests_total", **put_ok) - metric_value(before, "anvil_api_requests_total", **put_ok), 1)
        self.assertEqual(metric_value(after, "anvil_api_requests_total", api="s3", operation="GetObject", status="4xx"), 1)
        self.assertGreaterEqual(
            metric_value(after, "anvil_api_request_duration_seconds_count", api="s3", operation="PutObject"), 1
        )

        # Usage gauges are refreshed every 30 seconds, not per scrape.
        def bucket_sample(name: str, samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> float:
            found = [v for (n, labels), v in samples.items() if n == name and ("bucket", "metered") in labels]
            return found[0] if found else -1.0

        wait_until(
            lambda: bucket_sample("anvil_bucket_stored_bytes", scrape_metrics(node.url)[1]) == len(body),
            45,
            "anvil_bucket_stored_bytes of the bucket",
        )
        _, now = scrape_metrics(node.url)
        self.assertEqual(bucket_sample("anvil_bucket_objects", now), 1)
        self.assertTrue(any(n == "anvil_tenant_stored_bytes" and v >= len(body) for (n, _), v in now.items()))

        content = hashlib.sha256(body).hexdigest()
        [path] = glob.glob(os.path.join(node.data_dir, "shards", "*", "*", f"{content}.0"))
        with open(path, "r+b") as f:
            f.seek(300)
            byte = f.read(1)
            f.seek(300)
            f.write(bytes([byte[0] ^ 0x55]))
        self.assertEqual(client.get_object(Bucket="metered", Key="a")["Body"].read(), body)

        def repaired() -> bool:
            _, now = scrape_metrics(node.url)
            return (
                metric_value(now, "anvil_shard_repairs_total") >= 1
                and metric_value(now, "anvil_task_runs_total", kind="repair", outcome="done") >= 1
            )

        wait_until(repaired, 60, "the repair of the corrupt shard, counted")
        _, now = scrape_metrics(node.url)
        self.assertGreaterEqual(metric_value(now, "anvil_shards_corrupt_total"), 1)
        self.assertGreater(metric_value(now, "anvil_shard_repaired_bytes_total"), 0)

        def queue_gauge() -> bool:
            _, now = scrape_metrics(node.url)
            return metric_value(now, "anvil_tasks", kind="repair", state="done") >= 1

        wait_until(queue_gauge, 45, "anvil_tasks counting the done repair")

        summary = json.loads(node.admin("worker", "run-once", "sweep", "--json").stdout)
        self.assertEqual(summary["shards_missing"], 0, summary)
        # The node's own sweep worker (every 2 s here) publishes the gauges.
        wait_until(
            lambda: metric_value(scrape_metrics(node.url)[1], "anvil_objects_by_redundancy", healthy_shards="6") == 1,
            30,
            "anvil_objects_by_redundancy counting the object at full redundancy",
        )
        _, now = scrape_metrics(node.url)
        self.assertEqual(metric_value(now, "anvil_objects_by_redundancy", healthy_shards="5"), 0)
        self.assertEqual(metric_value(now, "anvil_objects_by_redundancy_state", state="full"), 1)
        self.assertEqual(metric_value(now, "anvil_objects_by_redundancy_state", state="degraded"), 0)
        self.assertEqual(metric_value(now, "anvil_shards_missing"), 0)
