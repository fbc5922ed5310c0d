# -*- test-case-name: tests.test_store -*-
"""
Tests for L{anvil.meta.store.GlobalStore} on a real PostgreSQL.
"""

from __future__ import annotations

import base64

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anvil.errors import AlreadyExists, InvalidArgument, NotFound, SecretKeyMismatch
from anvil.meta.database import Database
from anvil.meta.migrate import apply_migrations
from anvil.meta.secrets import SecretBox
from anvil.meta.store import GlobalStore, check_action, check_resource
from tests.pg import fresh_database

KEY = "00112233445566778899aabbccddeeff" * 2


class ValidationTests(SynchronousTestCase):
    """
    Policy actions and resources are checked before they are stored.
    """

    def test_actions(self) -> None:
        """
        The documented actions and wildcards are accepted, others refused.
        """
        for action in ("*", "bucket:*", "object:*", "bucket:create", "object:delete"):
            check_action(action)
        for action in ("", "object", "object:list", "OBJECT:READ", "*:*"):
            self.assertRaises(InvalidArgument, check_action, action)

    def test_resources(self) -> None:
        """
        '*', a bucket, a bucket with '/*', a key prefix ending in '*', or a
        key are accepted; malformed ones are refused with the reason.
        """
        for resource in ("*", "my-bucket", "my-bucket/*", "my-bucket/invoices/*", "my-bucket/a/b.txt"):
            check_resource(resource)
        for resource in ("", "My-Bucket", "ab", "bucket\n", "b*", "*/x", "bucket/", "bucket/a*b", "bucket/\x00"):
            e = self.assertRaises(InvalidArgument, check_resource, resource)
            self.assertIn("is invalid", str(e))


