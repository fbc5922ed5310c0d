# -*- test-case-name: tests.integration.test_rebalance -*-
"""
Rebalancing on a real cluster: four nodes (erasure 4+2, so two of them
hold two shards of every content) take objects; two nodes join; one
C{anvil-admin worker run-once rebalance} with node 1's environment moves
shards until every content's shard map has the six-node placement's shard
count on every node (one each), the files follow the maps (new ones on the
newcomers, the old ones deleted), the summary counts the moves, and every
object still reads back byte-exact through every node.  Then the daemon's
own worker: three nodes (2+1), a fourth joins, and without any command
the region's rebalancer moves the shards once the membership has settled,
counting them on its C{/metrics}, while GETs stay byte-exact.

The shard maps are read from the regional database directly (psycopg2),
which is what the test compares with L{anvil.storage.placement.assign}.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from anvil.storage.placement import ShardMap, assign
from anvil.worker.rebalance import plan_moves
from tests.integration.cluster import PATIENT_GOSSIP, Cluster, wait_until

KiB = 1024
MiB = 1024 * KiB
STRIPE = 64 * KiB
REGION = "us-west-2"
BUCKET = "growing"


def body(name: str, size: int) -> bytes:
    """Deterministic bytes of C{size}, different for every C{name}."""
    seed = hashlib.sha256(name.encode()).digest()
    block = b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(1024))
    return (block * (size // len(block) + 1))[:size]


#: key -> body: an inline object and sharded ones of one and many stripes.
OBJECTS: dict[str, bytes] = {
    "inline": body("inline", 700),
    **{f"obj-{n}": body(f"obj-{n}", 100 * KiB + n * 37 * KiB) for n in range(10)},
    "big": body("big", 2 * MiB + 3),
}
PARTS = [body("part-1", 5 * MiB), body("part-2", 123 * KiB)]
MULTIPART = "multi"


def shard_files(cluster: Cluster) -> set[tuple[str, str, int]]:
    """(node id, content hash, index) of every committed shard file."""
    found = set()
    for node in cluster.nodes:
        for path in node.shard_files():
            content, index = os.path.basename(path).split(".")
            found.add((node.node_id, content, int(index)))
    return found


def mapped(maps: dict[str, ShardMap]) -> set[tuple[str, str, int]]:
    """(node id, content hash, index) of every shard the maps name."""
    return {(t.node, h, t.index) for h, m in maps.items() for t in m.targets}


class RebalanceClusterTests(SynchronousTestCase):
    """
    Four nodes, then six: one rebalance pass spreads every content over
    the six.
    """

    def setUp(self) -> None:
        self.cluster = Cluster(
            self, 4, k=4, m=2, region=REGION, env={"ANVIL_STRIPE_SIZE": str(STRIPE)}, gossip=PATIENT_GOSSIP
        ).start()

    def put_objects(self, client: Any) -> dict[str, bytes]:
        """Write every object; return key -> bytes expected back."""
        client.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        for key, data in OBJECTS.items():
            client.put_object(Bucket=BUCKET, Key=key, Body=data)
        upload = client.create_multipart_upload(Bucket=BUCKET, Key=MULTIPART)["UploadId"]
        etags = [
            client.upload_part(Bucket=BUCKET, Key=MULTIPART, UploadId=upload, PartNumber=n, Body=part)["ETag"]
            for n, part in enumerate(PARTS, 1)
        ]
        client.complete_multipart_upload(
            Bucket=BUCKET,
            Key=MULTIPART,
            UploadId=upload,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]},
        )
        return {**OBJECTS, MULTIPART: b"".join(PARTS)}

    def assertReadable(self, expected: dict[str, bytes], where: str) -> None:
        """Every object reads back byte-exact through every node."""
        for node in self.cluster.nodes:
            client = self.cluster.client(node)
            for key, data in expected.items():
                got = bytes(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
                self.assertTrue(got == data, f"{key} differs through node {node.index} {where}")

    def test_join_two_then_rebalance(self) -> None:
        """
        After two nodes join, one rebalance pass leaves every content with
        one shard on each of the six nodes, the files where the maps say
        (and nowhere else), and every object readable.
        """
        cluster = self.cluster
        expected = self.put_objects(cluster.client())
        before = cluster.shard_maps()
        old_ids = {n.node_id for n in cluster.nodes}
        self.assertGreaterEqual(len(before), len(OBJECTS))
        for content, shard_map in before.items():
            self.assertEqual(shard_map.nodes(), old_ids, f"{content} spread over the four nodes")
        self.assertEqual(shard_files(cluster), mapped(before))

        for _ in range(2):
            cluster.new_node().start()
        for node in cluster.nodes[4:]:
            node.wait_ready()
        cluster.wait_converged()
        all_ids = sorted(n.node_id for n in cluster.nodes)
        wanted_moves = sum(len(plan_moves(m, all_ids, 6)) for m in before.values())
        # Four nodes, six shards: two nodes hold two of every content, and
        # one of those two shards moves to a newcomer.
        self.assertEqual(wanted_moves, 2 * len(before))

        result = cluster.nodes[0].admin("worker", "run-once", "rebalance", "--json", timeout=300)
        summary = json.loads(result.stdout)
        self.assertEqual(summary["worker"], "rebalance")
        self.assertTrue(summary["complete"], summary)
        self.assertEqual(summary["members"], 6)
        self.assertEqual(summary["contents_checked"], len(before))
        self.assertEqual((summary["failed"], summary["conflicts"], summary["old_left"]), (0, 0, 0), summary)
        self.assertEqual(summary["moves"], wanted_moves)
        self.assertEqual(summary["contents_moved"], len(before))
        self.assertGreater(summary["moved_bytes"], 0)

        after = cluster.shard_maps()
        self.assertEqual(set(after), set(before))
        for content, shard_map in after.items():
            key = bytes.fromhex(shard_map.key)
            self.assertEqual(shard_map.key, before[content].key)
            self.assertEqual(
                Counter(t.node for t in shard_map.targets), Counter(assign(key, all_ids, 6)), content
            )
            self.assertEqual(shard_map.nodes(), set(all_ids))
        self.assertEqual(shard_files(cluster), mapped(after))
        self.assertReadable(expected, "after the rebalance")

        # A second pass finds the cluster balanced.
        again = json.loads(cluster.nodes[3].admin("worker", "run-once", "rebalance", "--json").stdout)
        self.assertEqual((again["moves"], again["contents_checked"]), (0, len(before)))


class DaemonRebalanceTests(SynchronousTestCase):
    """
    The node's own C{rebalance} worker, without any command: three nodes
    (erasure 2+1) and a fourth joining.
    """

    def setUp(self) -> None:
        self.cluster = Cluster(
            self, 3, k=2, m=1, region=REGION, env={"ANVIL_STRIPE_SIZE": str(STRIPE)}, gossip=PATIENT_GOSSIP
        ).start()

    def test_daemon_moves_after_a_join(self) -> None:
        """
        Once a fourth node has joined and the membership has settled, the
        region's rebalancer (the node with the smallest id) moves the
        shards the four-node placement gives the newcomer, counts them on
        its C{/metrics}, and GETs are byte-exact throughout.
        """
        from tests.integration.test_cluster_repair import Reader, metric

        cluster = self.cluster
        client = cluster.client()
        client.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        objects = {f"d-{n}": body(f"d-{n}", 70 * KiB + n * 10 * KiB) for n in range(16)}
        for key, data in objects.items():
            client.put_object(Bucket=BUCKET, Key=key, Body=data)
        before = cluster.shard_maps()
        cluster.new_node().start().wait_ready()
        cluster.wait_converged()
        all_ids = sorted(n.node_id for n in cluster.nodes)
        wanted = sum(len(plan_moves(m, all_ids, 3)) for m in before.values())
        self.assertGreater(wanted, 0)
        rebalancer = next(n for n in cluster.nodes if n.node_id == all_ids[0])

        def balanced() -> bool:
            maps = cluster.shard_maps()
            return all(
                Counter(t.node for t in m.targets) == Counter(assign(bytes.fromhex(m.key), all_ids, 3))
                for m in maps.values()
            )

        with Reader(cluster, BUCKET, objects, cluster.nodes) as reader:
            # A check every 30 s, a pass once the members have been the
            # same for 60 s.
            wait_until(balanced, 240, f"the daemon balancing the shards\n{cluster.logs()}", interval=2.0)
        self.assertEqual(reader.errors[:5], [], f"{len(reader.errors)} failed reads\n{cluster.logs()}")
        self.assertGreater(reader.reads, 0)
        self.assertEqual(metric(rebalancer, "anvil_rebalance_moves_total"), wanted)
        self.assertGreater(metric(rebalancer, "anvil_rebalance_moved_bytes_total"), 0)
        others = [n for n in cluster.nodes if n is not rebalancer]
        self.assertEqual(sum(metric(n, "anvil_rebalance_moves_total") for n in others), 0)
        # The old file goes a moment after the map changes.
        wait_until(
            lambda: shard_files(cluster) == mapped(cluster.shard_maps()),
            30,
            "the shard files following the maps",
        )
