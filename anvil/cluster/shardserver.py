# -*- test-case-name: tests.test_peer_shards -*-
"""
The server side of the peer shard protocol: other nodes put, commit, read,
stat, list and delete shards on this node's L{LocalShardStore}.

The node mounts L{ShardServer} at C{/cluster/v1/shards} on the cluster
listener (an L{anvil.web.server.AnvilSite}, so request bodies stream in
through C{request.body} while the handler runs). URLs below are relative to
that mount point; C{<key>} is an upload key in hex (1 to 64 bytes),
C{<hash>} a content hash (64 lower-case hex digits), C{<index>} a shard
index in decimal::

    PUT    /uploads/<key>/<index>?k=&m=&stripe_size=     stream one shard
    POST   /uploads/<key>/<index>/commit?hash=&length=   commit it
    DELETE /uploads/<key>/<index>                        abort it
    GET    /<hash>/<index>?k=&m=&stripe_size=&length=&first=&count=
                                                         read blocks
    HEAD   /<hash>/<index>                               stat one shard
    DELETE /<hash>/<index>                               delete one shard
    DELETE /<hash>                                       delete a content
    GET    /?after=&limit=                               list shards

B{PUT} body: one frame per block, in stripe order: a 4-byte big-endian
length then the block's bytes (a full block is C{stripe_size // k} bytes,
the last stripe's may be shorter); then an end frame: 4 zero bytes and the
8-byte big-endian number of blocks. Blocks are never empty, so a zero
length is unambiguous, and a body cut short anywhere (even on a frame
boundary) lacks the end frame and is refused. Each block is written with
L{ShardWriter.write_block} in the io pool, and the next piece of the body
is read only once that write has finished: with the request body's
buffer limited to about two frames, a slow disk slows the sender through
TCP flow control. The reply is C{200} with C{{"blocks": n}} once every
block is in the temporary file; nothing is visible yet. A body that is cut
short, a disconnect, or a sender silent for C{idle_timeout} seconds
removes the temporary file. A finished upload waits for its commit or abort
at most C{upload_ttl} seconds (then it is removed). A second PUT for an
upload that is still receiving is refused with C{409}; one for a finished
upload replaces it.

B{commit} writes the header, fsyncs and renames (L{LocalShardStore.commit})
and answers C{{"data_dir": ..., "path": ...}}. Repeating a commit that
succeeded (a lost reply) answers the same again for C{upload_ttl} seconds.
B{abort} answers C{204} whether or not the upload existed.

B{GET} answers the blocks of stripes C{[first, first + count)},
concatenated (the caller knows each block's length from the geometry and
the content length), each verified against its checksum. The query's
geometry and content length must match the shard's header. The window is
read in full before the answer starts (the caller asks for a few MiB; at
most L{MAX_READ_BYTES}), so that a corrupt block can be announced in a
header: the answer then holds the good blocks before it and
C{Anvil-Corrupt-Stripe: <stripe>}, and C{on_corrupt(hash_hex, index,
stripe)} is called. A shard whose header is damaged is reported with
C{stripe=None}.

B{HEAD} answers C{200} with the shard's geometry in C{Anvil-K},
C{Anvil-M}, C{Anvil-Stripe-Size} and C{Anvil-Content-Length} when the
shard exists and its header and size are sound. B{DELETE} of a content
answers C{{"removed": n}}; B{DELETE} of one shard (a rebalance moved it
elsewhere) answers C{{"removed": true}} or C{{"removed": false}} when there
was no such shard, from every data directory. B{list} answers C{{"shards": [[hash, index,
size], ...], "next": cursor or null}} in (hash, index) order; pass
C{next} as C{after} for the following page.

Errors carry an C{Anvil-Error} header naming the condition and a one-line
text body: C{missing} (404, no such shard or upload), C{corrupt} (409, the
shard's header or size is damaged), C{mismatch} (409, the shard's header
disagrees with the query), C{conflict} (409, the upload is in a state that
does not allow the request), C{bad-request} (400), C{truncated} (400, the
body ended without its end frame), C{timeout} (408), C{forbidden} (403,
the caller is not a cluster node), C{internal} (500).

Every request is first passed to C{authorize(request)}, which raises to
refuse it (the node plugs in C{anvil.cluster.listener.request_peer}). All
file I/O runs in the io L{CpuPool}, never on the reactor thread.
"""

