# -*- test-case-name: tests.test_erasure -*-
"""
Tests for L{anvil.storage.erasure} and L{anvil.storage.cpu}.
"""

from __future__ import annotations

import itertools
import os
import threading

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anvil.storage.cpu import CpuPool, PoolStopped
from anvil.storage.erasure import (
    MAX_STRIPE_SIZE,
    ErasureCodec,
    ErasureParams,
    InvalidErasureParams,
    NotEnoughBlocks,
)

def _parse(text: str) -> int:
    return int(text)


_settings = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@st.composite
def _geometry_and_data(draw: st.DrawFn) -> tuple[ErasureParams, bytes]:
    k = draw(st.integers(1, 8))
    m = draw(st.integers(0, 4))
    stripe_size = k * draw(st.integers(1, 64))
    length = draw(
        st.one_of(st.sampled_from([0, 1, stripe_size - 1, stripe_size]), st.integers(0, stripe_size))
    )
    length = max(0, min(length, stripe_size))
    data = draw(st.binary(min_size=length, max_size=length))
    return ErasureParams(k, m, stripe_size), data


class ErasureParamsTests(SynchronousTestCase):
    """
    Tests for L{ErasureParams} validation and geometry.
    """

    def test_valid(self) -> None:
        """
        Sensible parameters are accepted and expose their derived sizes.
        """
        params = ErasureParams(4, 2, 1 << 20)
        self.assertEqual((params.total, params.block_size), (6, 1 << 18))
        self.assertEqual(params.stripe_count(0), 0)
        self.assertEqual(params.stripe_count((1 << 20) + 1), 2)
        self.assertEqual(params.stripe_length(1, (1 << 20) + 1), 1)
        self.assertEqual(params.block_length(5), 2)

    def test_extremes_allowed(self) -> None:
        """
        k=1 with m=0, and k+m=256, are valid zfec geometries.
        """
        ErasureParams(1, 0, 1)
        ErasureParams(200, 56, 200)
        ErasureParams(4, 2, MAX_STRIPE_SIZE)

    def test_invalid(self) -> None:
        """
        Out-of-range values raise L{InvalidErasureParams} naming the field.
        """
        cases = [
            ((0, 2, 4), "k"),
            ((4, -1, 4), "m"),
            ((200, 57, 200), "k + m"),
            ((4, 2, 0), "stripe_size"),
            ((4, 2, 6), "stripe_size"),
            ((4, 2, MAX_STRIPE_SIZE + 4), "stripe_size"),
            ((4.0, 2, 4), "k"),
            ((True, 2, 4), "k"),
        ]
        for args, field in cases:
            with self.assertRaises(InvalidErasureParams) as e:
                ErasureParams(*args)  # type: ignore[arg-type]
            self.assertIn(field, str(e.exception))

    def test_is_value_error(self) -> None:
        """
        Config validation can catch L{InvalidErasureParams} as a ValueError.
        """
        self.assertRaises(ValueError, ErasureParams, 0, 0, 1)


