# -*- test-case-name: tests.test_cluster_service -*-
"""
Tests for L{anvil.cluster.service.ClusterService}: several services in one
process on the real reactor, real mutual TLS on 127.0.0.1, the CA in a real
global database; and certificate renewal on a simulated clock.
"""

from __future__ import annotations

import json
import os
import random
import time
from typing import Callable

from cryptography.hazmat.primitives import serialization
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anvil.cluster.ca import ClusterCA
from anvil.cluster.membership import Member, Membership, MemberState, load_or_create_node_id
from anvil.cluster.service import ClusterService
from anvil.cluster.tls import NodeIdentity
from anvil.config import NodeConfig, load_config
from anvil.errors import InvalidArgument
from anvil.meta.database import Database
from anvil.meta.migrate import apply_migrations
from anvil.meta.secrets import SecretBox
from anvil.metrics import Metrics
from tests.pg import fresh_database

KEY = "5ecf" * 16
SECRET = "s3cret"

#: Short protocol timings so failures are detected within a second or two.
FAST = {
    "ANVIL_GOSSIP_PERIOD": "0.2",
    "ANVIL_GOSSIP_ACK_TIMEOUT": "0.1",
    "ANVIL_GOSSIP_INDIRECT_PROBES": "2",
    "ANVIL_SUSPICION_TIMEOUT": "0.6",
    "ANVIL_PEER_TIMEOUT": "2",
}


def node_config(testcase: TestCase, **env: str) -> NodeConfig:
    """
    A node configuration with its own data dir, a cluster listener on a
    free 127.0.0.1 port and fast gossip; C{env} adds or overrides keys.
    """
    data_dir = os.path.abspath(testcase.mktemp())
    os.makedirs(data_dir)
    return load_config(
        {},
        {
            "ANVIL_DATA_DIR": data_dir,
            "CLUSTER_LISTEN_ADDR": "tcp:0:interface=127.0.0.1",
            "CLUSTER_SECRET": SECRET,
            "REGION": "r1",
            **FAST,
            **env,
        },
        None,
    )


async def eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """
    Wait (polling every 50 ms on the real reactor) until C{check()} holds.

    @raise AssertionError: when it still does not after C{timeout} seconds.
    """
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await deferLater(reactor, 0.05)


def states(service: ClusterService) -> dict[str, str]:
    """
    The member states as C{service} sees them, by node id.
    """
    return {m["node_id"]: m["state"] for m in service.members_document()["members"]}


