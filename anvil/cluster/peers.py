# -*- test-case-name: tests.test_peer_shards -*-
"""
The client side of the peer shard protocol: this node puts, commits, reads,
stats, lists and deletes shards on other nodes' cluster listeners (the
server side, URLs and wire format are in L{anvil.cluster.shardserver}).

    client = PeerClient(cluster.http, reactor, timeout=config.cluster.peer_timeout,
                        metrics=metrics)
    upload = client.open_upload("10.0.0.2:7443", upload_key, 3, params)
    for block in blocks_of_shard_3:
        await upload.write_block(block)      # waits while the peer is slow
    await upload.finish()                     # every block is at the peer
    await upload.commit(content_hash, content_length)

    batch = await client.read_blocks(addr, content_hash, 3, params, length, first, count)
    batch.blocks, batch.corrupt_stripe

Flow control: a shard upload is one PUT whose body is an L{IBodyProducer}
registered with the connection (chunked encoding). The transport pauses it
when its send buffer is full, and L{ShardUpload.write_block} returns only
once its frame was handed to the connection I{and} the connection is not
paused, so the caller never runs more than about one block ahead of what
the socket accepts, whatever the peer's speed.

Timeouts: every request fails with L{PeerTimeout} after C{timeout} seconds
without progress (no connection, no response, no body bytes, or for an
upload no room to send), counted from when this node waits for the peer:
time the caller spends between two L{ShardUpload.write_block} calls does
not count (the peer drops an upload whose sender stays silent for its own
idle timeout). A timed-out request's connection is aborted.

Metrics: each request counts once in C{metrics.peer_requests} with the
kind (C{shard_put}, C{shard_commit}, C{shard_abort}, C{shard_get},
C{shard_stat}, C{shard_delete}, C{shard_list}) and the outcome C{ok},
C{timeout} or C{error} (a C{404} from a stat is an C{ok} answer).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from urllib.parse import quote
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from anvil.cluster.shardserver import (
    CORRUPT_STRIPE_HEADER,
    END_FRAME,
    ERROR_HEADER,
    FRAME_HEADER,
    MAX_READ_BYTES,
)
from anvil.errors import AnvilError
from anvil.metrics import Metrics
from anvil.storage.erasure import Block, ErasureParams
from anvil.storage.ranges import block_length, stripe_count, stripe_length

__all__ = [
    "PeerError",
    "PeerTimeout",
    "PeerShardMissing",
    "PeerShardCorrupt",
    "BlockBatch",
    "PeerClient",
    "ShardUpload",
]


class PeerError(AnvilError):
    """
    The peer cannot help now: connection refused or reset, timeout, or an
    unexpected answer.

    @ivar status: The HTTP status the peer answered, if it answered.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        """
        @param message: One sentence naming the peer and what happened.
        @param status: The HTTP status, if any.
        """
        super().__init__(message)
        self.status = status


class PeerTimeout(PeerError):
    """
    The peer made no progress for the client's timeout.
    """


class PeerShardMissing(PeerError):
    """
    The peer has no such shard (or upload): it answered C{404}.
    """


class PeerShardCorrupt(PeerError):
    """
    The peer found the shard damaged, or holding another geometry than
    asked for.

    @ivar stripe: The stripe of the bad block, or L{None} when the whole
        shard is unusable (bad header or size, geometry mismatch).
    """

    def __init__(self, message: str, stripe: int | None, status: int | None = None) -> None:
        """
        @param message: One sentence.
        @param stripe: The bad stripe, or L{None}.
        @param status: The HTTP status.
        """
        super().__init__(message, status)
        self.stripe = stripe


@dataclass(frozen=True)
class BlockBatch:
    """
    What L{PeerClient.read_blocks} got.

    @ivar blocks: The verified blocks of stripes C{first_stripe},
        C{first_stripe + 1}, ... in order; all C{count} asked for unless
        C{corrupt_stripe} is set.
    @ivar corrupt_stripe: L{None} when every block asked for is in
        C{blocks}; otherwise the stripe whose block the peer found corrupt,
        which is C{first_stripe + len(blocks)}: the blocks after it were not
        sent (ask again from C{corrupt_stripe + 1} if they are wanted).
    """

    blocks: list[bytes]
    corrupt_stripe: int | None = None


