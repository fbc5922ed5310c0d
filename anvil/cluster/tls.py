# -*- test-case-name: tests.test_cluster_tls -*-
"""
Mutual TLS between cluster nodes (ARCHITECTURE §6).

A node keeps its key and its certificate (signed by the cluster CA, naming
its node id; see L{anvil.cluster.ca}) in its data dir: L{NodeIdentity}.
L{server_context} and L{client_context} build Twisted connection creators
(for C{TLSMemoryBIOFactory}, C{wrapClientTLS}, or an HTTPS policy) that
present that certificate and accept only peers whose certificate chains to
the cluster CA and names a node: a peer without one, with one from another
CA, or (for a client expecting a given node) naming another node fails the
handshake before any application data is exchanged.  TLS 1.2 is the
minimum; OpenSSL negotiates 1.3 whenever both ends offer it.

Messages carry the sender's node id too; L{peer_node_id} reads the id from
the verified peer certificate so the application can refuse a message whose
claimed sender is not the node at the other end of the connection.

The connection creators hand OpenSSL C{cryptography} objects, not pyOpenSSL
C{X509}/C{PKey} objects, whose use pyOpenSSL deprecates.
"""

from __future__ import annotations

import os
import secrets as _random
from dataclasses import dataclass
from typing import Any, Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL
from OpenSSL.crypto import X509
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.web.iweb import IPolicyForHTTPS
from twisted.logger import Logger
from zope.interface import implementer

from anvil.cluster.ca import NODE_CERT_LIFETIME, ClusterCA, check_node_id, node_id_of
from anvil.errors import AnvilError, InvalidArgument

#: File names in the data dir.
KEY_FILE = "node_key.pem"
CERT_FILE = "node_cert.pem"

#: Renew a node certificate when less than this is left of its life.
DEFAULT_RENEW_BEFORE = 30 * 24 * 3600.0

#: The session id context servers set: OpenSSL refuses to resume a session
#: with a verified client certificate unless one is set.
_SESSION_ID_CONTEXT = b"anvil-cluster"


class PeerIdentityError(AnvilError):
    """
    The peer of a connection has no verified node certificate.
    """


@dataclass(frozen=True)
class NodeIdentity:
    """
    A node's key and its certificate signed by the cluster CA.

    @ivar node_id: the id the certificate names.
    @ivar private_key: the node's key.
    @ivar certificate: its certificate.
    """

    node_id: str
    private_key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    _log = Logger()

    @classmethod
    def load_or_create(
        cls,
        data_dir: str,
        node_id: str,
        ca: ClusterCA,
        now: float,
        renew_before: float = DEFAULT_RENEW_BEFORE,
        lifetime: float = NODE_CERT_LIFETIME,
    ) -> NodeIdentity:
        """
        Load the identity kept in C{data_dir}, creating the key (mode 0600)
        if there is none and (re)issuing the certificate when it is missing,
        unreadable, not signed by C{ca}, not for this node or this key, not
        yet valid, or within C{renew_before} seconds of expiry.

        The key is kept across renewals; a new one is made only when the
        file is missing or unreadable.  Files are replaced atomically.

        @param data_dir: the node's data directory (it must exist).
        @param node_id: this node's id.
        @param ca: the cluster CA (with its key, to issue certificates).
        @param now: the current POSIX time.
        @param renew_before: seconds before expiry at which to re-issue.
        @param lifetime: seconds a newly issued certificate is valid for.
        @raise InvalidArgument: when C{node_id} is not a node id.
        """
        check_node_id(node_id)
        key_path = os.path.join(data_dir, KEY_FILE)
        cert_path = os.path.join(data_dir, CERT_FILE)
        key = _read_key(key_path)
        if key is None:
            key = ec.generate_private_key(ec.SECP256R1())
            _write_atomically(
                key_path,
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
                0o600,
            )
        certificate = _read_certificate(cert_path)
        reason = _reissue_reason(certificate, key, node_id, ca, now, renew_before)
        if reason is not None:
            cls._log.info(
                "Issuing a cluster certificate for node {node_id}: {reason}.",
                node_id=node_id, reason=reason,
            )
            certificate = ca.issue_node_certificate(node_id, key.public_key(), now, lifetime)
            _write_atomically(
                cert_path, certificate.public_bytes(serialization.Encoding.PEM), 0o644
            )
        assert certificate is not None
        return cls(node_id, key, certificate)

    @classmethod
    def from_files(cls, cert_path: str, key_path: str, ca: ClusterCA) -> NodeIdentity:
        """
        Load an identity from a certificate and key file (an operator-issued
        certificate, or the files a node keeps in its data dir), without
        issuing anything.

        @param ca: the cluster CA, which must have signed the certificate.
        @raise InvalidArgument: when a file is missing or unreadable, the
            key is not the certificate's, the certificate names no node, or
            the CA did not sign it.
        """
        try:
            with open(key_path, "rb") as f:
                key = serialization.load_pem_private_key(f.read(), password=None)
        except FileNotFoundError:
            raise InvalidArgument(f"There is no node key file {key_path}.") from None
        except (ValueError, TypeError):
            raise InvalidArgument(
                f"{key_path} is not an unencrypted PEM private key."
            ) from None
        try:
            with open(cert_path, "rb") as f:
                certificate = x509.load_pem_x509_certificate(f.read())
        except FileNotFoundError:
            raise InvalidArgument(f"There is no node certificate file {cert_path}.") from None
        except ValueError:
            raise InvalidArgument(f"{cert_path} is not a PEM certificate.") from None
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if certificate.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
            raise InvalidArgument(f"The key {key_path} does not belong to the certificate {cert_path}.")
        node_id = node_id_of(certificate)
        if node_id is None:
            raise InvalidArgument(f"The certificate {cert_path} names no Anvil node.")
        if not ca.issued(certificate):
            raise InvalidArgument(f"The certificate {cert_path} is not signed by the cluster CA.")
        return cls(node_id, key, certificate)  # type: ignore[arg-type]

    @classmethod
    def from_data_dir(cls, data_dir: str, ca: ClusterCA) -> NodeIdentity:
        """
        Load the identity a node keeps in its data dir (see
        L{load_or_create}), issuing nothing.

        @raise InvalidArgument: as L{from_files}.
        """
        return cls.from_files(
            os.path.join(data_dir, CERT_FILE), os.path.join(data_dir, KEY_FILE), ca
        )

    @property
    def expires_at(self) -> float:
        """
        When the certificate expires, in POSIX seconds.
        """
        return self.certificate.not_valid_after_utc.timestamp()


