# -*- test-case-name: tests.test_store -*-
"""
The global metadata store: regions, tenants, apps, policies and buckets.

This is what C{anvil-admin} manages and what SigV4 authentication and
authorisation read.  Every method validates its arguments before touching
the database (L{InvalidArgument}), names what it could not find
(L{NotFound}) or what already exists (L{AlreadyExists}), and sends only
parameterised SQL.

App secrets are generated here, shown once by C{app create} and
C{app rotate-secret}, and stored encrypted with the L{SecretBox}; the
associated data binds each ciphertext to its app's client id.
"""

from __future__ import annotations

import base64
import re
import secrets
import string
from typing import Any

import psycopg2.errors

from anvil.errors import AlreadyExists, InvalidArgument, NotFound
from anvil.meta.database import Database
from anvil.meta.secrets import SecretBox

#: Tenant and app names.
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,63}$")
#: Region names, as C{node.region} accepts them.
_REGION = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
#: S3 bucket names (the DNS-compatible rules AWS enforces for new buckets).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

#: Policy actions; C{*} and C{bucket:*}/C{object:*} are wildcards.
ACTIONS = frozenset(
    {
        "*",
        "bucket:*",
        "bucket:create",
        "bucket:read",
        "bucket:write",
        "bucket:delete",
        "object:*",
        "object:read",
        "object:write",
        "object:delete",
    }
)

_CLIENT_ID_ALPHABET = string.ascii_uppercase + string.digits
_CLIENT_ID_PREFIX = "AK"
_CLIENT_ID_LENGTH = 20
_MAX_KEY_BYTES = 1024


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"The {kind} name {name!r} is invalid: use 1 to 63 letters, digits, "
            "'.', '_' or '-'."
        )


def _check_region(name: str) -> None:
    if not isinstance(name, str) or not _REGION.fullmatch(name):
        raise InvalidArgument(
            f"The region name {name!r} is invalid: use lower-case letters, "
            "digits and '-', starting with a letter or digit, at most 63 characters."
        )


def _check_bucket(name: str) -> None:
    if not isinstance(name, str) or not _BUCKET.fullmatch(name):
        raise InvalidArgument(
            f"The bucket name {name!r} is invalid: use 3 to 63 lower-case "
            "letters, digits, '.' or '-', starting and ending with a letter or digit."
        )


def check_action(action: str) -> None:
    """
    Check that C{action} is a policy action.

    @raise InvalidArgument: when it is not.
    """
    if action not in ACTIONS:
        raise InvalidArgument(
            f"The action {action!r} is invalid: use one of "
            + ", ".join(sorted(ACTIONS))
            + "."
        )


def check_resource(resource: str) -> None:
    """
    Check that C{resource} is a policy resource: C{*}, a bucket name, or a
    bucket name followed by C{/} and a key or a key prefix ending in C{*}
    (C{bucket/*}, C{bucket/invoices/*}).

    @raise InvalidArgument: when it is not.
    """
    problem = _resource_problem(resource)
    if problem:
        raise InvalidArgument(
            f"The resource {resource!r} is invalid: {problem}; use '*', "
            "'BUCKET', 'BUCKET/*', 'BUCKET/PREFIX*' or 'BUCKET/KEY'."
        )


def _resource_problem(resource: str) -> str | None:
    if not isinstance(resource, str) or not resource:
        return "it is empty"
    if resource == "*":
        return None
    bucket, slash, key = resource.partition("/")
    if not _BUCKET.fullmatch(bucket):
        return f"{bucket!r} is not a valid bucket name"
    if not slash:
        return None
    if not key:
        return "the key part after '/' is empty"
    if len(key.encode("utf-8")) > _MAX_KEY_BYTES:
        return f"the key part is longer than {_MAX_KEY_BYTES} bytes"
    if any(ord(c) < 32 or ord(c) == 127 for c in key):
        return "it contains control characters"
    if "*" in key[:-1]:
        return "'*' may only end the key part"
    return None


def _new_client_id() -> str:
    """
    A client id shaped like an AWS access key id: 20 upper-case letters and
    digits starting with C{AK}.
    """
    tail = _CLIENT_ID_LENGTH - len(_CLIENT_ID_PREFIX)
    return _CLIENT_ID_PREFIX + "".join(
        secrets.choice(_CLIENT_ID_ALPHABET) for _ in range(tail)
    )


def _new_secret() -> str:
    """
    A client secret shaped like an AWS secret access key: 40 base64
    characters (240 random bits).
    """
    return base64.b64encode(secrets.token_bytes(30)).decode("ascii")


def _secret_aad(client_id: str) -> bytes:
    """
    The associated data binding an app secret's ciphertext to its client id.
    """
    return b"app-secret:" + client_id.encode("ascii")