class ClusterServiceTests(TestCase):
    """
    Three (or four) services forming a cluster through a bootstrap address.
    """

    timeout = 60

    async def setUp(self) -> None:
        self.dsn = fresh_database(self)
        self.db = await Database.connect(self.dsn, reactor, pool_size=2)
        self.addCleanup(self.db.close)
        await apply_migrations(self.db, "global")
        self.box = SecretBox.from_hex(KEY)

    async def start(self, **env: str) -> ClusterService:
        """
        Prepare, listen and start gossip for one new node; stopped at cleanup.
        """
        config = node_config(self, **env)
        node_id = load_or_create_node_id(config.node.data_dir)
        membership = Membership(Member(node_id, config.node.region, f"http://{node_id}", ""))
        service = ClusterService(
            config, node_id, membership, self.db, self.box, Metrics(), reactor,
            rng=random.Random(node_id), ca_retry_max=0.2,
        )
        await service.prepare()
        await service.listen()
        service.startService()
        service.start_gossip()
        self.addCleanup(lambda: service.stopService() if service.running else None)
        return service

    async def cluster(self) -> list[ClusterService]:
        """
        Three nodes: the first with INIT_CLUSTER, two joining through it;
        returns once every node sees all three alive.
        """
        first = await self.start(INIT_CLUSTER="true")
        seed = first.membership.local.cluster_addr
        nodes = [first, await self.start(BOOTSTRAP_ADDRS=seed), await self.start(BOOTSTRAP_ADDRS=seed)]
        ids = {n.node_id for n in nodes}
        await eventually(
            lambda: all(states(n) == {i: "alive" for i in ids} for n in nodes), what="convergence"
        )
        return nodes

    async def test_converge(self) -> None:
        """
        Nodes joining through the first one all see every member alive, with
        its region, addresses, and the members-by-state gauge agrees.
        """
        nodes = await self.cluster()
        doc = nodes[2].members_document()
        self.assertEqual(doc["node_id"], nodes[2].node_id)
        self.assertEqual(doc["region"], "r1")
        by_id = {m["node_id"]: m for m in doc["members"]}
        for node in nodes:
            record = by_id[node.node_id]
            self.assertEqual(record["cluster_addr"], node.membership.local.cluster_addr)
            self.assertEqual(record["api_addr"], f"http://{node.node_id}")
            self.assertEqual(record["region"], "r1")
        value = nodes[0]._metrics.registry.get_sample_value(
            "anvil_cluster_members", {"state": "alive"}
        )
        self.assertEqual(value, 3.0)
        joins = nodes[0]._metrics.registry.get_sample_value(
            "anvil_cluster_member_events_total", {"event": "join"}
        )
        self.assertEqual(joins, 2.0)

    async def test_crash_detected(self) -> None:
        """
        A node stopping without leaving is declared dead by the others
        within the configured timeouts.
        """
        nodes = await self.cluster()
        crashed = nodes[2]
        crashed.leave_on_stop = False
        await crashed.stopService()
        stopped = time.monotonic()
        await eventually(
            lambda: all(states(n)[crashed.node_id] == "dead" for n in nodes[:2]),
            timeout=8, what="dead",
        )
        # Probe period + ack/indirect timeouts + suspicion timeout, plus a
        # few periods of gossip to spread it: well under 4 s.
        self.assertLess(time.monotonic() - stopped, 4.0)
        failures = nodes[0]._metrics.registry.get_sample_value(
            "anvil_cluster_member_events_total", {"event": "failure"}
        )
        self.assertGreaterEqual(failures, 1.0)

    async def test_leave(self) -> None:
        """
        A node stopping gracefully is seen as I{left} by the others.
        """
        nodes = await self.cluster()
        leaving = nodes[1]
        await leaving.stopService()
        await eventually(
            lambda: states(nodes[0])[leaving.node_id] == "left"
            and states(nodes[2])[leaving.node_id] == "left",
            timeout=5, what="left",
        )

    async def test_wrong_secret_cannot_join(self) -> None:
        """
        A node with a certificate from the cluster CA but the wrong cluster
        secret never joins and never appears in others' member lists.
        """
        nodes = await self.cluster()
        intruder = await self.start(
            BOOTSTRAP_ADDRS=nodes[0].membership.local.cluster_addr, CLUSTER_SECRET="wrong"
        )
        await deferLater(reactor, 1.5)
        self.assertIsNotNone(intruder._joining)
        self.assertEqual(list(states(intruder)), [intruder.node_id])
        for node in nodes:
            self.assertNotIn(intruder.node_id, states(node))

    async def test_foreign_ca_cannot_join(self) -> None:
        """
        A node whose CA is not the cluster's (its own operator CA) never
        joins.
        """
        nodes = await self.cluster()
        ca = ClusterCA.generate(time.time())
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cert, key = os.path.join(directory, "ca.pem"), os.path.join(directory, "ca.key")
        with open(cert, "wb") as f:
            f.write(ca.certificate_pem())
        with open(key, "wb") as f:
            f.write(ca.private_key_pem())
        intruder = await self.start(
            BOOTSTRAP_ADDRS=nodes[0].membership.local.cluster_addr,
            ANVIL_CLUSTER_CA_CERT=cert,
            ANVIL_CLUSTER_CA_KEY=key,
        )
        await deferLater(reactor, 1.5)
        self.assertEqual(list(states(intruder)), [intruder.node_id])
        for node in nodes:
            self.assertNotIn(intruder.node_id, states(node))

    async def test_remove(self) -> None:
        """
        C{remove_member} marks a (crashed) member left, and the others learn
        it.
        """
        nodes = await self.cluster()
        gone = nodes[2]
        gone.leave_on_stop = False
        await gone.stopService()
        record = nodes[0].remove_member(gone.node_id)
        self.assertEqual(record.state, MemberState.LEFT)
        await eventually(lambda: states(nodes[1])[gone.node_id] == "left", timeout=5, what="left")
        with self.assertRaises(InvalidArgument):
            nodes[0].remove_member(nodes[0].node_id)

    async def test_members_endpoint(self) -> None:
        """
        Peers may read C{/cluster/v1/members}; only the node itself may
        remove a member through it.
        """
        nodes = await self.cluster()
        http = nodes[1].http
        assert http is not None
        base = f"https://{nodes[0].membership.local.cluster_addr}/cluster/v1/members"
        response = await http.get(base)
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(await response.content()), nodes[0].members_document())
        response = await http.post(f"{base}/{nodes[2].node_id}/remove")
        await response.content()
        self.assertEqual(response.code, 403)
        self.assertEqual(states(nodes[0])[nodes[2].node_id], "alive")

    async def test_waits_for_ca(self) -> None:
        """
        A node without INIT_CLUSTER waits until the CA exists, then gets a
        certificate from it.
        """
        waiting = Deferred.fromCoroutine(self.start(BOOTSTRAP_ADDRS="127.0.0.1:1"))
        await deferLater(reactor, 0.5)
        self.assertFalse(waiting.called)
        first = await self.start(INIT_CLUSTER="true")
        second = await waiting
        self.assertTrue(first.ca is not None and second.ca is not None)
        assert first.ca is not None and second.ca is not None and second.identity is not None
        self.assertEqual(first.ca.certificate, second.ca.certificate)
        self.assertTrue(first.ca.issued(second.identity.certificate))


    async def test_stop_while_waiting_for_ca(self) -> None:
        """
        Stopping a node still waiting for the CA ends C{prepare} with
        C{CancelledError} at once.
        """
        config = node_config(self, BOOTSTRAP_ADDRS="127.0.0.1:1")
        node_id = load_or_create_node_id(config.node.data_dir)
        service = ClusterService(
            config, node_id, Membership(Member(node_id, "r1", "", "")), self.db, self.box,
            Metrics(), reactor, ca_retry_max=5.0,
        )
        service.startService()
        preparing = Deferred.fromCoroutine(service.prepare())
        await deferLater(reactor, 0.3)
        await service.stopService()
        with self.assertRaises(CancelledError):
            await preparing


