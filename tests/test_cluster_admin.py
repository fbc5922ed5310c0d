# -*- test-case-name: tests.test_cluster_admin -*-
"""
Tests for C{anvil-admin cluster ...} (L{anvil.scripts.cluster_admin}): real
subprocesses against live L{ClusterService}s in the test process (real
mutual TLS, real PostgreSQL).
"""

from __future__ import annotations

import os
import random
import stat
import time

import psycopg2
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anvil.cluster.ca import ClusterCA, node_id_of
from anvil.cluster.membership import Member, Membership, load_or_create_node_id
from anvil.cluster.service import ClusterService
from anvil.config import load_config
from anvil.meta.database import Database
from anvil.meta.migrate import apply_migrations
from anvil.meta.secrets import SecretBox
from anvil.metrics import Metrics
from anvil.scripts.cluster_admin import ClusterAdminError, cluster_address
from tests.pg import fresh_database
from tests.test_admin import AdminTestMixin, Result, run_admin
from tests.test_cluster_service import FAST, SECRET, eventually, states

KEY = "5ecf" * 16
OTHER_NODE = "0123456789abcdef0123456789abcdef"


class ClusterAdminTests(AdminTestMixin, TestCase):
    """
    The cluster commands run as an operator would, with node 1's
    environment, against a live two-node cluster.
    """

    timeout = 90

    async def setUp(self) -> None:
        self.global_dsn = fresh_database(self, "g")
        self.base_env = {
            "GLOBAL_DATABASE_URL": self.global_dsn,
            "REGIONAL_DATABASE_URL": fresh_database(self, "r"),
            "ANVIL_SECRET_ENCRYPTION_KEY": KEY,
            "CLUSTER_SECRET": SECRET,
            "REGION": "r1",
        }
        self.db = await Database.connect(self.global_dsn, reactor, pool_size=2)
        self.addCleanup(self.db.close)
        await apply_migrations(self.db, "global")
        self.first = await self.start(INIT_CLUSTER="true")
        self.second = await self.start(BOOTSTRAP_ADDRS=self.first.membership.local.cluster_addr)
        both = {self.first.node_id, self.second.node_id}
        await eventually(lambda: set(states(self.first)) == both and set(states(self.second)) == both)
        self.env = {
            **self.base_env,
            "ANVIL_DATA_DIR": self.first._config.node.data_dir,
            "PUBLIC_CLUSTER_ADDRS": self.first.membership.local.cluster_addr,
        }

    async def start(self, **env: str) -> ClusterService:
        """
        A live node (prepared, listening, gossiping) stopped at cleanup.
        """
        data_dir = os.path.abspath(self.mktemp())
        os.makedirs(data_dir)
        config = load_config(
            {},
            {
                **self.base_env,
                "ANVIL_DATA_DIR": data_dir,
                "CLUSTER_LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
                **FAST,
                **env,
            },
            None,
        )
        node_id = load_or_create_node_id(data_dir)
        service = ClusterService(
            config, node_id, Membership(Member(node_id, "r1", f"http://{node_id}", "")),
            self.db, SecretBox.from_hex(KEY), Metrics(), reactor, rng=random.Random(node_id),
        )
        await service.prepare()
        await service.listen()
        service.startService()
        service.start_gossip()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        return service

    async def admin(self, *argv: str, **env: str) -> Result:
        """
        Run C{anvil-admin} with node 1's environment.
        """
        return await run_admin(list(argv), {**self.env, **env})

    def query(self, statement: str) -> list[tuple]:
        """
        The rows of a query on the global database.
        """
        conn = psycopg2.connect(self.global_dsn)
        try:
            with conn, conn.cursor() as cur:
                cur.execute(statement)
                return cur.fetchall()
        finally:
            conn.close()

    async def test_status_json(self) -> None:
        """
        C{cluster status --json} prints the node id and the members it sees.
        """
        result = await self.admin("cluster", "status", "--json")
        self.assertSucceeded(result)
        document = result.json()
        self.assertEqual(set(document), {"node_id", "members"})
        self.assertEqual(document["node_id"], self.first.node_id)
        members = {m["node_id"]: m for m in document["members"]}
        self.assertEqual(set(members), {self.first.node_id, self.second.node_id})
        for node in (self.first, self.second):
            member = members[node.node_id]
            self.assertEqual(member["state"], "alive")
            self.assertEqual(member["region"], "r1")
            self.assertEqual(member["api_addr"], f"http://{node.node_id}")
            self.assertEqual(member["cluster_addr"], node.membership.local.cluster_addr)

    async def test_status_table(self) -> None:
        """
        Without C{--json}, a table with one row per member.
        """
        result = await self.admin("cluster", "status")
        self.assertSucceeded(result)
        lines = result.out.splitlines()
        self.assertIn(self.first.node_id, lines[0])
        self.assertTrue(lines[1].startswith("NODE ID"), result)
        self.assertEqual(len(lines), 4, result)
        self.assertIn(f"{self.first.node_id} *", result.out)
        self.assertIn(self.second.node_id, result.out)

    async def test_status_node_down(self) -> None:
        """
        When the node is not running, one error line and status 2.
        """
        await self.first.stopService()
        result = await self.admin("cluster", "status", "--json")
        self.assertOneLineError(result, "did not answer", "is the node running?")

    async def test_ca_export(self) -> None:
        """
        C{cluster ca export} prints the stored CA certificate, or writes it.
        """
        assert self.first.ca is not None
        result = await self.admin("cluster", "ca", "export")
        self.assertSucceeded(result)
        self.assertEqual(result.out.encode("ascii"), self.first.ca.certificate_pem())
        path = os.path.abspath(self.mktemp())
        result = await self.admin("cluster", "ca", "export", "--out", path)
        self.assertSucceeded(result)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), self.first.ca.certificate_pem())

    async def test_ca_issue(self) -> None:
        """
        C{cluster ca issue} writes a key (mode 0600) and a certificate for
        the node, signed by the stored CA.
        """
        assert self.first.ca is not None
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cert, key = os.path.join(directory, "n.pem"), os.path.join(directory, "n.key")
        result = await self.admin(
            "cluster", "ca", "issue", OTHER_NODE, "--cert-out", cert, "--key-out", key, "--json"
        )
        self.assertSucceeded(result)
        self.assertEqual(result.json()["node_id"], OTHER_NODE)
        with open(cert, "rb") as f:
            certificate = x509.load_pem_x509_certificate(f.read())
        with open(key, "rb") as f:
            private = serialization.load_pem_private_key(f.read(), password=None)
        self.assertEqual(node_id_of(certificate), OTHER_NODE)
        self.assertTrue(self.first.ca.issued(certificate))
        self.assertEqual(
            certificate.public_key().public_numbers(), private.public_key().public_numbers()  # type: ignore[union-attr]
        )
        self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600)

    async def test_ca_issue_operator_files(self) -> None:
        """
        With C{--ca-cert} and C{--ca-key}, the operator's CA signs.
        """
        ca = ClusterCA.generate(time.time())
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        paths = {name: os.path.join(directory, name) for name in ("ca.pem", "ca.key", "n.pem", "n.key")}
        with open(paths["ca.pem"], "wb") as f:
            f.write(ca.certificate_pem())
        with open(paths["ca.key"], "wb") as f:
            f.write(ca.private_key_pem())
        result = await self.admin(
            "cluster", "ca", "issue", OTHER_NODE, "--cert-out", paths["n.pem"], "--key-out", paths["n.key"],
            "--ca-cert", paths["ca.pem"], "--ca-key", paths["ca.key"],
        )
        self.assertSucceeded(result)
        self.assertIn(f"Issued a certificate for node {OTHER_NODE}", result.out)
        with open(paths["n.pem"], "rb") as f:
            self.assertTrue(ca.issued(x509.load_pem_x509_certificate(f.read())))

    async def test_ca_issue_bad_node_id(self) -> None:
        """
        A malformed node id is refused with one error line.
        """
        result = await self.admin("cluster", "ca", "issue", "nope", "--cert-out", "x", "--key-out", "y")
        self.assertOneLineError(result, "node id")

    async def test_remove(self) -> None:
        """
        C{cluster remove} marks a crashed member left (the others learn it),
        records it in C{removed_nodes} and queues one C{evacuate} task; a
        second removal queues nothing more.
        """
        gone = self.second
        gone.leave_on_stop = False
        await gone.stopService()
        result = await self.admin("cluster", "remove", gone.node_id, "--json")
        self.assertSucceeded(result)
        document = result.json()
        self.assertEqual(
            {k: document[k] for k in ("node_id", "marked_left", "newly_recorded")},
            {"node_id": gone.node_id, "marked_left": True, "newly_recorded": True},
        )
        self.assertEqual(states(self.first)[gone.node_id], "left")
        self.assertEqual(self.query("SELECT node_id FROM removed_nodes"), [(gone.node_id,)])
        tasks = self.query("SELECT id, kind, payload, region FROM tasks")
        self.assertEqual(tasks, [(document["evacuate_task"], "evacuate", {"node_id": gone.node_id}, "r1")])
        again = await self.admin("cluster", "remove", gone.node_id)
        self.assertSucceeded(again)
        self.assertIn("already recorded", again.out)
        self.assertEqual(len(self.query("SELECT id FROM tasks")), 1)

    async def test_remove_self(self) -> None:
        """
        A node cannot remove itself.
        """
        result = await self.admin("cluster", "remove", self.first.node_id)
        self.assertOneLineError(result, "cannot remove itself")
        self.assertEqual(self.query("SELECT node_id FROM removed_nodes"), [])