class ErasureCodecTests(SynchronousTestCase):
    """
    Tests for L{ErasureCodec}.
    """

    @_settings
    @given(_geometry_and_data())
    def test_round_trip_any_k(self, case: tuple[ErasureParams, bytes]) -> None:
        """
        Decoding from any k-subset of the k+m blocks returns the input.
        """
        params, data = case
        codec = ErasureCodec(params)
        blocks = codec.encode_stripe(data)
        self.assertEqual(len(blocks), params.total)
        self.assertEqual({len(b) for b in blocks}, {params.block_length(len(data))})
        subsets = list(itertools.combinations(range(params.total), params.k))
        # Many subsets for k=4, m=4; a bounded sample keeps the test fast
        # while covering all-data, all-parity-heavy and mixed choices.
        if len(subsets) > 40:
            subsets = subsets[:20] + subsets[-20:]
        for ids in subsets:
            got = codec.decode_stripe({i: blocks[i] for i in ids}, len(data))
            self.assertEqual(got, data, f"subset {ids}")

    def test_round_trip_every_subset_4_2(self) -> None:
        """
        For 4+2 every one of the 15 k-subsets rebuilds a short odd stripe.
        """
        codec = ErasureCodec(ErasureParams(4, 2, 1024))
        data = os.urandom(1021)
        blocks = codec.encode_stripe(data)
        for ids in itertools.combinations(range(6), 4):
            self.assertEqual(codec.decode_stripe({i: bytes(blocks[i]) for i in ids}, 1021), data)

    def test_data_blocks_are_the_data(self) -> None:
        """
        The code is systematic: the data blocks concatenate to the stripe.
        """
        codec = ErasureCodec(ErasureParams(4, 2, 64))
        data = os.urandom(64)
        blocks = codec.encode_stripe(data)
        self.assertEqual(b"".join(blocks[:4]), data)

    def test_full_stripe_zero_copy(self) -> None:
        """
        Data blocks of a full stripe are views of the caller's buffer.
        """
        codec = ErasureCodec(ErasureParams(4, 2, 64))
        data = os.urandom(64)
        blocks = codec.encode_stripe(data)
        for block in blocks[:4]:
            self.assertIsInstance(block, memoryview)
            self.assertIs(block.obj, data)  # type: ignore[union-attr]
        for block in blocks[4:]:
            self.assertIsInstance(block, bytes)

    def test_short_stripe_padding(self) -> None:
        """
        A stripe shorter than k bytes pads the missing blocks with zeros.
        """
        codec = ErasureCodec(ErasureParams(4, 1, 8))
        blocks = codec.encode_stripe(b"\x07")
        self.assertEqual([bytes(b) for b in blocks[:4]], [b"\x07", b"\0", b"\0", b"\0"])
        self.assertEqual(codec.decode_stripe({1: blocks[1], 2: blocks[2], 3: blocks[3], 4: blocks[4]}, 1), b"\x07")

    def test_empty_stripe(self) -> None:
        """
        An empty stripe encodes to empty blocks and decodes to nothing.
        """
        codec = ErasureCodec(ErasureParams(4, 2, 8))
        self.assertEqual(codec.encode_stripe(b""), [b""] * 6)
        self.assertEqual(codec.decode_stripe({}, 0), b"")

    def test_no_parity(self) -> None:
        """
        With m=0 the blocks are the data split k ways and nothing is recoverable.
        """
        codec = ErasureCodec(ErasureParams(3, 0, 9))
        blocks = codec.encode_stripe(b"abcdefg")
        self.assertEqual([bytes(b) for b in blocks], [b"abc", b"def", b"g\0\0"])
        self.assertEqual(codec.decode_stripe(dict(enumerate(blocks)), 7), b"abcdefg")
        self.assertRaises(NotEnoughBlocks, codec.decode_stripe, {0: blocks[0], 1: blocks[1]}, 7)

    def test_not_enough_blocks(self) -> None:
        """
        Fewer than k blocks raise L{NotEnoughBlocks}.
        """
        codec = ErasureCodec(ErasureParams(4, 2, 16))
        blocks = codec.encode_stripe(os.urandom(16))
        with self.assertRaises(NotEnoughBlocks):
            codec.decode_stripe({0: blocks[0], 4: blocks[4], 5: blocks[5]}, 16)

    def test_wrong_block_length(self) -> None:
        """
        A block of the wrong length is refused rather than decoded.
        """
        codec = ErasureCodec(ErasureParams(4, 2, 16))
        blocks = codec.encode_stripe(os.urandom(16))
        given_blocks = {0: blocks[0], 1: blocks[1], 2: blocks[2], 5: bytes(blocks[5])[:3]}
        self.assertRaises(ValueError, codec.decode_stripe, given_blocks, 16)
        self.assertRaises(ValueError, codec.decode_stripe, dict(enumerate(blocks)), 12)

    def test_bad_index_or_length(self) -> None:
        """
        Block indices outside 0..k+m-1 and lengths beyond a stripe are refused.
        """
        codec = ErasureCodec(ErasureParams(2, 1, 4))
        blocks = codec.encode_stripe(b"abcd")
        self.assertRaises(ValueError, codec.decode_stripe, {0: blocks[0], 1: blocks[1], 3: b"xx"}, 4)
        self.assertRaises(ValueError, codec.decode_stripe, {0: blocks[0], 1: blocks[1]}, 5)
        self.assertRaises(ValueError, codec.encode_stripe, b"abcde")

    def test_decode_parts_concatenate(self) -> None:
        """
        L{ErasureCodec.decode_stripe_parts} yields buffers that join to the stripe.
        """
        codec = ErasureCodec(ErasureParams(4, 2, 40))
        data = os.urandom(37)
        blocks = codec.encode_stripe(data)
        parts = codec.decode_stripe_parts({i: blocks[i] for i in (0, 1, 2, 3)}, 37)
        self.assertEqual(b"".join(parts), data)
        parts = codec.decode_stripe_parts({i: blocks[i] for i in (1, 3, 4, 5)}, 37)
        self.assertEqual(b"".join(parts), data)

    def test_accepts_bytearray_and_memoryview(self) -> None:
        """
        Any byte buffer encodes the same as bytes.
        """
        codec = ErasureCodec(ErasureParams(4, 2, 64))
        data = os.urandom(50)
        expected = [bytes(b) for b in codec.encode_stripe(data)]
        self.assertEqual([bytes(b) for b in codec.encode_stripe(bytearray(data))], expected)
        self.assertEqual([bytes(b) for b in codec.encode_stripe(memoryview(data))], expected)


