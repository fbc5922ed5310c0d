# -*- test-case-name: tests.test_cluster_listener -*-
"""
SWIM messages over the cluster listener (ARCHITECTURE §6).

The client side, L{GossipTransport.send}, POSTs a message's JSON to
C{https://<cluster_addr>/cluster/v1/gossip} with the cluster secret in the
C{Anvil-Cluster-Secret} header; the answer is the response message's JSON
(200) or nothing (204).

The server side, L{GossipResource}, refuses with 403, and without looking at
the message, a request whose secret does not match (compared in constant
time) or whose message names a sender other than the node of the client
certificate; anything else goes to L{anvil.cluster.swim.Swim.receive}.  A
node with the wrong C{CLUSTER_SECRET} therefore never gets a join accepted
and is never gossiped about: the certificate proves who a node is, the secret
that it may join.
"""

from __future__ import annotations

import hmac
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from anvil.cluster.listener import request_peer, respond
from anvil.cluster.swim import Message, Swim
from anvil.cluster.tls import PeerIdentityError
from anvil.errors import AnvilError
from anvil.web.body import BodyIncomplete

#: The request header carrying the cluster secret.
SECRET_HEADER = b"Anvil-Cluster-Secret"

#: The largest gossip message accepted (a join reply lists every member:
#: about 300 bytes each).
MAX_MESSAGE = 8 * 1024 * 1024


class GossipRefused(AnvilError):
    """
    A peer answered a gossip message with an error status.

    @ivar code: the HTTP status.
    """

    def __init__(self, addr: str, code: int) -> None:
        """
        @param addr: the peer's cluster address.
        @param code: the status it answered with.
        """
        super().__init__(f"{addr} refused the gossip message with status {code}")
        self.code = code


class GossipTransport:
    """
    Sends SWIM messages to peers' cluster listeners.
    """

    def __init__(self, http: HTTPClient, secret: str, scheme: str = "https") -> None:
        """
        @param http: the treq client (mutual TLS, persistent pool).
        @param secret: C{CLUSTER_SECRET}.
        @param scheme: C{https}; tests of the message handling alone may use
            C{http}.
        """
        self._http = http
        self._secret = secret.encode("utf-8")
        self._scheme = scheme
        self._in_flight: set[Deferred[Message | None]] = set()

    def send(self, addr: str, message: Message) -> Deferred[Message | None]:
        """
        Deliver C{message} to the node at C{addr}.

        @return: fires with the response message or C{None} (204); fails
            with L{GossipRefused} on an error status, or with the connection
            error.  Cancelling it (the protocol's ack timeout) abandons the
            answer but not the request: cancelling an HTTP request aborts
            its connection, and under load every late ack would then cost
            the next probe a new TLS handshake, making it late too.  The
            request itself ends by its answer, the agent's connect timeout,
            or L{cancel_all}.
        """
        request = Deferred.fromCoroutine(self._send(addr, message))
        self._in_flight.add(request)
        answer: Deferred[Message | None] = Deferred()

        def done(result: object) -> None:
            self._in_flight.discard(request)
            if not answer.called:
                if isinstance(result, Failure):
                    answer.errback(result)
                else:
                    answer.callback(result)  # type: ignore[arg-type]
            elif isinstance(result, Failure):
                result.trap(Exception)  # abandoned: nobody waits for it

        request.addBoth(done)
        return answer

    def cancel_all(self) -> None:
        """
        Abandon every request in flight (on shutdown, before the connection
        pool is closed).
        """
        for d in list(self._in_flight):
            d.cancel()

    async def _send(self, addr: str, message: Message) -> Message | None:
        response = await self._http.post(
            f"{self._scheme}://{addr}/cluster/v1/gossip",
            data=message.to_json().encode("utf-8"),
            headers={
                SECRET_HEADER: [self._secret],
                b"Content-Type": [b"application/json"],
            },
        )
        body = await treq.content(response)
        if response.code == 204:
            return None
        if response.code != 200:
            raise GossipRefused(addr, response.code)
        return Message.from_json(body)


class GossipResource(Resource):
    """
    C{POST /cluster/v1/gossip}: one SWIM message in, its answer out.
    """

    isLeaf = True
    _log = Logger()

    def __init__(self, swim: Swim, secret: str) -> None:
        """
        @param swim: this node's protocol.
        @param secret: C{CLUSTER_SECRET}.
        """
        super().__init__()
        self._swim = swim
        self._secret = secret.encode("utf-8")

    def render(self, request: Any) -> bytes | int:
        """
        Check the secret and the sender, then hand the message to SWIM.
        """
        if request.method != b"POST":
            request.setHeader(b"Allow", b"POST")
            respond(request, 405, b"method not allowed\n")
            return NOT_DONE_YET
        given = request.requestHeaders.getRawHeaders(SECRET_HEADER) or [b""]
        # Compared as bytes in constant time, so a wrong guess takes as long
        # as any other; a repeated header is refused.
        if len(given) != 1 or not hmac.compare_digest(given[0], self._secret):
            self._log.warn(
                "refusing gossip from {peer}: wrong cluster secret", peer=_peer_or_unknown(request)
            )
            respond(request, 403, b"wrong cluster secret\n")
            return NOT_DONE_YET
        d = Deferred.fromCoroutine(self._handle(request))
        d.addErrback(self._failed, request)
        return NOT_DONE_YET

    async def _handle(self, request: Any) -> None:
        peer = request_peer(request)
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = await request.body.read()
            if not chunk:
                break
            size += len(chunk)
            if size > MAX_MESSAGE:
                respond(request, 413, b"message too large\n")
                return
            chunks.append(chunk)
        try:
            message = Message.from_json(b"".join(chunks))
        except ValueError as e:
            respond(request, 400, f"bad message: {e}\n".encode("utf-8"))
            return
        if message.sender != peer:
            self._log.warn(
                "refusing a {kind} message claiming to be from {sender}, sent by {peer}",
                kind=message.kind, sender=message.sender, peer=peer,
            )
            respond(request, 403, b"the sender is not the certificate's node\n")
            return
        request.anvil_operation = f"gossip-{message.kind}"
        reply = await self._swim.receive(message)
        if request._disconnected:
            return
        if reply is None:
            respond(request, 204)
        else:
            respond(request, 200, reply.to_json().encode("utf-8"), b"application/json")

    def _failed(self, reason: Failure, request: Any) -> None:
        if reason.check(BodyIncomplete):
            # The peer went away mid-message (it stopped, or gave up
            # waiting): nothing to answer.
            self._log.debug("gossip message cut short: {error}", error=str(reason.value))
            return
        if reason.check(PeerIdentityError):
            respond(request, 403, b"no verified node certificate\n")
            return
        self._log.failure("handling a gossip message failed", reason)
        if not request.finished and not request._disconnected:
            respond(request, 500, b"internal error\n")


def _peer_or_unknown(request: Any) -> str:
    try:
        return request_peer(request)
    except PeerIdentityError:
        return "an unidentified client"