from __future__ import annotations

import json
import re
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from anvil.storage.cpu import CpuPool
from anvil.storage.erasure import ErasureParams, InvalidErasureParams
from anvil.storage.ranges import block_length, stripe_length
from anvil.storage.shardfile import CorruptShard, ShardHeader, ShardWriter
from anvil.storage.shardstore import LocalShardStore, ShardNotFound, shard_cursor
from anvil.web.body import BodyIncomplete

__all__ = [
    "ShardServer",
    "FRAME_HEADER",
    "END_FRAME",
    "MAX_READ_BYTES",
    "MAX_LIST_LIMIT",
    "CORRUPT_STRIPE_HEADER",
    "ERROR_HEADER",
]

#: A block frame's length prefix (a zero length starts the end frame).
FRAME_HEADER = struct.Struct(">I")
#: What follows the zero length of the end frame: the number of blocks.
END_FRAME = struct.Struct(">Q")
#: The most block bytes one GET may ask for.
MAX_READ_BYTES = 32 * 1024 * 1024
#: The most shards one list page holds.
MAX_LIST_LIMIT = 10000
#: Response header naming the stripe of the first corrupt block.
CORRUPT_STRIPE_HEADER = b"Anvil-Corrupt-Stripe"
#: Response header naming the error condition.
ERROR_HEADER = b"Anvil-Error"

_HASH = re.compile(rb"[0-9a-f]{64}")
_KEY = re.compile(rb"(?:[0-9a-f]{2}){1,64}")
_INDEX = re.compile(rb"[0-9]{1,3}")
_UPLOADS = b"uploads"


