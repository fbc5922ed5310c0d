# -*- test-case-name: tests.test_web_body -*-
"""
Tests for L{anvil.web.body} and the streaming request handling of
L{anvil.web.server} (L{AnvilChannel}, L{AnvilRequest}).

Most tests drive a real L{AnvilSite} (real Twisted HTTP parsing) over a
L{StringTransport} with a simulated clock; the test decides when bytes
arrive and when the handler reads. One test uploads 256 MiB over a real
socket and checks the process's memory.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock, LoopingCall, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from anvil.errors import AnvilError
from anvil.metrics import Metrics
from anvil.web.body import BodyIncomplete, MiB, RequestBody
from anvil.web.listener import track_channels
from anvil.web.server import AnvilChannel, AnvilRequest, AnvilSite
from tests.fakehttp import Response, parse_response

KiB = 1024

Handler = Callable[[AnvilRequest], Awaitable[None]]


class Client:
    """
    One client connection to an L{AnvilSite} over a L{StringTransport}.

    @ivar interim: The C{100 Continue} responses seen so far.
    """

    def __init__(self, site: AnvilSite, transport: StringTransport | None = None) -> None:
        address = IPv4Address("TCP", "192.0.2.7", 40000)
        self.transport = transport or StringTransport(peerAddress=address)
        self.protocol = site.buildProtocol(address)
        self.protocol.makeConnection(self.transport)
        self._methods: list[bytes] = []
        self._unparsed = b""
        self.interim = 0

    def request(
        self,
        method: bytes,
        target: bytes = b"/bucket/key",
        headers: dict[bytes, bytes] | None = None,
        body: bytes = b"",
        length: int | None = None,
    ) -> bytes:
        """
        The bytes of one request. C{Content-Length} is C{length} if given,
        else C{len(body)} when there is a body.
        """
        self._methods.append(method)
        lines = [b"%s %s HTTP/1.1" % (method, target), b"Host: node.example"]
        headers = dict(headers or {})
        if length is None and body and b"Transfer-Encoding" not in headers:
            length = len(body)
        if length is not None:
            headers[b"Content-Length"] = b"%d" % (length,)
        for name, value in headers.items():
            lines.append(name + b": " + value)
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

    def send(self, data: bytes) -> None:
        """
        Deliver bytes from the client to the server.
        """
        self.protocol.dataReceived(data)

    def responses(self) -> list[Response]:
        """
        The complete final responses written since the last call.
        """
        self._unparsed += self.transport.value()
        self.transport.clear()
        found = []
        while self._methods:
            parsed = parse_response(self._unparsed, self._methods[0] == b"HEAD")
            if parsed is None:
                break
            response, self._unparsed = parsed
            if response.code == 100:
                self.interim += 1
                continue
            self._methods.pop(0)
            found.append(response)
        return found

    def lose(self) -> None:
        """
        The client hangs up.
        """
        self.protocol.connectionLost(Failure(ConnectionDone()))


def respond(request: AnvilRequest, code: int, body: bytes) -> None:
    """
    Finish C{request} with a short body, unless its client is gone.
    """
    if request.channel is None:
        return
    request.setResponseCode(code)
    request.setHeader(b"Content-Length", b"%d" % (len(body),))
    request.write(body)
    request.finish()


class Recorder(Resource):
    """
    A leaf resource that records each request and runs an async handler for
    it, as the S3 layer will.

    @ivar requests: The requests rendered, in order.
    @ivar bytes_at_render: C{body.bytes_received} when each was rendered.
    @ivar failures: Failures of the handlers.
    """

    isLeaf = True

    def __init__(self, handler: Handler) -> None:
        super().__init__()
        self.handler = handler
        self.requests: list[AnvilRequest] = []
        self.bytes_at_render: list[int] = []
        self.failures: list[Failure] = []

    def render(self, request: Any) -> int:
        """
        Record the request and start its handler.
        """
        self.requests.append(request)
        self.bytes_at_render.append(request.body.bytes_received)
        d = Deferred.fromCoroutine(self.handler(request))
        d.addErrback(self.failures.append)
        return NOT_DONE_YET


async def read_all(body: RequestBody) -> list[bytes]:
    """
    Read C{body} to its end.

    @return: The pieces, in the order read.
    """
    pieces = []
    while True:
        piece = await body.read()
        if not piece:
            return pieces
        pieces.append(piece)


async def digest_handler(request: AnvilRequest) -> None:
    """
    Read the whole body and answer C{"<length> <sha256 hex>"}.
    """
    data = b"".join(await read_all(request.body))
    respond(request, 200, b"%d %s" % (len(data), hashlib.sha256(data).hexdigest().encode()))


async def reject_handler(request: AnvilRequest) -> None:
    """
    Answer 403 at once without reading the body (an early S3 error).
    """
    respond(request, 403, b"denied")


async def hold_handler(request: AnvilRequest) -> None:
    """
    Do nothing: the test reads the body and answers itself.
    """


def make_site(handler: Handler) -> tuple[AnvilSite, Recorder, Clock]:
    """
    An L{AnvilSite} whose only resource runs C{handler}, on a simulated
    clock.
    """
    clock = Clock()
    recorder = Recorder(handler)
    return AnvilSite(recorder, Metrics(), clock), recorder, clock


def read_now(testcase: SynchronousTestCase, body: RequestBody) -> bytes:
    """
    Read one piece that must already be available.
    """
    return testcase.successResultOf(Deferred.fromCoroutine(body.read()))


def pattern(size: int, seed: int = 0) -> bytes:
    """
    Deterministic bytes in which every position differs from its
    neighbours' (so reordering shows).
    """
    block = hashlib.sha256(b"%d" % (seed,)).digest()
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(block + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


class DispatchTests(SynchronousTestCase):
    """
    Requests are handled when their headers are complete.
    """

    def test_render_before_body(self) -> None:
        """
        The resource is rendered once the headers are in, before any body
        byte has arrived; C{request.content} is empty and C{request.body}
        announces the length.
        """
        site, recorder, _ = make_site(hold_handler)
        client = Client(site)
        client.send(client.request(b"PUT", length=10))
        [request] = recorder.requests
        self.assertEqual(recorder.bytes_at_render, [0])
        self.assertEqual(request.method, b"PUT")
        self.assertEqual(request.path, b"/bucket/key")
        self.assertEqual(request.body.content_length, 10)
        self.assertEqual(request.content.read(), b"")
        self.assertFalse(request.body.ended)

    def test_pieces_in_order(self) -> None:
        """
        Body pieces are read in the order they arrived; the end is C{b""}.
        """
        site, recorder, _ = make_site(hold_handler)
        client = Client(site)
        client.send(client.request(b"PUT", length=9) + b"abc")
        [request] = recorder.requests
        reading = Deferred.fromCoroutine(request.body.read())
        self.assertEqual(self.successResultOf(reading), b"abc")
        # A read that waits gets the next piece as soon as it arrives.
        reading = Deferred.fromCoroutine(request.body.read())
        self.assertNoResult(reading)
        client.send(b"def")
        self.assertEqual(self.successResultOf(reading), b"def")
        client.send(b"ghi")
        self.assertEqual(read_now(self, request.body), b"ghi")
        self.assertEqual(read_now(self, request.body), b"")
        self.assertEqual(read_now(self, request.body), b"")
        self.assertEqual(request.body.bytes_received, 9)

    def test_content_length_body(self) -> None:
        """
        A body sent in many pieces with C{Content-Length} is received whole
        by a handler reading as it arrives.
        """
        site, recorder, _ = make_site(digest_handler)
        client = Client(site)
        data = pattern(300 * KiB)
        client.send(client.request(b"PUT", length=len(data)))
        for start in range(0, len(data), 7000):
            client.send(data[start : start + 7000])
        [response] = client.responses()
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.body, b"%d %s" % (len(data), hashlib.sha256(data).hexdigest().encode())
        )
        self.assertEqual(recorder.failures, [])

    def test_chunked_body(self) -> None:
        """
        A C{Transfer-Encoding: chunked} body has no announced length; its
        decoded pieces arrive in order and the end is reported after the
        last chunk.
        """
        site, recorder, _ = make_site(hold_handler)
        client = Client(site)
        client.send(client.request(b"PUT", headers={b"Transfer-Encoding": b"chunked"}))
        [request] = recorder.requests
        self.assertIsNone(request.body.content_length)
        client.send(b"5\r\nhello\r\n")
        self.assertEqual(read_now(self, request.body), b"hello")
        reading = Deferred.fromCoroutine(request.body.read())
        client.send(b"6\r\n world\r\n")
        self.assertEqual(self.successResultOf(reading), b" world")
        reading = Deferred.fromCoroutine(request.body.read())
        client.send(b"0\r\n\r\n")
        self.assertEqual(self.successResultOf(reading), b"")
        self.assertTrue(request.body.ended)
        self.assertEqual(request.body.bytes_received, 11)

    def test_chunked_body_digest(self) -> None:
        """
        A whole chunked upload is received intact and answered.
        """
        site, _, _ = make_site(digest_handler)
        client = Client(site)
        data = pattern(200 * KiB, seed=3)
        framed = b"".join(
            b"%x\r\n%s\r\n" % (len(data[i : i + 5000]), data[i : i + 5000])
            for i in range(0, len(data), 5000)
        )
        client.send(client.request(b"PUT", headers={b"Transfer-Encoding": b"chunked"}))
        client.send(framed + b"0\r\n\r\n")
        [response] = client.responses()
        self.assertEqual(response.body.split()[0], b"%d" % (len(data),))

    def test_get_without_body(self) -> None:
        """
        A GET without a body is rendered with a body that has already ended:
        C{read()} returns C{b""} at once.
        """

        async def handler(request: AnvilRequest) -> None:
            data = await request.body.read()
            respond(request, 200, b"%r %r" % (data, request.body.content_length))

        site, _, _ = make_site(handler)
        client = Client(site)
        client.send(client.request(b"GET"))
        [response] = client.responses()
        self.assertEqual(response.body, b"b'' 0")

    def test_head_without_body(self) -> None:
        """
        A HEAD request is answered with headers only, its body empty at
        once, and the connection goes on to the next request.
        """

        async def handler(request: AnvilRequest) -> None:
            self.assertEqual(await request.body.read(), b"")
            respond(request, 200, b"twelve bytes")

        site, recorder, _ = make_site(handler)
        client = Client(site)
        client.send(client.request(b"HEAD") + client.request(b"GET"))
        head, get = client.responses()
        self.assertEqual(head.header(b"content-length"), b"12")
        self.assertEqual(head.body, b"")
        self.assertEqual(get.body, b"twelve bytes")
        self.assertEqual(recorder.failures, [])

    def test_zero_content_length(self) -> None:
        """
        C{Content-Length: 0} is a body that has ended before rendering.
        """
        site, recorder, _ = make_site(digest_handler)
        client = Client(site)
        client.send(client.request(b"PUT", length=0))
        [response] = client.responses()
        self.assertEqual(response.body.split()[0], b"0")
        self.assertTrue(recorder.requests[0].body.ended)

    def test_amz_header_names_lower_case(self) -> None:
        """
        C{x-amz-*} response headers go out with lower-case names, as S3
        sends them (SDKs take user-metadata keys from them as sent); other
        names keep Twisted's capitalisation.
        """

        async def handler(request: AnvilRequest) -> None:
            request.setHeader(b"x-amz-meta-colour", b"Blue")
            request.setHeader(b"X-Amz-Meta-Mixed-Case", b"v")
            respond(request, 200, b"ok")

        site, _, _ = make_site(handler)
        client = Client(site)
        client.send(client.request(b"GET"))
        head = client.transport.value().split(b"\r\n\r\n")[0]
        self.assertIn(b"\r\nx-amz-meta-colour: Blue\r\n", head)
        self.assertIn(b"\r\nx-amz-meta-mixed-case: v\r\n", head)
        self.assertIn(b"\r\nx-amz-request-id: ", head)
        self.assertIn(b"\r\nx-amz-id-2: ", head)
        self.assertIn(b"\r\nContent-Length: 2\r\n", head)

    def test_handler_crash_before_body(self) -> None:
        """
        A resource that raises while the body is still arriving gets
        Twisted's 500 page, and the connection still serves the next
        request once the (short) body has been drained.
        """
        calls = []

        class Crashing(Resource):
            isLeaf = True

            def render(self, request: Any) -> bytes:
                calls.append(request.method)
                if request.method == b"PUT":
                    raise RuntimeError("handler bug")
                return b"fine"

        site = AnvilSite(Crashing(), Metrics(), Clock())
        client = Client(site)
        client.send(client.request(b"PUT", length=100) + b"x" * 40)
        [response] = client.responses()
        self.assertEqual(response.code, 500)
        self.assertIsNone(response.header(b"connection"))
        client.send(b"x" * 60 + client.request(b"GET"))
        [response] = client.responses()
        self.assertEqual(response.body, b"fine")
        self.assertEqual(calls, [b"PUT", b"GET"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class MalformedRequestTests(SynchronousTestCase):
    """
    Requests the HTTP parser refuses get an answer S3 clients understand.
    """

    def test_header_section_too_large(self) -> None:
        """
        A header section larger than the channel allows is refused with the
        S3 error document C{RequestHeaderSectionTooLarge} (400), a request
        id, and the connection closed; the resource is never rendered.
        """
        site, recorder, _ = make_site(hold_handler)
        client = Client(site)
        client.send(
            client.request(b"GET", headers={b"x-amz-meta-big": b"v" * (AnvilChannel.totalHeadersSize + 1)})
        )
        [response] = client.responses()
        self.assertEqual(response.code, 400)
        self.assertIn(b"<Code>RequestHeaderSectionTooLarge</Code>", response.body)
        self.assertTrue(response.header(b"x-amz-request-id"))
        self.assertTrue(client.transport.disconnecting)
        self.assertEqual(recorder.requests, [])

    def test_too_many_headers(self) -> None:
        """
        More headers than the channel allows is refused the same way.
        """
        site, recorder, _ = make_site(hold_handler)
        client = Client(site)
        headers = {b"x-h-%d" % i: b"1" for i in range(AnvilChannel.maxHeaders + 1)}
        client.send(client.request(b"GET", headers=headers))
        [response] = client.responses()
        self.assertIn(b"<Code>RequestHeaderSectionTooLarge</Code>", response.body)
        self.assertEqual(recorder.requests, [])

    def test_garbage_request_line(self) -> None:
        """
        Other malformed requests keep Twisted's bare 400 and close.
        """
        site, recorder, _ = make_site(hold_handler)
        client = Client(site)
        client.send(b"NOT-HTTP\r\n\r\n")
        self.assertTrue(client.transport.value().startswith(b"HTTP/1.1 400 Bad Request"))
        self.assertTrue(client.transport.disconnecting)
        self.assertEqual(recorder.requests, [])


class FlowControlTests(SynchronousTestCase):
    """
    Unread body bytes are bounded: reading from the connection pauses.
    """

    def _start(self, length: int) -> tuple[Client, AnvilRequest]:
        site, recorder, _ = make_site(hold_handler)
        client = Client(site)
        client.send(client.request(b"PUT", length=length))
        return client, recorder.requests[0]

    def _fill(self, client: Client, data: bytes, sent: int, piece: int) -> int:
        """
        Send pieces while the server keeps reading, as a network connection
        delivers data only while not paused.

        @return: How far into C{data} was sent.
        """
        while sent < len(data) and client.transport.producerState == "producing":
            client.send(data[sent : sent + piece])
            sent += piece
        return sent

    def test_memory_bound_64_mib(self) -> None:
        """
        Feeding 64 MiB to a handler that does not read pauses the transport
        after about 4 MiB; reading it below 1 MiB resumes it; reading and
        feeding alternately delivers all 64 MiB intact while never more than
        4 MiB plus one piece is buffered.
        """
        piece = 64 * KiB
        block = os.urandom(piece)
        total = 64 * MiB
        # Every piece differs (a counter), so order and completeness show.
        data = b"".join(
            i.to_bytes(8, "big") + block[8:] for i in range(total // piece)
        )
        client, request = self._start(total)
        body = request.body
        sent = self._fill(client, data, 0, piece)
        self.assertEqual(client.transport.producerState, "paused")
        self.assertGreater(body.buffered, RequestBody.high_water)
        self.assertLessEqual(body.buffered, RequestBody.high_water + piece)
        self.assertEqual(sent, body.bytes_received)
        self.assertLess(sent, total)

        received = hashlib.sha256()
        most = body.buffered
        while sent < total or body.buffered:
            if client.transport.producerState == "paused":
                received.update(read_now(self, body))
                if client.transport.producerState == "producing":
                    # Resumed only once the unread part is below 1 MiB.
                    self.assertLess(body.buffered, RequestBody.low_water)
            else:
                sent = self._fill(client, data, sent, piece)
                most = max(most, body.buffered)
                if sent >= total:
                    while body.buffered:
                        received.update(read_now(self, body))
        self.assertLessEqual(most, RequestBody.high_water + piece)
        self.assertEqual(read_now(self, body), b"")
        self.assertEqual(received.hexdigest(), hashlib.sha256(data).hexdigest())

    def test_channel_resume_does_not_unpause_body(self) -> None:
        """
        Twisted's own pause/resume (send buffer full, then drained) does not
        resume reading a body whose buffer is over the high-water mark.
        """
        client, request = self._start(16 * MiB)
        self._fill(client, b"z" * (16 * MiB), 0, 64 * KiB)
        self.assertEqual(client.transport.producerState, "paused")
        client.protocol.pauseProducing()
        client.protocol.resumeProducing()
        self.assertEqual(client.transport.producerState, "paused")
        while client.transport.producerState == "paused":
            read_now(self, request.body)
        self.assertLess(request.body.buffered, RequestBody.low_water)

    def test_body_resume_does_not_override_channel(self) -> None:
        """
        While Twisted has reading paused (send buffer full), a body read
        down below the low-water mark does not resume reading; Twisted's
        resume then does.
        """
        client, request = self._start(16 * MiB)
        self._fill(client, b"z" * (16 * MiB), 0, 64 * KiB)
        client.protocol.pauseProducing()
        while request.body.buffered >= RequestBody.low_water:
            read_now(self, request.body)
        self.assertEqual(client.transport.producerState, "paused")
        client.protocol.resumeProducing()
        self.assertEqual(client.transport.producerState, "producing")

    def test_no_idle_timeout_while_handler_behind(self) -> None:
        """
        A connection paused because the handler has not read the body is
        not timed out as idle, however long that takes; once reading
        resumes, a client that stops sending is timed out again.
        """
        site, recorder, clock = make_site(hold_handler)
        client = Client(site)
        client.send(client.request(b"PUT", length=16 * MiB))
        body = recorder.requests[0].body
        piece = b"q" * (64 * KiB)
        while client.transport.producerState == "producing":
            client.send(piece)
        clock.advance(site.timeOut * 5)
        self.assertFalse(client.transport.disconnecting)
        while client.transport.producerState == "paused":
            read_now(self, body)
        clock.advance(site.timeOut + 1)
        self.assertTrue(client.transport.disconnecting)

    def test_small_pieces_joined(self) -> None:
        """
        Small pieces are returned joined (up to 256 KiB); pieces of 64 KiB
        or more are returned as they are, without copying.
        """
        body = RequestBody(None)
        small = [b"%05d" % (i,) * 200 for i in range(300)]
        for data in small:
            body.data_received(data)
        big = b"B" * (64 * KiB)
        body.data_received(big)
        joined = read_now(self, body)
        self.assertEqual(len(joined), 256 * KiB // 1000 * 1000)
        rest = read_now(self, body)
        self.assertEqual(joined + rest, b"".join(small))
        self.assertIs(read_now(self, body), big)

    def test_reading_not_paused_for_early_data_under_limit(self) -> None:
        """
        Up to the high-water mark, data is buffered without pausing.
        """
        client, request = self._start(4 * MiB)
        client.send(b"a" * (4 * MiB))
        self.assertEqual(client.transport.producerState, "producing")
        self.assertTrue(request.body.ended)


class BodyEndTests(SynchronousTestCase):
    """
    Bodies that end early, are discarded, or are read wrongly.
    """

    def test_disconnect_mid_body(self) -> None:
        """
        A client that hangs up part-way makes the waiting read and every
        later read raise L{BodyIncomplete}; by then the request is already
        marked disconnected.
        """
        seen: list[object] = []

        async def handler(request: AnvilRequest) -> None:
            try:
                await read_all(request.body)
            except BodyIncomplete as e:
                seen.append((e.received, e.expected, request.channel is None))
                raise

        site, recorder, _ = make_site(handler)
        client = Client(site)
        client.send(client.request(b"PUT", length=1000) + b"x" * 300)
        self.assertEqual(seen, [])
        client.lose()
        self.assertEqual(seen, [(300, 1000, True)])
        [failure] = recorder.failures
        self.assertIsInstance(failure.value, AnvilError)
        self.assertIn("300 of 1000", str(failure.value))
        reading = Deferred.fromCoroutine(recorder.requests[0].body.read())
        self.failureResultOf(reading, BodyIncomplete)

    def test_disconnect_with_buffered_data(self) -> None:
        """
        Buffered but unread bytes of an incomplete body are dropped on
        disconnect; the next read fails instead of returning them.
        """
        site, recorder, _ = make_site(hold_handler)
        client = Client(site)
        client.send(client.request(b"PUT", length=1000) + b"x" * 300)
        client.lose()
        body = recorder.requests[0].body
        self.assertEqual(body.buffered, 0)
        self.failureResultOf(Deferred.fromCoroutine(body.read()), BodyIncomplete)

    def test_chunked_disconnect(self) -> None:
        """
        A chunked body cut before its last chunk is incomplete.
        """
        site, recorder, _ = make_site(digest_handler)
        client = Client(site)
        client.send(client.request(b"PUT", headers={b"Transfer-Encoding": b"chunked"}))
        client.send(b"3\r\nabc\r\n")
        client.lose()
        [failure] = recorder.failures
        failure.trap(BodyIncomplete)
        self.assertIn("chunked", str(failure.value))

    def test_malformed_chunked(self) -> None:
        """
        Broken chunked framing gets Twisted's 400 and closes the connection;
        the handler's read then fails as incomplete.
        """
        site, recorder, _ = make_site(digest_handler)
        client = Client(site)
        client.send(client.request(b"PUT", headers={b"Transfer-Encoding": b"chunked"}))
        client.send(b"zz\r\nnot hex\r\n")
        self.assertTrue(client.transport.value().startswith(b"HTTP/1.1 400 Bad Request"))
        self.assertTrue(client.transport.disconnecting)
        client.lose()
        [failure] = recorder.failures
        failure.trap(BodyIncomplete)

    def test_complete_body_survives_disconnect(self) -> None:
        """
        A body that fully arrived stays readable after the client hangs up
        (the handler learns of the disconnect from C{notifyFinish}).
        """
        site, recorder, _ = make_site(hold_handler)
        client = Client(site)
        client.send(client.request(b"PUT", body=b"complete"))
        request = recorder.requests[0]
        finished = request.notifyFinish()
        client.lose()
        self.failureResultOf(finished, ConnectionDone)
        self.assertEqual(read_now(self, request.body), b"complete")
        self.assertEqual(read_now(self, request.body), b"")

    def test_discard(self) -> None:
        """
        C{discard()} drops what is buffered, resumes reading, drops what
        arrives later, and makes reads fail.
        """
        site, recorder, _ = make_site(hold_handler)
        client = Client(site)
        client.send(client.request(b"PUT", length=32 * MiB))
        body = recorder.requests[0].body
        while client.transport.producerState == "producing":
            client.send(b"d" * (64 * KiB))
        body.discard()
        self.assertEqual(client.transport.producerState, "producing")
        self.assertEqual(body.buffered, 0)
        client.send(b"d" * MiB)
        self.assertEqual(body.buffered, 0)
        self.failureResultOf(Deferred.fromCoroutine(body.read()), BodyIncomplete)

    def test_discard_fails_waiting_read(self) -> None:
        """
        A read waiting when the body is discarded fails.
        """
        body = RequestBody(10)
        reading = Deferred.fromCoroutine(body.read())
        body.discard()
        self.failureResultOf(reading, BodyIncomplete)

    def test_one_reader(self) -> None:
        """
        A second read while one is waiting is a programming error.
        """
        body = RequestBody(10)
        first = Deferred.fromCoroutine(body.read())
        self.failureResultOf(Deferred.fromCoroutine(body.read()), RuntimeError)
        body.data_received(b"0123456789")
        self.assertEqual(self.successResultOf(first), b"0123456789")

    def test_cancelled_read(self) -> None:
        """
        Cancelling a waiting read (the handler's work was cancelled) leaves
        the body usable: data arriving later is buffered for the next read.
        """
        body = RequestBody(10)
        reading = Deferred.fromCoroutine(body.read())
        reading.cancel()
        self.failureResultOf(reading, CancelledError)
        body.data_received(b"abc")
        self.assertEqual(read_now(self, body), b"abc")


class ContinueTests(SynchronousTestCase):
    """
    C{Expect: 100-continue} is answered when the handler reads the body.
    """

    def test_continue_on_first_read(self) -> None:
        """
        No C{100 Continue} is sent before the handler reads; the first read
        sends it, once.
        """
        site, recorder, _ = make_site(hold_handler)
        client = Client(site)
        client.send(client.request(b"PUT", headers={b"Expect": b"100-continue"}, length=5))
        self.assertEqual(client.transport.value(), b"")
        body = recorder.requests[0].body
        self.assertTrue(body.continue_pending)
        reading = Deferred.fromCoroutine(body.read())
        self.assertEqual(client.transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        client.transport.clear()
        client.send(b"hello")
        self.assertEqual(self.successResultOf(reading), b"hello")
        self.assertEqual(read_now(self, body), b"")
        self.assertEqual(client.transport.value(), b"")

    def test_continue_full_exchange(self) -> None:
        """
        A client that waits for C{100 Continue} and then sends its body gets
        the interim and the final response, and the connection is reused.
        """
        site, _, _ = make_site(digest_handler)
        client = Client(site)
        client.send(client.request(b"PUT", headers={b"Expect": b"100-continue"}, length=4))
        self.assertEqual(client.responses(), [])
        self.assertEqual(client.interim, 1)
        client.send(b"data")
        [response] = client.responses()
        self.assertEqual(response.body.split()[0], b"4")
        self.assertIsNone(response.header(b"connection"))
        client.send(client.request(b"PUT", body=b"again"))
        [response] = client.responses()
        self.assertEqual(response.body.split()[0], b"5")

    def test_continue_for_empty_body(self) -> None:
        """
        A zero-length request that asks for C{100 Continue} gets it before
        its final response, as S3 answers (botocore, uploading an empty file,
        mishandles the next request on the connection otherwise), and the
        connection is reused.
        """
        site, _, _ = make_site(digest_handler)
        client = Client(site)
        client.send(client.request(b"PUT", headers={b"Expect": b"100-continue"}, length=0))
        [response] = client.responses()
        self.assertEqual(client.interim, 1)
        self.assertEqual(response.body.split()[0], b"0")
        # The interim came first: nothing is left over after the final one.
        self.assertEqual(client._unparsed, b"")
        client.send(client.request(b"PUT", body=b"again"))
        [response] = client.responses()
        self.assertEqual(response.body.split()[0], b"5")

    def test_no_idle_timeout_while_client_waits(self) -> None:
        """
        A client waiting for C{100 Continue} is not timed out as idle while
        the handler takes its time; once the handler has read and the
        client goes quiet, it is.
        """
        site, recorder, clock = make_site(hold_handler)
        client = Client(site)
        client.send(client.request(b"PUT", headers={b"Expect": b"100-continue"}, length=5))
        clock.advance(site.timeOut * 3)
        self.assertFalse(client.transport.disconnecting)
        Deferred.fromCoroutine(recorder.requests[0].body.read())
        clock.advance(site.timeOut + 1)
        self.assertTrue(client.transport.disconnecting)

    def test_no_continue_once_body_arrives(self) -> None:
        """
        A client that stopped waiting and sent its body is not sent a late
        C{100 Continue}.
        """
        site, recorder, _ = make_site(hold_handler)
        client = Client(site)
        client.send(client.request(b"PUT", headers={b"Expect": b"100-continue"}, length=5))
        client.send(b"early")
        self.assertEqual(read_now(self, recorder.requests[0].body), b"early")
        self.assertEqual(client.transport.value(), b"")

    def test_rejected_without_continue(self) -> None:
        """
        A request rejected without reading its body is never sent
        C{100 Continue}; the response says C{Connection: close} (the client
        may or may not send the body now) and the connection closes after
        the linger time.
        """
        site, _, clock = make_site(reject_handler)
        client = Client(site)
        client.send(client.request(b"PUT", headers={b"Expect": b"100-continue"}, length=5))
        [response] = client.responses()
        self.assertEqual(client.interim, 0)
        self.assertEqual(response.code, 403)
        self.assertEqual(response.header(b"connection"), b"close")
        self.assertFalse(client.transport.disconnecting)
        clock.advance(AnvilChannel.linger_timeout)
        self.assertTrue(client.transport.disconnecting)


class EarlyResponseTests(SynchronousTestCase):
    """
    Responses finished before their request body was read.
    """

    def test_short_rest_drained(self) -> None:
        """
        When the unread rest is short, the connection is kept: the rest is
        drained and discarded, and only then is the next request handled.
        """
        site, recorder, _ = make_site(reject_handler)
        client = Client(site)
        client.send(client.request(b"PUT", length=1000) + b"a" * 100)
        [response] = client.responses()
        self.assertEqual(response.code, 403)
        self.assertIsNone(response.header(b"connection"))
        # The rest of the body, then a request whose first line looks like
        # body bytes would if they were parsed as a request.
        client.send(b"GET /x HTTP/1.1\r\n\r\n".ljust(900, b"b"))
        self.assertEqual(client.responses(), [])
        self.assertEqual(len(recorder.requests), 1)
        client.send(client.request(b"PUT", target=b"/second", body=b"second"))
        [response] = client.responses()
        self.assertEqual(response.code, 403)
        self.assertEqual([r.path for r in recorder.requests], [b"/bucket/key", b"/second"])
        self.assertFalse(client.transport.disconnecting)

    def test_drained_rest_not_buffered(self) -> None:
        """
        Bytes drained after an early response are not kept.
        """
        site, recorder, _ = make_site(reject_handler)
        client = Client(site)
        client.send(client.request(b"PUT", length=MiB))
        client.send(b"c" * (MiB - 1))
        body = recorder.requests[0].body
        self.assertEqual((body.buffered, body.bytes_received), (0, MiB - 1))

    def test_long_rest_closes(self) -> None:
        """
        When the unread rest is long, the response says C{Connection:
        close}; the connection then reads and drops at most the drain limit
        more before closing, and never parses body bytes as a request.
        """
        site, recorder, _ = make_site(reject_handler)
        client = Client(site)
        client.send(client.request(b"PUT", length=100 * MiB))
        [response] = client.responses()
        self.assertEqual(response.header(b"connection"), b"close")
        self.assertFalse(client.transport.disconnecting)
        sent = 0
        request_like = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n".ljust(64 * KiB, b"\n")
        while not client.transport.disconnecting:
            client.send(request_like)
            sent += len(request_like)
            self.assertLess(sent, AnvilChannel.drain_limit + 128 * KiB)
        self.assertGreaterEqual(sent, AnvilChannel.drain_limit)
        self.assertEqual(recorder.bytes_at_render, [0])
        self.assertEqual(len(recorder.requests), 1)
        self.assertEqual(client.transport.value(), b"")
        self.assertEqual(recorder.requests[0].body.buffered, 0)

    def test_linger_ends_when_body_arrives(self) -> None:
        """
        After a C{Connection: close} early response, the connection closes
        as soon as the rest of the body has arrived.
        """
        site, _, _ = make_site(reject_handler)
        client = Client(site)
        client.send(client.request(b"PUT", headers={b"Transfer-Encoding": b"chunked"}))
        [response] = client.responses()
        self.assertEqual(response.header(b"connection"), b"close")
        client.send(b"4\r\nrest\r\n")
        self.assertFalse(client.transport.disconnecting)
        client.send(b"0\r\n\r\n")
        self.assertTrue(client.transport.disconnecting)

    def test_linger_times_out(self) -> None:
        """
        A client that neither finishes its body nor closes is disconnected
        after the linger time.
        """
        site, _, clock = make_site(reject_handler)
        client = Client(site)
        client.send(client.request(b"PUT", length=100 * MiB) + b"x" * 1000)
        client.responses()
        clock.advance(AnvilChannel.linger_timeout - 0.1)
        self.assertFalse(client.transport.disconnecting)
        clock.advance(0.1)
        self.assertTrue(client.transport.disconnecting)

    def test_client_closes_during_linger(self) -> None:
        """
        A client that closes during the linger leaves no timer behind.
        """
        site, _, clock = make_site(reject_handler)
        client = Client(site)
        client.send(client.request(b"PUT", length=100 * MiB))
        client.responses()
        client.lose()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_early_response_in_body_callback(self) -> None:
        """
        A handler that answers from within a read (it saw enough of the
        body) before the body's end is drained correctly, and the
        pipelined request after the body is handled next.
        """

        async def handler(request: AnvilRequest) -> None:
            first = await request.body.read()
            respond(request, 400, b"first piece was %d bytes" % (len(first),))

        site, recorder, _ = make_site(handler)
        client = Client(site)
        client.send(client.request(b"PUT", length=10))
        client.send(b"01234")
        client.send(b"56789" + client.request(b"PUT", target=b"/next", body=b"n"))
        first, second = client.responses()
        self.assertEqual(first.body, b"first piece was 5 bytes")
        self.assertEqual(second.body, b"first piece was 1 bytes")
        self.assertEqual([r.path for r in recorder.requests], [b"/bucket/key", b"/next"])


class KeepAliveTests(SynchronousTestCase):
    """
    Several requests on one connection.
    """

    def test_two_bodies_pipelined(self) -> None:
        """
        Two requests with bodies sent back to back are handled one after
        the other, each with its own body, in order.
        """
        site, recorder, _ = make_site(digest_handler)
        client = Client(site)
        first, second = pattern(150 * KiB, 1), pattern(90 * KiB, 2)
        client.send(
            client.request(b"PUT", target=b"/one", body=first)
            + client.request(b"PUT", target=b"/two", body=second)
        )
        one, two = client.responses()
        self.assertEqual(one.body, b"%d %s" % (len(first), hashlib.sha256(first).hexdigest().encode()))
        self.assertEqual(two.body, b"%d %s" % (len(second), hashlib.sha256(second).hexdigest().encode()))
        self.assertEqual([r.path for r in recorder.requests], [b"/one", b"/two"])

    def test_next_waits_for_response(self) -> None:
        """
        A pipelined request is not rendered until the previous response is
        finished, even when the previous body is complete.
        """
        site, recorder, _ = make_site(hold_handler)
        client = Client(site)
        client.send(
            client.request(b"PUT", target=b"/one", body=b"first body")
            + client.request(b"PUT", target=b"/two", body=b"second body")
        )
        [one] = recorder.requests
        self.assertEqual(read_now(self, one.body), b"first body")
        respond(one, 200, b"1")
        self.assertEqual(len(recorder.requests), 2)
        two = recorder.requests[1]
        self.assertEqual(read_now(self, two.body), b"second body")
        self.assertEqual(read_now(self, two.body), b"")
        respond(two, 200, b"2")
        self.assertEqual([r.body for r in client.responses()], [b"1", b"2"])

    def test_unread_complete_body_dropped(self) -> None:
        """
        A response finished with its (complete) body unread moves straight
        on to the next request and frees the buffered body.
        """
        site, recorder, _ = make_site(reject_handler)
        client = Client(site)
        client.send(
            client.request(b"PUT", body=b"x" * 5000) + client.request(b"GET", target=b"/next")
        )
        self.assertEqual([r.code for r in client.responses()], [403, 403])
        self.assertEqual(recorder.requests[0].body.buffered, 0)

    def test_many_requests(self) -> None:
        """
        Ten uploads on one connection, sent in odd-sized slices, are all
        answered correctly.
        """
        site, _, _ = make_site(digest_handler)
        client = Client(site)
        bodies = [pattern(1000 * i + 1, i) for i in range(10)]
        stream = b"".join(client.request(b"PUT", body=b) for b in bodies)
        for start in range(0, len(stream), 777):
            client.send(stream[start : start + 777])
        answers = [r.body for r in client.responses()]
        self.assertEqual(answers, [b"%d %s" % (len(b), hashlib.sha256(b).hexdigest().encode()) for b in bodies])


def _vm_rss() -> int:
    """
    This process's resident set size, in bytes.
    """
    with open("/proc/self/status", "rb") as status:
        for line in status:
            if line.startswith(b"VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class RssSampler:
    """
    Samples this process's RSS every few milliseconds on the reactor.

    @ivar peak: The highest RSS seen since L{start}.
    """

    def __init__(self) -> None:
        self.base = _vm_rss()
        self.peak = self.base
        self._loop = LoopingCall(self._sample)

    def _sample(self) -> None:
        self.peak = max(self.peak, _vm_rss())

    def start(self) -> None:
        """
        Start sampling.
        """
        self._loop.start(0.01)

    def stop(self) -> int:
        """
        Stop sampling.

        @return: How far the RSS grew above where it was at creation.
        """
        self._sample()
        self._loop.stop()
        return self.peak - self.base


def serve(testcase: TestCase, site: AnvilSite) -> int:
    """
    Listen with C{site} on 127.0.0.1 with the real reactor until the test
    ends; cleanup waits until every server connection has closed.

    @return: The port number.
    """
    channels = track_channels(site)
    port = reactor.listenTCP(0, site, interface="127.0.0.1")

    async def stop() -> None:
        await port.stopListening()
        for _ in range(500):
            if not channels:
                return
            await deferLater(reactor, 0.01, lambda: None)
        raise AssertionError("server connections still open")

    testcase.addCleanup(lambda: Deferred.fromCoroutine(stop()))
    return port.getHost().port


def read_response(sock: socket.socket) -> bytes:
    """
    Read a whole response with a C{Content-Length} from a blocking socket.
    """
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        if not more:
            raise AssertionError(f"connection closed after {data!r}")
        data += more
    head, rest = data.split(b"\r\n\r\n", 1)
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(rest) < length:
        more = sock.recv(65536)
        if not more:
            raise AssertionError("connection closed in the body")
        rest += more
    return head + b"\r\n\r\n" + rest


class RealSocketUploadTests(TestCase):
    """
    A large upload over a real socket with the real reactor.
    """

    timeout = 300

    def test_256_mib_upload_bounded_memory(self) -> Deferred[None]:
        """
        A client uploading 256 MiB faster than a slow handler reads it is
        slowed down: the process grows by less than 64 MiB, the unread
        buffer never exceeds the high-water mark by more than one read, and
        every byte arrives (same SHA-256).
        """
        total = 256 * MiB
        piece = MiB
        block = os.urandom(piece)
        buffered_peak = [0]

        async def slow_digest(request: AnvilRequest) -> None:
            body = request.body
            digest = hashlib.sha256()
            size = 0
            reads = 0
            while True:
                buffered_peak[0] = max(buffered_peak[0], body.buffered)
                data = await body.read()
                if not data:
                    break
                digest.update(data)
                size += len(data)
                reads += 1
                if reads % 16 == 0:
                    # A slow disk: the client must wait for it.
                    await deferLater(reactor, 0.01, lambda: None)
            respond(request, 200, b"%d %s" % (size, digest.hexdigest().encode()))

        site = AnvilSite(Recorder(slow_digest), Metrics(), reactor)
        port = serve(self, site)

        def upload() -> tuple[str, bytes]:
            digest = hashlib.sha256()
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(
                    b"PUT /bucket/big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                    b"Content-Length: %d\r\n\r\n" % (total,)
                )
                for i in range(total // piece):
                    data = i.to_bytes(8, "big") + block[8:]
                    digest.update(data)
                    sock.sendall(data)
                return digest.hexdigest(), read_response(sock)

        async def run() -> None:
            sampler = RssSampler()
            sampler.start()
            try:
                sent_digest, response = await threads.deferToThread(upload)
            finally:
                grew = sampler.stop()
            self.assertIn(b"200 OK", response.split(b"\r\n", 1)[0])
            self.assertTrue(
                response.endswith(b"%d %s" % (total, sent_digest.encode())), response[-100:]
            )
            self.assertLessEqual(buffered_peak[0], RequestBody.high_water + 64 * KiB)
            self.assertLess(grew, 64 * MiB, f"RSS grew by {grew / MiB:.1f} MiB")

        return Deferred.fromCoroutine(run())
