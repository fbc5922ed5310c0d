# -*- test-case-name: tests.test_engine -*-
"""
Tests for L{anvil.storage.engine}: real files in temporary directories, real
zfec, and either inline pools (L{CpuPool.synchronous}), pools stepped by hand
(to check ordering, backpressure and cancellation), or real thread pools.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import os
import shutil
import zlib
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anvil.errors import AnvilError
from anvil.storage.cpu import CpuPool
from anvil.storage.engine import (
    ContentReader,
    ContentUnavailable,
    ContentWriter,
    StorageEngine,
    WriteQuorumLost,
    WriterClosed,
)
from anvil.storage.erasure import ErasureParams
from anvil.storage.placement import LocalPlacement, ShardMap
from anvil.storage.shardfile import HEADER_SIZE, TRAILER_SIZE, ShardReader, ShardWriter
from anvil.storage.shardstore import LocalShardStore

_T = TypeVar("_T")

K, M = 4, 2
STRIPE = 4096 * K
TOTAL = K + M

#: One MiB of random bytes, sliced to make test contents.
_RANDOM = os.urandom(1 << 20)


def _content(size: int, seed: int = 0) -> bytes:
    """
    C{size} pseudo-random bytes; different seeds give different contents.
    """
    out = bytearray()
    while len(out) < size:
        out += hashlib.sha256(b"%d/%d" % (seed, len(out))).digest() + _RANDOM[: min(size, 65536)]
    return bytes(out[:size])


class StepPool:
    """
    A pool whose jobs run only when the test says so, in any order: the
    functions are the engine's real ones, only the scheduling is manual.
    """

    def __init__(self) -> None:
        self.queue: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = []

    def run(self, fn: Callable[..., _T], *args: Any) -> Deferred[_T]:
        """
        Queue C{fn(*args)}.
        """
        d: Deferred[_T] = Deferred()
        self.queue.append((fn, args, d))
        return d

    def names(self) -> list[str]:
        """
        @return: The names of the queued functions, in queue order.
        """
        return [fn.__name__ for fn, _, _ in self.queue]

    def run_job(self, position: int = 0) -> None:
        """
        Run one queued job and fire its Deferred.
        """
        fn, args, d = self.queue.pop(position)
        try:
            result = fn(*args)
        except BaseException as e:
            d.errback(e)
        else:
            d.callback(result)

    def run_named(self, name: str) -> None:
        """
        Run the first queued job whose function has this name.
        """
        self.run_job(self.names().index(name))


def _drain(*pools: StepPool) -> None:
    """
    Run queued jobs of the pools until all are empty.
    """
    while any(p.queue for p in pools):
        for pool in pools:
            while pool.queue:
                pool.run_job()


class CountingPool(CpuPool):
    """
    An inline pool that records the names of the functions it ran.
    """

    def __init__(self) -> None:
        super().__init__(None, max_threads=0, name="counting")
        self.calls: list[str] = []

    def run(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> Deferred[_T]:  # type: ignore[override]
        """
        Record the call, then run it inline.
        """
        self.calls.append(getattr(fn, "__name__", repr(fn)))
        return super().run(fn, *args, **kwargs)


def _files(store: LocalShardStore, kind: str) -> list[str]:
    """
    All files under C{<dir>/<kind>} of every data directory.
    """
    found = []
    for data_dir in store.data_dirs:
        for root, _, names in os.walk(os.path.join(data_dir, kind)):
            found.extend(os.path.join(root, n) for n in names)
    return sorted(found)


def _flip(path: str, offset: int) -> None:
    """
    Change the byte at C{offset} of a file.
    """
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))


class EngineMixin:
    """
    Builds engines over fresh directories and writes and reads contents
    with inline pools.
    """

    reports: list[tuple[str, int, int]]

    def make_engine(
        self,
        dirs: int = 3,
        k: int = K,
        m: int = M,
        stripe_size: int = STRIPE,
        inline_threshold: int = 0,
        cpu: Any = None,
        io: Any = None,
        store: LocalShardStore | None = None,
        node_id: str = "node-1",
    ) -> StorageEngine:
        """
        An engine over a store of C{dirs} new directories (or C{store}),
        whose corruption reports go to C{self.reports}.
        """
        if store is None:
            base = self.mktemp()  # type: ignore[attr-defined]
            store = LocalShardStore([os.path.join(base, f"disk{i}") for i in range(dirs)])
        self.reports = []
        return StorageEngine(
            ErasureParams(k, m, stripe_size),
            store,
            cpu if cpu is not None else CpuPool.synchronous(),
            io if io is not None else CpuPool.synchronous(),
            inline_threshold,
            on_corrupt=lambda *report: self.reports.append(report),
            placement=LocalPlacement(node_id, store),
        )

    def sync(self, coro: Coroutine[Any, Any, _T]) -> _T:
        """
        Run a coroutine that completes without the reactor (inline pools).
        """
        return self.successResultOf(Deferred.fromCoroutine(coro))  # type: ignore[attr-defined,no-any-return]

    def put(
        self,
        engine: StorageEngine,
        data: bytes,
        piece: int = 5000,
        extra: Sequence[Any] = (),
        commit: bool = True,
    ) -> Any:
        """
        Write C{data} in pieces of C{piece} bytes, finish and commit.

        @return: The content record.
        """

        async def go() -> Any:
            writer = engine.new_writer(extra)
            for offset in range(0, len(data), piece):
                await writer.write(data[offset : offset + piece])
            record = await writer.finish()
            if commit:
                await writer.commit()
            return record

        return self.sync(go())

    def get(self, engine: StorageEngine, record: Any, start: int = 0, stop: int | None = None) -> bytes:
        """
        Read a range back through L{StorageEngine.read}.
        """

        async def go() -> bytes:
            return b"".join([chunk async for chunk in engine.read(record, start, stop)])

        return self.sync(go())

    def shard_file(self, engine: StorageEngine, record: Any, index: int) -> str:
        """
        @return: The committed file of shard C{index}, where the map says.
        """
        target = ShardMap.from_json(record.shard_map).target(index)
        assert target is not None
        return engine.shards.shard_path(target.dir, bytes.fromhex(record.hash), index)


class WriterTests(EngineMixin, SynchronousTestCase):
    """
    Tests for L{ContentWriter} with inline pools.
    """

    def test_round_trip_sizes(self) -> None:
        """
        Contents of 0, 1, stripe-1, stripe, stripe+1 and several stripes
        bytes, over 1, 3 and 6 directories, read back exactly, with the
        right SHA-256, MD5, size and geometry.
        """
        for dirs in (1, 3, 6):
            engine = self.make_engine(dirs=dirs)
            for size in (0, 1, STRIPE - 1, STRIPE, STRIPE + 1, 3 * STRIPE + 17, 5 * STRIPE):
                data = _content(size, seed=dirs)
                record, writer = self.sync(self._write(engine, data))
                self.assertEqual(record.hash, hashlib.sha256(data).hexdigest())
                self.assertEqual(writer.md5_hex, hashlib.md5(data).hexdigest())
                self.assertEqual(writer.md5_digest, hashlib.md5(data).digest())
                self.assertEqual(writer.state, "committed")
                self.assertEqual((record.size, record.k, record.m, record.stripe_size), (size, K, M, STRIPE))
                self.assertEqual(self.get(engine, record), data, (dirs, size))
                if size == 0:
                    self.assertEqual(record.inline_data, b"")
                    self.assertEqual(record.shard_map["shards"], [])
                else:
                    self.assertIsNone(record.inline_data)
                    self.assertEqual(len(record.shard_map["shards"]), TOTAL)
            self.assertEqual(_files(engine.shards, "tmp"), [])
            # Six contents with shards, each in k+m files.
            self.assertEqual(len(_files(engine.shards, "shards")), 6 * TOTAL)
            self.assertEqual(self.reports, [])

    async def _write(self, engine: StorageEngine, data: bytes) -> tuple[Any, ContentWriter]:
        """
        Write C{data} in 7001-byte pieces, finish and commit.

        @return: The record and the writer.
        """
        writer = engine.new_writer()
        for offset in range(0, len(data), 7001):
            await writer.write(data[offset : offset + 7001])
        record = await writer.finish()
        await writer.commit()
        return record, writer

    def test_shard_map_names_the_files(self) -> None:
        """
        Every entry of the recorded shard map names this node and the
        directory holding that shard's committed file; with enough
        directories the shards are on distinct ones.
        """
        engine = self.make_engine(dirs=6)
        record = self.put(engine, _content(2 * STRIPE))
        shard_map = ShardMap.from_json(record.shard_map)
        self.assertEqual({t.node for t in shard_map.targets}, {"node-1"})
        self.assertEqual(len({t.dir for t in shard_map.targets}), TOTAL)
        for target in shard_map.targets:
            path = self.shard_file(engine, record, target.index)
            with ShardReader(path) as reader:
                self.assertEqual(reader.header.shard_index, target.index)
                self.assertEqual(reader.header.content_length, 2 * STRIPE)

    def test_write_sizes_do_not_matter(self) -> None:
        """
        The same bytes written in pieces of any size (one byte, odd sizes,
        more than a stripe at once, empty pieces) give the same content.
        """
        engine = self.make_engine()
        data = _content(3 * STRIPE + 5)
        expected = hashlib.sha256(data).hexdigest()
        for piece in (1 + STRIPE // 3, 4096, STRIPE, 2 * STRIPE + 3, len(data)):
            self.assertEqual(self.put(engine, data, piece=piece).hash, expected)

        async def with_empty() -> Any:
            writer = engine.new_writer()
            await writer.write(b"")
            await writer.write(data)
            await writer.write(memoryview(b""))
            return await writer.finish()

        self.assertEqual(self.sync(with_empty()).hash, expected)

    def test_extra_hashers_see_bytes_in_order(self) -> None:
        """
        Extra hashers get every byte once, in order, in stripe-sized
        updates.
        """

        class Recorder:
            def __init__(self) -> None:
                self.pieces: list[bytes] = []

            def update(self, data: bytes | memoryview) -> None:
                self.pieces.append(bytes(data))

        engine = self.make_engine()
        data = _content(4 * STRIPE + 100)
        recorder, sha1 = Recorder(), hashlib.sha1()
        self.put(engine, data, piece=3000, extra=[recorder, sha1])
        self.assertEqual(b"".join(recorder.pieces), data)
        self.assertEqual([len(p) for p in recorder.pieces], [STRIPE] * 4 + [100])
        self.assertEqual(sha1.digest(), hashlib.sha1(data).digest())

    def test_inline_contents(self) -> None:
        """
        A content of at most C{inline_threshold} bytes is returned inline,
        creates no file at all, and reads back (also by range); one byte
        more is stored in shards. This holds for thresholds below and above
        the stripe size.
        """
        for threshold in (1000, STRIPE, 3 * STRIPE + 10):
            engine = self.make_engine(inline_threshold=threshold)
            data = _content(threshold, seed=threshold)
            record = self.put(engine, data, piece=999)
            self.assertEqual(record.inline_data, data)
            self.assertEqual(record.hash, hashlib.sha256(data).hexdigest())
            self.assertEqual(record.shard_map, {"version": 1, "shards": []})
            self.assertEqual(_files(engine.shards, "tmp") + _files(engine.shards, "shards"), [])
            self.assertEqual(self.get(engine, record), data)
            self.assertEqual(self.get(engine, record, 10, 20), data[10:20])
            bigger = _content(threshold + 1, seed=threshold)
            record = self.put(engine, bigger, piece=999)
            self.assertIsNone(record.inline_data)
            self.assertEqual(len(_files(engine.shards, "shards")), TOTAL)
            self.assertEqual(self.get(engine, record), bigger)

    def test_extra_hashers_inline(self) -> None:
        """
        Extra hashers see the bytes of an inline content too.
        """
        engine = self.make_engine(inline_threshold=1 << 16)
        crc = hashlib.sha1()
        data = _content(5000)
        self.put(engine, data, piece=700, extra=[crc])
        self.assertEqual(crc.digest(), hashlib.sha1(data).digest())

    def test_abort_leaves_no_files(self) -> None:
        """
        Aborting before or after C{finish} removes every temporary file.
        """
        engine = self.make_engine(dirs=2)
        for finishing in (False, True):

            async def go(finish: bool = finishing) -> None:
                writer = engine.new_writer()
                await writer.write(_content(3 * STRIPE + 1))
                self.assertEqual(len(_files(engine.shards, "tmp")), TOTAL)
                if finish:
                    await writer.finish()
                await writer.abort()
                await writer.abort()
                self.assertEqual(writer.state, "aborted")
                with self.assertRaises(WriterClosed):
                    await writer.write(b"x")

            self.sync(go())
            self.assertEqual(_files(engine.shards, "tmp") + _files(engine.shards, "shards"), [])

    def test_abort_after_failure(self) -> None:
        """
        Disk errors on more shards than the write quorum allows make the
        next call raise L{WriteQuorumLost} (the cause of each named), and
        C{abort} still removes every temporary file.
        """
        engine = self.make_engine()
        original = ShardWriter.write_block

        def failing(writer: ShardWriter, block: Any) -> None:
            if writer.shard_index in (0, 4) and os.path.getsize(writer.path) > HEADER_SIZE:
                raise OSError(28, "No space left on device")
            original(writer, block)

        self.patch(ShardWriter, "write_block", failing)

        async def go() -> None:
            writer = engine.new_writer()
            await writer.write(_content(2 * STRIPE))
            with self.assertRaises(WriteQuorumLost) as raised:
                await writer.write(_content(STRIPE))
                await writer.finish()
            self.assertIn("No space left on device", str(raised.exception))
            self.assertEqual(raised.exception.needed, K + 1)
            self.assertEqual(writer.state, "failed")
            await writer.abort()

        self.sync(go())
        self.assertEqual(_files(engine.shards, "tmp") + _files(engine.shards, "shards"), [])

    def test_one_failed_disk_within_quorum(self) -> None:
        """
        A disk error on one shard drops that shard only: the write succeeds
        with the others, the shard map records the shard as missing, and
        the content reads back exactly from the rest.
        """
        engine = self.make_engine()
        original = ShardWriter.write_block

        def failing(writer: ShardWriter, block: Any) -> None:
            if writer.shard_index == 1:
                raise OSError(5, "Input/output error")
            original(writer, block)

        self.patch(ShardWriter, "write_block", failing)
        data = _content(3 * STRIPE + 5)

        async def go() -> Any:
            writer = engine.new_writer()
            await writer.write(data)
            record = await writer.finish()
            await writer.commit()
            return record

        record = self.sync(go())
        shard_map = ShardMap.from_json(record.shard_map)
        self.assertTrue(shard_map.targets[1].missing)
        self.assertEqual([t.missing for t in shard_map.targets].count(True), 1)
        self.assertEqual(len(_files(engine.shards, "shards")), TOTAL - 1)
        self.assertEqual(_files(engine.shards, "tmp"), [])
        self.assertEqual(self.get(engine, record), data)

    def test_dedup_commit_leaves_no_temporaries(self) -> None:
        """
        C{commit(dedup=True)} removes the writer's temporary files and keeps
        the already committed shards of the same content readable.
        """
        engine = self.make_engine()
        data = _content(2 * STRIPE + 3)
        first = self.put(engine, data)
        committed = _files(engine.shards, "shards")

        async def again() -> Any:
            writer = engine.new_writer()
            await writer.write(data)
            record = await writer.finish()
            self.assertEqual(len(_files(engine.shards, "tmp")), TOTAL)
            await writer.commit(dedup=True)
            self.assertEqual(writer.state, "committed")
            await writer.abort()  # a no-op once committed
            return record

        second = self.sync(again())
        self.assertEqual(second.hash, first.hash)
        self.assertEqual(_files(engine.shards, "tmp"), [])
        self.assertEqual(_files(engine.shards, "shards"), committed)
        self.assertEqual(self.get(engine, first), data)

    def test_commit_needs_finish(self) -> None:
        """
        C{commit} before C{finish}, and C{write} or C{finish} after it,
        raise L{WriterClosed}.
        """
        engine = self.make_engine()

        async def go() -> None:
            writer = engine.new_writer()
            await writer.write(b"abc")
            with self.assertRaises(WriterClosed):
                await writer.commit()
            await writer.finish()
            with self.assertRaises(WriterClosed):
                await writer.write(b"more")
            with self.assertRaises(WriterClosed):
                await writer.finish()
            await writer.commit()
            with self.assertRaises(WriterClosed):
                await writer.commit()

        self.sync(go())
        self.assertTrue(issubclass(WriterClosed, AnvilError))

    def test_abort_after_pools_stopped(self) -> None:
        """
        When the io pool has stopped (the node is shutting down), C{abort}
        removes the files itself.
        """
        io = CpuPool.synchronous()
        engine = self.make_engine(io=io)

        async def go() -> None:
            writer = engine.new_writer()
            await writer.write(_content(2 * STRIPE))
            await io.stopService()
            await writer.abort()

        self.sync(go())
        self.assertEqual(_files(engine.shards, "tmp"), [])

    def test_dropped_writer_removes_its_files(self) -> None:
        """
        A writer dropped without commit or abort removes its temporary files
        when it is garbage-collected, and says so in the log.
        """
        engine = self.make_engine()
        writers = [engine.new_writer()]

        async def go() -> None:
            await writers[0].write(_content(2 * STRIPE))

        with capturedLogs() as events:
            self.sync(go())
            self.assertEqual(len(_files(engine.shards, "tmp")), TOTAL)
            del writers[:]
            gc.collect()
        self.assertEqual(_files(engine.shards, "tmp"), [])
        self.assertTrue(any("dropped without commit" in e["log_format"] for e in events))

    def test_clean_temporary(self) -> None:
        """
        L{StorageEngine.clean_temporary} removes files a crash left in the
        temporary directories.
        """
        engine = self.make_engine(dirs=2)
        for data_dir in engine.shards.data_dirs:
            with open(os.path.join(data_dir, "tmp", "abc.0.tmp"), "wb") as f:
                f.write(b"left by a crash")
        self.assertEqual(self.sync(engine.clean_temporary(0)), 2)
        self.assertEqual(_files(engine.shards, "tmp"), [])

    def test_delete_content(self) -> None:
        """
        L{StorageEngine.delete_content} removes every shard file of one
        content and no other.
        """
        engine = self.make_engine(dirs=3)
        doomed = self.put(engine, _content(STRIPE + 1, seed=1))
        kept = self.put(engine, _content(STRIPE + 1, seed=2))
        self.assertEqual(self.sync(engine.delete_content(doomed.hash)), TOTAL)
        self.assertEqual(self.sync(engine.delete_content(doomed.hash)), 0)
        self.assertEqual(len(_files(engine.shards, "shards")), TOTAL)
        self.assertEqual(self.get(engine, kept), _content(STRIPE + 1, seed=2))
        self.failureResultOf(Deferred.fromCoroutine(engine.delete_content("abcd")), ValueError)


class PipelineTests(EngineMixin, SynchronousTestCase):
    """
    Ordering, backpressure and cancellation of the writer's pipeline, with
    pools whose jobs the test runs one by one.
    """

    def setUp(self) -> None:
        """
        An engine over pools stepped by hand.
        """
        self.cpu, self.io = StepPool(), StepPool()
        self.engine = self.make_engine(cpu=self.cpu, io=self.io)

    def test_backpressure(self) -> None:
        """
        C{write} returns while fewer than two stripes are in the pipeline
        and waits once two are; the stripe being filled is the third.
        """
        writer = self.engine.new_writer()
        first = ensureDeferred(writer.write(_content(STRIPE, 1)))
        # The shard files are opened (in the io pool) before the first stripe.
        self.assertEqual(self.io.names(), ["_open_writers"])
        self.assertNoResult(first)
        self.io.run_job()
        self.successResultOf(first)
        self.assertEqual(sorted(self.cpu.names()), ["_update_hashes", "encode_stripe"])
        second = ensureDeferred(writer.write(_content(STRIPE, 2)))
        self.assertNoResult(second)
        _drain(self.cpu, self.io)
        self.successResultOf(second)
        self._abort(writer)

    def test_hashes_in_order(self) -> None:
        """
        A stripe's hash job is submitted only once the previous stripe's has
        run, so the hashers see the bytes in order whatever the pool does;
        encoding of the next stripe does not wait.
        """
        writer = self.engine.new_writer()
        ensureDeferred(writer.write(_content(STRIPE, 1)))
        self.io.run_job()
        ensureDeferred(writer.write(_content(STRIPE, 2)))
        self.assertEqual(self.cpu.names(), ["_update_hashes", "encode_stripe", "encode_stripe"])
        self.cpu.run_job(0)
        self.assertEqual(self.cpu.names(), ["encode_stripe", "encode_stripe", "_update_hashes"])
        self.successResultOf(ensureDeferred(self._finish_all(writer)))

    def test_writes_in_order(self) -> None:
        """
        When stripe 1 is encoded before stripe 0, its blocks are still
        written after stripe 0's, and the content reads back exactly.
        """
        data = _content(2 * STRIPE + 9)
        writer = self.engine.new_writer()
        ensureDeferred(writer.write(data[:STRIPE]))
        self.io.run_job()
        ensureDeferred(writer.write(data[STRIPE:]))
        encodes = [i for i, name in enumerate(self.cpu.names()) if name == "encode_stripe"]
        self.cpu.run_job(encodes[1])  # stripe 1 first
        self.assertEqual(self.io.names(), [])
        self.cpu.run_named("encode_stripe")  # then stripe 0
        self.assertEqual(self.io.names(), ["_write_local_blocks"])
        record = self.successResultOf(ensureDeferred(self._finish_all(writer)))
        commit = ensureDeferred(writer.commit())
        _drain(self.cpu, self.io)
        self.successResultOf(commit)
        engine = self.make_engine(store=self.engine.shards)
        self.assertEqual(self.get(engine, record), data)

    async def _finish_all(self, writer: ContentWriter) -> Any:
        """
        Let the pipeline run dry, then finish the writer.
        """
        _drain(self.cpu, self.io)
        finishing = ensureDeferred(writer.finish())
        _drain(self.cpu, self.io)
        return await finishing

    def _abort(self, writer: ContentWriter) -> None:
        """
        Abort the writer, running its cleanup job, and check no file is left.
        """
        aborting = ensureDeferred(writer.abort())
        _drain(self.cpu, self.io)
        self.successResultOf(aborting)
        self.assertEqual(_files(self.engine.shards, "tmp"), [])

    def test_cancel_write_then_abort(self) -> None:
        """
        Cancelling a waiting C{write} fails it with L{CancelledError} and the
        writer; C{abort} then waits for the jobs still in the pools (which
        still use the files) before it removes every temporary file.
        """
        writer = self.engine.new_writer()
        ensureDeferred(writer.write(_content(STRIPE)))
        self.io.run_job()
        second = ensureDeferred(writer.write(_content(STRIPE)))
        self.assertNoResult(second)
        second.cancel()
        self.failureResultOf(second, CancelledError)
        self.assertEqual(writer.state, "failed")
        aborting = ensureDeferred(writer.abort())
        self.assertNoResult(aborting)
        self.assertEqual(len(_files(self.engine.shards, "tmp")), TOTAL)
        _drain(self.cpu, self.io)
        self.successResultOf(aborting)
        self.assertEqual(_files(self.engine.shards, "tmp"), [])

    def test_cancel_abort(self) -> None:
        """
        Cancelling the caller of C{abort} does not stop the cleanup.
        """
        writer = self.engine.new_writer()
        ensureDeferred(writer.write(_content(STRIPE)))
        self.io.run_job()
        aborting = ensureDeferred(writer.abort())
        aborting.cancel()
        self.failureResultOf(aborting, CancelledError)
        _drain(self.cpu, self.io)
        self.assertEqual(_files(self.engine.shards, "tmp"), [])

    def test_cancel_while_opening(self) -> None:
        """
        A C{write} cancelled while the shard files are being opened leaves
        nothing behind after C{abort}.
        """
        writer = self.engine.new_writer()
        first = ensureDeferred(writer.write(_content(STRIPE)))
        first.cancel()
        self.failureResultOf(first, CancelledError)
        aborting = ensureDeferred(writer.abort())
        self.assertNoResult(aborting)
        _drain(self.cpu, self.io)
        self.successResultOf(aborting)
        self.assertEqual(_files(self.engine.shards, "tmp"), [])

    def test_overlapping_calls(self) -> None:
        """
        A second C{write} while one is waiting is a programming error.
        """
        writer = self.engine.new_writer()
        ensureDeferred(writer.write(_content(STRIPE)))
        self.failureResultOf(ensureDeferred(writer.write(b"x")), RuntimeError)
        _drain(self.cpu, self.io)
        self._abort(writer)


@st.composite
def _size_and_ranges(draw: st.DrawFn) -> tuple[int, list[tuple[int, int]]]:
    size = draw(
        st.one_of(
            st.sampled_from([1, STRIPE - 1, STRIPE, STRIPE + 1, 4 * STRIPE]),
            st.integers(1, 5 * STRIPE + 100),
        )
    )
    bound = st.integers(0, size)
    ranges = draw(st.lists(st.tuples(bound, bound).map(sorted), min_size=1, max_size=6))
    return size, [(a, b) for a, b in ranges]


class ReaderTests(EngineMixin, SynchronousTestCase):
    """
    Tests for L{ContentReader} with inline pools.
    """

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(_size_and_ranges())
    def test_ranges(self, case: tuple[int, list[tuple[int, int]]]) -> None:
        """
        Every range read equals the slice of the content.
        """
        size, ranges = case
        engine = self.make_engine(dirs=2)
        data = _content(size, seed=size)
        record = self.put(engine, data, piece=STRIPE // 3 + 1)
        for start, stop in ranges:
            self.assertEqual(self.get(engine, record, start, stop), data[start:stop])

    def test_bad_ranges(self) -> None:
        """
        Ranges outside the content are refused; an empty range yields
        nothing.
        """
        engine = self.make_engine()
        record = self.put(engine, _content(100))
        for start, stop in [(-1, 5), (5, 4), (0, 101), (101, 101)]:
            self.assertRaises(ValueError, engine.read, record, start, stop)
        self.assertEqual(self.get(engine, record, 100, 100), b"")
        self.assertEqual(self.get(engine, record, 0, 0), b"")

    def test_pulls_only_needed_blocks(self) -> None:
        """
        A range inside one block reads that one block of one stripe; a
        range across a stripe boundary reads only the two blocks around it.
        No decoding happens (the CPU pool is never used).
        """
        cpu = CountingPool()
        engine = self.make_engine(cpu=cpu)
        data = _content(4 * STRIPE)
        record = self.put(engine, data)
        cpu.calls.clear()
        reads: list[tuple[int, int]] = []
        original = ShardReader.read_block

        def counting(reader: ShardReader, stripe: int) -> bytes:
            reads.append((reader.header.shard_index, stripe))
            return original(reader, stripe)

        self.patch(ShardReader, "read_block", counting)
        block = STRIPE // K
        start = 2 * STRIPE + 2 * block + 10
        self.assertEqual(self.get(engine, record, start, start + 100), data[start : start + 100])
        self.assertEqual(reads, [(2, 2)])
        reads.clear()
        start = 2 * STRIPE - 5
        self.assertEqual(self.get(engine, record, start, start + 10), data[start : start + 10])
        self.assertEqual(reads, [(K - 1, 1), (0, 2)])
        self.assertEqual(cpu.calls, [])

    def test_one_corrupt_shard(self) -> None:
        """
        Flipping any byte of any one shard file (header, block, checksum,
        first or last stripe) still reads the content exactly; a damaged
        data shard is reported with its index and the stripe read when the
        damage was found, and logged.
        """
        engine = self.make_engine(dirs=3)
        data = _content(3 * STRIPE + 1000)
        record = self.put(engine, data)
        block = STRIPE // K
        offsets = [0, 13, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + block - 1, HEADER_SIZE + block]
        offsets += [HEADER_SIZE + block + TRAILER_SIZE + 7]  # stripe 1
        for index in range(TOTAL):
            path = self.shard_file(engine, record, index)
            with open(path, "rb") as f:
                pristine = f.read()
            for offset in offsets + [len(pristine) - 1]:
                self.reports.clear()
                _flip(path, offset)
                try:
                    with capturedLogs() as events:
                        self.assertEqual(self.get(engine, record), data, (index, offset))
                finally:
                    with open(path, "wb") as f:
                        f.write(pristine)
                if index >= K:
                    # Parity is not read while the data shards are good.
                    self.assertEqual(self.reports, [])
                    continue
                if offset < HEADER_SIZE:
                    stripe = 0
                else:
                    stripe = min((offset - HEADER_SIZE) // (block + TRAILER_SIZE), 3)
                self.assertEqual(self.reports, [(record.hash, index, stripe)], (index, offset))
                warnings = [e for e in events if e["log_level"] == LogLevel.warn]
                self.assertEqual(len(warnings), 1)
                self.assertEqual(
                    (warnings[0]["content_hash"], warnings[0]["shard_index"], warnings[0]["stripe"]),
                    (record.hash, index, stripe),
                )

    @settings(
        max_examples=80,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        st.lists(st.integers(0, TOTAL - 1), min_size=1, max_size=M, unique=True),
        st.lists(st.integers(0, 10**9), min_size=M, max_size=M),
        st.integers(0, 3 * STRIPE),
    )
    def test_up_to_m_corrupt_shards(self, shards: list[int], where: list[int], start: int) -> None:
        """
        Any byte in each of any one or two shard files (m=2) flipped: any
        range still reads exactly, and every damaged data shard a full read
        needs is reported.
        """
        if not hasattr(self, "_corrupt_case"):
            engine = self.make_engine(dirs=2)
            data = _content(3 * STRIPE + 77)
            self._corrupt_case = (engine, data, self.put(engine, data))
        engine, data, record = self._corrupt_case
        saved = []
        for index, position in zip(shards, where):
            path = self.shard_file(engine, record, index)
            with open(path, "rb") as f:
                pristine = f.read()
            saved.append((path, pristine))
            _flip(path, position % len(pristine))
        try:
            self.reports.clear()
            self.assertEqual(self.get(engine, record), data)
            reported = {shard for _, shard, _ in self.reports}
            self.assertTrue({s for s in shards if s < K} <= reported <= set(shards), self.reports)
            self.assertEqual(self.get(engine, record, start, len(data)), data[start:])
        finally:
            for path, pristine in saved:
                with open(path, "wb") as f:
                    f.write(pristine)

    def test_too_many_corrupt_shards(self) -> None:
        """
        Three damaged blocks in one stripe (m=2): the stripes before it are
        returned exactly, then L{ContentUnavailable} is raised before any
        byte of that stripe, and the files are closed.
        """
        engine = self.make_engine()
        data = _content(3 * STRIPE)
        record = self.put(engine, data)
        block = STRIPE // K
        for index in (0, 1, 4):
            _flip(self.shard_file(engine, record, index), HEADER_SIZE + (block + TRAILER_SIZE) + 3)
        received: list[bytes] = []
        reader = engine.read(record)

        async def go() -> None:
            async for chunk in reader:
                received.append(chunk)

        with capturedLogs():
            failure = self.failureResultOf(Deferred.fromCoroutine(go()), ContentUnavailable)
        self.assertEqual(b"".join(received), data[:STRIPE])
        self.assertEqual(failure.value.stripe, 1)
        self.assertIn(record.hash, str(failure.value))
        self.assertEqual(sorted(self.reports), [(record.hash, i, 1) for i in (0, 1, 4)])
        self.assertTrue(reader.closed)

    def test_missing_shards(self) -> None:
        """
        Up to m missing shard files are reported and read around; one more
        makes the content unavailable before anything is returned.
        """
        engine = self.make_engine()
        data = _content(2 * STRIPE + 5)
        record = self.put(engine, data)
        os.unlink(self.shard_file(engine, record, 1))
        os.unlink(self.shard_file(engine, record, 3))
        with capturedLogs():
            self.assertEqual(self.get(engine, record), data)
        self.assertEqual(sorted(self.reports), [(record.hash, 1, 0), (record.hash, 3, 0)])
        os.unlink(self.shard_file(engine, record, 5))
        received: list[bytes] = []

        async def go() -> None:
            async for chunk in engine.read(record, STRIPE, len(data)):
                received.append(chunk)

        with capturedLogs():
            self.failureResultOf(Deferred.fromCoroutine(go()), ContentUnavailable)
        self.assertEqual(received, [])

    def test_shard_of_another_content(self) -> None:
        """
        A shard file replaced by one of another content (its header names
        another hash) is not used, and is reported as damaged (a repair
        puts the right shard back).
        """
        engine = self.make_engine()
        data = _content(STRIPE + 5, seed=1)
        record = self.put(engine, data)
        other = self.put(engine, _content(STRIPE + 5, seed=2))
        shutil.copyfile(self.shard_file(engine, other, 0), self.shard_file(engine, record, 0))
        with capturedLogs():
            self.assertEqual(self.get(engine, record), data)
        self.assertEqual(self.reports, [(record.hash, 0, 0)])

    def test_shard_moved_to_another_dir(self) -> None:
        """
        A shard no longer in the directory its map names is found in
        another data directory, without a report.
        """
        engine = self.make_engine(dirs=3)
        data = _content(STRIPE + 5)
        record = self.put(engine, data)
        path = self.shard_file(engine, record, 2)
        target = ShardMap.from_json(record.shard_map).target(2)
        assert target is not None
        elsewhere = next(d for d in engine.shards.data_dirs if d != target.dir)
        moved = engine.shards.shard_path(elsewhere, bytes.fromhex(record.hash), 2)
        os.makedirs(os.path.dirname(moved), exist_ok=True)
        os.rename(path, moved)
        self.assertEqual(self.get(engine, record), data)
        self.assertEqual(self.reports, [])

    def test_shard_on_another_node(self) -> None:
        """
        Shards the map places on another node are unavailable to an engine
        without peers: the read uses parity, and does not report them as
        damaged (their node is unreachable, the shards may well be fine).
        """
        engine = self.make_engine()
        data = _content(STRIPE + 5)
        record = self.put(engine, data)
        stored = copy.deepcopy(record.shard_map)
        stored["shards"][0]["node"] = "node-2"
        record = dataclasses.replace(record, shard_map=stored)
        with capturedLogs():
            self.assertEqual(self.get(engine, record), data)
        self.assertEqual(self.reports, [])

    def test_decodes_with_parity(self) -> None:
        """
        With a data shard missing, stripes are rebuilt by zfec in the CPU
        pool.
        """
        cpu = CountingPool()
        engine = self.make_engine(cpu=cpu)
        data = _content(3 * STRIPE)
        record = self.put(engine, data)
        os.unlink(self.shard_file(engine, record, 0))
        cpu.calls.clear()
        with capturedLogs():
            self.assertEqual(self.get(engine, record), data)
        self.assertEqual(cpu.calls, ["decode_stripe_parts"] * 3)

    def test_other_geometry(self) -> None:
        """
        A content keeps the geometry it was written with: an engine
        configured for another one reads it.
        """
        old = self.make_engine(k=3, m=1, stripe_size=3 * 1000)
        data = _content(10000)
        record = self.put(old, data)
        new = self.make_engine(store=old.shards)
        self.assertEqual(self.get(new, record), data)

    def test_on_corrupt_failure(self) -> None:
        """
        An C{on_corrupt} callback that raises is logged and the read goes
        on.
        """
        engine = self.make_engine()
        data = _content(STRIPE)
        record = self.put(engine, data)
        os.unlink(self.shard_file(engine, record, 0))

        def broken(*report: object) -> None:
            raise RuntimeError("metrics are down")

        engine._on_corrupt = broken
        with capturedLogs() as events:
            self.assertEqual(self.get(engine, record), data)
        self.assertTrue(any(e.get("log_failure") is not None for e in events))
        self.flushLoggedErrors(RuntimeError)

    def test_files_closed(self) -> None:
        """
        Shard files stay open while the read goes on and are closed when it
        ends or when the iterator is closed early.
        """
        engine = self.make_engine()
        data = _content(4 * STRIPE)
        record = self.put(engine, data)
        fds = lambda: len(os.listdir("/proc/self/fd"))
        before = fds()
        reader = engine.read(record)
        self.assertIsInstance(reader, ContentReader)

        async def first_then_close() -> bytes:
            chunk = await reader.__anext__()
            self.assertEqual(fds(), before + K)
            await reader.aclose()
            await reader.aclose()
            return chunk

        self.assertEqual(self.sync(first_then_close()), data[: STRIPE // K])
        self.assertEqual(fds(), before)
        self.assertTrue(reader.closed)
        self.failureResultOf(ensureDeferred(reader.__anext__()), StopAsyncIteration)
        self.assertEqual(self.get(engine, record), data)
        self.assertEqual(fds(), before)

    def test_close_waits_for_read_ahead(self) -> None:
        """
        While the next stripe is being read ahead in the io pool, C{aclose}
        waits for that read before closing the files; the read-ahead is of
        one stripe only.
        """
        io = StepPool()
        engine = self.make_engine(io=io)
        data = _content(4 * STRIPE)
        writer_engine = self.make_engine(store=engine.shards)
        record = self.put(writer_engine, data)
        reader = engine.read(record)
        first = ensureDeferred(reader.__anext__())
        self.assertEqual(io.names(), ["_read_local"])
        io.run_job()
        self.assertEqual(self.successResultOf(first), data[: STRIPE // K])
        self.assertEqual(io.names(), ["_read_local"])  # stripe 1, read ahead
        closing = ensureDeferred(reader.aclose())
        self.assertNoResult(closing)
        self.assertTrue(all(r._fd is not None for r in reader._readers.values()))
        io.run_job()
        self.successResultOf(closing)
        self.assertEqual(reader._readers, {})
        self.assertEqual(io.names(), [])


class ThreadedTests(EngineMixin, TestCase):
    """
    The engine with real thread pools and the real reactor.
    """

    def setUp(self) -> None:
        """
        Start a CPU pool and an io pool of two threads each.
        """
        from twisted.internet import reactor

        self.cpu_pool = CpuPool(reactor, max_threads=2, name="test-cpu")  # type: ignore[arg-type]
        self.io_pool = CpuPool(reactor, max_threads=2, name="test-io")  # type: ignore[arg-type]
        for pool in (self.cpu_pool, self.io_pool):
            pool.startService()
            self.addCleanup(pool.stopService)

    def threaded_engine(self, dirs: int = 3, stripe_size: int = STRIPE) -> StorageEngine:
        """
        An engine using the real pools.
        """
        return self.make_engine(dirs=dirs, stripe_size=stripe_size, cpu=self.cpu_pool, io=self.io_pool)

    async def write(self, engine: StorageEngine, data: bytes, piece: int = 65536) -> Any:
        """
        Write, finish and commit C{data}.
        """
        writer = engine.new_writer([zlib_crc := _Crc()])
        view = memoryview(data)
        for offset in range(0, len(data), piece):
            await writer.write(view[offset : offset + piece])
        record = await writer.finish()
        await writer.commit()
        self.assertEqual(zlib_crc.value, zlib.crc32(data))
        self.assertEqual(writer.md5_digest, hashlib.md5(data).digest())
        return record

    async def read(self, engine: StorageEngine, record: Any, start: int = 0, stop: int | None = None) -> bytes:
        """
        Read a range.
        """
        return b"".join([chunk async for chunk in engine.read(record, start, stop)])

    def test_concurrent_round_trips(self) -> None:
        """
        Several uploads at once through the same pools each store and read
        back their own bytes.
        """
        engine = self.threaded_engine()
        contents = [_content(7 * STRIPE + i * 1001, seed=i) for i in range(4)]

        async def one(data: bytes) -> None:
            record = await self.write(engine, data, piece=10000)
            self.assertEqual(record.hash, hashlib.sha256(data).hexdigest())
            self.assertEqual(await self.read(engine, record), data)
            self.assertEqual(await self.read(engine, record, 5, STRIPE * 3), data[5 : STRIPE * 3])

        async def go() -> None:
            from twisted.internet.defer import gatherResults

            await gatherResults([Deferred.fromCoroutine(one(d)) for d in contents])
            self.assertEqual(_files(engine.shards, "tmp"), [])

        return Deferred.fromCoroutine(go())

    def test_corruption_with_threads(self) -> None:
        """
        A corrupt data block is read around with parity by the threaded
        pipeline.
        """
        engine = self.threaded_engine()
        data = _content(5 * STRIPE + 3)

        async def go() -> None:
            record = await self.write(engine, data)
            _flip(self.shard_file(engine, record, 1), HEADER_SIZE + 2 * (STRIPE // K + TRAILER_SIZE))
            with capturedLogs():
                self.assertEqual(await self.read(engine, record), data)
            self.assertEqual(self.reports, [(record.hash, 1, 2)])

        return Deferred.fromCoroutine(go())

    def test_abort_with_threads(self) -> None:
        """
        Aborting while stripes are in the pools removes every temporary
        file once the jobs end.
        """
        engine = self.threaded_engine()

        async def go() -> None:
            writer = engine.new_writer()
            for _ in range(8):
                await writer.write(_content(STRIPE))
            await writer.abort()
            self.assertEqual(_files(engine.shards, "tmp"), [])

        return Deferred.fromCoroutine(go())

    def test_memory_bounded(self) -> None:
        """
        Writing 256 MiB through a writer (1 MiB stripes, real pools) keeps
        the process's resident memory growth under 64 MiB, and reading it
        back does too.
        """
        engine = self.threaded_engine(dirs=2, stripe_size=1 << 20)
        source = memoryview(_RANDOM)
        size = 256 << 20
        piece = 65536
        peak = [0]

        def sample() -> None:
            peak[0] = max(peak[0], _rss())

        async def go() -> None:
            gc.collect()
            baseline = _rss()
            writer = engine.new_writer()
            written = 0
            while written < size:
                await writer.write(source[written % len(source) : written % len(source) + piece])
                written += piece
                if written % (8 << 20) == 0:
                    sample()
            record = await writer.finish()
            await writer.commit()
            sample()
            write_growth = peak[0] - baseline
            peak[0] = 0
            count = 0
            async for chunk in engine.read(record):
                count += len(chunk)
                if count % (8 << 20) < len(chunk):
                    sample()
            self.assertEqual(count, size)
            read_growth = peak[0] - baseline
            await engine.delete_content(record.hash)
            self.assertLess(write_growth, 64 << 20)
            self.assertLess(read_growth, 64 << 20)

        return Deferred.fromCoroutine(go())

    test_memory_bounded.timeout = 300  # type: ignore[attr-defined]


class _Crc:
    """
    A CRC-32 extra hasher (like the checksum verifiers of the S3 layer).
    """

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes | memoryview) -> None:
        self.value = zlib.crc32(data, self.value)


def _rss() -> int:
    """
    @return: This process's resident set size in bytes.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")

