# -*- test-case-name: tests.test_migrate -*-
"""
Numbered, append-only schema migrations for the global and regional
databases.

Migrations are the files C{anvil/meta/schema/<role>/NNNN_<name>.sql}
(shipped as package data).  They are applied in order, each at most once,
and recorded in C{schema_migrations}.  A released migration is never edited:
a schema change is a new, higher-numbered file.

All pending migrations of a role are applied in one transaction that first
takes a transaction-scoped advisory lock, so that when several nodes start
at once against one database, one applies the migrations and the others wait
for it, then find nothing left to do.  A failing migration rolls back
entirely: the database is left as it was.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from twisted.logger import Logger

from anvil.errors import InvalidArgument
from anvil.meta.database import Database

_log = Logger()

ROLES = ("global", "regional")

#: Advisory lock keys, one per role (arbitrary constants: "anvil" in ASCII
#: followed by the role number).  Per role, so that a deployment that keeps
#: both roles in one database still serialises each role's appliers.
_LOCK_KEYS = {"global": 0x616E76696C_0001, "regional": 0x616E76696C_0002}

_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

# The role column lets one database hold both roles (a small deployment may
# point both URLs at one database) without their version numbers clashing.
_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    role TEXT NOT NULL,
    version INTEGER NOT NULL,
    name TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (role, version)
)
"""


@dataclass(frozen=True)
class Migration:
    """
    One migration file.

    @ivar version: its number.
    @ivar name: its file name without C{.sql}, for example
        C{"0001_initial"}.
    @ivar sql: its statements.
    """

    version: int
    name: str
    sql: str


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise InvalidArgument(
            f"The migration role must be 'global' or 'regional', not {role!r}."
        )


def load_migrations(role: str) -> list[Migration]:
    """
    Read the migrations of C{role} from the package, ordered by version.

    @param role: C{"global"} or C{"regional"}.
    @raise InvalidArgument: for an unknown role.
    @raise RuntimeError: when the package's migration files are misnamed or
        two share a version (a packaging bug, not an operator error).
    """
    _check_role(role)
    directory = resources.files("anvil.meta").joinpath("schema", role)
    migrations: dict[int, Migration] = {}
    for entry in directory.iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.match(entry.name)
        if match is None:
            raise RuntimeError(
                f"Migration file {role}/{entry.name} is not named NNNN_name.sql."
            )
        version = int(match.group(1))
        if version in migrations:
            raise RuntimeError(
                f"Migrations {migrations[version].name} and {entry.name[:-4]} "
                f"of role {role} share version {version}."
            )
        migrations[version] = Migration(
            version, entry.name[:-4], entry.read_text(encoding="utf-8")
        )
    return [migrations[v] for v in sorted(migrations)]


async def apply_migrations(db: Database, role: str) -> list[str]:
    """
    Apply the pending migrations of C{role} to C{db}.

    @param db: the global or regional database.
    @param role: C{"global"} or C{"regional"}.
    @return: the names of the migrations applied, in order (empty when the
        schema was up to date).
    @raise InvalidArgument: for an unknown role.
    @raise DatabaseUnavailable: when the database cannot be reached.
    """
    migrations = load_migrations(role)

    async def apply(cursor: Any) -> list[str]:
        # Held until this transaction ends: a second node starting now
        # blocks here, then sees everything this one committed.
        await cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEYS[role],))
        await cursor.execute(_CREATE_TABLE)
        await cursor.execute(
            "SELECT version, name FROM schema_migrations WHERE role = %s", (role,)
        )
        applied = {version: name for version, name in cursor.fetchall()}
        known = {m.version for m in migrations}
        for version in sorted(set(applied) - known):
            # A newer Anvil has migrated this database.  Migrations only add
            # to the schema, so older code keeps working during an upgrade.
            _log.warn(
                "The {role} database has migration {name}, which this version "
                "of Anvil does not know; continuing",
                role=role,
                name=applied[version],
            )
        done = []
        for migration in migrations:
            if migration.version in applied:
                continue
            # No parameters: the file's text goes to the server verbatim.
            await cursor.execute(migration.sql)
            await cursor.execute(
                "INSERT INTO schema_migrations (role, version, name) VALUES (%s, %s, %s)",
                (role, migration.version, migration.name),
            )
            done.append(migration.name)
        return done

    names: list[str] = await db.run_interaction(apply)
    for name in names:
        _log.info("Applied {role} migration {name}", role=role, name=name)
    return names
