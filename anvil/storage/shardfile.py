# -*- test-case-name: tests.test_shardfile -*-
"""
The versioned on-disk format of one shard: block I{i} of every stripe of one
content.

Layout (format version 1, all integers big-endian)::

    offset size  field
    0      8     magic b"ANVILSHD"
    8      2     format version (1)
    10     2     header length in bytes (76), so a reader finds the blocks
    12     1     block checksum algorithm (1 = CRC-32, see below)
    13     1     reserved, 0
    14     32    content hash (SHA-256 of the whole content)
    46     2     shard index (0 .. k+m-1; data shards first)
    48     2     k
    50     2     m
    52     4     stripe size
    56     8     content length
    64     8     number of stripes
    72     4     header checksum: CRC-32 of bytes 0..71
    76     ...   for each stripe: block, then its 4-byte checksum

Every block is C{stripe_size // k} bytes except the last stripe's, whose
length follows from the content length (L{anvil.storage.ranges}), so the
offset of any stripe's block is computed, not searched for: a range read
seeks straight to the stripes it needs.

Checksum: CRC-32 (C{zlib.crc32}, hardware-assisted in current zlib, about
3 GB/s here). CRC-32C would be the usual choice but no CRC-32C module is in
the project's dependencies, and the algorithm byte lets a later format switch
without guessing. Any CRC-32 detects every error burst of up to 32 bits, so a
flipped byte (or a flipped bit) anywhere in a block or its trailer is always
caught. The CRC of a block is seeded with the shard index and stripe index,
so a block written at the wrong position (a misdirected write, or one shard's
block in another's file) also fails its check instead of passing as valid.

Write protocol (L{ShardWriter}): blocks are appended to a temporary file
that starts with an all-zero header (the content hash and length are only
known once the upload ends); L{ShardWriter.finish} writes the real header
and fsyncs the file, L{ShardWriter.commit} renames it into place and fsyncs
the directory. A crash at any point leaves either no shard or a temporary
file without a valid header, never a half-written file under a final name.

All methods do blocking file I/O; callers on the reactor thread run them in
a thread pool (see L{anvil.storage.shardstore}).
"""

from __future__ import annotations

import errno
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType

from anvil.storage.erasure import Block, ErasureParams, InvalidErasureParams
from anvil.storage.ranges import (
    block_length,
    shard_block_offset,
    shard_payload_size,
    stripe_count,
    stripe_length,
)

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "TRAILER_SIZE",
    "ShardHeader",
    "ShardWriter",
    "ShardReader",
    "CorruptShard",
    "BadShardHeader",
    "fsync_dir",
]

MAGIC = b"ANVILSHD"
FORMAT_VERSION = 1
CHECKSUM_CRC32 = 1

_HEADER = struct.Struct(">8sHHBB32sHHHIQQ")
_CRC = struct.Struct(">I")

#: A shard writer flushes its file to disk after this many bytes of blocks,
#: so the disk works while the upload streams in rather than all at commit.
WRITEBACK_BYTES = 4 * 1024 * 1024
_SEED = struct.Struct(">HQ")

#: Bytes of the version 1 header, its checksum included.
HEADER_SIZE = _HEADER.size + _CRC.size
#: Bytes of checksum after each block.
TRAILER_SIZE = _CRC.size


class CorruptShard(Exception):
    """
    A shard file failed validation.

    @ivar path: The file.
    @ivar stripe_index: The stripe whose block is bad, or L{None} when the
        whole file is unusable (bad header, wrong size).
    @ivar reason: What was wrong, for logs.
    """

    def __init__(self, path: str, stripe_index: int | None, reason: str) -> None:
        where = "header" if stripe_index is None else f"stripe {stripe_index}"
        super().__init__(f"corrupt shard {path} ({where}): {reason}")
        self.path = path
        self.stripe_index = stripe_index
        self.reason = reason


