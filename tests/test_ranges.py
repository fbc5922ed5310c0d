# -*- test-case-name: tests.test_ranges -*-
"""
Tests for L{anvil.storage.ranges}.
"""

from __future__ import annotations

import zlib

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from anvil.storage.erasure import ErasureCodec, ErasureParams
from anvil.storage.ranges import (
    ByteRange,
    InvalidRange,
    block_length,
    data_block_slices,
    parse_range,
    shard_block_offset,
    shard_payload_size,
    shard_span,
    stripe_count,
    stripe_length,
    stripe_slices,
)

_settings = settings(max_examples=300, deadline=None)


class ParseRangeTests(SynchronousTestCase):
    """
    Tests for L{parse_range}, following S3's documented and observed behaviour.
    """

    def assertRange(self, header: str, length: int, expected: tuple[int, int] | None) -> None:
        """
        Assert that C{header} on an object of C{length} bytes gives C{expected}.
        """
        got = parse_range(header, length)
        if expected is None:
            self.assertIsNone(got, header)
        else:
            self.assertEqual(got, ByteRange(*expected), header)

    def test_absent(self) -> None:
        """
        No header means the whole object.
        """
        self.assertIsNone(parse_range(None, 10))

    def test_valid_forms(self) -> None:
        """
        Closed, open-ended and suffix ranges select the bytes RFC 9110 says.
        """
        for header, expected in [
            ("bytes=0-0", (0, 0)),
            ("bytes=0-99", (0, 99)),
            ("bytes=0-100", (0, 99)),
            ("bytes=0-999999", (0, 99)),
            ("bytes=1-99", (1, 99)),
            ("bytes=50-", (50, 99)),
            ("bytes=0-", (0, 99)),
            ("bytes=99-99", (99, 99)),
            ("bytes=00-01", (0, 1)),
            ("bytes=-1", (99, 99)),
            ("bytes=-10", (90, 99)),
            ("bytes=-100", (0, 99)),
            ("bytes=-101", (0, 99)),
            ("Bytes=1-2", (1, 2)),
            (" bytes=1-2 ", (1, 2)),
        ]:
            self.assertRange(header, 100, expected)

    def test_ignored_forms(self) -> None:
        """
        Headers that are not one valid byte range are ignored (whole object).
        """
        for header in [
            "",
            "bytes=,",
            "bytes= -1",
            "bytes=--1",
            "bytes=0 -1",
            "bytes=0--1",
            "bytes=10-5",
            "bytes=abc",
            "bytes=a-z",
            "foo=0-1",
            "bytes=abc-xyz",
            "bytes=100-x",
            "bytes=0-0,1-2",
            "bytes=102-0",
            "bytes=-",
            "bytes=+1-2",
            "bytes=1_0-20",
            "bytes=\u0661-2",
            "bytes 0-1",
        ]:
            self.assertRange(header, 100, None)

    def test_unsatisfiable(self) -> None:
        """
        A start at or beyond the end, or a zero suffix, is InvalidRange.
        """
        for header in ["bytes=100-100", "bytes=100-110", "bytes=100-", "bytes=-0", "bytes=1000-2000"]:
            with self.assertRaises(InvalidRange) as e:
                parse_range(header, 100)
            self.assertEqual(e.exception.length, 100)

    def test_empty_object(self) -> None:
        """
        On an empty object positional ranges and bytes=-0 are unsatisfiable,
        a non-zero suffix and invalid headers give the whole (empty) object.
        """
        for header in ["bytes=0-0", "bytes=0-", "bytes=00-01", "bytes=-0", "bytes=40-50"]:
            self.assertRaises(InvalidRange, parse_range, header, 0)
        for header in ["bytes=-1", "bytes=abc", "bytes=0-0,1-2", "foo=0-1"]:
            self.assertIsNone(parse_range(header, 0), header)

    def test_bytes_header(self) -> None:
        """
        A raw bytes header is accepted; non-ASCII bytes make it ignored.
        """
        self.assertEqual(parse_range(b"bytes=1-2", 10), ByteRange(1, 2))
        self.assertIsNone(parse_range(b"bytes=\xff-2", 10))

    def test_content_range(self) -> None:
        """
        L{ByteRange} formats Content-Range and knows its length.
        """
        r = ByteRange(5, 9)
        self.assertEqual((r.length, r.content_range(10)), (5, "bytes 5-9/10"))

    @_settings
    @given(st.binary(max_size=300), st.integers(0, 400), st.integers(0, 400))
    def test_closed_range_is_python_slice(self, data: bytes, a: int, b: int) -> None:
        """
        bytes=a-b selects data[a:b+1], is ignored when a > b, and is
        unsatisfiable when a is past the end.
        """
        header = f"bytes={a}-{b}"
        if a > b:
            self.assertIsNone(parse_range(header, len(data)))
        elif a >= len(data):
            self.assertRaises(InvalidRange, parse_range, header, len(data))
        else:
            r = parse_range(header, len(data))
            assert r is not None
            self.assertEqual(data[r.start : r.end + 1], data[a : b + 1])
            self.assertEqual(r.length, len(data[a : b + 1]))

    @_settings
    @given(st.binary(max_size=300), st.integers(0, 400))
    def test_open_and_suffix_ranges_are_python_slices(self, data: bytes, n: int) -> None:
        """
        bytes=n- selects data[n:] and bytes=-n selects data[-n:], within the
        unsatisfiable and empty-object rules.
        """
        if n >= len(data):
            self.assertRaises(InvalidRange, parse_range, f"bytes={n}-", len(data))
        else:
            r = parse_range(f"bytes={n}-", len(data))
            assert r is not None
            self.assertEqual(data[r.start : r.end + 1], data[n:])
        if n == 0:
            self.assertRaises(InvalidRange, parse_range, "bytes=-0", len(data))
        elif not data:
            self.assertIsNone(parse_range(f"bytes=-{n}", 0))
        else:
            r = parse_range(f"bytes=-{n}", len(data))
            assert r is not None
            self.assertEqual(data[r.start : r.end + 1], data[-n:])

    @_settings
    @given(st.text(max_size=30), st.integers(0, 100))
    def test_never_out_of_bounds(self, header: str, length: int) -> None:
        """
        Whatever the header, the result is None, InvalidRange, or a non-empty
        range inside the object.
        """
        try:
            r = parse_range(header, length)
        except InvalidRange:
            return
        if r is not None:
            self.assertTrue(0 <= r.start <= r.end < length)


