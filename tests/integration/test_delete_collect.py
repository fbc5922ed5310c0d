# -*- test-case-name: tests.integration.test_delete_collect -*-
"""
Deletes queue their collection: on a real node whose periodic collector is
far away (an hour), DeleteObject soft-deletes and queues one C{collect}
task for the end of the grace period, and the node's task worker removes
the shard files then.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os

from twisted.trial.unittest import SynchronousTestCase

from tests.integration.cluster import wait_until
from tests.integration.nodeproc import NodeProcess, short_tmpdir


class DeleteCollectTests(SynchronousTestCase):
    """
    The delete-and-enqueue path of garbage collection.
    """

    def test_delete_queues_collection(self) -> None:
        """
        Two deletes queue one collection task (per region), due after the
        grace period; it runs and the deleted objects' shard files are gone.
        """
        node = NodeProcess(
            self, short_tmpdir(self), {"ANVIL_GC_GRACE": "2", "ANVIL_GC_INTERVAL": "3600"}
        )
        node.start().wait_ready(90)
        client = node.client()
        client.create_bucket(Bucket="collected")
        bodies = [hashlib.sha256(bytes([i])).digest() * 8192 for i in range(2)]  # 256 KiB each
        for i, body in enumerate(bodies):
            client.put_object(Bucket="collected", Key=f"k{i}", Body=body)

        def files() -> list[str]:
            found = []
            for body in bodies:
                digest = hashlib.sha256(body).hexdigest()
                found += glob.glob(os.path.join(node.data_dir, "shards", "*", "*", f"{digest}.*"))
            return found

        self.assertEqual(len(files()), 12)
        client.delete_object(Bucket="collected", Key="k0")
        client.delete_objects(Bucket="collected", Delete={"Objects": [{"Key": "k1"}]})

        def collects() -> list[dict[str, object]]:
            listed = json.loads(node.admin("task", "list", "--kind", "collect", "--json").stdout)
            return listed["tasks"] if isinstance(listed, dict) else listed

        queued = wait_until(collects, 10, "a collect task")
        self.assertEqual(len(queued), 1, queued)
        wait_until(lambda: not files(), 30, "the deleted objects' shard files collected")
        wait_until(
            lambda: [t["state"] for t in collects()] == ["done"], 10, "the collect task done"
        )