class SynchronousCpuPoolTests(SynchronousTestCase):
    """
    Tests for L{CpuPool.synchronous}.
    """

    def test_runs_inline(self) -> None:
        """
        The synchronous pool runs the function on the calling thread at once.
        """
        pool = CpuPool.synchronous()

        def add(a: int, b: int = 0) -> tuple[int, int]:
            return threading.get_ident(), a + b

        d = pool.run(add, 1, b=2)
        self.assertEqual(self.successResultOf(d), (threading.get_ident(), 3))
        self.assertTrue(pool.is_synchronous)

    def test_exception_becomes_failure(self) -> None:
        """
        An exception raised by the function fails the Deferred.
        """
        pool = CpuPool.synchronous()
        self.failureResultOf(pool.run(int, "x"), ValueError)

    def test_awaitable_from_coroutine(self) -> None:
        """
        Coroutines can await the result, e.g. to encode a stripe.
        """
        pool = CpuPool.synchronous()
        codec = ErasureCodec(ErasureParams(2, 1, 4))

        async def encode() -> list[bytes]:
            return [bytes(b) for b in await pool.run(codec.encode_stripe, b"abcd")]

        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(encode()))[:2], [b"ab", b"cd"])

    def test_stopped_refuses(self) -> None:
        """
        After stopService the pool refuses work with L{PoolStopped}.
        """
        pool = CpuPool.synchronous()
        pool.startService()
        self.successResultOf(pool.stopService())
        self.failureResultOf(pool.run(int, "1"), PoolStopped)

    def test_bad_thread_count(self) -> None:
        """
        A real pool needs at least one thread.
        """
        from twisted.internet.testing import MemoryReactor

        self.assertRaises(ValueError, CpuPool, MemoryReactor(), 0)


class ThreadedCpuPoolTests(TestCase):
    """
    Tests for L{CpuPool} with real threads (needs the real reactor to deliver
    results back from the worker threads).
    """

    def setUp(self) -> None:
        from twisted.internet import reactor

        self.pool = CpuPool(reactor, max_threads=2, name="test-cpu")
        self.pool.startService()
        self.addCleanup(self._stop)

    def _stop(self) -> Deferred[None] | None:
        if self.pool.running:
            return self.pool.stopService()
        return None

    async def _off_reactor(self) -> None:
        main = threading.get_ident()
        codec = ErasureCodec(ErasureParams(4, 2, 1 << 16))
        data = os.urandom(1 << 16)

        def encode(stripe: bytes) -> tuple[int, list[bytes]]:
            return threading.get_ident(), [bytes(b) for b in codec.encode_stripe(stripe)]

        ident, blocks = await self.pool.run(encode, data)
        self.assertNotEqual(ident, main)
        self.assertEqual(b"".join(blocks[:4]), data)

    def test_runs_in_worker_thread(self) -> Deferred[None]:
        """
        Work runs on a worker thread, not the reactor thread, and the result
        comes back.
        """
        return Deferred.fromCoroutine(self._off_reactor())

    def test_failure_propagates(self) -> Deferred[int]:
        """
        An exception in the worker thread fails the Deferred.
        """
        return self.assertFailure(self.pool.run(_parse, "x"), ValueError)

    def test_stop_waits_for_pending(self) -> Deferred[None]:
        """
        stopService fires only after submitted work has finished, then the
        pool refuses new work; a restart makes it usable again.
        """
        gate = threading.Event()
        done = self.pool.run(gate.wait, 5)
        self.assertEqual(self.pool.pending, 1)
        stopped = self.pool.stopService()
        self.assertNoResult(stopped)
        gate.set()

        async def check() -> None:
            self.assertTrue(await done)
            await stopped
            self.assertEqual(self.pool.pending, 0)
            await self.assertFailure(self.pool.run(int, "1"), PoolStopped)
            self.pool.startService()
            self.assertEqual(await self.pool.run(_parse, "7"), 7)

        return Deferred.fromCoroutine(check())


class PipelineBenchTests(SynchronousTestCase):
    """
    Smoke test for C{bench/pipeline.py}, so the benchmark keeps working.
    """

    def test_prints_one_line_per_figure(self) -> None:
        """
        A tiny run prints a comment line then C{name: N MB/s} lines for the
        hashes, the codec and the combined pipeline.
        """
        import contextlib
        import importlib.util
        import io
        import re

        path = os.path.join(os.path.dirname(__file__), "..", "bench", "pipeline.py")
        spec = importlib.util.spec_from_file_location("anvil_bench_pipeline", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            status = module.main(["--size-mib", "2", "--k", "3", "--m", "2", "--stripe-size", "3072", "--repeat", "1"])
        self.assertEqual(status, 0)
        lines = out.getvalue().splitlines()
        self.assertTrue(lines[0].startswith("# 2 MiB"))
        names = []
        for line in lines[1:]:
            match = re.fullmatch(r"(.+): (\d+) MB/s", line)
            assert match is not None, line
            names.append(match.group(1))
        self.assertEqual(names[:2], ["md5", "sha256"])
        self.assertIn("zfec encode 3+2 (ErasureCodec.encode_stripe)", names)
        self.assertIn("md5+sha256+encode+crc32, 2 threads, 2 streams", names)
        self.assertEqual(
            names[-4:],
            ["engine write, 1 stream", "engine read, 1 stream", "engine write, 4 streams", "engine read, 4 streams"],
        )
