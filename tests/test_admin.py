# -*- test-case-name: tests.test_admin -*-
"""
Tests for C{anvil-admin} (L{anvil.scripts.admin}) against a real PostgreSQL.

Commands run as real subprocesses (C{python -m anvil.scripts.admin}), so
C{react()}, standard output and error, and exit statuses are exactly what
an operator's shell sees.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Mapping
from typing import Any

import psycopg2
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

import anvil
from anvil.meta.embedded import EmbeddedPostgres
from anvil.meta.migrate import load_migrations
from anvil.meta.secrets import SecretBox
from anvil.scripts import admin
from tests.pg import fresh_database

KEY = "5ecf" * 16
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(anvil.__file__)))


class Result:
    """
    What one C{anvil-admin} run printed and returned.
    """

    def __init__(self, out: bytes, err: bytes, status: int) -> None:
        self.out = out.decode("utf-8")
        self.err = err.decode("utf-8")
        self.status = status

    def json(self) -> Any:
        return json.loads(self.out)

    def __repr__(self) -> str:
        return f"<Result status={self.status} out={self.out!r} err={self.err!r}>"


def run_admin(argv: list[str], env: Mapping[str, str]) -> Deferred[Result]:
    """
    Run C{anvil-admin argv} in a subprocess with exactly C{env} (plus
    C{PATH} and C{PYTHONPATH}).
    """
    full = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": _ROOT, **env}
    d = getProcessOutputAndValue(
        sys.executable, ["-m", "anvil.scripts.admin", *argv], env=full, path=_ROOT, reactor=reactor
    )
    return d.addCallback(lambda r: Result(*r))


class AdminTestMixin:
    """
    Helpers shared by the subprocess tests.
    """

    def assertSucceeded(self, result: Result) -> None:
        self.assertEqual((result.status, result.err), (0, ""), result)  # type: ignore[attr-defined]

    def assertOneLineError(self, result: Result, *fragments: str) -> None:
        """
        The run failed with status 2 and one C{anvil-admin: error:} line
        containing C{fragments}, nothing on standard output, no traceback.
        """
        t: Any = self
        t.assertEqual(result.status, 2, result)
        t.assertEqual(result.out, "", result)
        lines = result.err.splitlines()
        t.assertEqual(len(lines), 1, result)
        t.assertTrue(lines[0].startswith("anvil-admin: error: "), result)
        for fragment in fragments:
            t.assertIn(fragment, lines[0])


class ExternalDatabaseTests(AdminTestMixin, TestCase):
    """
    Every command against configured database URLs.
    """

    def setUp(self) -> None:
        data_dir = self.mktemp()
        self.global_dsn = fresh_database(self, "g")
        self.env = {
            "GLOBAL_DATABASE_URL": self.global_dsn,
            "REGIONAL_DATABASE_URL": fresh_database(self, "r"),
            "ANVIL_SECRET_ENCRYPTION_KEY": KEY,
            "ANVIL_DATA_DIR": os.path.abspath(data_dir),
        }

    def admin(self, *argv: str, **env: str) -> Deferred[Result]:
        return run_admin(list(argv), {**self.env, **env})

    async def all(self, *runs: Deferred[Result]) -> list[Result]:
        return await gatherResults(list(runs))

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> None:
        conn = psycopg2.connect(self.global_dsn)
        try:
            with conn, conn.cursor() as cur:
                cur.execute(statement, params)
        finally:
            conn.close()

    async def test_migrate(self) -> None:
        """
        C{migrate} applies the migrations once; a second run says the
        databases are up to date.
        """
        first = await self.admin("migrate", "--json")
        self.assertSucceeded(first)
        self.assertEqual(
            first.json(),
            {role: [m.name for m in load_migrations(role)] for role in ("global", "regional")},
        )
        second = await self.admin("migrate")
        self.assertSucceeded(second)
        self.assertEqual(
            second.out,
            "The global database is up to date.\nThe regional database is up to date.\n",
        )

    async def test_regions(self) -> None:
        """
        C{region create} is idempotent; C{region list} prints a table or
        JSON.
        """
        created = await self.admin("region", "create", "eu-west-1")
        self.assertSucceeded(created)
        self.assertEqual(created.out, "Created region 'eu-west-1'.\n")
        again = await self.admin("--json", "region", "create", "eu-west-1")
        self.assertSucceeded(again)
        self.assertEqual(again.json(), {"region": "eu-west-1", "created": False})
        table, listed, bad = await self.all(
            self.admin("region", "list"),
            self.admin("region", "list", "--json"),
            self.admin("region", "create", "EU West"),
        )
        self.assertSucceeded(table)
        header, row = table.out.splitlines()
        self.assertEqual(header.split(), ["NAME", "CREATED"])
        self.assertTrue(row.startswith("eu-west-1  "))
        self.assertEqual([r["name"] for r in listed.json()], ["eu-west-1"])
        self.assertOneLineError(bad, "region name 'EU West' is invalid")

    async def test_tenants(self) -> None:
        """
        C{tenant create} and C{tenant list}; a duplicate or malformed tenant
        is a one-line error with status 2.
        """
        self.assertSucceeded(await self.admin("tenant", "create", "acme"))
        duplicate, bad, listed, table = await self.all(
            self.admin("tenant", "create", "acme"),
            self.admin("tenant", "create", "a b"),
            self.admin("tenant", "list", "--json"),
            self.admin("tenant", "list"),
        )
        self.assertOneLineError(duplicate, "Tenant 'acme' already exists.")
        self.assertOneLineError(bad, "tenant name 'a b' is invalid")
        [tenant] = listed.json()
        self.assertEqual((tenant["name"], tenant["apps"], tenant["buckets"]), ("acme", 0, 0))
        self.assertEqual(table.out.splitlines()[0].split(), ["NAME", "APPS", "BUCKETS", "CREATED"])
        self.assertEqual(table.out.splitlines()[1].split()[:3], ["acme", "0", "0"])

    async def test_apps(self) -> None:
        """
        C{app create} prints the credentials once (JSON with client id and
        secret); C{app list}, C{app rotate-secret} and C{app delete} work and
        report unknown tenants and apps, and duplicates, as one-line errors.
        """
        self.assertSucceeded(await self.admin("tenant", "create", "acme"))
        created = await self.admin("app", "create", "--tenant-name", "acme", "--app-name", "web", "--json")
        self.assertSucceeded(created)
        app = created.json()
        self.assertEqual((app["app_name"], app["tenant_name"]), ("web", "acme"))
        self.assertRegex(app["client_id"], r"^AK[A-Z0-9]{18}$")
        self.assertEqual(len(app["client_secret"]), 40)

        human = await self.admin("app", "create", "--tenant-name", "acme", "--app-name", "api")
        self.assertSucceeded(human)
        self.assertIn("Created app 'api' in tenant 'acme'.", human.out)
        self.assertRegex(human.out, r"Client id: +AK[A-Z0-9]{18}\n")
        self.assertRegex(human.out, r"Client secret: +\S{40}\n")

        (listed, table, per_tenant, unknown_tenant, duplicate, no_tenant, missing_arg) = await self.all(
            self.admin("app", "list", "--json"),
            self.admin("app", "list"),
            self.admin("--json", "app", "list", "--tenant-name", "acme"),
            self.admin("app", "list", "--tenant-name", "nobody"),
            self.admin("app", "create", "--tenant-name", "acme", "--app-name", "web"),
            self.admin("app", "create", "--tenant-name", "nobody", "--app-name", "x"),
            self.admin("app", "create", "--tenant-name", "acme"),
        )
        self.assertEqual([a["name"] for a in listed.json()], ["api", "web"])
        self.assertNotIn("client_secret", listed.json()[0])
        self.assertNotIn(app["client_secret"], table.out)
        self.assertIn(app["client_id"], table.out)
        self.assertEqual(table.out.splitlines()[0].split()[:3], ["NAME", "TENANT", "CLIENT"])
        self.assertEqual(len(per_tenant.json()), 2)
        self.assertOneLineError(unknown_tenant, "Tenant 'nobody' does not exist.")
        self.assertOneLineError(duplicate, "App 'web' already exists.")
        self.assertOneLineError(no_tenant, "Tenant 'nobody' does not exist.")
        self.assertOneLineError(missing_arg, "--app-name")

        rotated = await self.admin("app", "rotate-secret", "--app-name", "web", "--json")
        self.assertSucceeded(rotated)
        new = rotated.json()
        self.assertEqual(new["client_id"], app["client_id"])
        self.assertNotEqual(new["client_secret"], app["client_secret"])
        # The database holds the new secret, encrypted and bound to the
        # client id.
        conn = psycopg2.connect(self.global_dsn)
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT secret_ciphertext FROM apps WHERE name = 'web'")
                [(ciphertext,)] = cur.fetchall()
        finally:
            conn.close()
        self.assertEqual(
            SecretBox.from_hex(KEY).decrypt(bytes(ciphertext), b"app-secret:" + app["client_id"].encode()),
            new["client_secret"].encode(),
        )

        deleted, rotate_unknown = await self.all(
            self.admin("app", "delete", "--app-name", "web"),
            self.admin("app", "rotate-secret", "--app-name", "nobody"),
        )
        self.assertSucceeded(deleted)
        self.assertEqual(deleted.out, "Deleted app 'web'; its credentials no longer work.\n")
        self.assertOneLineError(rotate_unknown, "App 'nobody' does not exist.")
        again = await self.admin("app", "delete", "--app-name", "web")
        self.assertOneLineError(again, "App 'web' does not exist.")

    async def test_policies(self) -> None:
        """
        C{policy grant}, C{list} and C{revoke}, with duplicates, unknown apps
        and policies, and malformed actions and resources as one-line errors.
        """
        self.assertSucceeded(await self.admin("tenant", "create", "acme"))
        self.assertSucceeded(await self.admin("app", "create", "--tenant-name", "acme", "--app-name", "web"))
        granted = await self.admin("policy", "grant", "--app-name", "web", "--action", "*", "--resource", "*")
        self.assertSucceeded(granted)
        self.assertEqual(granted.out, "Granted '*' on '*' to app 'web'.\n")
        second = await self.admin(
            "policy", "grant", "--app-name", "web", "--action", "object:read",
            "--resource", "photos/*", "--json",
        )
        self.assertEqual(
            second.json(),
            {"app_name": "web", "action": "object:read", "resource": "photos/*", "granted": True},
        )
        (duplicate, unknown_app, bad_action, bad_resource, listed, table, list_unknown) = await self.all(
            self.admin("policy", "grant", "--app-name", "web", "--action", "*", "--resource", "*"),
            self.admin("policy", "grant", "--app-name", "nobody", "--action", "*", "--resource", "*"),
            self.admin("policy", "grant", "--app-name", "web", "--action", "object:list", "--resource", "*"),
            self.admin("policy", "grant", "--app-name", "web", "--action", "*", "--resource", "Bad/*"),
            self.admin("policy", "list", "--app-name", "web", "--json"),
            self.admin("policy", "list"),
            self.admin("policy", "list", "--app-name", "nobody"),
        )
        self.assertOneLineError(duplicate, "Policy '* on *' for app 'web' already exists.")
        self.assertOneLineError(unknown_app, "App 'nobody' does not exist.")
        self.assertOneLineError(bad_action, "action 'object:list' is invalid")
        self.assertOneLineError(bad_resource, "resource 'Bad/*' is invalid")
        self.assertEqual(
            [(p["action"], p["resource"]) for p in listed.json()],
            [("*", "*"), ("object:read", "photos/*")],
        )
        lines = table.out.splitlines()
        self.assertEqual(lines[0].split(), ["APP", "TENANT", "ACTION", "RESOURCE"])
        self.assertEqual([line.split() for line in lines[1:]], [["web", "acme", "*", "*"], ["web", "acme", "object:read", "photos/*"]])
        self.assertOneLineError(list_unknown, "App 'nobody' does not exist.")

        revoked = await self.admin("policy", "revoke", "--app-name", "web", "--action", "*", "--resource", "*")
        self.assertSucceeded(revoked)
        self.assertEqual(revoked.out, "Revoked '*' on '*' from app 'web'.\n")
        again, unknown = await self.all(
            self.admin("policy", "revoke", "--app-name", "web", "--action", "*", "--resource", "*"),
            self.admin("policy", "revoke", "--app-name", "nobody", "--action", "*", "--resource", "*"),
        )
        self.assertOneLineError(again, "Policy '* on *' for app 'web' does not exist.")
        self.assertOneLineError(unknown, "App 'nobody' does not exist.")

    async def test_buckets(self) -> None:
        """
        C{bucket list} and C{bucket set-public-access --allow/--deny}, with
        unknown buckets and tenants and bad flags as one-line errors.
        """
        self.assertSucceeded(await self.admin("tenant", "create", "acme"))
        self.assertSucceeded(await self.admin("region", "create", "us-east-1"))
        self.sql(
            "INSERT INTO buckets (name, tenant_id, region) SELECT %s, id, 'us-east-1' FROM tenants",
            ("photos",),
        )
        allowed = await self.admin("bucket", "set-public-access", "--bucket", "photos", "--allow")
        self.assertSucceeded(allowed)
        self.assertIn("now allows anonymous GetObject and HeadObject", allowed.out)
        (listed, table, per_tenant, unknown_tenant, unknown_bucket, both, neither) = await self.all(
            self.admin("bucket", "list", "--json"),
            self.admin("bucket", "list"),
            self.admin("bucket", "list", "--tenant-name", "acme", "--json"),
            self.admin("bucket", "list", "--tenant-name", "nobody"),
            self.admin("bucket", "set-public-access", "--bucket", "nothere", "--allow"),
            self.admin("bucket", "set-public-access", "--bucket", "photos", "--allow", "--deny"),
            self.admin("bucket", "set-public-access", "--bucket", "photos"),
        )
        [bucket] = listed.json()
        self.assertEqual(
            (bucket["name"], bucket["tenant_name"], bucket["region"], bucket["public"]),
            ("photos", "acme", "us-east-1", True),
        )
        self.assertEqual(table.out.splitlines()[1].split()[:4], ["photos", "acme", "us-east-1", "yes"])
        self.assertEqual(len(per_tenant.json()), 1)
        self.assertOneLineError(unknown_tenant, "Tenant 'nobody' does not exist.")
        self.assertOneLineError(unknown_bucket, "Bucket 'nothere' does not exist.")
        self.assertOneLineError(both, "not allowed with argument")
        self.assertOneLineError(neither, "one of the arguments --allow --deny is required")

        denied = await self.admin("--json", "bucket", "set-public-access", "--bucket", "photos", "--deny")
        self.assertEqual(denied.json(), {"bucket": "photos", "public": False})
        self.assertFalse((await self.admin("bucket", "list", "--json")).json()[0]["public"])

    async def test_usage_errors(self) -> None:
        """
        Missing or unknown commands and options are one-line errors with
        status 2.
        """
        nothing, unknown, unknown_sub, unknown_option = await self.all(
            self.admin(),
            self.admin("frobnicate"),
            self.admin("tenant", "remove", "x"),
            self.admin("tenant", "list", "--colour"),
        )
        self.assertOneLineError(nothing, "required: COMMAND")
        self.assertOneLineError(unknown, "invalid choice: 'frobnicate'")
        self.assertOneLineError(unknown_sub, "invalid choice: 'remove'")
        self.assertOneLineError(unknown_option, "unrecognized arguments: --colour")

    async def test_configuration_errors(self) -> None:
        """
        A malformed key, a wrong key, an unreachable database and a missing
        configuration file are one-line errors with status 2, and the
        database password is never printed.
        """
        self.assertSucceeded(await self.admin("migrate"))
        malformed, wrong, unreachable, missing_file = await self.all(
            self.admin("tenant", "list", ANVIL_SECRET_ENCRYPTION_KEY="abc"),
            self.admin("tenant", "list", ANVIL_SECRET_ENCRYPTION_KEY="0" * 64),
            self.admin(
                "tenant", "list",
                GLOBAL_DATABASE_URL="postgresql://anvil:hunter2@127.0.0.1:1/anvil_global",
            ),
            self.admin("--config", "/nonexistent/anvil.toml", "tenant", "list"),
        )
        self.assertOneLineError(malformed, "ANVIL_SECRET_ENCRYPTION_KEY", "64")
        self.assertOneLineError(wrong, "ANVIL_SECRET_ENCRYPTION_KEY does not match")
        self.assertOneLineError(unreachable, "127.0.0.1:1", "anvil_global")
        self.assertNotIn("hunter2", unreachable.err)
        self.assertOneLineError(missing_file, "/nonexistent/anvil.toml")


class EmbeddedTests(AdminTestMixin, TestCase):
    """
    C{--data-dir} reaches the embedded PostgreSQL of a data directory.
    """

    def setUp(self) -> None:
        # Under /tmp, not trial's directory: the server runs as an
        # unprivileged user when we are root and must reach it.
        self.data_dir = tempfile.mkdtemp(prefix="anvil-admin-", dir="/tmp")
        os.chmod(self.data_dir, 0o755)
        self.addCleanup(shutil.rmtree, self.data_dir, True)
        self.server = EmbeddedPostgres.for_data_dir(self.data_dir)
        self.addCleanup(self.server.stop)

    def admin(self, *argv: str) -> Deferred[Result]:
        # No database URLs and no key in the environment: the embedded
        # default generates and keeps its own.
        return run_admin(["--data-dir", self.data_dir, *argv], {})

    async def test_starts_and_stops_embedded(self) -> None:
        """
        Without a running node, a command starts the embedded PostgreSQL,
        creates the key file (0600), and stops the server again; the next
        command reuses both.
        """
        self.assertSucceeded(await self.admin("tenant", "create", "acme"))
        self.assertFalse(self.server.is_running())
        key_file = os.path.join(self.data_dir, "secret.key")
        self.assertEqual(stat.S_IMODE(os.stat(key_file).st_mode), 0o600)
        listed = await self.admin("tenant", "list", "--json")
        self.assertSucceeded(listed)
        self.assertEqual([t["name"] for t in listed.json()], ["acme"])
        self.assertFalse(self.server.is_running())

    async def test_leaves_running_server(self) -> None:
        """
        When the server is already running (a node started it), the command
        uses it and leaves it running.
        """
        await deferToThread(self.server.start)
        created = await self.admin("app", "create", "--tenant-name", "nobody", "--app-name", "a")
        self.assertOneLineError(created, "Tenant 'nobody' does not exist.")
        self.assertSucceeded(await self.admin("tenant", "create", "acme"))
        self.assertTrue(self.server.is_running())


    async def test_embedded_start_failure(self) -> None:
        """
        When the embedded PostgreSQL cannot start, the command fails with
        one line saying so and naming its directory.
        """
        # A file where the cluster directory should be.
        with open(os.path.join(self.data_dir, "postgres"), "w") as f:
            f.write("not a directory\n")
        failed = await self.admin("tenant", "list")
        self.assertOneLineError(
            failed,
            f"The embedded PostgreSQL in {self.data_dir}/postgres could not be started",
        )


class ParserTests(SynchronousTestCase):
    """
    The argument parser, in process.
    """

    def test_json_either_position(self) -> None:
        """
        C{--json}, C{--data-dir} and C{--config} work before or after the
        command.
        """
        parser = admin.build_parser()
        for argv in (
            ["--json", "--data-dir", "D", "tenant", "list"],
            ["tenant", "list", "--json", "--data-dir", "D"],
            ["tenant", "--json", "list", "--data-dir", "D"],
        ):
            args = parser.parse_args(argv)
            self.assertTrue(args.json, argv)
            self.assertEqual(args.data_dir, "D")
        args = parser.parse_args(["tenant", "list"])
        self.assertEqual((args.json, args.data_dir, args.config), (False, None, None))

    def test_usage_error_in_process(self) -> None:
        """
        L{admin.run} turns a usage error into one line on its error stream
        and status 2, without touching a database.
        """
        out, err = io.StringIO(), io.StringIO()
        d = Deferred.fromCoroutine(admin.run(reactor, ["app", "create"], out, err, {}))
        self.assertEqual(self.successResultOf(d), 2)
        self.assertEqual(out.getvalue(), "")
        self.assertEqual(
            err.getvalue(),
            "anvil-admin: error: the following arguments are required: --tenant-name, --app-name\n",
        )