class ClusterAddressTests(SynchronousTestCase):
    """
    Where C{anvil-admin} looks for the node's cluster listener.
    """

    def address(self, **env: str) -> str:
        """
        The address found for a configuration from C{env}.
        """
        config = load_config({}, {"ANVIL_DATA_DIR": "/tmp/anvil-test", **env}, None)
        return cluster_address(config)

    def test_public_address(self) -> None:
        """
        The first public cluster address wins.
        """
        self.assertEqual(
            self.address(PUBLIC_CLUSTER_ADDRS="10.0.0.1:7443,10.0.0.2:7443", CLUSTER_LISTEN_ADDR="tcp:9000"),
            "10.0.0.1:7443",
        )

    def test_listen_port(self) -> None:
        """
        Otherwise 127.0.0.1 (or the configured interface) and the port of
        the listen endpoint.
        """
        self.assertEqual(self.address(CLUSTER_LISTEN_ADDR="tcp:9000"), "127.0.0.1:9000")
        self.assertEqual(self.address(CLUSTER_LISTEN_ADDR="tcp:port=9001:interface=0.0.0.0"), "127.0.0.1:9001")
        self.assertEqual(self.address(CLUSTER_LISTEN_ADDR="tcp:9002:interface=10.1.2.3"), "10.1.2.3:9002")

    def test_unknown_port(self) -> None:
        """
        An ephemeral port cannot be found.
        """
        with self.assertRaises(ClusterAdminError):
            self.address(CLUSTER_LISTEN_ADDR="tcp:0")
