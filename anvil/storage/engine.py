# -*- test-case-name: tests.test_engine -*-
"""
The storage engine: contents in, contents out, stripe by stripe.

Writing (L{ContentWriter}, from L{StorageEngine.new_writer})::

    writer = engine.new_writer(extra_hashers=[crc32c])
    try:
        async for piece in body:          # any sizes
            await writer.write(piece)      # returns when it can take more
        record = await writer.finish()     # ContentRecord: hash, size, shard map
        ...verify the request (Content-MD5 = writer.md5_digest, signatures)...
        await writer.commit(dedup=content_already_recorded)
    except BaseException:
        await writer.abort()
        raise

Bytes are cut into stripes of C{stripe_size}. Each full stripe is handed to
a pipeline and C{write} returns at once unless L{MAX_STRIPES_IN_FLIGHT}
stripes are already in it; awaiting C{write} is therefore the backpressure
an upload handler passes on to its client, and an upload holds
O(C{stripe_size}) bytes whatever its length. Per stripe:

  - one CPU-pool job updates MD5 (the S3 ETag), SHA-256 (the content
    address) and the caller's extra hashers, in stripe order: the jobs of
    one writer are chained, so the hashers see the bytes in order although
    jobs of different stripes may be in the pool at once;
  - a second CPU-pool job, in parallel with the first, erasure-codes the
    stripe (zfec; hashlib and zfec both release the GIL, so on two cores
    one upload uses both);
  - one io-pool job appends the C{k + m} blocks (each with its CRC) to the
    C{k + m} temporary shard files, chained in stripe order as well.

A stripe's buffer is reused only once all three jobs are done with it (the
data blocks the codec returns are views into it).

Contents of at most C{inline_threshold} bytes never touch the shard
store: C{finish} returns them in C{ContentRecord.inline_data} and the
metadata layer stores them in PostgreSQL, the durability anchor of every
object anyway; a shard commit costs about seven fsyncs, which would cap
small PUTs near 200 per second. The writer holds up to C{inline_threshold}
bytes before it knows which case applies.

Temporary files and who removes them: C{abort} removes them (also after a
failure part-way or after the caller was cancelled: it first waits for the
writer's jobs still running in the pools). A writer dropped without
C{commit} or C{abort} removes its files when it is garbage-collected (or
at interpreter exit). What a crash leaves in C{<dir>/tmp/} is removed by
L{StorageEngine.clean_temporary}, which the node calls once at start (no
writer exists yet, so C{older_than=0} is safe) and the garbage collector
calls periodically with an age of an hour. Shards renamed into place whose
content never got recorded (a crash or a failed metadata commit between
C{commit} and the object row) are orphans the garbage collector finds by
listing shards.

Reading (L{ContentReader}, from L{StorageEngine.read}) is an async iterator
over the bytes of C{[start, stop)}: only the stripes the range covers are
read. For each stripe the reader reads, in the io pool, the data blocks the
range needs (often one block for a small range); zfec runs (in the CPU
pool) only when a data block is unusable, from C{k} blocks preferring data
shards. A block failing its checksum, a missing shard file or a bad header
is logged, reported to C{on_corrupt(content_hash, shard_index, stripe)}
(the node counts it and queues a repair) and that shard moves to the back
of the preference order for the rest of the read; a missing or unreadable
file is dropped for the rest of the read. When fewer than C{k} blocks of a
stripe can be read, L{ContentUnavailable} is raised before any byte of that
stripe is returned: a reader never yields wrong bytes. The next stripe is
read while the current one is decoded and consumed (read-ahead of one), and
the shard files stay open until the read ends or the iterator is closed
with C{aclose()} (a client that disconnects).

Content hashes are hex strings in L{ContentRecord} and raw digests in the
shard store; this module converts.
"""

from __future__ import annotations

import hashlib
import os
import random
import secrets
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from anvil.errors import AnvilError
from anvil.meta.records import ContentRecord
from anvil.storage.cpu import CpuPool, PoolStopped
from anvil.storage.erasure import Block, ErasureCodec, ErasureParams
from anvil.storage.placement import LocalPlacement, NoPlacement, Placement, ShardMap, ShardTarget
from anvil.storage.ranges import data_block_slices, stripe_slices
from anvil.storage.remote import PeerDirectory, RemoteShardSource, ShardUnavailable
from anvil.storage.shardfile import (
    BadShardHeader,
    CorruptShard,
    ShardReader,
    ShardWriter,
)
from anvil.storage.shardstore import LocalShardStore, ShardNotFound

__all__ = [
    "MAX_STRIPES_IN_FLIGHT",
    "ContentReader",
    "ContentUnavailable",
    "ContentWriter",
    "StorageEngine",
    "WriteQuorumLost",
    "WriterClosed",
]

#: Stripes of one upload handed to the pipeline and not yet written; one
#: more is being filled by C{write}. Two keep both cores busy (hashing and
#: encoding of one stripe run in parallel, the next one queues behind) while
#: an upload holds about C{3 * stripe_size} of data plus parity.
MAX_STRIPES_IN_FLIGHT = 2

#: An inline content this small is hashed on the reactor thread: MD5 and
#: SHA-256 of 16 KiB take about 40 microseconds here, less than handing the
#: work to the CPU pool and back costs.
_HASH_ON_REACTOR_MAX = 16 * 1024

_T = TypeVar("_T")

#: Called with (content hash hex, shard index, stripe index) for every
#: unusable block or shard found while reading.
CorruptionReporter = Callable[[str, int, int], None]


class ContentUnavailable(AnvilError):
    """
    Too few shards of a content can be read to rebuild a stripe (more than
    C{m} are missing or corrupt). The S3 layer answers 503.

    @ivar content_hash: The content's SHA-256, hex.
    @ivar stripe: The stripe that could not be rebuilt.
    """

    def __init__(self, content_hash: str, stripe: int, usable: int, needed: int) -> None:
        """
        @param content_hash: The content's SHA-256, hex.
        @param stripe: The stripe that could not be rebuilt.
        @param usable: Blocks of that stripe that could be read.
        @param needed: Blocks needed (C{k}).
        """
        super().__init__(
            f"Content {content_hash} is unavailable: only {usable} of the {needed} "
            f"blocks needed to rebuild stripe {stripe} could be read."
        )
        self.content_hash = content_hash
        self.stripe = stripe


