# -*- test-case-name: tests.integration.test_cluster_gc -*-
"""
Garbage collection across a real three-node cluster: after DeleteObject,
an aborted multipart upload and DeleteBucket, the shard files disappear from
every node within a bounded time, and a content shared by two objects
(deduplicated) survives until its last reference goes.
"""

from __future__ import annotations

import hashlib

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.cluster import Cluster, wait_until

MiB = 1024 * 1024


def _body(seed: str, size: int) -> bytes:
    block = hashlib.sha256(seed.encode()).digest() * 4096
    return (block * (size // len(block) + 1))[:size]


class ClusterGcTests(SynchronousTestCase):
    """
    Deleted data leaves every node.
    """

    def test_shards_leave_every_node(self) -> None:
        """
        Shards of deleted objects, of an aborted upload's parts and of an
        emptied, deleted bucket vanish from all three nodes; a shared
        content stays while one object still uses it.
        """
        cluster = Cluster(
            self,
            3,
            env={
                "ANVIL_STRIPE_SIZE": str(256 * 1024),
                "ANVIL_GC_GRACE": "0",
                "ANVIL_GC_INTERVAL": "1",
            },
            gossip={},
        ).start()
        client = cluster.client()
        client.create_bucket(Bucket="keep")
        client.create_bucket(Bucket="drop")
        shared = _body("shared", MiB + 5)
        alone = _body("alone", 2 * MiB)
        client.put_object(Bucket="keep", Key="one", Body=shared)
        client.put_object(Bucket="keep", Key="two", Body=shared)
        client.put_object(Bucket="keep", Key="alone", Body=alone)
        in_dropped = _body("dropped", MiB)
        client.put_object(Bucket="drop", Key="x", Body=in_dropped)
        upload = client.create_multipart_upload(Bucket="keep", Key="parts")["UploadId"]
        part = _body("part", 5 * MiB)
        client.upload_part(Bucket="keep", Key="parts", UploadId=upload, PartNumber=1, Body=part)

        def holders(data: bytes) -> set[int]:
            digest = hashlib.sha256(data).hexdigest()
            return {n.index for n in cluster.nodes if digest in n.shard_hashes()}

        for data in (shared, alone, in_dropped, part):
            self.assertEqual(holders(data), {1, 2, 3})

        client.delete_object(Bucket="keep", Key="alone")
        client.delete_object(Bucket="keep", Key="one")
        client.abort_multipart_upload(Bucket="keep", Key="parts", UploadId=upload)
        client.delete_object(Bucket="drop", Key="x")
        client.delete_bucket(Bucket="drop")
        for data, what in ((alone, "deleted object"), (part, "aborted part"), (in_dropped, "deleted bucket's object")):
            wait_until(lambda: not holders(data), 60, f"the {what}'s shards gone from every node\n{cluster.logs()}")
        self.assertEqual(holders(shared), {1, 2, 3})
        self.assertEqual(client.get_object(Bucket="keep", Key="two")["Body"].read(), shared)
        client.delete_object(Bucket="keep", Key="two")
        wait_until(lambda: not holders(shared), 60, f"the shared content gone after its last reference\n{cluster.logs()}")
