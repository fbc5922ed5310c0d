# -*- test-case-name: tests.test_migrate -*-
"""
Tests for L{anvil.meta.migrate} and the schema its migrations create, on a
real PostgreSQL.
"""

from __future__ import annotations

import fnmatch
import os
import tomllib

import psycopg2
import psycopg2.errors
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, capturedLogs
from twisted.trial.unittest import SynchronousTestCase, TestCase

import anvil
from anvil.errors import InvalidArgument
from anvil.meta import migrate
from anvil.meta.database import Database
from anvil.meta.migrate import Migration, apply_migrations, load_migrations
from tests.pg import fresh_database


class LoadMigrationsTests(SynchronousTestCase):
    """
    The migration files shipped in the package.
    """

    def test_numbered_and_documented(self) -> None:
        """
        Each role has migrations numbered from 1 without duplicates, each
        file starting with a comment saying what it is for.
        """
        for role in migrate.ROLES:
            migrations = load_migrations(role)
            self.assertTrue(migrations)
            versions = [m.version for m in migrations]
            self.assertEqual(versions, sorted(set(versions)))
            self.assertEqual(versions[0], 1)
            for m in migrations:
                self.assertRegex(m.name, r"^\d{4}_[a-z0-9_]+$")
                self.assertTrue(m.sql.startswith("-- "), m.name)

    def test_shipped_as_package_data(self) -> None:
        """
        pyproject's package-data pattern matches every migration file, so
        they are in the wheel.
        """
        root = os.path.dirname(os.path.dirname(os.path.abspath(anvil.__file__)))
        with open(os.path.join(root, "pyproject.toml"), "rb") as f:
            patterns = tomllib.load(f)["tool"]["setuptools"]["package-data"]["anvil"]
        package = os.path.dirname(os.path.abspath(anvil.__file__))
        for role in migrate.ROLES:
            for m in load_migrations(role):
                relative = f"meta/schema/{role}/{m.name}.sql"
                self.assertTrue(os.path.exists(os.path.join(package, relative)))
                self.assertTrue(any(fnmatch.fnmatch(relative, p) for p in patterns), relative)

    def test_unknown_role(self) -> None:
        """
        Roles other than global and regional are refused.
        """
        self.assertRaises(InvalidArgument, load_migrations, "local")