class BadShardHeader(CorruptShard):
    """
    The header is missing, damaged, of an unknown version, or disagrees with
    the file's size; no block of the file can be trusted.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, None, reason)


def _block_crc(block: Block, shard_index: int, stripe_index: int) -> int:
    # Seeding binds the checksum to the block's position (see module doc).
    seed = zlib.crc32(_SEED.pack(shard_index, stripe_index))
    return zlib.crc32(block, seed)


@dataclass(frozen=True)
class ShardHeader:
    """
    The decoded header of a shard file.

    @ivar content_hash: SHA-256 digest (32 bytes) of the whole content.
    @ivar shard_index: Which block of each stripe the file holds.
    @ivar params: The content's erasure geometry.
    @ivar content_length: Bytes in the whole content.
    """

    content_hash: bytes
    shard_index: int
    params: ErasureParams
    content_length: int

    def __post_init__(self) -> None:
        if len(self.content_hash) != 32:
            raise ValueError("content_hash must be a 32-byte SHA-256 digest")
        if not 0 <= self.shard_index < self.params.total:
            raise ValueError(f"shard index {self.shard_index} outside 0..{self.params.total - 1}")
        if self.content_length < 0:
            raise ValueError("content_length must not be negative")

    @property
    def stripe_count(self) -> int:
        """
        @return: Number of stripes (and of blocks in the file).
        """
        return stripe_count(self.content_length, self.params.stripe_size)

    @property
    def file_size(self) -> int:
        """
        @return: The exact size of a complete shard file with this header.
        """
        p = self.params
        return HEADER_SIZE + shard_payload_size(self.content_length, p.stripe_size, p.k, TRAILER_SIZE)

    def block_length(self, stripe_index: int) -> int:
        """
        @param stripe_index: An existing stripe.
        @return: Bytes of that stripe's block in this file.
        @raise IndexError: No such stripe.
        """
        p = self.params
        return block_length(stripe_length(stripe_index, p.stripe_size, self.content_length), p.k)

    def block_offset(self, stripe_index: int) -> int:
        """
        @param stripe_index: An existing stripe.
        @return: File offset of that stripe's block.
        """
        p = self.params
        return HEADER_SIZE + shard_block_offset(stripe_index, p.stripe_size, p.k, TRAILER_SIZE)

    def pack(self) -> bytes:
        """
        @return: The header's C{HEADER_SIZE} bytes.
        """
        p = self.params
        body = _HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            HEADER_SIZE,
            CHECKSUM_CRC32,
            0,
            self.content_hash,
            self.shard_index,
            p.k,
            p.m,
            p.stripe_size,
            self.content_length,
            self.stripe_count,
        )
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def unpack(cls, data: bytes, path: str = "<memory>") -> ShardHeader:
        """
        Decode and validate a header.

        @param data: At least the first C{HEADER_SIZE} bytes of a file.
        @param path: The file, for error messages.
        @return: The header.
        @raise BadShardHeader: Anything is wrong with it.
        """
        if len(data) < HEADER_SIZE:
            raise BadShardHeader(path, f"file too short for a header ({len(data)} bytes)")
        fields = _HEADER.unpack_from(data)
        magic, version, header_size, algorithm = fields[:4]
        if magic != MAGIC:
            raise BadShardHeader(path, "bad magic (not a committed shard file)")
        if version != FORMAT_VERSION:
            raise BadShardHeader(path, f"unsupported format version {version}")
        (crc,) = _CRC.unpack_from(data, _HEADER.size)
        if crc != zlib.crc32(memoryview(data)[: _HEADER.size]):
            raise BadShardHeader(path, "header checksum mismatch")
        if header_size != HEADER_SIZE:
            raise BadShardHeader(path, f"header length {header_size}, expected {HEADER_SIZE}")
        if algorithm != CHECKSUM_CRC32:
            raise BadShardHeader(path, f"unknown checksum algorithm {algorithm}")
        _, _, _, _, _, content_hash, index, k, m, stripe_size, length, count = fields
        try:
            header = cls(content_hash, index, ErasureParams(k, m, stripe_size), length)
        except (InvalidErasureParams, ValueError) as e:
            raise BadShardHeader(path, str(e)) from None
        if header.stripe_count != count:
            raise BadShardHeader(path, f"{count} stripes recorded, {header.stripe_count} expected")
        return header


class ShardWriter:
    """
    Writes one shard file to a temporary path, block by block.

    Use: L{write_block} once per stripe in order, then L{finish} (header and
    fsync) and L{commit} (rename and directory fsync), or L{abort} at any
    point. As a context manager it aborts unless committed.

    @ivar path: The temporary file.
    @ivar shard_index: Which block of each stripe this file holds.
    @ivar params: The content's erasure geometry.
    """

    def __init__(
        self,
        path_tmp: str,
        *,
        shard_index: int,
        params: ErasureParams,
        on_close: Callable[[ShardWriter], None] | None = None,
    ) -> None:
        """
        Create the temporary file (it must not exist).

        @param path_tmp: Where to write; on the final location's filesystem
            so that the commit rename is atomic.
        @param shard_index: Which block of each stripe this file holds.
        @param params: The content's erasure geometry.
        @param on_close: Called once after a commit or an abort.
        """
        if not 0 <= shard_index < params.total:
            raise ValueError(f"shard index {shard_index} outside 0..{params.total - 1}")
        self.path = path_tmp
        self.shard_index = shard_index
        self.params = params
        self._on_close = on_close
        self._blocks = 0
        self._unsynced = 0
        self._last_block: int | None = None
        self._short_seen = False
        self._header: ShardHeader | None = None
        self._closed = False
        self._fd: int | None = os.open(
            path_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644
        )
        try:
            # Placeholder header: never valid (no magic) until finish().
            self._write_all([bytes(HEADER_SIZE)])
        except BaseException:
            self.abort()
            raise

    @property
    def blocks_written(self) -> int:
        """
        @return: Blocks (stripes) written so far.
        """
        return self._blocks

    @property
    def header(self) -> ShardHeader | None:
        """
        @return: The header written by L{finish}, or L{None} before.
        """
        return self._header

    def _write_all(self, buffers: list[Block]) -> None:
        assert self._fd is not None
        views = [memoryview(b).cast("B") for b in buffers]
        while views:
            written = os.writev(self._fd, views)
            # Regular files rarely write short, but the contract allows it.
            while views and written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            if views and written:
                views[0] = views[0][written:]

    def write_block(self, block: Block) -> None:
        """
        Append the next stripe's block with its checksum.

        @param block: C{params.block_size} bytes, or fewer for the last stripe.
        @raise ValueError: The block's length cannot be right.
        """
        self._check_open()
        if self._header is not None:
            raise ValueError("shard already finished")
        size = memoryview(block).nbytes
        if self._short_seen:
            raise ValueError("a short block must be the last one")
        if not 0 < size <= self.params.block_size:
            raise ValueError(f"block of {size} bytes, expected 1..{self.params.block_size}")
        if size < self.params.block_size:
            self._short_seen = True
        crc = _block_crc(block, self.shard_index, self._blocks)
        self._write_all([block, _CRC.pack(crc)])
        self._blocks += 1
        self._last_block = size
        self._unsynced += size
        if self._unsynced >= WRITEBACK_BYTES:
            # Flush as we go: left to the final fsync, a large shard's dirty
            # pages would all be written at commit, stalling the upload's
            # reply for seconds while the disk sat idle during the upload.
            os.fdatasync(self._fd)
            self._unsynced = 0

    def finish(self, content_hash: bytes, content_length: int) -> ShardHeader:
        """
        Write the header and fsync the file; it can then be committed.

        @param content_hash: SHA-256 digest of the whole content.
        @param content_length: Bytes in the whole content; must agree with
            the blocks written.
        @return: The header written.
        @raise ValueError: The blocks written do not match C{content_length}.
        """
        self._check_open()
        if self._header is not None:
            raise ValueError("shard already finished")
        assert self._fd is not None
        header = ShardHeader(content_hash, self.shard_index, self.params, content_length)
        if header.stripe_count != self._blocks:
            raise ValueError(
                f"{self._blocks} blocks written, {header.stripe_count} stripes in {content_length} bytes"
            )
        if self._blocks and header.block_length(self._blocks - 1) != self._last_block:
            raise ValueError(
                f"last block has {self._last_block} bytes, "
                f"expected {header.block_length(self._blocks - 1)} for {content_length} bytes"
            )
        os.pwrite(self._fd, header.pack(), 0)
        os.fsync(self._fd)
        self._header = header
        return header

    def commit(self, final_path: str, sync_dir: bool = True) -> None:
        """
        Rename the finished file to C{final_path} and make that durable.

        An existing file at C{final_path} is replaced atomically (a second
        upload of the same content writes identical bytes).

        @param final_path: The committed name, on the same filesystem.
        @param sync_dir: Whether to fsync the directory now; a caller
            committing several shards into one directory passes C{False} and
            calls L{fsync_dir} once afterwards.
        @raise ValueError: L{finish} was not called.
        """
        self._check_open()
        if self._header is None:
            raise ValueError("finish() must be called before commit()")
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        try:
            parent = os.path.dirname(final_path)
            _make_dirs_durable(parent)
            os.replace(self.path, final_path)
            if sync_dir:
                # The rename is only durable once the directory entry is.
                fsync_dir(parent)
        except BaseException:
            self.abort()
            raise
        self._close()

    def abort(self) -> None:
        """
        Close and remove the temporary file; safe to call more than once.
        """
        if self._closed:
            return
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._close()

    def _close(self) -> None:
        self._closed = True
        if self._on_close is not None:
            self._on_close(self)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("shard writer is closed")

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()


def fsync_dir(path: str) -> None:
    """
    Make a directory's entries (creations, renames) durable.

    @param path: The directory.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs_durable(path: str) -> None:
    """
    Create C{path} and missing parents, fsyncing each parent of a created
    directory so the new entries survive a crash.
    """
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent and parent != path:
        _make_dirs_durable(parent)
    try:
        os.mkdir(path)
    except FileExistsError:
        return
    fsync_dir(parent or ".")


