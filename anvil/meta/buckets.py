# -*- test-case-name: tests.test_buckets -*-
"""
Buckets in the global database, as the S3 API sees them.

Bucket names are unique among live buckets across all tenants and regions.
Deleting a bucket is a soft delete: the row (and its id, which the regional
objects refer to) stays until the collector has removed what remains of
it, while the name is free again at once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import psycopg2.errors

from anvil.errors import AnvilError, InvalidArgument, NotFound
from anvil.meta.database import Database
from anvil.meta.records import Bucket, truncate_to_ms

#: The DNS-compatible names AWS accepts for new buckets: 3 to 63 lower-case
#: letters, digits, '.' and '-', starting and ending with a letter or digit.
#: The S3 layer checks the finer rules (no IP addresses, no '..', reserved
#: names) and answers InvalidBucketName.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")

_COLUMNS = "b.id, b.name, b.tenant_id, t.name, b.region, b.public, b.created_at"


class BucketNameTaken(AnvilError):
    """
    A live bucket of that name exists.

    @ivar name: the name.
    @ivar owned_by_caller: whether it belongs to the tenant that tried to
        create it (S3 C{BucketAlreadyOwnedByYou}) or to another one
        (C{BucketAlreadyExists}).
    """

    def __init__(self, name: str, owned_by_caller: bool) -> None:
        """
        @param name: the name.
        @param owned_by_caller: see the class docstring.
        """
        if owned_by_caller:
            message = f"Bucket {name!r} already exists and is yours."
        else:
            message = f"Bucket {name!r} already exists; choose another name."
        super().__init__(message)
        self.name = name
        self.owned_by_caller = owned_by_caller


def _bucket(row: Sequence[Any]) -> Bucket:
    bucket_id, name, tenant_id, tenant_name, region, public, created = row
    return Bucket(bucket_id, name, tenant_id, tenant_name, region, public, truncate_to_ms(created))


def check_bucket_name(name: str) -> None:
    """
    Check the basic shape of a bucket name.

    @raise InvalidArgument: when C{name} is not 3 to 63 lower-case letters,
        digits, '.' or '-' starting and ending with a letter or digit.
    """
    if not isinstance(name, str) or not _BUCKET.fullmatch(name):
        raise InvalidArgument(
            f"The bucket name {name!r} is invalid: use 3 to 63 lower-case "
            "letters, digits, '.' or '-', starting and ending with a letter or digit."
        )


class BucketStore:
    """
    Create, find, list and delete buckets.
    """

    def __init__(self, db: Database) -> None:
        """
        @param db: the global database (migrated).
        """
        self._db = db

    async def create_bucket(self, name: str, tenant_id: int, region: str) -> Bucket:
        """
        Create a bucket.

        @param name: its name (see L{check_bucket_name}).
        @param tenant_id: the owning tenant.
        @param region: the region to hold its objects (must exist).
        @return: the new bucket.
        @raise BucketNameTaken: when a live bucket has this name.
        @raise NotFound: when the tenant or the region does not exist.
        @raise InvalidArgument: for a malformed name.
        """
        check_bucket_name(name)
        try:
            rows = await self._db.run_query(
                """
                WITH new AS (
                    INSERT INTO buckets (name, tenant_id, region, created_at)
                    VALUES (%s, %s, %s, date_trunc('milliseconds', now()))
                    RETURNING *
                )
                SELECT """
                + _COLUMNS
                + " FROM new b JOIN tenants t ON t.id = b.tenant_id",
                (name, tenant_id, region),
            )
        except psycopg2.errors.UniqueViolation:
            owner = await self._db.run_query(
                "SELECT tenant_id FROM buckets WHERE name = %s AND deleted_at IS NULL", (name,)
            )
            # Deleted again in the meantime: still taken as far as this
            # request is concerned, by someone else.
            raise BucketNameTaken(name, bool(owner) and owner[0][0] == tenant_id) from None
        except psycopg2.errors.ForeignKeyViolation as e:
            if e.diag.constraint_name == "buckets_region_fkey":
                raise NotFound("region", region) from None
            raise NotFound("tenant", str(tenant_id)) from None
        return _bucket(rows[0])

    async def get_bucket(self, name: str) -> Bucket | None:
        """
        The live bucket of this name, or C{None}.
        """
        if not isinstance(name, str) or not name or "\x00" in name:
            return None
        rows = await self._db.run_query(
            f"SELECT {_COLUMNS} FROM buckets b JOIN tenants t ON t.id = b.tenant_id "
            "WHERE b.name = %s AND b.deleted_at IS NULL",
            (name,),
        )
        return _bucket(rows[0]) if rows else None

    async def get_bucket_by_id(self, bucket_id: int) -> Bucket | None:
        """
        The live bucket with this id, or C{None}.
        """
        rows = await self._db.run_query(
            f"SELECT {_COLUMNS} FROM buckets b JOIN tenants t ON t.id = b.tenant_id "
            "WHERE b.id = %s AND b.deleted_at IS NULL",
            (bucket_id,),
        )
        return _bucket(rows[0]) if rows else None

    async def list_buckets(self, tenant_id: int) -> list[Bucket]:
        """
        The tenant's live buckets, by name.
        """
        rows = await self._db.run_query(
            f"SELECT {_COLUMNS} FROM buckets b JOIN tenants t ON t.id = b.tenant_id "
            "WHERE b.tenant_id = %s AND b.deleted_at IS NULL ORDER BY b.name COLLATE \"C\"",
            (tenant_id,),
        )
        return [_bucket(row) for row in rows]

    async def delete_bucket(self, bucket_id: int) -> bool:
        """
        Soft-delete a bucket: its name is free at once.  The caller checks
        that it is empty first (L{anvil.meta.objects.ObjectStore.bucket_is_empty}).

        @return: whether a live bucket was deleted.
        """
        rows = await self._db.run_query(
            "UPDATE buckets SET deleted_at = now() WHERE id = %s AND deleted_at IS NULL RETURNING id",
            (bucket_id,),
        )
        return bool(rows)

    async def set_public(self, name: str, public: bool) -> None:
        """
        Allow (C{True}) or stop anonymous GetObject and HeadObject on a
        bucket.

        @raise NotFound: when no live bucket has this name.
        """
        rows = await self._db.run_query(
            "UPDATE buckets SET public = %s WHERE name = %s AND deleted_at IS NULL RETURNING id",
            (bool(public), name),
        )
        if not rows:
            raise NotFound("bucket", name)