class ApplyMigrationsTests(TestCase):
    """
    Applying migrations to a real database.
    """

    async def _connect(self, dsn: str) -> Database:
        db = await Database.connect(dsn, reactor, pool_size=1)
        self.addCleanup(db.close)
        return db

    async def _tables(self, db: Database) -> set[str]:
        rows = await db.run_query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
        return {name for (name,) in rows}

    async def test_applied_once(self) -> None:
        """
        The first run applies every migration and creates the role's tables;
        the second applies nothing.
        """
        db = await self._connect(fresh_database(self))
        self.assertEqual(await apply_migrations(db, "global"), [m.name for m in load_migrations("global")])
        self.assertEqual(
            await self._tables(db),
            {
                "schema_migrations", "regions", "tenants", "apps", "policies",
                "buckets", "tasks", "cluster_ca", "settings", "removed_nodes",
            },
        )
        self.assertEqual(await apply_migrations(db, "global"), [])
        rows = await db.run_query("SELECT role, version, name FROM schema_migrations ORDER BY version")
        self.assertEqual(rows, [("global", m.version, m.name) for m in load_migrations("global")])

    async def test_regional(self) -> None:
        """
        The regional role creates the object tables.
        """
        db = await self._connect(fresh_database(self))
        self.assertEqual(
            await apply_migrations(db, "regional"), [m.name for m in load_migrations("regional")]
        )
        self.assertEqual(
            await self._tables(db),
            {"schema_migrations", "objects", "contents", "multipart_uploads", "multipart_parts"},
        )

    async def test_both_roles_in_one_database(self) -> None:
        """
        One database can hold both roles; each role's migrations are
        recorded separately.
        """
        db = await self._connect(fresh_database(self))
        await apply_migrations(db, "global")
        self.assertEqual(
            await apply_migrations(db, "regional"), [m.name for m in load_migrations("regional")]
        )
        rows = await db.run_query("SELECT role, count(*) FROM schema_migrations GROUP BY role ORDER BY role")
        self.assertEqual(
            rows,
            [("global", len(load_migrations("global"))), ("regional", len(load_migrations("regional")))],
        )

    async def test_concurrent_appliers(self) -> None:
        """
        Two nodes migrating one fresh database at once both succeed; the
        advisory lock makes one apply each migration and the other find
        nothing left to do.
        """
        dsn = fresh_database(self)
        for role in migrate.ROLES:
            first, second = await self._connect(dsn), await self._connect(dsn)
            observer = await self._connect(dsn)
            # Hold the role's lock so that both appliers are certainly
            # running at the same time, queued on the lock, before either
            # can proceed.
            holder = psycopg2.connect(dsn)
            self.addCleanup(holder.close)
            holder.autocommit = True
            holder.cursor().execute("SELECT pg_advisory_lock(%s)", (migrate._LOCK_KEYS[role],))
            results = gatherResults(
                [
                    Deferred.fromCoroutine(apply_migrations(first, role)),
                    Deferred.fromCoroutine(apply_migrations(second, role)),
                ]
            )
            for _ in range(500):
                rows = await observer.run_query(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                )
                if rows == [(2,)]:
                    break
                await deferLater(reactor, 0.01)
            self.assertEqual(rows, [(2,)])
            holder.cursor().execute("SELECT pg_advisory_unlock(%s)", (migrate._LOCK_KEYS[role],))
            expected = [m.name for m in load_migrations(role)]
            self.assertEqual(sorted(await results, key=len), [[], expected])
            rows = await first.run_query(
                "SELECT version, count(*) FROM schema_migrations WHERE role = %s GROUP BY version",
                (role,),
            )
            self.assertEqual(rows, [(m.version, 1) for m in load_migrations(role)])

    async def test_failure_rolls_back(self) -> None:
        """
        When a migration fails, everything applied in that run is rolled
        back and the error is raised.
        """
        self.patch(
            migrate,
            "load_migrations",
            lambda role: [
                Migration(1, "0001_good", "CREATE TABLE good (x INTEGER)"),
                Migration(2, "0002_bad", "CREATE TABLE bad ("),
            ],
        )
        db = await self._connect(fresh_database(self))
        with self.assertRaises(psycopg2.errors.SyntaxError):
            await apply_migrations(db, "global")
        self.assertEqual(await self._tables(db), set())
        # The connection is still usable after the rollback.
        self.assertEqual(await db.run_query("SELECT 1"), [(1,)])

    async def test_newer_database(self) -> None:
        """
        A migration recorded by a newer Anvil is reported in the log and
        the known ones still apply.
        """
        db = await self._connect(fresh_database(self))
        self.patch(migrate, "load_migrations", lambda role: [
            Migration(1, "0001_a", "CREATE TABLE a (x INTEGER)"),
            Migration(2, "0002_b", "CREATE TABLE b (x INTEGER)"),
        ])
        await apply_migrations(db, "global")
        self.patch(migrate, "load_migrations", lambda role: [
            Migration(1, "0001_a", "CREATE TABLE a (x INTEGER)"),
        ])
        with capturedLogs() as events:
            self.assertEqual(await apply_migrations(db, "global"), [])
        warnings = [e for e in events if e["log_level"] == LogLevel.warn]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["name"], "0002_b")

    async def test_unknown_role(self) -> None:
        """
        An unknown role is refused before the database is touched.
        """
        db = await self._connect(fresh_database(self))
        with self.assertRaises(InvalidArgument):
            await apply_migrations(db, "everything")



