# -*- test-case-name: tests.test_shardstore -*-
"""
Tests for L{anvil.storage.shardstore}.
"""

from __future__ import annotations

import hashlib
import os
import shutil

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from anvil.storage.erasure import ErasureCodec, ErasureParams
from anvil.storage.shardfile import BadShardHeader, ShardWriter
from anvil.storage.shardstore import (
    DirCapacity,
    LocalShardStore,
    ShardLocation,
    ShardNotFound,
    parse_shard_cursor,
    rank_dirs,
    shard_cursor,
)

PARAMS = ErasureParams(4, 2, 64)


class StoreTestsMixin:
    """
    Builds a store over fresh directories and writes whole contents.
    """

    def make_store(self, count: int) -> LocalShardStore:
        """
        A store over C{count} new data directories.
        """
        base = self.mktemp()  # type: ignore[attr-defined]
        return LocalShardStore([os.path.join(base, f"disk{i}") for i in range(count)])

    def put(
        self, store: LocalShardStore, data: bytes, key: bytes | None = None
    ) -> tuple[bytes, list[ShardLocation]]:
        """
        Encode C{data} and commit all its shards; return the hash and locations.
        """
        digest = hashlib.sha256(data).digest()
        codec = ErasureCodec(PARAMS)
        writers = [store.open_writer(i, PARAMS, key or digest) for i in range(PARAMS.total)]
        for offset in range(0, len(data), PARAMS.stripe_size):
            for writer, block in zip(writers, codec.encode_stripe(data[offset : offset + PARAMS.stripe_size])):
                writer.write_block(block)
        return digest, [store.commit(w, digest, len(data)) for w in writers]

    def get(self, store: LocalShardStore, digest: bytes, indices: range | list[int]) -> bytes:
        """
        Read the content back from the given shard indices.
        """
        codec = ErasureCodec(PARAMS)
        readers = [store.open_reader(digest, i) for i in indices]
        try:
            length = readers[0].header.content_length
            out = b""
            for stripe in range(readers[0].stripe_count):
                blocks = {r.header.shard_index: r.read_block(stripe) for r in readers}
                out += codec.decode_stripe(blocks, PARAMS.stripe_length(stripe, length))
            return out
        finally:
            for r in readers:
                r.close()


