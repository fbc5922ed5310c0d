# -*- test-case-name: tests.test_objects -*-
"""
Tests for L{anvil.meta.objects.ObjectStore} objects and contents (the
write-commit protocol, reference counts, concurrency) and for the records of
L{anvil.meta.records}, on a real PostgreSQL.

The helper functions at the top are also used by the listing and multipart
tests.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anvil.errors import InvalidArgument
from anvil.meta.database import Database
from anvil.meta.migrate import apply_migrations
from anvil.meta.objects import (
    ContentMissingError,
    KeyTooLongError,
    ObjectStore,
    check_key,
    key_successor,
    multipart_etag,
)
from anvil.meta.records import ContentRecord, ManifestPart, ObjectRecord, truncate_to_ms
from tests.pg import fresh_database

WHEN = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


# -- helpers shared with test_listing and test_multipart_meta ------------------


async def regional_database(testcase: TestCase, pool_size: int = 2) -> tuple[str, Database]:
    """
    A fresh, migrated regional database for one test, closed in cleanup.

    @return: its DSN (to open more connections) and a pool.
    """
    dsn = fresh_database(testcase)
    db = await Database.connect(dsn, reactor, pool_size=pool_size)
    testcase.addCleanup(db.close)
    await apply_migrations(db, "regional")
    return dsn, db


def content_of(data: bytes, inline: bool = True, shard_map: dict[str, Any] | None = None) -> ContentRecord:
    """
    The content record of C{data} (inline, or with a made-up shard map).
    """
    return ContentRecord(
        hash=hashlib.sha256(data).hexdigest(),
        size=len(data),
        k=4,
        m=2,
        stripe_size=1 << 20,
        shard_map={} if inline else (shard_map or {str(i): f"/d{i}" for i in range(6)}),
        inline_data=data if inline else None,
    )


def object_of(
    bucket_id: int, key: str, data: bytes, when: datetime = WHEN, **fields: Any
) -> tuple[ObjectRecord, ContentRecord]:
    """
    A simple (one-piece) object holding C{data}, and its content.
    """
    content = content_of(data)
    record = ObjectRecord(
        bucket_id=bucket_id,
        key=key,
        size=len(data),
        etag=hashlib.md5(data).hexdigest(),
        content_type=fields.pop("content_type", "text/plain"),
        user_metadata=fields.pop("user_metadata", {}),
        system_metadata=fields.pop("system_metadata", {}),
        checksums=fields.pop("checksums", {}),
        manifest=[ManifestPart(content.hash, 0, len(data))],
        last_modified=when,
        **fields,
    )
    return record, content


async def put(store: ObjectStore, bucket_id: int, key: str, data: bytes) -> ObjectRecord | None:
    """
    Store a simple object; return the one it replaced.
    """
    record, content = object_of(bucket_id, key, data)
    return await store.put_object(record, [content])


async def refcount_errors(db: Database) -> list[tuple[Any, ...]]:
    """
    The contents whose refcount is not the number of live manifest pieces
    and multipart parts naming them, or whose release time disagrees with
    a zero refcount: C{[]} when every count is exact.
    """
    return await db.run_query(
        """
        WITH refs AS (
            SELECT e->>'hash' AS hash, count(*) AS n
              FROM objects o, jsonb_array_elements(o.manifest) e
             WHERE o.deleted_at IS NULL GROUP BY 1
            UNION ALL
            SELECT content_hash, count(*) FROM multipart_parts GROUP BY 1
        ),
        expected AS (SELECT hash, sum(n)::int AS n FROM refs GROUP BY hash)
        SELECT coalesce(c.hash, e.hash), c.refcount, coalesce(e.n, 0), c.released_at
          FROM contents c FULL JOIN expected e ON e.hash = c.hash
         WHERE c.refcount IS DISTINCT FROM coalesce(e.n, 0)
            OR (c.refcount = 0) <> (c.released_at IS NOT NULL)
        """
    )


async def refcount(db: Database, data: bytes) -> int | None:
    """
    The refcount of C{data}'s content, or C{None} when it has no row.
    """
    rows = await db.run_query(
        "SELECT refcount FROM contents WHERE hash = %s", (hashlib.sha256(data).hexdigest(),)
    )
    return rows[0][0] if rows else None


# -- records -------------------------------------------------------------------


class RecordTests(SynchronousTestCase):
    """
    Pure helpers of the records and key arithmetic.
    """

    def test_truncate_to_ms(self) -> None:
        """
        Times are kept in UTC to the millisecond; naive times are UTC.
        """
        self.assertEqual(truncate_to_ms(WHEN), WHEN.replace(microsecond=123000))
        other_zone = WHEN.astimezone(timezone(timedelta(hours=5)))
        self.assertEqual(truncate_to_ms(other_zone).tzinfo, UTC)
        self.assertEqual(truncate_to_ms(other_zone), WHEN.replace(microsecond=123000))
        self.assertEqual(
            truncate_to_ms(datetime(2024, 1, 1, 0, 0, 0, 999999)),
            datetime(2024, 1, 1, 0, 0, 0, 999000, tzinfo=UTC),
        )

    def test_manifest_json(self) -> None:
        """
        Manifest pieces survive their JSON form; simple pieces have no part.
        """
        for piece in (ManifestPart("a" * 64, 0, 10), ManifestPart("b" * 64, 10, 5, 2)):
            self.assertEqual(ManifestPart.from_json(piece.to_json()), piece)
            self.assertEqual(piece.part_size, piece.length)
        self.assertNotIn("part", ManifestPart("a" * 64, 0, 10).to_json())

    def test_part_range(self) -> None:
        """
        Part N of a multipart object is its Nth piece; a simple object has
        one part, the whole object.
        """
        simple, _ = object_of(1, "k", b"hello")
        self.assertEqual(simple.part_range(1), (0, 5))
        self.assertIsNone(simple.part_range(2))
        self.assertIsNone(simple.part_range(0))
        multi = ObjectRecord(
            1, "k", 12, "x-3", "t", {}, {}, {},
            [ManifestPart("a" * 64, 0, 5, 1), ManifestPart("b" * 64, 5, 5, 2), ManifestPart("c" * 64, 10, 2, 3)],
            WHEN, 3,
        )
        self.assertEqual([multi.part_range(n) for n in range(5)], [None, (0, 5), (5, 10), (10, 12), None])
        self.assertEqual(multi.content_hashes, ["a" * 64, "b" * 64, "c" * 64])

    @given(
        lengths=st.lists(st.integers(0, 20), min_size=1, max_size=6),
        data=st.data(),
    )
    def test_segments(self, lengths: list[int], data: st.DataObject) -> None:
        """
        The segments of any byte range, read from the contents, are exactly
        those bytes of the object.
        """
        blobs = [bytes([65 + i]) * n for i, n in enumerate(lengths)]
        manifest = []
        offset = 0
        for i, blob in enumerate(blobs):
            manifest.append(ManifestPart(f"{i:064x}", offset, len(blob), i + 1))
            offset += len(blob)
        whole = b"".join(blobs)
        record = ObjectRecord(1, "k", len(whole), "e", "t", {}, {}, {}, manifest, WHEN, len(blobs))
        start = data.draw(st.integers(0, len(whole)))
        stop = data.draw(st.integers(start, len(whole)))
        pieces = record.segments(start, stop)
        read = b"".join(blobs[int(s.piece.content_hash, 16)][s.start : s.stop] for s in pieces)
        self.assertEqual(read, whole[start:stop])
        self.assertTrue(all(s.start < s.stop for s in pieces))
        self.assertRaises(ValueError, record.segments, 0, len(whole) + 1)

    def test_key_successor(self) -> None:
        """
        The successor of a prefix bounds the keys starting with it, skipping
        the surrogates and carrying past U+10FFFF.
        """
        self.assertEqual(key_successor("a/"), "a0")
        self.assertEqual(key_successor("a\U0010ffff"), "b")
        self.assertEqual(key_successor("\ud7ff"), "\ue000")
        self.assertIsNone(key_successor("\U0010ffff\U0010ffff"))
        self.assertIsNone(key_successor(""))

    @given(st.text(min_size=1), st.text())
    def test_key_successor_bounds(self, prefix: str, key: str) -> None:
        """
        A key starts with a prefix exactly when it lies in
        [prefix, successor), in UTF-8 byte order.
        """
        successor = key_successor(prefix)
        encoded = key.encode("utf-8", "surrogatepass")
        inside = prefix.encode("utf-8", "surrogatepass") <= encoded and (
            successor is None or encoded < successor.encode("utf-8", "surrogatepass")
        )
        self.assertEqual(inside, key.startswith(prefix))

    def test_check_key(self) -> None:
        """
        Keys are non-empty UTF-8 without NUL of at most 1024 bytes.
        """
        for key in ("a", " ", "%2F+..//", "/lead", "trail/", "é" * 512, "x" * 1024):
            check_key(key)
        self.assertRaises(KeyTooLongError, check_key, "x" * 1025)
        self.assertRaises(KeyTooLongError, check_key, "é" * 513)
        for bad in ("", "a\x00b", "\udc80"):
            self.assertRaises(InvalidArgument, check_key, bad)

    def test_multipart_etag(self) -> None:
        """
        The multipart ETag is the MD5 of the binary part MD5s with the part
        count, whatever quotes the part ETags carry.
        """
        md5s = [hashlib.md5(b"one").hexdigest(), hashlib.md5(b"two").hexdigest()]
        expected = hashlib.md5(hashlib.md5(b"one").digest() + hashlib.md5(b"two").digest()).hexdigest()
        self.assertEqual(multipart_etag(md5s), expected + "-2")
        self.assertEqual(multipart_etag([f'"{m}"' for m in md5s]), expected + "-2")


# -- objects and contents ------------------------------------------------------


class ObjectStoreTests(TestCase):
    """
    Storing, reading, replacing and deleting objects, with exact reference
    counts.
    """

    async def setUp(self) -> None:
        self.dsn, self.db = await regional_database(self)
        self.store = ObjectStore(self.db)
        # Cleanups run last first: this one before the pool is closed.
        self.addCleanup(self._check_refcounts)

    async def _check_refcounts(self) -> None:
        self.assertEqual(await refcount_errors(self.db), [])

    async def test_put_get(self) -> None:
        """
        An object reads back as written, its time in UTC to the
        millisecond, its content with the inline bytes.
        """
        record, content = object_of(
            7, "dir/file.txt", b"hello",
            content_type="text/x-test",
            user_metadata={"colour": "blue", "ünï": "çødé"},
            system_metadata={"cache-control": "no-cache"},
            checksums={"crc32": "NhCmhg=="},
        )
        self.assertIsNone(await self.store.put_object(record, [content]))
        got = await self.store.get_object(7, "dir/file.txt")
        self.assertEqual(got, record.__class__(**{**record.__dict__, "last_modified": truncate_to_ms(WHEN)}))
        self.assertEqual(got.last_modified.tzinfo, UTC)
        self.assertEqual(got.last_modified.microsecond, 123000)
        self.assertIsNone(await self.store.get_object(8, "dir/file.txt"))
        self.assertIsNone(await self.store.get_object(7, "dir/file.tx"))
        contents = await self.store.get_contents([content.hash, "0" * 64])
        self.assertEqual(contents, {content.hash: content})
        self.assertEqual(await self.store.content_state(content.hash), "present")
        self.assertEqual(await self.store.content_state("0" * 64), "absent")
        self.assertEqual(await refcount(self.db, b"hello"), 1)

    async def test_special_keys(self) -> None:
        """
        Keys with any UTF-8 (spaces, '+', '%', '..', leading and trailing
        '/', LIKE metacharacters, astral characters) are distinct keys.
        """
        keys = ["a b", "a+b", "a%b", "a_b", "../..", "/lead", "trail/", "//", "%", "_", "\\", "😀", "\U0010ffff", "a\x01"]
        for i, key in enumerate(keys):
            await put(self.store, 1, key, str(i).encode())
        for i, key in enumerate(keys):
            got = await self.store.get_object(1, key)
            self.assertEqual(got.etag, hashlib.md5(str(i).encode()).hexdigest(), key)
        self.assertIsNone(await self.store.get_object(1, "a\x00b"))
        with self.assertRaises(InvalidArgument):
            await put(self.store, 1, "a\x00b", b"x")
        with self.assertRaises(KeyTooLongError):
            await put(self.store, 1, "k" * 1025, b"x")

    async def test_replace(self) -> None:
        """
        Replacing an object returns the old one, keeps it as a soft-deleted
        row, and moves the reference from the old content to the new.
        """
        await put(self.store, 1, "k", b"old")
        replaced = await put(self.store, 1, "k", b"new")
        self.assertEqual(replaced.etag, hashlib.md5(b"old").hexdigest())
        self.assertEqual((await self.store.get_object(1, "k")).etag, hashlib.md5(b"new").hexdigest())
        self.assertEqual(await refcount(self.db, b"old"), 0)
        self.assertEqual(await refcount(self.db, b"new"), 1)
        rows = await self.db.run_query(
            "SELECT etag, deleted_at IS NOT NULL FROM objects WHERE key = 'k' ORDER BY id"
        )
        self.assertEqual(rows, [(hashlib.md5(b"old").hexdigest(), True), (hashlib.md5(b"new").hexdigest(), False)])
        [(released,)] = await self.db.run_query(
            "SELECT released_at IS NOT NULL FROM contents WHERE hash = %s", (content_of(b"old").hash,)
        )
        self.assertTrue(released)

    async def test_replace_with_same_content(self) -> None:
        """
        Writing the same bytes again keeps one reference.
        """
        await put(self.store, 1, "k", b"same")
        await put(self.store, 1, "k", b"same")
        self.assertEqual(await refcount(self.db, b"same"), 1)

    async def test_dedup(self) -> None:
        """
        Identical bytes under two keys share one content row with two
        references; a released content gains references again.
        """
        await put(self.store, 1, "a", b"shared")
        await put(self.store, 2, "b", b"shared")
        self.assertEqual(await refcount(self.db, b"shared"), 2)
        [(n,)] = await self.db.run_query("SELECT count(*) FROM contents")
        self.assertEqual(n, 1)
        await self.store.delete_object(1, "a")
        await self.store.delete_object(2, "b")
        self.assertEqual(await refcount(self.db, b"shared"), 0)
        await put(self.store, 1, "c", b"shared")
        self.assertEqual(await refcount(self.db, b"shared"), 1)

    async def test_dedup_keeps_first_content(self) -> None:
        """
        A second writer of existing content does not overwrite its erasure
        parameters or shard map: the stored row describes the shards that
        exist.
        """
        first = content_of(b"bytes" * 10, inline=False, shard_map={"0": "/first"})
        second = content_of(b"bytes" * 10, inline=False, shard_map={"0": "/second"})
        record, _ = object_of(1, "a", b"bytes" * 10)
        await self.store.put_object(record, [first])
        await self.store.put_object(record.__class__(**{**record.__dict__, "key": "b"}), [second])
        self.assertEqual((await self.store.get_contents([first.hash]))[first.hash].shard_map, {"0": "/first"})

    async def test_require_existing(self) -> None:
        """
        A write that reuses a content (dedup, copy) succeeds when it exists
        and otherwise changes nothing and says which content is missing.
        """
        record, content = object_of(1, "k", b"reuse me")
        with self.assertRaises(ContentMissingError) as caught:
            await self.store.put_object(record, [content], require_existing=[content.hash])
        self.assertEqual(caught.exception.hashes, [content.hash])
        self.assertIsNone(await self.store.get_object(1, "k"))
        self.assertEqual(await self.store.content_state(content.hash), "absent")
        await self.store.put_object(record, [content])
        copy = record.__class__(**{**record.__dict__, "key": "copy"})
        await self.store.put_object(copy, [content], require_existing=[content.hash])
        self.assertEqual(await refcount(self.db, b"reuse me"), 2)
        with self.assertRaises(InvalidArgument):
            await self.store.put_object(copy, [content], require_existing=["f" * 64])

    async def test_copy_multipiece(self) -> None:
        """
        An object made of several pieces, one content used twice, can be
        copied from its contents; each piece holds one reference.
        """
        a, b = content_of(b"A" * 3), content_of(b"B" * 2)
        manifest = [ManifestPart(a.hash, 0, 3, 1), ManifestPart(b.hash, 3, 2, 2), ManifestPart(a.hash, 5, 3, 3)]
        record = ObjectRecord(1, "multi", 8, "e-3", "t", {}, {}, {}, manifest, WHEN, 3)
        await self.store.put_object(record, [a, b])
        self.assertEqual(await refcount(self.db, b"A" * 3), 2)
        source = await self.store.get_object(1, "multi")
        self.assertEqual(source.parts_count, 3)
        contents = await self.store.get_contents(source.content_hashes)
        copy = source.__class__(**{**source.__dict__, "key": "copy"})
        await self.store.put_object(copy, list(contents.values()), require_existing=list(contents))
        self.assertEqual(await refcount(self.db, b"A" * 3), 4)
        self.assertEqual(await refcount(self.db, b"B" * 2), 2)
        await self.store.delete_object(1, "multi")
        self.assertEqual(await refcount(self.db, b"A" * 3), 2)

    async def test_get_object_with_contents(self) -> None:
        """
        An object comes with each content of its manifest once, in one
        query; a missing or deleted key gives C{None}.
        """
        a, b = content_of(b"A" * 3), content_of(b"B" * 2)
        manifest = [ManifestPart(a.hash, 0, 3, 1), ManifestPart(b.hash, 3, 2, 2), ManifestPart(a.hash, 5, 3, 3)]
        record = ObjectRecord(1, "multi", 8, "e-3", "t", {"m": "v"}, {}, {}, manifest, WHEN, 3)
        await self.store.put_object(record, [a, b])
        found = await self.store.get_object_with_contents(1, "multi")
        self.assertIsNotNone(found)
        got, contents = found
        self.assertEqual(got, await self.store.get_object(1, "multi"))
        self.assertEqual(contents, {a.hash: a, b.hash: b})
        await put(self.store, 1, "small", b"hello")
        small, small_contents = await self.store.get_object_with_contents(1, "small")
        self.assertEqual(small_contents, await self.store.get_contents(small.content_hashes))
        self.assertEqual([c.inline_data for c in small_contents.values()], [b"hello"])
        bare = ObjectRecord(1, "bare", 0, hashlib.md5(b"").hexdigest(), "t", {}, {}, {}, [], WHEN)
        await self.store.put_object(bare, [])
        self.assertEqual(
            await self.store.get_object_with_contents(1, "bare"),
            (bare.__class__(**{**bare.__dict__, "last_modified": truncate_to_ms(WHEN)}), {}),
        )
        self.assertIsNone(await self.store.get_object_with_contents(2, "multi"))
        self.assertIsNone(await self.store.get_object_with_contents(1, "a\x00b"))
        await self.store.delete_object(1, "multi")
        self.assertIsNone(await self.store.get_object_with_contents(1, "multi"))

    async def test_empty_objects(self) -> None:
        """
        A zero-length object may have one empty piece or no piece at all.
        """
        await put(self.store, 1, "empty", b"")
        self.assertEqual((await self.store.get_object(1, "empty")).size, 0)
        bare = ObjectRecord(1, "bare", 0, hashlib.md5(b"").hexdigest(), "t", {}, {}, {}, [], WHEN)
        self.assertIsNone(await self.store.put_object(bare, []))
        self.assertEqual((await self.store.get_object(1, "bare")).manifest, [])
        self.assertIsNotNone(await self.store.put_object(bare, []))

    async def test_validation(self) -> None:
        """
        Records whose manifest and contents disagree are refused before
        anything is written.
        """
        record, content = object_of(1, "k", b"data")
        other = content_of(b"other")
        wrong = [
            (record, []),
            (record, [content, other]),
            (record, [content, content]),
            (record.__class__(**{**record.__dict__, "size": 5}), [content]),
            (record.__class__(**{**record.__dict__, "manifest": [ManifestPart(content.hash, 1, 4)]}), [content]),
            (record.__class__(**{**record.__dict__, "parts_count": 1}), [content]),
            (record, [content_of(b"data").__class__(**{**content.__dict__, "hash": "XYZ"})]),
            (record, [content.__class__(**{**content.__dict__, "shard_map": {0: "/d"}})]),
            (record, [content.__class__(**{**content.__dict__, "inline_data": b"dat"})]),
        ]
        for bad_record, contents in wrong:
            with self.assertRaises(InvalidArgument):
                await self.store.put_object(bad_record, contents)
        [(n,)] = await self.db.run_query("SELECT count(*) FROM objects")
        self.assertEqual(n, 0)

    async def test_shard_map_round_trip(self) -> None:
        """
        Shard maps and the absence of inline data survive storage.
        """
        content = content_of(b"x" * 100, inline=False, shard_map={"0": {"node": "n1", "dir": "/a"}, "5": None})
        record, _ = object_of(1, "k", b"x" * 100)
        await self.store.put_object(record, [content])
        self.assertEqual(await self.store.get_contents([content.hash]), {content.hash: content})

    async def test_delete(self) -> None:
        """
        Deleting returns whether there was an object; a missing key is not
        an error; the content is released.
        """
        await put(self.store, 1, "k", b"bye")
        self.assertTrue(await self.store.delete_object(1, "k"))
        self.assertIsNone(await self.store.get_object(1, "k"))
        self.assertFalse(await self.store.delete_object(1, "k"))
        self.assertFalse(await self.store.delete_object(1, "never"))
        self.assertFalse(await self.store.delete_object(1, "bad\x00key"))
        self.assertEqual(await refcount(self.db, b"bye"), 0)

    async def test_delete_objects(self) -> None:
        """
        A batch delete removes the existing keys among many (duplicates and
        missing keys allowed) in one transaction and reports which existed.
        """
        for i in range(5):
            await put(self.store, 1, f"k{i}", b"same" if i % 2 else str(i).encode())
        await put(self.store, 2, "k0", b"other bucket")
        deleted = await self.store.delete_objects(1, ["k0", "k1", "k1", "k3", "missing", "k%"])
        self.assertEqual(deleted, {"k0", "k1", "k3"})
        self.assertEqual(await refcount(self.db, b"same"), 0)
        self.assertIsNotNone(await self.store.get_object(2, "k0"))
        self.assertIsNotNone(await self.store.get_object(1, "k2"))
        self.assertEqual(await self.store.delete_objects(1, []), set())

    async def test_bucket_is_empty(self) -> None:
        """
        A bucket is empty when it has no live objects; uploads in progress
        are reported separately.
        """
        self.assertTrue(await self.store.bucket_is_empty(1))
        await put(self.store, 1, "k", b"x")
        self.assertFalse(await self.store.bucket_is_empty(1))
        self.assertTrue(await self.store.bucket_is_empty(2))
        await self.store.delete_object(1, "k")
        self.assertTrue(await self.store.bucket_is_empty(1))
        self.assertFalse(await self.store.has_uploads(1))
        await self.store.create_upload(1, "u", {})
        self.assertTrue(await self.store.has_uploads(1))
        self.assertTrue(await self.store.bucket_is_empty(1))


class _Refused(Exception):
    """A test's write condition refusing the current ETag."""