class WriteQuorumLost(AnvilError):
    """
    Fewer shards than the write quorum could be stored: the write fails and
    nothing becomes visible. The S3 layer answers 503.
    """

    def __init__(self, stored: int, needed: int, reasons: Mapping[int, str]) -> None:
        detail = "; ".join(f"shard {i}: {r}" for i, r in sorted(reasons.items()))
        super().__init__(
            f"only {stored} shards could be stored, the write quorum is {needed}"
            + (f" ({detail})" if detail else "")
        )
        self.stored = stored
        self.needed = needed


class WriterClosed(AnvilError):
    """
    A L{ContentWriter} was used after it failed, was aborted, or finished.
    """


class _Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> Any: ...


class _Work(Generic[_T]):
    """
    The outcome of work running in a pool, which any number of coroutines
    can await without being able to cancel it.

    Cancelling a coroutine that awaits a pool Deferred directly would fail
    that Deferred while the thread keeps running, and the cleanup after the
    cancellation would then close files the thread is still writing. Waiters
    get their own Deferreds instead; the work's failure, if nobody waits for
    it, is kept here rather than logged as unhandled.
    """

    def __init__(self, d: Deferred[_T], on_done: Callable[[_Work[_T]], object] | None = None) -> None:
        """
        @param d: The work's Deferred (from a pool, or a coroutine's).
        @param on_done: Called with this object when the work ends, before
            any waiter resumes.
        """
        self.done = False
        self._result: _T | Failure | None = None
        self._waiters: list[Deferred[_T]] = []
        self._on_done = on_done
        d.addBoth(self._finished)

    def _finished(self, result: _T | Failure) -> None:
        self.done = True
        self._result = result
        if self._on_done is not None:
            self._on_done(self)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            self._fire(waiter)

    def _fire(self, waiter: Deferred[_T]) -> None:
        if waiter.called:  # that waiter was cancelled
            return
        if isinstance(self._result, Failure):
            waiter.errback(self._result)
        else:
            waiter.callback(self._result)  # type: ignore[arg-type]

    def wait(self) -> Deferred[_T]:
        """
        @return: A Deferred firing with the work's result; cancelling it
            leaves the work running.
        """
        if self.done:
            if isinstance(self._result, Failure):
                return fail(self._result)
            return succeed(self._result)  # type: ignore[arg-type]
        waiter: Deferred[_T] = Deferred()
        self._waiters.append(waiter)
        return waiter

    async def settle(self) -> None:
        """
        Wait for the work to end, ignoring its outcome.
        """
        try:
            await self.wait()
        except BaseException:
            pass


class _Slot:
    """
    A reserved place in a L{_Sequence}.
    """

    def __init__(self, previous: Deferred[None]) -> None:
        self._previous = previous
        self.done: Deferred[None] = Deferred()
        self._used = False

    async def run(self, pool: CpuPool, fn: Callable[..., _T], *args: object) -> _T:
        """
        Run C{fn(*args)} in C{pool} once the previous slot's job is done.

        @return: C{fn}'s result.
        """
        self._used = True
        try:
            await self._previous
            return await pool.run(fn, *args)
        finally:
            self.done.callback(None)

    async def run_async(self, fn: Callable[..., Any], *args: object) -> Any:
        """
        Await C{fn(*args)} (a coroutine function) once the previous slot's
        job is done.
        """
        self._used = True
        try:
            await self._previous
            return await fn(*args)
        finally:
            self.done.callback(None)

    def skip(self) -> None:
        """
        Give up the slot: the next one runs after the previous one.
        """
        if not self._used:
            self._used = True
            self._previous.addBoth(lambda _: self.done.callback(None))


class _Sequence:
    """
    Jobs that must run one after another in the order their slots were
    reserved, whatever order they become ready in (stripe order).
    """

    def __init__(self) -> None:
        self._tail: Deferred[None] = succeed(None)

    def reserve(self) -> _Slot:
        """
        @return: The next slot; call its C{run} or C{skip} exactly once.
        """
        slot = _Slot(self._tail)
        self._tail = slot.done
        return slot


def _abort_writers(writers: list[ShardWriter]) -> int:
    """
    Remove the temporary files of writers (a no-op for committed ones).

    @return: How many writers were aborted.
    """
    count = 0
    for writer in writers:
        writer.abort()
        count += 1
    writers.clear()
    return count


def _write_local_blocks(
    targets: Sequence[tuple[int, ShardWriter]], blocks: Sequence[Block]
) -> list[tuple[int, str]]:
    """
    Append one stripe's blocks to local shard files (in the io pool).

    @return: The shard indices whose file failed, with the reason; the
        others are written.
    """
    failures = []
    for index, writer in targets:
        try:
            writer.write_block(blocks[index])
        except OSError as e:
            failures.append((index, f"{writer.path}: {e.strerror or e}"))
    return failures


def _finalize_writer(writers: list[ShardWriter], log: Logger) -> None:
    """
    Finalizer of a L{ContentWriter} dropped without commit or abort.
    """
    if writers:
        count = _abort_writers(writers)
        log.warn(
            "A content writer was dropped without commit or abort; removed its "
            "{count} temporary shard files",
            count=count,
        )


