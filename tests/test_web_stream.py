# -*- test-case-name: tests.test_web_stream -*-
"""
Tests for L{anvil.web.stream.stream_response}.

The in-memory tests use a transport that pauses its producer when too much
is unread, as a TCP transport does when its send buffer fills, so a slow
client is simulated exactly; one test downloads 256 MiB over a real socket
to a slow reader and checks the process's memory.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from twisted.internet import reactor, threads
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anvil.errors import AnvilError
from anvil.metrics import Metrics
from anvil.web.body import MiB
from anvil.web.server import AnvilRequest, AnvilSite
from anvil.web.stream import ClientDisconnected, stream_response
from tests.test_metrics import requests_total
from tests.fakehttp import parse_response
from tests.test_web_body import (
    Client,
    KiB,
    Recorder,
    RssSampler,
    make_site,
    respond,
    serve,
)


class SlowTransport(StringTransport):
    """
    A transport whose client reads only when the test says so: once more
    than C{limit} bytes are unread it pauses its producer, and L{drain}
    (the client reading everything) resumes it, like a TCP transport with a
    full send buffer.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
        self.limit = limit
        self.full = False

    def write(self, data: bytes) -> None:
        super().write(data)
        self._check()

    def writeSequence(self, data: Any) -> None:
        super().writeSequence(data)
        self._check()

    def _check(self) -> None:
        if not self.full and self.producer is not None and len(self.value()) > self.limit:
            self.full = True
            self.producer.pauseProducing()

    def drain(self) -> bytes:
        """
        The client reads everything sent so far.

        @return: What it read.
        """
        data = self.value()
        self.clear()
        if self.full:
            self.full = False
            self.producer.resumeProducing()
        return data


class Source:
    """
    An async iterator of chunks that records how far it was pulled and
    whether it was closed.

    @ivar pulled: How many chunks were requested.
    @ivar closed: Whether its C{finally} ran (closed or cancelled).
    @ivar waiting: When C{wait} is set, the Deferred each step awaits
        (simulating a disk read), so the test decides when a chunk is ready.
    @ivar cancelled: How many of those waits were cancelled.
    @ivar iterator: The iterator to stream.
    """

    def __init__(self, chunks: list[bytes], wait: bool = False, fail_at: int | None = None) -> None:
        self.iterator = self.iterate()
        self.chunks = chunks
        self.wait = wait
        self.fail_at = fail_at
        self.pulled = 0
        self.closed = False
        self.waiting: Deferred[None] | None = None
        self.cancelled = 0

    async def iterate(self) -> AsyncIterator[bytes]:
        """
        Yield the chunks.
        """
        try:
            for index, chunk in enumerate(self.chunks):
                self.pulled += 1
                if self.wait:

                    def cancel(d: Deferred[None]) -> None:
                        self.cancelled += 1

                    self.waiting = Deferred(cancel)
                    await self.waiting
                if index == self.fail_at:
                    raise AnvilError("Two shards of this stripe are unreadable.")
                yield chunk
        finally:
            self.closed = True

    def ready(self) -> None:
        """
        Let the chunk being waited for be produced.
        """
        assert self.waiting is not None
        waiting, self.waiting = self.waiting, None
        waiting.callback(None)


def streaming_site(
    source: Callable[[], Source], length: bool = True
) -> tuple[AnvilSite, Recorder, list[Any]]:
    """
    A site whose handler streams a fresh L{Source} per request.

    @return: The site, its recorder, and a list collecting
        C{(source, outcome)} per request: C{None} when C{stream_response}
        returned, else the exception it raised.
    """
    outcomes: list[Any] = []

    async def handler(request: AnvilRequest) -> None:
        src = source()
        if length:
            request.setHeader(b"Content-Length", b"%d" % (sum(map(len, src.chunks)),))
        try:
            await stream_response(request, src.iterator)
        except BaseException as e:
            outcomes.append((src, e))
            raise
        outcomes.append((src, None))

    site, recorder, _ = make_site(handler)
    return site, recorder, outcomes


