# -*- test-case-name: tests.test_cluster_tls -*-
"""
Tests for L{anvil.cluster.ca} and L{anvil.cluster.tls}: the cluster CA, its
storage in the global database, node identities, and mutual TLS over real
loopback sockets.
"""

from __future__ import annotations

import os
import stat
import time
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener, IOpenSSLClientConnectionCreator
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from anvil.cluster.ca import CAStore, ClusterCA, node_id_of
from anvil.cluster.tls import (
    CERT_FILE,
    KEY_FILE,
    ClusterTLSPolicy,
    NodeIdentity,
    PeerIdentityError,
    client_context,
    peer_node_id,
    server_context,
)
from anvil.errors import InvalidArgument, SecretKeyMismatch
from anvil.meta.database import Database
from anvil.meta.migrate import apply_migrations
from anvil.meta.secrets import SecretBox
from tests.pg import fresh_database

NODE_A = "a" * 32
NODE_B = "b" * 32
NODE_X = "0123456789abcdef0123456789abcdef"
KEY_A = "11" * 32
KEY_B = "22" * 32
DAY = 24 * 3600.0


def _identity(testcase: Any, ca: ClusterCA, node_id: str) -> NodeIdentity:
    """
    A node identity for C{node_id} in a fresh data dir, issued now.
    """
    data_dir = testcase.mktemp()
    os.makedirs(data_dir)
    return NodeIdentity.load_or_create(data_dir, node_id, ca, time.time())


class ClusterCATests(SynchronousTestCase):
    """
    L{ClusterCA}: generation, issuing, PEM round trips.
    """

    def test_issued_certificate_names_node(self) -> None:
        """
        A node certificate names the node id as its common name and URN
        subject alternative name, and is recognised as issued by its CA only.
        """
        ca = ClusterCA.generate(time.time())
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = ca.issue_node_certificate(NODE_X, key.public_key(), time.time())
        self.assertEqual(node_id_of(certificate), NODE_X)
        self.assertIn(NODE_X, certificate.subject.rfc4514_string())
        self.assertTrue(ca.issued(certificate))
        self.assertFalse(ClusterCA.generate(time.time()).issued(certificate))

    def test_invalid_node_id(self) -> None:
        """
        Issuing for something that is not a node id is refused.
        """
        ca = ClusterCA.generate(time.time())
        key = ec.generate_private_key(ec.SECP256R1())
        self.assertRaises(
            InvalidArgument, ca.issue_node_certificate, "../etc", key.public_key(), time.time()
        )

    def test_certificate_not_beyond_ca(self) -> None:
        """
        A node certificate never outlives the CA certificate.
        """
        now = time.time()
        ca = ClusterCA.generate(now, lifetime=10 * DAY)
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = ca.issue_node_certificate(NODE_X, key.public_key(), now, lifetime=100 * DAY)
        self.assertEqual(certificate.not_valid_after_utc, ca.certificate.not_valid_after_utc)

    def test_from_files(self) -> None:
        """
        An operator's CA loads from PEM files; mismatched files are refused
        with a message naming them.
        """
        ca = ClusterCA.generate(time.time())
        other = ClusterCA.generate(time.time())
        directory = self.mktemp()
        os.makedirs(directory)
        paths = {}
        for name, data in [
            ("ca.crt", ca.certificate_pem()),
            ("ca.key", ca.private_key_pem()),
            ("other.key", other.private_key_pem()),
        ]:
            paths[name] = os.path.join(directory, name)
            with open(paths[name], "wb") as f:
                f.write(data)
        loaded = ClusterCA.from_files(paths["ca.crt"], paths["ca.key"])
        self.assertEqual(loaded.certificate, ca.certificate)
        self.assertEqual(loaded.private_key_pem(), ca.private_key_pem())
        e = self.assertRaises(InvalidArgument, ClusterCA.from_files, paths["ca.crt"], paths["other.key"])
        self.assertIn(paths["other.key"], str(e))

    def test_leaf_is_not_a_ca(self) -> None:
        """
        A node certificate and key cannot be loaded as a CA.
        """
        ca = ClusterCA.generate(time.time())
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = ca.issue_node_certificate(NODE_X, key.public_key(), time.time())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.assertRaises(
            InvalidArgument, ClusterCA.from_pem,
            certificate.public_bytes(serialization.Encoding.PEM), key_pem,
        )