class StorageEngine:
    """
    Writes and reads erasure-coded contents on this node's shard store.

    @ivar params: Erasure geometry of new contents (contents keep the
        geometry they were written with).
    @ivar shards: The local shard store.
    @ivar placement: Chooses and interprets shard maps.
    @ivar inline_threshold: Contents of at most this many bytes are
        returned inline instead of being written to shards.
    """

    _log = Logger()

    def __init__(
        self,
        params: ErasureParams,
        shards: LocalShardStore,
        cpu: CpuPool,
        io: CpuPool,
        inline_threshold: int,
        on_corrupt: CorruptionReporter | None = None,
        *,
        placement: Placement | None = None,
        max_stripes_in_flight: int = MAX_STRIPES_IN_FLIGHT,
        peers: Any = None,
        directory: PeerDirectory | None = None,
        write_quorum: int = 0,
    ) -> None:
        """
        @param params: Erasure geometry of new contents.
        @param shards: The local shard store.
        @param cpu: Pool for hashing and zfec.
        @param io: Pool for blocking file I/O (a separate pool, so disk waits
            do not hold up coding).
        @param inline_threshold: Largest content (bytes) kept inline.
        @param on_corrupt: Called on the reactor thread with (content hash
            hex, shard index, stripe) for each unusable shard or block found
            while reading.
        @param placement: Shard placement; defaults to
            C{LocalPlacement("local", shards)}. The node passes a
            L{LocalPlacement} with its own node id, which is recorded in
            shard maps.
        @param max_stripes_in_flight: Bound on each writer's pipeline.
        @param peers: An L{anvil.cluster.peers.PeerClient} for shards
            placed on other nodes (L{None}: every shard is local).
        @param directory: Finds the cluster address of a node id.
        @param write_quorum: Shards that must be stored for a write to
            succeed; C{0} means C{k + 1} (at most C{k + m}).
        """
        if inline_threshold < 0:
            raise ValueError(f"inline_threshold must not be negative, not {inline_threshold}")
        if max_stripes_in_flight < 1:
            raise ValueError("max_stripes_in_flight must be at least 1")
        self.params = params
        self.shards = shards
        self.placement: Placement = placement if placement is not None else LocalPlacement("local", shards)
        self.inline_threshold = inline_threshold
        self.max_stripes_in_flight = max_stripes_in_flight
        self._cpu = cpu
        self._io = io
        self._on_corrupt = on_corrupt
        self._codecs: dict[ErasureParams, ErasureCodec] = {}
        self.peers = peers
        self.directory = directory
        self._write_quorum = write_quorum

    def quorum(self, params: ErasureParams) -> int:
        """
        @param params: A content's geometry.
        @return: How many of its shards a write must store.
        """
        if self._write_quorum:
            return min(self._write_quorum, params.total)
        return min(params.k + 1, params.total)

    def address(self, node_id: str) -> str | None:
        """
        @param node_id: A node holding shards.
        @return: Its cluster address when it can be asked now, else L{None}.
        """
        if self.peers is None or self.directory is None:
            return None
        return self.directory.address(node_id)

    def codec(self, params: ErasureParams) -> ErasureCodec:
        """
        @param params: A geometry.
        @return: A (shared, thread-safe) codec for it.
        """
        codec = self._codecs.get(params)
        if codec is None:
            codec = self._codecs[params] = ErasureCodec(params)
        return codec

    def new_writer(self, extra_hashers: Sequence[_Hasher] = ()) -> ContentWriter:
        """
        Start writing a new content.

        @param extra_hashers: Objects with C{update(bytes)} (checksums the
            request asks for) that must see the content's bytes, in order;
            they are updated in the CPU pool, one stripe at a time.
        @return: The writer.
        """
        return ContentWriter(self, extra_hashers)

    def read(self, content: ContentRecord, start: int = 0, stop: int | None = None) -> ContentReader:
        """
        Read C{content[start:stop]}.

        @param content: The content's record.
        @param start: First byte (inclusive).
        @param stop: End of the range (exclusive); the content's size when
            L{None}.
        @return: An async iterator of non-empty C{bytes}; close it with
            C{aclose()} when stopping early.
        @raise ValueError: The range is outside the content.
        """
        if stop is None:
            stop = content.size
        if not 0 <= start <= stop <= content.size:
            raise ValueError(f"range {start}:{stop} outside a content of {content.size} bytes")
        return ContentReader(self, content, start, stop)

    async def delete_content(self, content_hash: str, shard_map: Mapping[str, object] | None = None) -> int:
        """
        Remove every shard file of a content, here and on the other nodes
        its shard map names (for the garbage collector, once nothing
        references it).

        A node that cannot be reached keeps its files; they are orphans the
        collector of that node finds by listing its shards.

        @param content_hash: SHA-256 hex of the content.
        @param shard_map: The content's recorded shard map.
        @return: Number of files removed.
        """
        digest = bytes.fromhex(content_hash)
        if len(digest) != 32:
            raise ValueError(f"not a SHA-256 hex digest: {content_hash!r}")
        removed = await _Work(self._io.run(self._delete_files, digest)).wait()
        nodes = ShardMap.from_json(shard_map).nodes() if shard_map else set()
        for node in sorted(nodes - {self.placement.node_id}):
            address = self.address(node)
            if address is None:
                self._log.info(
                    "content {content_hash}: node {node} unreachable, its shards stay as orphans",
                    content_hash=content_hash, node=node,
                )
                continue
            try:
                removed += await self.peers.delete_content(address, digest)
            except Exception as e:
                self._log.warn(
                    "content {content_hash}: deleting shards on {node} failed: {error}",
                    content_hash=content_hash, node=node, error=str(e),
                )
        return removed

    def _delete_files(self, digest: bytes) -> int:
        # The shard count of a content is not needed: its files are the
        # entries named <hash>.<index> in one leaf directory per data dir.
        prefix = digest.hex() + "."
        removed = 0
        for data_dir in self.shards.data_dirs:
            leaf = os.path.dirname(self.shards.shard_path(data_dir, digest, 0))
            try:
                names = os.listdir(leaf)
            except FileNotFoundError:
                continue
            for name in names:
                if name.startswith(prefix) and name[len(prefix) :].isdigit():
                    try:
                        os.unlink(os.path.join(leaf, name))
                    except FileNotFoundError:
                        continue
                    removed += 1
        return removed

    async def rebuild(self, content: ContentRecord, targets: Mapping[int, str]) -> dict[int, ShardTarget]:
        """
        Re-create some shards of a content from its readable ones (repair,
        rebalance): the content is read through the normal, degraded read
        path, each stripe re-encoded, and the wanted blocks streamed to a
        new shard file here or on the peer, which is committed under the
        content hash (replacing a file of that shard index there, if any).

        Whole stripes are re-encoded rather than the missing blocks decoded
        alone: zfec's encoder is the only way to get parity blocks, and for
        a data block it costs no more than a decode.

        @param content: The content (not inline).
        @param targets: Shard index to the id of the node that gets it.
        @return: The targets committed; one that failed (its node
            unreachable, a disk or transfer error) is left out and logged.
        @raise ContentUnavailable: Fewer than C{k} shards can be read.
        """
        if content.inline_data is not None:
            raise ValueError("an inline content has no shards")
        params = ErasureParams(content.k, content.m, content.stripe_size)
        codec = self.codec(params)
        digest = bytes.fromhex(content.hash)
        key = secrets.token_bytes(16)
        sinks: dict[int, Any] = {}
        failed: dict[int, str] = {}
        for index, node in sorted(targets.items()):
            if node == self.placement.node_id:
                sinks[index] = await _Work(self._io.run(self.shards.open_writer, index, params, digest)).wait()
                continue
            address = self.address(node)
            if address is None:
                failed[index] = f"node {node} is not reachable"
            else:
                sinks[index] = self.peers.open_upload(address, key, index, params)
        try:
            pending = bytearray()
            stripe_size = params.stripe_size
            async for chunk in self.read(content):
                pending += chunk
                while len(pending) >= stripe_size:
                    await self._rebuild_stripe(codec, bytes(pending[:stripe_size]), sinks, failed)
                    del pending[:stripe_size]
            if pending:
                await self._rebuild_stripe(codec, bytes(pending), sinks, failed)
            done: dict[int, ShardTarget] = {}
            for index, sink in list(sinks.items()):
                try:
                    if isinstance(sink, ShardWriter):
                        location = await _Work(
                            self._io.run(self.shards.commit, sink, digest, content.size)
                        ).wait()
                        done[index] = ShardTarget(index, self.placement.node_id, location.data_dir)
                    else:
                        await sink.finish()
                        await sink.commit(digest, content.size)
                        done[index] = ShardTarget(index, targets[index], sink.data_dir or "")
                except Exception as e:
                    failed[index] = f"{type(e).__name__}: {e}"
                del sinks[index]
        finally:
            for sink in sinks.values():
                if isinstance(sink, ShardWriter):
                    await _Work(self._io.run(sink.abort)).settle()
                else:
                    await sink.abort()
        for index, reason in sorted(failed.items()):
            self._log.warn(
                "rebuilding shard {index} of {content_hash} failed: {reason}",
                index=index, content_hash=content.hash, reason=reason,
            )
        return done

    async def _rebuild_stripe(
        self, codec: ErasureCodec, data: bytes, sinks: dict[int, Any], failed: dict[int, str]
    ) -> None:
        """
        Encode one stripe and hand the wanted blocks to their sinks; a sink
        that fails is dropped (and aborted).
        """
        blocks = await _Work(self._cpu.run(codec.encode_stripe, data)).wait()
        for index, sink in list(sinks.items()):
            try:
                if isinstance(sink, ShardWriter):
                    await _Work(self._io.run(sink.write_block, blocks[index])).wait()
                else:
                    await sink.write_block(bytes(blocks[index]))
            except Exception as e:
                failed[index] = f"{type(e).__name__}: {e}"
                del sinks[index]
                if isinstance(sink, ShardWriter):
                    await _Work(self._io.run(sink.abort)).settle()
                else:
                    await sink.abort()

    async def clean_temporary(self, older_than: float) -> int:
        """
        Remove temporary shard files left by crashes or lost writers.

        The node calls this once at start with C{older_than=0} (no writer
        exists yet); the garbage collector calls it periodically with an age
        well above any upload's duration.

        @param older_than: Minimum age in seconds of the files removed.
        @return: Number of files removed.
        """
        return await _Work(self._io.run(self.shards.clean_temporary, older_than)).wait()

    def _report(self, content_hash: str, shard_index: int, stripe: int, reason: str) -> None:
        """
        Log an unusable shard or block and tell C{on_corrupt}.
        """
        self._log.warn(
            "content {content_hash} shard {shard_index} unusable at stripe {stripe}: {reason}",
            content_hash=content_hash,
            shard_index=shard_index,
            stripe=stripe,
            reason=reason,
        )
        if self._on_corrupt is not None:
            try:
                self._on_corrupt(content_hash, shard_index, stripe)
            except Exception:
                # Reporting must never break the read that found the damage.
                self._log.failure("on_corrupt failed for content {content_hash}", content_hash=content_hash)


