# -*- test-case-name: tests.test_web_root -*-
"""
Tests for L{anvil.web.root} and L{anvil.web.server}.

Most tests drive a real L{AnvilSite} (real Twisted HTTP parsing, real
L{AnvilRequest}) over an in-memory transport with a L{Clock}, so request
timing is simulated. One test listens on a real socket.
"""

from __future__ import annotations

import re
from typing import Any

from treq.client import HTTPClient
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from anvil.metrics import Metrics
from anvil.web.readiness import Readiness
from anvil.web.root import RootResource
from anvil.web.server import AnvilSite
from tests.fakehttp import Response, parse_response
from tests.test_metrics import requests_total, sample_value

_REQUEST_ID = re.compile(r"^[0-9A-F]{16}$")


class _Connection:
    """
    One client connection to an L{AnvilSite} over a L{StringTransport}.
    """

    def __init__(self, site: AnvilSite) -> None:
        address = IPv4Address("TCP", "192.0.2.7", 40000)
        self.transport = StringTransport(peerAddress=address)
        self.protocol = site.buildProtocol(address)
        self.protocol.makeConnection(self.transport)

    def send(self, method: bytes, target: bytes, headers: dict[bytes, bytes] | None = None) -> None:
        """
        Send one request without a body.
        """
        lines = [b"%s %s HTTP/1.1" % (method, target), b"Host: node.example"]
        for name, value in (headers or {}).items():
            lines.append(name + b": " + value)
        self.protocol.dataReceived(b"\r\n".join(lines) + b"\r\n\r\n")

    def response(self, head: bool = False) -> Response | None:
        """
        Parse and consume the response written so far.

        @param head: The request was HEAD, so no body follows the headers.
        @return: The response, or C{None} if none was written yet.
        """
        parsed = parse_response(self.transport.value(), head)
        if parsed is None:
            return None
        self.transport.clear()
        return parsed[0]

    def lose(self) -> None:
        """
        The client hangs up.
        """
        self.protocol.connectionLost(Failure(ConnectionDone()))


class _CountingCheck:
    """
    A readiness check recording its calls and cancellations; answers with
    C{outcome}, or never when C{outcome} is C{None}.
    """

    def __init__(self, outcome: Any = True) -> None:
        self.outcome = outcome
        self.calls = 0
        self.cancellations = 0

    def __call__(self) -> Deferred[None]:
        """
        Run the check once.
        """
        self.calls += 1
        if self.outcome is None:

            def cancelled(d: Deferred[None]) -> None:
                self.cancellations += 1

            return Deferred(cancelled)
        if isinstance(self.outcome, Exception):
            return fail(self.outcome)
        return succeed(None)


