# -*- test-case-name: tests.test_shardfile -*-
"""
Tests for L{anvil.storage.shardfile}.
"""

from __future__ import annotations

import hashlib
import os
import struct
import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from anvil.storage.erasure import ErasureCodec, ErasureParams
from anvil.storage.shardfile import (
    HEADER_SIZE,
    MAGIC,
    TRAILER_SIZE,
    BadShardHeader,
    CorruptShard,
    ShardHeader,
    ShardReader,
    ShardWriter,
)

PARAMS = ErasureParams(4, 2, 64)


def _encode(params: ErasureParams, data: bytes) -> list[list[bytes]]:
    """
    Encode C{data} and return, for each shard index, its blocks in order.
    """
    codec = ErasureCodec(params)
    shards: list[list[bytes]] = [[] for _ in range(params.total)]
    for offset in range(0, len(data), params.stripe_size):
        for index, block in enumerate(codec.encode_stripe(data[offset : offset + params.stripe_size])):
            shards[index].append(bytes(block))
    return shards


class ShardFileTestsMixin:
    """
    Helpers writing shard files into a fresh temporary directory.
    """

    def setUp(self) -> None:
        self.dir = self.mktemp()  # type: ignore[attr-defined]
        os.makedirs(self.dir)

    def write_shard(
        self, data: bytes, shard_index: int = 0, params: ErasureParams = PARAMS, name: str = "s"
    ) -> tuple[str, list[bytes]]:
        """
        Write and commit one shard of C{data}; return its path and blocks.
        """
        blocks = _encode(params, data)[shard_index]
        writer = ShardWriter(os.path.join(self.dir, name + ".tmp"), shard_index=shard_index, params=params)
        for block in blocks:
            writer.write_block(block)
        writer.finish(hashlib.sha256(data).digest(), len(data))
        final = os.path.join(self.dir, "final", name)
        writer.commit(final)
        return final, blocks


class ShardRoundTripTests(ShardFileTestsMixin, SynchronousTestCase):
    """
    Writing then reading shard files.
    """

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.integers(0, 64 * 5 + 7), st.integers(0, 5))
    def test_round_trip(self, length: int, shard_index: int) -> None:
        """
        A shard of any content length reads back block for block, with the
        header describing the content.
        """
        data = os.urandom(length)
        path, blocks = self.write_shard(data, shard_index, name=f"s{length}.{shard_index}")
        with ShardReader(path) as reader:
            self.assertEqual(reader.header.content_hash, hashlib.sha256(data).digest())
            self.assertEqual(reader.header.shard_index, shard_index)
            self.assertEqual(reader.header.params, PARAMS)
            self.assertEqual(reader.header.content_length, length)
            self.assertEqual(reader.stripe_count, len(blocks))
            self.assertEqual(list(reader.blocks()), blocks)
            self.assertEqual(reader.verify(), [])
            self.assertEqual(os.path.getsize(path), reader.header.file_size)

    def test_decode_from_shard_files(self) -> None:
        """
        Blocks read from any k shard files decode back to the content.
        """
        data = os.urandom(64 * 3 + 10)
        paths = [self.write_shard(data, i, name=f"x{i}")[0] for i in range(6)]
        codec = ErasureCodec(PARAMS)
        readers = [ShardReader(p) for p in paths[2:]]
        out = b""
        for stripe in range(readers[0].stripe_count):
            got = {r.header.shard_index: r.read_block(stripe) for r in readers}
            out += codec.decode_stripe(got, PARAMS.stripe_length(stripe, len(data)))
        for r in readers:
            r.close()
        self.assertEqual(out, data)

    def test_range_read_seeks(self) -> None:
        """
        A single block in the middle is read without the earlier ones, and
        blocks(start, stop) returns just that span.
        """
        data = os.urandom(64 * 10)
        path, blocks = self.write_shard(data, 3)
        with ShardReader(path) as reader:
            self.assertEqual(reader.read_block(7), blocks[7])
            self.assertEqual(list(reader.blocks(4, 6)), blocks[4:6])
            self.assertEqual(list(reader.blocks(6, 6)), [])
            self.assertRaises(IndexError, reader.read_block, 10)
            self.assertRaises(IndexError, list, reader.blocks(5, 11))

    def test_header_layout(self) -> None:
        """
        The header starts with the magic, version 1 and its own length.
        """
        path, _ = self.write_shard(b"hello")
        with open(path, "rb") as f:
            raw = f.read(HEADER_SIZE)
        self.assertEqual(raw[:8], MAGIC)
        self.assertEqual(struct.unpack(">HH", raw[8:12]), (1, HEADER_SIZE))
        self.assertEqual(raw[14:46], hashlib.sha256(b"hello").digest())

    def test_empty_content(self) -> None:
        """
        An empty content's shard is just a header.
        """
        path, blocks = self.write_shard(b"")
        self.assertEqual(blocks, [])
        self.assertEqual(os.path.getsize(path), HEADER_SIZE)
        with ShardReader(path) as reader:
            self.assertEqual((reader.stripe_count, reader.verify()), (0, []))

    def test_commit_replaces_existing(self) -> None:
        """
        Committing over an existing shard replaces it atomically.
        """
        path, _ = self.write_shard(b"a" * 100, name="dup")
        path2, blocks = self.write_shard(b"a" * 100, name="dup")
        self.assertEqual(path, path2)
        with ShardReader(path) as reader:
            self.assertEqual(list(reader.blocks()), blocks)


