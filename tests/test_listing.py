# -*- test-case-name: tests.test_listing -*-
"""
Tests for L{anvil.meta.objects.ObjectStore.list_objects}: S3 listing
semantics checked against a pure-Python model of S3 (including hypothesis
properties over random keys, prefixes, delimiters and page sizes), the
query plans, the skipping of common prefixes and the speed of listing a
large bucket, on a real PostgreSQL.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from itertools import count
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anvil.errors import InvalidArgument
from anvil.meta.database import Database
from anvil.meta.objects import ListResult, ObjectStore
from anvil.meta.records import ObjectSummary
from tests.test_objects import object_of, put, refcount_errors, regional_database

#: Characters keys are drawn from: the delimiter, LIKE metacharacters, URL
#: specials, the smallest and largest characters a key can hold, both sides
#: of the surrogate gap, multi-byte and astral characters.
ALPHABET = [
    "a", "b", "A", "/", "%", "_", "+", " ", ".", "\\", "*",
    "\x01", "\x7f", "é", "€", "\ud7ff", "\ue000", "\uffff", "😀", "\U0010ffff",
]

DELIMITERS = [None, "", "/", "a", "%", "_", "+", " ", "//", "a/", "😀", "\U0010ffff", "\x01"]

Entry = tuple[str, str]  # ("key", key) or ("prefix", common prefix)


def common_prefix(key: str, prefix: str, delimiter: str | None) -> str | None:
    """
    The model's roll-up: the key up to and including the first delimiter
    after the prefix.
    """
    if not delimiter:
        return None
    at = key.find(delimiter, len(prefix))
    return None if at < 0 else key[: at + len(delimiter)]


def s3_listing_model(
    keys: Sequence[str],
    prefix: str,
    delimiter: str | None,
    start_after: str | None,
    max_keys: int | None,
) -> tuple[list[Entry], bool]:
    """
    S3 listing, by definition: the keys starting with C{prefix}, greater
    than C{start_after}, in UTF-8 byte order (which is code point order,
    Python's string order); with a delimiter, each key whose rest contains
    it is replaced by its common prefix, listed once, and only if it sorts
    after C{start_after} (a prefix C{start_after} starts with was listed on
    an earlier page).  Objects and prefixes count alike against C{max_keys}.

    @return: the page's entries and whether more follow.
    """
    entries: list[Entry] = []
    for key in sorted(keys):
        if not key.startswith(prefix):
            continue
        if start_after is not None and key <= start_after:
            continue
        rolled = common_prefix(key, prefix, delimiter)
        if rolled is None:
            entries.append(("key", key))
        elif (start_after is None or rolled > start_after) and ("prefix", rolled) not in entries[-1:]:
            entries.append(("prefix", rolled))
    if max_keys is None:
        return entries, False
    return entries[:max_keys], len(entries) > max_keys


def entries_of(result: ListResult) -> list[Entry]:
    """
    A page's entries in order (objects and prefixes interleaved by name).
    """
    entries = [("key", o.key) for o in result.objects] + [("prefix", p) for p in result.common_prefixes]
    return sorted(entries, key=lambda e: e[1])


class ModelTests(SynchronousTestCase):
    """
    The reference model itself, on examples from the S3 documentation and
    the s3-tests suite.
    """

    def test_documented_example(self) -> None:
        """
        AWS's example: with delimiter '/', photos/2006/... keys roll up
        under their prefix.
        """
        keys = ["sample.jpg", "photos/2006/January/sample.jpg", "photos/2006/February/sample2.jpg"]
        self.assertEqual(
            s3_listing_model(keys, "", "/", None, None),
            ([("prefix", "photos/"), ("key", "sample.jpg")], False),
        )
        self.assertEqual(
            s3_listing_model(keys, "photos/2006/", "/", None, None),
            ([("prefix", "photos/2006/February/"), ("prefix", "photos/2006/January/")], False),
        )

    def test_marker_after_prefix(self) -> None:
        """
        As in s3-tests' test_bucket_list_delimiter_prefix: a marker equal to
        a common prefix lists what follows the prefix.
        """
        keys = ["asdf", "boo/bar", "boo/baz/xyzzy", "cquux/thud", "cquux/bla"]
        self.assertEqual(s3_listing_model(keys, "", "/", None, 1), ([("key", "asdf")], True))
        self.assertEqual(s3_listing_model(keys, "", "/", "asdf", 1), ([("prefix", "boo/")], True))
        self.assertEqual(s3_listing_model(keys, "", "/", "boo/", 1), ([("prefix", "cquux/")], False))


class ListObjectsTests(TestCase):
    """
    Listing pages, with exact S3 semantics.
    """

    async def setUp(self) -> None:
        _, self.db = await regional_database(self)
        self.store = ObjectStore(self.db)

    async def _fill(self, bucket_id: int, keys: Sequence[str]) -> None:
        for key in keys:
            await put(self.store, bucket_id, key, key.encode("utf-8"))

    async def _pages(
        self, bucket_id: int, prefix: str, delimiter: str | None, start_after: str | None, max_keys: int
    ) -> list[ListResult]:
        """
        Every page, each starting after the previous page's last entry.
        """
        pages = []
        while True:
            page = await self.store.list_objects(bucket_id, prefix, delimiter, start_after, max_keys)
            pages.append(page)
            if not page.is_truncated:
                return pages
            self.assertIsNotNone(page.last_key)
            start_after = page.last_key

    async def assertListing(
        self, keys: Sequence[str], prefix: str, delimiter: str | None, start_after: str | None, max_keys: int, bucket_id: int = 1
    ) -> None:
        """
        Paging through the bucket gives the model's listing, page by page.
        """
        pages = await self._pages(bucket_id, prefix, delimiter, start_after, max_keys)
        listed = [e for page in pages for e in entries_of(page)]
        self.assertEqual(listed, s3_listing_model(keys, prefix, delimiter, start_after, None)[0])
        at = start_after
        for page in pages:
            expected, truncated = s3_listing_model(keys, prefix, delimiter, at, max_keys)
            self.assertEqual((entries_of(page), page.is_truncated), (expected, truncated))
            self.assertEqual(page.last_key, expected[-1][1] if expected else None)
            at = page.last_key

    async def test_byte_order(self) -> None:
        """
        Keys list in UTF-8 byte order, whatever the database locale would
        say: upper case before lower case, '/' before letters, astral
        characters after U+FFFF.
        """
        keys = ["b", "a", "B", "a/b", "a b", "a+b", "é", "😀", "\uffff", "\U0010ffff", "\x01", "A", "_", "%"]
        await self._fill(1, keys)
        page = await self.store.list_objects(1)
        self.assertEqual(
            [o.key for o in page.objects],
            sorted(keys, key=lambda k: k.encode("utf-8")),
        )
        self.assertFalse(page.is_truncated)

    async def test_summaries(self) -> None:
        """
        Listed objects carry what listings show, as get_object reads it.
        """
        record, content = object_of(1, "k", b"data", user_metadata={"a": "b"}, checksums={"sha256": "x"})
        await self.store.put_object(record, [content])
        await put(self.store, 1, "plain", b"p")
        for delimiter in (None, "/"):
            listed = (await self.store.list_objects(1, delimiter=delimiter)).objects
            self.assertEqual(
                listed,
                [
                    ObjectSummary(o.bucket_id, o.key, o.size, o.etag, o.last_modified, o.checksums, o.parts_count)
                    for o in [await self.store.get_object(1, "k"), await self.store.get_object(1, "plain")]
                ],
            )
        self.assertEqual(listed[0].checksums, {"sha256": "x"})
        self.assertEqual(listed[1].checksums, {})

    async def test_prefix_is_not_a_pattern(self) -> None:
        """
        '%', '_' and '\\' in a prefix are plain characters (no LIKE).
        """
        keys = ["a%b", "axb", "a_b", "a\\b", "a%", "a", "b%"]
        await self._fill(1, keys)
        for prefix in ("a%", "a_", "a\\", "%", "_"):
            page = await self.store.list_objects(1, prefix)
            self.assertEqual([o.key for o in page.objects], sorted(k for k in keys if k.startswith(prefix)))

    async def test_delimiter(self) -> None:
        """
        Keys roll up into common prefixes after the prefix; prefixes and
        objects share max-keys; pages resume after a common prefix.
        """
        keys = [
            "photos/2006/January/sample.jpg", "photos/2006/February/sample2.jpg",
            "photos/2006/February/sample3.jpg", "photos/2007/x.jpg", "photos/top.jpg",
            "sample.jpg", "videos/a.mp4", "/leading", "//double", "trailing/",
        ]
        await self._fill(1, keys)
        for prefix, delimiter, max_keys in [
            ("", "/", 1000), ("", "/", 1), ("", "/", 2), ("photos/", "/", 1), ("photos/2006/", "/", 1),
            ("photos", "/", 1000), ("photos/2006/February/", "/", 1), ("", "2006", 1), ("", "o", 2),
            ("", "//", 1), ("trailing/", "/", 5), ("nothing", "/", 5),
        ]:
            await self.assertListing(keys, prefix, delimiter, None, max_keys)

    async def test_start_after(self) -> None:
        """
        Listing starts strictly after start_after, which may be any string:
        before the prefix, inside a common prefix (which is then not
        repeated), equal to it, or past every key.
        """
        keys = ["a", "a/1", "a/2", "a/3", "b", "b/1", "c"]
        await self._fill(1, keys)
        for start_after in ["", "0", "a", "a/", "a/1", "a/9", "a0", "b/", "bz", "c", "d", "\U0010ffff"]:
            for delimiter in (None, "/"):
                for prefix in ("", "a", "a/", "b"):
                    await self.assertListing(keys, prefix, delimiter, start_after, 2)

    async def test_max_keys(self) -> None:
        """
        max-keys 0 gives an empty untruncated page; negative is refused;
        a page exactly as long as the listing is not truncated.
        """
        keys = ["a", "b", "c/d"]
        await self._fill(1, keys)
        self.assertEqual(await self.store.list_objects(1, max_keys=0), ListResult([], [], False, None))
        with self.assertRaises(InvalidArgument):
            await self.store.list_objects(1, max_keys=-1)
        page = await self.store.list_objects(1, "", "/", None, 3)
        self.assertEqual((entries_of(page), page.is_truncated, page.last_key),
                         ([("key", "a"), ("key", "b"), ("prefix", "c/")], False, "c/"))
        page = await self.store.list_objects(1, "", "/", None, 2)
        self.assertEqual((page.is_truncated, page.last_key), (True, "b"))

    async def test_nul(self) -> None:
        """
        NUL, which no key contains, matches nothing in a prefix, nothing as
        a delimiter, and ends a start-after string.
        """
        keys = ["a", "a/b", "b"]
        await self._fill(1, keys)
        self.assertEqual(entries_of(await self.store.list_objects(1, "a\x00")), [])
        self.assertEqual(
            entries_of(await self.store.list_objects(1, "", "\x00")),
            [("key", "a"), ("key", "a/b"), ("key", "b")],
        )
        self.assertEqual(
            entries_of(await self.store.list_objects(1, "", None, "a\x00zzz")),
            [("key", "a/b"), ("key", "b")],
        )
        self.assertEqual(
            entries_of(await self.store.list_objects(1, "", "/", "a/\x00")),
            [("key", "b")],
        )

    async def test_only_live_objects_of_the_bucket(self) -> None:
        """
        Deleted and replaced objects and other buckets' objects are not
        listed; a replaced key is listed once.
        """
        await self._fill(1, ["a", "b", "c"])
        await self._fill(2, ["a", "x"])
        await put(self.store, 1, "b", b"new")
        await self.store.delete_object(1, "c")
        page = await self.store.list_objects(1)
        self.assertEqual([o.key for o in page.objects], ["a", "b"])
        self.assertEqual(page.objects[1].etag, hashlib.md5(b"new").hexdigest())
        self.assertEqual(await refcount_errors(self.db), [])

    async def test_pagination_while_keys_are_added(self) -> None:
        """
        A continuation (the last key of a page) stays valid while keys are
        added and deleted: later pages show the keys after it as they are
        then.
        """
        await self._fill(1, ["k1", "k3", "k5", "k7"])
        page = await self.store.list_objects(1, max_keys=2)
        self.assertEqual(page.last_key, "k3")
        await self._fill(1, ["k0", "k2", "k4"])
        await self.store.delete_object(1, "k5")
        page = await self.store.list_objects(1, start_after=page.last_key, max_keys=2)
        self.assertEqual([o.key for o in page.objects], ["k4", "k7"])
        self.assertFalse(page.is_truncated)

    async def test_random_listings(self) -> None:
        """
        For random keys (some deleted again), prefixes, delimiters,
        start-after strings and page sizes, paging through the bucket gives
        exactly the model's pages.
        """
        buckets = count(100)

        @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
        @given(
            keys=st.lists(st.text(st.sampled_from(ALPHABET), min_size=1, max_size=5), max_size=30, unique=True),
            data=st.data(),
        )
        def check(keys: list[str], data: st.DataObject) -> None:
            bucket = next(buckets)
            deleted = data.draw(st.lists(st.sampled_from(keys), unique=True) if keys else st.just([]))
            prefix = data.draw(
                st.one_of(
                    st.just(""),
                    st.text(st.sampled_from(ALPHABET), max_size=3),
                    st.sampled_from(keys).flatmap(lambda k: st.integers(0, len(k)).map(lambda n: k[:n]))
                    if keys
                    else st.just(""),
                )
            )
            delimiter = data.draw(st.sampled_from(DELIMITERS))
            start_after = data.draw(
                st.one_of(st.none(), st.text(st.sampled_from(ALPHABET), max_size=4), st.sampled_from(keys) if keys else st.none())
            )
            max_keys = data.draw(st.one_of(st.integers(1, 7), st.just(1000)))
            live = sorted(set(keys) - set(deleted))

            async def run() -> None:
                await self._fill(bucket, keys)
                await self.store.delete_objects(bucket, deleted)
                await self.assertListing(live, prefix, delimiter, start_after, max_keys, bucket)

            in_reactor(run)

        await deferToThread(check)


def in_reactor(run: Callable[[], Any]) -> Any:
    """
    Run the coroutine function C{run} on the reactor from a thread (where
    hypothesis drives a test) and wait for its result.
    """
    return blockingCallFromThread(reactor, lambda: Deferred.fromCoroutine(run()))


class RecordingDatabase:
    """
    A database that remembers the single statements it runs.
    """

    def __init__(self, db: Database) -> None:
        self._db = db
        self.queries: list[tuple[str, Sequence[Any]]] = []

    async def run_query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self.queries.append((sql, params))
        return await self._db.run_query(sql, params)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


async def plan_nodes(db: Database, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
    """
    Run C{sql} under C{EXPLAIN ANALYZE}.

    @return: every node of its plan.
    """
    rows = await db.run_query("EXPLAIN (ANALYZE, FORMAT JSON) " + sql, params)
    plan = rows[0][0]
    if isinstance(plan, str):
        plan = json.loads(plan)
    nodes = []

    def walk(node: dict[str, Any]) -> None:
        nodes.append(node)
        for child in node.get("Plans", []):
            walk(child)

    walk(plan[0]["Plan"])
    return nodes


class LargeBucketTests(TestCase):
    """
    A bucket of 10,000 keys: pages are a few index probes each, common
    prefixes are skipped without reading their keys, and listing the whole
    bucket is fast.
    """

    async def setUp(self) -> None:
        _, self.db = await regional_database(self)
        self.recorder = RecordingDatabase(self.db)
        self.store = ObjectStore(self.recorder)  # type: ignore[arg-type]
        # 100 directories of 100 files, one big directory of 2,000 files
        # in the middle, all sharing one content, and old versions of
        # 1,000 keys.
        await self.db.run_operation(
            """
            WITH c AS (
                INSERT INTO contents (hash, size, k, m, stripe_size, inline_data, refcount)
                VALUES (encode(sha256('x'), 'hex'), 1, 4, 2, 1048576, 'x', 12000)
                RETURNING hash
            )
            INSERT INTO objects (bucket_id, key, size, etag, manifest, last_modified)
            SELECT 1, k, 1, md5('x'),
                   jsonb_build_array(jsonb_build_object('hash', c.hash, 'offset', 0, 'length', 1)),
                   now()
              FROM c, (
                SELECT 'dir' || lpad((i / 100)::text, 3, '0') || '/file' || lpad(i::text, 5, '0') AS k
                  FROM generate_series(0, 9999) i
                UNION ALL
                SELECT 'dir050-big/' || lpad(i::text, 5, '0') FROM generate_series(0, 1999) i
              ) keys
            """
        )
        # Replaced versions: dead rows that listings must not step over.
        await self.db.run_operation(
            """
            INSERT INTO objects (bucket_id, key, size, etag, manifest, last_modified, deleted_at)
            SELECT bucket_id, key, size, etag, manifest, last_modified, now()
              FROM objects WHERE key LIKE 'dir01%%'
            """
        )
        await self.db.run_operation("ANALYZE objects")

    async def _list_all(self, delimiter: str | None, max_keys: int = 1000) -> tuple[int, int]:
        """
        Page through the bucket.

        @return: the number of entries and of pages.
        """
        entries = pages = 0
        start_after = None
        while True:
            page = await self.store.list_objects(1, "", delimiter, start_after, max_keys)
            entries += len(page.objects) + len(page.common_prefixes)
            pages += 1
            if not page.is_truncated:
                return entries, pages
            start_after = page.last_key

    async def test_speed(self) -> None:
        """
        Listing 12,000 keys by pages of 1,000 takes well under half a
        second; so does listing the 101 common prefixes by pages of 10.
        The best of three runs counts, so that a burst of load on a shared
        machine does not decide.
        """
        plain = grouped = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            self.assertEqual(await self._list_all(None), (12000, 12))
            plain = min(plain, time.perf_counter() - started)
            started = time.perf_counter()
            self.assertEqual(await self._list_all("/", 10), (101, 11))
            grouped = min(grouped, time.perf_counter() - started)
        self.assertLess(plain, 0.5)
        self.assertLess(grouped, 0.5)

    async def _plan(self, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        return await plan_nodes(self.db, sql, params)

    async def test_plans(self) -> None:
        """
        Both page queries scan the live-key index, never the table, and
        read only the rows they return (plus one to detect truncation).
        """
        for delimiter in (None, "/"):
            self.recorder.queries.clear()
            page = await self.store.list_objects(1, "dir0", delimiter, "dir012/file01250", 50)
            self.assertTrue(page.is_truncated)
            [(sql, params)] = self.recorder.queries
            nodes = await self._plan(sql, params)
            types = {n["Node Type"] for n in nodes}
            self.assertNotIn("Seq Scan", types)
            scans = [n for n in nodes if n["Node Type"] in ("Index Scan", "Index Only Scan") and n["Relation Name"] == "objects"]
            self.assertTrue(scans)
            self.assertIn("objects_live_key", {n["Index Name"] for n in scans})
            read = sum(n["Actual Rows"] * n["Actual Loops"] for n in scans)
            self.assertLessEqual(read, 2 * 51 + 1, (delimiter, read))

    async def test_common_prefixes_skipped(self) -> None:
        """
        A common prefix holding 2,000 keys costs one index probe, not 2,000
        rows.
        """
        self.recorder.queries.clear()
        page = await self.store.list_objects(1, "dir050", "/", None, 1000)
        self.assertEqual(page.common_prefixes, ["dir050-big/", "dir050/"])
        [(sql, params)] = self.recorder.queries
        nodes = await self._plan(sql, params)
        read = sum(
            n["Actual Rows"] * n["Actual Loops"]
            for n in nodes
            if n["Node Type"] == "Index Scan" and n["Relation Name"] == "objects"
        )
        self.assertLessEqual(read, 5)