class _Watchdog:
    """
    Calls C{expire} after C{timeout} seconds without a L{poke}, while armed.
    """

    def __init__(self, clock: IReactorTime, timeout: float, expire: Callable[[], None]) -> None:
        self._clock = clock
        self._timeout = timeout
        self._expire = expire
        self._call: IDelayedCall | None = None
        self.fired = False

    def poke(self) -> None:
        """
        Progress: (re)start the countdown.
        """
        if self.fired:
            return
        if self._call is not None and self._call.active():
            self._call.reset(self._timeout)
        else:
            self._call = self._clock.callLater(self._timeout, self._fire)

    def stop(self) -> None:
        """
        Disarm (not waiting for the peer now).
        """
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _fire(self) -> None:
        self._call = None
        self.fired = True
        self._expire()


class _BodyReader(Protocol):
    """
    Delivers a response body piece by piece, poking a watchdog.
    """

    def __init__(self, on_data: Callable[[bytes], None], watchdog: _Watchdog) -> None:
        self._on_data = on_data
        self._watchdog = watchdog
        self.done: Deferred[None] = Deferred(self._cancel)

    def dataReceived(self, data: bytes) -> None:
        """
        A piece of the body: progress.
        """
        self._watchdog.poke()
        self._on_data(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        """
        The body is complete (C{ResponseDone}) or was cut short.
        """
        if self.done.called:
            return
        if reason.check(ResponseDone):
            self.done.callback(None)
        else:
            self.done.errback(reason)

    def _cancel(self, done: Deferred[None]) -> None:
        transport = self.transport
        if transport is None:
            return
        abort = getattr(transport, "abortConnection", None)
        if abort is not None:
            abort()
        else:
            transport.stopProducing()


class _Splitter:
    """
    Cuts a response body into blocks of known lengths, copying each byte
    once.

    @ivar blocks: The complete blocks so far.
    @ivar overflow: More bytes arrived than the blocks hold.
    """

    def __init__(self, lengths: list[int]) -> None:
        self._lengths = lengths
        self.blocks: list[bytes] = []
        self._parts: list[memoryview] = []
        self._have = 0
        self.overflow = False

    def feed(self, data: bytes) -> None:
        """
        @param data: The next piece of the body.
        """
        view = memoryview(data)
        while view:
            index = len(self.blocks)
            if index >= len(self._lengths):
                self.overflow = True
                return
            need = self._lengths[index] - self._have
            if not self._parts and len(view) == need and need == len(data):
                self.blocks.append(data)
                return
            part = view[:need]
            view = view[len(part):]
            self._parts.append(part)
            self._have += len(part)
            if self._have == self._lengths[index]:
                parts, self._parts, self._have = self._parts, [], 0
                self.blocks.append(bytes(parts[0]) if len(parts) == 1 else b"".join(parts))

    @property
    def partial(self) -> bool:
        """
        @return: Whether a block was started and not completed.
        """
        return bool(self._parts)


def _describe(reason: BaseException | Failure) -> str:
    if isinstance(reason, Failure):
        reason = reason.value  # type: ignore[assignment]
    inner = getattr(reason, "reasons", None)
    if inner:
        return "; ".join(_describe(r) for r in inner)
    return f"{type(reason).__name__}: {reason}"


class PeerClient:
    """
    Talks the peer shard protocol to other nodes' cluster listeners.
    """

    _log = Logger()

    def __init__(
        self,
        http: Any,
        clock: IReactorTime,
        timeout: float,
        metrics: Metrics | None = None,
        scheme: str = "https",
    ) -> None:
        """
        @param http: A C{treq.HTTPClient}, normally over an C{Agent} with
            L{anvil.cluster.tls.ClusterTLSPolicy} and a persistent pool.
        @param clock: Times requests out.
        @param timeout: Seconds without progress before a request fails
            with L{PeerTimeout} (C{config.cluster.peer_timeout}).
        @param metrics: Where C{peer_requests} are counted, if anywhere.
        @param scheme: C{"https"}; tests may use C{"http"}.
        """
        self._http = http
        self._clock = clock
        self.timeout = timeout
        self._metrics = metrics
        self._scheme = scheme

    def url(self, addr: str, path: str) -> str:
        """
        @param addr: A peer's cluster address, C{host:port}.
        @param path: The path under C{/cluster/v1/shards}, with its query.
        @return: The absolute URL.
        """
        return f"{self._scheme}://{addr}/cluster/v1/shards{path}"

    def count(self, kind: str, outcome: str) -> None:
        """
        Count one request in C{peer_requests}.

        @param kind: The request kind.
        @param outcome: C{ok}, C{timeout} or C{error}.
        """
        if self._metrics is not None:
            self._metrics.peer_requests.labels(kind, outcome).inc()

    # -- requests --------------------------------------------------------------

    def open_upload(
        self, addr: str, upload_key: bytes, index: int, params: ErasureParams
    ) -> ShardUpload:
        """
        Start streaming one shard to a peer (the PUT starts now).

        @param addr: The peer's cluster address, C{host:port}.
        @param upload_key: The key all shards of this upload share (1 to 64
            bytes); the peer keeps the upload under (key, index).
        @param index: The shard index.
        @param params: The content's erasure geometry.
        @return: The upload: L{ShardUpload.write_block} each block in
            stripe order, then L{ShardUpload.finish} and
            L{ShardUpload.commit}, or L{ShardUpload.abort}.
        """
        if not 1 <= len(upload_key) <= 64:
            raise ValueError("upload keys are 1 to 64 bytes")
        return ShardUpload(self, addr, upload_key, index, params)

    async def request(
        self,
        kind: str,
        method: str,
        url: str,
        on_data: Callable[[bytes], None] | None = None,
        ok: tuple[int, ...] = (200,),
        expected: tuple[int, ...] = (),
    ) -> tuple[int, Any, bytes]:
        """
        One request without a body, with the no-progress timeout, counted.

        @param kind: The metric kind.
        @param method: The HTTP method.
        @param url: From L{url}.
        @param on_data: Receives the body piece by piece (then the returned
            body is empty); by default the body is collected.
        @param ok: Statuses that succeed.
        @param expected: Other statuses returned rather than raised (still
            counted as C{ok}).
        @return: C{(status, headers, body)}.
        @raise PeerError: Anything else (see L{raise_for}).
        """
        pieces: list[bytes] = []
        sink = on_data if on_data is not None else pieces.append
        waiting: list[Deferred[Any]] = []

        def expire() -> None:
            for d in waiting:
                d.cancel()

        watchdog = _Watchdog(self._clock, self.timeout, expire)
        watchdog.poke()
        try:
            try:
                started = self._http.request(
                    method, url, unbuffered=True, allow_redirects=False
                )
                waiting[:] = [started]
                response = await started
                watchdog.poke()
                reader = _BodyReader(sink, watchdog)
                waiting[:] = [reader.done]
                response.deliverBody(reader)
                await reader.done
            except Exception as e:
                if watchdog.fired:
                    self.count(kind, "timeout")
                    raise PeerTimeout(
                        f"{method} {url}: no progress for {self.timeout} s"
                    ) from None
                self.count(kind, "error")
                raise PeerError(f"{method} {url} failed: {_describe(e)}") from None
        finally:
            watchdog.stop()
        body = b"".join(pieces)
        code = response.code
        if code in ok or code in expected:
            self.count(kind, "ok")
            return code, response.headers, body
        self.count(kind, "error")
        raise self.raise_for(method, url, code, response.headers, body)

    def raise_for(self, method: str, url: str, code: int, headers: Any, body: bytes) -> PeerError:
        """
        The exception for an unexpected answer.

        @return: L{PeerShardMissing} for C{404}, L{PeerShardCorrupt} for a
            C{409} naming C{corrupt} or C{mismatch}, else L{PeerError}.
        """
        condition = (headers.getRawHeaders(ERROR_HEADER) or [b""])[0].decode("ascii", "replace")
        text = body[:300].decode("utf-8", "replace").strip()
        message = f"{method} {url}: {code} {condition} {text}".strip()
        if code == 404:
            return PeerShardMissing(message, code)
        if code == 409 and condition in ("corrupt", "mismatch"):
            return PeerShardCorrupt(message, None, code)
        return PeerError(message, code)

    async def read_blocks(
        self,
        addr: str,
        content_hash: bytes,
        index: int,
        params: ErasureParams,
        content_length: int,
        first_stripe: int,
        count: int,
    ) -> BlockBatch:
        """
        Fetch the blocks of stripes C{[first_stripe, first_stripe + count)}
        of one shard, each verified by the peer against its checksum.

        The caller chooses the window (a few MiB is efficient); windows
        over L{MAX_READ_BYTES} are fetched in several requests.

        @param addr: The peer's cluster address, C{host:port}.
        @param content_hash: The content's SHA-256 digest.
        @param index: The shard index.
        @param params: The content's geometry (checked against the shard).
        @param content_length: The content's length (checked too).
        @param first_stripe: The first stripe wanted.
        @param count: How many stripes, C{>= 0}.
        @return: A L{BlockBatch}: the blocks, and the stripe of a corrupt
            block if the peer stopped at one after at least one good block.
        @raise PeerShardCorrupt: The block of C{first_stripe} itself is
            corrupt (C{stripe == first_stripe}), or the shard's header is
            damaged or disagrees with C{params}/C{content_length}
            (C{stripe is None}).
        @raise PeerShardMissing: The peer has no such shard.
        @raise PeerError: Any other failure, timeouts included.
        @raise ValueError: The window is outside the content.
        """
        stripes = stripe_count(content_length, params.stripe_size)
        if count < 0 or first_stripe < 0 or first_stripe + count > stripes:
            raise ValueError(f"stripes {first_stripe}..{first_stripe + count} outside 0..{stripes}")
        lengths = [
            block_length(stripe_length(s, params.stripe_size, content_length), params.k)
            for s in range(first_stripe, first_stripe + count)
        ]
        blocks: list[bytes] = []
        start = 0
        while start < count:
            end, size = start, 0
            while end < count and (end == start or size + lengths[end] <= MAX_READ_BYTES):
                size += lengths[end]
                end += 1
            got, corrupt = await self._read_window(
                addr, content_hash, index, params, content_length,
                first_stripe + start, lengths[start:end],
            )
            blocks.extend(got)
            if corrupt is not None:
                if not blocks:
                    raise PeerShardCorrupt(
                        f"{addr} found block {corrupt} of shard {content_hash.hex()}.{index} corrupt",
                        corrupt,
                    )
                return BlockBatch(blocks, corrupt)
            start = end
        return BlockBatch(blocks, None)

    async def _read_window(
        self,
        addr: str,
        content_hash: bytes,
        index: int,
        params: ErasureParams,
        content_length: int,
        first: int,
        lengths: list[int],
    ) -> tuple[list[bytes], int | None]:
        url = self.url(
            addr,
            f"/{content_hash.hex()}/{index}?k={params.k}&m={params.m}"
            f"&stripe_size={params.stripe_size}&length={content_length}"
            f"&first={first}&count={len(lengths)}",
        )
        splitter = _Splitter(lengths)
        code, headers, _ = await self.request("shard_get", "GET", url, on_data=splitter.feed)
        raw = headers.getRawHeaders(CORRUPT_STRIPE_HEADER)
        corrupt = int(raw[0]) if raw else None
        got = len(splitter.blocks)
        if splitter.overflow or splitter.partial:
            raise PeerError(f"GET {url}: the answer does not split into the blocks asked for")
        if corrupt is None and got != len(lengths):
            raise PeerError(f"GET {url}: {got} of {len(lengths)} blocks")
        if corrupt is not None and corrupt != first + got:
            raise PeerError(f"GET {url}: corrupt stripe {corrupt} after {got} blocks")
        return splitter.blocks, corrupt

    async def delete_content(self, addr: str, content_hash: bytes) -> int:
        """
        Remove every shard of a content on a peer.

        @param addr: The peer's cluster address.
        @param content_hash: The content's SHA-256 digest.
        @return: The number of files the peer removed.
        @raise PeerError: The peer could not be asked.
        """
        url = self.url(addr, f"/{content_hash.hex()}")
        _, _, body = await self.request("shard_delete", "DELETE", url)
        return int(json.loads(body)["removed"])

    async def delete_shard(self, addr: str, content_hash: bytes, index: int) -> bool:
        """
        Remove one shard of a content on a peer (the others stay), from
        every data directory of the peer holding it.

        @param addr: The peer's cluster address.
        @param content_hash: The content's SHA-256 digest.
        @param index: The shard index.
        @return: Whether the peer removed a file (C{False}: it had none).
        @raise PeerError: The peer could not be asked.
        """
        url = self.url(addr, f"/{content_hash.hex()}/{int(index)}")
        _, _, body = await self.request("shard_delete", "DELETE", url)
        return bool(json.loads(body)["removed"])

    async def list_shards(
        self, addr: str, after: str = "", limit: int = 1000
    ) -> list[tuple[str, int, int]]:
        """
        One page of a peer's committed shards, in (hash hex, index) order.

        Page on with C{after=f"{hash_hex}.{index}"} of the last entry
        (L{anvil.storage.shardstore.shard_cursor}) until a page is shorter
        than C{limit}.

        @param addr: The peer's cluster address.
        @param after: The cursor; C{""} for the first page.
        @param limit: At most this many (1 to 10,000).
        @return: C{(hash hex, index, file size)} triples.
        @raise PeerError: The peer could not be asked.
        """
        url = self.url(addr, f"?after={quote(after, safe='')}&limit={int(limit)}")
        _, _, body = await self.request("shard_list", "GET", url)
        return [(str(h), int(i), int(s)) for h, i, s in json.loads(body)["shards"]]

    async def stat_shard(self, addr: str, content_hash: bytes, index: int) -> bool:
        """
        Whether a peer holds a shard whose header and size are sound.

        @param addr: The peer's cluster address.
        @param content_hash: The content's SHA-256 digest.
        @param index: The shard index.
        @return: C{True} if it does; C{False} if it has none or a damaged one.
        @raise PeerError: The peer could not be asked.
        """
        url = self.url(addr, f"/{content_hash.hex()}/{index}")
        code, _, _ = await self.request("shard_stat", "HEAD", url, expected=(404, 409))
        return code == 200


@implementer(IBodyProducer)
class _FrameProducer:
    """
    The body of a shard PUT: frames written by L{ShardUpload}, paused and
    resumed by the connection.
    """

    length = UNKNOWN_LENGTH

    def __init__(self, upload: ShardUpload) -> None:
        self._upload = upload
        self.consumer: IConsumer | None = None
        self.paused = False
        self.stopped = False
        self.done: Deferred[None] | None = None

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        """
        The request is being sent: frames may now be written to C{consumer}.

        @return: Fired by L{ShardUpload.finish} once the end frame is written.
        """
        self.consumer = consumer
        self.done = Deferred(lambda d: self._upload._fail_from_producer("cancelled"))
        self._upload._wake()
        return self.done

    def pauseProducing(self) -> None:
        """
        The connection's send buffer is full: L{ShardUpload.write_block}
        waits.
        """
        self.paused = True

    def resumeProducing(self) -> None:
        """
        The connection can take more: let a waiting writer go on.
        """
        self.paused = False
        self._upload._wake()

    def stopProducing(self) -> None:
        """
        The connection is gone (or the peer answered early): the upload
        fails.
        """
        self.stopped = True
        self._upload._fail_from_producer("stopped")


class ShardUpload:
    """
    One streamed PUT of one shard to one peer (see L{PeerClient.open_upload}).

    @ivar addr: The peer.
    @ivar index: The shard index.
    @ivar blocks_sent: Blocks handed to the connection so far.
    @ivar data_dir: The peer's data directory holding the shard, once
        committed.
    """

    _log = Logger()

    def __init__(
        self, client: PeerClient, addr: str, upload_key: bytes, index: int, params: ErasureParams
    ) -> None:
        """
        Use L{PeerClient.open_upload}.
        """
        self._client = client
        self.addr = addr
        self.index = index
        self.params = params
        self.blocks_sent = 0
        self.data_dir: str | None = None
        self._path = f"/uploads/{upload_key.hex()}/{index}"
        self._url = client.url(addr, self._path)
        self._producer = _FrameProducer(self)
        self._failure: PeerError | None = None
        self._waiter: Deferred[None] | None = None
        self._wake_pending = False
        self._reader: _BodyReader | None = None
        self._finished = False
        self._committed = False
        self._aborted = False
        self._counted = False
        # Armed only while this side waits for the peer (see the module
        # docstring), so a caller that is slow between blocks is not
        # mistaken for a stalled peer.
        self._watchdog = _Watchdog(client._clock, client.timeout, self._timed_out)
        put_url = f"{self._url}?k={params.k}&m={params.m}&stripe_size={params.stripe_size}"
        self._response: Deferred[Any] = client._http.request(
            "PUT", put_url, data=self._producer, unbuffered=True, allow_redirects=False
        )
        self._response.addCallbacks(self._got_response, self._request_failed)

    # -- events from the connection ---------------------------------------------

    def _wake(self) -> None:
        # Called by the connection from inside its own code (startProducing
        # runs inside the Agent's callback chain, resumeProducing inside the
        # transport's write loop): resuming the caller there would run its
        # code re-entrantly, so it is resumed from the reactor instead.
        if self._waiter is not None and not self._wake_pending:
            self._wake_pending = True
            self._client._clock.callLater(0, self._wake_now)

    def _wake_now(self) -> None:
        self._wake_pending = False
        if self._waiter is None:
            return
        self._watchdog.poke()
        if self._ready():
            waiter, self._waiter = self._waiter, None
            waiter.callback(None)

    def _ready(self) -> bool:
        p = self._producer
        return p.consumer is not None and not p.paused and not p.stopped

    def _fail(self, error: PeerError) -> None:
        if self._failure is None:
            self._failure = error
        if self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            waiter.errback(self._failure)

    def _fail_from_producer(self, how: str) -> None:
        self._fail(PeerError(f"PUT {self._url}: the connection {how} the upload"))

    def _timeout_error(self) -> PeerTimeout:
        return PeerTimeout(f"PUT {self._url}: no progress for {self._client.timeout} s")

    def _timed_out(self) -> None:
        self._fail(self._timeout_error())
        self._response.cancel()
        if self._reader is not None:
            self._reader.done.cancel()

    def _got_response(self, response: Any) -> Any:
        if not self._finished:
            # The peer answered before the end of the body: it refused it.
            self._fail(
                PeerError(f"PUT {self._url}: answered {response.code} mid-body", response.code)
            )
        return response

    def _request_failed(self, reason: Failure) -> None:
        # Recorded rather than passed on: the caller may never await the
        # response (it stops at a failed write_block).
        if self._watchdog.fired:
            self._fail(self._timeout_error())
        else:
            self._fail(PeerError(f"PUT {self._url} failed: {_describe(reason)}"))
        return None

    def _count(self, outcome: str) -> None:
        if not self._counted:
            self._counted = True
            self._client.count("shard_put", outcome)

    def _check(self) -> None:
        if self._failure is not None:
            self._count("timeout" if isinstance(self._failure, PeerTimeout) else "error")
            raise self._failure

    async def _until_ready(self) -> None:
        self._check()
        if self._ready():
            return
        self._watchdog.poke()
        try:
            while not self._ready():
                self._check()
                self._waiter = Deferred()
                try:
                    await self._waiter
                except PeerError:
                    self._check()
                    raise
        finally:
            self._watchdog.stop()
        self._check()

    # -- the caller's side ---------------------------------------------------------

    async def write_block(self, block: Block) -> None:
        """
        Send the next stripe's block.

        Returns once the frame is handed to the connection and the
        connection can take more: a slow peer makes this wait. One call at
        a time (await each before the next).

        @param block: The block (C{stripe_size // k} bytes, or fewer for the
            last stripe).
        @raise PeerError: The upload failed (timeout, refused, reset).
        """
        if self._finished:
            raise ValueError("write_block after finish")
        if self._waiter is not None:
            raise RuntimeError("write_block called while another write_block waits")
        size = len(block) if isinstance(block, bytes) else memoryview(block).nbytes
        if not 0 < size <= self.params.block_size:
            raise ValueError(f"block of {size} bytes, expected 1..{self.params.block_size}")
        await self._until_ready()
        consumer = self._producer.consumer
        assert consumer is not None
        consumer.write(FRAME_HEADER.pack(size))
        consumer.write(block if isinstance(block, bytes) else bytes(block))
        self.blocks_sent += 1
        # Return only once the connection can take more, so the caller is
        # never more than this one block ahead of the socket.
        await self._until_ready()

    async def finish(self) -> None:
        """
        End the body and wait for the peer to confirm that its temporary
        file holds every block.

        @raise PeerError: The peer did not confirm.
        """
        if self._finished:
            raise ValueError("finish called twice")
        await self._until_ready()
        consumer = self._producer.consumer
        assert consumer is not None and self._producer.done is not None
        consumer.write(FRAME_HEADER.pack(0) + END_FRAME.pack(self.blocks_sent))
        self._finished = True
        self._watchdog.poke()
        try:
            self._producer.done.callback(None)
            response = await self._response
            self._check()
            self._watchdog.poke()
            pieces: list[bytes] = []
            self._reader = _BodyReader(pieces.append, self._watchdog)
            response.deliverBody(self._reader)
            try:
                await self._reader.done
            except Exception as e:
                self._fail(
                    self._timeout_error()
                    if self._watchdog.fired
                    else PeerError(f"PUT {self._url} failed: {_describe(e)}")
                )
                self._check()
        finally:
            self._watchdog.stop()
        if response.code != 200:
            self._count("error")
            body = b"".join(pieces)
            self._failure = self._client.raise_for("PUT", self._url, response.code, response.headers, body)
            raise self._failure
        self._count("ok")

    async def commit(self, content_hash: bytes, content_length: int) -> None:
        """
        Make the shard visible at the peer (header, fsync, rename) under
        the content hash. Calls L{finish} first if it was not.

        @param content_hash: The content's SHA-256 digest.
        @param content_length: The content's length.
        @raise PeerShardMissing: The peer no longer has the upload
            (expired or aborted).
        @raise PeerError: Anything else.
        """
        if not self._finished:
            await self.finish()
        elif self._failure is not None:
            raise self._failure
        url = self._client.url(
            self.addr, f"{self._path}/commit?hash={content_hash.hex()}&length={content_length}"
        )
        _, _, body = await self._client.request("shard_commit", "POST", url)
        self.data_dir = str(json.loads(body)["data_dir"])
        self._committed = True

    async def abort(self) -> None:
        """
        Drop the upload at the peer, best effort; never raises.

        A PUT still in flight is cancelled (the peer removes the temporary
        file when the connection drops); once the body was complete, a
        C{DELETE} drops the peer's finished upload too. A committed upload
        is left alone.
        """
        if self._aborted or self._committed:
            return
        self._aborted = True
        self._fail(PeerError(f"PUT {self._url}: aborted"))
        self._response.cancel()
        if self._reader is not None:
            self._reader.done.cancel()
        self._watchdog.stop()
        if not self._finished:
            return
        try:
            await self._client.request("shard_abort", "DELETE", self._url, ok=(204,))
        except PeerError as e:
            self._log.info("Aborting {url} failed: {error}", url=self._url, error=str(e))