class ShardWriterTests(ShardFileTestsMixin, SynchronousTestCase):
    """
    Tests for L{ShardWriter}'s protocol and checks.
    """

    def test_temporary_not_valid(self) -> None:
        """
        Until finish() the temporary file has no valid header.
        """
        path = os.path.join(self.dir, "t.tmp")
        writer = ShardWriter(path, shard_index=0, params=PARAMS)
        writer.write_block(b"x" * 16)
        self.assertRaises(BadShardHeader, ShardReader, path)
        writer.abort()

    def test_abort_removes_temporary(self) -> None:
        """
        abort() removes the temporary file, and may be called twice.
        """
        path = os.path.join(self.dir, "t.tmp")
        writer = ShardWriter(path, shard_index=0, params=PARAMS)
        writer.write_block(b"x" * 16)
        writer.abort()
        writer.abort()
        self.assertFalse(os.path.exists(path))
        self.assertRaises(ValueError, writer.write_block, b"x" * 16)

    def test_context_manager_aborts(self) -> None:
        """
        Leaving the context without commit removes the temporary file.
        """
        path = os.path.join(self.dir, "t.tmp")
        with self.assertRaises(RuntimeError):
            with ShardWriter(path, shard_index=0, params=PARAMS) as writer:
                writer.write_block(b"x" * 16)
                raise RuntimeError("client went away")
        self.assertFalse(os.path.exists(path))

    def test_on_close_called_once(self) -> None:
        """
        The on_close hook runs once after commit or abort.
        """
        calls: list[ShardWriter] = []
        writer = ShardWriter(os.path.join(self.dir, "a.tmp"), shard_index=0, params=PARAMS, on_close=calls.append)
        writer.abort()
        writer.abort()
        self.assertEqual(calls, [writer])

    def test_commit_requires_finish(self) -> None:
        """
        commit() before finish() is refused.
        """
        writer = ShardWriter(os.path.join(self.dir, "t.tmp"), shard_index=0, params=PARAMS)
        self.addCleanup(writer.abort)
        self.assertRaises(ValueError, writer.commit, os.path.join(self.dir, "final"))

    def test_exclusive_create(self) -> None:
        """
        A temporary path already in use is not clobbered.
        """
        path = os.path.join(self.dir, "t.tmp")
        writer = ShardWriter(path, shard_index=0, params=PARAMS)
        self.addCleanup(writer.abort)
        self.assertRaises(FileExistsError, ShardWriter, path, shard_index=0, params=PARAMS)

    def test_block_length_checks(self) -> None:
        """
        Oversized and empty blocks, blocks after a short one, and a content
        length disagreeing with the blocks are refused.
        """
        writer = ShardWriter(os.path.join(self.dir, "t.tmp"), shard_index=0, params=PARAMS)
        self.addCleanup(writer.abort)
        self.assertRaises(ValueError, writer.write_block, b"x" * 17)
        self.assertRaises(ValueError, writer.write_block, b"")
        writer.write_block(b"x" * 16)
        writer.write_block(b"x" * 3)
        self.assertRaises(ValueError, writer.write_block, b"x" * 3)
        digest = hashlib.sha256(b"").digest()
        # 2 blocks: content of 65..128 bytes; last block of 3 means 9..12 bytes in stripe 1.
        self.assertRaises(ValueError, writer.finish, digest, 64)
        self.assertRaises(ValueError, writer.finish, digest, 64 + 13)
        self.assertRaises(ValueError, writer.finish, digest, 64 + 8)
        writer.finish(digest, 64 + 12)
        self.assertRaises(ValueError, writer.finish, digest, 64 + 12)

    def test_bad_shard_index(self) -> None:
        """
        A shard index outside 0..k+m-1 is refused before creating a file.
        """
        path = os.path.join(self.dir, "t.tmp")
        self.assertRaises(ValueError, ShardWriter, path, shard_index=6, params=PARAMS)
        self.assertFalse(os.path.exists(path))


