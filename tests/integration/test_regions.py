# -*- test-case-name: tests.integration.test_regions -*-
"""
Two regions of one cluster: four real nodes on one global database and two
regional databases. Shards of a bucket stay in the bucket's region, and a
request that reaches a node of the other region is proxied to a node of the
bucket's region (L{anvil.s3.proxy}).
"""

from __future__ import annotations

import hashlib
import os

from botocore.exceptions import ClientError
from twisted.trial.unittest import SynchronousTestCase

from tests.integration.cluster import Cluster, wait_until

ONE, TWO = "r-one", "r-two"


def _body(size: int, seed: str) -> bytes:
    block = hashlib.sha256(seed.encode()).digest() * 2048
    return (block * (size // len(block) + 1))[:size]


class RegionTests(SynchronousTestCase):
    """
    Buckets, shards and requests across two regions.
    """

    def test_proxied_to_the_buckets_region(self) -> None:
        """
        A bucket created in region two through a node of region two can be
        written, read, listed and emptied through a node of region one;
        its shards are only on region two's nodes; with region two down the
        request fails with 503 rather than touching region one's data.
        """
        from tests.pg import fresh_database

        cluster = Cluster(self, 2, region=ONE, env={"ANVIL_STRIPE_SIZE": str(256 * 1024)})
        regional_two = fresh_database(self, "cr2")
        two = [cluster.new_node({"REGION": TWO, "REGIONAL_DATABASE_URL": regional_two}) for _ in range(2)]
        cluster.start()
        one_node, two_node = cluster.nodes[0], two[0]
        via_two = cluster.client(two_node)
        via_one = cluster.client(one_node)
        via_two.create_bucket(Bucket="far", CreateBucketConfiguration={"LocationConstraint": TWO})
        self.assertEqual(via_one.get_bucket_location(Bucket="far")["LocationConstraint"], TWO)

        big = _body(3 * 1024 * 1024 + 5, "big")
        small = _body(1000, "small")
        via_one.put_object(Bucket="far", Key="big", Body=big)
        via_two.put_object(Bucket="far", Key="small", Body=small)
        self.assertEqual(via_one.get_object(Bucket="far", Key="small")["Body"].read(), small)
        self.assertEqual(via_one.get_object(Bucket="far", Key="big")["Body"].read(), big)
        self.assertEqual(via_two.get_object(Bucket="far", Key="big")["Body"].read(), big)
        ranged = via_one.get_object(Bucket="far", Key="big", Range="bytes=1000-299999")
        self.assertEqual(ranged["Body"].read(), big[1000:300000])
        self.assertEqual(via_one.head_object(Bucket="far", Key="big")["ContentLength"], len(big))
        listed = via_one.list_objects_v2(Bucket="far")
        self.assertEqual([o["Key"] for o in listed["Contents"]], ["big", "small"])

        big_hash = hashlib.sha256(big).hexdigest()
        self.assertTrue(all(big_hash in n.shard_hashes() for n in two))
        self.assertFalse(any(big_hash in n.shard_hashes() for n in cluster.nodes if n not in two))

        # Region one's own buckets stay in region one.
        via_one.create_bucket(Bucket="near", CreateBucketConfiguration={"LocationConstraint": ONE})
        near = _body(2 * 1024 * 1024, "near")
        via_two.put_object(Bucket="near", Key="k", Body=near)
        near_hash = hashlib.sha256(near).hexdigest()
        self.assertFalse(any(near_hash in n.shard_hashes() for n in two))
        self.assertEqual(via_two.get_object(Bucket="near", Key="k")["Body"].read(), near)

        # A bucket for region two cannot be created through region one (as
        # on AWS, the location constraint must match the endpoint's region).
        with self.assertRaises(ClientError) as caught:
            via_one.create_bucket(Bucket="other", CreateBucketConfiguration={"LocationConstraint": TWO})
        self.assertEqual(caught.exception.response["Error"]["Code"], "IllegalLocationConstraintException")

        via_one.delete_object(Bucket="far", Key="small")
        self.assertEqual(
            [o["Key"] for o in via_two.list_objects_v2(Bucket="far").get("Contents", [])], ["big"]
        )

        for node in two:
            node.stop()
        wait_until(
            lambda: all(s != "alive" for i, s in cluster.states(one_node).items() if i in {n.node_id for n in two}),
            30,
            "region two's nodes are not seen as gone",
        )
        with self.assertRaises(ClientError) as caught:
            via_one.get_object(Bucket="far", Key="big")
        self.assertEqual(caught.exception.response["ResponseMetadata"]["HTTPStatusCode"], 503)
        self.assertEqual(via_one.get_object(Bucket="near", Key="k")["Body"].read(), near)
        self.assertTrue(os.path.isdir(two_node.data_dir))
