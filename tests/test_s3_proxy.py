# -*- test-case-name: tests.test_s3_proxy -*-
"""
Tests for L{anvil.s3.proxy}: requests for a bucket of another region, on
an in-process S3 node (real PostgreSQL, real sockets) whose proxy forwards
to a real HTTP server standing in for the other region's node.
"""

from __future__ import annotations

import random
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site

from anvil.cluster.membership import Member, MemberState
from anvil.s3.proxy import PROXIED_BY, RegionProxy
from tests.s3fixture import S3Stack


class _Upstream(Resource):
    """
    The other region's node: records each request and answers with a body
    of its own.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[dict[str, Any]] = []

    def render(self, request: Any) -> bytes:
        body = request.content.read()
        self.requests.append(
            {
                "method": request.method,
                "uri": request.uri,
                "headers": {
                    k.decode().lower(): v[0].decode()
                    for k, v in request.requestHeaders.getAllRawHeaders()
                },
                "body": body,
            }
        )
        request.setResponseCode(200)
        request.setHeader(b"ETag", b'"upstream"')
        request.setHeader(b"x-amz-request-id", b"UPSTREAM")
        return b"from the other region:" + str(len(body)).encode()


def _member(node_id: str, region: str, api: str, state: MemberState = MemberState.ALIVE) -> Member:
    return Member(node_id, region, api, f"{node_id}:7443", state=state)


class EndpointTests(SynchronousTestCase):
    """
    Tests for L{RegionProxy.endpoint_for}.
    """

    def test_alive_members_of_the_region(self) -> None:
        """
        Only alive members of the region are chosen; suspect ones only when
        none is alive; none known gives L{None}.
        """
        members = [
            _member("a", "one", "http://a:1"),
            _member("b", "two", "http://b:1/"),
            _member("c", "two", "http://c:1", MemberState.SUSPECT),
            _member("d", "two", "http://d:1", MemberState.DEAD),
        ]
        proxy = RegionProxy(None, "me", lambda: members, random.Random(1))
        self.assertEqual({proxy.endpoint_for("two") for _ in range(20)}, {"http://b:1"})
        members[1] = _member("b", "two", "http://b:1", MemberState.DEAD)
        self.assertEqual(proxy.endpoint_for("two"), "http://c:1")
        self.assertIsNone(proxy.endpoint_for("three"))


class ProxyTests(TestCase):
    """
    Requests for a bucket of another region through the S3 resource.
    """

    async def setUp(self) -> None:
        self.s3 = await S3Stack.start(self)
        self.app = await self.s3.create_app("acme", "web")
        await self.s3.global_store.create_region("far-away")
        tenant = await self.s3.global_store.get_tenant("acme")
        await self.s3.service.buckets.create_bucket("faraway", tenant["id"], "far-away")
        self.upstream = _Upstream()
        self.port = reactor.listenTCP(0, Site(self.upstream), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.addCleanup(self.pool.closeCachedConnections)
        url = f"http://127.0.0.1:{self.port.getHost().port}"
        self.members = [_member("them", "far-away", url)]

    def enable_proxy(self) -> None:
        """
        Give the node a proxy that knows the upstream as region far-away.
        """
        self.s3.service.proxy = RegionProxy(
            Agent(reactor, pool=self.pool), "me", lambda: self.members
        )

    async def test_without_proxy_redirects(self) -> None:
        """
        A node without a proxy answers AWS's 301 PermanentRedirect naming
        the bucket's region.
        """
        headers = self.s3.signed_headers(self.app, "GET", "/faraway/key")
        response = await self.s3.raw_request("GET", "/faraway/key", headers)
        self.assertEqual(response.status, 301)
        self.assertEqual(response.headers["x-amz-bucket-region"], "far-away")
        self.assertIn(b"<Code>PermanentRedirect</Code>", response.body)

    async def test_forwards_request_and_answer(self) -> None:
        """
        The request goes to the other region's node unchanged (method,
        target, Host, Authorization, body), marked as proxied, and its
        answer comes back unchanged.
        """
        self.enable_proxy()
        body = b"x" * 300_000
        headers = self.s3.signed_headers(self.app, "PUT", "/faraway/some%20key", "x-id=PutObject", body=body)
        response = await self.s3.raw_request("PUT", "/faraway/some%20key?x-id=PutObject", headers, body)
        self.assertEqual(response.status, 200, response.body)
        self.assertEqual(response.body, b"from the other region:300000")
        self.assertEqual(response.headers["etag"], '"upstream"')
        self.assertEqual(response.headers["x-amz-request-id"], "UPSTREAM")
        [seen] = self.upstream.requests
        self.assertEqual(seen["method"], b"PUT")
        self.assertEqual(seen["uri"], b"/faraway/some%20key?x-id=PutObject")
        self.assertEqual(seen["body"], body)
        self.assertEqual(seen["headers"]["host"], headers.get("Host", f"127.0.0.1:{self.s3.port.getHost().port}"))
        self.assertEqual(seen["headers"]["authorization"], headers["Authorization"])
        self.assertEqual(seen["headers"][PROXIED_BY], "me")

    async def test_unauthenticated_not_forwarded(self) -> None:
        """
        The forwarding node authenticates and authorises first: a request
        with a wrong signature is refused here and never forwarded.
        """
        self.enable_proxy()
        headers = self.s3.signed_headers(self.app, "GET", "/faraway/key")
        headers["Authorization"] = headers["Authorization"][:-4] + "0000"
        response = await self.s3.raw_request("GET", "/faraway/key", headers)
        self.assertEqual(response.status, 403)
        self.assertEqual(self.upstream.requests, [])

    async def test_no_node_of_the_region(self) -> None:
        """
        With no alive node of the bucket's region known, the answer is 503.
        """
        self.enable_proxy()
        self.members = []
        headers = self.s3.signed_headers(self.app, "GET", "/faraway/key")
        response = await self.s3.raw_request("GET", "/faraway/key", headers)
        self.assertEqual(response.status, 503)
        self.assertIn(b"far-away", response.body)

    async def test_already_proxied_not_forwarded_again(self) -> None:
        """
        A request another node already forwarded is not forwarded again
        (views of membership that disagree must not make a loop).
        """
        self.enable_proxy()
        headers = self.s3.signed_headers(self.app, "GET", "/faraway/key")
        headers[PROXIED_BY] = "someone"
        response = await self.s3.raw_request("GET", "/faraway/key", headers)
        self.assertEqual(response.status, 503)
        self.assertEqual(self.upstream.requests, [])
