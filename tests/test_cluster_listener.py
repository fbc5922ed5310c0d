# -*- test-case-name: tests.test_cluster_listener -*-
"""
Tests for the cluster listener (L{anvil.cluster.listener}) and the gossip
transport (L{anvil.cluster.transport}): a real listener on 127.0.0.1 under
real mutual TLS, real clients.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import treq
from treq.client import HTTPClient
from OpenSSL import SSL
from OpenSSL.crypto import X509
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from anvil.cluster.ca import ClusterCA
from anvil.cluster.listener import ClusterRoot, cluster_factory, request_peer
from anvil.cluster.membership import Member, MemberState
from anvil.cluster.swim import Ack, Join, JoinReply, Ping, Swim, SwimConfig
from anvil.cluster.tls import ClusterTLSPolicy, NodeIdentity, RenewableServerContext
from anvil.cluster.transport import GossipRefused, GossipResource, GossipTransport
from anvil.metrics import Metrics

NODE_A = "a" * 32
NODE_B = "b" * 32
NODE_C = "c" * 32
SECRET = "correct horse"


def identity(testcase: TestCase, ca: ClusterCA, node_id: str) -> NodeIdentity:
    """
    A fresh identity for C{node_id} signed by C{ca}, in a temporary dir.
    """
    directory = testcase.mktemp()
    os.makedirs(directory)
    return NodeIdentity.load_or_create(directory, node_id, ca, time.time())


class _WhoAmI(Resource):
    """
    Answers with the node id of the client certificate, and counts calls.
    """

    isLeaf = True

    def __init__(self) -> None:
        """
        No calls yet.
        """
        super().__init__()
        self.calls = 0

    def render_GET(self, request: Request) -> bytes:
        """
        The client's node id.
        """
        self.calls += 1
        return request_peer(request).encode("ascii")


@implementer(IOpenSSLClientConnectionCreator)
class _NoCertificate:
    """
    A client that trusts the cluster CA but presents no certificate.
    """

    def __init__(self, ca: ClusterCA) -> None:
        """
        @param ca: the CA the server's certificate must chain to.
        """
        context = SSL.Context(SSL.TLS_METHOD)
        store = context.get_cert_store()
        assert store is not None
        store.add_cert(X509.from_cryptography(ca.certificate))
        context.set_verify(SSL.VERIFY_PEER, lambda *args: bool(args[-1]))
        self._context = context

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """
        A client connection presenting no certificate.
        """
        connection = SSL.Connection(self._context, None)
        connection.set_connect_state()
        return connection


@implementer(IPolicyForHTTPS)
class _Policy:
    """
    An HTTPS policy handing out one fixed connection creator.
    """

    def __init__(self, creator: Any) -> None:
        """
        @param creator: the connection creator for every address.
        """
        self._creator = creator

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        """
        The fixed creator.
        """
        return self._creator


class _Listener:
    """
    A cluster listener of node A on 127.0.0.1 with a gossip endpoint and a
    C{whoami} endpoint.
    """

    def __init__(self, testcase: TestCase, ca: ClusterCA) -> None:
        """
        Listen; stop listening at C{testcase}'s cleanup.
        """
        self.metrics = Metrics()
        self.whoami = _WhoAmI()
        self.swim = Swim(
            Member(NODE_A, "r1", "http://a", "a:1"),
            reactor,
            lambda addr, message: Deferred(),
            random.Random(1),
            SwimConfig(),
        )
        root = ClusterRoot()
        root.register(b"whoami", self.whoami)
        root.register(b"gossip", GossipResource(self.swim, SECRET))
        self.context = RenewableServerContext(identity(testcase, ca, NODE_A), ca)
        factory, _ = cluster_factory(self.context, root, self.metrics, reactor)
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        testcase.addCleanup(self.port.stopListening)
        self.addr = f"127.0.0.1:{self.port.getHost().port}"


def client(testcase: TestCase, policy: Any) -> HTTPClient:
    """
    A treq client with C{policy} and a pool closed at cleanup.
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    testcase.addCleanup(pool.closeCachedConnections)
    return HTTPClient(Agent(reactor, contextFactory=policy, pool=pool, connectTimeout=5))


