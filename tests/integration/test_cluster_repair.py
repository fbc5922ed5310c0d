# -*- test-case-name: tests.integration.test_cluster_repair -*-
"""
Repair on a real six-node cluster (k=4, m=2, small stripes, frequent
sweeps and task polls), as issue 5 asks: a byte flipped in one shard file
is found by the scrubber and the shard rebuilt; a node removed for good,
or dead for longer than C{ANVIL_DEAD_MEMBER_REPAIR_AFTER}, has all its
shards rebuilt on the others; GETs return the exact bytes throughout, and
the metrics show it.
"""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import psycopg2
from twisted.trial.unittest import SynchronousTestCase

from anvil.storage.shardfile import CorruptShard, ShardReader
from tests.integration.cluster import PATIENT_GOSSIP, Cluster, ClusterNode, wait_until
from tests.integration.nodeproc import metric_value, scrape_metrics
from tests.test_scrub import flip_byte

KiB = 1024
STRIPE = 64 * KiB

#: Worker settings: the daemon's scrubber stays out of the way (the test
#: runs it by hand), sweeps and task polls are frequent.
WORKERS = {
    "ANVIL_STRIPE_SIZE": str(STRIPE),
    "ANVIL_SCRUB_INTERVAL": "3600",
    "ANVIL_SWEEP_INTERVAL": "2",
    "ANVIL_TASK_POLL_INTERVAL": "1",
}


def metric(node: ClusterNode, name: str, **labels: str) -> float:
    """
    One sample of a node's C{/metrics} (0 when absent).
    """
    return metric_value(scrape_metrics(node.url)[1], name, **labels)


class Reader:
    """
    GETs every object over and over in a thread, recording any failure or
    wrong byte, until stopped.
    """

    def __init__(self, cluster: Cluster, bucket: str, objects: dict[str, bytes], nodes: list[ClusterNode]) -> None:
        self._clients = [cluster.client(node) for node in nodes]
        self._bucket = bucket
        self._objects = objects
        self._stop = threading.Event()
        self.errors: list[str] = []
        self.reads = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Reader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        turn = 0
        while not self._stop.is_set():
            client = self._clients[turn % len(self._clients)]
            turn += 1
            for key, body in self._objects.items():
                try:
                    got = client.get_object(Bucket=self._bucket, Key=key)["Body"].read()
                except Exception as e:  # noqa: BLE001 - recorded for the assertion
                    self.errors.append(f"GET {key}: {type(e).__name__}: {e}")
                    continue
                self.reads += 1
                if got != body:
                    self.errors.append(f"GET {key}: wrong bytes ({len(got)} of {len(body)})")


