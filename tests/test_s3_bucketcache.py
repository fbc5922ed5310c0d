# -*- test-case-name: tests.test_s3_bucketcache -*-
"""
Tests for L{anvil.s3.bucketcache} and its use by the S3 resource: bucket
records are reused only for their owners' object requests, briefly, and
public access changes apply at once to everyone they concern.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anvil.meta.records import Bucket
from anvil.s3.authn import Principal, public_flag_irrelevant
from anvil.s3.bucketcache import OwnerBucketCache
from tests.s3fixture import S3Stack


def _bucket(bucket_id: int = 1, tenant_id: int = 1, public: bool = False) -> Bucket:
    return Bucket(bucket_id, "photos", tenant_id, f"tenant{tenant_id}", "us-east-1", public, datetime.now(UTC))


class _Buckets:
    """
    A bucket store holding one bucket record (or none), counting lookups.
    """

    def __init__(self, bucket: Bucket | None) -> None:
        self.bucket = bucket
        self.lookups = 0
        self.pending: Deferred[None] | None = None

    async def get_bucket(self, name: str) -> Bucket | None:
        self.lookups += 1
        found = self.bucket
        if self.pending is not None:
            await self.pending
        return found if found is not None and found.name == name else None


def _get(cache: OwnerBucketCache, owner: int | None) -> Bucket | None:
    result: list[Bucket | None] = []
    Deferred.fromCoroutine(cache.get_bucket("photos", owner)).addCallback(result.append)
    assert result, "the lookup did not finish"
    return result[0]


class OwnerBucketCacheTests(SynchronousTestCase):
    """
    Tests for L{OwnerBucketCache}.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.store = _Buckets(_bucket())
        self.cache = OwnerBucketCache(self.store, self.clock, seconds=1.0)

    def test_owner_reuses_until_expiry(self) -> None:
        """
        The owner's lookups reuse a record for C{seconds}, then read the
        database again and see a change.
        """
        self.assertEqual(_get(self.cache, 1), self.store.bucket)
        self.store.bucket = _bucket(public=True)
        self.clock.advance(0.9)
        self.assertFalse(_get(self.cache, 1).public)
        self.assertEqual(self.store.lookups, 1)
        self.clock.advance(0.2)
        self.assertTrue(_get(self.cache, 1).public)
        self.assertEqual(self.store.lookups, 2)

    def test_others_always_read(self) -> None:
        """
        Anonymous lookups (C{None}) and another tenant's always read the
        database: a public flag changed behind the node's back applies to
        them at once.
        """
        _get(self.cache, 1)
        self.store.bucket = _bucket(public=True)
        self.assertTrue(_get(self.cache, None).public)
        self.store.bucket = _bucket(public=False)
        self.assertFalse(_get(self.cache, 2).public)
        self.assertEqual(self.store.lookups, 3)

    def test_fresh_read_refreshes(self) -> None:
        """
        A record read for anyone replaces the remembered one.
        """
        _get(self.cache, 1)
        self.store.bucket = _bucket(public=True)
        _get(self.cache, None)
        self.assertTrue(_get(self.cache, 1).public)
        self.assertEqual(self.store.lookups, 2)

    def test_missing_not_remembered(self) -> None:
        """
        A missing bucket is looked up every time (one created elsewhere is
        found at once), and finding it missing drops the old record.
        """
        _get(self.cache, 1)
        self.store.bucket = None
        self.assertIsNone(_get(self.cache, None))
        self.store.bucket = _bucket(bucket_id=2)
        self.assertEqual(_get(self.cache, 1).id, 2)
        self.assertEqual(self.store.lookups, 3)

    def test_forget(self) -> None:
        """
        L{OwnerBucketCache.forget} and L{OwnerBucketCache.clear} make the
        next owner lookup read the database.
        """
        _get(self.cache, 1)
        self.store.bucket = _bucket(bucket_id=2)
        self.cache.forget("photos")
        self.assertEqual(_get(self.cache, 1).id, 2)
        self.store.bucket = _bucket(bucket_id=3)
        self.cache.clear()
        self.assertEqual(_get(self.cache, 1).id, 3)

    def test_forget_during_lookup(self) -> None:
        """
        A record read by a lookup that was in flight when the name was
        forgotten is not remembered: it may predate the change.
        """
        self.store.pending = Deferred()
        result: list[Bucket | None] = []
        Deferred.fromCoroutine(self.cache.get_bucket("photos", 1)).addCallback(result.append)
        self.cache.forget("photos")
        self.store.pending, pending = None, self.store.pending
        pending.callback(None)
        self.assertEqual(result, [self.store.bucket])
        _get(self.cache, 1)
        self.assertEqual(self.store.lookups, 2)

    def test_disabled(self) -> None:
        """
        With C{seconds} 0 every lookup reads the database.
        """
        cache = OwnerBucketCache(self.store, self.clock, seconds=0)
        _get(cache, 1)
        _get(cache, 1)
        self.assertEqual(self.store.lookups, 2)

    def test_bounded(self) -> None:
        """
        The cache never holds more than C{max_entries} names.
        """
        cache = OwnerBucketCache(self.store, self.clock, seconds=1.0, max_entries=3)
        for i in range(10):
            self.store.bucket = Bucket(i, f"b{i}", 1, "t", "us-east-1", False, datetime.now(UTC))
            Deferred.fromCoroutine(cache.get_bucket(f"b{i}", 1))
            self.assertLessEqual(len(cache._entries), 3)


