# -*- test-case-name: tests.integration.test_cluster_s3 -*-
"""
A cluster of six real nodes (erasure 4+2) on one real PostgreSQL, driven
with boto3: objects of several sizes (empty, inline, below one stripe, many
stripes, multipart) have their shards spread over the nodes; with any two
nodes down every GET is byte-exact; with a third down GETs of sharded
objects fail with a 503-class S3 error, never with wrong bytes; once the
nodes are back everything reads again.

Stripes are 256 KiB here so a few MiB make many stripes quickly.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from botocore.exceptions import ClientError
from twisted.trial.unittest import SynchronousTestCase

from tests.integration.cluster import Cluster, ClusterNode

KiB = 1024
MiB = 1024 * KiB
STRIPE = 256 * KiB
REGION = "eu-central-1"
BUCKET = "spread"


def body(name: str, size: int) -> bytes:
    """Deterministic bytes of C{size}, different for every C{name}."""
    seed = hashlib.sha256(name.encode()).digest()
    block = b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(2048))
    return (block * (size // len(block) + 1))[:size]


#: key -> body of the single-PUT objects.
OBJECTS: dict[str, bytes] = {
    "empty": b"",
    "inline": body("inline", 1000),
    "below-one-stripe": body("below-one-stripe", 200 * KiB),
    "many-stripes": body("many-stripes", 5 * MiB + 12345),
}

#: The parts of the multipart object (the last may be short).
PARTS = [body("part-1", 5 * MiB), body("part-2", 5 * MiB), body("part-3", 700 * KiB + 3)]
MULTIPART_KEY = "multipart"

#: Objects stored as shards (not inline in the database).
SHARDED = ["below-one-stripe", "many-stripes", MULTIPART_KEY]


def read(client: Any, key: str, **kwargs: Any) -> bytes:
    """GET an object (or a range of it) and read the whole body."""
    response = client.get_object(Bucket=BUCKET, Key=key, **kwargs)
    return bytes(response["Body"].read())


class ClusterS3Tests(SynchronousTestCase):
    """
    Six nodes, 4+2: placement across nodes, degraded reads, clean failure
    beyond m, recovery.
    """

    def setUp(self) -> None:
        self.cluster = Cluster(
            self,
            6,
            k=4,
            m=2,
            region=REGION,
            env={"ANVIL_STRIPE_SIZE": str(STRIPE)},
            # The default gossip timings: this test needs no fast failure
            # detection (stopped nodes leave, killed ones refuse
            # connections), and a node wrongly suspected on a loaded
            # machine while objects are written would get no shard of them.
            gossip={},
        ).start()
        self.expected = dict(OBJECTS)
        self.expected[MULTIPART_KEY] = b"".join(PARTS)

    def put_objects(self, client: Any) -> None:
        """Create the bucket in the cluster's region and write every object."""
        client.create_bucket(Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION})
        for key, data in OBJECTS.items():
            client.put_object(Bucket=BUCKET, Key=key, Body=data)
        upload = client.create_multipart_upload(Bucket=BUCKET, Key=MULTIPART_KEY)["UploadId"]
        etags = [
            client.upload_part(Bucket=BUCKET, Key=MULTIPART_KEY, UploadId=upload, PartNumber=n, Body=part)["ETag"]
            for n, part in enumerate(PARTS, 1)
        ]
        client.complete_multipart_upload(
            Bucket=BUCKET,
            Key=MULTIPART_KEY,
            UploadId=upload,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]},
        )

    def holders(self) -> dict[str, dict[int, ClusterNode]]:
        """content hash -> shard index -> node holding that shard file."""
        found: dict[str, dict[int, ClusterNode]] = {}
        for node in self.cluster.nodes:
            for path in node.shard_files():
                content, index = os.path.basename(path).split(".")
                found.setdefault(content, {})[int(index)] = node
        return found

    def assertAllReadable(self, client: Any, where: str) -> None:
        """Every object reads back byte-exact, and so do two ranges."""
        for key, data in self.expected.items():
            try:
                got = read(client, key)
            except ClientError as e:
                raise AssertionError(f"GET {key} {where}: {e}\n{self.cluster.logs()}") from None
            self.assertEqual(len(got), len(data), f"{key} length {where}")
            self.assertTrue(got == data, f"{key} bytes differ {where}")
        big = self.expected["many-stripes"]
        first, last = STRIPE - 100, 3 * STRIPE + 4321
        self.assertTrue(
            read(client, "many-stripes", Range=f"bytes={first}-{last}") == big[first : last + 1],
            f"range of many-stripes {where}",
        )
        multipart = self.expected[MULTIPART_KEY]
        first = 5 * MiB - 1000
        self.assertTrue(
            read(client, MULTIPART_KEY, Range=f"bytes={first}-{first + 2 * STRIPE}")
            == multipart[first : first + 2 * STRIPE + 1],
            f"range across parts {where}",
        )

    def assertFailsCleanly(self, client: Any, key: str, **kwargs: Any) -> None:
        """A GET fails with a 503-class S3 error rather than returning bytes."""
        with self.assertRaises(ClientError, msg=f"GET {key} {kwargs} succeeded") as caught:
            read(client, key, **kwargs)
        error = caught.exception.response
        self.assertEqual(error["ResponseMetadata"]["HTTPStatusCode"], 503, error)
        self.assertIn(error["Error"]["Code"], ("ServiceUnavailable", "SlowDown"))

    def test_degraded_reads_and_recovery(self) -> None:
        """
        Shards of every sharded content land on all six nodes; with the two
        nodes holding data shards 0 and 1 of the big object down (one
        killed, one stopped), everything reads byte-exact through the
        others; with a third down, sharded GETs fail with 503 and inline
        objects still read; once all are back, everything reads again.
        """
        cluster = self.cluster
        client = cluster.client(cluster.nodes[0])
        self.put_objects(client)
        self.assertAllReadable(client, "with every node up")

        holders = self.holders()
        contents = {hashlib.sha256(self.expected[k]).hexdigest(): k for k in ("below-one-stripe", "many-stripes")}
        contents.update({hashlib.sha256(p).hexdigest(): f"part {n}" for n, p in enumerate(PARTS, 1)})
        for content, name in contents.items():
            self.assertIn(content, holders, f"no shard of {name} on any node")
            self.assertEqual(sorted(holders[content]), list(range(6)), f"shards of {name}")
            nodes = {n.index for n in holders[content].values()}
            self.assertEqual(len(nodes), 6, f"{name}'s shards are on nodes {sorted(nodes)}")
        for key in ("empty", "inline"):
            self.assertNotIn(hashlib.sha256(self.expected[key]).hexdigest(), holders)

        # Take down the holders of data shards 0 and 1 of the big object,
        # so reading it needs parity, and read through a node holding parity.
        big = holders[hashlib.sha256(self.expected["many-stripes"]).hexdigest()]
        down = [big[0], big[1]]
        reader = big[4]
        third = big[2]
        down[0].kill()
        down[1].stop()
        client = cluster.client(reader)
        self.assertAllReadable(client, f"with nodes {[n.index for n in down]} down, through node {reader.index}")
        other = next(n for n in cluster.nodes if n.running and n is not reader)
        self.assertAllReadable(cluster.client(other), f"through node {other.index}")

        third.stop()
        down.append(third)
        for key in SHARDED:
            self.assertFailsCleanly(client, key)
        self.assertFailsCleanly(client, "many-stripes", Range=f"bytes={STRIPE}-{2 * STRIPE}")
        for key in ("empty", "inline"):
            self.assertEqual(read(client, key), self.expected[key])

        for node in down:
            node.restart()
        cluster.wait_converged(60)
        self.assertAllReadable(client, "after the restarts")
        self.assertAllReadable(cluster.client(down[0]), f"through restarted node {down[0].index}")