class RepairClusterCase(SynchronousTestCase):
    """
    Six nodes holding eight objects of a few stripes each, and ways to
    look at their shard maps and files.

    @cvar env: the nodes' settings.
    """

    env = WORKERS

    def setUp(self) -> None:
        self.cluster = Cluster(self, 6, env=self.env, gossip=PATIENT_GOSSIP).start()
        self.client = self.cluster.client()
        self.client.create_bucket(Bucket="data")
        self.objects: dict[str, bytes] = {}
        for i in range(8):
            body = os.urandom(3 * STRIPE + 1000 * (i + 1))
            self.objects[f"obj-{i}"] = body
            self.client.put_object(Bucket="data", Key=f"obj-{i}", Body=body)

    # -- looking at the region's contents

    def regional(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """
        Rows of a query on the regional database.
        """
        conn = psycopg2.connect(self.cluster.env["REGIONAL_DATABASE_URL"])
        try:
            with conn, conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall()
        finally:
            conn.close()

    def shard_maps(self) -> dict[str, list[str]]:
        """
        Content hash to the node of each shard index, for contents with
        shard files.
        """
        return {h: [t.node for t in m.targets] for h, m in self.cluster.shard_maps().items()}

    def node_files(self) -> dict[str, dict[tuple[str, int], str]]:
        """
        Node id to the committed shard files on its disk, by (hash, index).
        """
        found: dict[str, dict[tuple[str, int], str]] = {}
        for node in self.cluster.nodes:
            files = {}
            for path in node.shard_files():
                if os.sep + "quarantine" + os.sep in path:
                    continue
                name = os.path.basename(path)
                content_hash, index = name.split(".")
                files[(content_hash, int(index))] = path
            found[node.node_id] = files
        return found

    def sound(self, path: str) -> bool:
        """
        Whether a shard file's header and every block check out.
        """
        try:
            with ShardReader(path) as reader:
                for stripe in range(reader.header.stripe_count):
                    reader.read_block(stripe)
        except (CorruptShard, OSError):
            return False
        return True

    def check_reads(self) -> None:
        """
        Every object reads back exactly.
        """
        for key, body in self.objects.items():
            self.assertEqual(self.client.get_object(Bucket="data", Key=key)["Body"].read(), body, key)

    def total(self, name: str, nodes: list[ClusterNode] | None = None) -> float:
        """
        A sample summed over the C{/metrics} of C{nodes} (default: those running).
        """
        return sum(metric(node, name) for node in nodes or self.cluster.running())


    def whole(self, gone_id: str) -> bool:
        """
        Whether every content's map names six shards, none on C{gone_id}
        or on no node, each present on the disk of the node named.
        """
        maps = self.shard_maps()
        files = self.node_files()
        for content_hash, nodes in maps.items():
            if len(nodes) != 6 or any(n in ("", gone_id) for n in nodes):
                return False
            for index, node in enumerate(nodes):
                if (content_hash, index) not in files.get(node, {}):
                    return False
        return bool(maps)


class ClusterRepairTests(RepairClusterCase):
    """
    Scrub-found corruption and a removed node, repaired on a real cluster.
    """

    def test_flipped_byte_scrubbed_and_repaired(self) -> None:
        """
        A byte flipped in one shard file on node 3 is found by run-once
        scrub with that node's environment, a repair task rebuilds the
        shard (present and sound again where the map says), the repair
        counters move on C{/metrics}, and GETs are byte-exact throughout.
        """
        victim = self.cluster.nodes[2]
        files = self.node_files()[victim.node_id]
        (content_hash, index), path = sorted(files.items())[0]
        flip_byte(path, stripe=1)
        before = self.total("anvil_shard_repairs_total")
        # The scrub runs before any GET: a GET meeting the bad block would
        # queue the same repair itself (tests.integration.test_read_repair).
        result = victim.admin("worker", "run-once", "scrub", "--json")
        summary = json.loads(result.stdout)
        self.assertEqual((summary["corrupt_found"], summary["repairs_enqueued"]), (1, 1), summary)
        with Reader(self.cluster, "data", self.objects, self.cluster.nodes) as reader:

            def repaired() -> bool:
                node_id = self.shard_maps()[content_hash][index]
                holder = self.node_files().get(node_id, {})
                return (content_hash, index) in holder and self.sound(holder[(content_hash, index)])

            wait_until(repaired, 60, f"shard {index} of {content_hash} rebuilt\n{self.cluster.logs()}")
            wait_until(
                lambda: self.total("anvil_shard_repairs_total") >= before + 1,
                30,
                "anvil_shard_repairs_total moving",
            )
            self.assertGreater(self.total("anvil_shard_repaired_bytes_total"), 0)
            time.sleep(1)
        self.assertEqual(reader.errors, [])
        self.assertGreater(reader.reads, 0)
        self.check_reads()
        tasks = json.loads(victim.admin("task", "list", "--kind", "repair", "--json").stdout)
        self.assertTrue(tasks and all(t["state"] == "done" for t in tasks), tasks)

    def test_missing_file_swept_and_repaired(self) -> None:
        """
        A shard file removed from node 2's disk is found missing by a sweep
        (a daemon's, every two seconds here, or run-once sweep with node
        1's environment, which reads the peers' listings over mutual TLS)
        and rebuilt by a repair task; GETs stay exact, and a sweep then
        finds nothing missing.
        """
        holder = self.cluster.nodes[1]
        (content_hash, index), path = sorted(self.node_files()[holder.node_id].items())[0]
        os.unlink(path)
        with Reader(self.cluster, "data", self.objects, self.cluster.nodes) as reader:
            summary = json.loads(self.cluster.nodes[0].admin("worker", "run-once", "sweep", "--json").stdout)
            self.assertTrue(summary["swept"], summary)
            self.assertEqual(summary["contents"], len(self.shard_maps()), summary)
            self.assertEqual(summary["unverified_nodes"], [], summary)
            # A daemon's sweep may have found it first (and its repair have
            # run already): this pass finds the shard missing or none.
            self.assertIn(summary["shards_missing"], (0, 1), summary)
            repair = json.loads(self.cluster.nodes[0].admin("worker", "run-once", "repair", "--json").stdout)
            self.assertEqual((repair["failed"], repair["retry"]), (0, 0), repair)

            def repaired() -> bool:
                node_id = self.shard_maps()[content_hash][index]
                files = self.node_files().get(node_id, {})
                return (content_hash, index) in files and self.sound(files[(content_hash, index)])

            wait_until(repaired, 60, f"shard {index} of {content_hash} rebuilt\n{self.cluster.logs()}")
        self.assertEqual(reader.errors, [])
        self.check_reads()
        tasks = json.loads(holder.admin("task", "list", "--kind", "repair", "--json").stdout)
        # Found by a sweep, or by one of the reader's GETs (which queues the
        # same repair): either way one repair per detection, all done.
        swept = [t for t in tasks if t["payload"]["content_hash"] == content_hash]
        self.assertTrue(
            swept and all(t["payload"]["reason"].startswith(("sweep:", "read:")) for t in swept), tasks
        )
        self.assertTrue(all(t["state"] == "done" for t in swept), swept)
        after = json.loads(self.cluster.nodes[3].admin("worker", "run-once", "sweep", "--json").stdout)
        self.assertEqual((after["shards_missing"], after["repairs_enqueued"]), (0, 0), after)

    def test_removed_node_shards_rebuilt(self) -> None:
        """
        A stopped node removed with C{anvil-admin cluster remove} has all
        its shards rebuilt on the five others within a bounded time: every
        content's map names six shards on remaining nodes, each file is on
        that node's disk and sound; GETs keep working throughout; a sweep
        then counts every content at six healthy shards, on C{/metrics}
        too.
        """
        gone = self.cluster.nodes[5]
        gone_id = gone.node_id
        self.assertTrue(any(gone_id in nodes for nodes in self.shard_maps().values()))
        survivors = self.cluster.nodes[:5]
        with Reader(self.cluster, "data", self.objects, survivors) as reader:
            self.assertEqual(gone.stop(), 0)
            wait_until(
                lambda: self.cluster.states(survivors[0]).get(gone_id) in ("left", "dead"),
                60,
                "node 1 seeing node 6 gone",
            )
            survivors[0].admin("cluster", "remove", gone_id)
            started = time.monotonic()
            wait_until(
                lambda: self.whole(gone_id), 120, f"every content back to 6 shards\n{self.cluster.logs()}",
                interval=1.0,
            )
            elapsed = time.monotonic() - started
            files = self.node_files()
            for content_hash, nodes in self.shard_maps().items():
                for index, node in enumerate(nodes):
                    self.assertTrue(self.sound(files[node][(content_hash, index)]), (content_hash, index))
        self.assertEqual(reader.errors, [])
        self.assertGreater(reader.reads, 0)
        self.check_reads()
        contents = len(self.shard_maps())
        summary = json.loads(survivors[0].admin("worker", "run-once", "sweep", "--json").stdout)
        self.assertEqual((summary["shards_missing"], summary["contents"]), (0, contents), summary)
        self.assertEqual(summary["redundancy"]["6"], contents, summary)
        self.assertEqual(sum(summary["redundancy"].values()), contents, summary)
        self.assertGreater(self.total("anvil_shard_repairs_total", survivors), 0)
        for node in survivors:
            wait_until(
                lambda: metric(node, "anvil_objects_by_redundancy", healthy_shards="6") == contents
                and metric(node, "anvil_shards_missing") == 0,
                30,
                f"node {node.index}'s /metrics showing every content at 6 healthy shards",
            )
        self.assertLess(elapsed, 120)


class DeadMemberRepairTests(RepairClusterCase):
    """
    A member dead for longer than C{ANVIL_DEAD_MEMBER_REPAIR_AFTER} is
    treated as removed.
    """

    env = {**WORKERS, "ANVIL_DEAD_MEMBER_REPAIR_AFTER": "4"}

    def test_dead_member_removed_and_rebuilt(self) -> None:
        """
        After C{kill -9} of node 6, a sweep sees it dead, and once it has
        been dead for the configured four seconds it is recorded in
        C{removed_nodes} and every shard it held is rebuilt on the others;
        GETs keep working throughout.
        """
        gone = self.cluster.nodes[5]
        gone_id = gone.node_id
        survivors = self.cluster.nodes[:5]
        with Reader(self.cluster, "data", self.objects, survivors) as reader:
            gone.kill()
            killed = time.monotonic()
            wait_until(
                lambda: self.whole(gone_id), 120, f"every content back to 6 shards\n{self.cluster.logs()}",
                interval=1.0,
            )
            elapsed = time.monotonic() - killed
        conn = psycopg2.connect(self.cluster.env["GLOBAL_DATABASE_URL"])
        try:
            with conn, conn.cursor() as cur:
                cur.execute("SELECT node_id FROM removed_nodes")
                self.assertEqual(cur.fetchall(), [(gone_id,)])
        finally:
            conn.close()
        # Not before the member had been dead for the configured time.
        self.assertGreater(elapsed, 4)
        self.assertEqual(reader.errors, [])
        self.check_reads()
