# -*- test-case-name: tests.test_ranges -*-
"""
Pure byte-range arithmetic: HTTP C{Range} headers, object bytes to stripes,
stripes to data blocks, and stripes to byte spans inside shard files.

Nothing here does I/O; every function is total over its documented domain
and is hypothesis-tested in L{tests.test_ranges}.

Geometry used throughout (see also L{anvil.storage.erasure}):

  - An object (a I{content}) of C{content_length} bytes is cut into
    C{stripe_count = ceil(content_length / stripe_size)} stripes. Every stripe
    is C{stripe_size} long except possibly the last one. An empty content has
    no stripes at all.
  - A stripe of C{n} bytes is split into C{k} data blocks of
    C{ceil(n / k)} bytes each (the last data block zero-padded); parity
    blocks have the same length. So every block of a full stripe is
    C{stripe_size // k} bytes and only the last stripe's blocks may be
    shorter.
  - A shard file holds block I{i} of every stripe, each followed by a
    fixed-size checksum trailer, after a fixed-size header; the position of
    any stripe's block is therefore computable without reading the file.

S3 C{Range} semantics (GetObject): AWS supports a single byte range only.
A header that is not a syntactically valid single byte range (multiple
ranges, other units, garbage, C{first > last}) is ignored and the whole
object is returned with 200; a valid range that starts at or beyond the end
of the object, or the zero-length suffix C{bytes=-0}, is answered with 416
C{InvalidRange}. A suffix longer than the object, or a last position beyond
the end, is clamped (RFC 9110 section 14.1.2). On an empty object a non-empty
suffix range selects nothing and the whole (empty) object is returned.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "ByteRange",
    "InvalidRange",
    "StripeSlice",
    "BlockSlice",
    "parse_range",
    "stripe_count",
    "stripe_length",
    "block_length",
    "stripe_slices",
    "data_block_slices",
    "shard_payload_size",
    "shard_block_offset",
    "shard_span",
]


class InvalidRange(Exception):
    """
    The requested range is syntactically valid but cannot be satisfied for
    this object (S3 C{InvalidRange}, HTTP 416).

    @ivar length: The length of the object, for C{Content-Range: bytes */length}.
    """

    def __init__(self, length: int) -> None:
        super().__init__(f"requested range not satisfiable for length {length}")
        self.length = length


@dataclass(frozen=True)
class ByteRange:
    """
    A satisfiable, non-empty byte range of an object.

    @ivar start: First byte offset (0-based, inclusive).
    @ivar end: Last byte offset (inclusive), as in C{Content-Range}.
    """

    start: int
    end: int

    @property
    def length(self) -> int:
        """
        @return: The number of bytes the range selects.
        """
        return self.end - self.start + 1

    def content_range(self, total: int) -> str:
        """
        @param total: The full length of the object.
        @return: The C{Content-Range} header value for a 206 response.
        """
        return f"bytes {self.start}-{self.end}/{total}"


# RFC 9110 section 14.1.1: int-range = first-pos "-" [ last-pos ],
# suffix-range = "-" suffix-length; positions are 1*DIGIT (ASCII only: int()
# alone would also accept "+1", "1_0" and non-ASCII digits). Whitespace inside
# the value is not tolerated, matching AWS ("bytes=0 -1" is ignored).
_RANGE = re.compile(r"([A-Za-z]+)=([0-9]*)-([0-9]*)")


def parse_range(header: str | bytes | None, length: int) -> ByteRange | None:
    """
    Interpret an HTTP C{Range} header for a GetObject of C{length} bytes, as S3
    does.

    @param header: The raw header value, or L{None} when absent.
    @param length: The object's length in bytes.
    @return: The range to send with 206, or L{None} to send the whole object
        with 200 (no header, or a header S3 ignores).
    @raise InvalidRange: The range cannot be satisfied (respond 416).
    """
    if header is None:
        return None
    if isinstance(header, bytes):
        try:
            header = header.decode("ascii")
        except UnicodeDecodeError:
            return None
    # Surrounding whitespace is not part of a field value (RFC 9110 5.5).
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    unit, first, last = match.groups()
    # Range units compare case-insensitively (RFC 9110 14.1).
    if unit.lower() != "bytes":
        return None
    if first == "":
        if last == "":
            return None
        suffix = int(last)
        if suffix == 0:
            # A zero-length suffix is the one suffix that is unsatisfiable.
            raise InvalidRange(length)
        if length == 0:
            # Nothing to select, yet not unsatisfiable: AWS answers 200 with
            # the (empty) object.
            return None
        return ByteRange(max(0, length - suffix), length - 1)
    start = int(first)
    if last == "":
        end = length - 1
    else:
        end = int(last)
        if start > end:
            # Syntactically invalid (RFC 9110): ignored, even when start is
            # beyond the end of the object.
            return None
    if start >= length:
        raise InvalidRange(length)
    return ByteRange(start, min(end, length - 1))


def stripe_count(content_length: int, stripe_size: int) -> int:
    """
    @param content_length: Bytes in the content (>= 0).
    @param stripe_size: Bytes in a full stripe (> 0).
    @return: The number of stripes; 0 for an empty content.
    """
    return -(-content_length // stripe_size)


def stripe_length(stripe_index: int, stripe_size: int, content_length: int) -> int:
    """
    @param stripe_index: A stripe of the content, C{0 <= index < stripe_count}.
    @param stripe_size: Bytes in a full stripe.
    @param content_length: Bytes in the content.
    @return: The number of content bytes in that stripe.
    @raise IndexError: The stripe does not exist.
    """
    if not 0 <= stripe_index < stripe_count(content_length, stripe_size):
        raise IndexError(f"stripe {stripe_index} out of range")
    return min(stripe_size, content_length - stripe_index * stripe_size)


def block_length(stripe_len: int, k: int) -> int:
    """
    @param stripe_len: Bytes of content in the stripe.
    @param k: Number of data blocks per stripe.
    @return: The length of each of the stripe's blocks, C{ceil(stripe_len / k)}.
    """
    return -(-stripe_len // k)


@dataclass(frozen=True)
class StripeSlice:
    """
    The part of one decoded stripe that a byte range covers.

    @ivar stripe_index: Index of the stripe in the content.
    @ivar lo: Offset of the first wanted byte inside the decoded stripe.
    @ivar hi: Offset one past the last wanted byte inside the decoded stripe.
    """

    stripe_index: int
    lo: int
    hi: int


def stripe_slices(start: int, end: int, stripe_size: int) -> Iterator[StripeSlice]:
    """
    Map the byte range C{[start, end]} (inclusive, as in L{ByteRange}) of a
    content onto its stripes.

    Only the stripes the range touches are yielded, in order; concatenating
    C{stripe[lo:hi]} over them gives exactly C{content[start:end + 1]}. The
    first slice's C{lo} is the offset to skip in the first decoded stripe and
    the last slice's C{hi} where to stop in the last one.

    @param start: First wanted byte (>= 0).
    @param end: Last wanted byte (>= start).
    @param stripe_size: Bytes in a full stripe.
    @return: An iterator of L{StripeSlice}.
    """
    if start < 0 or end < start:
        raise ValueError(f"invalid range {start}-{end}")
    first, last = start // stripe_size, end // stripe_size
    for index in range(first, last + 1):
        base = index * stripe_size
        lo = start - base if index == first else 0
        hi = end + 1 - base if index == last else stripe_size
        yield StripeSlice(index, lo, hi)


@dataclass(frozen=True)
class BlockSlice:
    """
    The part of one data block that a slice of its stripe covers.

    @ivar block_index: Index of the data block, C{0 <= block_index < k}.
    @ivar lo: Offset of the first wanted byte inside the block.
    @ivar hi: Offset one past the last wanted byte inside the block.
    """

    block_index: int
    lo: int
    hi: int


def data_block_slices(stripe_len: int, k: int, lo: int, hi: int) -> list[BlockSlice]:
    """
    Map C{stripe[lo:hi]} onto the stripe's data blocks.

    When every data block is available, a small range read needs only the
    blocks this returns (often one) rather than the whole stripe; when some
    are missing the stripe has to be decoded instead.

    @param stripe_len: Bytes of content in the stripe.
    @param k: Number of data blocks per stripe.
    @param lo: First wanted offset in the stripe.
    @param hi: One past the last wanted offset, C{lo <= hi <= stripe_len}.
    @return: Slices whose concatenation (C{block[lo:hi]} each) is
        C{stripe[lo:hi]}; empty when C{lo == hi}.
    """
    if not 0 <= lo <= hi <= stripe_len:
        raise ValueError(f"invalid slice {lo}:{hi} of a {stripe_len}-byte stripe")
    if lo == hi:
        return []
    size = block_length(stripe_len, k)
    first, last = lo // size, (hi - 1) // size
    return [
        BlockSlice(
            index,
            lo - index * size if index == first else 0,
            hi - index * size if index == last else size,
        )
        for index in range(first, last + 1)
    ]


def shard_payload_size(content_length: int, stripe_size: int, k: int, trailer_size: int) -> int:
    """
    @param content_length: Bytes in the content.
    @param stripe_size: Bytes in a full stripe.
    @param k: Number of data blocks per stripe.
    @param trailer_size: Bytes of checksum after each block.
    @return: Bytes after the header in any shard file of this content.
    """
    count = stripe_count(content_length, stripe_size)
    if count == 0:
        return 0
    last = block_length(stripe_length(count - 1, stripe_size, content_length), k)
    return (count - 1) * (stripe_size // k + trailer_size) + last + trailer_size


def shard_block_offset(stripe_index: int, stripe_size: int, k: int, trailer_size: int) -> int:
    """
    @param stripe_index: Index of the stripe.
    @param stripe_size: Bytes in a full stripe.
    @param k: Number of data blocks per stripe.
    @param trailer_size: Bytes of checksum after each block.
    @return: Offset of the stripe's block from the end of the shard header.
        Every stripe before it is full, so this needs no content length.
    """
    return stripe_index * (stripe_size // k + trailer_size)


def shard_span(
    first: int,
    last: int,
    stripe_size: int,
    k: int,
    content_length: int,
    trailer_size: int,
) -> tuple[int, int]:
    """
    The contiguous bytes of a shard file (after the header) holding the
    blocks, with their trailers, of stripes C{first..last} inclusive: one
    read (or one peer request) fetches exactly what a range needs.

    @param first: First stripe index.
    @param last: Last stripe index (inclusive, C{>= first}).
    @param stripe_size: Bytes in a full stripe.
    @param k: Number of data blocks per stripe.
    @param content_length: Bytes in the content.
    @param trailer_size: Bytes of checksum after each block.
    @return: C{(offset, length)} relative to the end of the header.
    @raise IndexError: A stripe does not exist.
    """
    if first > last:
        raise ValueError(f"empty stripe span {first}..{last}")
    last_len = block_length(stripe_length(last, stripe_size, content_length), k)
    stripe_length(first, stripe_size, content_length)  # bounds check
    offset = shard_block_offset(first, stripe_size, k, trailer_size)
    end = shard_block_offset(last, stripe_size, k, trailer_size) + last_len + trailer_size
    return offset, end - offset
