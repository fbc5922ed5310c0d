# -*- test-case-name: tests.test_s3_bucketcache -*-
"""
A short-lived cache of bucket records for their owners' requests.

Every S3 request on a bucket needs its record (id, owner, region, public
flag) from the global database; for small objects that lookup was one of
the few round trips of the whole request.  Records are therefore
remembered for about a second, but a remembered record is only ever used
where its staleness cannot change a decision:

  - only for a request of the bucket's own tenant (an anonymous request or
    another tenant's always reads the database), so that
    C{anvil-admin bucket set-public-access}, which the node does not see
    happen, takes effect immediately for everyone it concerns;
  - for the owner, only when the request's outcome does not depend on the
    public flag (the caller decides: see
    L{anvil.s3.authn.public_flag_irrelevant});
  - a bucket that was not found is never remembered (a bucket created
    elsewhere is visible at once), and this node's own CreateBucket and
    DeleteBucket forget the name at once.

What remains is a bucket deleted (or deleted and created again) through
another node: for at most L{OwnerBucketCache.seconds}, its owner's requests
on this node can still address the old bucket, as an AWS bucket change
takes a while to reach every endpoint.  The tenant and region of a bucket
id never change, so those checks are unaffected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from anvil.meta.records import Bucket


class _Clock(Protocol):
    def seconds(self) -> float: ...


class _Buckets(Protocol):
    async def get_bucket(self, name: str) -> Bucket | None: ...


@dataclass(frozen=True)
class _Entry:
    expires: float
    bucket: Bucket


class OwnerBucketCache:
    """
    Bucket records by name, reused for their owners' requests for a short
    while.

    @ivar seconds: how long a record read from the database is reused.
    @ivar max_entries: the most names remembered at once.
    """

    def __init__(
        self, buckets: _Buckets, clock: _Clock, seconds: float = 1.0, max_entries: int = 10000
    ) -> None:
        """
        @param buckets: the bucket store (L{anvil.meta.buckets.BucketStore}).
        @param clock: provides C{seconds()}.
        @param seconds: see L{seconds}; 0 turns the cache off.
        @param max_entries: see L{max_entries}.
        """
        self._buckets = buckets
        self._clock = clock
        self.seconds = seconds
        self.max_entries = max_entries
        self._entries: dict[str, _Entry] = {}
        # Bumped by forget() and clear(): a lookup that was in flight
        # meanwhile may have read the record from before the change.
        self._generation = 0

    async def get_bucket(self, name: str, owner_tenant_id: int | None) -> Bucket | None:
        """
        The live bucket of this name, or C{None}.

        @param name: the bucket name.
        @param owner_tenant_id: the tenant of the requester when a record up
            to L{seconds} old may answer (it is used only if the bucket
            belongs to this tenant); C{None} to read the database.
        @return: the bucket record.
        """
        now = self._clock.seconds()
        if owner_tenant_id is not None:
            entry = self._entries.get(name)
            if (
                entry is not None
                and entry.expires > now
                and entry.bucket.tenant_id == owner_tenant_id
            ):
                return entry.bucket
        generation = self._generation
        bucket = await self._buckets.get_bucket(name)
        if bucket is None or self.seconds <= 0:
            self._entries.pop(name, None)
        elif generation == self._generation:
            self._remember(name, _Entry(now + self.seconds, bucket))
        return bucket

    def forget(self, name: str) -> None:
        """
        Drop what is remembered of a bucket name (this node created or
        deleted it).

        @param name: the bucket name.
        """
        self._generation += 1
        self._entries.pop(name, None)

    def clear(self) -> None:
        """
        Forget every bucket.
        """
        self._generation += 1
        self._entries.clear()

    def _remember(self, name: str, entry: _Entry) -> None:
        if name not in self._entries and len(self._entries) >= self.max_entries:
            now = self._clock.seconds()
            for stale in [k for k, v in self._entries.items() if v.expires <= now]:
                del self._entries[stale]
            if len(self._entries) >= self.max_entries:
                # All fresh: many buckets in use at once. Starting over only
                # costs lookups.
                self._entries.clear()
        self._entries[name] = entry