class CorruptionTests(ShardFileTestsMixin, SynchronousTestCase):
    """
    Damage to shard files is detected.
    """

    def flip(self, path: str, offset: int, mask: int = 0x01) -> None:
        """
        XOR one byte of the file at C{offset} with C{mask}.
        """
        with open(path, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ mask]))

    @settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.data())
    def test_flipped_byte_detected_for_that_stripe_only(self, data: st.DataObject) -> None:
        """
        A flipped byte anywhere in a block or its checksum is reported as
        CorruptShard for that stripe, and every other stripe still reads.
        """
        content = bytes(range(256)) * 2 + b"tail"
        path, blocks = self.write_shard(content, 4, name="flip")
        with ShardReader(path) as reader:
            stripe = data.draw(st.integers(0, reader.stripe_count - 1))
            size = reader.header.block_length(stripe)
            position = data.draw(st.integers(0, size + TRAILER_SIZE - 1))
            mask = data.draw(st.integers(1, 255))
            self.flip(path, reader.header.block_offset(stripe) + position, mask)
            with self.assertRaises(CorruptShard) as e:
                reader.read_block(stripe)
            self.assertEqual(e.exception.stripe_index, stripe)
            self.assertEqual(reader.verify(), [stripe])
            for other in range(reader.stripe_count):
                if other != stripe:
                    self.assertEqual(reader.read_block(other), blocks[other])
        # Put it back for the next example.
        self.flip(path, reader.header.block_offset(stripe) + position, mask)

    def test_swapped_blocks_detected(self) -> None:
        """
        Two full blocks swapped in place fail their checks even though each
        block and checksum is intact.
        """
        content = os.urandom(64 * 3)
        path, blocks = self.write_shard(content, 1)
        with open(path, "r+b") as f:
            unit = 16 + TRAILER_SIZE
            f.seek(HEADER_SIZE)
            first, second = f.read(unit), f.read(unit)
            f.seek(HEADER_SIZE)
            f.write(second + first)
        with ShardReader(path) as reader:
            self.assertEqual(reader.verify(), [0, 1])

    def test_block_from_other_shard_detected(self) -> None:
        """
        A block with its checksum copied from another shard index fails.
        """
        content = os.urandom(64)
        a, _ = self.write_shard(content, 0, name="a")
        b, _ = self.write_shard(content, 1, name="b")
        with open(a, "rb") as f:
            raw = f.read()
        with open(b, "r+b") as f:
            f.seek(HEADER_SIZE)
            f.write(raw[HEADER_SIZE:])
        with ShardReader(b) as reader:
            self.assertEqual(reader.verify(), [0])

    def test_truncated(self) -> None:
        """
        A truncated file is refused at open as a bad shard.
        """
        path, _ = self.write_shard(os.urandom(200))
        os.truncate(path, os.path.getsize(path) - 1)
        with self.assertRaises(BadShardHeader) as e:
            ShardReader(path)
        self.assertIn("truncated", str(e.exception))
        os.truncate(path, 10)
        self.assertRaises(BadShardHeader, ShardReader, path)
        os.truncate(path, 0)
        self.assertRaises(BadShardHeader, ShardReader, path)

    def test_appended_garbage(self) -> None:
        """
        Extra bytes after the last block make the file suspect.
        """
        path, _ = self.write_shard(os.urandom(200))
        with open(path, "ab") as f:
            f.write(b"junk")
        self.assertRaises(BadShardHeader, ShardReader, path)

    def test_bad_header_bytes(self) -> None:
        """
        A flipped byte anywhere in the header is detected.
        """
        path, _ = self.write_shard(os.urandom(100))
        for offset in range(HEADER_SIZE):
            self.flip(path, offset)
            self.assertRaises(BadShardHeader, ShardReader, path)
            self.flip(path, offset)
        ShardReader(path).close()

    def test_unknown_version(self) -> None:
        """
        A header of another format version is refused even with a valid checksum.
        """
        path, _ = self.write_shard(os.urandom(100))
        with open(path, "r+b") as f:
            raw = bytearray(f.read(HEADER_SIZE))
            raw[8:10] = (2).to_bytes(2, "big")
            raw[72:76] = zlib.crc32(bytes(raw[:72])).to_bytes(4, "big")
            f.seek(0)
            f.write(raw)
        with self.assertRaises(BadShardHeader) as e:
            ShardReader(path)
        self.assertIn("version", str(e.exception))

    def test_inconsistent_header_fields(self) -> None:
        """
        A checksummed header whose fields disagree (stripe count, k) is refused.
        """
        good = ShardHeader(b"\0" * 32, 0, PARAMS, 100).pack()
        for offset, value in [(64, b"\0" * 7 + b"\x09"), (48, b"\0\0")]:
            raw = bytearray(good)
            raw[offset : offset + len(value)] = value
            raw[72:76] = zlib.crc32(bytes(raw[:72])).to_bytes(4, "big")
            self.assertRaises(BadShardHeader, ShardHeader.unpack, bytes(raw))
        self.assertEqual(ShardHeader.unpack(good).content_length, 100)

    def test_not_a_shard(self) -> None:
        """
        An arbitrary file is refused for its magic.
        """
        path = os.path.join(self.dir, "random")
        with open(path, "wb") as f:
            f.write(os.urandom(500))
        with self.assertRaises(BadShardHeader) as e:
            ShardReader(path)
        self.assertIn("magic", str(e.exception))
        self.assertIsNone(e.exception.stripe_index)
