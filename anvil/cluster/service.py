# -*- test-case-name: tests.test_cluster_service -*-
"""
The cluster service of a node: its TLS identity, the mutual-TLS cluster
listener, SWIM gossip over it, and the HTTP client peers are reached with
(ARCHITECTURE §6).

The node drives it in this order::

    cluster = ClusterService(config, node_id, membership, global_db, box, metrics, reactor)
    await cluster.prepare()      # CA, node certificate, client, gossip endpoint
    cluster.root.register(...)   # other cluster endpoints (shard transfer)
    await cluster.listen()       # the listener; sets the local cluster_addr
    cluster.start_gossip()       # alone (INIT_CLUSTER) or joining in the background
    ...
    await cluster.stopService()  # leave, stop listening, close the pool

The cluster CA comes from the operator's files
(C{cluster.ca_cert_file} with C{ca_key_file}, so the node issues and renews
its own certificate; or with C{node_cert_file} and C{node_key_file}, a
certificate the operator issued), or else from the global database: the node
started with C{INIT_CLUSTER} creates it there, the others wait for it,
retrying with a backoff and saying why.
"""

from __future__ import annotations

import json
import random
from typing import Any

from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from anvil.cluster.ca import NODE_CERT_LIFETIME, CAStore, ClusterCA
from anvil.cluster.listener import ClusterRoot, cluster_factory, request_peer, respond, respond_json
from anvil.cluster.membership import Member, Membership, MemberState
from anvil.cluster.swim import JoinFailed, Swim, SwimConfig, member_to_dict
from anvil.cluster.tls import (
    DEFAULT_RENEW_BEFORE,
    ClusterTLSPolicy,
    NodeIdentity,
    PeerIdentityError,
    RenewableServerContext,
)
from anvil.cluster.transport import GossipResource, GossipTransport
from anvil.errors import DatabaseUnavailable, InvalidArgument, NotFound
from anvil.metrics import Metrics
from anvil.web.listener import track_channels

#: Persistent connections kept per peer: enough for a few shard streams and
#: gossip at once.
MAX_PERSISTENT_PER_PEER = 8

_PROBED = (MemberState.ALIVE, MemberState.SUSPECT)