class StripeGeometryTests(SynchronousTestCase):
    """
    Tests for stripe counts and lengths.
    """

    def test_counts(self) -> None:
        """
        Contents split into ceil(length / stripe_size) stripes; empty has none.
        """
        self.assertEqual([stripe_count(n, 4) for n in (0, 1, 4, 5, 8, 9)], [0, 1, 1, 2, 2, 3])

    def test_lengths(self) -> None:
        """
        Every stripe is full except possibly the last.
        """
        self.assertEqual([stripe_length(i, 4, 10) for i in range(3)], [4, 4, 2])
        self.assertRaises(IndexError, stripe_length, 3, 4, 10)
        self.assertRaises(IndexError, stripe_length, 0, 4, 0)
        self.assertRaises(IndexError, stripe_length, -1, 4, 10)

    def test_block_length(self) -> None:
        """
        Blocks are ceil(stripe length / k) bytes.
        """
        self.assertEqual([block_length(n, 4) for n in (0, 1, 4, 5, 8)], [0, 1, 1, 2, 2])


@st.composite
def _content_and_range(draw: st.DrawFn) -> tuple[bytes, int, int, int]:
    k = draw(st.integers(1, 6))
    stripe_size = k * draw(st.integers(1, 16))
    data = draw(st.binary(min_size=1, max_size=stripe_size * 6))
    start = draw(st.integers(0, len(data) - 1))
    end = draw(st.integers(start, len(data) - 1))
    return data, stripe_size, start, end