class PublicFlagIrrelevantTests(SynchronousTestCase):
    """
    Tests for L{public_flag_irrelevant}.
    """

    def test_cases(self) -> None:
        """
        Only an owner request whose policies alone decide it may use a
        record whose public flag could be stale.
        """
        full = Principal(1, "app", 1, "t", (("*", "*"),))
        writer = Principal(2, "w", 1, "t", (("object:write", "*"),))
        self.assertFalse(public_flag_irrelevant(None, "GetObject", "object:read", "photos", "k"))
        self.assertTrue(public_flag_irrelevant(full, "GetObject", "object:read", "photos", "k"))
        self.assertFalse(public_flag_irrelevant(writer, "GetObject", "object:read", "photos", "k"))
        self.assertTrue(public_flag_irrelevant(writer, "PutObject", "object:write", "photos", "k"))
        self.assertTrue(public_flag_irrelevant(writer, "DeleteObject", "object:delete", "photos", "k"))


class PublicAccessTests(TestCase):
    """
    Public access changes made behind the node's back (as
    C{anvil-admin bucket set-public-access} does) apply to the very next
    request of anyone they concern, however recently the owner used the
    bucket.
    """

    bucket = "shared"

    async def setUp(self) -> None:
        """Start a stack, an owner app with full access, a bucket and an object."""
        self.s3 = await S3Stack.start(self)
        self.owner = self.s3.client(await self.s3.create_app("acme", "web"))
        await self.s3.call(self.owner.create_bucket, Bucket=self.bucket)
        await self.s3.call(self.owner.put_object, Bucket=self.bucket, Key="k", Body=b"data")

    async def _read(self, client: Any) -> bytes | str:
        """GetObject with C{client}: the body, or the error code."""

        def run() -> bytes:
            body: bytes = client.get_object(Bucket=self.bucket, Key="k")["Body"].read()
            return body

        try:
            result: bytes = await self.s3.call(run)
        except Exception as e:  # noqa: BLE001 - botocore's ClientError
            return str(getattr(e, "response", {}).get("Error", {}).get("Code", e))
        return result

    async def test_anonymous_and_other_tenant(self) -> None:
        """
        Making the bucket public and private again applies at once to
        anonymous requests and another tenant's, between owner requests
        that keep the record cached.
        """
        anonymous = self.s3.client(None)
        other = self.s3.client(await self.s3.create_app("globex", "reader"))
        buckets = self.s3.service.buckets
        for public in (True, False, True, False):
            await buckets.set_public(self.bucket, public)
            self.assertEqual(await self._read(self.owner), b"data")
            expected: bytes | str = b"data" if public else "AccessDenied"
            self.assertEqual(await self._read(anonymous), expected)
            self.assertEqual(await self._read(other), expected)

    async def test_owner_app_relying_on_public(self) -> None:
        """
        An app of the owning tenant that may not read by its policies reads
        a public bucket only while it is public, from the very next request.
        """
        writer = self.s3.client(
            await self.s3.create_app("acme", "writer", policies=[("object:write", "*")])
        )
        await buckets_public(self.s3, self.bucket, True)
        self.assertEqual(await self._read(self.owner), b"data")
        self.assertEqual(await self._read(writer), b"data")
        await buckets_public(self.s3, self.bucket, False)
        self.assertEqual(await self._read(self.owner), b"data")
        self.assertEqual(await self._read(writer), "AccessDenied")
        await buckets_public(self.s3, self.bucket, True)
        self.assertEqual(await self._read(writer), b"data")

    async def test_delete_and_recreate(self) -> None:
        """
        Deleting a bucket and creating it again through the node is seen by
        the owner's next request, cached record or not.
        """
        await self.s3.call(self.owner.delete_object, Bucket=self.bucket, Key="k")
        await self.s3.call(self.owner.delete_bucket, Bucket=self.bucket)
        self.assertEqual(await self._read(self.owner), "NoSuchBucket")
        await self.s3.call(self.owner.create_bucket, Bucket=self.bucket)
        await self.s3.call(self.owner.put_object, Bucket=self.bucket, Key="k", Body=b"new")
        record = await self.s3.service.buckets.get_bucket(self.bucket)
        assert record is not None
        rows = await self.s3.regional_db.run_query(
            "SELECT bucket_id FROM objects WHERE key = 'k' AND deleted_at IS NULL"
        )
        self.assertEqual(rows, [(record.id,)])
        self.assertEqual(await self._read(self.owner), b"new")


async def buckets_public(s3: S3Stack, name: str, public: bool) -> None:
    """
    Change a bucket's public flag in the database, as the admin tool does.
    """
    await s3.service.buckets.set_public(name, public)