class LocalShardStoreTests(StoreTestsMixin, SynchronousTestCase):
    """
    Tests for L{LocalShardStore}.
    """

    def test_layout(self) -> None:
        """
        Committed shards live at <dir>/shards/<h[:2]>/<h[2:4]>/<h>.<index>.
        """
        store = self.make_store(1)
        digest, locations = self.put(store, b"layout")
        name = digest.hex()
        for index, location in enumerate(locations):
            self.assertEqual(
                location.path,
                os.path.join(store.data_dirs[0], "shards", name[:2], name[2:4], f"{name}.{index}"),
            )
            self.assertTrue(os.path.isfile(location.path))
        self.assertEqual(os.listdir(os.path.join(store.data_dirs[0], "tmp")), [])

    def test_round_trip_from_any_k(self) -> None:
        """
        Content written through the store reads back from any k shards.
        """
        store = self.make_store(3)
        data = os.urandom(64 * 4 + 5)
        digest, _ = self.put(store, data)
        self.assertEqual(self.get(store, digest, range(4)), data)
        self.assertEqual(self.get(store, digest, [0, 2, 4, 5]), data)

    def test_spread_over_enough_dirs(self) -> None:
        """
        With at least k+m directories, every shard of a content is on a
        different directory, and the load spreads over all of them.
        """
        store = self.make_store(8)
        used: dict[str, int] = {}
        for n in range(30):
            _, locations = self.put(store, b"content %d" % n)
            dirs = [loc.data_dir for loc in locations]
            self.assertEqual(len(set(dirs)), PARAMS.total)
            for d in dirs:
                used[d] = used.get(d, 0) + 1
        self.assertEqual(set(used), set(store.data_dirs))

    def test_wrap_over_fewer_dirs(self) -> None:
        """
        With fewer directories than shards, shards wrap round so each
        directory holds ceil or floor of (k+m)/dirs shards of a content.
        """
        store = self.make_store(4)
        _, locations = self.put(store, b"wrap")
        counts = sorted([loc.data_dir for loc in locations].count(d) for d in store.data_dirs)
        self.assertEqual(counts, [1, 1, 2, 2])

    @settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.binary(min_size=1, max_size=40), st.integers(6, 12))
    def test_ranking_distinct(self, key: bytes, count: int) -> None:
        """
        Any key ranks every directory once, whatever their order, so the k+m
        shard indices land on distinct directories.
        """
        dirs = [f"/data/{i}" for i in range(count)]
        ranked = rank_dirs(key, dirs)
        self.assertEqual(sorted(ranked), sorted(dirs))
        self.assertEqual(rank_dirs(key, list(reversed(dirs))), ranked)
        chosen = [ranked[i % count] for i in range(PARAMS.total)]
        self.assertEqual(len(set(chosen)), PARAMS.total)

    def test_adding_a_dir_moves_little(self) -> None:
        """
        Adding a directory changes the first-ranked directory only for the
        keys that now rank the new directory first (rendezvous property).
        """
        dirs = [f"/data/{i}" for i in range(6)]
        moved = 0
        for n in range(600):
            key = b"key%d" % n
            before, after = rank_dirs(key, dirs)[0], rank_dirs(key, dirs + ["/data/new"])[0]
            if before != after:
                self.assertEqual(after, "/data/new")
                moved += 1
        # About 1/7 of the keys move; all to the new directory.
        self.assertTrue(40 < moved < 140, moved)

    def test_deterministic(self) -> None:
        """
        A second store over the same directories, listed in another order,
        places and finds shards identically.
        """
        store = self.make_store(6)
        digest, locations = self.put(store, b"again")
        other = LocalShardStore(list(reversed(store.data_dirs)))
        for location in locations:
            self.assertEqual(other.dir_for(digest, location.shard_index), location.data_dir)
            self.assertEqual(other.locate(digest, location.shard_index), location.path)

    def test_fallback_when_written_under_upload_key(self) -> None:
        """
        Shards placed by an upload key (hash unknown while writing) are
        still found by content hash, in whichever directory they are.
        """
        store = self.make_store(6)
        data = os.urandom(150)
        digest, locations = self.put(store, data, key=b"upload-1234")
        self.assertEqual(len({loc.data_dir for loc in locations}), 6)
        self.assertEqual(self.get(store, digest, [1, 3, 4, 5]), data)

    def test_found_after_moving_dirs(self) -> None:
        """
        A shard moved to another data directory by hand is still found.
        """
        store = self.make_store(2)
        digest, locations = self.put(store, b"moved")
        loc = locations[0]
        other = next(d for d in store.data_dirs if d != loc.data_dir)
        target = store.shard_path(other, digest, 0)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.move(loc.path, target)
        self.assertEqual(store.locate(digest, 0), target)
        with store.open_reader(digest, 0) as reader:
            self.assertEqual(reader.path, target)

    def test_not_found(self) -> None:
        """
        A missing shard raises L{ShardNotFound}.
        """
        store = self.make_store(2)
        digest = hashlib.sha256(b"nothing").digest()
        with self.assertRaises(ShardNotFound) as e:
            store.open_reader(digest, 0)
        self.assertEqual((e.exception.content_hash, e.exception.shard_index), (digest, 0))
        self.assertIsNone(store.locate(digest, 0))

    def test_commit_all(self) -> None:
        """
        commit_all commits every shard of a content and returns their
        locations in order.
        """
        store = self.make_store(1)
        data = os.urandom(60)
        digest = hashlib.sha256(data).digest()
        writers = [store.open_writer(i, PARAMS, digest) for i in range(6)]
        for writer, block in zip(writers, ErasureCodec(PARAMS).encode_stripe(data)):
            writer.write_block(block)
        locations = store.commit_all(writers, digest, len(data))
        self.assertEqual([loc.shard_index for loc in locations], list(range(6)))
        self.assertEqual(self.get(store, digest, [2, 3, 4, 5]), data)
        self.assertEqual(os.listdir(os.path.join(store.data_dirs[0], "tmp")), [])

    def test_commit_all_failure_aborts_all(self) -> None:
        """
        When one shard cannot be finished, commit_all commits none and
        removes every temporary file.
        """
        store = self.make_store(2)
        data = os.urandom(64)
        digest = hashlib.sha256(data).digest()
        writers = [store.open_writer(i, PARAMS, digest) for i in range(6)]
        for writer, block in zip(writers[:5], ErasureCodec(PARAMS).encode_stripe(data)):
            writer.write_block(block)
        self.assertRaises(ValueError, store.commit_all, writers, digest, len(data))
        self.assertEqual(list(store.list_shards()), [])
        for d in store.data_dirs:
            self.assertEqual(os.listdir(os.path.join(d, "tmp")), [])

    def test_temporary_not_visible(self) -> None:
        """
        A shard being written is neither readable nor listed until committed.
        """
        store = self.make_store(2)
        digest = hashlib.sha256(b"x").digest()
        writer = store.open_writer(0, PARAMS, digest)
        writer.write_block(b"x")
        self.assertRaises(ShardNotFound, store.open_reader, digest, 0)
        self.assertEqual(list(store.list_shards()), [])
        writer.finish(digest, 1)
        self.assertRaises(ShardNotFound, store.open_reader, digest, 0)
        store.commit(writer, digest, 1)
        with store.open_reader(digest, 0) as reader:
            self.assertEqual(reader.read_block(0), b"x")

    def test_temporary_on_same_filesystem(self) -> None:
        """
        The temporary file is in the tmp/ directory of the data directory
        the shard is committed to.
        """
        store = self.make_store(3)
        digest = hashlib.sha256(b"y").digest()
        writer = store.open_writer(2, PARAMS, digest)
        self.assertEqual(os.path.dirname(writer.path), os.path.join(store.dir_for(digest, 2), "tmp"))
        writer.write_block(b"y")
        location = store.commit(writer, digest, 1)
        self.assertEqual(location.data_dir, store.dir_for(digest, 2))
        self.assertFalse(os.path.exists(writer.path))

    def test_abort_leaves_nothing(self) -> None:
        """
        Aborting a writer removes its temporary file and commits nothing.
        """
        store = self.make_store(2)
        digest = hashlib.sha256(b"z").digest()
        writer = store.open_writer(1, PARAMS, digest)
        writer.write_block(b"z" * 16)
        writer.abort()
        for d in store.data_dirs:
            self.assertEqual(os.listdir(os.path.join(d, "tmp")), [])
        self.assertEqual(list(store.list_shards()), [])

    def test_failed_commit_aborts(self) -> None:
        """
        A commit whose content length disagrees with the blocks fails and
        removes the temporary file.
        """
        store = self.make_store(1)
        digest = hashlib.sha256(b"w").digest()
        writer = store.open_writer(0, PARAMS, digest)
        writer.write_block(b"w" * 16)
        self.assertRaises(ValueError, store.commit, writer, digest, 1000)
        self.assertFalse(os.path.exists(writer.path))
        self.assertRaises(ShardNotFound, store.open_reader, digest, 0)

    def test_misnamed_file_refused(self) -> None:
        """
        A shard file under another shard's name is refused as corrupt.
        """
        store = self.make_store(1)
        digest, locations = self.put(store, b"renamed")
        os.replace(locations[1].path, locations[0].path)
        self.assertRaises(BadShardHeader, store.open_reader, digest, 0)

    def test_list_and_delete(self) -> None:
        """
        list_shards finds every committed shard, ignores stray files, and
        delete removes a shard from every directory holding it.
        """
        store = self.make_store(3)
        a, _ = self.put(store, b"first")
        b, _ = self.put(store, b"second")
        with open(os.path.join(store.data_dirs[0], "shards", "README"), "w") as f:
            f.write("not a shard")
        listed = sorted((loc.content_hash, loc.shard_index) for loc in store.list_shards())
        self.assertEqual(listed, sorted((h, i) for h in (a, b) for i in range(6)))
        for loc in store.list_shards():
            self.assertTrue(os.path.isfile(loc.path))
        # A duplicate copy in a second directory is removed too.
        path = store.locate(a, 0)
        assert path is not None
        other = next(d for d in store.data_dirs if not path.startswith(d + os.sep))
        duplicate = store.shard_path(other, a, 0)
        os.makedirs(os.path.dirname(duplicate), exist_ok=True)
        shutil.copy(path, duplicate)
        self.assertTrue(store.delete(a, 0))
        self.assertIsNone(store.locate(a, 0))
        self.assertFalse(store.delete(a, 0))
        remaining = {(loc.content_hash, loc.shard_index) for loc in store.list_shards()}
        self.assertNotIn((a, 0), remaining)
        self.assertEqual(len(remaining), 11)

    def test_delete_content(self) -> None:
        """
        delete_content removes every shard of one content from every
        directory, duplicates included, and leaves other contents alone.
        """
        store = self.make_store(3)
        a, _ = self.put(store, b"first")
        b, _ = self.put(store, b"second")
        path = store.locate(a, 2)
        assert path is not None
        other = next(d for d in store.data_dirs if not path.startswith(d + os.sep))
        duplicate = store.shard_path(other, a, 2)
        os.makedirs(os.path.dirname(duplicate), exist_ok=True)
        shutil.copy(path, duplicate)
        self.assertEqual(store.delete_content(a), 7)
        self.assertEqual(store.delete_content(a), 0)
        remaining = {(loc.content_hash, loc.shard_index) for loc in store.list_shards()}
        self.assertEqual(remaining, {(b, i) for i in range(6)})

    def test_list_page(self) -> None:
        """
        list_page pages through every shard once, in (hash, numeric index)
        order, with sizes, listing a duplicate once.
        """
        store = self.make_store(3)
        params = ErasureParams(10, 2, 640)
        digests = []
        for n in range(4):
            data = bytes([n]) * 1000
            digest = hashlib.sha256(data).digest()
            codec = ErasureCodec(params)
            writers = [store.open_writer(i, params, digest) for i in range(params.total)]
            for offset in range(0, len(data), params.stripe_size):
                stripe = data[offset : offset + params.stripe_size]
                for writer, block in zip(writers, codec.encode_stripe(stripe)):
                    writer.write_block(block)
            for writer in writers:
                store.commit(writer, digest, len(data))
            digests.append(digest.hex())
        path = store.locate(bytes.fromhex(digests[0]), 11)
        assert path is not None
        other = next(d for d in store.data_dirs if not path.startswith(d + os.sep))
        duplicate = store.shard_path(other, bytes.fromhex(digests[0]), 11)
        os.makedirs(os.path.dirname(duplicate), exist_ok=True)
        shutil.copy(path, duplicate)
        expected = sorted((h, i) for h in digests for i in range(12))
        seen: list[tuple[str, int]] = []
        cursor = ""
        while True:
            page = store.list_page(cursor, limit=5)
            if not page:
                break
            self.assertLessEqual(len(page), 5)
            for location, size in page:
                self.assertEqual(size, os.path.getsize(location.path))
                seen.append((location.content_hash.hex(), location.shard_index))
            last = page[-1][0]
            cursor = shard_cursor(last.content_hash.hex(), last.shard_index)
        self.assertEqual(seen, expected)
        self.assertEqual(parse_shard_cursor(cursor), expected[-1])

    def test_list_page_bad_cursor(self) -> None:
        """
        A malformed cursor or limit is refused.
        """
        store = self.make_store(1)
        self.assertRaises(ValueError, store.list_page, "zz.1")
        self.assertRaises(ValueError, store.list_page, "", 0)
        self.assertIsNone(parse_shard_cursor(""))

    def test_clean_temporary(self) -> None:
        """
        Old leftover temporary files are removed; recent ones and those of
        writers still open are kept.
        """
        store = self.make_store(2)
        digest = hashlib.sha256(b"t").digest()
        live = store.open_writer(0, PARAMS, digest)
        self.addCleanup(live.abort)
        stale = os.path.join(store.data_dirs[1], "tmp", "deadbeef.3.tmp")
        fresh = os.path.join(store.data_dirs[0], "tmp", "cafebabe.1.tmp")
        for path in (stale, fresh):
            with open(path, "wb") as f:
                f.write(b"partial")
        os.utime(stale, (1000.0, 1000.0))
        os.utime(live.path, (1000.0, 1000.0))
        with capturedLogs() as events:
            removed = store.clean_temporary(older_than=3600, now=os.stat(fresh).st_mtime + 10)
        self.assertEqual(removed, 1)
        self.assertFalse(os.path.exists(stale))
        self.assertTrue(os.path.exists(fresh))
        self.assertTrue(os.path.exists(live.path))
        self.assertEqual([e["path"] for e in events if e["log_level"] == LogLevel.info], [stale])
        # After a crash nothing is in flight: everything old enough goes.
        live.abort()
        self.assertEqual(store.clean_temporary(older_than=0), 1)
        self.assertEqual(os.listdir(os.path.join(store.data_dirs[0], "tmp")), [])

    def test_capacity(self) -> None:
        """
        capacity and used_bytes report statvfs figures for a data directory.
        """
        store = self.make_store(2)
        cap = store.capacity(store.data_dirs[0])
        self.assertIsInstance(cap, DirCapacity)
        self.assertTrue(0 < cap.used_bytes <= cap.total_bytes)
        self.assertTrue(0 <= cap.available_bytes <= cap.total_bytes)
        self.assertEqual(store.used_bytes(store.data_dirs[0]) // 2**20, cap.used_bytes // 2**20)
        self.assertRaises(ValueError, store.capacity, "/somewhere/else")

    def test_configuration_errors(self) -> None:
        """
        No directories, or one directory twice, is refused.
        """
        self.assertRaises(ValueError, LocalShardStore, [])
        d = self.mktemp()
        self.assertRaises(ValueError, LocalShardStore, [d, d + "/"])

    def test_bad_hash(self) -> None:
        """
        A content hash that is not a 32-byte digest is refused.
        """
        store = self.make_store(1)
        self.assertRaises(ValueError, store.open_reader, b"short", 0)
        self.assertRaises(ValueError, store.shard_path, store.data_dirs[0], "ab" * 32, 0)  # type: ignore[arg-type]

    def test_writer_type(self) -> None:
        """
        open_writer returns a ShardWriter for the requested shard index.
        """
        store = self.make_store(1)
        writer = store.open_writer(5, PARAMS, b"key")
        self.addCleanup(writer.abort)
        self.assertIsInstance(writer, ShardWriter)
        self.assertEqual(writer.shard_index, 5)