class StripeSliceTests(SynchronousTestCase):
    """
    Tests for L{stripe_slices} and L{data_block_slices}.
    """

    @_settings
    @given(_content_and_range())
    def test_slices_concatenate_to_range(self, case: tuple[bytes, int, int, int]) -> None:
        """
        Concatenating the mapped slices of the stripes equals data[a:b+1],
        and only the stripes the range touches are visited.
        """
        data, stripe_size, a, b = case
        stripes = [data[i : i + stripe_size] for i in range(0, len(data), stripe_size)]
        slices = list(stripe_slices(a, b, stripe_size))
        self.assertEqual(b"".join(stripes[s.stripe_index][s.lo : s.hi] for s in slices), data[a : b + 1])
        self.assertEqual([s.stripe_index for s in slices], list(range(a // stripe_size, b // stripe_size + 1)))
        for s in slices:
            self.assertTrue(0 <= s.lo < s.hi <= len(stripes[s.stripe_index]))

    def test_first_and_last_offsets(self) -> None:
        """
        The first slice skips into its stripe and the last stops early.
        """
        slices = list(stripe_slices(5, 17, 8))
        self.assertEqual(
            [(s.stripe_index, s.lo, s.hi) for s in slices], [(0, 5, 8), (1, 0, 8), (2, 0, 2)]
        )

    def test_invalid_range(self) -> None:
        """
        Negative or inverted ranges are refused.
        """
        self.assertRaises(ValueError, list, stripe_slices(3, 2, 8))
        self.assertRaises(ValueError, list, stripe_slices(-1, 2, 8))

    @_settings
    @given(_content_and_range(), st.integers(0, 3))
    def test_block_slices_read_from_encoded_blocks(
        self, case: tuple[bytes, int, int, int], m: int
    ) -> None:
        """
        Reading the mapped slices of the encoded data blocks reproduces each
        stripe slice, so a range needs only the blocks it overlaps.
        """
        data, stripe_size, a, b = case
        for k in range(1, 7):
            if stripe_size % k == 0:
                break
        codec = ErasureCodec(ErasureParams(k, m, stripe_size))
        out = []
        for s in stripe_slices(a, b, stripe_size):
            stripe = data[s.stripe_index * stripe_size : (s.stripe_index + 1) * stripe_size]
            blocks = codec.encode_stripe(stripe)
            for piece in data_block_slices(len(stripe), k, s.lo, s.hi):
                self.assertTrue(0 <= piece.lo < piece.hi <= len(blocks[piece.block_index]))
                out.append(bytes(blocks[piece.block_index][piece.lo : piece.hi]))
        self.assertEqual(b"".join(out), data[a : b + 1])

    def test_block_slices_small_range_touches_one_block(self) -> None:
        """
        A few bytes inside one block need only that block.
        """
        slices = data_block_slices(1 << 20, 4, 300_000, 300_010)
        self.assertEqual([(s.block_index, s.lo, s.hi) for s in slices], [(1, 37_856, 37_866)])
        self.assertEqual(data_block_slices(10, 4, 3, 3), [])
        self.assertRaises(ValueError, data_block_slices, 10, 4, 3, 11)


class ShardOffsetTests(SynchronousTestCase):
    """
    Tests for the position of blocks inside a shard file's payload.
    """

    @_settings
    @given(
        st.integers(1, 6),
        st.integers(1, 16),
        st.integers(1, 200),
        st.integers(0, 3),
        st.integers(0, 8),
        st.data(),
    )
    def test_spans_match_a_real_layout(
        self, k: int, per_block: int, length: int, shard: int, trailer: int, draw: st.DataObject
    ) -> None:
        """
        Offsets and spans computed from the geometry address exactly the
        blocks of a payload laid out block by block with trailers.
        """
        stripe_size = k * per_block
        params = ErasureParams(k, 3, stripe_size)
        codec = ErasureCodec(params)
        data = bytes(i % 251 for i in range(length))
        blocks = []
        payload = b""
        for i in range(stripe_count(length, stripe_size)):
            block = bytes(codec.encode_stripe(data[i * stripe_size : (i + 1) * stripe_size])[shard])
            blocks.append(block)
            payload += block + zlib.crc32(block).to_bytes(4, "big")[:trailer].ljust(trailer, b"\0")
        self.assertEqual(shard_payload_size(length, stripe_size, k, trailer), len(payload))
        count = len(blocks)
        first = draw.draw(st.integers(0, count - 1))
        last = draw.draw(st.integers(first, count - 1))
        for i in (first, last):
            offset = shard_block_offset(i, stripe_size, k, trailer)
            self.assertEqual(payload[offset : offset + len(blocks[i])], blocks[i])
        offset, size = shard_span(first, last, stripe_size, k, length, trailer)
        expected = b"".join(
            b + payload[shard_block_offset(i, stripe_size, k, trailer) + len(b) :][:trailer]
            for i, b in enumerate(blocks)
            if first <= i <= last
        )
        self.assertEqual(payload[offset : offset + size], expected)

    def test_empty_payload(self) -> None:
        """
        An empty content has an empty payload and no stripes to span.
        """
        self.assertEqual(shard_payload_size(0, 8, 4, 4), 0)
        self.assertRaises(IndexError, shard_span, 0, 0, 8, 4, 0, 4)
        self.assertRaises(ValueError, shard_span, 1, 0, 8, 4, 100, 4)