class SchemaTests(TestCase):
    """
    Constraints and orderings the migrations promise.
    """

    async def _migrated(self, role: str) -> Database:
        db = await Database.connect(fresh_database(self), reactor, pool_size=1)
        self.addCleanup(db.close)
        await apply_migrations(db, role)
        return db

    async def test_bucket_names_unique_among_live_buckets(self) -> None:
        """
        Two live buckets cannot share a name, but a soft-deleted bucket's
        name can be reused.
        """
        db = await self._migrated("global")
        await db.run_operation("INSERT INTO regions (name) VALUES ('r1')")
        await db.run_operation("INSERT INTO tenants (name) VALUES ('t')")
        insert = (
            "INSERT INTO buckets (name, tenant_id, region) "
            "SELECT %s, id, 'r1' FROM tenants WHERE name = 't'"
        )
        await db.run_operation(insert, ("b1",))
        with self.assertRaises(psycopg2.errors.UniqueViolation):
            await db.run_operation(insert, ("b1",))
        await db.run_operation("UPDATE buckets SET deleted_at = now() WHERE name = 'b1'")
        await db.run_operation(insert, ("b1",))
        rows = await db.run_query("SELECT count(*), bool_or(public) FROM buckets WHERE name = 'b1'")
        self.assertEqual(rows, [(2, False)])

    async def test_policies_cascade(self) -> None:
        """
        Deleting an app deletes its policies; a policy is unique per app.
        """
        db = await self._migrated("global")
        await db.run_operation("INSERT INTO tenants (name) VALUES ('t')")
        await db.run_operation(
            "INSERT INTO apps (tenant_id, name, client_id, secret_ciphertext) "
            "SELECT id, 'a', 'AK1', '\\x00' FROM tenants"
        )
        grant = "INSERT INTO policies (app_id, action, resource) SELECT id, '*', '*' FROM apps"
        await db.run_operation(grant)
        with self.assertRaises(psycopg2.errors.UniqueViolation):
            await db.run_operation(grant)
        await db.run_operation("DELETE FROM apps")
        self.assertEqual(await db.run_query("SELECT count(*) FROM policies"), [(0,)])

    async def test_task_states(self) -> None:
        """
        Tasks default to pending and only take the documented states.
        """
        db = await self._migrated("global")
        rows = await db.run_query("INSERT INTO tasks (kind) VALUES ('gc') RETURNING state, attempts, payload")
        self.assertEqual(rows, [("pending", 0, {})])
        with self.assertRaises(psycopg2.errors.CheckViolation):
            await db.run_operation("UPDATE tasks SET state = 'sleeping'")

    async def test_object_keys_sort_by_bytes(self) -> None:
        """
        Object keys order by UTF-8 byte order (COLLATE "C"), as S3 listings
        require, whatever the database's default collation.
        """
        db = await self._migrated("regional")
        keys = ["é", "a", "B", "~", "a/b", "a-b", "Z"]
        for key in keys:
            await db.run_operation(
                "INSERT INTO objects (bucket_id, key, size, etag) VALUES (1, %s, 0, 'e')", (key,)
            )
        rows = await db.run_query("SELECT key FROM objects WHERE bucket_id = 1 ORDER BY key")
        self.assertEqual([k for (k,) in rows], sorted(keys, key=lambda k: k.encode("utf-8")))

    async def test_one_live_object_per_key(self) -> None:
        """
        A key has at most one live object; soft-deleted versions may remain.
        """
        db = await self._migrated("regional")
        insert = "INSERT INTO objects (bucket_id, key, size, etag) VALUES (1, 'k', 0, 'e')"
        await db.run_operation(insert)
        with self.assertRaises(psycopg2.errors.UniqueViolation):
            await db.run_operation(insert)
        await db.run_operation("UPDATE objects SET deleted_at = now()")
        await db.run_operation(insert)

    async def test_multipart_parts_cascade(self) -> None:
        """
        Aborting (deleting) an upload deletes its parts; part numbers are
        limited to 1..10000.
        """
        db = await self._migrated("regional")
        await db.run_operation(
            "INSERT INTO multipart_uploads (upload_id, bucket_id, key) VALUES ('u', 1, 'k')"
        )
        part = (
            "INSERT INTO multipart_parts (upload_id, part_number, content_hash, size, etag) "
            "VALUES ('u', %s, %s, 1, 'e')"
        )
        await db.run_operation(part, (1, "0" * 64))
        with self.assertRaises(psycopg2.errors.CheckViolation):
            await db.run_operation(part, (10001, "0" * 64))
        await db.run_operation("DELETE FROM multipart_uploads")
        self.assertEqual(await db.run_query("SELECT count(*) FROM multipart_parts"), [(0,)])
