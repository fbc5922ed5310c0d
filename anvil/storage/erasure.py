# -*- test-case-name: tests.test_erasure -*-
"""
Erasure coding of stripes with zfec.

A stripe of at most C{stripe_size} bytes is split into C{k} equal data blocks
(the last one zero-padded) and zfec computes C{m} parity blocks of the same
length; any C{k} of the C{k + m} blocks rebuild the stripe. The true length of
a short last stripe is not stored in the blocks: callers keep it (the shard
header records the content length, from which every stripe's length follows,
see L{anvil.storage.ranges}).

zfec's C{Encoder(k, n)} takes the I{total} number of blocks C{n = k + m} as
its second argument; L{ErasureParams} uses the Anvil (and ARCHITECTURE.md)
meaning of C{m}, the number of parity blocks.

Everything here is CPU-bound and synchronous. zfec releases the GIL while it
computes, so callers run L{ErasureCodec} methods in the bounded pool of
L{anvil.storage.cpu.CpuPool}, never on the reactor thread::

    blocks = await cpu.run(codec.encode_stripe, stripe)

Copies are avoided on the hot path: the data blocks of a full stripe are
C{memoryview}s into the caller's buffer (read-only for C{bytes}); only
padded blocks and parity blocks are new objects. Copying the data blocks
into new C{bytes} cut encode throughput by a quarter to a half in
C{bench/pipeline.py} on the 2-core machine, mostly page faults on freshly
mapped 256 KiB buffers (glibc serves allocations over its mmap threshold
with fresh mappings).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import zfec

from anvil.storage.ranges import block_length, stripe_count, stripe_length

__all__ = [
    "Block",
    "ErasureParams",
    "ErasureCodec",
    "InvalidErasureParams",
    "NotEnoughBlocks",
    "MAX_STRIPE_SIZE",
]

#: Anything holding a block's bytes: C{bytes}, or a C{memoryview} of bytes.
#: Both work with C{len()}, C{os.write}, C{zlib.crc32}, hashlib and
#: C{bytes.join}; call C{bytes(block)} when an owned copy is needed.
Block = Union[bytes, memoryview]

#: Upper bound on C{stripe_size}. A stripe and its k+m blocks are held in
#: memory per in-flight request, so the stripe size bounds a request's
#: memory; 64 MiB leaves room for a handful of concurrent requests within the
#: node's 300 MiB budget even at absurd settings. The shard header stores it
#: in 32 bits.
MAX_STRIPE_SIZE = 64 * 1024 * 1024


class InvalidErasureParams(ValueError):
    """
    The erasure parameters are out of range; the message names the field.
    """


class NotEnoughBlocks(ValueError):
    """
    Fewer than C{k} usable blocks were given to rebuild a stripe.
    """


@dataclass(frozen=True)
class ErasureParams:
    """
    Erasure coding geometry of a content.

    @ivar k: Data blocks per stripe, C{k >= 1}.
    @ivar m: Parity blocks per stripe, C{m >= 0}; up to C{m} blocks of a
        stripe may be lost. C{k + m <= 256} (zfec works in GF(2^8)).
    @ivar stripe_size: Bytes of content per full stripe: a positive multiple
        of C{k} (so full stripes split into equal blocks without padding), at
        most L{MAX_STRIPE_SIZE}.
    """

    k: int
    m: int
    stripe_size: int

    def __post_init__(self) -> None:
        for name in ("k", "m", "stripe_size"):
            value = getattr(self, name)
            # bool is an int subclass; True as k=1 is surely a mistake.
            if not isinstance(value, int) or isinstance(value, bool):
                raise InvalidErasureParams(f"erasure {name} must be an integer, not {value!r}")
        if self.k < 1:
            raise InvalidErasureParams(f"erasure k must be at least 1, not {self.k}")
        if self.m < 0:
            raise InvalidErasureParams(f"erasure m must be at least 0, not {self.m}")
        if self.k + self.m > 256:
            raise InvalidErasureParams(f"erasure k + m must be at most 256, not {self.k + self.m}")
        if self.stripe_size < 1 or self.stripe_size % self.k:
            raise InvalidErasureParams(
                f"stripe_size must be a positive multiple of k={self.k}, not {self.stripe_size}"
            )
        if self.stripe_size > MAX_STRIPE_SIZE:
            raise InvalidErasureParams(
                f"stripe_size must be at most {MAX_STRIPE_SIZE}, not {self.stripe_size}"
            )

    @property
    def total(self) -> int:
        """
        @return: Blocks per stripe, C{k + m} (zfec's C{m}).
        """
        return self.k + self.m

    @property
    def block_size(self) -> int:
        """
        @return: Bytes in each block of a full stripe.
        """
        return self.stripe_size // self.k

    def stripe_count(self, content_length: int) -> int:
        """
        @param content_length: Bytes in the content.
        @return: Number of stripes (0 for an empty content).
        """
        return stripe_count(content_length, self.stripe_size)

    def stripe_length(self, stripe_index: int, content_length: int) -> int:
        """
        @param stripe_index: Index of an existing stripe.
        @param content_length: Bytes in the content.
        @return: Bytes of content in that stripe.
        """
        return stripe_length(stripe_index, self.stripe_size, content_length)

    def block_length(self, stripe_len: int) -> int:
        """
        @param stripe_len: Bytes of content in a stripe.
        @return: Bytes in each of that stripe's blocks.
        """
        return block_length(stripe_len, self.k)


class ErasureCodec:
    """
    Encode and decode stripes for one L{ErasureParams}.

    Instances are immutable and safe to share between threads (zfec's coder
    state is a read-only matrix).
    """

    def __init__(self, params: ErasureParams) -> None:
        """
        @param params: The geometry to code with.
        """
        self.params = params
        self._parity_ids = tuple(range(params.k, params.total))
        # With m == 0 there is nothing to compute or recover: no coder.
        self._encoder = zfec.Encoder(params.k, params.total) if params.m else None
        self._decoder = zfec.Decoder(params.k, params.total) if params.m else None

    def encode_stripe(self, data: bytes | bytearray | memoryview) -> list[Block]:
        """
        Split a stripe into C{k} data blocks and compute C{m} parity blocks.

        @param data: The stripe, at most C{stripe_size} bytes; shorter only
            for the last stripe of a content. Must not be mutated while the
            returned blocks are in use (data blocks may be views into it).
        @return: C{k + m} blocks of C{ceil(len(data) / k)} bytes each, data
            blocks first; all empty for empty input.
        @raise ValueError: C{data} is longer than a stripe.
        """
        k = self.params.k
        view = memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        size = len(view)
        if size > self.params.stripe_size:
            raise ValueError(f"stripe of {size} bytes exceeds stripe_size {self.params.stripe_size}")
        if size == 0:
            return [b""] * self.params.total
        bs = block_length(size, k)
        blocks: list[Block] = []
        # Whole blocks are zero-copy views; only the block straddling the end
        # (and any block wholly past it, when size < k) needs padding.
        full = size // bs
        for index in range(full):
            blocks.append(view[index * bs : (index + 1) * bs])
        if full < k:
            tail = bytes(view[full * bs :])
            blocks.append(tail + bytes(bs - len(tail)))
            zeros = bytes(bs)
            blocks.extend(zeros for _ in range(k - full - 1))
        if self._encoder is not None:
            blocks.extend(self._encoder.encode(tuple(blocks), self._parity_ids))
        return blocks

    def decode_stripe_parts(self, blocks: Mapping[int, Block], length: int) -> list[Block]:
        """
        Rebuild a stripe from any C{k} of its blocks, as a list of parts.

        When all data blocks are present no decoding happens (the parts are
        the data blocks themselves, the last trimmed by a view). Otherwise
        zfec recomputes only the missing data blocks, preferring data blocks
        over parity among those given. Writing the parts one after another
        avoids joining them into one buffer.

        @param blocks: Block index to block; extra blocks are ignored.
        @param length: The true length of the stripe (from the content
            length), so padding can be dropped.
        @return: Buffers whose concatenation is the stripe.
        @raise NotEnoughBlocks: Fewer than C{k} blocks were given.
        @raise ValueError: A length or an index is inconsistent.
        """
        params = self.params
        k = params.k
        if not 0 <= length <= params.stripe_size:
            raise ValueError(f"stripe length {length} outside 0..{params.stripe_size}")
        for index in blocks:
            if not 0 <= index < params.total:
                raise ValueError(f"block index {index} outside 0..{params.total - 1}")
        bs = block_length(length, k)
        if bs == 0:
            return []
        if all(index in blocks for index in range(k)):
            chosen = [blocks[index] for index in range(k)]
            self._check_sizes(chosen, range(k), bs)
            data = chosen
        else:
            ids = sorted(blocks)
            # Data blocks come first in ids; parity only fills the gaps.
            ids = ids[:k]
            if len(ids) < k or self._decoder is None:
                raise NotEnoughBlocks(
                    f"need {k} of {params.total} blocks, got {len(ids)}: {sorted(blocks)}"
                )
            chosen = [blocks[index] for index in ids]
            self._check_sizes(chosen, ids, bs)
            data = self._decoder.decode(tuple(chosen), tuple(ids))
        parts: list[Block] = []
        for index, block in enumerate(data):
            wanted = min(bs, length - index * bs)
            if wanted <= 0:
                break
            parts.append(block if wanted == bs else memoryview(block)[:wanted])
        return parts

    def decode_stripe(self, blocks: Mapping[int, Block], length: int) -> bytes:
        """
        Rebuild a stripe from any C{k} of its blocks.

        @param blocks: Block index to block; extra blocks are ignored.
        @param length: The true length of the stripe.
        @return: The stripe's bytes.
        @raise NotEnoughBlocks: Fewer than C{k} blocks were given.
        @raise ValueError: A length or an index is inconsistent.
        """
        return b"".join(self.decode_stripe_parts(blocks, length))

    @staticmethod
    def _check_sizes(chosen: Sequence[Block], ids: Sequence[int], bs: int) -> None:
        # zfec requires equal lengths; a wrong length here means the caller
        # paired blocks with the wrong stripe, which must not decode silently.
        for index, block in zip(ids, chosen):
            if memoryview(block).nbytes != bs:
                raise ValueError(f"block {index} has {memoryview(block).nbytes} bytes, expected {bs}")