class GlobalStoreTests(TestCase):
    """
    Every L{GlobalStore} method, with its errors.
    """

    async def setUp(self) -> None:
        self.db = await Database.connect(fresh_database(self), reactor, pool_size=2)
        self.addCleanup(self.db.close)
        await apply_migrations(self.db, "global")
        self.box = SecretBox.from_hex(KEY)
        self.store = GlobalStore(self.db, self.box)

    async def _bucket(self, name: str, tenant: str, region: str = "us-east-1") -> None:
        await self.store.create_region(region)
        await self.db.run_operation(
            "INSERT INTO buckets (name, tenant_id, region) SELECT %s, id, %s FROM tenants WHERE name = %s",
            (name, region, tenant),
        )

    # regions

    async def test_regions(self) -> None:
        """
        Creating a region is idempotent and reports whether it was new.
        """
        self.assertTrue(await self.store.create_region("us-east-1"))
        self.assertFalse(await self.store.create_region("us-east-1"))
        self.assertTrue(await self.store.create_region("eu-west-1"))
        self.assertEqual([r["name"] for r in await self.store.list_regions()], ["eu-west-1", "us-east-1"])
        with self.assertRaises(InvalidArgument):
            await self.store.create_region("US East")

    # tenants

    async def test_tenants(self) -> None:
        """
        Tenants are created once, listed by name with counts, and looked up.
        """
        created = await self.store.create_tenant("acme")
        self.assertEqual(created["name"], "acme")
        with self.assertRaises(AlreadyExists) as caught:
            await self.store.create_tenant("acme")
        self.assertEqual(str(caught.exception), "Tenant 'acme' already exists.")
        await self.store.create_tenant("beta.co")
        await self.store.create_app("acme", "a1")
        await self._bucket("bucket-1", "acme")
        tenants = await self.store.list_tenants()
        self.assertEqual(
            [(t["name"], t["apps"], t["buckets"]) for t in tenants],
            [("acme", 1, 1), ("beta.co", 0, 0)],
        )
        self.assertEqual((await self.store.get_tenant("acme"))["id"], created["id"])
        with self.assertRaises(NotFound):
            await self.store.get_tenant("nobody")

    async def test_tenant_names(self) -> None:
        """
        Tenant names are 1-63 letters, digits, '.', '_' or '-'.
        """
        await self.store.create_tenant("A-b_c.9")
        await self.store.create_tenant("x" * 63)
        for bad in ("", "x" * 64, "a b", "a/b", "ü", "a\n"):
            with self.assertRaises(InvalidArgument):
                await self.store.create_tenant(bad)

    # apps

    async def test_create_app(self) -> None:
        """
        A new app gets an AWS-shaped client id and a 40-character secret,
        stored encrypted (not in plain text) and bound to its client id.
        """
        await self.store.create_tenant("acme")
        app = await self.store.create_app("acme", "web")
        self.assertEqual((app["app_name"], app["tenant_name"]), ("web", "acme"))
        self.assertRegex(app["client_id"], r"^AK[A-Z0-9]{18}$")
        self.assertEqual(len(app["client_secret"]), 40)
        base64.b64decode(app["client_secret"], validate=True)
        [(ciphertext,)] = await self.db.run_query("SELECT secret_ciphertext FROM apps")
        self.assertNotIn(app["client_secret"].encode(), bytes(ciphertext))
        self.assertEqual(
            self.box.decrypt(bytes(ciphertext), b"app-secret:" + app["client_id"].encode()),
            app["client_secret"].encode(),
        )
        other = await self.store.create_app("acme", "web2")
        self.assertNotEqual(other["client_id"], app["client_id"])
        self.assertNotEqual(other["client_secret"], app["client_secret"])

    async def test_create_app_errors(self) -> None:
        """
        Unknown tenants, duplicate app names (across tenants) and malformed
        names are refused.
        """
        await self.store.create_tenant("acme")
        await self.store.create_tenant("beta")
        with self.assertRaises(NotFound) as caught:
            await self.store.create_app("nobody", "web")
        self.assertEqual(str(caught.exception), "Tenant 'nobody' does not exist.")
        await self.store.create_app("acme", "web")
        with self.assertRaises(AlreadyExists):
            await self.store.create_app("beta", "web")
        with self.assertRaises(InvalidArgument):
            await self.store.create_app("acme", "bad name")
        self.assertEqual(len(await self.store.list_apps()), 1)

    async def test_list_apps(self) -> None:
        """
        Apps are listed by name without secrets, optionally per tenant; an
        unknown tenant is L{NotFound}.
        """
        await self.store.create_tenant("acme")
        await self.store.create_tenant("beta")
        await self.store.create_tenant("empty")
        b = await self.store.create_app("beta", "b-app")
        await self.store.create_app("acme", "a-app")
        await self.store.grant("b-app", "*", "*")
        apps = await self.store.list_apps()
        self.assertEqual([(a["name"], a["tenant_name"]) for a in apps], [("a-app", "acme"), ("b-app", "beta")])
        self.assertEqual(apps[1]["client_id"], b["client_id"])
        self.assertEqual(apps[1]["policies"], 1)
        self.assertNotIn("client_secret", apps[0])
        self.assertEqual([a["name"] for a in await self.store.list_apps("beta")], ["b-app"])
        self.assertEqual(await self.store.list_apps("empty"), [])
        with self.assertRaises(NotFound):
            await self.store.list_apps("nobody")

    async def test_get_app_by_client_id(self) -> None:
        """
        An app is found by client id with its decrypted secret, tenant and
        policies, as SigV4 needs; an unknown client id is L{NotFound}.
        """
        tenant = await self.store.create_tenant("acme")
        app = await self.store.create_app("acme", "web")
        await self.store.grant("web", "object:read", "photos/*")
        await self.store.grant("web", "bucket:read", "photos")
        found = await self.store.get_app_by_client_id(app["client_id"])
        self.assertEqual(found["client_secret"], app["client_secret"])
        self.assertEqual((found["name"], found["tenant_id"], found["tenant_name"]), ("web", tenant["id"], "acme"))
        self.assertEqual(
            found["policies"],
            [{"action": "bucket:read", "resource": "photos"}, {"action": "object:read", "resource": "photos/*"}],
        )
        self.assertEqual((await self.store.get_app("web"))["client_id"], app["client_id"])
        for unknown in ("AKNOTHERE", ""):
            with self.assertRaises(NotFound):
                await self.store.get_app_by_client_id(unknown)
        with self.assertRaises(NotFound):
            await self.store.get_app("nobody")

    async def test_wrong_key(self) -> None:
        """
        With another encryption key, looking up an app's secret raises
        L{SecretKeyMismatch}.
        """
        await self.store.create_tenant("acme")
        app = await self.store.create_app("acme", "web")
        other = GlobalStore(self.db, SecretBox.from_hex("ff" * 32))
        with self.assertRaises(SecretKeyMismatch):
            await other.get_app_by_client_id(app["client_id"])

    async def test_rotate_secret(self) -> None:
        """
        Rotating gives a new secret under the same client id; the old secret
        is gone.
        """
        await self.store.create_tenant("acme")
        app = await self.store.create_app("acme", "web")
        secret = await self.store.rotate_secret("web")
        self.assertNotEqual(secret, app["client_secret"])
        self.assertEqual(len(secret), 40)
        found = await self.store.get_app_by_client_id(app["client_id"])
        self.assertEqual(found["client_secret"], secret)
        self.assertIsNotNone(found["secret_rotated_at"])
        with self.assertRaises(NotFound):
            await self.store.rotate_secret("nobody")

    async def test_delete_app(self) -> None:
        """
        Deleting an app removes it and its policies; deleting it again is
        L{NotFound}.
        """
        await self.store.create_tenant("acme")
        app = await self.store.create_app("acme", "web")
        await self.store.grant("web", "*", "*")
        await self.store.delete_app("web")
        self.assertEqual(await self.store.list_apps(), [])
        self.assertEqual(await self.store.list_policies(), [])
        with self.assertRaises(NotFound):
            await self.store.get_app_by_client_id(app["client_id"])
        with self.assertRaises(NotFound):
            await self.store.delete_app("web")

    # policies

    async def test_grant_and_revoke(self) -> None:
        """
        Policies are granted once, listed in order, and revoked; duplicates
        are L{AlreadyExists}, missing ones L{NotFound}.
        """
        await self.store.create_tenant("acme")
        await self.store.create_app("acme", "web")
        await self.store.create_app("acme", "api")
        await self.store.grant("web", "object:read", "photos/*")
        await self.store.grant("web", "*", "*")
        await self.store.grant("api", "bucket:create", "*")
        with self.assertRaises(AlreadyExists) as caught:
            await self.store.grant("web", "*", "*")
        self.assertEqual(str(caught.exception), "Policy '* on *' for app 'web' already exists.")
        self.assertEqual(
            [(p["app_name"], p["action"], p["resource"]) for p in await self.store.list_policies()],
            [("api", "bucket:create", "*"), ("web", "*", "*"), ("web", "object:read", "photos/*")],
        )
        self.assertEqual(len(await self.store.list_policies("web")), 2)
        await self.store.revoke("web", "*", "*")
        with self.assertRaises(NotFound) as caught:
            await self.store.revoke("web", "*", "*")
        self.assertEqual(str(caught.exception), "Policy '* on *' for app 'web' does not exist.")
        self.assertEqual(
            [(p["action"], p["resource"]) for p in await self.store.list_policies("web")],
            [("object:read", "photos/*")],
        )

    async def test_policy_errors(self) -> None:
        """
        Unknown apps are L{NotFound}; bad actions and resources are
        L{InvalidArgument} and store nothing.
        """
        await self.store.create_tenant("acme")
        await self.store.create_app("acme", "web")
        with self.assertRaises(NotFound):
            await self.store.grant("nobody", "*", "*")
        with self.assertRaises(NotFound):
            await self.store.revoke("nobody", "*", "*")
        with self.assertRaises(NotFound):
            await self.store.list_policies("nobody")
        with self.assertRaises(InvalidArgument):
            await self.store.grant("web", "object:list", "*")
        with self.assertRaises(InvalidArgument):
            await self.store.grant("web", "*", "Bad_Bucket")
        with self.assertRaises(InvalidArgument):
            await self.store.revoke("web", "*", "")
        self.assertEqual(await self.store.list_policies(), [])

    # buckets

    async def test_list_buckets(self) -> None:
        """
        Live buckets are listed by name, optionally per tenant; deleted ones
        are not; an unknown tenant is L{NotFound}.
        """
        await self.store.create_tenant("acme")
        await self.store.create_tenant("beta")
        await self._bucket("zeta", "acme")
        await self._bucket("alpha", "beta", region="eu-west-1")
        await self._bucket("gone", "acme")
        await self.db.run_operation("UPDATE buckets SET deleted_at = now() WHERE name = 'gone'")
        buckets = await self.store.list_buckets()
        self.assertEqual(
            [(b["name"], b["tenant_name"], b["region"], b["public"]) for b in buckets],
            [("alpha", "beta", "eu-west-1", False), ("zeta", "acme", "us-east-1", False)],
        )
        self.assertEqual([b["name"] for b in await self.store.list_buckets("acme")], ["zeta"])
        with self.assertRaises(NotFound):
            await self.store.list_buckets("nobody")

    async def test_set_public_access(self) -> None:
        """
        Public access is switched on and off per bucket; unknown or deleted
        buckets are L{NotFound} and malformed names L{InvalidArgument}.
        """
        await self.store.create_tenant("acme")
        await self._bucket("photos", "acme")
        await self.store.set_public_access("photos", True)
        self.assertTrue((await self.store.list_buckets())[0]["public"])
        await self.store.set_public_access("photos", False)
        self.assertFalse((await self.store.list_buckets())[0]["public"])
        with self.assertRaises(NotFound) as caught:
            await self.store.set_public_access("nothere", True)
        self.assertEqual(str(caught.exception), "Bucket 'nothere' does not exist.")
        await self.db.run_operation("UPDATE buckets SET deleted_at = now()")
        with self.assertRaises(NotFound):
            await self.store.set_public_access("photos", True)
        with self.assertRaises(InvalidArgument):
            await self.store.set_public_access("Not A Bucket", True)
