# -*- test-case-name: tests.integration.test_read_repair -*-
"""
A corrupt block found by a GET on a real node: the read is served exactly
from parity, the corruption is counted, and a repair task for that shard is
queued at once (one, however many reads find it) and run by the node.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.cluster import wait_until
from tests.integration.nodeproc import NodeProcess, http, short_tmpdir


class ReadRepairTests(SynchronousTestCase):
    """
    Repairs queued by reads.
    """

    def test_corrupt_block_on_read_queues_one_repair(self) -> None:
        """
        Two GETs over a flipped byte both return the exact bytes; the node
        counts the corruption and queues one repair task for that shard,
        which its task worker runs: the shard file is whole again.
        """
        node = NodeProcess(self, short_tmpdir(self), {"ANVIL_STRIPE_SIZE": str(64 * 1024)})
        node.start().wait_ready(90)
        client = node.client()
        client.create_bucket(Bucket="data")
        body = hashlib.sha256(b"seed").digest() * 10_000  # 320 KB: sharded
        client.put_object(Bucket="data", Key="k", Body=body)
        content = hashlib.sha256(body).hexdigest()
        [path] = glob.glob(os.path.join(node.data_dir, "shards", "*", "*", f"{content}.1"))
        with open(path, "rb") as f:
            original = f.read()
        with open(path, "r+b") as f:
            f.seek(200)
            f.write(bytes([original[200] ^ 0xFF]))
        for _ in range(2):
            self.assertEqual(client.get_object(Bucket="data", Key="k")["Body"].read(), body)
        _, _, metrics = http("GET", node.url + "/metrics")
        [counted] = re.findall(rb"^anvil_shards_corrupt_total (\S+)$", metrics, re.M)
        self.assertGreaterEqual(float(counted), 2.0)

        def repairs() -> list[dict[str, object]]:
            listed = json.loads(node.admin("task", "list", "--kind", "repair", "--json").stdout)
            tasks = listed["tasks"] if isinstance(listed, dict) else listed
            return [t for t in tasks if t["payload"].get("content_hash") == content]

        tasks = wait_until(repairs, 30, "a repair task for the corrupt shard")
        self.assertEqual(len(tasks), 1, tasks)
        self.assertEqual(tasks[0]["payload"]["shard_index"], 1)

        def repaired() -> bool:
            with open(path, "rb") as f:
                return f.read() == original

        wait_until(repaired, 60, "the shard rebuilt by the node's repair worker")
        self.assertEqual(client.get_object(Bucket="data", Key="k")["Body"].read(), body)