class GlobalStore:
    """
    Regions, tenants, apps, policies and buckets in the global database.

    Records are returned as dicts with the column names as keys;
    timestamps are timezone-aware L{datetime}s.
    """

    def __init__(self, db: Database, secret_box: SecretBox) -> None:
        """
        @param db: the global database (migrated).
        @param secret_box: encrypts and decrypts app secrets.
        """
        self._db = db
        self._box = secret_box

    # -- regions -------------------------------------------------------

    async def create_region(self, name: str) -> bool:
        """
        Create region C{name} unless it exists.

        @return: whether it was created.
        @raise InvalidArgument: for a malformed name.
        """
        _check_region(name)
        rows = await self._db.run_query(
            "INSERT INTO regions (name) VALUES (%s) ON CONFLICT (name) DO NOTHING RETURNING name",
            (name,),
        )
        return bool(rows)

    async def list_regions(self) -> list[dict[str, Any]]:
        """
        All regions, by name.

        @return: dicts with C{name} and C{created_at}.
        """
        rows = await self._db.run_query(
            "SELECT name, created_at FROM regions ORDER BY name"
        )
        return [{"name": name, "created_at": created} for name, created in rows]

    # -- tenants -------------------------------------------------------

    async def create_tenant(self, name: str) -> dict[str, Any]:
        """
        Create tenant C{name}.

        @return: a dict with C{id}, C{name} and C{created_at}.
        @raise InvalidArgument: for a malformed name.
        @raise AlreadyExists: when the tenant exists.
        """
        _check_name("tenant", name)
        try:
            rows = await self._db.run_query(
                "INSERT INTO tenants (name) VALUES (%s) RETURNING id, created_at",
                (name,),
            )
        except psycopg2.errors.UniqueViolation:
            raise AlreadyExists("tenant", name) from None
        tenant_id, created = rows[0]
        return {"id": tenant_id, "name": name, "created_at": created}

    async def get_tenant(self, name: str) -> dict[str, Any]:
        """
        Look tenant C{name} up.

        @return: a dict with C{id}, C{name} and C{created_at}.
        @raise NotFound: when it does not exist.
        """
        _check_name("tenant", name)
        rows = await self._db.run_query(
            "SELECT id, created_at FROM tenants WHERE name = %s", (name,)
        )
        if not rows:
            raise NotFound("tenant", name)
        return {"id": rows[0][0], "name": name, "created_at": rows[0][1]}

    async def list_tenants(self) -> list[dict[str, Any]]:
        """
        All tenants, by name.

        @return: dicts with C{id}, C{name}, C{created_at}, and the numbers of
            their C{apps} and live C{buckets}.
        """
        rows = await self._db.run_query(
            """
            SELECT t.id, t.name, t.created_at,
                   (SELECT count(*) FROM apps a WHERE a.tenant_id = t.id),
                   (SELECT count(*) FROM buckets b
                     WHERE b.tenant_id = t.id AND b.deleted_at IS NULL)
              FROM tenants t
             ORDER BY t.name
            """
        )
        return [
            {"id": i, "name": n, "created_at": c, "apps": apps, "buckets": buckets}
            for i, n, c, apps, buckets in rows
        ]

    # -- apps ----------------------------------------------------------

    async def create_app(self, tenant_name: str, app_name: str) -> dict[str, Any]:
        """
        Create app C{app_name} in tenant C{tenant_name} with new credentials.

        The secret is returned here and by L{get_app_by_client_id}; show it
        to the operator once.

        @return: a dict with C{app_name}, C{tenant_name}, C{client_id},
            C{client_secret} and C{created_at}.
        @raise InvalidArgument: for malformed names.
        @raise NotFound: when the tenant does not exist.
        @raise AlreadyExists: when an app of that name exists (app names are
            unique across tenants).
        """
        _check_name("tenant", tenant_name)
        _check_name("app", app_name)
        secret = _new_secret()
        # A client id collision is astronomically unlikely (36^18), but the
        # unique constraint would turn it into a confusing error: retry.
        for attempt in range(5):
            client_id = _new_client_id()
            ciphertext = self._box.encrypt(secret.encode("ascii"), _secret_aad(client_id))
            try:
                rows = await self._db.run_query(
                    """
                    INSERT INTO apps (tenant_id, name, client_id, secret_ciphertext)
                    SELECT id, %s, %s, %s FROM tenants WHERE name = %s
                    RETURNING created_at
                    """,
                    (app_name, client_id, ciphertext, tenant_name),
                )
            except psycopg2.errors.UniqueViolation as e:
                if e.diag.constraint_name == "apps_client_id_key":
                    continue
                raise AlreadyExists("app", app_name) from None
            if not rows:
                raise NotFound("tenant", tenant_name)
            return {
                "app_name": app_name,
                "tenant_name": tenant_name,
                "client_id": client_id,
                "client_secret": secret,
                "created_at": rows[0][0],
            }
        raise RuntimeError("Could not generate a unique client id.")

    async def list_apps(self, tenant_name: str | None = None) -> list[dict[str, Any]]:
        """
        Apps (without their secrets), by name, optionally of one tenant.

        @return: dicts with C{name}, C{tenant_name}, C{client_id},
            C{created_at}, C{secret_rotated_at} and the number of
            C{policies}.
        @raise NotFound: when C{tenant_name} does not exist.
        """
        if tenant_name is not None:
            _check_name("tenant", tenant_name)
        rows = await self._db.run_query(
            """
            SELECT a.name, t.name, a.client_id, a.created_at, a.secret_rotated_at,
                   (SELECT count(*) FROM policies p WHERE p.app_id = a.id)
              FROM apps a JOIN tenants t ON t.id = a.tenant_id
             WHERE %s IS NULL OR t.name = %s
             ORDER BY a.name
            """,
            (tenant_name, tenant_name),
        )
        if not rows and tenant_name is not None:
            await self.get_tenant(tenant_name)
        return [
            {
                "name": name,
                "tenant_name": tenant,
                "client_id": client_id,
                "created_at": created,
                "secret_rotated_at": rotated,
                "policies": policies,
            }
            for name, tenant, client_id, created, rotated, policies in rows
        ]

    async def delete_app(self, app_name: str) -> None:
        """
        Delete app C{app_name} and its policies; its credentials stop
        working.

        @raise NotFound: when it does not exist.
        """
        _check_name("app", app_name)
        rows = await self._db.run_query(
            "DELETE FROM apps WHERE name = %s RETURNING id", (app_name,)
        )
        if not rows:
            raise NotFound("app", app_name)

    async def rotate_secret(self, app_name: str) -> str:
        """
        Give app C{app_name} a new secret; the old one stops working.  The
        client id stays.

        @return: the new secret.
        @raise NotFound: when the app does not exist.
        """
        _check_name("app", app_name)
        secret = _new_secret()

        async def rotate(cursor: Any) -> bool:
            await cursor.execute(
                "SELECT id, client_id FROM apps WHERE name = %s FOR UPDATE", (app_name,)
            )
            row = cursor.fetchone()
            if row is None:
                return False
            app_id, client_id = row
            await cursor.execute(
                "UPDATE apps SET secret_ciphertext = %s, secret_rotated_at = now() WHERE id = %s",
                (self._box.encrypt(secret.encode("ascii"), _secret_aad(client_id)), app_id),
            )
            return True

        if not await self._db.run_interaction(rotate):
            raise NotFound("app", app_name)
        return secret

    async def get_app_by_client_id(self, client_id: str) -> dict[str, Any]:
        """
        Look an app up by its client id (the SigV4 access key id).

        @return: a dict with C{id}, C{name}, C{client_id}, C{client_secret}
            (decrypted), C{tenant_id}, C{tenant_name}, C{created_at},
            C{secret_rotated_at} and C{policies} (a list of dicts with
            C{action} and C{resource}).
        @raise NotFound: when no app has this client id.
        @raise SecretKeyMismatch: when the secret does not decrypt.
        """
        if not isinstance(client_id, str) or not client_id:
            raise NotFound("client id", str(client_id))
        return await self._get_app("a.client_id = %s", client_id, "client id")

    async def get_app(self, app_name: str) -> dict[str, Any]:
        """
        Look an app up by name; the result is as for
        L{get_app_by_client_id}.

        @raise NotFound: when it does not exist.
        """
        _check_name("app", app_name)
        return await self._get_app("a.name = %s", app_name, "app")

    async def _get_app(self, condition: str, value: str, kind: str) -> dict[str, Any]:
        # condition is one of two constants above, never user input.
        rows = await self._db.run_query(
            f"""
            SELECT a.id, a.name, a.client_id, a.secret_ciphertext, a.created_at,
                   a.secret_rotated_at, t.id, t.name,
                   COALESCE(
                     (SELECT json_agg(json_build_object('action', p.action,
                                                        'resource', p.resource)
                                      ORDER BY p.action, p.resource)
                        FROM policies p WHERE p.app_id = a.id),
                     '[]'::json)
              FROM apps a JOIN tenants t ON t.id = a.tenant_id
             WHERE {condition}
            """,
            (value,),
        )
        if not rows:
            raise NotFound(kind, value)
        (app_id, name, client_id, ciphertext, created, rotated, tenant_id, tenant_name, policies) = rows[0]
        secret = self._box.decrypt(bytes(ciphertext), _secret_aad(client_id))
        return {
            "id": app_id,
            "name": name,
            "client_id": client_id,
            "client_secret": secret.decode("ascii"),
            "tenant_id": tenant_id,
            "tenant_name": tenant_name,
            "created_at": created,
            "secret_rotated_at": rotated,
            "policies": policies,
        }

    # -- policies ------------------------------------------------------

    async def grant(self, app_name: str, action: str, resource: str) -> None:
        """
        Allow app C{app_name} C{action} on C{resource}.

        @raise InvalidArgument: for a malformed name, action or resource.
        @raise NotFound: when the app does not exist.
        @raise AlreadyExists: when the app already holds this exact policy.
        """
        _check_name("app", app_name)
        check_action(action)
        check_resource(resource)
        rows = await self._db.run_query(
            """
            INSERT INTO policies (app_id, action, resource)
            SELECT id, %s, %s FROM apps WHERE name = %s
            ON CONFLICT (app_id, action, resource) DO NOTHING
            RETURNING id
            """,
            (action, resource, app_name),
        )
        if not rows:
            await self._require_app(app_name)
            raise AlreadyExists("policy", f"{action} on {resource}", f"for app {app_name!r}")

    async def revoke(self, app_name: str, action: str, resource: str) -> None:
        """
        Remove the policy C{action} on C{resource} from app C{app_name}.

        @raise InvalidArgument: for a malformed name, action or resource.
        @raise NotFound: when the app or the policy does not exist.
        """
        _check_name("app", app_name)
        check_action(action)
        check_resource(resource)
        rows = await self._db.run_query(
            """
            DELETE FROM policies p USING apps a
             WHERE p.app_id = a.id AND a.name = %s AND p.action = %s AND p.resource = %s
            RETURNING p.id
            """,
            (app_name, action, resource),
        )
        if not rows:
            await self._require_app(app_name)
            raise NotFound("policy", f"{action} on {resource}", f"for app {app_name!r}")

    async def list_policies(self, app_name: str | None = None) -> list[dict[str, Any]]:
        """
        Policies, by app, action and resource, optionally of one app.

        @return: dicts with C{app_name}, C{tenant_name}, C{action},
            C{resource} and C{created_at}.
        @raise NotFound: when C{app_name} does not exist.
        """
        if app_name is not None:
            _check_name("app", app_name)
        rows = await self._db.run_query(
            """
            SELECT a.name, t.name, p.action, p.resource, p.created_at
              FROM policies p
              JOIN apps a ON a.id = p.app_id
              JOIN tenants t ON t.id = a.tenant_id
             WHERE %s IS NULL OR a.name = %s
             ORDER BY a.name, p.action, p.resource
            """,
            (app_name, app_name),
        )
        if not rows and app_name is not None:
            await self._require_app(app_name)
        return [
            {
                "app_name": app,
                "tenant_name": tenant,
                "action": action,
                "resource": resource,
                "created_at": created,
            }
            for app, tenant, action, resource, created in rows
        ]

    async def _require_app(self, app_name: str) -> None:
        rows = await self._db.run_query("SELECT 1 FROM apps WHERE name = %s", (app_name,))
        if not rows:
            raise NotFound("app", app_name)

    # -- buckets -------------------------------------------------------

    async def list_buckets(self, tenant_name: str | None = None) -> list[dict[str, Any]]:
        """
        Live (not deleted) buckets, by name, optionally of one tenant.

        @return: dicts with C{name}, C{tenant_name}, C{region}, C{public}
            and C{created_at}.
        @raise NotFound: when C{tenant_name} does not exist.
        """
        if tenant_name is not None:
            _check_name("tenant", tenant_name)
        rows = await self._db.run_query(
            """
            SELECT b.name, t.name, b.region, b.public, b.created_at
              FROM buckets b JOIN tenants t ON t.id = b.tenant_id
             WHERE b.deleted_at IS NULL AND (%s IS NULL OR t.name = %s)
             ORDER BY b.name
            """,
            (tenant_name, tenant_name),
        )
        if not rows and tenant_name is not None:
            await self.get_tenant(tenant_name)
        return [
            {
                "name": name,
                "tenant_name": tenant,
                "region": region,
                "public": public,
                "created_at": created,
            }
            for name, tenant, region, public, created in rows
        ]

    async def set_public_access(self, bucket_name: str, public: bool) -> None:
        """
        Allow (C{public=True}) or stop anonymous GetObject and HeadObject on
        bucket C{bucket_name}.

        @raise InvalidArgument: for a malformed bucket name.
        @raise NotFound: when no live bucket has that name.
        """
        _check_bucket(bucket_name)
        rows = await self._db.run_query(
            "UPDATE buckets SET public = %s WHERE name = %s AND deleted_at IS NULL RETURNING id",
            (bool(public), bucket_name),
        )
        if not rows:
            raise NotFound("bucket", bucket_name)