class ContentWriter:
    """
    Streams one content into temporary shard files (see the module
    docstring for the protocol).

    Calls must not overlap: await each C{write} before the next and before
    C{finish}. C{abort} may be called at any time, also while a C{write} is
    waiting.

    @ivar size: Bytes written so far.
    @ivar md5_digest: MD5 of the content once finished, else L{None}.
    @ivar record: The content's record once finished, else L{None}.
    """

    _log = Logger()

    def __init__(self, engine: StorageEngine, extra_hashers: Sequence[_Hasher]) -> None:
        """
        @param engine: The engine (use L{StorageEngine.new_writer}).
        @param extra_hashers: Further hashers to update with the bytes.
        """
        self._engine = engine
        self._params = params = engine.params
        self._codec = engine.codec(params)
        self._cpu = engine._cpu
        self._io = engine._io
        self._md5 = hashlib.md5()
        self._sha256 = hashlib.sha256()
        self._hashers: tuple[_Hasher, ...] = (self._md5, self._sha256, *extra_hashers)
        # Random, so the shards of concurrent uploads spread independently;
        # the content hash is only known at the end. From the random module,
        # not the system: it places shards, it protects nothing, and most
        # writers (inline contents) never use it.
        self._key = random.getrandbits(128).to_bytes(16, "big")
        self.size = 0
        self.md5_digest: bytes | None = None
        self.record: ContentRecord | None = None
        self._digest: bytes | None = None
        self._buffer: bytearray | None = None
        self._filled = 0
        # Stripes received but not dispatched, while the content may still
        # turn out to be inline: (buffer, length).
        self._held: list[tuple[bytearray, int]] = []
        self._free: list[bytearray] = []
        self._in_flight: deque[_Work[None]] = deque()
        self._work: set[_Work[Any]] = set()
        # Local shard writers (also seen by the finalizer), and every target
        # still in the write by shard index: a ShardWriter here, a peer's
        # ShardUpload there. A target that fails moves to _lost; the write
        # goes on while the quorum can still be met.
        self._writers: list[ShardWriter] = []
        self._targets: dict[int, Any] = {}
        self._lost: dict[int, str] = {}
        self._quorum = engine.quorum(params)
        self._opened = False
        self._shard_map: ShardMap | None = None
        self._hash_order = _Sequence()
        self._write_order = _Sequence()
        self._error: BaseException | None = None
        self._busy = False
        self._state = "open"
        self._aborting: _Work[None] | None = None
        # The class's logger: an instance's (self._log) would refer to the
        # writer and keep it alive for ever.
        self._finalizer = weakref.finalize(self, _finalize_writer, self._writers, ContentWriter._log)

    # -- properties ----------------------------------------------------------

    @property
    def md5_hex(self) -> str | None:
        """
        @return: MD5 hex of the content (the S3 ETag) once finished.
        """
        return None if self.md5_digest is None else self.md5_digest.hex()

    @property
    def state(self) -> str:
        """
        @return: C{"open"}, C{"finished"}, C{"committed"}, C{"failed"} or
            C{"aborted"}.
        """
        return self._state

    # -- the pipeline ----------------------------------------------------------

    def _track(self, d: Deferred[_T]) -> _Work[_T]:
        """
        Remember pool work of this writer until it ends, so C{abort} can wait
        for it before removing files.
        """
        work: _Work[_T] = _Work(d, on_done=self._work.discard)
        if not work.done:
            self._work.add(work)
        return work

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
            if self._state in ("open", "finished"):
                self._state = "failed"

    def _check(self) -> None:
        if isinstance(self._error, WriteQuorumLost):
            raise self._error
        if self._error is not None:
            raise WriterClosed(f"content writer is {self._state}: {self._error!r}") from self._error

    def _begin(self, expected: str) -> None:
        self._check()
        if self._state != expected:
            raise WriterClosed(f"content writer is {self._state}, not {expected}")
        if self._busy:
            raise RuntimeError("content writer calls must not overlap")
        self._busy = True

    def _take_buffer(self) -> bytearray:
        if self._free:
            return self._free.pop()
        if self.size == 0:
            # The first buffer starts empty and grows as bytes arrive (slice
            # assignment at its end appends): most contents are small, and
            # zero-filling a whole stripe for each of them costs more than
            # the rest of a small PUT's buffering.
            return bytearray()
        return bytearray(self._params.stripe_size)

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        """
        Add bytes to the content.

        @param data: The next bytes, any length; not referenced after the
            call returns.
        @raise WriterClosed: The writer failed, was aborted or finished.
        """
        self._begin("open")
        try:
            view = memoryview(data)
            if view.ndim != 1 or view.itemsize != 1:
                view = view.cast("B")
            stripe_size = self._params.stripe_size
            position, total = 0, len(view)
            while position < total:
                if self._buffer is None:
                    self._buffer, self._filled = self._take_buffer(), 0
                count = min(total - position, stripe_size - self._filled)
                self._buffer[self._filled : self._filled + count] = view[position : position + count]
                self._filled += count
                position += count
                self.size += count
                if self._filled == stripe_size:
                    self._held.append((self._buffer, stripe_size))
                    self._buffer = None
                    await self._drain()
            if self._held and self.size > self._engine.inline_threshold:
                await self._drain()
        except BaseException as e:
            self._fail(e)
            raise
        finally:
            self._busy = False

    async def _drain(self) -> None:
        """
        Dispatch the held stripes once the content is known not to be inline,
        waiting whenever the pipeline is full.
        """
        if self.size <= self._engine.inline_threshold:
            return
        if not self._opened:
            self._opened = True
            try:
                self._shard_map = self._engine.placement.choose(self._key, self._params.total)
            except NoPlacement as e:
                raise WriteQuorumLost(0, self._quorum, {}) from e
            await self._open_targets(self._shard_map)
            self._check()
        while self._held:
            buffer, length = self._held.pop(0)
            self._dispatch(buffer, length)
            while len(self._in_flight) >= self._engine.max_stripes_in_flight:
                await self._in_flight[0].wait()
                while self._in_flight and self._in_flight[0].done:
                    self._in_flight.popleft()
                self._check()

    async def _open_targets(self, shard_map: ShardMap) -> None:
        """
        Open a temporary shard file for each local target and start a
        streamed upload to each remote one.
        """
        placement = self._engine.placement
        local = [t for t in shard_map.targets if placement.is_local(t)]
        if local:
            await self._track(self._io.run(self._open_writers, local)).wait()
        for target in shard_map.targets:
            if placement.is_local(target):
                continue
            address = self._engine.address(target.node)
            if address is None:
                self._lose(target.index, f"node {target.node} is not reachable")
                continue
            self._targets[target.index] = self._engine.peers.open_upload(
                address, self._key, target.index, self._params
            )
        self._check_quorum()

    def _lose(self, index: int, reason: str) -> None:
        """
        Give up one target: the write goes on without it (while the quorum
        can still be met) and its partial shard is dropped.
        """
        if index in self._lost:
            return
        self._lost[index] = reason
        self._log.warn(
            "shard {index} of an upload dropped: {reason}", index=index, reason=reason
        )
        target = self._targets.pop(index, None)
        if isinstance(target, ShardWriter):
            self._writers.remove(target)
            self._track(self._io.run(target.abort))
        elif target is not None:
            self._track(Deferred.fromCoroutine(target.abort()))

    def _check_quorum(self) -> None:
        stored = self._params.total - len(self._lost)
        if stored < self._quorum:
            raise WriteQuorumLost(stored, self._quorum, self._lost)

    def _open_writers(self, targets: Sequence[ShardTarget]) -> None:
        # In the io pool. The writers are published one by one in the list
        # the finalizer and abort() see, so none can leak.
        store = self._engine.shards
        for target in targets:
            writer = store.open_writer(target.index, self._params, self._key)
            self._writers.append(writer)
            self._targets[target.index] = writer
            actual = os.path.dirname(os.path.dirname(writer.path))
            if actual != target.dir:
                raise RuntimeError(
                    f"shard {target.index} was opened in {actual}, placement chose {target.dir}"
                )

    def _dispatch(self, buffer: bytearray, length: int) -> None:
        work = self._track(Deferred.fromCoroutine(self._run_stripe(buffer, length)))
        if not work.done:
            self._in_flight.append(work)

    async def _run_stripe(self, buffer: bytearray, length: int) -> None:
        """
        Hash, encode and write one stripe; never raises (failures are kept
        in C{_error} and raised by the next call).
        """
        view = memoryview(buffer)[:length]
        hashing = Deferred.fromCoroutine(
            self._hash_order.reserve().run(self._cpu, self._update_hashes, view)
        )
        slot = self._write_order.reserve()
        try:
            if self._error is not None:
                slot.skip()
            else:
                try:
                    blocks = await self._cpu.run(self._codec.encode_stripe, view)
                except BaseException:
                    slot.skip()
                    raise
                await slot.run_async(self._send_blocks, blocks)
                # The data blocks are views of the buffer: drop them before
                # the buffer is reused.
                del blocks
        except BaseException as e:
            self._fail(e)
        try:
            await hashing
        except BaseException as e:
            self._fail(e)
        full = len(buffer) == self._params.stripe_size  # not a short first one
        if full and len(self._free) <= self._engine.max_stripes_in_flight:
            self._free.append(buffer)

    def _update_hashes(self, data: Block) -> None:
        # In the CPU pool (or on the reactor for a small inline content);
        # hashlib releases the GIL for large buffers.
        for hasher in self._hashers:
            hasher.update(data)

    async def _send_blocks(self, blocks: Sequence[Block]) -> None:
        """
        Hand one stripe's blocks to their targets (one stripe at a time,
        the write sequence): local ones in one io-pool job, remote ones to
        their uploads, which return once the peer's connection takes more.
        """
        if self._error is not None:
            return
        local = [(i, t) for i, t in self._targets.items() if isinstance(t, ShardWriter)]
        waits: list[tuple[int, Deferred[Any]]] = []
        if local:
            waits.append((-1, self._io.run(_write_local_blocks, local, blocks)))
        for index, target in list(self._targets.items()):
            if not isinstance(target, ShardWriter):
                # A copy: the data blocks are views of a buffer that is
                # reused once this stripe is done, and a transport may
                # hold on to what it was given.
                waits.append((index, Deferred.fromCoroutine(target.write_block(bytes(blocks[index])))))
        for index, d in waits:
            try:
                failures = await d
            except Exception as e:
                self._lose(index, f"{type(e).__name__}: {e}")
            else:
                for failed, reason in failures or ():
                    self._lose(failed, reason)
        self._check_quorum()

    async def _end_uploads(self) -> None:
        """
        End every remote upload's body and wait until each peer holds its
        whole shard (not yet committed).
        """
        remote = [(i, t) for i, t in self._targets.items() if not isinstance(t, ShardWriter)]
        ends = [(i, Deferred.fromCoroutine(t.finish())) for i, t in remote]
        for index, d in ends:
            try:
                await d
            except Exception as e:
                self._lose(index, f"{type(e).__name__}: {e}")
        self._check_quorum()

    async def _settle_stripes(self) -> None:
        while self._in_flight:
            await self._in_flight.popleft().wait()

    # -- ending ----------------------------------------------------------------

    async def finish(self) -> ContentRecord:
        """
        End the content: flush the last stripe, wait for the pipeline and
        compute the hashes. Nothing is visible until L{commit}.

        @return: The content's record (hash hex, size, geometry, shard map,
            or the bytes themselves for an inline content).
        @raise WriterClosed: The writer failed or was aborted (the cause is
            chained).
        """
        self._begin("open")
        try:
            params = self._params
            if self._buffer is not None and self._filled:
                self._held.append((self._buffer, self._filled))
                self._buffer = None
            inline: bytes | None = None
            if self.size > self._engine.inline_threshold:
                await self._drain()
                await self._settle_stripes()
                self._check()
                await self._end_uploads()
                self._check()
                assert self._shard_map is not None
                shard_map = ShardMap(
                    tuple(
                        ShardTarget(t.index, "", "") if t.index in self._lost else t
                        for t in self._shard_map.targets
                    ),
                    self._shard_map.key,
                )
            else:
                inline = b"".join(memoryview(buffer)[:length] for buffer, length in self._held)
                self._held.clear()
                if len(inline) <= _HASH_ON_REACTOR_MAX:
                    # Nothing was dispatched before: no earlier hashing to
                    # wait for.
                    self._update_hashes(inline)
                else:
                    await self._track(
                        Deferred.fromCoroutine(
                            self._hash_order.reserve().run(self._cpu, self._update_hashes, inline)
                        )
                    ).wait()
                shard_map = ShardMap(())
            self._check()
            self.md5_digest = self._md5.digest()
            self._digest = self._sha256.digest()
            self.record = ContentRecord(
                hash=self._digest.hex(),
                size=self.size,
                k=params.k,
                m=params.m,
                stripe_size=params.stripe_size,
                shard_map=shard_map.to_json(),
                inline_data=inline,
            )
            self._state = "finished"
            self._free.clear()
            return self.record
        except BaseException as e:
            self._fail(e)
            raise
        finally:
            self._busy = False

    async def commit(self, dedup: bool = False) -> None:
        """
        Make the content's shards durable under its hash: finish each file
        (header, fsync), rename it into place and fsync each directory once.

        An inline content has no files: nothing to do. With C{dedup=True}
        the content is already stored (the metadata says so), and the
        temporary files are removed instead.

        After C{commit} started, C{abort} no longer undoes renamed shards:
        if recording the content then fails, they are orphans for the
        garbage collector.

        @param dedup: Whether the content already exists.
        @raise WriterClosed: Not finished, or failed, or aborted.
        """
        self._begin("finished")
        try:
            remote = [(i, t) for i, t in self._targets.items() if not isinstance(t, ShardWriter)]
            if dedup:
                if self._writers:
                    await self._track(self._io.run(_abort_writers, self._writers)).wait()
                await DeferredList([Deferred.fromCoroutine(t.abort()) for _, t in remote])
            elif self._writers or remote:
                await self._commit_targets(remote)
            self._targets.clear()
            self._check()
            self._state = "committed"
            self._finalizer.detach()
        except BaseException as e:
            self._fail(e)
            raise
        finally:
            self._busy = False

    async def _commit_targets(self, remote: list[tuple[int, Any]]) -> None:
        """
        Commit every target (local files in one io job, peers' shards in
        parallel); fail unless the quorum committed. Shards committed by a
        write that then fails are orphans for the garbage collector.
        """
        digest = self._digest
        assert digest is not None
        local = list(self._writers)
        jobs: list[tuple[list[int], Deferred[Any]]] = []
        if local:
            jobs.append(
                ([w.shard_index for w in local],
                 self._track(self._io.run(self._engine.shards.commit_all, local, digest, self.size)).wait())
            )
        for index, target in remote:
            jobs.append(([index], Deferred.fromCoroutine(target.commit(digest, self.size))))
        committed = 0
        failed: dict[int, str] = dict(self._lost)
        for indices, d in jobs:
            try:
                await d
            except Exception as e:
                for index in indices:
                    failed[index] = f"commit failed: {type(e).__name__}: {e}"
            else:
                committed += len(indices)
        self._writers.clear()
        if committed < self._quorum:
            raise WriteQuorumLost(committed, self._quorum, failed)
        if len(failed) > len(self._lost):
            self._log.warn(
                "content {content_hash} committed with {committed} shards: {failed}",
                content_hash=digest.hex(), committed=committed, failed=failed,
            )

    async def abort(self) -> None:
        """
        Drop the content: wait for this writer's pool jobs, then remove its
        temporary files. Safe to call at any time and more than once; a
        no-op after L{commit}. Cancelling the caller does not stop the
        cleanup.
        """
        if self._state == "committed":
            return
        if self._aborting is None:
            self._fail(WriterClosed("content writer was aborted"))
            self._state = "aborted"
            self._aborting = _Work(Deferred.fromCoroutine(self._abort()))
        await self._aborting.wait()

    async def _abort(self) -> None:
        # Jobs may start others (a stripe's write after its encode), so look
        # again until none is left.
        while True:
            pending = [work for work in self._work if not work.done]
            if not pending:
                break
            for work in pending:
                await work.settle()
        try:
            await _Work(self._io.run(_abort_writers, self._writers)).wait()
        except PoolStopped:
            # The node is shutting down: remove the files here rather than
            # leave them to the next start's sweep.
            _abort_writers(self._writers)
        remote = [t for t in self._targets.values() if not isinstance(t, ShardWriter)]
        self._targets.clear()
        await DeferredList([Deferred.fromCoroutine(t.abort()) for t in remote])
        self._finalizer.detach()
        self._held.clear()
        self._free.clear()
        self._buffer = None