class OperatorCATests(SynchronousTestCase):
    """
    Operator-supplied CA files, and renewal, on a simulated clock.
    """

    def setUp(self) -> None:
        self.ca = ClusterCA.generate(time.time())
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.ca_cert = self.write("ca.pem", self.ca.certificate_pem())
        self.ca_key = self.write("ca.key", self.ca.private_key_pem())

    def write(self, name: str, data: bytes) -> str:
        """
        Write a file in the test's directory and return its path.
        """
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def service(self, clock: Clock, **env: str) -> ClusterService:
        """
        A service on C{clock} with a 100 s certificate renewed 50 s before
        expiry.
        """
        config = node_config(self, **env)  # type: ignore[arg-type]
        node_id = load_or_create_node_id(config.node.data_dir)
        membership = Membership(Member(node_id, "r1", "http://a", ""))
        return ClusterService(
            config, node_id, membership, None, None, Metrics(), clock,
            renew_before=50.0, cert_lifetime=100.0, renew_check_interval=10.0,
        )

    def prepare(self, service: ClusterService) -> None:
        """
        Run C{prepare}, which completes at once without a database.
        """
        d = Deferred.fromCoroutine(service.prepare())
        self.successResultOf(d)

    def test_renewal(self) -> None:
        """
        With the operator CA's key, the node issues its certificate and
        renews it shortly before expiry; the new one is used from then on.
        """
        clock = Clock()
        clock.advance(time.time())
        service = self.service(clock, ANVIL_CLUSTER_CA_CERT=self.ca_cert, ANVIL_CLUSTER_CA_KEY=self.ca_key)
        self.prepare(service)
        first = service.identity
        assert first is not None
        self.assertTrue(self.ca.issued(first.certificate))
        clock.advance(40)
        self.assertIs(service.identity, first)
        clock.advance(20)
        renewed = service.identity
        assert renewed is not None
        self.assertIsNot(renewed, first)
        self.assertGreater(renewed.expires_at, first.expires_at)
        self.assertEqual(renewed.node_id, first.node_id)
        creator = service._policy.creatorForNetloc(b"127.0.0.1", 1)  # type: ignore[union-attr]
        connection = creator.clientConnectionForTLS(None)
        self.assertEqual(connection.get_certificate(as_cryptography=True), renewed.certificate)
        self.successResultOf(service.stopService())

    def test_operator_issued(self) -> None:
        """
        With only the CA certificate and an operator-issued node certificate
        and key, the node uses them (and does not try to renew).
        """
        clock = Clock()
        clock.advance(time.time())
        service = self.service(clock)
        issued = NodeIdentity.load_or_create(self.dir, service.node_id, self.ca, time.time())
        key = self.write("node.key", issued.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ))
        cert = self.write("node.pem", issued.certificate.public_bytes(serialization.Encoding.PEM))
        config = node_config(
            self,  # type: ignore[arg-type]
            ANVIL_CLUSTER_CA_CERT=self.ca_cert, ANVIL_CLUSTER_NODE_CERT=cert, ANVIL_CLUSTER_NODE_KEY=key,
        )
        with open(os.path.join(config.node.data_dir, "node_id"), "w") as f:
            f.write(service.node_id + "\n")
        service = ClusterService(
            config, service.node_id, Membership(Member(service.node_id, "r1", "", "")),
            None, None, Metrics(), clock,
        )
        self.prepare(service)
        assert service.identity is not None and service.ca is not None
        self.assertEqual(service.identity.certificate, issued.certificate)
        self.assertFalse(service.ca.can_issue)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_operator_issued_other_node(self) -> None:
        """
        An operator certificate for another node id is refused with a
        message naming the id to issue for.
        """
        clock = Clock()
        other = "0" * 32
        issued = NodeIdentity.load_or_create(self.dir, other, self.ca, time.time())
        key = self.write("node.key", issued.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ))
        cert = self.write("node.pem", issued.certificate.public_bytes(serialization.Encoding.PEM))
        service = self.service(
            clock, ANVIL_CLUSTER_CA_CERT=self.ca_cert, ANVIL_CLUSTER_NODE_CERT=cert, ANVIL_CLUSTER_NODE_KEY=key
        )
        failure = self.failureResultOf(Deferred.fromCoroutine(service.prepare()), InvalidArgument)
        self.assertIn(f"cluster ca issue {service.node_id}", str(failure.value))
