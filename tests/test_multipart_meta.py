# -*- test-case-name: tests.test_multipart_meta -*-
"""
Tests for the multipart upload metadata of L{anvil.meta.objects.ObjectStore}
(create, parts, list, complete with S3's checks and ETag, abort, list
uploads), with exact reference counts, on a real PostgreSQL.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import timedelta
from itertools import count
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from anvil.errors import InvalidArgument
from anvil.meta.database import Database
from anvil.meta.objects import (
    MIN_PART_SIZE,
    ContentMissingError,
    EntityTooSmallError,
    InvalidPartError,
    InvalidPartOrderError,
    NoSuchUploadError,
    ObjectStore,
    UploadList,
)
from anvil.meta.records import ContentRecord, Part, truncate_to_ms
from tests.test_listing import (
    ALPHABET,
    DELIMITERS,
    RecordingDatabase,
    common_prefix,
    in_reactor,
    plan_nodes,
)
from tests.test_objects import (
    WHEN,
    content_of,
    put,
    refcount,
    refcount_errors,
    regional_database,
)


def part_of(number: int, data: bytes, when: Any = WHEN) -> tuple[Part, ContentRecord]:
    """
    Part C{number} holding C{data}, and its content.
    """
    content = content_of(data)
    part = Part(number, content.hash, len(data), hashlib.md5(data).hexdigest(), {}, when)
    return part, content


def md5(data: bytes) -> str:
    """
    The hex MD5 of C{data}.
    """
    return hashlib.md5(data).hexdigest()


def uploads_model(
    uploads: Sequence[tuple[str, str]],
    prefix: str,
    delimiter: str | None,
    key_marker: str | None,
    upload_id_marker: str | None,
    max_uploads: int | None,
) -> tuple[list[tuple[str, str, str | None]], bool]:
    """
    ListMultipartUploads by definition: uploads ordered by key, then upload
    id; after the key marker (and, with an upload id marker, after that
    upload of the key marker); prefixes and delimiters as for objects.

    @param uploads: C{(key, upload id)} pairs.
    @return: the entries (C{("upload", key, id)} or C{("prefix", prefix,
        None)}) and whether more follow.
    """
    entries: list[tuple[str, str, str | None]] = []
    for key, upload_id in sorted(uploads):
        if not key.startswith(prefix):
            continue
        if key_marker:
            if upload_id_marker:
                if (key, upload_id) <= (key_marker, upload_id_marker):
                    continue
            elif key <= key_marker:
                continue
        rolled = common_prefix(key, prefix, delimiter)
        if rolled is None:
            entries.append(("upload", key, upload_id))
        elif (not key_marker or rolled > key_marker) and ("prefix", rolled, None) not in entries[-1:]:
            entries.append(("prefix", rolled, None))
    if max_uploads is None:
        return entries, False
    return entries[:max_uploads], len(entries) > max_uploads


def upload_entries(page: UploadList) -> list[tuple[str, str, str | None]]:
    """
    A page's entries in order.
    """
    entries = [("upload", u.key, u.upload_id) for u in page.uploads] + [
        ("prefix", p, None) for p in page.common_prefixes
    ]
    return sorted(entries, key=lambda e: (e[1], e[2] or ""))


class MultipartTests(TestCase):
    """
    Creating, filling, completing and aborting uploads.
    """

    async def setUp(self) -> None:
        self.dsn, self.db = await regional_database(self)
        self.store = ObjectStore(self.db)
        self.addCleanup(self._check_refcounts)

    async def _check_refcounts(self) -> None:
        self.assertEqual(await refcount_errors(self.db), [])

    async def _upload(self, key: str = "big", parts: Sequence[bytes] = (), bucket_id: int = 1) -> str:
        upload = await self.store.create_upload(bucket_id, key, {})
        for number, data in enumerate(parts, 1):
            await self.store.put_part(upload.upload_id, *part_of(number, data))
        return upload.upload_id

    async def test_create_and_get(self) -> None:
        """
        An upload keeps its bucket, key and metadata; its id is URL-safe and
        ids sort in initiation order.
        """
        metadata = {"content_type": "video/mp4", "user_metadata": {"a": "ü"}, "checksum": "CRC32"}
        first = await self.store.create_upload(3, "dir/movie.mp4", metadata)
        second = await self.store.create_upload(3, "dir/movie.mp4", {})
        self.assertEqual((first.bucket_id, first.key, first.metadata), (3, "dir/movie.mp4", metadata))
        self.assertRegex(first.upload_id, r"^[0-9a-f]{46}$")
        self.assertLess(first.upload_id, second.upload_id)
        self.assertEqual(await self.store.get_upload(first.upload_id), first)
        self.assertEqual(first.created_at, truncate_to_ms(first.created_at))
        self.assertIsNone(await self.store.get_upload("nope"))
        self.assertIsNone(await self.store.get_upload(""))
        with self.assertRaises(InvalidArgument):
            await self.store.create_upload(3, "", {})

    async def test_parts(self) -> None:
        """
        Parts are stored under their numbers; uploading a number again
        replaces the part and moves the reference; parts list by number in
        pages.
        """
        upload_id = await self._upload()
        for number in (3, 1, 2, 10000):
            self.assertIsNone(await self.store.put_part(upload_id, *part_of(number, b"p%d" % number)))
        replaced = await self.store.put_part(upload_id, *part_of(2, b"second try", WHEN + timedelta(seconds=1)))
        self.assertEqual(replaced, Part(2, content_of(b"p2").hash, 2, md5(b"p2"), {}, truncate_to_ms(WHEN)))
        self.assertEqual(await refcount(self.db, b"p2"), 0)
        self.assertEqual(await refcount(self.db, b"second try"), 1)
        page = await self.store.list_parts(upload_id)
        self.assertEqual([p.part_number for p in page.parts], [1, 2, 3, 10000])
        self.assertEqual(page.parts[1].etag, md5(b"second try"))
        self.assertEqual(page.parts[1].last_modified, truncate_to_ms(WHEN + timedelta(seconds=1)))
        self.assertEqual((page.is_truncated, page.next_part_number_marker), (False, 10000))
        page = await self.store.list_parts(upload_id, 1, 2)
        self.assertEqual(([p.part_number for p in page.parts], page.is_truncated, page.next_part_number_marker), ([2, 3], True, 3))
        page = await self.store.list_parts(upload_id, 3, 2)
        self.assertEqual(([p.part_number for p in page.parts], page.is_truncated), ([10000], False))
        page = await self.store.list_parts(upload_id, 10000)
        self.assertEqual((page.parts, page.is_truncated, page.next_part_number_marker), ([], False, None))
        self.assertEqual((await self.store.list_parts(upload_id, 0, 0)).parts, [])
        with self.assertRaises(NoSuchUploadError):
            await self.store.list_parts("nope")

    async def test_same_part_twice(self) -> None:
        """
        The same bytes uploaded twice as one part, or as two parts, keep
        exact references.
        """
        upload_id = await self._upload()
        await self.store.put_part(upload_id, *part_of(1, b"same"))
        await self.store.put_part(upload_id, *part_of(1, b"same"))
        self.assertEqual(await refcount(self.db, b"same"), 1)
        await self.store.put_part(upload_id, *part_of(2, b"same"))
        self.assertEqual(await refcount(self.db, b"same"), 2)

    async def test_part_errors(self) -> None:
        """
        Part numbers are 1 to 10000, a part is its content's, and parts of
        unknown uploads are refused without keeping a reference.
        """
        upload_id = await self._upload()
        for number in (0, 10001, -1):
            with self.assertRaises(InvalidArgument):
                await self.store.put_part(upload_id, *part_of(number, b"x"))
        part, content = part_of(1, b"x")
        with self.assertRaises(InvalidArgument):
            await self.store.put_part(upload_id, part, content_of(b"y"))
        with self.assertRaises(NoSuchUploadError):
            await self.store.put_part("nope", part, content)
        self.assertIsNone(await refcount(self.db, b"x"))

    async def test_part_require_existing(self) -> None:
        """
        A part that reuses a content (UploadPartCopy, dedup) needs it to
        exist.
        """
        upload_id = await self._upload()
        with self.assertRaises(ContentMissingError):
            await self.store.put_part(upload_id, *part_of(1, b"source"), require_existing=True)
        self.assertEqual((await self.store.list_parts(upload_id)).parts, [])
        await put(self.store, 1, "source", b"source")
        await self.store.put_part(upload_id, *part_of(1, b"source"), require_existing=True)
        self.assertEqual(await refcount(self.db, b"source"), 2)

    async def test_complete(self) -> None:
        """
        Completing makes an object of the listed parts: S3's multipart ETag,
        the summed size, one manifest piece per part with part boundaries,
        the upload's metadata; unlisted parts are released and the upload is
        gone.
        """
        metadata = {"content_type": "a/b", "user_metadata": {"k": "v"}, "system_metadata": {"cache-control": "x"}}
        upload = await self.store.create_upload(1, "big", metadata)
        datas = {1: b"a" * 10, 2: b"unused", 3: b"b" * 10, 7: b"c" * 3}
        for number, data in datas.items():
            await self.store.put_part(upload.upload_id, *part_of(number, data))
        record = await self.store.complete_upload(
            upload.upload_id,
            [(1, md5(datas[1])), (3, f'"{md5(datas[3])}"'), (7, md5(datas[7]).upper())],
            min_part_size=10,
            checksums={"crc32": "AAAA-3"},
        )
        expected_etag = hashlib.md5(
            b"".join(hashlib.md5(datas[n]).digest() for n in (1, 3, 7))
        ).hexdigest() + "-3"
        self.assertEqual(record.etag, expected_etag)
        self.assertEqual((record.size, record.parts_count), (23, 3))
        self.assertEqual([record.part_range(n) for n in (1, 2, 3, 4)], [(0, 10), (10, 20), (20, 23), None])
        self.assertEqual([p.content_hash for p in record.manifest], [content_of(datas[n]).hash for n in (1, 3, 7)])
        self.assertEqual(
            (record.content_type, record.user_metadata, record.system_metadata, record.checksums),
            ("a/b", {"k": "v"}, {"cache-control": "x"}, {"crc32": "AAAA-3"}),
        )
        self.assertEqual(await self.store.get_object(1, "big"), record)
        self.assertEqual(await refcount(self.db, datas[1]), 1)
        self.assertEqual(await refcount(self.db, b"unused"), 0)
        self.assertIsNone(await self.store.get_upload(upload.upload_id))
        with self.assertRaises(NoSuchUploadError):
            await self.store.complete_upload(upload.upload_id, [(1, md5(datas[1]))], min_part_size=10)
        with self.assertRaises(NoSuchUploadError):
            await self.store.list_parts(upload.upload_id)
        with self.assertRaises(NoSuchUploadError):
            await self.store.put_part(upload.upload_id, *part_of(1, b"late"))
        self.assertTrue(await self.store.delete_object(1, "big"))
        self.assertEqual(await refcount(self.db, datas[1]), 0)

    async def test_complete_replaces(self) -> None:
        """
        Completing over an existing object replaces it; identical parts
        share a content with one reference each.
        """
        await put(self.store, 1, "big", b"previous")
        upload_id = await self._upload("big", [b"same", b"same"])
        record = await self.store.complete_upload(upload_id, [(1, md5(b"same")), (2, md5(b"same"))], min_part_size=4)
        self.assertEqual(await refcount(self.db, b"previous"), 0)
        self.assertEqual(await refcount(self.db, b"same"), 2)
        self.assertEqual((await self.store.get_object(1, "big")).etag, record.etag)
        self.assertEqual(record.last_modified, truncate_to_ms(record.last_modified))

    async def test_complete_time(self) -> None:
        """
        The object's time is the one given, else the database's.
        """
        upload_id = await self._upload("k", [b"x"])
        record = await self.store.complete_upload(upload_id, [(1, md5(b"x"))], last_modified=WHEN)
        self.assertEqual(record.last_modified, truncate_to_ms(WHEN))

    async def test_invalid_part_order(self) -> None:
        """
        Parts listed out of order or twice are InvalidPartOrder, before
        anything else is checked.
        """
        upload_id = await self._upload("k", [b"1" * 5, b"2" * 5, b"3"])
        for requested in ([(2, md5(b"2" * 5)), (1, md5(b"1" * 5))], [(1, "x"), (1, "x")], [(1, "x"), (3, "x"), (2, "x")]):
            with self.assertRaises(InvalidPartOrderError):
                await self.store.complete_upload(upload_id, requested, min_part_size=5)
        with self.assertRaises(InvalidPartOrderError):
            await self.store.complete_upload("nope", [(2, "x"), (1, "x")])
        self.assertIsNotNone(await self.store.get_upload(upload_id))

    async def test_invalid_part(self) -> None:
        """
        A listed part that was not uploaded, or whose ETag differs, is
        InvalidPart; the upload stays usable.
        """
        upload_id = await self._upload("k", [b"1" * 5, b"2" * 5])
        for requested, bad in (
            ([(1, md5(b"1" * 5)), (3, md5(b"x"))], 3),
            ([(1, md5(b"1" * 5)), (2, md5(b"other"))], 2),
            ([(0, md5(b"1" * 5))], 0),
            ([(10001, md5(b"1" * 5))], 10001),
        ):
            with self.assertRaises(InvalidPartError) as caught:
                await self.store.complete_upload(upload_id, requested, min_part_size=5)
            self.assertEqual(caught.exception.part_number, bad)
        record = await self.store.complete_upload(upload_id, [(1, md5(b"1" * 5)), (2, md5(b"2" * 5))], min_part_size=5)
        self.assertEqual(record.size, 10)

    async def test_entity_too_small(self) -> None:
        """
        Every part but the last must reach the minimum size (5 MiB unless
        told otherwise); the last may be smaller; a single part may be tiny.
        """
        upload_id = await self._upload("k", [b"1" * 5, b"2" * 4, b"3"])
        with self.assertRaises(EntityTooSmallError) as caught:
            await self.store.complete_upload(
                upload_id, [(1, md5(b"1" * 5)), (2, md5(b"2" * 4)), (3, md5(b"3"))], min_part_size=5
            )
        self.assertEqual((caught.exception.part_number, caught.exception.size, caught.exception.minimum), (2, 4, 5))
        with self.assertRaises(EntityTooSmallError):
            await self.store.complete_upload(upload_id, [(1, md5(b"1" * 5)), (3, md5(b"3"))])
        self.assertEqual(MIN_PART_SIZE, 5 * 1024 * 1024)
        record = await self.store.complete_upload(upload_id, [(1, md5(b"1" * 5)), (3, md5(b"3"))], min_part_size=5)
        self.assertEqual(record.size, 6)
        single = await self._upload("single", [b"tiny"])
        self.assertEqual((await self.store.complete_upload(single, [(1, md5(b"tiny"))])).size, 4)

    async def test_complete_needs_parts(self) -> None:
        """
        An empty part list is refused.
        """
        upload_id = await self._upload("k", [b"x"])
        with self.assertRaises(InvalidArgument):
            await self.store.complete_upload(upload_id, [])

    async def test_abort(self) -> None:
        """
        Aborting releases every part and removes the upload; a second abort
        or any later use is NoSuchUpload.
        """
        upload_id = await self._upload("k", [b"a", b"b", b"a"])
        self.assertEqual(await refcount(self.db, b"a"), 2)
        await self.store.abort_upload(upload_id)
        self.assertEqual(await refcount(self.db, b"a"), 0)
        self.assertEqual(await refcount(self.db, b"b"), 0)
        self.assertIsNone(await self.store.get_upload(upload_id))
        for attempt in (
            self.store.abort_upload(upload_id),
            self.store.list_parts(upload_id),
            self.store.complete_upload(upload_id, [(1, md5(b"a"))]),
            self.store.abort_upload("never"),
        ):
            with self.assertRaises(NoSuchUploadError):
                await attempt
        [(parts,)] = await self.db.run_query("SELECT count(*) FROM multipart_parts")
        self.assertEqual(parts, 0)


class MultipartConcurrencyTests(TestCase):
    """
    Part uploads, completion and abortion racing through separate
    connections.
    """

    async def setUp(self) -> None:
        self.dsn, self.db = await regional_database(self)
        other = await Database.connect(self.dsn, reactor, pool_size=2)
        self.addCleanup(other.close)
        self.stores = [ObjectStore(self.db), ObjectStore(other)]

    async def test_same_part_racing(self) -> None:
        """
        Two uploads of one part number at once leave one part and exact
        refcounts.
        """
        upload = await self.stores[0].create_upload(1, "k", {})
        for round_ in range(15):
            await gatherResults(
                [
                    Deferred.fromCoroutine(self.stores[i].put_part(upload.upload_id, *part_of(1, b"%d-%d" % (round_, i))))
                    for i in (0, 1)
                ]
            )
            parts = (await self.stores[0].list_parts(upload.upload_id)).parts
            self.assertEqual(len(parts), 1)
            self.assertEqual(await refcount_errors(self.db), [])

    async def test_parts_racing_completion_and_abort(self) -> None:
        """
        Parts stored while the upload is completed or aborted either make
        it in first or fail with NoSuchUpload; of a complete and an abort
        racing, exactly one succeeds; refcounts stay exact.
        """
        for round_ in range(10):
            upload = await self.stores[0].create_upload(1, f"k{round_}", {})
            await self.stores[0].put_part(upload.upload_id, *part_of(1, b"first %d" % round_))
            finish = (
                self.stores[1].complete_upload(upload.upload_id, [(1, md5(b"first %d" % round_))])
                if round_ % 2
                else self.stores[1].abort_upload(upload.upload_id)
            )
            results = await DeferredList(
                [
                    Deferred.fromCoroutine(self.stores[0].put_part(upload.upload_id, *part_of(2, b"second %d" % round_))),
                    Deferred.fromCoroutine(finish),
                    Deferred.fromCoroutine(self.stores[0].abort_upload(upload.upload_id)),
                ],
                consumeErrors=True,
            )
            for ok, result in results:
                if not ok:
                    result.trap(NoSuchUploadError)
            finished = [ok for ok, _ in results[1:]]
            self.assertEqual(sorted(finished), [False, True])
            self.assertIsNone(await self.stores[0].get_upload(upload.upload_id))
            self.assertEqual(await refcount_errors(self.db), [])


class ListUploadsTests(TestCase):
    """
    ListMultipartUploads semantics.
    """

    async def setUp(self) -> None:
        _, self.db = await regional_database(self)
        self.store = ObjectStore(self.db)

    async def _create(self, bucket_id: int, keys: Sequence[str]) -> list[tuple[str, str]]:
        made = []
        for key in keys:
            upload = await self.store.create_upload(bucket_id, key, {})
            made.append((key, upload.upload_id))
        return made

    async def assertUploads(
        self,
        uploads: Sequence[tuple[str, str]],
        prefix: str,
        delimiter: str | None,
        key_marker: str | None,
        upload_id_marker: str | None,
        max_uploads: int,
        bucket_id: int = 1,
    ) -> None:
        """
        Paging with the next markers gives the model's pages.
        """
        listed = []
        while True:
            page = await self.store.list_uploads(bucket_id, prefix, delimiter, key_marker, upload_id_marker, max_uploads)
            expected, truncated = uploads_model(uploads, prefix, delimiter, key_marker, upload_id_marker, max_uploads)
            self.assertEqual((upload_entries(page), page.is_truncated), (expected, truncated))
            last = expected[-1] if expected else (None, None, None)
            self.assertEqual((page.next_key_marker, page.next_upload_id_marker), last[1:])
            listed.extend(upload_entries(page))
            if not page.is_truncated:
                break
            key_marker, upload_id_marker = page.next_key_marker, page.next_upload_id_marker
        self.assertEqual(len(listed), len(set(listed)))

    async def test_order_and_markers(self) -> None:
        """
        Uploads list by key, then initiation; the key marker alone skips its
        key, with an upload id marker only that key's earlier uploads; the
        upload id marker alone is ignored.
        """
        made = await self._create(1, ["b", "a", "b", "c", "b"])
        await self._create(2, ["a"])
        page = await self.store.list_uploads(1)
        self.assertEqual([(u.key, u.upload_id) for u in page.uploads], sorted(made))
        b_ids = sorted(u for k, u in made if k == "b")
        page = await self.store.list_uploads(1, key_marker="b")
        self.assertEqual([u.key for u in page.uploads], ["c"])
        page = await self.store.list_uploads(1, key_marker="b", upload_id_marker=b_ids[0])
        self.assertEqual([u.upload_id for u in page.uploads][:2], b_ids[1:])
        page = await self.store.list_uploads(1, upload_id_marker=b_ids[2])
        self.assertEqual(len(page.uploads), 5)
        page = await self.store.list_uploads(1, key_marker="b", upload_id_marker="zzz-unknown")
        self.assertEqual([u.key for u in page.uploads], ["c"])
        self.assertEqual(await self.store.list_uploads(1, max_uploads=0), UploadList([], [], False, None, None))
        for max_uploads in (1, 2, 3, 10):
            await self.assertUploads(made, "", None, None, None, max_uploads)

    async def test_prefix_and_delimiter(self) -> None:
        """
        Prefixes select keys, delimiters roll them up, and both count
        against max-uploads; completed and aborted uploads are gone.
        """
        keys = ["photos/2006/a.jpg", "photos/2006/b.jpg", "photos/2007/c.jpg", "photos/top", "videos/v", "x%y", "x_y"]
        made = await self._create(1, keys + ["photos/2006/a.jpg"])
        for prefix, delimiter in [("", "/"), ("photos/", "/"), ("photos/2006/", "/"), ("x%", None), ("x_", "/"), ("", "2006")]:
            for max_uploads in (1, 2, 1000):
                await self.assertUploads(made, prefix, delimiter, None, None, max_uploads)
        gone = made.pop()
        await self.store.abort_upload(gone[1])
        await self.assertUploads(made, "", None, None, None, 3)

    async def test_plan(self) -> None:
        """
        Paging through many uploads of one key reads, at each step, one
        entry of the (key, upload id) index, not the key's other uploads,
        whatever statistics the table has: none yet, analyzed, vacuumed.
        """
        # Autovacuum (whose timing depends on the machine's load) would
        # change the statistics between the checks below: off, each state
        # checked is the one named, and together they are every state it
        # could leave.
        await self.db.run_operation("ALTER TABLE multipart_uploads SET (autovacuum_enabled = off)")
        await self.db.run_operation(
            """
            INSERT INTO multipart_uploads (upload_id, bucket_id, key)
            SELECT md5(i::text), 1, CASE WHEN i < 3000 THEN 'hot' ELSE 'k' || i END
              FROM generate_series(0, 5999) i
            """
        )
        recorder = RecordingDatabase(self.db)
        store = ObjectStore(recorder)  # type: ignore[arg-type]
        [marker] = (await store.list_uploads(1, "hot", max_uploads=1)).uploads
        for statistics in (None, "ANALYZE", "VACUUM ANALYZE"):
            if statistics is not None:
                await self.db.run_operation(f"{statistics} multipart_uploads")
            for delimiter in (None, "/"):
                recorder.queries.clear()
                page = await store.list_uploads(1, "", delimiter, "hot", marker.upload_id, 20)
                self.assertEqual(len(page.uploads), 20)
                [(sql, params)] = recorder.queries
                nodes = await plan_nodes(self.db, sql, params)
                where = f"statistics {statistics}, delimiter {delimiter!r}: {sorted(n['Node Type'] for n in nodes)}"
                scans = [n for n in nodes if n.get("Relation Name") == "multipart_uploads" and "Index" in n["Node Type"]]
                self.assertNotIn("Seq Scan", {n["Node Type"] for n in nodes}, where)
                self.assertIn("multipart_uploads_walk", {n["Index Name"] for n in scans}, where)
                # No other access to the table either (a join back to it
                # through the primary key, say).
                self.assertEqual(
                    {n.get("Index Name") for n in nodes if n.get("Relation Name") == "multipart_uploads"},
                    {"multipart_uploads_walk"},
                    where,
                )
                walked = sum(n["Actual Rows"] * n["Actual Loops"] for n in scans if n["Index Name"] == "multipart_uploads_walk")
                self.assertLessEqual(walked, 21, where)

    async def test_random_listings(self) -> None:
        """
        For random uploads, prefixes, delimiters, markers and page sizes,
        paging gives exactly the model's pages.
        """
        buckets = count(100)

        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
        @given(
            keys=st.lists(st.text(st.sampled_from(ALPHABET), min_size=1, max_size=4), max_size=15),
            data=st.data(),
        )
        def check(keys: list[str], data: st.DataObject) -> None:
            bucket = next(buckets)
            made = in_reactor(lambda: self._create(bucket, keys))
            prefix = data.draw(st.one_of(st.just(""), st.text(st.sampled_from(ALPHABET), max_size=2)))
            delimiter = data.draw(st.sampled_from(DELIMITERS))
            key_marker = data.draw(
                st.one_of(st.none(), st.text(st.sampled_from(ALPHABET), max_size=3), st.sampled_from(keys) if keys else st.none())
            )
            upload_id_marker = data.draw(
                st.one_of(st.none(), st.sampled_from([u for _, u in made]) if made else st.none(), st.just("0"), st.just("g"))
            )
            max_uploads = data.draw(st.integers(1, 5))
            in_reactor(
                lambda: self.assertUploads(made, prefix, delimiter, key_marker, upload_id_marker, max_uploads, bucket)
            )

        await deferToThread(check)