@dataclass
class _Problem:
    """
    An unusable shard or block met by a read (reported on the reactor).

    @ivar drop: Do not use the shard again for this read (missing,
        unreadable, unreachable); otherwise only that block is bad and the
        shard becomes a last resort.
    @ivar report: The shard itself is damaged or missing (count it and
        queue a repair), as opposed to its node being unreachable.
    """

    shard_index: int
    stripe: int
    reason: str
    drop: bool = True
    report: bool = True


@dataclass
class _Fetched:
    """
    The blocks of one stripe read in the io pool.

    @ivar direct: The blocks are the data blocks the range needs, all good:
        no decoding.
    """

    stripe: int
    lo: int
    hi: int
    stripe_len: int
    blocks: dict[int, bytes]
    direct: bool
    problems: list[_Problem] = field(default_factory=list)


def _close_readers(readers: dict[int, ShardReader]) -> None:
    for reader in readers.values():
        reader.close()
    readers.clear()


def _slice_parts(parts: Iterable[Block], lo: int, hi: int) -> list[bytes]:
    """
    @return: C{b"".join(parts)[lo:hi]} as a list of pieces, without joining.
    """
    out: list[bytes] = []
    offset = 0
    for part in parts:
        size = memoryview(part).nbytes
        a, b = max(lo - offset, 0), min(hi - offset, size)
        if a < b:
            if a == 0 and b == size and isinstance(part, bytes):
                out.append(part)
            else:
                out.append(bytes(memoryview(part)[a:b]))
        offset += size
        if offset >= hi:
            break
    return out