class StreamTests(SynchronousTestCase):
    """
    Tests for a response streamed to a client that keeps up.
    """

    def test_all_chunks_then_finish(self) -> None:
        """
        Every chunk is written in order, the request is finished and its
        producer unregistered, and the connection serves the next request.
        """
        chunks = [b"alpha ", b"", b"beta ", b"gamma"]
        site, recorder, outcomes = streaming_site(lambda: Source(chunks))
        client = Client(site)
        client.send(client.request(b"GET") + client.request(b"GET"))
        first, second = client.responses()
        self.assertEqual(first.body, b"alpha beta gamma")
        self.assertEqual(second.body, b"alpha beta gamma")
        self.assertEqual(first.header(b"content-length"), b"16")
        for request in recorder.requests:
            self.assertTrue(request.finished)
            self.assertIsNone(request.producer)
        self.assertEqual([outcome for _, outcome in outcomes], [None, None])
        self.assertTrue(all(src.closed for src, _ in outcomes))
        self.assertEqual(recorder.failures, [])

    def test_chunked_without_length(self) -> None:
        """
        Without a C{Content-Length} the body goes out chunk-encoded.
        """
        site, _, _ = streaming_site(lambda: Source([b"one", b"two"]), length=False)
        client = Client(site)
        client.send(client.request(b"GET"))
        [response] = client.responses()
        self.assertEqual(response.header(b"transfer-encoding"), b"chunked")
        self.assertEqual(response.body, b"onetwo")

    def test_head_not_pulled(self) -> None:
        """
        For HEAD the iterator is closed without being pulled, and the
        headers (with the length) are sent.
        """
        site, _, outcomes = streaming_site(lambda: Source([b"x" * 100]))
        client = Client(site)
        client.send(client.request(b"HEAD"))
        [response] = client.responses()
        self.assertEqual(response.header(b"content-length"), b"100")
        [(src, outcome)] = outcomes
        self.assertEqual((src.pulled, outcome), (0, None))
        # Closed before it ever started: it has no frame left to run.
        self.assertIsNone(src.iterator.ag_frame)


class BackpressureTests(SynchronousTestCase):
    """
    Tests for a slow client.
    """

    def test_slow_consumer_pauses_pulling(self) -> None:
        """
        While the client does not read, no more chunks are pulled than fit
        the send buffer plus one; each time it reads, streaming continues;
        the whole body arrives intact.
        """
        chunk_size = 64 * KiB
        limit = 256 * KiB
        chunks = [os.urandom(chunk_size) for _ in range(100)]
        sources: list[Source] = []

        def make() -> Source:
            sources.append(Source(chunks))
            return sources[-1]

        site, recorder, outcomes = streaming_site(make)
        transport = SlowTransport(limit)
        client = Client(site, transport)
        client.send(client.request(b"GET"))
        [src] = sources
        request = recorder.requests[0]
        received = b""
        rounds = 0
        while not request.finished:
            rounds += 1
            self.assertTrue(transport.full)
            pulled = src.pulled
            # What was pulled but not yet read by the client is bounded by
            # the send buffer limit plus the chunk that crossed it.
            self.assertLessEqual(
                pulled * chunk_size - len(received), limit + 2 * chunk_size
            )
            # Paused: nothing is pulled while the client does not read.
            self.assertEqual(src.pulled, pulled)
            received += transport.drain()
        received += transport.drain()
        self.assertGreaterEqual(rounds, 19)
        self.assertEqual(outcomes, [(src, None)])
        parsed = parse_response(received, head=False)
        assert parsed is not None
        response, rest = parsed
        self.assertEqual(response.body, b"".join(chunks))
        self.assertEqual(rest, b"")


class DisconnectTests(SynchronousTestCase):
    """
    Tests for clients that go away during the response.
    """

    def test_disconnect_while_paused(self) -> None:
        """
        A client that hangs up while streaming is paused stops the stream:
        the iterator is closed without being pulled again, the handler gets
        L{ClientDisconnected}, and the request counts as abandoned.
        """
        chunks = [b"c" * (64 * KiB)] * 50
        site, recorder, outcomes = streaming_site(lambda: Source(chunks))
        transport = SlowTransport(128 * KiB)
        client = Client(site, transport)
        client.send(client.request(b"GET"))
        self.assertEqual(outcomes, [])
        client.lose()
        [(src, outcome)] = outcomes
        self.assertIsInstance(outcome, ClientDisconnected)
        self.assertIsInstance(outcome, AnvilError)
        self.assertTrue(src.closed)
        self.assertLess(src.pulled, 5)
        [failure] = recorder.failures
        failure.trap(ClientDisconnected)
        self.assertEqual(requests_total(site.metrics, "s3", "Unknown", "4xx"), 1.0)

    def test_disconnect_while_producing(self) -> None:
        """
        A client that hangs up while the next chunk is being produced
        cancels that work (the awaited Deferred is cancelled inside the
        iterator) and closes the iterator.
        """
        holder: list[Source] = []

        def make() -> Source:
            holder.append(Source([b"first", b"second", b"third"], wait=True))
            return holder[-1]

        site, _, outcomes = streaming_site(make)
        client = Client(site)
        client.send(client.request(b"GET"))
        [src] = holder
        src.ready()
        self.assertEqual(src.pulled, 2)
        client.lose()
        [(_, outcome)] = outcomes
        self.assertIsInstance(outcome, ClientDisconnected)
        self.assertEqual(src.cancelled, 1)
        self.assertTrue(src.closed)
        self.assertEqual(src.pulled, 2)

    def test_already_disconnected(self) -> None:
        """
        Streaming to a request whose client is already gone raises at once
        and closes the iterator unread.
        """
        site, recorder, _ = make_site(lambda request: _noop())
        client = Client(site)
        client.send(client.request(b"GET"))
        client.lose()
        src = Source([b"never"])
        streaming = Deferred.fromCoroutine(stream_response(recorder.requests[0], src.iterator))
        self.failureResultOf(streaming, ClientDisconnected)
        self.assertEqual(src.pulled, 0)
        self.assertIsNone(src.iterator.ag_frame)

    def test_cancelled(self) -> None:
        """
        Cancelling the stream (the caller's work is cancelled) cancels the
        chunk being produced and closes the iterator.
        """
        site, recorder, _ = make_site(lambda request: _noop())
        client = Client(site)
        client.send(client.request(b"GET"))
        src = Source([b"a", b"b"], wait=True)
        streaming = Deferred.fromCoroutine(stream_response(recorder.requests[0], src.iterator))
        streaming.cancel()
        self.failureResultOf(streaming, CancelledError)
        self.assertEqual(src.cancelled, 1)
        self.assertTrue(src.closed)
        self.assertIsNone(recorder.requests[0].producer)


