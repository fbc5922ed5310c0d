# -*- test-case-name: tests.integration.test_backup -*-
"""
Backup and recovery as README's "Backup and recovery" section describes it,
on a real three-node cluster (erasure 2+1) and a real PostgreSQL: objects of
every storage kind (inline in the database, sharded in one stripe and in
many, multipart) are written with boto3; both databases (global and
regional) are dumped with C{pg_dump --format=custom}; the nodes stop; both
databases are dropped; fresh ones are created and C{pg_restore --no-owner}
fills them from the dumps; the nodes start again on the restored databases
(new URLs) with their old data directories (node ids and shard files) and
the same C{ANVIL_SECRET_ENCRYPTION_KEY}; every object reads back
byte-exact, and the restored cluster accepts new writes and deletes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from typing import Any

import psycopg2.extensions
import psycopg2.sql
from twisted.trial.unittest import SynchronousTestCase

from anvil.meta.embedded import find_server_binaries
from tests.integration.cluster import Cluster

KiB = 1024
MiB = 1024 * KiB
STRIPE = 64 * KiB
REGION = "eu-west-1"
BUCKET = "precious"
OTHER_BUCKET = "second"


def body(name: str, size: int) -> bytes:
    """Deterministic bytes of C{size}, different for every C{name}."""
    seed = hashlib.sha256(name.encode()).digest()
    block = b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(1024))
    return (block * (size // len(block) + 1))[:size]


#: (bucket, key) -> body of the single-PUT objects: empty and inline ones
#: live in the regional database only, the others as shards on the nodes.
OBJECTS: dict[tuple[str, str], bytes] = {
    (BUCKET, "empty"): b"",
    (BUCKET, "inline"): body("inline", 1500),
    (BUCKET, "one-stripe"): body("one-stripe", 40 * KiB + 7),
    (BUCKET, "many/stripes"): body("many-stripes", 1 * MiB + 12345),
    (OTHER_BUCKET, "inline-too"): body("inline-too", 10),
    (OTHER_BUCKET, "same-content"): body("many-stripes", 1 * MiB + 12345),
}

#: The parts of the multipart object (the last one short).
PARTS = [body("part-1", 5 * MiB), body("part-2", 300 * KiB + 1)]
MULTIPART = (BUCKET, "multi/part")


def database_name(dsn: str) -> str:
    """The database a libpq DSN names."""
    return psycopg2.extensions.parse_dsn(dsn)["dbname"]


class BackupRestoreTests(SynchronousTestCase):
    """
    pg_dump both databases, drop them, restore into fresh ones, and serve
    every old object again from the old shard files.
    """

    def setUp(self) -> None:
        from tests.pg import test_postgres

        self.server = test_postgres()
        # The client programs beside the server's real binaries (PATH may
        # hold symlinks to initdb/pg_ctl/postgres only), so pg_dump is never
        # older than the server it dumps.
        self.bin = os.path.dirname(os.path.realpath(os.path.join(find_server_binaries(), "pg_ctl")))
        self.cluster = Cluster(
            self,
            3,
            k=2,
            m=1,
            region=REGION,
            env={"ANVIL_STRIPE_SIZE": str(STRIPE)},
            # The default gossip pace: nothing here waits for a failure to
            # be detected, and a loaded machine must not flap members.
            gossip={},
        ).start()
        self.dumps = self.cluster.root

    def run_tool(self, tool: str, *args: str) -> subprocess.CompletedProcess[str]:
        """
        Run one of PostgreSQL's client programs from the server's own
        installation (the same major version as the server).

        @raise AssertionError: when it fails, with its error output.
        """
        result = subprocess.run(
            [os.path.join(self.bin, tool), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if result.returncode != 0:
            raise AssertionError(f"{tool} {' '.join(args)} failed ({result.returncode}): {result.stderr}")
        return result

    def put_objects(self, client: Any) -> dict[tuple[str, str], bytes]:
        """
        Write every object of L{OBJECTS} and the multipart one.

        @return: (bucket, key) -> the bytes each must read back as.
        """
        for bucket in (BUCKET, OTHER_BUCKET):
            client.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})
        for (bucket, key), data in OBJECTS.items():
            client.put_object(Bucket=bucket, Key=key, Body=data, Metadata={"origin": key})
        bucket, key = MULTIPART
        upload = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        etags = [
            client.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=n, Body=part)["ETag"]
            for n, part in enumerate(PARTS, 1)
        ]
        client.complete_multipart_upload(
            Bucket=bucket,
            Key=key,
            UploadId=upload,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]},
        )
        expected = dict(OBJECTS)
        expected[MULTIPART] = b"".join(PARTS)
        return expected

    def assertAllReadable(self, client: Any, expected: dict[tuple[str, str], bytes], where: str) -> None:
        """
        Every object lists and reads back byte-exact, with its metadata.
        """
        for bucket in (BUCKET, OTHER_BUCKET):
            listed = {o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])}
            self.assertEqual(listed, {k for b, k in expected if b == bucket}, f"listing of {bucket} {where}")
        for (bucket, key), data in expected.items():
            response = client.get_object(Bucket=bucket, Key=key)
            got = bytes(response["Body"].read())
            self.assertEqual(len(got), len(data), f"{bucket}/{key} length {where}")
            self.assertTrue(got == data, f"{bucket}/{key} bytes differ {where}")
            if (bucket, key) in OBJECTS:
                self.assertEqual(response["Metadata"], {"origin": key}, f"{bucket}/{key} metadata {where}")

    def dump(self, dsn: str, label: str) -> str:
        """
        C{pg_dump --format=custom} one database, as README says.

        @return: the dump file's path.
        """
        path = os.path.join(self.dumps, f"{label}.dump")
        self.run_tool("pg_dump", "--format=custom", f"--file={path}", f"--dbname={dsn}")
        self.assertGreater(os.path.getsize(path), 0, f"{label} dump is empty")
        return path

    def drop(self, dsn: str) -> None:
        """Drop the database a DSN names (the nodes are stopped)."""
        self.server.execute(
            psycopg2.sql.SQL("DROP DATABASE {}").format(psycopg2.sql.Identifier(database_name(dsn)))
        )

    def restore(self, path: str, prefix: str) -> str:
        """
        Create a fresh database and C{pg_restore --no-owner} a dump into it.

        @return: the new database's DSN.
        """
        from tests.pg import fresh_database

        dsn = fresh_database(self, prefix)
        self.run_tool("pg_restore", "--no-owner", "--exit-on-error", f"--dbname={dsn}", path)
        return dsn

    def test_dump_wipe_restore_and_read_back(self) -> None:
        """
        After dumping both databases, dropping them and restoring the dumps
        into fresh databases, nodes started on those and their old data
        directories serve every object byte-exact and take new writes.
        """
        cluster = self.cluster
        client = cluster.client(cluster.nodes[1])
        expected = self.put_objects(client)
        self.assertAllReadable(client, expected, "before the backup")
        shards_before = {n.index: sorted(n.shard_files()) for n in cluster.nodes}
        self.assertTrue(all(shards_before.values()), f"every node holds shards: {shards_before}")
        node_ids = [n.node_id for n in cluster.nodes]

        global_dsn = cluster.env["GLOBAL_DATABASE_URL"]
        regional_dsn = cluster.env["REGIONAL_DATABASE_URL"]
        global_dump = self.dump(global_dsn, "global")
        regional_dump = self.dump(regional_dsn, "regional")

        for node in cluster.nodes:
            self.assertEqual(node.stop(), 0, f"node {node.index} exit status\n{node.log_tail()}")
        self.drop(global_dsn)
        self.drop(regional_dsn)
        with self.assertRaises(psycopg2.OperationalError):
            psycopg2.connect(global_dsn, connect_timeout=10).close()

        new_global = self.restore(global_dump, "rg")
        new_regional = self.restore(regional_dump, "rr")
        self.assertNotEqual(database_name(new_global), database_name(global_dsn))
        for node in cluster.nodes:
            node.env["GLOBAL_DATABASE_URL"] = new_global
            node.env["REGIONAL_DATABASE_URL"] = new_regional

        # Every node starts with its old data directory, node 1 again with
        # INIT_CLUSTER (it finds the restored CA instead of making one).
        cluster.start()
        self.assertEqual([n.node_id for n in cluster.nodes], node_ids)
        self.assertEqual({n.index: sorted(n.shard_files()) for n in cluster.nodes}, shards_before)

        for node in cluster.nodes:
            self.assertAllReadable(cluster.client(node), expected, f"through node {node.index} after the restore")

        # The restored cluster is a working one: new objects (sequences and
        # content references restored too) and deletes.
        client = cluster.client(cluster.nodes[2])
        fresh = body("after-restore", 300 * KiB)
        client.put_object(Bucket=BUCKET, Key="after-restore", Body=fresh)
        client.delete_object(Bucket=OTHER_BUCKET, Key="inline-too")
        expected[(BUCKET, "after-restore")] = fresh
        del expected[(OTHER_BUCKET, "inline-too")]
        self.assertAllReadable(cluster.client(cluster.nodes[0]), expected, "after new writes")