class ClusterListenerTests(TestCase):
    """
    Requests to the cluster listener under mutual TLS.
    """

    timeout = 20

    def setUp(self) -> None:
        self.ca = ClusterCA.generate(time.time())
        self.listener = _Listener(self, self.ca)

    def peer(self, node_id: str, expected: str | None = NODE_A, ca: ClusterCA | None = None) -> HTTPClient:
        """
        A client presenting C{node_id}'s certificate (from C{ca}).
        """
        ca = ca or self.ca
        policy = ClusterTLSPolicy(identity(self, ca, node_id), ca, lambda host, port: expected)
        return client(self, policy)

    async def test_peer_identified(self) -> None:
        """
        A handler learns the node id of the client certificate, and the
        request is counted under C{api="cluster"}.
        """
        response = await self.peer(NODE_B).get(f"https://{self.listener.addr}/cluster/v1/whoami")
        self.assertEqual((response.code, await treq.content(response)), (200, NODE_B.encode()))
        value = self.listener.metrics.registry.get_sample_value(
            "anvil_api_requests_total", {"api": "cluster", "operation": "whoami", "status": "2xx"}
        )
        self.assertEqual(value, 1.0)

    async def test_unknown_path(self) -> None:
        """
        Paths outside C{/cluster/v1/<registered>} answer 404.
        """
        http = self.peer(NODE_B)
        for path in ("/cluster/v1/nothing", "/cluster/v2/whoami", "/whoami", "/"):
            response = await http.get(f"https://{self.listener.addr}{path}")
            await treq.content(response)
            self.assertEqual(response.code, 404, path)

    async def _assert_refused(self, http: HTTPClient) -> None:
        with self.assertRaises(Exception):
            await http.get(f"https://{self.listener.addr}/cluster/v1/whoami")
        self.assertEqual(self.listener.whoami.calls, 0)

    async def test_no_client_certificate(self) -> None:
        """
        A client without a certificate fails the handshake; the handler
        never runs.
        """
        await self._assert_refused(client(self, _Policy(_NoCertificate(self.ca))))

    async def test_other_ca(self) -> None:
        """
        A client whose certificate comes from another CA is refused, and the
        server does not accept it either way round.
        """
        other = ClusterCA.generate(time.time())
        await self._assert_refused(self.peer(NODE_B, ca=other))

    async def test_server_impersonating(self) -> None:
        """
        A client expecting node C at the address refuses node A's listener
        before sending anything.
        """
        await self._assert_refused(self.peer(NODE_B, expected=NODE_C))

    async def test_renewed_identity(self) -> None:
        """
        After C{set_identity}, new connections present the new certificate.
        """
        renewed = identity(self, self.ca, NODE_A)
        self.listener.context.set_identity(renewed)
        seen = []

        class Recording(ClusterTLSPolicy):
            def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
                """
                The usual creator, recording each connection it makes.
                """
                creator = super().creatorForNetloc(hostname, port)
                inner = creator.clientConnectionForTLS

                def connection(tls: Any) -> SSL.Connection:
                    conn = inner(tls)
                    seen.append(conn)
                    return conn

                creator.clientConnectionForTLS = connection  # type: ignore[method-assign]
                return creator

        policy = Recording(identity(self, self.ca, NODE_B), self.ca, lambda h, p: NODE_A)
        response = await client(self, policy).get(f"https://{self.listener.addr}/cluster/v1/whoami")
        await treq.content(response)
        self.assertEqual(
            seen[0].get_peer_certificate(as_cryptography=True), renewed.certificate
        )


class GossipTransportTests(TestCase):
    """
    SWIM messages over the listener: the secret and the sender are checked.
    """

    timeout = 20

    def setUp(self) -> None:
        self.ca = ClusterCA.generate(time.time())
        self.listener = _Listener(self, self.ca)

    def transport(self, node_id: str, secret: str = SECRET) -> GossipTransport:
        """
        A gossip transport presenting C{node_id}'s certificate and C{secret}.
        """
        policy = ClusterTLSPolicy(identity(self, self.ca, node_id), self.ca, lambda h, p: NODE_A)
        return GossipTransport(client(self, policy), secret)

    async def test_ping(self) -> None:
        """
        A ping is answered by the swim of the listening node with an ack.
        """
        reply = await self.transport(NODE_B).send(self.listener.addr, Ping(NODE_B, 7, ()))
        self.assertIsInstance(reply, Ack)
        assert isinstance(reply, Ack)
        self.assertEqual((reply.sender, reply.seq), (NODE_A, 7))

    async def test_join(self) -> None:
        """
        A join with the right secret makes the sender a member.
        """
        member = Member(NODE_B, "r1", "http://b", "b:1")
        reply = await self.transport(NODE_B).send(self.listener.addr, Join(NODE_B, member))
        self.assertIsInstance(reply, JoinReply)
        self.assertEqual(self.listener.swim.membership.get(NODE_B), member)

    async def test_ack_is_204(self) -> None:
        """
        A message without an answer (an ack) comes back as C{None}.
        """
        self.assertIsNone(
            await self.transport(NODE_B).send(self.listener.addr, Ack(NODE_B, 1, ()))
        )

    async def test_wrong_secret(self) -> None:
        """
        A join with the wrong cluster secret is refused with 403 and
        changes nothing.
        """
        member = Member(NODE_B, "r1", "http://b", "b:1")
        with self.assertRaises(GossipRefused) as caught:
            await self.transport(NODE_B, "wrong").send(self.listener.addr, Join(NODE_B, member))
        self.assertEqual(caught.exception.code, 403)
        self.assertIsNone(self.listener.swim.membership.get(NODE_B))

    async def test_sender_not_certificate(self) -> None:
        """
        A message claiming another sender than the certificate's node is
        refused with 403 and changes nothing.
        """
        member = Member(NODE_C, "r1", "http://c", "c:1")
        with self.assertRaises(GossipRefused) as caught:
            await self.transport(NODE_B).send(self.listener.addr, Join(NODE_C, member))
        self.assertEqual(caught.exception.code, 403)
        self.assertIsNone(self.listener.swim.membership.get(NODE_C))

    async def test_updates_applied(self) -> None:
        """
        Updates piggybacked on a ping reach the listening node's view.
        """
        member = Member(NODE_C, "r1", "http://c", "c:1", state=MemberState.ALIVE)
        await self.transport(NODE_B).send(self.listener.addr, Ping(NODE_B, 1, (member,)))
        self.assertEqual(self.listener.swim.membership.get(NODE_C), member)

    async def test_malformed(self) -> None:
        """
        A body that is no message is answered 400.
        """
        policy = ClusterTLSPolicy(identity(self, self.ca, NODE_B), self.ca, lambda h, p: NODE_A)
        response = await client(self, policy).post(
            f"https://{self.listener.addr}/cluster/v1/gossip",
            data=b"{nope",
            headers={b"Anvil-Cluster-Secret": [SECRET.encode()]},
        )
        await treq.content(response)
        self.assertEqual(response.code, 400)
