# -*- test-case-name: tests.test_repair -*-
"""
The content table of a region as repair, the sweep and the orphan
collector see it: contents with shard files, found by hash or by the node
holding them, and an atomic compare-and-set of shard map entries.

Paging is by content hash (the primary key): C{page(after=last_hash)}
continues after the last content of the previous page, so a walk over
millions of rows holds one page at a time and every page is one index
range scan, whatever changes meanwhile (rows inserted behind the cursor
are seen by the next walk).

Why the shard map update is a compare-and-set
=============================================

A repair reads a content, decides that shard 2 (on node C{A}, dead) must
move, rebuilds it on node C{B}, and records C{B}.  Two repairs of one
content may run at once (a scrub and a sweep both enqueued one, or a task
was taken over after its lease expired while its first worker still ran).
Recording with a plain C{UPDATE ... SET shard_map = <what I computed>}
would let the slower one overwrite the faster one's result with a map
computed from an older read: a shard the first repair moved could be
"moved back" to a node that no longer has it.  L{ContentStore.replace_shard_targets}
instead changes only the entries it names, in one statement, and only if
each of them still names the node the caller read: the second repair's
update matches no row, it reads the map again and finds nothing left to
do.  The entries are set with C{jsonb_set} on the stored document, so the
rest of the map (its version, its placement key, the other entries, which
another repair may have changed a moment ago) is kept as it is in the row,
not as the caller read it.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from psycopg2.extras import Json

from anvil.errors import InvalidArgument
from anvil.meta.database import Database
from anvil.meta.records import ContentRecord
from anvil.storage.placement import ShardTarget

__all__ = ["ContentStore", "ShardedContent"]

_COLUMNS = "hash, size, k, m, stripe_size, shard_map, inline_data"

#: Contents that have shard files: not inline, and a map with entries.
_HAS_SHARDS = "inline_data IS NULL AND jsonb_array_length(COALESCE(shard_map->'shards', '[]'::jsonb)) > 0"


def _record(row: Sequence[Any]) -> ContentRecord:
    """
    A content from the columns C{_COLUMNS}.
    """
    hash_, size, k, m, stripe_size, shard_map, inline = row
    return ContentRecord(
        hash_, int(size), int(k), int(m), int(stripe_size), shard_map or {},
        None if inline is None else bytes(inline),
    )


def _check_hash(value: str) -> None:
    if not isinstance(value, str) or len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise InvalidArgument(f"Content hash {value!r} is not 64 lower-case hex digits.")


@dataclass(frozen=True)
class ShardedContent:
    """
    A content with shard files as the orphan collector needs it.

    @ivar record: the content.
    @ivar created_at: when its row was inserted (UTC).
    """

    record: ContentRecord
    created_at: datetime


class ContentStore:
    """
    Content-table queries of one region (see the module docstring).
    """

    def __init__(self, db: Database) -> None:
        """
        @param db: the regional database (migrated).
        """
        self._db = db

    async def get(self, content_hash: str) -> ContentRecord | None:
        """
        One content.

        @param content_hash: its SHA-256, hex.
        @return: the content, or L{None} when there is no such row.
        """
        _check_hash(content_hash)
        rows = await self._db.run_query(f"SELECT {_COLUMNS} FROM contents WHERE hash = %s", (content_hash,))
        return _record(rows[0]) if rows else None

    async def any(self) -> bool:
        """
        Whether the table holds any content at all.
        """
        rows = await self._db.run_query("SELECT EXISTS (SELECT 1 FROM contents)")
        return bool(rows[0][0])

    async def get_many(self, hashes: Collection[str]) -> dict[str, ShardedContent]:
        """
        The contents among C{hashes} that exist (with or without shards).

        @return: hash to content and creation time.
        """
        wanted = sorted(set(hashes))
        for value in wanted:
            _check_hash(value)
        if not wanted:
            return {}
        rows = await self._db.run_query(
            f"SELECT {_COLUMNS}, created_at FROM contents WHERE hash = ANY(%s::text[])", (wanted,)
        )
        return {row[0]: ShardedContent(_record(row[:7]), _utc(row[7])) for row in rows}

    async def page(
        self, after: str = "", limit: int = 500, created_before: datetime | None = None
    ) -> list[ContentRecord]:
        """
        One page of the contents that have shard files, in hash order.

        @param after: only hashes greater than this (C{""}: from the start).
        @param limit: at most this many, at least 1.
        @param created_before: only contents whose row is older than this
            (a sweep skips contents written while it lists files).
        @return: the contents; a page shorter than C{limit} is the last.
        """
        if limit < 1:
            raise InvalidArgument(f"The limit must be at least 1, not {limit}.")
        rows = await self._db.run_query(
            f"SELECT {_COLUMNS} FROM contents WHERE hash > %s AND {_HAS_SHARDS}"
            " AND (%s::timestamptz IS NULL OR created_at < %s::timestamptz)"
            " ORDER BY hash LIMIT %s",
            (after, created_before, created_before, limit),
        )
        return [_record(r) for r in rows]

    async def with_shards_on(self, node_id: str, after: str = "", limit: int = 500) -> list[ContentRecord]:
        """
        One page of the contents whose shard map names C{node_id} for at
        least one shard, in hash order.

        The containment test (C{shard_map @> {"shards": [{"node": id}]}})
        filters a primary-key range scan: a page reads rows from C{after}
        on until C{limit} match, so walking a node's contents reads the
        table once in all, which is what evacuating a node costs anyway.

        @param node_id: the node.
        @param after: only hashes greater than this.
        @param limit: at most this many, at least 1.
        """
        if not node_id:
            raise InvalidArgument("A node id must not be empty.")
        if limit < 1:
            raise InvalidArgument(f"The limit must be at least 1, not {limit}.")
        rows = await self._db.run_query(
            f"SELECT {_COLUMNS} FROM contents WHERE hash > %s AND {_HAS_SHARDS}"
            " AND shard_map @> %s ORDER BY hash LIMIT %s",
            (after, Json({"shards": [{"node": node_id}]}), limit),
        )
        return [_record(r) for r in rows]

    async def replace_shard_targets(
        self, content_hash: str, changes: Mapping[int, tuple[str, ShardTarget]]
    ) -> bool:
        """
        Atomically replace entries of a content's shard map, each only if
        it still names the node the caller read (compare-and-set, one
        statement; see the module docstring).

        @param content_hash: the content.
        @param changes: shard index to C{(old node, new target)}; the old
            node is C{""} for a shard recorded as never stored.
        @return: whether the map was changed: C{False} when the row is gone,
            or any named entry no longer names its old node (or does not
            exist); then nothing was changed.
        @raise InvalidArgument: for an empty or inconsistent change set.
        """
        _check_hash(content_hash)
        if not changes:
            raise InvalidArgument("No shard map change was given.")
        value = "shard_map"
        conditions: list[str] = []
        set_params: list[Any] = []
        where_params: list[Any] = []
        for index, (old_node, target) in sorted(changes.items()):
            if not isinstance(index, int) or index < 0 or target.index != index:
                raise InvalidArgument(f"Shard map change {index} names shard index {target.index}.")
            if not target.node:
                raise InvalidArgument(f"The new target of shard {index} names no node.")
            value = f"jsonb_set({value}, %s::text[], %s::jsonb, false)"
            set_params += [["shards", str(index)], Json({"index": index, "node": target.node, "dir": target.dir})]
            conditions.append("shard_map #>> %s::text[] = %s AND shard_map #>> %s::text[] = %s")
            where_params += [["shards", str(index), "index"], str(index), ["shards", str(index), "node"], old_node]
        rows = await self._db.run_query(
            f"UPDATE contents SET shard_map = {value} WHERE hash = %s AND {' AND '.join(conditions)}"
            " RETURNING hash",
            (*set_params, content_hash, *where_params),
        )
        return bool(rows)


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
