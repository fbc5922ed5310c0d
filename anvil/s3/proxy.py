# -*- test-case-name: tests.test_s3_proxy -*-
"""
Requests for a bucket of another region, proxied to a node of that region.

Buckets are global (their names and regions live in the global database),
objects are regional (in the bucket's region's database, their shards on
that region's nodes). A node can therefore authenticate and authorise any
request, but only a node of the bucket's region can serve it.

Anvil proxies rather than redirects. An S3 redirect (C{301
PermanentRedirect} with C{x-amz-bucket-region}) makes SDKs re-sign for the
other region, but they send the retry to the same custom endpoint; that
works against AWS's regional endpoints and loops against a self-hosted
cluster whose endpoint is one of its nodes. A proxy is invisible to every
client: the request (method, path, query, every end-to-end header,
including C{Host} and C{Authorization}) is forwarded unchanged to the API
of an alive member of the bucket's region, chosen at random, which
verifies the signature itself, since the signed headers are unchanged; the
body streams through in both directions with flow control. A node that
receives a request already proxied by another node
(C{x-anvil-proxied-by}) never forwards it again: it answers 503 instead,
which only happens while membership views disagree.

Without a proxy (a node started on its own), such a request gets AWS's
C{301 PermanentRedirect} with the bucket's region.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from anvil.s3.dispatch import S3Response
from anvil.s3.errors import ServiceUnavailable

__all__ = ["PROXIED_BY", "RegionProxy"]

#: Marks a request forwarded by another node (its value: that node's id).
PROXIED_BY = "x-anvil-proxied-by"

# Hop-by-hop headers (RFC 9110 section 7.6.1) are the connection's, not the
# request's; Expect is answered by this node's own channel.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)

#: Response bytes buffered from the upstream before it is paused.
_HIGH_WATER = 1024 * 1024


@implementer(IBodyProducer)
class _RequestBodyProducer:
    """
    Streams the client's request body to the upstream node, pausing when
    the upstream connection's buffer is full.
    """

    def __init__(self, body: Any, length: int | None) -> None:
        self._body = body
        self.length = UNKNOWN_LENGTH if length is None else length
        self._paused: Deferred[None] | None = None
        self._stopped = False

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        return Deferred.fromCoroutine(self._produce(consumer))

    async def _produce(self, consumer: IConsumer) -> None:
        while not self._stopped:
            if self._paused is not None:
                await self._paused
                continue
            data = await self._body.read()
            if not data:
                return
            consumer.write(data)

    def pauseProducing(self) -> None:
        if self._paused is None:
            self._paused = Deferred()

    def resumeProducing(self) -> None:
        paused, self._paused = self._paused, None
        if paused is not None:
            paused.callback(None)

    def stopProducing(self) -> None:
        self._stopped = True
        self.resumeProducing()


class _ResponseBody(Protocol):
    """
    The upstream's response body as an async iterator, pausing the upstream
    connection while more than L{_HIGH_WATER} bytes wait to be sent on.
    """

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._done: Failure | None = None
        self._waiter: Deferred[None] | None = None
        self._paused = False

    def dataReceived(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pauseProducing()
        self._wake()

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        self._done = reason
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.callback(None)

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            while True:
                if self._chunks:
                    data = b"".join(self._chunks)
                    self._chunks.clear()
                    self._buffered = 0
                    if self._paused and self.transport is not None:
                        self._paused = False
                        self.transport.resumeProducing()
                    yield data
                    continue
                if self._done is not None:
                    if not self._done.check(ResponseDone):
                        self._done.raiseException()
                    return
                self._waiter = Deferred()
                await self._waiter
        finally:
            if self._done is None and self.transport is not None:
                # The client went away: stop the upstream transfer too.
                self.transport.stopProducing()


class RegionProxy:
    """
    Forwards requests to an alive node of a bucket's region.
    """

    _log = Logger()

    def __init__(
        self,
        agent: Any,
        node_id: str,
        members: Callable[[], Iterable[Any]],
        rng: random.Random | None = None,
    ) -> None:
        """
        @param agent: A twisted.web C{IAgent} (with a persistent pool) for
            other nodes' S3 APIs.
        @param node_id: This node's id (sent in L{PROXIED_BY}).
        @param members: Returns the current member records (with
            C{region}, C{api_addr} and C{state}).
        @param rng: Chooses among a region's nodes.
        """
        self._agent = agent
        self._node_id = node_id
        self._members = members
        self._rng = rng or random.Random()

    def endpoint_for(self, region: str) -> str | None:
        """
        @return: The API URL of a random alive member of C{region} (a
            suspect one when none is alive: suspicion is often a slow node,
            not a dead one), or L{None} when none is known.
        """
        by_state: dict[str, list[str]] = {"alive": [], "suspect": []}
        for member in self._members():
            state = getattr(member.state, "value", member.state)
            if member.region == region and member.api_addr and state in by_state:
                by_state[state].append(member.api_addr)
        candidates = by_state["alive"] or by_state["suspect"]
        if not candidates:
            return None
        return str(self._rng.choice(candidates)).rstrip("/")

    async def forward(self, request: Any, region: str, headers: dict[str, str]) -> S3Response:
        """
        Forward C{request} to a node of C{region} and answer with its
        response.

        @param request: The client's request (its body not read yet).
        @param region: The bucket's region.
        @param headers: The request's headers (lower-case names).
        @raise ServiceUnavailable: No node of that region is reachable, or
            the request was already forwarded once.
        """
        if PROXIED_BY in headers:
            raise ServiceUnavailable(
                f"This node does not serve region {region} and the request was already forwarded."
            )
        endpoint = self.endpoint_for(region)
        if endpoint is None:
            raise ServiceUnavailable(f"No node of region {region} is reachable at the moment.")
        outgoing = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            lower = name.decode("latin-1").lower()
            # The agent frames the body itself, from the producer's length.
            if lower not in _HOP_BY_HOP and lower != "content-length":
                outgoing.setRawHeaders(name, values)
        outgoing.setRawHeaders(PROXIED_BY.encode("ascii"), [self._node_id.encode("ascii")])
        length = headers.get("content-length")
        body: _RequestBodyProducer | None = None
        if length is None and "transfer-encoding" not in headers:
            request.body.discard()
        else:
            body = _RequestBodyProducer(request.body, int(length) if length is not None else None)
        url = endpoint.encode("ascii") + request.uri
        self._log.debug("forwarding {method} {uri} to {url}", method=request.method, uri=request.uri, url=url)
        try:
            response = await self._agent.request(request.method, url, outgoing, body)
        except Exception as e:
            raise ServiceUnavailable(f"The node serving region {region} could not be reached: {e}.") from None
        answer = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, values in response.headers.getAllRawHeaders()
            if name.decode("latin-1").lower() not in _HOP_BY_HOP
            for value in values
        ]
        if request.method == b"HEAD" or response.code in (204, 304):
            response.deliverBody(_Discard())
            return S3Response(response.code, answer, None)
        receiver = _ResponseBody()
        response.deliverBody(receiver)
        return S3Response(response.code, answer, receiver.chunks())


class _Discard(Protocol):
    """
    Swallows a response body nobody needs.
    """

    def dataReceived(self, data: bytes) -> None:
        pass