class NodeIdentityTests(SynchronousTestCase):
    """
    L{NodeIdentity.load_or_create}: keeping, reusing and renewing.
    """

    def setUp(self) -> None:
        self.now = 1_800_000_000.0
        self.ca = ClusterCA.generate(self.now - DAY)
        self.data_dir = self.mktemp()
        os.makedirs(self.data_dir)

    def _load(self, now: float, ca: ClusterCA | None = None) -> NodeIdentity:
        return NodeIdentity.load_or_create(
            self.data_dir, NODE_X, ca or self.ca, now,
            renew_before=30 * DAY, lifetime=90 * DAY,
        )

    def test_created_files(self) -> None:
        """
        The key is kept with mode 0600 and the certificate next to it.
        """
        identity = self._load(self.now)
        key_path = os.path.join(self.data_dir, KEY_FILE)
        self.assertEqual(stat.S_IMODE(os.stat(key_path).st_mode), 0o600)
        self.assertTrue(os.path.exists(os.path.join(self.data_dir, CERT_FILE)))
        self.assertEqual(node_id_of(identity.certificate), NODE_X)
        self.assertTrue(self.ca.issued(identity.certificate))

    def test_valid_certificate_reused(self) -> None:
        """
        A certificate far from expiry is reused as is.
        """
        first = self._load(self.now)
        again = self._load(self.now + 50 * DAY)
        self.assertEqual(again.certificate, first.certificate)

    def test_renewed_near_expiry(self) -> None:
        """
        Within the renewal window a new certificate is issued for the same
        key, valid from the new now.
        """
        first = self._load(self.now)
        later = self.now + 61 * DAY
        renewed = self._load(later)
        self.assertNotEqual(renewed.certificate.serial_number, first.certificate.serial_number)
        self.assertEqual(
            renewed.private_key.private_numbers(), first.private_key.private_numbers()
        )
        self.assertGreater(renewed.certificate.not_valid_after_utc.timestamp(), later + 60 * DAY)
        # And the renewed one is kept.
        self.assertEqual(self._load(later + DAY).certificate, renewed.certificate)

    def test_reissued_for_new_ca(self) -> None:
        """
        A certificate not signed by the current CA is replaced.
        """
        self._load(self.now)
        other = ClusterCA.generate(self.now - DAY)
        identity = self._load(self.now, other)
        self.assertTrue(other.issued(identity.certificate))
        self.assertFalse(self.ca.issued(identity.certificate))

    def test_reissued_when_missing(self) -> None:
        """
        A deleted certificate file is re-issued.
        """
        first = self._load(self.now)
        os.unlink(os.path.join(self.data_dir, CERT_FILE))
        identity = self._load(self.now)
        self.assertNotEqual(identity.certificate.serial_number, first.certificate.serial_number)

    def test_reissued_for_other_node(self) -> None:
        """
        A certificate kept for another node id is not used for this one.
        """
        self._load(self.now)
        identity = NodeIdentity.load_or_create(self.data_dir, NODE_A, self.ca, self.now)
        self.assertEqual(node_id_of(identity.certificate), NODE_A)


@implementer(IHandshakeListener)
class _Server(Protocol):
    """
    Answers each message C{<claimed node id>:<text>} with the peer's
    verified node id and whether the claim matches it.
    """

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record
        self.lost: Deferred[None] = Deferred()

    def handshakeCompleted(self) -> None:
        self.record["handshakes"] += 1

    def dataReceived(self, data: bytes) -> None:
        self.record["received"] += data
        claimed = data.split(b":", 1)[0].decode("ascii")
        verified = peer_node_id(self.transport)
        verdict = b"ok" if claimed == verified else b"refused"
        self.transport.write(verified.encode("ascii") + b" " + verdict)

    def connectionLost(self, reason: Failure) -> None:
        self.lost.callback(None)