class ClusterService(Service):
    """
    One node's cluster membership and peer traffic.

    @ivar ca: the cluster CA (after L{prepare}).
    @ivar identity: this node's current TLS identity (after L{prepare}).
    @ivar http: the treq client for peers' cluster listeners: mutual TLS,
        the peer's certificate must name the member known at that address
        (any cluster node for an unknown address, such as a bootstrap one),
        persistent connections (after L{prepare}).
    @ivar root: the listener's root resource; register endpoints on it.
    @ivar swim: the gossip protocol (after L{prepare}).
    @ivar port: the listening port (after L{listen}).
    @ivar leave_on_stop: whether L{stopService} announces a graceful leave
        (tests turn it off to simulate a crash).
    """

    _log = Logger()

    def __init__(
        self,
        config: Any,
        node_id: str,
        membership: Membership,
        global_db: Any,
        secret_box: Any,
        metrics: Metrics,
        reactor: Any,
        rng: random.Random | None = None,
        renew_before: float = DEFAULT_RENEW_BEFORE,
        cert_lifetime: float = NODE_CERT_LIFETIME,
        renew_check_interval: float = 3600.0,
        ca_retry_max: float = 30.0,
        leave_timeout: float = 2.0,
        swim_config: SwimConfig | None = None,
    ) -> None:
        """
        @param config: the node's L{anvil.config.NodeConfig}.
        @param node_id: this node's id (its data dir's C{node_id}).
        @param membership: the node's view; its C{local} is this node.
        @param global_db: the global database (for the CA store).
        @param secret_box: the box of C{ANVIL_SECRET_ENCRYPTION_KEY}.
        @param metrics: receives member events and members by state.
        @param reactor: the reactor (TCP, TLS, time).
        @param rng: the protocol's random choices.
        @param renew_before: renew the node certificate when less than this
            many seconds of its life are left.
        @param cert_lifetime: seconds a newly issued certificate is valid.
        @param renew_check_interval: seconds between expiry checks.
        @param ca_retry_max: longest wait between looks for the CA.
        @param leave_timeout: longest wait for the leave announcement.
        @param swim_config: protocol settings; by default from C{config}.
        """
        self.setName("cluster")
        self._config = config
        self.node_id = node_id
        self.membership = membership
        self._global_db = global_db
        self._box = secret_box
        self._metrics = metrics
        self._reactor = reactor
        self._rng = rng if rng is not None else random.Random()
        self._renew_before = renew_before
        self._cert_lifetime = cert_lifetime
        self._renew_check_interval = renew_check_interval
        self._ca_retry_max = ca_retry_max
        self._leave_timeout = leave_timeout
        cluster = config.cluster
        self._swim_config = swim_config or SwimConfig(
            protocol_period=cluster.protocol_period,
            ack_timeout=cluster.ack_timeout,
            indirect_probes=cluster.indirect_probes,
            suspicion_timeout=cluster.suspicion_timeout,
        )
        self.leave_on_stop = True
        self.root = ClusterRoot()
        self.ca: ClusterCA | None = None
        self.identity: NodeIdentity | None = None
        self.http: HTTPClient | None = None
        self.swim: Swim | None = None
        self.port: IListeningPort | None = None
        self._server_tls: RenewableServerContext | None = None
        self._policy: ClusterTLSPolicy | None = None
        self._pool: _ClosablePool | None = None
        self._connections: set[Any] = set()
        self._drain_timeout = min(config.node.shutdown_timeout, 5.0)
        self._renewal: LoopingCall | None = None
        self._joining: Deferred[int] | None = None
        self._ca_wait: Deferred[None] | None = None
        self._transport: GossipTransport | None = None
        self._gossiping = False

    # -- start-up -------------------------------------------------------

    async def prepare(self) -> None:
        """
        Load the CA and this node's identity (issuing or renewing its
        certificate if needed), build the peer client and the gossip
        protocol, and register the C{gossip} and C{members} endpoints.

        @raise InvalidArgument: for unusable operator CA or node files.
        @raise anvil.errors.SecretKeyMismatch: when the stored CA key was
            encrypted under another secret key.
        @raise CancelledError: when L{stopService} is called while waiting
            for the CA to appear in the global database.
        """
        self.ca = ca = await self._load_ca()
        self.identity = identity = self._load_identity(ca)
        self._server_tls = RenewableServerContext(identity, ca)
        self._policy = ClusterTLSPolicy(identity, ca, self._expected_node_id)
        self._pool = _ClosablePool(self._reactor, persistent=True)
        self._pool.maxPersistentPerHost = MAX_PERSISTENT_PER_PEER
        agent = Agent(
            self._reactor,
            contextFactory=self._policy,
            pool=self._pool,
            connectTimeout=self._config.cluster.peer_timeout,
        )
        self.http = HTTPClient(agent)
        self._transport = transport = GossipTransport(self.http, self._config.cluster.secret)
        self.swim = Swim(
            self.membership.local,
            self._reactor,
            transport.send,
            self._rng,
            self._swim_config,
            on_event=self._on_event,
            membership=self.membership,
        )
        self.root.register(b"gossip", GossipResource(self.swim, self._config.cluster.secret))
        self.root.register(b"members", MembersResource(self))
        if ca.can_issue and not self._config.cluster.node_cert_file:
            self._renewal = LoopingCall(self.renew_if_needed)
            self._renewal.clock = self._reactor
            self._renewal.start(self._renew_check_interval, now=False)

    async def _load_ca(self) -> ClusterCA:
        """
        The cluster CA from the operator's files or the global database.
        """
        cluster = self._config.cluster
        if cluster.ca_cert_file:
            if cluster.ca_key_file:
                return ClusterCA.from_files(cluster.ca_cert_file, cluster.ca_key_file)
            return ClusterCA.from_certificate_file(cluster.ca_cert_file)
        store = CAStore(self._global_db, self._box)
        if cluster.init or not cluster.bootstrap_addrs:
            # The first node of a cluster, or a node running alone (the
            # embedded quick start): nobody else will create the CA.
            return await store.load_or_create(self._reactor.seconds())
        delay = 1.0
        while True:
            try:
                ca = await store.load()
            except DatabaseUnavailable as e:
                reason = f"the global database is unavailable: {e}"
            else:
                if ca is not None:
                    return ca
                reason = "no node started with INIT_CLUSTER has created it yet"
            self._log.warn(
                "Waiting for the cluster CA in the global database ({reason}); "
                "looking again in {delay:.0f}s.",
                reason=reason, delay=delay,
            )
            # Kept so that stopService can end the wait (prepare() then
            # fails with CancelledError).
            self._ca_wait = deferLater(self._reactor, delay)
            try:
                await self._ca_wait
            finally:
                self._ca_wait = None
            delay = min(delay * 2, self._ca_retry_max)

    def _load_identity(self, ca: ClusterCA) -> NodeIdentity:
        """
        This node's identity: the operator-issued files, or the key and
        certificate kept in the data dir (issued or renewed as needed).
        """
        cluster = self._config.cluster
        if cluster.node_cert_file:
            identity = NodeIdentity.from_files(cluster.node_cert_file, cluster.node_key_file, ca)
            if identity.node_id != self.node_id:
                raise InvalidArgument(
                    f"The node certificate {cluster.node_cert_file} is for node "
                    f"{identity.node_id}, but this data dir's node id is {self.node_id}; "
                    f"issue one with: anvil-admin cluster ca issue {self.node_id}."
                )
            return identity
        return NodeIdentity.load_or_create(
            self._config.node.data_dir,
            self.node_id,
            ca,
            self._reactor.seconds(),
            renew_before=self._renew_before,
            lifetime=self._cert_lifetime,
        )

    def renew_if_needed(self) -> bool:
        """
        Re-issue the node certificate when it is close to expiry; new
        connections (both ways) use the new one at once.

        @return: whether a new certificate was issued.
        """
        identity, ca = self.identity, self.ca
        if identity is None or ca is None:
            return False
        now = self._reactor.seconds()
        if identity.expires_at - now > self._renew_before:
            return False
        try:
            renewed = self._load_identity(ca)
        except Exception:
            self._log.failure("Renewing the cluster certificate failed; retrying later.")
            return False
        if renewed.certificate == identity.certificate:
            return False
        self.identity = renewed
        assert self._server_tls is not None and self._policy is not None
        self._server_tls.set_identity(renewed)
        self._policy.set_identity(renewed)
        self._log.info(
            "Renewed the cluster certificate of node {node_id}.", node_id=self.node_id
        )
        return True

    async def listen(self) -> IListeningPort:
        """
        Listen on C{config.cluster.listen} with mutual TLS, and set the local
        member's cluster address: C{config.cluster.public_addrs[0]}, or
        C{127.0.0.1:<bound port>}.

        @return: the listening port.
        """
        assert self._server_tls is not None, "prepare() first"
        factory, _ = cluster_factory(self._server_tls, self.root, self._metrics, self._reactor)
        # The TLS connections themselves are tracked, so that shutdown can
        # close them without waiting for each peer's close_notify.
        self._connections = track_channels(factory)  # type: ignore[arg-type]
        endpoint = serverFromString(self._reactor, self._config.cluster.listen)
        self.port = port = await endpoint.listen(factory)
        public = self._config.cluster.public_addrs
        address = public[0] if public else f"127.0.0.1:{port.getHost().port}"
        self.update_local(cluster_addr=address)
        self._log.info("Cluster listener on {address}", address=address)
        return port

    def start_gossip(self) -> None:
        """
        Start the protocol.  With C{BOOTSTRAP_ADDRS} (other than this node's
        own address) the node joins through them in the background,
        retrying with a backoff until one answers; C{INIT_CLUSTER} without
        them starts a new cluster of one.
        """
        assert self.swim is not None, "prepare() first"
        self._gossiping = True
        self.swim.start()
        self._refresh_gauge()
        own = self.membership.local.cluster_addr
        seeds = [a for a in self._config.cluster.bootstrap_addrs if a and a != own]
        if not seeds:
            if self._config.cluster.init:
                self._log.info("Starting a new cluster (INIT_CLUSTER).")
            else:
                self._log.warn(
                    "Neither INIT_CLUSTER nor BOOTSTRAP_ADDRS is set: this node runs alone."
                )
            return
        self._joining = joining = self.swim.join(seeds, attempts=None)

        def joined(count: int) -> None:
            self._joining = None
            self._log.info("Joined the cluster: {count} members.", count=count)

        def failed(reason: Failure) -> None:
            self._joining = None
            if not reason.check(CancelledError, JoinFailed):
                self._log.failure("Joining the cluster failed", reason)

        joining.addCallbacks(joined, failed)

    def update_local(self, **changes: Any) -> Member:
        """
        Change this node's member record (C{capacity=}, C{api_addr=}, ...);
        once gossip runs, the change is gossiped (with a new incarnation).
        """
        if self._gossiping and self.swim is not None:
            return self.swim.update_local(**changes)
        return self.membership.set_local(**changes)

    # -- views ------------------------------------------------------------

    def members_document(self) -> dict[str, Any]:
        """
        The members as this node sees them, as served at
        C{GET /cluster/v1/members}.
        """
        local = self.membership.local
        return {
            "node_id": local.node_id,
            "region": local.region,
            "members": [member_to_dict(m) for m in self.membership.members()],
        }

    def remove_member(self, node_id: str) -> Member:
        """
        Declare a member gone for good: mark it I{left} (one incarnation up)
        and gossip that.

        @return: the new record.
        @raise NotFound: when this node does not know C{node_id}.
        @raise InvalidArgument: for this node itself.
        """
        assert self.swim is not None, "prepare() first"
        if node_id == self.node_id:
            raise InvalidArgument("A node cannot remove itself; stop it instead.")
        try:
            record = self.swim.declare_left(node_id)
        except KeyError:
            raise NotFound("member", node_id) from None
        self._log.info("Member {node_id} removed by the operator.", node_id=node_id)
        self._refresh_gauge()
        return record

    def _expected_node_id(self, host: str, port: int) -> str | None:
        """
        The node that must answer at C{host:port}: the member recorded there
        (a live one in preference to dead ones), or C{None} (any cluster
        node) for an address no member has, such as a bootstrap address.
        """
        address = f"{host}:{port}"
        fallback = None
        for member in self.membership.members():
            if member.cluster_addr != address:
                continue
            if member.state in _PROBED:
                return member.node_id
            fallback = fallback or member.node_id
        return fallback

    def _on_event(self, kind: str, member: Member) -> None:
        """
        Count a membership event and refresh the members-by-state gauge.
        """
        self._log.info(
            "Cluster member {node_id} ({addr}): {event}",
            node_id=member.node_id, addr=member.cluster_addr, event=kind,
        )
        self._metrics.cluster_member_events.labels(event=kind).inc()
        self._refresh_gauge()

    def _refresh_gauge(self) -> None:
        for state, count in self.membership.by_state().items():
            self._metrics.cluster_members.labels(state=state.value).set(count)

    # -- shutdown ---------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        """
        Leave gracefully (bounded by C{leave_timeout}), stop gossip, stop the
        listener (draining requests in flight briefly), close the pool.
        """
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._ca_wait is not None:
            self._ca_wait.cancel()
        if self._joining is not None:
            self._joining.cancel()
        if self._renewal is not None and self._renewal.running:
            self._renewal.stop()
        swim = self.swim
        if swim is not None and self._gossiping:
            self._gossiping = False
            if self.leave_on_stop:
                leaving = swim.leave()
                leaving.addTimeout(self._leave_timeout, self._reactor)
                try:
                    await leaving
                except Exception:
                    self._log.warn("The leave announcement did not finish in time.")
            swim.stop()
        if self._transport is not None:
            self._transport.cancel_all()
        if self.port is not None:
            await self._drain(self.port)
            self.port = None
        if self._pool is not None:
            await self._pool.closeCachedConnections()


    async def _drain(self, port: IListeningPort) -> None:
        """
        Stop listening; close idle connections at once, and busy ones once
        their requests are done or C{drain_timeout} has passed.

        Connections are aborted rather than shut down with a TLS
        close_notify: peers retry on a new connection, and waiting for each
        peer's own close_notify could hold shutdown up for nothing.
        """
        await port.stopListening()
        deadline = self._reactor.seconds() + self._drain_timeout
        while self._connections:
            late = self._reactor.seconds() >= deadline
            for protocol in list(self._connections):
                if late or not _busy(protocol):
                    protocol.transport.abortConnection()
            if late:
                if self._connections:
                    self._log.warn(
                        "Aborted {count} cluster connections still busy after {timeout}s.",
                        count=len(self._connections), timeout=self._drain_timeout,
                    )
                return
            if self._connections:
                await deferLater(self._reactor, 0.05)


class _ClosablePool(HTTPConnectionPool):
    """
    A persistent connection pool that, once closed, closes connections
    whose response ends afterwards instead of keeping them (with a timer)
    for requests that will never come.
    """

    _closed = False

    def _putConnection(self, key: Any, connection: Any) -> None:
        """
        Keep C{connection} for reuse, unless the pool is closed.
        """
        if self._closed:
            connection.transport.loseConnection()
            return
        super()._putConnection(key, connection)

    def closeCachedConnections(self) -> Deferred[None]:
        """
        Close the kept connections, and any that finish a response later.
        """
        self._closed = True
        return super().closeCachedConnections()


def _busy(tls: Any) -> bool:
    """
    Whether the HTTP channel under a TLS connection has a request in flight.
    """
    wrapped = getattr(tls, "wrappedProtocol", None)
    channel = getattr(wrapped, "_channel", wrapped)
    return bool(getattr(channel, "requests", None))


class MembersResource(Resource):
    """
    C{GET /cluster/v1/members}: the members as this node sees them;
    C{POST /cluster/v1/members/<id>/remove}: declare a member gone for good
    (only the node itself, that is its operator with its key, may).
    """

    isLeaf = True

    def __init__(self, service: ClusterService) -> None:
        """
        @param service: the node's cluster service.
        """
        super().__init__()
        self._service = service

    def render(self, request: Any) -> bytes | int:
        """
        Dispatch on the method and the rest of the path.
        """
        path = [p for p in request.postpath if p]
        if not path:
            if request.method not in (b"GET", b"HEAD"):
                request.setHeader(b"Allow", b"GET, HEAD")
                respond(request, 405, b"method not allowed\n")
                return NOT_DONE_YET
            respond_json(request, 200, self._service.members_document())
            return NOT_DONE_YET
        if len(path) == 2 and path[1] == b"remove":
            request.anvil_operation = "remove-member"
            if request.method != b"POST":
                request.setHeader(b"Allow", b"POST")
                respond(request, 405, b"method not allowed\n")
                return NOT_DONE_YET
            try:
                peer = request_peer(request)
            except PeerIdentityError:
                peer = None
            if peer != self._service.node_id:
                respond(request, 403, b"only the node itself may remove members\n")
                return NOT_DONE_YET
            node_id = path[0].decode("ascii", "replace")
            try:
                record = self._service.remove_member(node_id)
            except NotFound:
                respond(request, 404, json.dumps({"error": f"no member {node_id}"}).encode(), b"application/json")
                return NOT_DONE_YET
            except InvalidArgument as e:
                respond(request, 400, json.dumps({"error": str(e)}).encode(), b"application/json")
                return NOT_DONE_YET
            respond_json(request, 200, {"removed": member_to_dict(record)})
            return NOT_DONE_YET
        respond(request, 404, b"not found\n")
        return NOT_DONE_YET