class ContentReader:
    """
    An async iterator over the bytes of a range of one content (see the
    module docstring). Chunks are non-empty C{bytes}, at most one block each.
    """

    def __init__(self, engine: StorageEngine, content: ContentRecord, start: int, stop: int) -> None:
        """
        @param engine: The engine (use L{StorageEngine.read}).
        @param content: The content.
        @param start: First byte.
        @param stop: End of the range (exclusive), C{start <= stop <= size}.
        """
        self._engine = engine
        self._content = content
        self._hash = content.hash
        self._start, self._stop = start, stop
        self._chunks: deque[bytes] = deque()
        self._readers: dict[int, ShardReader] = {}
        self._sources: dict[int, RemoteShardSource] = {}
        self._fetching: _Work[_Fetched] | None = None
        self._closing: _Work[None] | None = None
        self._closed = False
        self._finalizer = weakref.finalize(self, _close_readers, self._readers)
        if content.inline_data is not None or start == stop:
            data = content.inline_data or b""
            if start < stop:
                self._chunks.append(bytes(data[start:stop]))
            self._slices: deque[Any] = deque()
            return
        self._params = ErasureParams(content.k, content.m, content.stripe_size)
        self._codec = engine.codec(self._params)
        self._digest = bytes.fromhex(content.hash)
        self._map = ShardMap.from_json(content.shard_map)
        self._slices = deque(stripe_slices(start, stop - 1, self._params.stripe_size))
        self._last_stripe = self._slices[-1].stripe_index if self._slices else 0
        # Shards to read from, best first: data shards (no decoding), then
        # parity held here, then parity on peers. A shard with a bad block
        # moves to the end, a missing or unreachable one is removed.
        k = self._params.k
        self._order = sorted(
            (
                i for i in range(self._params.total)
                if (target := self._map.target(i)) is None or not target.missing
            ),
            key=lambda i: (i >= k, not self._is_local(i), i),
        )

    def __aiter__(self) -> ContentReader:
        return self

    async def __anext__(self) -> bytes:
        """
        @return: The next chunk of the range.
        @raise StopAsyncIteration: The range has been returned in full (the
            shard files are then closed).
        @raise ContentUnavailable: A stripe cannot be rebuilt.
        """
        try:
            while not self._chunks:
                if self._closed:
                    raise StopAsyncIteration
                if self._fetching is None:
                    if not self._slices:
                        self._close_soon()
                        raise StopAsyncIteration
                    self._fetching = self._start_fetch()
                fetched = await self._fetching.wait()
                self._fetching = None
                # Read ahead: the next stripe's blocks come off disk while this
                # one is decoded and sent.
                if self._slices and not self._closed:
                    self._fetching = self._start_fetch()
                for problem in fetched.problems:
                    if problem.report:
                        self._engine._report(self._hash, problem.shard_index, problem.stripe, problem.reason)
                    else:
                        self._engine._log.info(
                            "content {content_hash} shard {shard_index} unavailable: {reason}",
                            content_hash=self._hash, shard_index=problem.shard_index,
                            reason=problem.reason,
                        )
                chunks = await self._assemble(fetched)
                if self._closed:
                    raise StopAsyncIteration
                self._chunks.extend(chunks)
            return self._chunks.popleft()
        except StopAsyncIteration:
            raise
        except BaseException:
            self._close_soon()
            raise

    def _start_fetch(self) -> _Work[_Fetched]:
        piece = self._slices.popleft()
        length = self._params.stripe_length(piece.stripe_index, self._content.size)
        return _Work(
            Deferred.fromCoroutine(
                self._fetch(piece.stripe_index, piece.lo, min(piece.hi, length), length)
            )
        )

    async def _assemble(self, fetched: _Fetched) -> list[bytes]:
        """
        Turn a stripe's blocks into the chunks of the range it covers.
        """
        k = self._params.k
        if fetched.direct:
            return [
                fetched.blocks[s.block_index][s.lo : s.hi]
                if (s.lo, s.hi) != (0, len(fetched.blocks[s.block_index]))
                else fetched.blocks[s.block_index]
                for s in data_block_slices(fetched.stripe_len, k, fetched.lo, fetched.hi)
            ]
        if len(fetched.blocks) < k:
            raise ContentUnavailable(self._hash, fetched.stripe, len(fetched.blocks), k)
        blocks = dict(fetched.blocks)
        if all(i in blocks for i in range(k)):
            parts = self._codec.decode_stripe_parts(blocks, fetched.stripe_len)
        else:
            parts = await _Work(
                self._engine._cpu.run(self._codec.decode_stripe_parts, blocks, fetched.stripe_len)
            ).wait()
        return _slice_parts(parts, fetched.lo, fetched.hi)

    # -- fetching ----------------------------------------------------------------

    def _is_local(self, index: int) -> bool:
        target = self._map.target(index)
        return target is None or self._engine.placement.is_local(target)

    async def _fetch(self, stripe: int, lo: int, hi: int, stripe_len: int) -> _Fetched:
        """
        Get the blocks a stripe slice needs: the data blocks covering it if
        they are preferred and good, else C{k} blocks in preference order
        (asking for as many at once as are still missing).
        """
        k = self._params.k
        problems: list[_Problem] = []
        blocks: dict[int, bytes] = {}
        needed = [s.block_index for s in data_block_slices(stripe_len, k, lo, hi)]
        preferred = self._order[:k]
        if all(i in preferred for i in needed):
            blocks.update(await self._read_blocks(needed, stripe, problems))
            if len(blocks) == len(needed):
                return _Fetched(stripe, lo, hi, stripe_len, blocks, True, problems)
        while len(blocks) < k:
            tried = {p.shard_index for p in problems}
            candidates = [i for i in self._order if i not in blocks and i not in tried]
            if not candidates:
                break
            blocks.update(await self._read_blocks(candidates[: k - len(blocks)], stripe, problems))
        return _Fetched(stripe, lo, hi, stripe_len, blocks, False, problems)

    async def _read_blocks(self, indices: Sequence[int], stripe: int, problems: list[_Problem]) -> dict[int, bytes]:
        """
        Read one stripe's block of each of C{indices} at once: local ones in
        one io-pool job, remote ones from their peers.

        @return: The blocks read; the failures are added to C{problems} and
            applied to the preference order.
        """
        local = [i for i in indices if self._is_local(i)]
        waits: list[tuple[int, Deferred[Any]]] = []
        if local:
            waits.append((-1, self._engine._io.run(self._read_local, local, stripe)))
        for index in indices:
            if index not in local:
                waits.append((index, Deferred.fromCoroutine(self._read_remote(index, stripe))))
        got: dict[int, bytes] = {}
        new: list[_Problem] = []
        for index, d in waits:
            if index == -1:
                blocks, failed = await d
                got.update(blocks)
                new.extend(failed)
                continue
            try:
                got[index] = await d
            except ShardUnavailable as e:
                new.append(_Problem(index, stripe, str(e), drop=not e.corrupt or e.stripe == stripe, report=e.corrupt))
        for problem in new:
            if problem.drop:
                self._drop(problem.shard_index)
            elif problem.shard_index in self._order:
                # One bad block: the rest of the shard may be good. Use the
                # others for the rest of the read, this one as a last resort.
                self._order.remove(problem.shard_index)
                self._order.append(problem.shard_index)
        problems.extend(new)
        return got

    async def _read_remote(self, index: int, stripe: int) -> bytes:
        source = self._sources.get(index)
        if source is None:
            target = self._map.target(index)
            assert target is not None
            address = self._engine.address(target.node)
            if address is None:
                raise ShardUnavailable(f"node {target.node} is not reachable", stripe, False)
            source = self._sources[index] = RemoteShardSource(
                self._engine.peers, address, self._digest, index, self._params,
                self._content.size, self._last_stripe,
            )
        return await source.block(stripe)

    def _read_local(self, indices: Sequence[int], stripe: int) -> tuple[dict[int, bytes], list[_Problem]]:
        # In the io pool. Only this job touches the local readers while it
        # runs (one fetch at a time); the preference order is changed on the
        # reactor from what it returns.
        blocks: dict[int, bytes] = {}
        problems: list[_Problem] = []
        for index in indices:
            try:
                reader = self._readers.get(index)
                if reader is None:
                    reader = self._readers[index] = self._open(index)
                blocks[index] = reader.read_block(stripe)
            except CorruptShard as e:
                problems.append(_Problem(index, stripe, str(e), drop=e.stripe_index is None))
            except (ShardNotFound, OSError) as e:
                problems.append(_Problem(index, stripe, str(e)))
        return blocks, problems

    def _drop(self, index: int) -> None:
        if index in self._order:
            self._order.remove(index)
        reader = self._readers.pop(index, None)
        if reader is not None:
            reader.close()
        source = self._sources.pop(index, None)
        if source is not None:
            source.close()

    def _open(self, index: int) -> ShardReader:
        """
        Open shard C{index} where the shard map says, else wherever the
        local store finds it, and check it belongs to this content.
        """
        store = self._engine.shards
        target = self._map.target(index)
        reader: ShardReader | None = None
        if target is not None:
            if target.dir in store.data_dirs:
                try:
                    reader = ShardReader(store.shard_path(target.dir, self._digest, index))
                except FileNotFoundError:
                    reader = None
        if reader is None:
            # Not where recorded (a directory renamed or moved): search.
            reader = store.open_reader(self._digest, index)
        header = reader.header
        p = self._params
        if (
            header.content_hash != self._digest
            or header.shard_index != index
            or header.params != p
            or header.content_length != self._content.size
        ):
            reader.close()
            raise BadShardHeader(reader.path, "header does not match the content record")
        return reader

    # -- closing -------------------------------------------------------------------

    def _close_soon(self) -> None:
        if self._closing is None:
            self._closed = True
            self._chunks.clear()
            self._slices.clear()
            self._closing = _Work(Deferred.fromCoroutine(self._close()))

    async def _close(self) -> None:
        # A read-ahead may still be using the files: let it end first.
        if self._fetching is not None:
            await self._fetching.settle()
            self._fetching = None
        _close_readers(self._readers)
        for source in self._sources.values():
            source.close()
        self._sources.clear()
        self._finalizer.detach()

    async def aclose(self) -> None:
        """
        Stop reading and close the shard files (once a read in progress in
        the io pool has ended). Safe to call more than once.
        """
        self._close_soon()
        assert self._closing is not None
        await self._closing.wait()

    @property
    def closed(self) -> bool:
        """
        @return: Whether the reader is closed (its files closed or closing).
        """
        return self._closed