class ShardReader:
    """
    Reads and verifies blocks of one committed shard file.

    Opening validates the header and the file's exact size; each block is
    verified against its checksum as it is read. Reads use C{pread}, so one
    reader may serve several threads.

    @ivar path: The file.
    @ivar header: Its decoded header.
    """

    def __init__(self, path: str) -> None:
        """
        @param path: A committed shard file.
        @raise FileNotFoundError: No such file.
        @raise BadShardHeader: The header is bad or the size is wrong.
        """
        self.path = path
        self._fd: int | None = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.header = ShardHeader.unpack(os.pread(self._fd, HEADER_SIZE, 0), path)
            size = os.fstat(self._fd).st_size
            # Commit fsyncs before the rename, so any other size means damage
            # after the fact (truncation, appended garbage): distrust the file.
            if size != self.header.file_size:
                state = "truncated" if size < self.header.file_size else "oversized"
                raise BadShardHeader(path, f"{state}: {size} bytes, expected {self.header.file_size}")
        except BaseException:
            self.close()
            raise

    @property
    def stripe_count(self) -> int:
        """
        @return: Number of blocks in the file.
        """
        return self.header.stripe_count

    def read_block(self, stripe_index: int) -> bytes:
        """
        Read one stripe's block and verify its checksum.

        @param stripe_index: C{0 <= stripe_index < stripe_count}.
        @return: The block's bytes.
        @raise IndexError: No such stripe.
        @raise CorruptShard: The block fails its checksum (for this stripe
            only: other blocks of the file may still be read).
        """
        if self._fd is None:
            raise ValueError("shard reader is closed")
        size = self.header.block_length(stripe_index)
        offset = self.header.block_offset(stripe_index)
        # Two preads instead of one that is then sliced: no 256 KiB copy.
        block = os.pread(self._fd, size, offset)
        trailer = os.pread(self._fd, TRAILER_SIZE, offset + size)
        if len(block) != size or len(trailer) != TRAILER_SIZE:
            raise CorruptShard(self.path, stripe_index, "short read (file truncated while open?)")
        (expected,) = _CRC.unpack(trailer)
        if _block_crc(block, self.header.shard_index, stripe_index) != expected:
            raise CorruptShard(self.path, stripe_index, "block checksum mismatch")
        return block

    def blocks(self, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        """
        Read and verify the blocks of stripes C{start} to C{stop - 1}.

        @param start: First stripe.
        @param stop: One past the last stripe; defaults to the end.
        @return: An iterator of blocks, raising L{CorruptShard} at a bad one.
        """
        if stop is None:
            stop = self.stripe_count
        if not 0 <= start <= stop <= self.stripe_count:
            raise IndexError(f"stripes {start}..{stop} outside 0..{self.stripe_count}")
        for index in range(start, stop):
            yield self.read_block(index)

    def verify(self) -> list[int]:
        """
        Check every block, for the scrubber.

        @return: Indices of the stripes whose block fails its checksum
            (empty when the shard is intact).
        """
        bad: list[int] = []
        for index in range(self.stripe_count):
            try:
                self.read_block(index)
            except CorruptShard:
                bad.append(index)
        return bad

    def close(self) -> None:
        """
        Close the file; safe to call more than once.
        """
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError as e:  # pragma: no cover - only EBADF/EINTR races
                if e.errno != errno.EBADF:
                    raise

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