async def _noop() -> None:
    """
    A handler that does nothing itself.
    """


class FailureTests(SynchronousTestCase):
    """
    Tests for iterators that fail.
    """

    def test_fails_before_first_chunk(self) -> None:
        """
        An iterator that fails before its first chunk leaves the request
        untouched, so the caller can still answer with an error.
        """

        async def handler(request: AnvilRequest) -> None:
            src = Source([b"never sent"], fail_at=0)
            try:
                await stream_response(request, src.iterator)
            except AnvilError as e:
                self.assertTrue(src.closed)
                respond(request, 503, str(e).encode())

        site, _, _ = make_site(handler)
        client = Client(site)
        client.send(client.request(b"GET"))
        [response] = client.responses()
        self.assertEqual(response.code, 503)
        self.assertEqual(response.body, b"Two shards of this stripe are unreadable.")

    def test_fails_mid_stream(self) -> None:
        """
        An iterator that fails after part of the body was sent aborts the
        connection (the client sees a short body), the exception reaches
        the caller, and the request counts as a server error.
        """
        site, _, outcomes = streaming_site(lambda: Source([b"part one", b"two"], fail_at=1))
        client = Client(site)
        client.send(client.request(b"GET"))
        [(src, outcome)] = outcomes
        self.assertIsInstance(outcome, AnvilError)
        # StringTransport marks an abort (not a clean close) this way.
        self.assertTrue(client.transport.disconnected)
        self.assertTrue(client.transport.value().endswith(b"\r\n\r\npart one"))
        client.lose()
        self.assertEqual(requests_total(site.metrics, "s3", "Unknown", "5xx"), 1.0)
        self.assertTrue(src.closed)


class RealSocketDownloadTests(TestCase):
    """
    A large download over a real socket to a slow client.
    """

    timeout = 300

    def test_256_mib_download_bounded_memory(self) -> Deferred[None]:
        """
        Streaming 256 MiB to a client that reads slowly keeps the process
        within 64 MiB of growth, never produces more than the socket
        buffers hold ahead of the client, and delivers every byte.
        """
        total = 256 * MiB
        piece = MiB
        block = os.urandom(piece)
        produced = [0]
        consumed = [0]
        ahead = [0]

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(total // piece):
                ahead[0] = max(ahead[0], produced[0] - consumed[0])
                produced[0] += piece
                yield i.to_bytes(8, "big") + block[8:]

        async def handler(request: AnvilRequest) -> None:
            request.setHeader(b"Content-Length", b"%d" % (total,))
            await stream_response(request, chunks())

        site = AnvilSite(Recorder(handler), Metrics(), reactor)
        port = serve(self, site)

        def download() -> tuple[int, str]:
            digest = hashlib.sha256()
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
                sock.sendall(b"GET /bucket/big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                data = b""
                while b"\r\n\r\n" not in data:
                    data += sock.recv(65536)
                head, data = data.split(b"\r\n\r\n", 1)
                assert b" 200 " in head.split(b"\r\n")[0], head
                size = len(data)
                digest.update(data)
                reads = 0
                while True:
                    data = sock.recv(65536)
                    if not data:
                        break
                    digest.update(data)
                    size += len(data)
                    consumed[0] = size
                    reads += 1
                    if reads % 16 == 0:
                        # A slow client.
                        time.sleep(0.005)
                return size, digest.hexdigest()

        expected = hashlib.sha256()
        for i in range(total // piece):
            expected.update(i.to_bytes(8, "big") + block[8:])

        async def run() -> None:
            sampler = RssSampler()
            sampler.start()
            try:
                size, digest = await threads.deferToThread(download)
            finally:
                grew = sampler.stop()
            self.assertEqual((size, digest), (total, expected.hexdigest()))
            # Kernel socket buffers on loopback hold a few MiB; everything
            # else waits for the client.
            self.assertLess(ahead[0], 32 * MiB)
            self.assertLess(grew, 64 * MiB, f"RSS grew by {grew / MiB:.1f} MiB")

        return Deferred.fromCoroutine(run())