class ConcurrencyTests(TestCase):
    """
    Writers racing on a real database through separate connections.
    """

    async def setUp(self) -> None:
        self.dsn, self.db = await regional_database(self)
        other = await Database.connect(self.dsn, reactor, pool_size=2)
        self.addCleanup(other.close)
        self.stores = [ObjectStore(self.db), ObjectStore(other)]

    async def test_concurrent_puts_one_key(self) -> None:
        """
        Two PUTs of one key at once leave exactly one live row, holding one
        of the two objects whole, with exact refcounts; a reader racing them
        sees whole objects only.
        """
        seen = []
        made = {}
        for round_ in range(25):
            datas = [f"A{round_}".encode() * (round_ + 1), f"B{round_}".encode() * 3]
            if round_ % 5 == 0:
                datas[1] = datas[0]  # the same content from both sides
            records = [object_of(1, "race", d) for d in datas]
            made.update((r.etag, r) for r, _ in records)

            async def read() -> None:
                got = await self.stores[0].get_object(1, "race")
                if got is not None:
                    seen.append(got)

            results = await gatherResults(
                [
                    Deferred.fromCoroutine(self.stores[i].put_object(records[i][0], [records[i][1]]))
                    for i in (0, 1)
                ]
                + [Deferred.fromCoroutine(read())]
            )
            rows = await self.db.run_query(
                "SELECT etag, manifest->0->>'hash' FROM objects WHERE key = 'race' AND deleted_at IS NULL"
            )
            self.assertEqual(len(rows), 1)
            etag, content_hash = rows[0]
            winner = next(r for r, _ in records if r.etag == etag)
            self.assertEqual(content_hash, winner.manifest[0].content_hash)
            # Exactly one of the two replaced the other (or an earlier
            # round's object).
            self.assertEqual(sum(1 for r in results[:2] if r is not None), 2 if round_ else 1)
            self.assertEqual(await refcount_errors(self.db), [])
        self.assertTrue(seen)
        for got in seen:
            self.assertEqual(got, made[got.etag].__class__(**{**made[got.etag].__dict__, "last_modified": got.last_modified}))

    async def _racing_conditional_puts(
        self, key: str, datas: list[bytes], condition: Any
    ) -> list[Any]:
        """
        Start a conditional put of each of C{datas} to C{key} while another
        connection holds the key's lock, so that every writer is waiting
        for it when it is released.

        @return: each write's outcome: the replaced object (or C{None}),
            or the exception C{condition} raised.
        """
        blocker = await Database.connect(self.dsn, reactor, pool_size=1)
        self.addCleanup(blocker.close)
        watcher = await Database.connect(self.dsn, reactor, pool_size=1)
        self.addCleanup(watcher.close)
        writes: list[Deferred[Any]] = []

        async def outcome(store: ObjectStore, data: bytes) -> Any:
            record, content = object_of(1, key, data)
            try:
                return await store.put_object(record, [content], condition=condition)
            except _Refused as e:
                return e

        async def hold(cursor: Any) -> None:
            await cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 1))", (key,))
            for i, data in enumerate(datas):
                writes.append(Deferred.fromCoroutine(outcome(self.stores[i % 2], data)))
            for _ in range(1000):
                [(waiting,)] = await watcher.run_query(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
                )
                if waiting == len(datas):
                    return
                await deferLater(reactor, 0.01)
            self.fail("The writers never all waited for the key's lock.")

        await blocker.run_interaction(hold)
        return list(await gatherResults(writes))

    async def test_conditional_puts_are_atomic(self) -> None:
        """
        Of two writes of one new key that both require it to be absent and
        both wait for the key at once, exactly one is stored and the other
        refused; of two that both require the ETag they read, likewise.
        """

        def absent(etag: str | None) -> None:
            if etag is not None:
                raise _Refused(etag)

        outcomes = await self._racing_conditional_puts("cond", [b"first", b"second"], absent)
        refused = [o for o in outcomes if isinstance(o, _Refused)]
        self.assertEqual((len(refused), outcomes.count(None)), (1, 1))
        winner = b"first" if outcomes[0] is None else b"second"
        self.assertEqual(
            (await self.stores[0].get_object(1, "cond")).etag, hashlib.md5(winner).hexdigest()
        )

        seen = hashlib.md5(winner).hexdigest()

        def unchanged(etag: str | None) -> None:
            if etag != seen:
                raise _Refused(etag)

        outcomes = await self._racing_conditional_puts("cond", [b"third", b"fourth"], unchanged)
        self.assertEqual(sum(1 for o in outcomes if isinstance(o, _Refused)), 1)
        self.assertEqual(sum(1 for o in outcomes if isinstance(o, ObjectRecord)), 1)
        rows = await self.db.run_query(
            "SELECT count(*) FROM objects WHERE key = 'cond' AND deleted_at IS NULL"
        )
        self.assertEqual(rows, [(1,)])
        self.assertEqual(await refcount_errors(self.db), [])

    async def test_concurrent_put_and_delete(self) -> None:
        """
        A PUT and a DELETE of one key at once leave zero or one live row and
        exact refcounts.
        """
        for round_ in range(20):
            await put(self.stores[0], 1, "k", f"old{round_}".encode())
            record, content = object_of(1, "k", f"new{round_}".encode())
            await gatherResults(
                [
                    Deferred.fromCoroutine(self.stores[0].put_object(record, [content])),
                    Deferred.fromCoroutine(self.stores[1].delete_object(1, "k")),
                ]
            )
            rows = await self.db.run_query(
                "SELECT etag FROM objects WHERE key = 'k' AND deleted_at IS NULL"
            )
            self.assertLessEqual(len(rows), 1)
            if rows:
                self.assertEqual(rows[0][0], record.etag)
            self.assertEqual(await refcount_errors(self.db), [])

    async def test_swapping_contents(self) -> None:
        """
        Two writers each replacing the other's content on another key, held
        so that each has added its reference before either drops its old
        one, deadlock in PostgreSQL; the transaction it aborts is retried
        and both writes succeed.
        """
        await put(self.stores[0], 1, "a", b"y")
        await put(self.stores[0], 1, "b", b"x")
        ra, ca = object_of(1, "a", b"x")
        rb, cb = object_of(1, "b", b"y")
        blocker = await Database.connect(self.dsn, reactor, pool_size=2)
        self.addCleanup(blocker.close)
        writes: list[Deferred[Any]] = []

        async def hold(cursor: Any) -> None:
            # Each writer's statement adds its content reference, then waits
            # for its key's row, locked here, before it can drop the old one.
            await cursor.execute(
                "SELECT id FROM objects WHERE bucket_id = 1 AND key IN ('a', 'b') "
                "AND deleted_at IS NULL FOR UPDATE"
            )
            writes.append(Deferred.fromCoroutine(self.stores[0].put_object(ra, [ca])))
            writes.append(Deferred.fromCoroutine(self.stores[1].put_object(rb, [cb])))
            for _ in range(1000):
                [(waiting,)] = await blocker.run_query(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
                if waiting == 2:
                    return
                await deferLater(reactor, 0.01)
            self.fail("The writers never both waited for the locked rows.")

        with capturedLogs() as events:
            await blocker.run_interaction(hold)
            await gatherResults(writes)
        self.assertEqual(
            [e["error"] for e in events if "Retrying" in e.get("log_format", "")], ["DeadlockDetected"]
        )
        self.assertEqual((await self.stores[0].get_object(1, "a")).etag, ra.etag)
        self.assertEqual((await self.stores[0].get_object(1, "b")).etag, rb.etag)
        self.assertEqual(await refcount_errors(self.db), [])