class _FakeS3(Resource):
    """
    Stands in for the S3 resource tree: a leaf that records what it was
    given and labels the request like the S3 dispatcher will.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, list[bytes], list[bytes]]] = []
        self.behaviour = "ok"

    def render(self, request: Any) -> bytes | int:
        """
        Record the request, label it, and answer according to C{behaviour}.
        """
        self.seen.append((request.method, list(request.prepath), list(request.postpath)))
        request.anvil_operation = "ListBuckets"
        if self.behaviour == "crash":
            raise RuntimeError("handler bug")
        if self.behaviour == "fail-then-hang":
            # A handler reporting its own failure, whose client leaves
            # before the response is complete.
            request.setResponseCode(500)
            return NOT_DONE_YET
        request.setHeader(b"Content-Type", b"application/xml")
        return b"<ListAllMyBucketsResult/>"


class _Node:
    """
    A root resource on an AnvilSite with a simulated clock, as a node wires
    it.
    """

    def __init__(
        self, checks: list[tuple[str, Any]] | None = None, s3: Resource | None = None
    ) -> None:
        self.clock = Clock()
        self.metrics = Metrics()
        self.readiness = Readiness(checks or [], 2.0, self.clock)
        self.root = RootResource(self.readiness, self.metrics, s3)
        self.site = AnvilSite(self.root, self.metrics, self.clock)

    def get(
        self, target: bytes, method: bytes = b"GET", headers: dict[bytes, bytes] | None = None
    ) -> Response:
        """
        Make one request that is answered at once.
        """
        connection = _Connection(self.site)
        connection.send(method, target, headers)
        response = connection.response(head=method == b"HEAD")
        assert response is not None, "no response"
        return response

    def ready_gauge(self) -> float | None:
        """
        The current C{anvil_node_ready} value.
        """
        return sample_value(self.metrics, "anvil_node_ready", "anvil_node_ready")


class HealthTests(SynchronousTestCase):
    """
    Tests for C{/}.
    """

    def test_ok_without_checks(self) -> None:
        """
        C{GET /} answers 200 C{OK} as plain text without running any
        readiness check.
        """
        check = _CountingCheck(ConnectionRefusedError("refused"))
        node = _Node([("global database", check)])
        response = node.get(b"/")
        self.assertEqual((response.code, response.body), (200, b"OK"))
        self.assertEqual(response.header(b"content-type"), b"text/plain; charset=utf-8")
        self.assertEqual(response.header(b"cache-control"), b"no-store")
        self.assertEqual(check.calls, 0)

    def test_head(self) -> None:
        """
        C{HEAD /} answers 200 with the GET body's length and no body.
        """
        connection = _Connection(_Node().site)
        connection.send(b"HEAD", b"/")
        connection.send(b"GET", b"/")
        data = connection.transport.value()
        # The HEAD response is followed directly by the GET response: no
        # body bytes in between.
        head, get = data.split(b"HTTP/1.1 200", 2)[1:]
        self.assertTrue(head.endswith(b"\r\n\r\n"), head)
        self.assertIn(b"Content-Length: 2\r\n", head)
        self.assertTrue(get.endswith(b"\r\n\r\nOK"), get)

    def test_query_string_ignored(self) -> None:
        """
        An anonymous C{GET /} with an unrelated query string is still the
        health endpoint.
        """
        self.assertEqual(_Node(s3=_FakeS3()).get(b"/?probe=1").body, b"OK")

    def test_wrong_method(self) -> None:
        """
        Methods other than GET and HEAD on C{/} answer 405 with an Allow
        header.
        """
        response = _Node().get(b"/", method=b"DELETE")
        self.assertEqual(response.code, 405)
        self.assertEqual(response.header(b"allow"), b"GET, HEAD")

    def test_counted(self) -> None:
        """
        A request to C{/} moves C{anvil_api_requests_total} for api "node",
        operation "Health", status "2xx", and its latency histogram.
        """
        node = _Node()
        self.assertEqual(requests_total(node.metrics, "node", "Health", "2xx"), 0.0)
        node.get(b"/")
        node.get(b"/")
        node.get(b"/", method=b"POST")
        self.assertEqual(requests_total(node.metrics, "node", "Health", "2xx"), 2.0)
        self.assertEqual(requests_total(node.metrics, "node", "Health", "4xx"), 1.0)
        self.assertEqual(
            sample_value(
                node.metrics,
                "anvil_api_request_duration_seconds",
                "anvil_api_request_duration_seconds_count",
                api="node",
                operation="Health",
            ),
            3.0,
        )


class ReadyTests(SynchronousTestCase):
    """
    Tests for C{/ready}.
    """

    def test_ready(self) -> None:
        """
        When every check passes, C{/ready} answers 200 C{ready} and sets
        C{anvil_node_ready} to 1.
        """
        checks = [_CountingCheck(), _CountingCheck(), _CountingCheck()]
        node = _Node(list(zip(["global database", "regional database", "membership"], checks)))
        response = node.get(b"/ready")
        self.assertEqual((response.code, response.body), (200, b"ready"))
        self.assertEqual([c.calls for c in checks], [1, 1, 1])
        self.assertEqual(node.ready_gauge(), 1.0)
        self.assertEqual(requests_total(node.metrics, "node", "Ready", "2xx"), 1.0)

    def test_not_ready_names_failing_checks(self) -> None:
        """
        C{/ready} answers 503 with a body naming exactly the failing checks,
        one per line, and sets C{anvil_node_ready} to 0.
        """
        node = _Node(
            [
                ("global database", _CountingCheck(RuntimeError("connection refused"))),
                ("regional database", _CountingCheck()),
                ("membership", _CountingCheck(RuntimeError("no alive member"))),
            ]
        )
        node.metrics.set_ready(True)
        response = node.get(b"/ready")
        self.assertEqual(response.code, 503)
        self.assertEqual(
            response.body,
            b"not ready\nglobal database: connection refused\nmembership: no alive member\n",
        )
        self.assertEqual(response.header(b"content-type"), b"text/plain; charset=utf-8")
        self.assertEqual(node.ready_gauge(), 0.0)
        self.assertEqual(requests_total(node.metrics, "node", "Ready", "5xx"), 1.0)

    def test_recovers(self) -> None:
        """
        C{/ready} reruns the checks on every request, so it turns back to 200
        once a failing check passes again.
        """
        check = _CountingCheck(RuntimeError("connection refused"))
        node = _Node([("global database", check)])
        self.assertEqual(node.get(b"/ready").code, 503)
        check.outcome = True
        self.assertEqual(node.get(b"/ready").code, 200)
        self.assertEqual(node.ready_gauge(), 1.0)

    def test_hung_check_times_out(self) -> None:
        """
        A hung check holds the answer until the timeout passes in simulated
        time; it is then cancelled and reported, and the request's recorded
        duration is the simulated wait.
        """
        hung = _CountingCheck(None)
        node = _Node([("regional database", hung), ("membership", _CountingCheck())])
        connection = _Connection(node.site)
        connection.send(b"GET", b"/ready")
        node.clock.advance(1.5)
        self.assertIsNone(connection.response())
        node.clock.advance(0.5)
        response = connection.response()
        assert response is not None
        self.assertEqual(response.code, 503)
        self.assertEqual(response.body, b"not ready\nregional database: timed out after 2.0s\n")
        self.assertEqual(hung.cancellations, 1)
        self.assertEqual(
            sample_value(
                node.metrics,
                "anvil_api_request_duration_seconds",
                "anvil_api_request_duration_seconds_sum",
                api="node",
                operation="Ready",
            ),
            2.0,
        )

    def test_client_gone_cancels_checks(self) -> None:
        """
        When the client hangs up while checks run, the checks are cancelled,
        nothing is written, the gauge is left alone, and the request counts
        as abandoned (4xx).
        """
        hung = _CountingCheck(None)
        node = _Node([("membership", hung)])
        node.metrics.set_ready(True)
        connection = _Connection(node.site)
        connection.send(b"GET", b"/ready")
        connection.lose()
        self.assertEqual(hung.cancellations, 1)
        self.assertEqual(connection.transport.value(), b"")
        self.assertEqual(node.clock.getDelayedCalls(), [])
        self.assertEqual(node.ready_gauge(), 1.0)
        self.assertEqual(requests_total(node.metrics, "node", "Ready", "4xx"), 1.0)

    def test_wrong_method(self) -> None:
        """
        C{POST /ready} answers 405 with an Allow header and runs no check.
        """
        check = _CountingCheck()
        response = _Node([("membership", check)]).get(b"/ready", method=b"POST")
        self.assertEqual(response.code, 405)
        self.assertEqual(response.header(b"allow"), b"GET, HEAD")
        self.assertEqual(check.calls, 0)


class MetricsEndpointTests(SynchronousTestCase):
    """
    Tests for C{/metrics}.
    """

    def test_content_type_and_families(self) -> None:
        """
        C{/metrics} answers 200 in the Prometheus text format with its
        content type, and the body parses.
        """
        response = _Node().get(b"/metrics")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.header(b"content-type"), CONTENT_TYPE_LATEST.encode("ascii"))
        names = {f.name for f in text_string_to_metric_families(response.body.decode("utf-8"))}
        self.assertIn("anvil_api_requests", names)
        self.assertIn("process_cpu_seconds", names)

    def test_shows_counted_requests(self) -> None:
        """
        A scrape after a request to C{/} shows it in
        C{anvil_api_requests_total{api="node",operation="Health",status="2xx"}}.
        """
        node = _Node()
        node.get(b"/")
        body = node.get(b"/metrics").body.decode("utf-8")
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body)
            for s in f.samples
        }
        key = (
            "anvil_api_requests_total",
            (("api", "node"), ("operation", "Health"), ("status", "2xx")),
        )
        self.assertEqual(samples[key], 1.0)
        # The scrape itself is recorded once it is over.
        self.assertEqual(requests_total(node.metrics, "node", "Metrics", "2xx"), 1.0)


class SiteTests(SynchronousTestCase):
    """
    Tests for L{AnvilSite} and L{AnvilRequest}: headers, metrics and logs
    every request gets.
    """

    def test_request_ids(self) -> None:
        """
        Every response carries an x-amz-request-id of 16 upper-case hex
        characters, different for every request, and an x-amz-id-2.
        """
        node = _Node(s3=_FakeS3())
        responses = [node.get(target) for target in (b"/", b"/ready", b"/metrics", b"/b/k") * 10]
        ids = [r.header(b"x-amz-request-id") for r in responses]
        for request_id in ids:
            assert request_id is not None
            self.assertRegex(request_id.decode("ascii"), _REQUEST_ID)
        self.assertEqual(len(set(ids)), len(ids))
        host_ids = [r.header(b"x-amz-id-2") for r in responses]
        self.assertNotIn(None, host_ids)
        self.assertEqual(len(set(host_ids)), len(host_ids))

    def test_server_header(self) -> None:
        """
        Responses say C{Server: Anvil}, never Twisted's banner, on node
        endpoints, S3 responses and errors alike.
        """
        s3 = _FakeS3()
        node = _Node(s3=s3)
        responses = [node.get(b"/"), node.get(b"/metrics"), node.get(b"/bucket")]
        s3.behaviour = "crash"
        responses.append(node.get(b"/bucket"))
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual([r.header(b"server") for r in responses], [b"Anvil"] * 4)

    def test_internal_error_counted(self) -> None:
        """
        A resource that raises yields a 500 with a request id, counted as
        5xx under the operation it had set.
        """
        s3 = _FakeS3()
        s3.behaviour = "crash"
        node = _Node(s3=s3)
        response = node.get(b"/bucket")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(response.code, 500)
        self.assertIsNotNone(response.header(b"x-amz-request-id"))
        self.assertEqual(requests_total(node.metrics, "s3", "ListBuckets", "5xx"), 1.0)

    def test_server_error_then_disconnect_stays_5xx(self) -> None:
        """
        A request whose handler set a 5xx code before the client left is
        counted as 5xx, not as abandoned.
        """
        s3 = _FakeS3()
        s3.behaviour = "fail-then-hang"
        node = _Node(s3=s3)
        connection = _Connection(node.site)
        connection.send(b"GET", b"/bucket")
        connection.lose()
        self.assertEqual(requests_total(node.metrics, "s3", "ListBuckets", "5xx"), 1.0)
        self.assertIsNone(requests_total(node.metrics, "s3", "ListBuckets", "4xx"))

    def test_unfinished_request_counted_as_abandoned(self) -> None:
        """
        A client that hangs up in the middle of sending its request is
        counted once, as an abandoned (4xx) S3 request of unknown operation.
        """
        node = _Node(s3=_FakeS3())
        connection = _Connection(node.site)
        connection.protocol.dataReceived(b"PUT /bucket/key HTTP/1.1\r\nHost: x\r\n")
        with capturedLogs() as events:
            connection.lose()
        self.assertEqual(requests_total(node.metrics, "s3", "Unknown", "4xx"), 1.0)
        [event] = [e for e in events if "request_id" in e]
        self.assertEqual((event["status"], event["path"]), (499, "-"))

    def test_access_log(self) -> None:
        """
        S3 requests are logged at info level with request id, status and
        path without the query string; node endpoints at debug level.
        """
        node = _Node(s3=_FakeS3())
        with capturedLogs() as events:
            response = node.get(b"/bucket?X-Amz-Signature=secret&X-Amz-Credential=AK")
            node.get(b"/")
        access = [e for e in events if "request_id" in e]
        self.assertEqual(len(access), 2)
        s3_event, health_event = access
        self.assertEqual(s3_event["log_level"].name, "info")
        self.assertEqual(health_event["log_level"].name, "debug")
        self.assertEqual(s3_event["path"], "/bucket")
        self.assertEqual(s3_event["status"], 200)
        self.assertEqual(s3_event["client"], "192.0.2.7")
        self.assertEqual(
            s3_event["request_id"].encode("ascii"), response.header(b"x-amz-request-id")
        )
        self.assertNotIn("secret", formatEvent(s3_event))

    def test_two_nodes_independent(self) -> None:
        """
        Two sites with their own Metrics in one process count only their own
        requests.
        """
        first, second = _Node(), _Node()
        first.get(b"/")
        self.assertEqual(requests_total(first.metrics, "node", "Health", "2xx"), 1.0)
        self.assertEqual(requests_total(second.metrics, "node", "Health", "2xx"), 0.0)


class FallThroughTests(SynchronousTestCase):
    """
    Tests for the routing between node endpoints and the S3 resource.
    """

    def test_other_paths_go_to_s3(self) -> None:
        """
        Paths other than the three node endpoints reach the S3 resource with
        the whole path, as if it were the root.
        """
        s3 = _FakeS3()
        node = _Node(s3=s3)
        for target in (b"/bucket", b"/bucket/a/b.txt", b"/ready/", b"/metrics/x"):
            self.assertEqual(node.get(target).body, b"<ListAllMyBucketsResult/>")
        self.assertEqual(
            [postpath for _, _, postpath in s3.seen],
            [[b"bucket"], [b"bucket", b"a", b"b.txt"], [b"ready", b""], [b"metrics", b"x"]],
        )
        self.assertEqual({tuple(prepath) for _, prepath, _ in s3.seen}, {()})
        self.assertEqual(requests_total(node.metrics, "s3", "ListBuckets", "2xx"), 4.0)

    def test_signed_requests_go_to_s3(self) -> None:
        """
        A request carrying a signature (Authorization header or presigned
        query) goes to S3 even for C{/}, C{/ready} and C{/metrics}.
        """
        s3 = _FakeS3()
        check = _CountingCheck()
        node = _Node([("membership", check)], s3=s3)
        authorization = {b"Authorization": b"AWS4-HMAC-SHA256 Credential=AK/..."}
        targets = [
            (b"/", authorization),
            (b"/ready", authorization),
            (b"/metrics", authorization),
            (b"/?X-Amz-Signature=abc", None),
            (b"/?X-Amz-Credential=AK%2F20250101", None),
            (b"/ready?x-amz-signature=abc", None),
        ]
        for target, headers in targets:
            response = node.get(target, headers=headers)
            self.assertEqual(response.body, b"<ListAllMyBucketsResult/>", target)
        self.assertEqual(
            [postpath for _, _, postpath in s3.seen],
            [[b""], [b"ready"], [b"metrics"], [b""], [b""], [b"ready"]],
        )
        self.assertEqual(check.calls, 0)
        self.assertEqual(requests_total(node.metrics, "node", "Health", "2xx"), 0.0)

    def test_no_s3_not_found(self) -> None:
        """
        Without an S3 resource, other paths and signed requests answer 404
        C{not found}, counted as S3 requests of unknown operation.
        """
        node = _Node()
        for target, headers in [(b"/bucket/key", None), (b"/", {b"Authorization": b"x"})]:
            response = node.get(target, headers=headers)
            self.assertEqual((response.code, response.body), (404, b"not found"))
        self.assertEqual(requests_total(node.metrics, "s3", "Unknown", "4xx"), 2.0)


class StubTreqTests(SynchronousTestCase):
    """
    The root resource also works under a plain L{twisted.web.server.Site},
    driven through L{StubTreq}.
    """

    def test_health_and_ready(self) -> None:
        """
        Through StubTreq, C{/} is 200 and a hung C{/ready} check turns into
        a 503 once the simulated clock passes the timeout.
        """
        clock = Clock()
        metrics = Metrics()
        hung = _CountingCheck(None)
        root = RootResource(Readiness([("global database", hung)], 2.0, clock), metrics)
        client = StubTreq(root)

        response = self.successResultOf(client.get("http://node.example/"))
        self.assertEqual(response.code, 200)
        self.assertEqual(self.successResultOf(client.content(response)), b"OK")

        pending = client.get("http://node.example/ready")
        client.flush()
        self.assertNoResult(pending)
        clock.advance(2.0)
        client.flush()
        response = self.successResultOf(pending)
        self.assertEqual(response.code, 503)
        self.assertEqual(
            self.successResultOf(client.content(response)),
            b"not ready\nglobal database: timed out after 2.0s\n",
        )


class RealSocketTests(TestCase):
    """
    An L{AnvilSite} on a real TCP socket and the real reactor.
    """

    def setUp(self) -> None:
        metrics = Metrics()

        async def database() -> None:
            # A check that really goes through the reactor once.
            await deferLater(reactor, 0, lambda: None)

        readiness = Readiness(
            [("global database", database), ("membership", lambda: succeed(None))],
            2.0,
            reactor,
        )
        site = AnvilSite(RootResource(readiness, metrics), metrics, reactor)
        # The wrapper tracks open server-side connections, so cleanup can
        # wait for them to close and leave a clean reactor.
        self.wrapper = WrappingFactory(site)
        self.port = reactor.listenTCP(0, self.wrapper, interface="127.0.0.1")
        self.addCleanup(self._close)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.client = HTTPClient(Agent(reactor, pool=pool))
        self.base = f"http://127.0.0.1:{self.port.getHost().port}"

    async def _stop(self) -> None:
        """
        Stop listening and wait until every server connection has closed.
        """
        await self.port.stopListening()
        for _ in range(200):
            if not self.wrapper.protocols:
                return
            await deferLater(reactor, 0.01, lambda: None)
        raise AssertionError("server connections still open")

    def _close(self) -> Deferred[None]:
        """
        Cleanup: L{_stop} as a Deferred.
        """
        return Deferred.fromCoroutine(self._stop())

    async def _fetch(self, path: str) -> tuple[int, Headers, bytes]:
        """
        GET C{path} from the listening site; return code, headers, body.
        """
        response = await self.client.get(self.base + path)
        body = await response.content()
        return response.code, response.headers, body

    def test_endpoints(self) -> Deferred[None]:
        """
        C{/}, C{/ready} and C{/metrics} answer over a real socket with the
        expected statuses and headers, and the scrape counts the earlier
        requests.
        """

        async def run() -> None:
            code, headers, body = await self._fetch("/")
            self.assertEqual((code, body), (200, b"OK"))
            self.assertEqual(headers.getRawHeaders(b"server"), [b"Anvil"])
            first_id = headers.getRawHeaders(b"x-amz-request-id")[0]
            self.assertRegex(first_id.decode("ascii"), _REQUEST_ID)

            code, headers, body = await self._fetch("/ready")
            self.assertEqual((code, body), (200, b"ready"))
            self.assertNotEqual(headers.getRawHeaders(b"x-amz-request-id"), [first_id])

            code, headers, body = await self._fetch("/metrics")
            self.assertEqual(code, 200)
            self.assertEqual(
                headers.getRawHeaders(b"content-type"), [CONTENT_TYPE_LATEST.encode("ascii")]
            )
            self.assertIn(
                b'anvil_api_requests_total{api="node",operation="Health",status="2xx"} 1.0',
                body,
            )
            self.assertIn(b"anvil_node_ready 1.0", body)

            code, _, body = await self._fetch("/no/such/path")
            self.assertEqual((code, body), (404, b"not found"))

        return Deferred.fromCoroutine(run())