def _reissue_reason(
    certificate: x509.Certificate | None,
    key: ec.EllipticCurvePrivateKey,
    node_id: str,
    ca: ClusterCA,
    now: float,
    renew_before: float,
) -> str | None:
    """
    Why the kept certificate must be re-issued, or C{None} if it is good.
    """
    if certificate is None:
        return "there is none"
    if not ca.issued(certificate):
        return "the kept one is not signed by the cluster CA"
    if node_id_of(certificate) != node_id:
        return "the kept one names another node"
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if certificate.public_key().public_bytes(der, spki) != key.public_key().public_bytes(der, spki):
        return "the kept one is for another key"
    if certificate.not_valid_before_utc.timestamp() > now:
        return "the kept one is not valid yet"
    if certificate.not_valid_after_utc.timestamp() - now <= renew_before:
        return "the kept one expires soon"
    return None


def _read_key(path: str) -> ec.EllipticCurvePrivateKey | None:
    try:
        with open(path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except (FileNotFoundError, ValueError, TypeError):
        return None
    return key if isinstance(key, ec.EllipticCurvePrivateKey) else None


def _read_certificate(path: str) -> x509.Certificate | None:
    try:
        with open(path, "rb") as f:
            return x509.load_pem_x509_certificate(f.read())
    except (FileNotFoundError, ValueError):
        return None


def _write_atomically(path: str, data: bytes, mode: int) -> None:
    # The temporary file is created with its final mode, so the key is never
    # readable by others even for an instant; rename() makes the switch
    # atomic, so a crash leaves the old file or the new one, never half.
    temporary = f"{path}.{os.getpid()}.{_random.token_hex(4)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, mode)  # the umask may have narrowed it
        os.rename(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    directory = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def _verifier(expected_node_id: str | None) -> Any:
    """
    An OpenSSL verify callback: OpenSSL's own chain verification decides,
    and the peer's own certificate must also name a node (the expected one,
    if given).
    """

    def verify(connection: SSL.Connection, cert: X509, errno: int, depth: int, ok: int) -> bool:
        if not ok:
            return False
        if depth == 0:
            try:
                node_id = node_id_of(cert.to_cryptography())
            except Exception:
                # An exception here would escape from the handshake instead
                # of failing it; an unreadable certificate is simply refused.
                return False
            if node_id is None:
                return False
            if expected_node_id is not None and node_id != expected_node_id:
                return False
        return True

    return verify


def _context(identity: NodeIdentity, ca: ClusterCA, expected_node_id: str | None) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(
        SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_SINGLE_ECDH_USE
    )
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    context.use_certificate(identity.certificate)
    context.use_privatekey(identity.private_key)
    context.check_privatekey()
    store = context.get_cert_store()
    assert store is not None
    # Only the cluster CA is trusted: no system roots are loaded.
    store.add_cert(X509.from_cryptography(ca.certificate))
    context.set_verify(
        SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, _verifier(expected_node_id)
    )
    # Depth 1: a node certificate signed directly by the CA, nothing more.
    context.set_verify_depth(1)
    return context


@implementer(IOpenSSLServerConnectionCreator)
class _ServerCreator:
    """
    Creates the server end of peer connections.
    """

    def __init__(self, context: SSL.Context) -> None:
        self._context = context

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """
        A new server-side OpenSSL connection.
        """
        return SSL.Connection(self._context, None)


@implementer(IOpenSSLClientConnectionCreator)
class _ClientCreator:
    """
    Creates the client end of peer connections.
    """

    def __init__(self, context: SSL.Context) -> None:
        self._context = context

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """
        A new client-side OpenSSL connection.
        """
        connection = SSL.Connection(self._context, None)
        connection.set_connect_state()
        return connection


@implementer(IOpenSSLServerConnectionCreator)
class RenewableServerContext:
    """
    The server TLS settings of a listener whose node certificate is renewed
    while it runs: each new connection uses the identity last given to
    L{set_identity}; established connections keep theirs.
    """

    def __init__(self, identity: NodeIdentity, ca: ClusterCA) -> None:
        """
        @param identity: the node's current identity.
        @param ca: the cluster CA.
        """
        self._ca = ca
        self._current = server_context(identity, ca)

    def set_identity(self, identity: NodeIdentity) -> None:
        """
        Present C{identity} on connections accepted from now on.
        """
        self._current = server_context(identity, self._ca)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        """
        A new server-side OpenSSL connection with the current identity.
        """
        return self._current.serverConnectionForTLS(tlsProtocol)


def server_context(identity: NodeIdentity, ca: ClusterCA) -> IOpenSSLServerConnectionCreator:
    """
    The TLS settings of the cluster listener: present C{identity} and
    require a client certificate chaining to C{ca} and naming a node.

    Use with C{TLSMemoryBIOFactory(server_context(...), False, factory)}.
    """
    context = _context(identity, ca, None)
    context.set_session_id(_SESSION_ID_CONTEXT)
    return _ServerCreator(context)


def client_context(
    identity: NodeIdentity, ca: ClusterCA, expected_node_id: str | None
) -> IOpenSSLClientConnectionCreator:
    """
    The TLS settings of connections to a peer: present C{identity}, and
    require the server's certificate to chain to C{ca} and to name
    C{expected_node_id} (or any node, when C{None}).

    Use with C{wrapClientTLS(client_context(...), endpoint)}.
    """
    if expected_node_id is not None:
        check_node_id(expected_node_id)
    return _ClientCreator(_context(identity, ca, expected_node_id))


@implementer(IPolicyForHTTPS)
class ClusterTLSPolicy:
    """
    The HTTPS policy for a twisted.web C{Agent} (or treq) talking to peers'
    cluster listeners: each connection presents this node's identity and
    requires the peer to be the node the caller expects at that address.
    """

    def __init__(
        self,
        identity: NodeIdentity,
        ca: ClusterCA,
        expected_node_id: Callable[[str, int], str | None],
    ) -> None:
        """
        @param identity: this node's identity.
        @param ca: the cluster CA.
        @param expected_node_id: maps a peer's host and port to the node id
            that must be there (from the member records), or C{None} to
            accept any cluster node (a bootstrap address, whose node is not
            known yet).
        """
        self._identity = identity
        self._ca = ca
        self._expected = expected_node_id
        # OpenSSL contexts are reusable: keep one per expected node rather
        # than loading keys and the trust store for every connection.
        self._creators: dict[str | None, IOpenSSLClientConnectionCreator] = {}

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        """
        The connection creator for a connection to C{hostname:port}.
        """
        expected = self._expected(hostname.decode("ascii"), port)
        creator = self._creators.get(expected)
        if creator is None:
            creator = self._creators[expected] = client_context(
                self._identity, self._ca, expected
            )
        return creator

    def set_identity(self, identity: NodeIdentity) -> None:
        """
        Present C{identity} (a renewed certificate) on connections made from
        now on; pooled connections keep the one they were made with.
        """
        self._identity = identity
        self._creators = {}


def peer_node_id(transport: Any) -> str:
    """
    The node id in the verified certificate of a connection's peer.

    Connections made with L{server_context} or L{client_context} only
    complete their handshake when the peer's certificate chains to the
    cluster CA, so the id is authenticated.

    @param transport: the TLS transport (a C{TLSMemoryBIOProtocol}, or any
        transport whose C{getHandle()} is the OpenSSL connection), e.g. a
        protocol's C{transport} or a twisted.web request's C{transport}.
    @raise PeerIdentityError: when there is no peer certificate naming a
        node (the handshake has not completed, or it is not a cluster
        connection).
    """
    handle = transport.getHandle()
    if not isinstance(handle, SSL.Connection):
        raise PeerIdentityError("The connection is not a TLS connection.")
    certificate = handle.get_peer_certificate(as_cryptography=True)
    if certificate is None:
        raise PeerIdentityError("The peer presented no certificate.")
    node_id = node_id_of(certificate)
    if node_id is None:
        raise PeerIdentityError("The peer's certificate names no node.")
    return node_id
