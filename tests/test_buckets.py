# -*- test-case-name: tests.test_buckets -*-
"""
Tests for L{anvil.meta.buckets.BucketStore} on a real PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.trial.unittest import TestCase

from anvil.errors import InvalidArgument, NotFound
from anvil.meta.buckets import BucketNameTaken, BucketStore
from anvil.meta.database import Database
from anvil.meta.migrate import apply_migrations
from anvil.meta.records import Bucket
from anvil.meta.secrets import SecretBox
from anvil.meta.store import GlobalStore
from tests.pg import fresh_database


class BucketStoreTests(TestCase):
    """
    Creating, finding, listing, publishing and deleting buckets.
    """

    async def setUp(self) -> None:
        self.dsn = fresh_database(self)
        self.db = await Database.connect(self.dsn, reactor, pool_size=2)
        self.addCleanup(self.db.close)
        await apply_migrations(self.db, "global")
        admin = GlobalStore(self.db, SecretBox.from_hex("ab" * 32))
        await admin.create_region("us-east-1")
        await admin.create_region("eu-west-1")
        self.acme = (await admin.create_tenant("acme"))["id"]
        self.beta = (await admin.create_tenant("beta"))["id"]
        self.store = BucketStore(self.db)

    async def test_create(self) -> None:
        """
        A new bucket has an id, its owner's name, its region, is private,
        and is found by name and by id.
        """
        bucket = await self.store.create_bucket("photos", self.acme, "eu-west-1")
        self.assertEqual(
            (bucket.name, bucket.tenant_id, bucket.tenant_name, bucket.region, bucket.public),
            ("photos", self.acme, "acme", "eu-west-1", False),
        )
        self.assertEqual(bucket.created_at.tzinfo, UTC)
        self.assertEqual(bucket.created_at.microsecond % 1000, 0)
        self.assertEqual(await self.store.get_bucket("photos"), bucket)
        self.assertEqual(await self.store.get_bucket_by_id(bucket.id), bucket)
        self.assertIsNone(await self.store.get_bucket("videos"))
        self.assertIsNone(await self.store.get_bucket_by_id(bucket.id + 1))
        self.assertIsNone(await self.store.get_bucket(""))

    async def test_name_taken(self) -> None:
        """
        A live name cannot be created again: the error says whether the
        caller's tenant owns it (BucketAlreadyOwnedByYou) or another
        (BucketAlreadyExists).
        """
        await self.store.create_bucket("photos", self.acme, "us-east-1")
        with self.assertRaises(BucketNameTaken) as mine:
            await self.store.create_bucket("photos", self.acme, "us-east-1")
        self.assertTrue(mine.exception.owned_by_caller)
        self.assertEqual(str(mine.exception), "Bucket 'photos' already exists and is yours.")
        with self.assertRaises(BucketNameTaken) as theirs:
            await self.store.create_bucket("photos", self.beta, "eu-west-1")
        self.assertFalse(theirs.exception.owned_by_caller)
        self.assertEqual(theirs.exception.name, "photos")

    async def test_concurrent_create(self) -> None:
        """
        Two tenants creating one name at once: one gets it, the other is
        told someone else owns it.
        """
        other = BucketStore(await Database.connect(self.dsn, reactor, pool_size=1))
        self.addCleanup(other._db.close)
        for i in range(10):
            name = f"race-{i}"
            results = await DeferredList(
                [
                    Deferred.fromCoroutine(self.store.create_bucket(name, self.acme, "us-east-1")),
                    Deferred.fromCoroutine(other.create_bucket(name, self.beta, "us-east-1")),
                ],
                consumeErrors=True,
            )
            winners = [r for ok, r in results if ok]
            losers = [r.value for ok, r in results if not ok]
            self.assertEqual(len(winners), 1)
            self.assertIsInstance(losers[0], BucketNameTaken)
            self.assertFalse(losers[0].owned_by_caller)
            self.assertEqual((await self.store.get_bucket(name)).tenant_id, winners[0].tenant_id)

    async def test_delete(self) -> None:
        """
        A deleted bucket is gone at once and its name free for anyone; its
        row keeps its id (its objects refer to it until they are collected).
        """
        bucket = await self.store.create_bucket("photos", self.acme, "us-east-1")
        self.assertTrue(await self.store.delete_bucket(bucket.id))
        self.assertFalse(await self.store.delete_bucket(bucket.id))
        self.assertIsNone(await self.store.get_bucket("photos"))
        self.assertIsNone(await self.store.get_bucket_by_id(bucket.id))
        again = await self.store.create_bucket("photos", self.beta, "us-east-1")
        self.assertNotEqual(again.id, bucket.id)
        rows = await self.db.run_query("SELECT id, deleted_at IS NOT NULL FROM buckets ORDER BY id")
        self.assertEqual(rows, [(bucket.id, True), (again.id, False)])

    async def test_list(self) -> None:
        """
        A tenant's live buckets list by name, without other tenants' or
        deleted ones.
        """
        for name in ("b-bucket", "a-bucket", "a.bucket", "zz9", "0-first"):
            await self.store.create_bucket(name, self.acme, "us-east-1")
        await self.store.create_bucket("other", self.beta, "us-east-1")
        gone = await self.store.create_bucket("gone", self.acme, "us-east-1")
        await self.store.delete_bucket(gone.id)
        listed = await self.store.list_buckets(self.acme)
        self.assertEqual([b.name for b in listed], ["0-first", "a-bucket", "a.bucket", "b-bucket", "zz9"])
        self.assertTrue(all(isinstance(b, Bucket) and b.tenant_name == "acme" for b in listed))
        self.assertEqual(await self.store.list_buckets(12345), [])

    async def test_set_public(self) -> None:
        """
        Public access is switched on and off by name; unknown names are
        NotFound.
        """
        await self.store.create_bucket("photos", self.acme, "us-east-1")
        await self.store.set_public("photos", True)
        self.assertTrue((await self.store.get_bucket("photos")).public)
        await self.store.set_public("photos", False)
        self.assertFalse((await self.store.get_bucket("photos")).public)
        with self.assertRaises(NotFound):
            await self.store.set_public("nope", True)

    async def test_errors(self) -> None:
        """
        Unknown tenants and regions are NotFound; malformed names are
        refused before the database is asked.
        """
        with self.assertRaises(NotFound) as caught:
            await self.store.create_bucket("photos", self.acme, "mars-1")
        self.assertEqual(str(caught.exception), "Region 'mars-1' does not exist.")
        with self.assertRaises(NotFound):
            await self.store.create_bucket("photos", 999, "us-east-1")
        for bad in ("", "ab", "Photos", "-photos", "photos-", "a" * 64, "pho_tos", "photos\x00"):
            with self.assertRaises(InvalidArgument):
                await self.store.create_bucket(bad, self.acme, "us-east-1")
        self.assertEqual(await self.store.list_buckets(self.acme), [])