@implementer(IHandshakeListener)
class _Client(Protocol):
    """
    Sends one message once the handshake is done and collects the answer.
    """

    def __init__(self, message: bytes) -> None:
        self.message = message
        self.received = b""
        self.handshake_done = False
        self.server_node_id: str | None = None
        self.done: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def handshakeCompleted(self) -> None:
        self.handshake_done = True
        self.server_node_id = peer_node_id(self.transport)
        self.protocol_version = self.transport.getHandle().get_protocol_version_name()
        self.transport.write(self.message)

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        # A Failure given to callback() would errback: keep it aside.
        self.reason = reason
        self.done.callback(None)


class MutualTLSTests(TestCase):
    """
    Real TLS over loopback sockets with L{server_context} and
    L{client_context}.
    """

    timeout = 10

    def setUp(self) -> None:
        self.ca = ClusterCA.generate(time.time())
        self.server_identity = _identity(self, self.ca, NODE_A)
        self.record: dict[str, Any] = {"handshakes": 0, "received": b""}
        self.servers: list[_Server] = []

        def build() -> _Server:
            server = _Server(self.record)
            self.servers.append(server)
            return server

        factory = TLSMemoryBIOFactory(
            server_context(self.server_identity, self.ca), False, Factory.forProtocol(build)
        )
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    async def _exchange(self, creator: Any, message: bytes) -> tuple[_Client, Failure]:
        """
        Connect with C{creator}, send C{message}, and wait until both ends
        of the connection are closed.
        """
        client = _Client(message)
        endpoint = wrapClientTLS(
            creator, TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        )
        await endpoint.connect(Factory.forProtocol(lambda: client))
        await client.done
        await gatherResults([server.lost for server in self.servers])
        assert client.reason is not None
        return client, client.reason

    def _assert_refused(self, client: _Client, reason: Failure) -> None:
        """
        The handshake failed: the server's application saw nothing and the
        client received nothing.
        """
        self.assertIsInstance(reason.value, SSL.Error)
        self.assertEqual(self.record["handshakes"], 0)
        self.assertEqual(self.record["received"], b"")
        self.assertEqual(client.received, b"")

    async def test_valid_node(self) -> None:
        """
        A node with a certificate from the cluster CA connects over TLS 1.3;
        each end sees the other's node id.
        """
        identity = _identity(self, self.ca, NODE_B)
        client, reason = await self._exchange(
            client_context(identity, self.ca, NODE_A), NODE_B.encode() + b":hello"
        )
        self.assertEqual(client.received, NODE_B.encode() + b" ok")
        self.assertEqual(client.server_node_id, NODE_A)
        self.assertEqual(client.protocol_version, "TLSv1.3")
        self.assertEqual(self.record["handshakes"], 1)

    async def test_any_node_when_none_expected(self) -> None:
        """
        A client expecting no particular node accepts any cluster node.
        """
        identity = _identity(self, self.ca, NODE_B)
        client, reason = await self._exchange(
            client_context(identity, self.ca, None), NODE_B.encode() + b":hello"
        )
        self.assertEqual(client.server_node_id, NODE_A)
        self.assertEqual(client.received, NODE_B.encode() + b" ok")

    async def test_no_client_certificate(self) -> None:
        """
        A client presenting no certificate is refused during the handshake.
        """
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_verify(SSL.VERIFY_NONE)
        creator = _PlainClient(context)
        client, reason = await self._exchange(creator, NODE_B.encode() + b":hello")
        self._assert_refused(client, reason)

    async def test_certificate_from_other_ca(self) -> None:
        """
        A client whose certificate comes from another CA is refused, even
        though it names a node id and trusts the server.
        """
        other_ca = ClusterCA.generate(time.time())
        foreign = _identity(self, other_ca, NODE_B)
        client, reason = await self._exchange(
            client_context(foreign, self.ca, None), NODE_B.encode() + b":hello"
        )
        self._assert_refused(client, reason)

    async def test_server_impersonating_node(self) -> None:
        """
        A client expecting node X aborts when the server presents another
        node's valid certificate; the server's application sees nothing.
        """
        identity = _identity(self, self.ca, NODE_B)
        client, reason = await self._exchange(
            client_context(identity, self.ca, NODE_X), NODE_B.encode() + b":hello"
        )
        self.assertFalse(client.handshake_done)
        self._assert_refused(client, reason)

    async def test_claimed_id_checked_against_certificate(self) -> None:
        """
        A node holding a valid certificate for B that claims to be X in a
        message is found out: the peer's verified id is B.
        """
        identity = _identity(self, self.ca, NODE_B)
        client, reason = await self._exchange(
            client_context(identity, self.ca, NODE_A), NODE_X.encode() + b":hello"
        )
        self.assertEqual(client.received, NODE_B.encode() + b" refused")


    async def test_expired_certificate(self) -> None:
        """
        A certificate from the cluster CA that has expired is refused.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        long_ago = time.time() - 100 * DAY
        expired = NodeIdentity(
            NODE_B, key, self.ca.issue_node_certificate(NODE_B, key.public_key(), long_ago, 10 * DAY)
        )
        client, reason = await self._exchange(
            client_context(expired, self.ca, None), NODE_B.encode() + b":hello"
        )
        self._assert_refused(client, reason)


class _Body(Protocol):
    """
    Collects a response body (C{readBody} warns about Agent's transports).
    """

    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure) -> None:
        if reason.check(ResponseDone):
            self.done.callback(self.data)
        else:
            self.done.errback(reason)


class _WhoAmI(Resource):
    """
    Answers with the verified node id of the requesting peer.
    """

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return peer_node_id(request.transport).encode("ascii")


class HTTPSTests(TestCase):
    """
    A twisted.web site under mutual TLS, queried by an C{Agent} with
    L{ClusterTLSPolicy}, as the cluster listener and its peers will be.
    """

    timeout = 10

    def setUp(self) -> None:
        self.ca = ClusterCA.generate(time.time())
        factory = TLSMemoryBIOFactory(
            server_context(_identity(self, self.ca, NODE_A), self.ca), False, Site(_WhoAmI())
        )
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.url = f"https://127.0.0.1:{self.port.getHost().port}/".encode()

    def _agent(self, expected: str | None) -> Agent:
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        seen: list[tuple[str, int]] = []
        self.netlocs = seen

        def expected_node_id(host: str, port: int) -> str | None:
            seen.append((host, port))
            return expected

        policy = ClusterTLSPolicy(_identity(self, self.ca, NODE_B), self.ca, expected_node_id)
        return Agent(reactor, contextFactory=policy, pool=pool)

    async def test_peer_request(self) -> None:
        """
        A peer's request reaches the site, which sees the peer's node id.
        """
        response = await self._agent(NODE_A).request(b"GET", self.url)
        self.assertEqual(response.code, 200)
        body = _Body()
        response.deliverBody(body)
        self.assertEqual(await body.done, NODE_B.encode())
        self.assertEqual(self.netlocs, [("127.0.0.1", self.port.getHost().port)])

    async def test_wrong_node_at_address(self) -> None:
        """
        A request to an address where another node than the expected one
        answers fails without a response.
        """
        with self.assertRaises(Exception) as caught:
            await self._agent(NODE_X).request(b"GET", self.url)
        self.assertIn("certificate verify failed", repr(caught.exception))


@implementer(IOpenSSLClientConnectionCreator)
class _PlainClient:
    """
    A client connection creator presenting no certificate.
    """

    def __init__(self, context: SSL.Context) -> None:
        self._context = context

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """
        A client connection without a certificate.
        """
        connection = SSL.Connection(self._context, None)
        connection.set_connect_state()
        return connection


class PeerNodeIdTests(SynchronousTestCase):
    """
    L{peer_node_id} on connections that are not verified cluster
    connections.
    """

    def test_not_tls(self) -> None:
        """
        A transport whose handle is not an OpenSSL connection is refused.
        """

        class Plain:
            def getHandle(self) -> object:
                return object()

        self.assertRaises(PeerIdentityError, peer_node_id, Plain())

    def test_no_certificate(self) -> None:
        """
        A TLS connection with no peer certificate yet is refused.
        """

        class Unfinished:
            def getHandle(self) -> SSL.Connection:
                return SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)

        self.assertRaises(PeerIdentityError, peer_node_id, Unfinished())


class CAStoreTests(TestCase):
    """
    L{CAStore} against a real global database.
    """

    async def _database(self) -> Database:
        self.dsn = fresh_database(self)
        db = await Database.connect(self.dsn, reactor, pool_size=2)
        self.addCleanup(db.close)
        await apply_migrations(db, "global")
        return db

    async def test_load_empty(self) -> None:
        """
        Before any CA is created, L{CAStore.load} returns C{None}.
        """
        db = await self._database()
        self.assertIsNone(await CAStore(db, SecretBox.from_hex(KEY_A)).load())

    async def test_concurrent_first_nodes_agree(self) -> None:
        """
        Two nodes creating the CA at once end up with the same CA, and it is
        what later loads return.
        """
        db = await self._database()
        other_db = await Database.connect(self.dsn, reactor, pool_size=1)
        self.addCleanup(other_db.close)
        box = SecretBox.from_hex(KEY_A)
        now = time.time()
        first, second = await gatherResults([
            Deferred.fromCoroutine(CAStore(db, box).load_or_create(now)),
            Deferred.fromCoroutine(CAStore(other_db, box).load_or_create(now)),
        ])
        self.assertEqual(first.certificate, second.certificate)
        self.assertEqual(first.private_key_pem(), second.private_key_pem())
        loaded = await CAStore(db, box).load()
        assert loaded is not None
        self.assertEqual(loaded.certificate, first.certificate)
        rows = await db.run_query("SELECT count(*) FROM cluster_ca")
        self.assertEqual(rows[0][0], 1)

    async def test_key_stored_encrypted(self) -> None:
        """
        The table holds the certificate, and the key only encrypted: neither
        its PEM, its DER nor its private scalar appears in the row.
        """
        db = await self._database()
        ca = await CAStore(db, SecretBox.from_hex(KEY_A)).load_or_create(time.time())
        rows = await db.run_query("SELECT cert_pem, key_ciphertext FROM cluster_ca")
        cert_pem, ciphertext = rows[0][0].encode(), bytes(rows[0][1])
        self.assertEqual(cert_pem, ca.certificate_pem())
        key_pem = ca.private_key_pem()
        key = serialization.load_pem_private_key(key_pem, password=None)
        der = key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        scalar = key.private_numbers().private_value.to_bytes(32, "big")
        row_bytes = cert_pem + ciphertext
        for secret in (key_pem, der, scalar, b"PRIVATE KEY"):
            self.assertNotIn(secret, row_bytes)

    async def test_wrong_secret_key(self) -> None:
        """
        Loading the CA with another secret key fails with
        L{SecretKeyMismatch}, and leaves the stored CA alone.
        """
        db = await self._database()
        ca = await CAStore(db, SecretBox.from_hex(KEY_A)).load_or_create(time.time())
        wrong = CAStore(db, SecretBox.from_hex(KEY_B))
        with self.assertRaises(SecretKeyMismatch):
            await wrong.load()
        with self.assertRaises(SecretKeyMismatch):
            await wrong.load_or_create(time.time())
        again = await CAStore(db, SecretBox.from_hex(KEY_A)).load()
        assert again is not None
        self.assertEqual(again.certificate, ca.certificate)