class _Refused(Exception):
    """
    A request this server answers with an error.

    @ivar code: The HTTP status.
    @ivar condition: The C{Anvil-Error} value.
    @ivar message: One sentence for the body.
    """

    def __init__(self, code: int, condition: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.condition = condition
        self.message = message


def _bad(message: str) -> _Refused:
    return _Refused(400, "bad-request", message)


@dataclass
class _Upload:
    """
    One shard upload: receiving, then finished (waiting for commit/abort).

    @ivar writer: The temporary shard file.
    @ivar finished: Whether every block arrived (the PUT answered 200).
    @ivar aborted: An abort arrived while receiving: stop at the next block.
    @ivar expiry: Removes a finished upload after C{upload_ttl}.
    """

    writer: ShardWriter
    finished: bool = False
    aborted: bool = False
    expiry: IDelayedCall | None = None


@dataclass
class _Committed:
    """
    A recent successful commit, so that a repeated commit answers again.
    """

    content_hash: bytes
    content_length: int
    body: bytes
    expiry: IDelayedCall | None = field(default=None)


class _FrameReader:
    """
    Cuts the body pieces of a PUT into frames without copying a block more
    than once.
    """

    def __init__(self) -> None:
        self._pieces: deque[memoryview] = deque()
        self.buffered = 0

    def feed(self, piece: bytes) -> None:
        """
        @param piece: The next piece of the body.
        """
        if piece:
            self._pieces.append(memoryview(piece))
            self.buffered += len(piece)

    def peek_length(self) -> int | None:
        """
        @return: The length prefix of the next frame, if it has arrived.
        """
        if self.buffered < FRAME_HEADER.size:
            return None
        head = self._pieces[0]
        if len(head) >= FRAME_HEADER.size:
            return int(FRAME_HEADER.unpack_from(head)[0])
        return int(FRAME_HEADER.unpack(self._peek(FRAME_HEADER.size))[0])

    def _peek(self, n: int) -> bytes:
        parts = []
        for piece in self._pieces:
            parts.append(piece[:n])
            n -= len(parts[-1])
            if n <= 0:
                break
        return b"".join(parts)

    def take(self, n: int) -> bytes:
        """
        Remove and return the next C{n} bytes (C{n <= buffered}).
        """
        self.buffered -= n
        head = self._pieces[0]
        if len(head) == n:
            self._pieces.popleft()
            return head.obj if head.nbytes == len(head.obj) else bytes(head)  # type: ignore[arg-type]
        if len(head) > n:
            self._pieces[0] = head[n:]
            return bytes(head[:n])
        parts: list[memoryview] = []
        while n:
            head = self._pieces[0]
            if len(head) <= n:
                parts.append(self._pieces.popleft())
                n -= len(head)
            else:
                parts.append(head[:n])
                self._pieces[0] = head[n:]
                n = 0
        return b"".join(parts)


def _read_window(
    store: LocalShardStore,
    content_hash: bytes,
    index: int,
    params: ErasureParams,
    content_length: int,
    first: int,
    count: int,
) -> tuple[list[bytes], int | None]:
    """
    Read and verify the blocks of stripes C{[first, first + count)} (in the
    io pool).

    @return: The good blocks up to the first corrupt one, and that stripe
        (or L{None} when all are good).
    @raise ShardNotFound: No such shard.
    @raise CorruptShard: Its header or size is damaged.
    @raise _Refused: The header disagrees with the query, or the window is
        out of range.
    """
    with store.open_reader(content_hash, index) as reader:
        _check_header(reader.header, params, content_length)
        if first + count > reader.stripe_count:
            raise _bad(f"stripes {first}..{first + count} outside 0..{reader.stripe_count}")
        blocks: list[bytes] = []
        for stripe in range(first, first + count):
            try:
                blocks.append(reader.read_block(stripe))
            except CorruptShard:
                return blocks, stripe
        return blocks, None


def _check_header(header: ShardHeader, params: ErasureParams, content_length: int) -> None:
    if header.params != params or header.content_length != content_length:
        raise _Refused(
            409,
            "mismatch",
            f"the shard holds k={header.params.k} m={header.params.m} "
            f"stripe_size={header.params.stripe_size} length={header.content_length}",
        )


def _stat(store: LocalShardStore, content_hash: bytes, index: int) -> ShardHeader:
    """
    Open a shard fully (header and size checks), in the io pool.
    """
    with store.open_reader(content_hash, index) as reader:
        return reader.header


class ShardServer(Resource):
    """
    The C{/cluster/v1/shards} resource tree (see the module docstring).

    It is its own resource: mount the instance (or L{resource}).
    """

    isLeaf = True
    _log = Logger()

    def __init__(
        self,
        store: LocalShardStore,
        io: CpuPool,
        clock: IReactorTime,
        on_corrupt: Callable[[str, int, int | None], object] | None = None,
        upload_ttl: float = 900.0,
        authorize: Callable[[Any], object] | None = None,
        idle_timeout: float = 120.0,
    ) -> None:
        """
        @param store: The node's shard store.
        @param io: The pool for blocking file I/O.
        @param clock: Schedules upload expiry and idle timeouts.
        @param on_corrupt: Called with C{(hash_hex, index, stripe)} for each
            corrupt block found while serving a read (C{stripe} is L{None}
            for a damaged header or size).
        @param upload_ttl: Seconds a finished upload waits for its commit
            or abort before it is removed.
        @param authorize: Called with each request before anything else;
            raising refuses it with C{403} (default: allow everything).
        @param idle_timeout: Seconds a PUT body may stay silent before the
            upload is dropped.
        """
        super().__init__()
        self._store = store
        self._io = io
        self._clock = clock
        self._on_corrupt = on_corrupt
        self._upload_ttl = upload_ttl
        self._authorize = authorize
        self._idle_timeout = idle_timeout
        self._uploads: dict[tuple[bytes, int], _Upload] = {}
        self._committed: dict[tuple[bytes, int], _Committed] = {}
        self._handling: set[Deferred[None]] = set()

    def resource(self) -> ShardServer:
        """
        @return: The resource to mount at C{/cluster/v1/shards} (this one).
        """
        return self

    @property
    def pending_uploads(self) -> int:
        """
        @return: Uploads receiving or waiting for their commit.
        """
        return len(self._uploads)

    async def stop(self) -> None:
        """
        Drop every upload not yet committed and cancel the timers (when the
        node stops; temporary files would otherwise wait for the store's
        stale-file cleanup).
        """
        for handling in list(self._handling):
            handling.cancel()
        for recent in self._committed.values():
            if recent.expiry is not None and recent.expiry.active():
                recent.expiry.cancel()
        self._committed.clear()
        uploads, self._uploads = list(self._uploads.values()), {}
        for upload in uploads:
            if upload.expiry is not None and upload.expiry.active():
                upload.expiry.cancel()
            await self._io.run(upload.writer.abort)

    # -- dispatch ------------------------------------------------------------

    def render(self, request: Any) -> int:
        """
        Handle any request under the mount point.

        @param request: An L{anvil.web.server.AnvilRequest}.
        @return: C{NOT_DONE_YET}: the coroutine finishes the request.
        """
        request.anvil_api = "cluster"
        request.anvil_operation = "Shards"
        handling: Deferred[None] = Deferred.fromCoroutine(self._handle(request))
        self._handling.add(handling)

        def done(result: object) -> None:
            self._handling.discard(handling)
            if isinstance(result, Failure) and not result.check(CancelledError):
                self._log.failure("Shard request failed", result)

        handling.addBoth(done)
        return NOT_DONE_YET

    async def _handle(self, request: Any) -> None:
        try:
            if self._authorize is not None:
                try:
                    self._authorize(request)
                except Exception as e:
                    raise _Refused(403, "forbidden", f"Not a cluster node: {e}") from None
            await self._route(request)
        except _Refused as e:
            self._error(request, e.code, e.condition, e.message)
        except CancelledError:
            self._error(request, 503, "internal", "The server is stopping.")
            raise
        except Exception:
            self._error(request, 500, "internal", "Internal error.")
            raise

    async def _route(self, request: Any) -> None:
        parts = [p for p in request.postpath if p]
        method = request.method
        if parts and parts[0] == _UPLOADS:
            if len(parts) < 3 or not _KEY.fullmatch(parts[1]) or not _INDEX.fullmatch(parts[2]):
                raise _bad("Expected /uploads/<key hex>/<index>.")
            key = bytes.fromhex(parts[1].decode("ascii"))
            index = int(parts[2])
            if len(parts) == 3 and method == b"PUT":
                request.anvil_operation = "ShardPut"
                return await self._put(request, key, index)
            if len(parts) == 3 and method == b"DELETE":
                request.anvil_operation = "ShardAbort"
                return await self._abort(request, key, index)
            if len(parts) == 4 and parts[3] == b"commit" and method == b"POST":
                request.anvil_operation = "ShardCommit"
                return await self._commit(request, key, index)
            raise _bad("Unknown upload request.")
        if not parts:
            if method == b"GET":
                request.anvil_operation = "ShardList"
                return await self._list(request)
            raise _bad("Unknown request.")
        if not _HASH.fullmatch(parts[0]):
            raise _bad("Expected a content hash in lower-case hex.")
        content_hash = bytes.fromhex(parts[0].decode("ascii"))
        if len(parts) == 1 and method == b"DELETE":
            request.anvil_operation = "ShardDelete"
            removed = await self._io.run(self._store.delete_content, content_hash)
            return self._json(request, {"removed": removed})
        if len(parts) == 2 and _INDEX.fullmatch(parts[1]):
            index = int(parts[1])
            if method == b"GET":
                request.anvil_operation = "ShardGet"
                return await self._get(request, content_hash, index)
            if method == b"HEAD":
                request.anvil_operation = "ShardStat"
                return await self._head(request, content_hash, index)
            if method == b"DELETE":
                request.anvil_operation = "ShardDeleteOne"
                deleted = await self._io.run(self._store.delete, content_hash, index)
                return self._json(request, {"removed": bool(deleted)})
        raise _bad("Unknown shard request.")

    # -- uploads ---------------------------------------------------------------

    async def _put(self, request: Any, key: bytes, index: int) -> None:
        params = _params(request)
        if index >= params.total:
            raise _bad(f"Shard index {index} outside 0..{params.total - 1}.")
        existing = self._uploads.get((key, index))
        if existing is not None:
            if not existing.finished:
                raise _Refused(409, "conflict", "This upload is still receiving.")
            self._drop(key, index, existing)
            await self._io.run(existing.writer.abort)
        recent = self._committed.pop((key, index), None)
        if recent is not None and recent.expiry is not None and recent.expiry.active():
            recent.expiry.cancel()
        frame_size = FRAME_HEADER.size + params.block_size
        body = request.body
        # At most about two frames wait in memory: the one being written
        # and the one arriving; beyond that the connection stops reading,
        # so a slow disk slows the sender instead of filling memory.
        body.high_water = max(2 * frame_size, 64 * 1024)
        body.low_water = max(frame_size // 2, 16 * 1024)
        writer = await self._io.run(self._store.open_writer, index, params, key)
        upload = _Upload(writer)
        self._uploads[(key, index)] = upload
        try:
            blocks = await self._receive(body, upload, params)
        except BaseException:
            if self._uploads.get((key, index)) is upload:
                del self._uploads[(key, index)]
            await self._io.run(writer.abort)
            raise
        upload.finished = True
        upload.expiry = self._clock.callLater(self._upload_ttl, self._expire, key, index, upload)
        self._json(request, {"blocks": blocks})

    async def _receive(self, body: Any, upload: _Upload, params: ErasureParams) -> int:
        """
        Write the body's blocks in order; return their number.
        """
        frames = _FrameReader()
        blocks = 0
        while True:
            piece = await self._read_body(body)
            if not piece:
                raise _Refused(400, "truncated", "The body ended before its end frame.")
            frames.feed(piece)
            while True:
                length = frames.peek_length()
                if length is None:
                    break
                if length == 0:
                    if frames.buffered < FRAME_HEADER.size + END_FRAME.size:
                        break
                    frames.take(FRAME_HEADER.size)
                    (announced,) = END_FRAME.unpack(frames.take(END_FRAME.size))
                    if announced != blocks:
                        raise _bad(f"The end frame announces {announced} blocks, {blocks} arrived.")
                    if frames.buffered or await self._read_body(body):
                        raise _bad("Data after the end frame.")
                    return blocks
                if length > params.block_size:
                    raise _bad(f"A block of {length} bytes exceeds {params.block_size}.")
                if frames.buffered < FRAME_HEADER.size + length:
                    break
                frames.take(FRAME_HEADER.size)
                block = frames.take(length)
                try:
                    await self._io.run(upload.writer.write_block, block)
                except ValueError as e:
                    raise _bad(str(e)) from None
                blocks += 1
                if upload.aborted:
                    raise _Refused(409, "conflict", "The upload was aborted.")

    async def _read_body(self, body: Any) -> bytes:
        """
        The next body piece, or refuse after C{idle_timeout} of silence.
        """
        reading: Deferred[bytes] = Deferred.fromCoroutine(body.read())
        timer = self._clock.callLater(self._idle_timeout, reading.cancel)
        try:
            return await reading
        except CancelledError:
            if timer.active():
                raise
            raise _Refused(408, "timeout", "The body stalled.") from None
        except BodyIncomplete as e:
            raise _Refused(400, "truncated", str(e)) from None
        finally:
            if timer.active():
                timer.cancel()

    def _drop(self, key: bytes, index: int, upload: _Upload) -> None:
        if self._uploads.get((key, index)) is upload:
            del self._uploads[(key, index)]
        if upload.expiry is not None and upload.expiry.active():
            upload.expiry.cancel()

    def _expire(self, key: bytes, index: int, upload: _Upload) -> None:
        if self._uploads.get((key, index)) is not upload:
            return
        del self._uploads[(key, index)]
        self._log.info(
            "Dropping upload {key}.{index}: no commit within {ttl} s",
            key=key.hex(), index=index, ttl=self._upload_ttl,
        )
        self._io.run(upload.writer.abort).addErrback(
            lambda f: self._log.failure("Dropping an expired upload failed", f)
        )

    async def _commit(self, request: Any, key: bytes, index: int) -> None:
        content_hash = _hash_arg(request)
        content_length = _int_arg(request, b"length")
        upload = self._uploads.get((key, index))
        if upload is None:
            recent = self._committed.get((key, index))
            if (
                recent is not None
                and recent.content_hash == content_hash
                and recent.content_length == content_length
            ):
                return self._raw(request, 200, recent.body, b"application/json")
            raise _Refused(404, "missing", "No such upload (aborted, expired or never sent).")
        if not upload.finished:
            raise _Refused(409, "conflict", "This upload is still receiving.")
        self._drop(key, index, upload)
        try:
            location = await self._io.run(
                self._store.commit, upload.writer, content_hash, content_length
            )
        except ValueError as e:
            # LocalShardStore.commit aborted the writer.
            raise _bad(str(e)) from None
        body = json.dumps({"data_dir": location.data_dir, "path": location.path}).encode()
        recent = _Committed(content_hash, content_length, body)
        recent.expiry = self._clock.callLater(
            self._upload_ttl, self._forget_commit, key, index, recent
        )
        self._committed[(key, index)] = recent
        self._raw(request, 200, body, b"application/json")

    def _forget_commit(self, key: bytes, index: int, recent: _Committed) -> None:
        if self._committed.get((key, index)) is recent:
            del self._committed[(key, index)]

    async def _abort(self, request: Any, key: bytes, index: int) -> None:
        upload = self._uploads.get((key, index))
        if upload is not None:
            if upload.finished:
                self._drop(key, index, upload)
                await self._io.run(upload.writer.abort)
            else:
                # The receiving coroutine owns the writer; it stops at the
                # next block and removes the file.
                upload.aborted = True
        self._raw(request, 204, b"", None)

    # -- reads ---------------------------------------------------------------

    async def _get(self, request: Any, content_hash: bytes, index: int) -> None:
        params = _params(request)
        content_length = _int_arg(request, b"length")
        first = _int_arg(request, b"first")
        count = _int_arg(request, b"count")
        if count:
            size = sum(
                block_length(stripe_length(s, params.stripe_size, content_length), params.k)
                for s in range(first, first + count)
                if s * params.stripe_size < content_length
            )
            if size > MAX_READ_BYTES:
                raise _bad(f"At most {MAX_READ_BYTES} bytes per read, not {size}.")
        try:
            blocks, corrupt = await self._io.run(
                _read_window, self._store, content_hash, index, params, content_length, first, count
            )
        except ShardNotFound:
            raise _Refused(404, "missing", "No such shard.") from None
        except CorruptShard as e:
            self._report(content_hash, index, None)
            raise _Refused(409, "corrupt", f"The shard is damaged: {e.reason}.") from None
        if corrupt is not None:
            self._report(content_hash, index, corrupt)
            request.setHeader(CORRUPT_STRIPE_HEADER, str(corrupt).encode("ascii"))
        if getattr(request, "_disconnected", False):
            return
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"application/octet-stream")
        request.setHeader(b"Content-Length", str(sum(len(b) for b in blocks)).encode("ascii"))
        for block in blocks:
            request.write(block)
        request.finish()

    def _report(self, content_hash: bytes, index: int, stripe: int | None) -> None:
        self._log.warn(
            "Corrupt shard {hash}.{index} (stripe {stripe}) found serving a peer read",
            hash=content_hash.hex(), index=index, stripe=stripe,
        )
        if self._on_corrupt is not None:
            try:
                self._on_corrupt(content_hash.hex(), index, stripe)
            except Exception:
                self._log.failure("on_corrupt failed")

    async def _head(self, request: Any, content_hash: bytes, index: int) -> None:
        try:
            header = await self._io.run(_stat, self._store, content_hash, index)
        except ShardNotFound:
            raise _Refused(404, "missing", "No such shard.") from None
        except CorruptShard as e:
            self._report(content_hash, index, None)
            raise _Refused(409, "corrupt", f"The shard is damaged: {e.reason}.") from None
        request.setHeader(b"Anvil-K", str(header.params.k).encode())
        request.setHeader(b"Anvil-M", str(header.params.m).encode())
        request.setHeader(b"Anvil-Stripe-Size", str(header.params.stripe_size).encode())
        request.setHeader(b"Anvil-Content-Length", str(header.content_length).encode())
        self._raw(request, 200, b"", None)

    async def _list(self, request: Any) -> None:
        after = _str_arg(request, b"after", "")
        limit = _int_arg(request, b"limit", 1000)
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise _bad(f"limit must be within 1..{MAX_LIST_LIMIT}.")
        try:
            page = await self._io.run(self._store.list_page, after, limit)
        except ValueError as e:
            raise _bad(str(e)) from None
        shards = [[loc.content_hash.hex(), loc.shard_index, size] for loc, size in page]
        next_cursor = (
            shard_cursor(shards[-1][0], shards[-1][1]) if len(shards) == limit else None  # type: ignore[arg-type]
        )
        self._json(request, {"shards": shards, "next": next_cursor})

    # -- responses -------------------------------------------------------------

    def _json(self, request: Any, value: object) -> None:
        self._raw(request, 200, json.dumps(value).encode("utf-8"), b"application/json")

    def _raw(self, request: Any, code: int, body: bytes, content_type: bytes | None) -> None:
        if getattr(request, "_disconnected", False) or request.finished:
            return
        request.setResponseCode(code)
        if content_type is not None:
            request.setHeader(b"Content-Type", content_type)
        request.setHeader(b"Content-Length", str(len(body)).encode("ascii"))
        if body:
            request.write(body)
        request.finish()

    def _error(self, request: Any, code: int, condition: str, message: str) -> None:
        if getattr(request, "_disconnected", False) or request.finished or request.startedWriting:
            return
        request.setHeader(ERROR_HEADER, condition.encode("ascii"))
        self._raw(request, code, (message + "\n").encode("utf-8"), b"text/plain; charset=utf-8")


def _arg(request: Any, name: bytes) -> bytes | None:
    values = request.args.get(name)
    return values[0] if values else None


def _int_arg(request: Any, name: bytes, default: int | None = None) -> int:
    raw = _arg(request, name)
    if raw is None:
        if default is None:
            raise _bad(f"Missing query parameter {name.decode()}.")
        return default
    if not raw.isdigit() or len(raw) > 20:
        raise _bad(f"Query parameter {name.decode()} must be a non-negative integer.")
    return int(raw)


def _str_arg(request: Any, name: bytes, default: str) -> str:
    raw = _arg(request, name)
    return default if raw is None else raw.decode("ascii", "replace")


def _hash_arg(request: Any) -> bytes:
    raw = _arg(request, b"hash")
    if raw is None or not _HASH.fullmatch(raw):
        raise _bad("Query parameter hash must be 64 lower-case hex digits.")
    return bytes.fromhex(raw.decode("ascii"))


def _params(request: Any) -> ErasureParams:
    try:
        return ErasureParams(
            _int_arg(request, b"k"), _int_arg(request, b"m"), _int_arg(request, b"stripe_size")
        )
    except InvalidErasureParams as e:
        raise _bad(str(e)) from None
