# -*- test-case-name: tests.test_objects -*-
"""
Objects, contents and multipart uploads in the regional database.

Write-commit protocol (dedup)
=============================

A PUT streams its body into a content writer (L{anvil.storage}), which ends
with a L{ContentRecord} (SHA-256, size, erasure parameters, shard map or
inline bytes).  Then:

  1. C{await store.content_state(hash)}.
  2. C{"absent"}: commit the writer's shards, then C{put_object(record,
     [content])}.  Should another request have stored the same bytes in the
     meantime, the content row is shared (refcount + 1): the shards are
     identical files in identical places, content addressing makes that
     harmless.
  3. C{"present"}: do not commit; call C{put_object(record, [content],
     require_existing=[hash])}, then drop the writer's temporaries.  If the
     content vanished in between (the collector removed it: only possible
     long after its refcount reached zero, see C{contents.released_at}),
     L{ContentMissingError} is raised and nothing changed: commit the shards
     and call C{put_object} again without C{require_existing}.

CopyObject and UploadPartCopy pass the source's L{ContentRecord}s (from
L{ObjectStore.get_contents}) with C{require_existing} listing them: the copy
references the same contents (refcount + 1), no bytes move.

Reference counts
================

C{contents.refcount} is the number of manifest pieces of I{live} objects
plus the number of multipart parts that name the content.  Every change to
an object or a part adjusts it in the same transaction, so it is exact
whatever runs concurrently; a replaced or deleted object's row stays as a
soft-deleted row (for the collector) and no longer counts.

Concurrency
===========

Writers of one key (PUT, CompleteMultipartUpload) take a transaction-scoped
advisory lock on C{(bucket, key)} first, so the soft-delete of the old row
and the insert of the new one never interleave with another writer's: one
live row results, the last to commit wins whole.  A reader's single
statement sees the old or the new row, never a mix.  Content rows are
locked in hash order; a deadlock that remains possible between writers
swapping contents is detected by PostgreSQL and the transaction retried.

Listing
=======

Keys are C{TEXT COLLATE "C"}: their order is UTF-8 byte order (code point
order), as S3's.  A page is one indexed query: a plain range scan without a
delimiter; with one, a recursive query that walks the key index one entry
at a time and jumps past each common prefix with a new index probe
(C{key >= anvil_key_successor(prefix)}), never reading the keys under it.
Prefixes are ranges, never C{LIKE} patterns, so C{%} and C{_} in keys are
plain characters.  Pages hold L{ObjectSummary}s: decoding every object's
manifest and metadata would cost more than the query.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import count
from typing import (
    Any,
    Literal,
    TypeVar,
)

import psycopg2.errors
from psycopg2.extras import Json
from twisted.logger import Logger

from anvil.errors import AnvilError, InvalidArgument
from anvil.meta.database import Database
from anvil.meta.records import (
    ContentRecord,
    ManifestPart,
    ObjectRecord,
    ObjectSummary,
    Part,
    Upload,
    truncate_to_ms,
)

_T = TypeVar("_T")

#: A conditional write's test (see L{ObjectStore.put_object}): called with
#: the ETag of the key's live object, or C{None}, it raises to refuse.
WriteCondition = Callable[[str | None], None]

#: S3's minimum size of every part but the last (5 MiB).
MIN_PART_SIZE = 5 * 1024 * 1024
#: S3's part numbers.
MAX_PART_NUMBER = 10000
#: S3's longest key, in UTF-8 bytes.
MAX_KEY_BYTES = 1024

_HASH = re.compile(r"^[0-9a-f]{64}$")
_MD5_HEX = re.compile(r"^[0-9a-f]{32}$")

#: Errors after which a whole transaction is simply run again.
_RETRYABLE = (psycopg2.errors.DeadlockDetected, psycopg2.errors.SerializationFailure)


# -- errors --------------------------------------------------------------


class KeyTooLongError(AnvilError):
    """
    A key is longer than S3 allows (1024 bytes of UTF-8).
    """

    def __init__(self, length: int) -> None:
        """
        @param length: the key's length in UTF-8 bytes.
        """
        super().__init__(
            f"The key is {length} bytes long; keys are at most {MAX_KEY_BYTES} bytes of UTF-8."
        )
        self.length = length


class ContentMissingError(AnvilError):
    """
    Contents that a write meant to reuse (dedup, copy) no longer exist;
    nothing was changed.

    @ivar hashes: the missing content hashes.
    """

    def __init__(self, hashes: Sequence[str]) -> None:
        """
        @param hashes: the missing content hashes.
        """
        super().__init__(
            "Content " + ", ".join(hashes) + " no longer exists; store it again."
        )
        self.hashes = list(hashes)


class NoSuchUploadError(AnvilError):
    """
    The multipart upload does not exist: never created, or already
    completed or aborted.

    @ivar upload_id: the id asked for.
    """

    def __init__(self, upload_id: str) -> None:
        """
        @param upload_id: the id asked for.
        """
        super().__init__(
            f"Multipart upload {upload_id!r} does not exist; it may have been "
            "completed or aborted."
        )
        self.upload_id = upload_id


class InvalidPartError(AnvilError):
    """
    A part listed in CompleteMultipartUpload was not uploaded, or its ETag
    does not match the uploaded one.

    @ivar part_number: the offending part.
    """

    def __init__(self, part_number: int, reason: str) -> None:
        """
        @param part_number: the offending part.
        @param reason: what is wrong with it, completing a sentence.
        """
        super().__init__(f"Part {part_number} {reason}.")
        self.part_number = part_number


class InvalidPartOrderError(AnvilError):
    """
    The parts listed in CompleteMultipartUpload are not in strictly
    ascending order of part number.

    @ivar part_number: the first part number out of order.
    """

    def __init__(self, part_number: int) -> None:
        """
        @param part_number: the first part number out of order.
        """
        super().__init__(
            f"Part {part_number} is out of order; list parts in ascending order "
            "of part number, each once."
        )
        self.part_number = part_number


class EntityTooSmallError(AnvilError):
    """
    A part other than the last one is smaller than the minimum part size.

    @ivar part_number: the part.
    @ivar size: its size.
    @ivar minimum: the minimum it needed.
    """

    def __init__(self, part_number: int, size: int, minimum: int) -> None:
        """
        @param part_number: the part.
        @param size: its size.
        @param minimum: the minimum size of every part but the last.
        """
        super().__init__(
            f"Part {part_number} is {size} bytes; every part but the last must "
            f"be at least {minimum} bytes."
        )
        self.part_number = part_number
        self.size = size
        self.minimum = minimum


# -- results -------------------------------------------------------------


@dataclass(frozen=True)
class ListResult:
    """
    One page of a bucket listing.

    @ivar objects: the objects of the page, in key order.
    @ivar common_prefixes: the common prefixes of the page, in order.
    @ivar is_truncated: whether entries follow the page.
    @ivar last_key: the last entry of the page (an object's key or a common
        prefix), from which the next page starts (V1 C{NextMarker}, V2
        continuation token); C{None} for an empty page.
    """

    objects: list[ObjectSummary]
    common_prefixes: list[str]
    is_truncated: bool
    last_key: str | None


@dataclass(frozen=True)
class PartList:
    """
    One page of ListParts.

    @ivar parts: the parts, by part number.
    @ivar is_truncated: whether parts follow.
    @ivar next_part_number_marker: the last part number of the page, or
        C{None} for an empty page.
    """

    parts: list[Part]
    is_truncated: bool
    next_part_number_marker: int | None


@dataclass(frozen=True)
class UploadList:
    """
    One page of ListMultipartUploads.

    @ivar uploads: the uploads, by key, then upload id (initiation order).
    @ivar common_prefixes: the common prefixes of the page, in order.
    @ivar is_truncated: whether entries follow.
    @ivar next_key_marker: the key (or common prefix) of the last entry,
        or C{None} for an empty page.
    @ivar next_upload_id_marker: the upload id of the last entry, C{None}
        when it is a common prefix or the page is empty.
    """

    uploads: list[Upload]
    common_prefixes: list[str]
    is_truncated: bool
    next_key_marker: str | None
    next_upload_id_marker: str | None


# -- key arithmetic ------------------------------------------------------


def key_successor(prefix: str) -> str | None:
    """
    The smallest string greater than every string starting with C{prefix},
    in code point (UTF-8 byte) order: keys starting with C{prefix} are
    exactly the keys in C{[prefix, key_successor(prefix))}.

    The same as the SQL function C{anvil_key_successor}.

    @return: the successor, or C{None} when there is none (C{prefix} is
        empty or all U+10FFFF): the range is then unbounded above.
    """
    chars = list(prefix)
    while chars:
        code = ord(chars[-1])
        if code < 0x10FFFF:
            # U+D800..U+DFFF are surrogates, not characters: no key has them.
            chars[-1] = chr(0xE000 if code == 0xD7FF else code + 1)
            return "".join(chars)
        chars.pop()
    return None


def _without_nul(text: str) -> str:
    """
    Cut C{text} at its first NUL.  Keys never contain NUL (PostgreSQL text
    cannot), so for "keys greater than C{text}" the rest does not matter.
    """
    nul = text.find("\x00")
    return text if nul < 0 else text[:nul]


def _key_after(text: str) -> str:
    """
    The smallest key greater than C{text}: C{text} followed by the smallest
    character a key can hold, U+0001.
    """
    return _without_nul(text) + "\x01"


def check_key(key: str) -> None:
    """
    Check that C{key} can name an object: non-empty UTF-8 without NUL, at
    most 1024 bytes.

    @raise KeyTooLongError: when it is too long.
    @raise InvalidArgument: when it is otherwise unusable.
    """
    if not isinstance(key, str) or not key:
        raise InvalidArgument("An object key must be a non-empty string.")
    try:
        length = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArgument("An object key must be valid UTF-8.") from None
    if "\x00" in key:
        raise InvalidArgument("An object key cannot contain the NUL character.")
    if length > MAX_KEY_BYTES:
        raise KeyTooLongError(length)


def _common_prefix(key: str, prefix: str, delimiter: str | None) -> str | None:
    """
    The common prefix C{key} rolls up into, if any.
    """
    if not delimiter or not key.startswith(prefix):
        return None
    at = key.find(delimiter, len(prefix))
    return None if at < 0 else key[: at + len(delimiter)]


def multipart_etag(part_etags: Sequence[str]) -> str:
    """
    S3's ETag of a multipart object: the MD5 of the concatenated binary
    MD5s of its parts, in hex, then C{-} and the number of parts.

    @param part_etags: the parts' ETags (hex MD5s, quotes allowed).
    """
    digest = hashlib.md5(b"".join(bytes.fromhex(_unquote(e)) for e in part_etags))
    return f"{digest.hexdigest()}-{len(part_etags)}"


def _unquote(etag: str) -> str:
    """
    An ETag as given by a client, without surrounding whitespace and double
    quotes, lower-case.
    """
    etag = etag.strip()
    if len(etag) >= 2 and etag[0] == etag[-1] == '"':
        etag = etag[1:-1]
    return etag.lower()


# -- rows ----------------------------------------------------------------

_OBJECT_COLUMNS = (
    "bucket_id, key, size, etag, content_type, user_metadata, system_metadata, "
    "checksums, manifest, last_modified, parts_count"
)


def _object(row: Sequence[Any]) -> ObjectRecord:
    """
    An object from the columns C{_OBJECT_COLUMNS}.
    """
    (bucket_id, key, size, etag, content_type, user, system, checksums, manifest, modified, parts) = row
    return ObjectRecord(
        bucket_id=bucket_id,
        key=key,
        size=size,
        etag=etag,
        content_type=content_type,
        user_metadata=user,
        system_metadata=system,
        checksums=checksums,
        manifest=[ManifestPart.from_json(p) for p in manifest],
        last_modified=truncate_to_ms(modified),
        parts_count=parts,
    )


#: What listings read.  Decoding JSON is most of the cost of a page of
#: full records, so manifests and metadata are left out, and empty checksum
#: maps (the usual case) come as NULL.
def _summary_columns(table: str) -> str:
    """
    The columns L{_summary} reads, of the objects table aliased C{table}.
    The time comes truncated, in UTC, without a zone: converting a thousand
    zoned times per page in Python would be a third of a page's cost.
    """
    return (
        f"{table}.bucket_id, {table}.key, {table}.size, {table}.etag, "
        f"date_trunc('milliseconds', {table}.last_modified) AT TIME ZONE 'UTC', "
        f"NULLIF({table}.checksums, jsonb_build_object()), {table}.parts_count"
    )


def _summary(row: Sequence[Any]) -> ObjectSummary:
    """
    A listing entry from the columns of L{_summary_columns}.
    """
    bucket_id, key, size, etag, modified, checksums, parts = row
    return ObjectSummary(
        bucket_id, key, size, etag, modified.replace(tzinfo=UTC), checksums or {}, parts
    )


_CONTENT_COLUMNS = "hash, size, k, m, stripe_size, shard_map, inline_data"


def _content(row: Sequence[Any]) -> ContentRecord:
    """
    A content from the columns C{_CONTENT_COLUMNS}.
    """
    hash_, size, k, m, stripe_size, shard_map, inline = row
    return ContentRecord(
        hash_, size, k, m, stripe_size, shard_map, None if inline is None else bytes(inline)
    )


_UPLOAD_COLUMNS = "upload_id, bucket_id, key, metadata, created_at"


def _upload(row: Sequence[Any]) -> Upload:
    """
    An upload from the columns C{_UPLOAD_COLUMNS}.
    """
    upload_id, bucket_id, key, metadata, created = row
    return Upload(upload_id, bucket_id, key, metadata, truncate_to_ms(created))


_PART_COLUMNS = "part_number, content_hash, size, etag, checksums, created_at"


def _part(row: Sequence[Any]) -> Part:
    """
    A part from the columns C{_PART_COLUMNS}.
    """
    number, content_hash, size, etag, checksums, created = row
    return Part(number, content_hash, size, etag, checksums, truncate_to_ms(created))


_NAMED = re.compile(r"%\((\w+)\)s")


def _positional(sql: str, params: Mapping[str, Any]) -> tuple[str, tuple[Any, ...]]:
    """
    Turn C{%(name)s} placeholders into positional ones, for
    L{Database.run_query}, which takes a sequence of parameters.
    """
    names: list[str] = []

    def placeholder(match: re.Match[str]) -> str:
        names.append(match.group(1))
        return "%s"

    return _NAMED.sub(placeholder, sql), tuple(params[name] for name in names)


def _check_content(content: ContentRecord) -> None:
    """
    Check that a content record can be stored and read back unchanged.

    @raise InvalidArgument: when it cannot.
    """
    if not isinstance(content.hash, str) or not _HASH.fullmatch(content.hash):
        raise InvalidArgument(f"Content hash {content.hash!r} is not 64 lower-case hex digits.")
    if content.size < 0 or content.k < 1 or content.m < 0 or content.stripe_size < 1:
        raise InvalidArgument(f"Content {content.hash} has invalid sizes or erasure parameters.")
    if not all(isinstance(name, str) for name in content.shard_map):
        # JSON would turn other keys into strings: the engine would read
        # back a different map than it wrote.
        raise InvalidArgument(f"Content {content.hash} has a shard map with non-string keys.")
    if content.inline_data is not None and len(content.inline_data) != content.size:
        raise InvalidArgument(f"Content {content.hash} has inline data of the wrong length.")


def _content_params(contents: Iterable[ContentRecord], references: Mapping[str, int]) -> dict[str, Any]:
    """
    The array parameters of L{_UPSERT_CONTENTS} for C{contents}, each
    gaining C{references[hash]} references.
    """
    ordered = sorted(contents, key=lambda c: c.hash)
    return {
        "hashes": [c.hash for c in ordered],
        "sizes": [c.size for c in ordered],
        "ks": [c.k for c in ordered],
        "ms": [c.m for c in ordered],
        "stripes": [c.stripe_size for c in ordered],
        "maps": [Json(c.shard_map) for c in ordered],
        "inline": [None if c.inline_data is None else psycopg2.Binary(c.inline_data) for c in ordered],
        "refs": [references[c.hash] for c in ordered],
    }


# -- SQL -----------------------------------------------------------------

#: Add references to contents, creating the missing ones, locking them in
#: hash order (the input is sorted and INSERT keeps its order).  inserted
#: tells which rows are new (xmax is 0 only for a freshly inserted row).
_UPSERT_CONTENTS = """
INSERT INTO contents AS c (hash, size, k, m, stripe_size, shard_map, inline_data, refcount)
SELECT v.hash, v.size, v.k, v.m, v.stripe_size, v.shard_map, v.inline_data, v.refs
  FROM {source} unnest(%(hashes)s::text[], %(sizes)s::bigint[], %(ks)s::int[], %(ms)s::int[],
              %(stripes)s::int[], %(maps)s::jsonb[], %(inline)s::bytea[], %(refs)s::int[])
       AS v(hash, size, k, m, stripe_size, shard_map, inline_data, refs)
 ORDER BY v.hash
ON CONFLICT (hash) DO UPDATE
   SET refcount = c.refcount + EXCLUDED.refcount, released_at = NULL
RETURNING c.hash, (c.xmax = 0) AS inserted
"""

#: Drop references: {net} is a relation (hash, n) of how many each content
#: loses.  Rows are locked in hash order first.  Contents are found with
#: = ANY(ARRAY(...)) so that they are read through the primary key: the
#: planner cannot estimate {net} (it comes from a manifest) and plans a join
#: with it as a sequential scan of the whole contents table.
_RELEASE = """
locked AS (
    SELECT c.hash FROM contents c
     WHERE c.hash = ANY(ARRAY(SELECT hash FROM {net}))
     ORDER BY c.hash
       FOR UPDATE
),
released AS (
    UPDATE contents c
       SET refcount = c.refcount - r.n,
           released_at = CASE WHEN c.refcount = r.n THEN now() ELSE c.released_at END
      FROM {net} r
     WHERE c.hash = ANY(ARRAY(SELECT hash FROM locked)) AND c.hash = r.hash
    RETURNING c.hash
)
"""

#: Replace the live row of a key: soft-delete the old row, insert the new
#: one and drop the references the old row (and, for a completed upload,
#: the unused parts: the extra arrays) held.  Returns the old row, if any,
#: and how many contents should have been and were released (a mismatch
#: means a content row is missing: logged).
_SWAP = (
    """
WITH old AS (
    UPDATE objects SET deleted_at = now()
     WHERE bucket_id = %(bucket_id)s AND key = %(key)s AND deleted_at IS NULL
    RETURNING """
    + _OBJECT_COLUMNS
    + """
),
new AS (
    INSERT INTO objects (bucket_id, key, size, etag, content_type, user_metadata,
                         system_metadata, checksums, manifest, last_modified, parts_count)
    VALUES (%(bucket_id)s, %(key)s, %(size)s, %(etag)s, %(content_type)s, %(user_metadata)s,
            %(system_metadata)s, %(checksums)s, %(manifest)s, %(last_modified)s, %(parts_count)s)
    RETURNING id
),
refs AS (
    SELECT e->>'hash' AS hash, 1 AS n FROM old, jsonb_array_elements(old.manifest) e
    UNION ALL
    SELECT * FROM unnest(%(extra_hashes)s::text[], %(extra_counts)s::int[])
),
net AS (SELECT hash, sum(n)::int AS n FROM refs GROUP BY hash),
"""
    + _RELEASE.format(net="net")
    + """
SELECT (SELECT count(*) FROM net), (SELECT count(*) FROM released), (SELECT count(*) FROM new),
       old.*
  FROM (SELECT 1) one LEFT JOIN old ON TRUE
"""
)

#: PutObject's whole transaction in one statement (the advisory lock, the
#: content upsert, the swap of the key's live row; see the regional
#: migration 0004_fast_put): one round trip, and plans PostgreSQL caches
#: per connection instead of planning two large statements every time.
_PUT_OBJECT = """
SELECT * FROM anvil_put_object(
    %(bucket_id)s, %(key)s, %(size)s, %(etag)s, %(content_type)s, %(user_metadata)s::jsonb,
    %(system_metadata)s::jsonb, %(checksums)s::jsonb, %(manifest)s::jsonb, %(last_modified)s,
    %(parts_count)s, %(hashes)s::text[], %(sizes)s::bigint[], %(ks)s::int[], %(ms)s::int[],
    %(stripes)s::int[], %(maps)s::jsonb[], %(inline)s::bytea[], %(refs)s::int[],
    %(required)s::text[])
"""

#: L{_PUT_OBJECT} with positional placeholders and the order of its
#: parameters, worked out once.
_PUT_OBJECT_NAMES = tuple(_NAMED.findall(_PUT_OBJECT))
_PUT_OBJECT_SQL = _NAMED.sub("%s", _PUT_OBJECT)

#: The HINT of the error anvil_put_object raises when a content the caller
#: relied on (dedup, copy) does not exist; its DETAIL lists the hashes.
_CONTENT_MISSING_HINT = "anvil:content-missing"

#: A live object (first kind of row: the object columns, then NULLs) and
#: the contents of its manifest (second kind: NULLs, then the content
#: columns), each content once however often the manifest names it; from
#: one snapshot (see the regional migration 0004_fast_put).
_GET_OBJECT = "SELECT * FROM anvil_get_object(%s::bigint, %s)"

#: Soft-delete the live rows of some keys and drop their references.
_DELETE = (
    """
WITH gone AS (
    UPDATE objects SET deleted_at = now()
     WHERE bucket_id = %(bucket_id)s AND key = ANY(%(keys)s::text[]) AND deleted_at IS NULL
    RETURNING key, manifest
),
net AS (
    SELECT e->>'hash' AS hash, count(*)::int AS n
      FROM gone, jsonb_array_elements(gone.manifest) e
     GROUP BY 1
),
"""
    + _RELEASE.format(net="net")
    + """
SELECT key, (SELECT count(*) FROM net), (SELECT count(*) FROM released) FROM gone
"""
)

#: The common prefix of o.key after %(plen)s characters of prefix, up to
#: and including the first %(delimiter)s, or NULL.
_CP = """CASE WHEN strpos(substr({t}.key, %(plen)s + 1), %(delimiter)s) > 0
     THEN left({t}.key, %(plen)s + strpos(substr({t}.key, %(plen)s + 1), %(delimiter)s) + %(dlen)s - 1)
END"""

_LIST_PLAIN = (
    "SELECT " + _summary_columns("o") + """
  FROM objects o
 WHERE o.bucket_id = %(bucket_id)s AND o.deleted_at IS NULL AND o.key >= %(lower)s {upper}
 ORDER BY o.key
 LIMIT %(limit)s
"""
)

#: Walk the live keys from %(lower)s: each step is one index probe for the
#: next key, past the previous key or, when that rolled up into a common
#: prefix, past every key starting with the prefix.  The listed columns
#: travel with the walk: joining back to the table afterwards could make
#: the planner hash the whole table.
_LIST_WALK = (
    """
WITH RECURSIVE walk(n, cp, bucket_id, key, size, etag, last_modified, checksums, parts_count) AS (
    SELECT 1, f.* FROM (
        SELECT """
    + _CP.format(t="o")
    + ", "
    + _summary_columns("o")
    + """
          FROM objects o
         WHERE o.bucket_id = %(bucket_id)s AND o.deleted_at IS NULL AND o.key >= %(lower)s {upper}
         ORDER BY o.key
         LIMIT 1) f
    UNION ALL
    SELECT w.n + 1, f.*
      FROM walk w CROSS JOIN LATERAL (
        SELECT """
    + _CP.format(t="o")
    + ", "
    + _summary_columns("o")
    + """
          FROM objects o
         WHERE o.bucket_id = %(bucket_id)s AND o.deleted_at IS NULL
           AND o.key >= CASE WHEN w.cp IS NULL THEN w.key || chr(1)
                             ELSE anvil_key_successor(w.cp) END
           {upper}
         ORDER BY o.key
         LIMIT 1) f
     WHERE w.n < %(limit)s
)
SELECT cp, bucket_id, key, size, etag, last_modified, checksums, parts_count
  FROM walk
 ORDER BY n
"""
)

#: The same walk over multipart uploads, ordered by (key, upload id).
#: {cp} is the common prefix expression (NULL without a delimiter).  The
#: table is read only by the walk's ORDER BY ... LIMIT 1 probes of the
#: (bucket_id, key, upload_id) index, which cost a small fraction of
#: reading the bucket with any statistics (only a table of a page or so is
#: read whole instead, which is then cheaper).  Joining the walk back to
#: the table by upload id must not come back: the planner guesses a
#: recursive CTE at 1 + 10 times its recursive term's rows (some 31,
#: whatever the page size), and at that guess a hash join over a
#: sequential scan of the whole table beats primary key probes, with any
#: statistics.
_UPLOADS_WALK = """
WITH RECURSIVE walk(n, cp, upload_id, bucket_id, key, metadata, created_at) AS (
    SELECT 1, f.* FROM (
        SELECT {cp}, u.upload_id, u.bucket_id, u.key, u.metadata, u.created_at
          FROM multipart_uploads u
         WHERE u.bucket_id = %(bucket_id)s
           AND (u.key, u.upload_id COLLATE "C") > (%(lower_key)s, %(lower_id)s) {upper}
         ORDER BY u.key, u.upload_id COLLATE "C"
         LIMIT 1) f
    UNION ALL
    SELECT w.n + 1, f.*
      FROM walk w CROSS JOIN LATERAL (
        SELECT {cp}, u.upload_id, u.bucket_id, u.key, u.metadata, u.created_at
          FROM multipart_uploads u
         WHERE u.bucket_id = %(bucket_id)s
           AND (u.key, u.upload_id COLLATE "C") >
               (CASE WHEN w.cp IS NULL THEN w.key ELSE anvil_key_successor(w.cp) END,
                CASE WHEN w.cp IS NULL THEN w.upload_id ELSE '' END)
           {upper}
         ORDER BY u.key, u.upload_id COLLATE "C"
         LIMIT 1) f
     WHERE w.n < %(limit)s
)
SELECT cp, upload_id, bucket_id, key, metadata, created_at
  FROM walk
 ORDER BY n
"""


class ObjectStore:
    """
    Objects, contents and multipart uploads of one region.

    All methods are coroutines; they raise L{anvil.errors.DatabaseUnavailable}
    when PostgreSQL cannot be reached, L{InvalidArgument} for malformed
    arguments, and the errors of this module as documented.
    """

    _log = Logger()

    def __init__(self, db: Database, attempts: int = 5) -> None:
        """
        @param db: the regional database (migrated).
        @param attempts: how many times a transaction that PostgreSQL
            aborted for a deadlock is run in all.
        """
        self._db = db
        self._attempts = attempts

    async def _retrying(self, run: Callable[[], Awaitable[_T]]) -> _T:
        """
        Run C{run()} (one transaction) again when PostgreSQL aborted it to
        break a deadlock.
        """
        for attempt in count(1):
            try:
                return await run()
            except _RETRYABLE as e:
                if attempt >= self._attempts:
                    raise
                self._log.info(
                    "Retrying a metadata transaction ({error})",
                    error=type(e).__name__,
                )
        raise AssertionError("unreachable")

    def _check_released(self, expected: int, released: int, what: str) -> None:
        """
        Log an error when fewer content rows lost references than should
        have (C{what} names the operation).
        """
        if expected != released:
            # A content row that a manifest or a part names is gone: the
            # data is lost or the refcounts were wrong before.  Say so.
            self._log.error(
                "{what} released {released} of {expected} content references: "
                "a content row is missing",
                what=what,
                released=released,
                expected=expected,
            )

    # -- contents ------------------------------------------------------

    async def content_state(self, content_hash: str) -> Literal["absent", "present"]:
        """
        Whether a content is stored (see the write-commit protocol in the
        module docstring).

        @param content_hash: a SHA-256 in hex.
        """
        rows = await self._db.run_query("SELECT 1 FROM contents WHERE hash = %s", (content_hash,))
        return "present" if rows else "absent"

    async def get_contents(self, hashes: Collection[str]) -> dict[str, ContentRecord]:
        """
        Look contents up.

        @param hashes: SHA-256s in hex.
        @return: the contents found, by hash (missing ones are left out).
        """
        if not hashes:
            return {}
        rows = await self._db.run_query(
            f"SELECT {_CONTENT_COLUMNS} FROM contents WHERE hash = ANY(%s::text[])",
            (list(hashes),),
        )
        return {row[0]: _content(row) for row in rows}

    # -- objects -------------------------------------------------------

    async def put_object(
        self,
        record: ObjectRecord,
        contents: Sequence[ContentRecord],
        *,
        require_existing: Collection[str] = (),
        condition: WriteCondition | None = None,
    ) -> ObjectRecord | None:
        """
        Make C{record} the object of its key, in one transaction: add a
        reference to each content of its manifest (creating the missing
        ones), soft-delete the previous object of the key and drop its
        references.

        @param record: the new object; its C{last_modified} is stored
            truncated to milliseconds.
        @param contents: the contents its manifest names, each once.
        @param require_existing: hashes of contents that must already exist
            (the caller did not store them: dedup or copy).
        @param condition: called with the ETag of the key's live object (or
            C{None}) while the key is locked, in the transaction that
            writes; whatever it raises abandons the write (conditional
            writes, If-None-Match and If-Match, are atomic). A conditional
            write costs four round trips more than the one of a plain one.
        @return: the object replaced, or C{None}.
        @raise ContentMissingError: when a content of C{require_existing}
            does not exist; nothing changed.
        @raise InvalidArgument: when the record and its contents disagree.
        """
        check_key(record.key)
        references = _check_object(record, contents)
        unknown = set(require_existing) - set(references)
        if unknown:
            raise InvalidArgument(
                "require_existing names contents the manifest does not use: " + ", ".join(sorted(unknown))
            )
        params = self._object_params(record)
        params.update(_content_params(contents, references))
        params["required"] = sorted(set(require_existing))
        args = tuple(params[name] for name in _PUT_OBJECT_NAMES)

        async def put_checked(cursor: Any) -> list[tuple[Any, ...]]:
            assert condition is not None
            await self._check_condition(cursor, record.bucket_id, record.key, condition)
            await cursor.execute(_PUT_OBJECT_SQL, args)
            return list(cursor.fetchall())

        async def put() -> ObjectRecord | None:
            try:
                if condition is None:
                    rows = await self._db.run_query(_PUT_OBJECT_SQL, args)
                else:
                    rows = await self._db.run_interaction(put_checked)
            except psycopg2.errors.RaiseException as e:
                if e.diag.message_hint != _CONTENT_MISSING_HINT:
                    raise
                raise ContentMissingError((e.diag.message_detail or "").split(",")) from None
            row = rows[0]
            expected, released, _ = row[:3]
            self._check_released(expected, released, "Replacing an object")
            return None if row[3] is None else _object(row[3:])

        return await self._retrying(put)

    @staticmethod
    async def _check_condition(
        cursor: Any, bucket_id: int, key: str, condition: WriteCondition
    ) -> None:
        """
        Take the key's advisory lock (the one every writer of the key takes,
        held to the end of the transaction) and apply C{condition} to the
        ETag of its live object.
        """
        await cursor.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, %s))", (key, bucket_id)
        )
        # A statement of its own: its snapshot is taken after the lock was
        # granted, so it sees what the previous holder committed.
        await cursor.execute(
            "SELECT etag FROM objects WHERE bucket_id = %s AND key = %s AND deleted_at IS NULL",
            (bucket_id, key),
        )
        row = cursor.fetchone()
        condition(None if row is None else row[0])

    @staticmethod
    def _object_params(record: ObjectRecord) -> dict[str, Any]:
        return {
            "bucket_id": record.bucket_id,
            "key": record.key,
            "size": record.size,
            "etag": record.etag,
            "content_type": record.content_type,
            "user_metadata": Json(dict(record.user_metadata)),
            "system_metadata": Json(dict(record.system_metadata)),
            "checksums": Json(dict(record.checksums)),
            "manifest": Json([p.to_json() for p in record.manifest]),
            "last_modified": truncate_to_ms(record.last_modified),
            "parts_count": record.parts_count,
        }

    async def _swap(self, cursor: Any, params: dict[str, Any]) -> ObjectRecord | None:
        """
        Run L{_SWAP} (the key's advisory lock is held).

        @return: the object replaced, or C{None}.
        """
        await cursor.execute(_SWAP, params)
        row = cursor.fetchone()
        expected, released, _ = row[:3]
        self._check_released(expected, released, "Replacing an object")
        return None if row[3] is None else _object(row[3:])

    async def get_object(self, bucket_id: int, key: str) -> ObjectRecord | None:
        """
        The live object of C{key}, or C{None}.
        """
        if not key or "\x00" in key:
            return None
        rows = await self._db.run_query(
            f"SELECT {_OBJECT_COLUMNS} FROM objects "
            "WHERE bucket_id = %s AND key = %s AND deleted_at IS NULL",
            (bucket_id, key),
        )
        return _object(rows[0]) if rows else None

    async def get_object_with_contents(
        self, bucket_id: int, key: str
    ) -> tuple[ObjectRecord, dict[str, ContentRecord]] | None:
        """
        The live object of C{key} and the contents its manifest names, in
        one query (one snapshot, one round trip: what every GetObject
        needs).

        @return: the object and its contents by hash (a missing content is
            left out, as in L{get_contents}), or C{None}.
        """
        if not key or "\x00" in key:
            return None
        rows = await self._db.run_query(_GET_OBJECT, (bucket_id, key))
        record: ObjectRecord | None = None
        contents: dict[str, ContentRecord] = {}
        width = len(_OBJECT_COLUMNS.split(","))
        for row in rows:
            if row[0] is not None:
                record = _object(row[:width])
            else:
                content = _content(row[width:])
                contents[content.hash] = content
        return None if record is None else (record, contents)

    async def delete_object(self, bucket_id: int, key: str) -> bool:
        """
        Soft-delete the object of C{key} and drop its references; a missing
        key is not an error.

        @return: whether there was an object.
        """
        return bool(await self.delete_objects(bucket_id, [key]))

    async def delete_objects(self, bucket_id: int, keys: Iterable[str]) -> set[str]:
        """
        Soft-delete the objects of C{keys} (for DeleteObjects) in one
        transaction and drop their references; missing keys are not errors.

        No key lock is needed: a delete racing a PUT of the same key either
        deletes the old row before the PUT replaces it, or waits for the PUT
        and finds the row it locked already replaced (as if it ran first).

        @return: the keys that had an object.
        """
        wanted = sorted({k for k in keys if k and "\x00" not in k})
        if not wanted:
            return set()

        async def delete() -> list[tuple[Any, ...]]:
            return await self._db.run_query(
                *_positional(_DELETE, {"bucket_id": bucket_id, "keys": wanted})
            )

        rows = await self._retrying(delete)
        if rows:
            self._check_released(rows[0][1], rows[0][2], "Deleting objects")
        return {row[0] for row in rows}

    async def bucket_is_empty(self, bucket_id: int) -> bool:
        """
        Whether the bucket has no objects (what DeleteBucket requires; S3
        general purpose buckets may be deleted with multipart uploads in
        progress, see L{has_uploads}).
        """
        rows = await self._db.run_query(
            "SELECT EXISTS (SELECT 1 FROM objects WHERE bucket_id = %s AND deleted_at IS NULL)",
            (bucket_id,),
        )
        return not rows[0][0]

    async def has_uploads(self, bucket_id: int) -> bool:
        """
        Whether the bucket has multipart uploads in progress.
        """
        rows = await self._db.run_query(
            "SELECT EXISTS (SELECT 1 FROM multipart_uploads WHERE bucket_id = %s)", (bucket_id,)
        )
        return bool(rows[0][0])

    # -- listing -------------------------------------------------------

    async def list_objects(
        self,
        bucket_id: int,
        prefix: str = "",
        delimiter: str | None = None,
        start_after: str | None = None,
        max_keys: int = 1000,
    ) -> ListResult:
        """
        One page of the bucket's live objects, with S3's semantics: keys
        starting with C{prefix} and greater than C{start_after}, in UTF-8
        byte order; with a C{delimiter}, the keys whose rest (after the
        prefix) contains it roll up into one common prefix each (the key up
        to and including the first delimiter).  Objects and common prefixes
        each count against C{max_keys}; a common prefix that C{start_after}
        starts with was listed before and is not repeated.

        @param bucket_id: the bucket.
        @param prefix: only keys starting with this.
        @param delimiter: groups keys; C{None} or C{""} for none.
        @param start_after: list entries after this one (exclusive): V1's
            C{marker}, V2's C{start-after} or the key in a continuation
            token; the previous page's L{ListResult.last_key}.
        @param max_keys: the most entries to return; 0 gives an empty,
            untruncated page.
        """
        if max_keys < 0:
            raise InvalidArgument(f"max_keys must not be negative, not {max_keys}.")
        empty = ListResult([], [], False, None)
        if max_keys == 0 or "\x00" in prefix:
            return empty
        if delimiter and "\x00" in delimiter:
            # No key contains it: nothing rolls up.
            delimiter = None
        lower = prefix
        if start_after:
            start_after = _without_nul(start_after)
            rolled = _common_prefix(start_after, prefix, delimiter)
            after = _key_after(start_after) if rolled is None else key_successor(rolled)
            if after is None:
                return empty
            lower = max(lower, after)
        upper = key_successor(prefix) if prefix else None
        if upper is not None and lower >= upper:
            return empty
        params: dict[str, Any] = {
            "bucket_id": bucket_id,
            "lower": lower,
            "upper": upper,
            "limit": max_keys + 1,
        }
        bound = "" if upper is None else "AND o.key < %(upper)s"
        if not delimiter:
            rows = await self._db.run_query(*_positional(_LIST_PLAIN.format(upper=bound), params))
            entries: list[tuple[str | None, Sequence[Any]]] = [(None, row) for row in rows]
        else:
            params.update(plen=len(prefix), delimiter=delimiter, dlen=len(delimiter))
            rows = await self._db.run_query(*_positional(_LIST_WALK.format(upper=bound), params))
            entries = [(row[0], row[1:]) for row in rows]
        truncated = len(entries) > max_keys
        entries = entries[:max_keys]
        objects = []
        prefixes = []
        last = None
        for cp, row in entries:
            if cp is None:
                record = _summary(row)
                objects.append(record)
                last = record.key
            else:
                prefixes.append(cp)
                last = cp
        return ListResult(objects, prefixes, truncated, last)

    # -- multipart -----------------------------------------------------

    async def create_upload(self, bucket_id: int, key: str, metadata: Mapping[str, Any]) -> Upload:
        """
        Start a multipart upload.

        The id is 14 hex digits of the initiation time in microseconds
        followed by 32 random hex digits, so that the ids of one key sort in
        initiation order, which is how S3 lists them.

        @param metadata: the object's metadata to be (see L{Upload}); JSON.
        """
        check_key(key)
        rows = await self._db.run_query(
            """
            INSERT INTO multipart_uploads (upload_id, bucket_id, key, metadata, created_at)
            VALUES (lpad(to_hex((extract(epoch FROM now()) * 1000000)::bigint), 14, '0') || %s,
                    %s, %s, %s, date_trunc('milliseconds', now()))
            RETURNING """
            + _UPLOAD_COLUMNS,
            (secrets.token_hex(16), bucket_id, key, Json(dict(metadata))),
        )
        return _upload(rows[0])

    async def get_upload(self, upload_id: str) -> Upload | None:
        """
        The upload in progress with this id, or C{None}.
        """
        if not upload_id or "\x00" in upload_id:
            return None
        rows = await self._db.run_query(
            f"SELECT {_UPLOAD_COLUMNS} FROM multipart_uploads WHERE upload_id = %s", (upload_id,)
        )
        return _upload(rows[0]) if rows else None

    async def put_part(
        self,
        upload_id: str,
        part: Part,
        content: ContentRecord,
        *,
        require_existing: bool = False,
    ) -> Part | None:
        """
        Record an uploaded part, replacing any earlier part of that number,
        in one transaction with the references: the new content gains one,
        the replaced part's content loses one.

        @param part: the part; C{content_hash} and C{size} are the
            content's, C{last_modified} is stored truncated to milliseconds.
        @param content: the content holding it.
        @param require_existing: whether the content must already exist
            (dedup, UploadPartCopy), as for L{put_object}.
        @return: the part replaced, or C{None}.
        @raise NoSuchUploadError: when the upload is not in progress.
        @raise ContentMissingError: see C{require_existing}.
        """
        if not 1 <= part.part_number <= MAX_PART_NUMBER:
            raise InvalidArgument(
                f"Part number {part.part_number} is not between 1 and {MAX_PART_NUMBER}."
            )
        _check_content(content)
        if part.content_hash != content.hash or part.size != content.size:
            raise InvalidArgument("The part's hash and size must be its content's.")
        params: dict[str, Any] = {
            "upload_id": upload_id,
            "part_number": part.part_number,
            "etag": _unquote(part.etag),
            "checksums": Json(dict(part.checksums)),
            "created_at": truncate_to_ms(part.last_modified),
            "content_hash": content.hash,
            "size": content.size,
        }
        params.update(_content_params([content], {content.hash: 1}))

        async def put(cursor: Any) -> Part | None:
            # FOR SHARE: parts of one upload are stored concurrently, while
            # completing or aborting it (FOR UPDATE) waits for them and
            # they for it.  The advisory lock serialises writers of one
            # part number.
            await cursor.execute(
                """
                SELECT pg_advisory_xact_lock(hashtextextended(upload_id, %(part_number)s))
                  FROM multipart_uploads WHERE upload_id = %(upload_id)s FOR SHARE
                """,
                params,
            )
            if not cursor.fetchall():
                raise NoSuchUploadError(upload_id)
            await cursor.execute(_UPSERT_CONTENTS.format(source=""), params)
            [(_, inserted)] = cursor.fetchall()
            if inserted and require_existing:
                raise ContentMissingError([content.hash])
            await cursor.execute(
                """
                WITH old AS (
                    SELECT """
                + _PART_COLUMNS
                + """ FROM multipart_parts
                     WHERE upload_id = %(upload_id)s AND part_number = %(part_number)s
                ),
                put AS (
                    INSERT INTO multipart_parts
                        (upload_id, part_number, content_hash, size, etag, checksums, created_at)
                    VALUES (%(upload_id)s, %(part_number)s, %(content_hash)s, %(size)s, %(etag)s,
                            %(checksums)s, %(created_at)s)
                    ON CONFLICT (upload_id, part_number) DO UPDATE
                       SET content_hash = EXCLUDED.content_hash, size = EXCLUDED.size,
                           etag = EXCLUDED.etag, checksums = EXCLUDED.checksums,
                           created_at = EXCLUDED.created_at
                ),
                released AS (
                    UPDATE contents c
                       SET refcount = c.refcount - 1,
                           released_at = CASE WHEN c.refcount = 1 THEN now() ELSE c.released_at END
                      FROM old WHERE c.hash = old.content_hash
                    RETURNING c.hash
                )
                SELECT (SELECT count(*) FROM released), old.* FROM old
                """,
                params,
            )
            row = cursor.fetchone()
            if row is None:
                return None
            self._check_released(1, row[0], "Replacing a part")
            return _part(row[1:])

        return await self._retrying(lambda: self._db.run_interaction(put))

    async def list_parts(
        self, upload_id: str, part_number_marker: int = 0, max_parts: int = 1000
    ) -> PartList:
        """
        One page of an upload's parts: those numbered above
        C{part_number_marker}, by number.

        @raise NoSuchUploadError: when the upload is not in progress.
        """
        if max_parts < 0:
            raise InvalidArgument(f"max_parts must not be negative, not {max_parts}.")
        if not upload_id or "\x00" in upload_id:
            raise NoSuchUploadError(upload_id)
        rows = await self._db.run_query(
            """
            SELECT """
            + ", ".join("p." + c.strip() for c in _PART_COLUMNS.split(","))
            + """
              FROM multipart_uploads u
              LEFT JOIN LATERAL (
                  SELECT * FROM multipart_parts p
                   WHERE p.upload_id = u.upload_id AND p.part_number > %s
                   ORDER BY p.part_number
                   LIMIT %s) p ON TRUE
             WHERE u.upload_id = %s
            """,
            (part_number_marker, max_parts + 1, upload_id),
        )
        if not rows:
            raise NoSuchUploadError(upload_id)
        parts = [_part(row) for row in rows if row[0] is not None]
        truncated = max_parts > 0 and len(parts) > max_parts
        parts = parts[:max_parts]
        return PartList(parts, truncated, parts[-1].part_number if parts else None)

    async def complete_upload(
        self,
        upload_id: str,
        requested: Sequence[tuple[int, str]],
        *,
        min_part_size: int = MIN_PART_SIZE,
        checksums: Mapping[str, str] | None = None,
        last_modified: datetime | None = None,
        condition: WriteCondition | None = None,
    ) -> ObjectRecord:
        """
        Complete a multipart upload: the listed parts become the object of
        the upload's key, in one transaction.

        The manifest is made of the parts' contents (nothing is re-encoded);
        the object takes over their references, the parts not listed release
        theirs, the upload and its parts are removed, and the key's previous
        object is replaced as by L{put_object}.

        @param requested: C{(part number, ETag)} pairs as the client listed
            them (ETags with or without quotes).
        @param min_part_size: the least size of every part but the last.
        @param checksums: the object's checksums (a composite checksum the
            S3 layer computed from the parts'), if any.
        @param last_modified: the object's time; by default the database's
            current time.
        @param condition: as for L{put_object}: applied to the key's live
            object under the key's lock, before anything changes.
        @return: the new object.
        @raise NoSuchUploadError: when the upload is not in progress (also
            when it was completed already).
        @raise InvalidPartOrderError: when the part numbers do not ascend.
        @raise InvalidPartError: when a listed part was not uploaded or has
            another ETag.
        @raise EntityTooSmallError: when a part but the last is too small.
        """
        if not requested:
            raise InvalidArgument("Completing a multipart upload needs at least one part.")
        previous = None
        for number, _ in requested:
            if previous is not None and number <= previous:
                raise InvalidPartOrderError(number)
            previous = number
        if not upload_id or "\x00" in upload_id:
            raise NoSuchUploadError(upload_id)

        async def complete(cursor: Any) -> ObjectRecord:
            await cursor.execute(
                "SELECT " + _UPLOAD_COLUMNS + ", pg_advisory_xact_lock(hashtextextended(key, bucket_id)),"
                " date_trunc('milliseconds', now())"
                " FROM multipart_uploads WHERE upload_id = %s FOR UPDATE",
                (upload_id,),
            )
            row = cursor.fetchone()
            if row is None:
                raise NoSuchUploadError(upload_id)
            upload = _upload(row[:5])
            now = row[6]
            if condition is not None:
                await self._check_condition(cursor, upload.bucket_id, upload.key, condition)
            # A new statement: its snapshot includes every part committed
            # before the lock above was granted, and none can follow.
            await cursor.execute(
                f"SELECT {_PART_COLUMNS} FROM multipart_parts WHERE upload_id = %s ORDER BY part_number",
                (upload_id,),
            )
            parts = {r[0]: _part(r) for r in cursor.fetchall()}
            chosen = []
            for number, etag in requested:
                part = parts.get(number)
                if part is None:
                    raise InvalidPartError(number, "was not uploaded")
                if _unquote(etag) != part.etag:
                    raise InvalidPartError(number, "has a different ETag")
                chosen.append(part)
            for part in chosen[:-1]:
                if part.size < min_part_size:
                    raise EntityTooSmallError(part.part_number, part.size, min_part_size)
            record = _assemble(upload, chosen, checksums or {}, last_modified or now)
            unused = Counter(p.content_hash for p in parts.values())
            unused.subtract(p.content_hash for p in chosen)
            params = self._object_params(record)
            params["extra_hashes"] = [h for h, n in unused.items() if n]
            params["extra_counts"] = [n for n in unused.values() if n]
            await self._swap(cursor, params)
            await cursor.execute("DELETE FROM multipart_uploads WHERE upload_id = %s", (upload_id,))
            return record

        return await self._retrying(lambda: self._db.run_interaction(complete))

    async def abort_upload(self, upload_id: str) -> None:
        """
        Abort a multipart upload: its parts release their contents and are
        removed with it.

        @raise NoSuchUploadError: when the upload is not in progress.
        """
        if not upload_id or "\x00" in upload_id:
            raise NoSuchUploadError(upload_id)

        async def abort(cursor: Any) -> None:
            await cursor.execute(
                "SELECT 1 FROM multipart_uploads WHERE upload_id = %s FOR UPDATE", (upload_id,)
            )
            if not cursor.fetchall():
                raise NoSuchUploadError(upload_id)
            # A new statement, so that parts committed while we waited for
            # the lock are seen (and released) too.
            await cursor.execute(
                """
                WITH parts AS (
                    DELETE FROM multipart_parts WHERE upload_id = %(upload_id)s
                    RETURNING content_hash
                ),
                net AS (SELECT content_hash AS hash, count(*)::int AS n FROM parts GROUP BY 1),
                """
                + _RELEASE.format(net="net")
                + """
                SELECT (SELECT count(*) FROM net), (SELECT count(*) FROM released)
                """,
                {"upload_id": upload_id},
            )
            expected, released = cursor.fetchone()
            self._check_released(expected, released, "Aborting an upload")
            await cursor.execute("DELETE FROM multipart_uploads WHERE upload_id = %s", (upload_id,))

        await self._retrying(lambda: self._db.run_interaction(abort))

    async def list_uploads(
        self,
        bucket_id: int,
        prefix: str = "",
        delimiter: str | None = None,
        key_marker: str | None = None,
        upload_id_marker: str | None = None,
        max_uploads: int = 1000,
    ) -> UploadList:
        """
        One page of the bucket's multipart uploads in progress, with S3's
        semantics: ordered by key, then upload id (initiation order);
        after C{key_marker} (keys greater than it, or with
        C{upload_id_marker} also the uploads of C{key_marker} whose ids are
        greater than that); prefix and delimiter as in L{list_objects}, each
        upload and common prefix counting against C{max_uploads}.

        @param upload_id_marker: ignored without C{key_marker}, as in S3.
        """
        if max_uploads < 0:
            raise InvalidArgument(f"max_uploads must not be negative, not {max_uploads}.")
        empty = UploadList([], [], False, None, None)
        if max_uploads == 0 or "\x00" in prefix:
            return empty
        if delimiter and "\x00" in delimiter:
            delimiter = None
        # Rows strictly after (lower_key, lower_id); upload ids are never
        # empty, so (k, "") means "keys from k on".
        lower: tuple[str, str] = (prefix, "")
        if key_marker:
            rolled = _common_prefix(_without_nul(key_marker), prefix, delimiter)
            if rolled is not None:
                after = key_successor(rolled)
                if after is None:
                    return empty
                marker = (after, "")
            elif upload_id_marker and "\x00" not in key_marker:
                marker = (key_marker, _without_nul(upload_id_marker))
            else:
                marker = (_key_after(key_marker), "")
            lower = max(lower, marker)
        upper = key_successor(prefix) if prefix else None
        if upper is not None and lower[0] >= upper:
            return empty
        params: dict[str, Any] = {
            "bucket_id": bucket_id,
            "lower_key": lower[0],
            "lower_id": lower[1],
            "upper": upper,
            "limit": max_uploads + 1,
            "plen": len(prefix),
            "delimiter": delimiter,
            "dlen": len(delimiter or ""),
        }
        sql = _UPLOADS_WALK.format(
            cp=_CP.format(t="u") if delimiter else "NULL::text",
            upper="" if upper is None else "AND u.key < %(upper)s",
        )
        rows = await self._db.run_query(*_positional(sql, params))
        truncated = len(rows) > max_uploads
        rows = rows[:max_uploads]
        uploads = []
        prefixes = []
        last: tuple[str | None, str | None] = (None, None)
        for row in rows:
            if row[0] is None:
                upload = _upload(row[1:])
                uploads.append(upload)
                last = (upload.key, upload.upload_id)
            else:
                prefixes.append(row[0])
                last = (row[0], None)
        return UploadList(uploads, prefixes, truncated, last[0], last[1])

    # -- Garbage collection -------------------------------------------
    #
    # Narrow queries for anvil.worker.gc.  Times are cut-offs the caller
    # computes from its clock; every method is bounded by a limit and
    # idempotent, so a pass can stop anywhere and the next one resumes.

    async def gc_unreferenced_contents(self, released_before: datetime, limit: int) -> list[str]:
        """
        Contents nothing has referenced since before C{released_before},
        oldest release first (through the partial index C{contents_released}).

        @param released_before: only contents released before this time.
        @param limit: the most hashes to return.
        @return: their hashes.
        """
        rows = await self._db.run_query(
            "SELECT hash FROM contents WHERE refcount = 0 AND released_at < %s "
            "ORDER BY released_at LIMIT %s",
            (released_before, limit),
        )
        return [row[0] for row in rows]

    async def gc_remove_inline_contents(
        self, released_before: datetime, limit: int
    ) -> tuple[int, int]:
        """
        Remove up to C{limit} unreferenced inline contents in one statement.

        An inline content has no files, so the per-content transaction of
        L{gc_remove_content} buys nothing for it; deleting them in a batch
        keeps the collection of many small deleted objects from costing one
        transaction each. Rows a writer holds locked are skipped, and the
        delete checks C{refcount = 0} again on the rows it locked. A writer
        referencing one of these contents concurrently waits for the delete
        and then stores the bytes anew (it carries them: the content is
        inline).

        @param released_before: the grace cut-off.
        @param limit: the most contents to remove.
        @return: how many were removed and their bytes.
        """
        rows = await self._db.run_query(
            "WITH gone AS (DELETE FROM contents WHERE hash = ANY(ARRAY("
            "SELECT hash FROM contents WHERE refcount = 0 AND released_at < %s "
            "AND inline_data IS NOT NULL ORDER BY released_at LIMIT %s "
            "FOR UPDATE SKIP LOCKED)) AND refcount = 0 AND inline_data IS NOT NULL "
            "RETURNING size) SELECT count(*), COALESCE(sum(size), 0) FROM gone",
            (released_before, limit),
        )
        count, size = rows[0]
        return int(count), int(size)

    async def gc_remove_content(
        self,
        content_hash: str,
        released_before: datetime,
        remove_files: Callable[[ContentRecord], Awaitable[int]],
    ) -> tuple[ContentRecord, int] | None:
        """
        Remove an unreferenced content: in one transaction lock its row,
        check again that nothing references it (and has not since before
        C{released_before}), delete the row, call C{remove_files} (not for
        an inline content) and only then commit.

        The shard files are removed while the deleted row is still locked
        and uncommitted: a writer that found the content present and is
        about to reference it waits on that lock, then gets
        L{ContentMissingError} and commits its own shards, which therefore
        land after the removal, never before it (see L{anvil.worker.gc}).

        @param content_hash: the content.
        @param released_before: the grace cut-off.
        @param remove_files: removes the content's shard files and returns
            how many it removed; it must not raise (a failure to remove
            files leaves orphans, never a row without its files).
        @return: the content removed and the count C{remove_files}
            returned, or C{None} when it is referenced again, too recently
            released, gone, or locked by a writer right now.
        """

        async def remove(cursor: Any) -> tuple[ContentRecord, int] | None:
            # SKIP LOCKED: a locked row is being referenced by a writer at
            # this moment; leave it to a later pass instead of waiting.
            await cursor.execute(
                f"SELECT {_CONTENT_COLUMNS} FROM contents "
                "WHERE hash = %s AND refcount = 0 AND released_at < %s FOR UPDATE SKIP LOCKED",
                (content_hash, released_before),
            )
            row = cursor.fetchone()
            if row is None:
                return None
            content = _content(row)
            await cursor.execute("DELETE FROM contents WHERE hash = %s", (content_hash,))
            files = 0 if content.inline_data is not None else await remove_files(content)
            return content, files

        return await self._retrying(lambda: self._db.run_interaction(remove))

    async def gc_purge_deleted_objects(self, deleted_before: datetime, limit: int) -> int:
        """
        Remove soft-deleted object rows (replaced or deleted before
        C{deleted_before}); they hold no references any more.

        @return: how many rows were removed.
        """
        rows = await self._db.run_query(
            "WITH gone AS (DELETE FROM objects WHERE id = ANY(ARRAY("
            "SELECT id FROM objects WHERE deleted_at < %s ORDER BY deleted_at LIMIT %s)) "
            "RETURNING 1) SELECT count(*) FROM gone",
            (deleted_before, limit),
        )
        return int(rows[0][0])

    async def gc_stale_uploads(self, created_before: datetime, limit: int) -> list[str]:
        """
        Multipart uploads initiated before C{created_before}, oldest first.

        @return: their upload ids.
        """
        rows = await self._db.run_query(
            "SELECT upload_id FROM multipart_uploads WHERE created_at < %s ORDER BY created_at LIMIT %s",
            (created_before, limit),
        )
        return [row[0] for row in rows]

    async def gc_bucket_uploads(self, bucket_id: int, limit: int) -> list[str]:
        """
        Multipart uploads of a bucket (to abort those of a deleted bucket).

        @return: their upload ids.
        """
        rows = await self._db.run_query(
            "SELECT upload_id FROM multipart_uploads WHERE bucket_id = %s "
            'ORDER BY key, upload_id COLLATE "C" LIMIT %s',
            (bucket_id, limit),
        )
        return [row[0] for row in rows]

    async def gc_bucket_keys(self, bucket_id: int, limit: int) -> list[str]:
        """
        Keys of a bucket's live objects (to delete those of a deleted
        bucket with L{delete_objects}).

        @return: the first C{limit} keys, in order.
        """
        rows = await self._db.run_query(
            "SELECT key FROM objects WHERE bucket_id = %s AND deleted_at IS NULL ORDER BY key LIMIT %s",
            (bucket_id, limit),
        )
        return [row[0] for row in rows]

    async def gc_bucket_has_rows(self, bucket_id: int) -> bool:
        """
        Whether anything of a bucket is left in the regional database:
        live or soft-deleted objects, or multipart uploads.
        """
        rows = await self._db.run_query(
            "SELECT EXISTS (SELECT 1 FROM objects WHERE bucket_id = %s AND deleted_at IS NULL)"
            " OR EXISTS (SELECT 1 FROM objects WHERE bucket_id = %s AND deleted_at IS NOT NULL)"
            " OR EXISTS (SELECT 1 FROM multipart_uploads WHERE bucket_id = %s)",
            (bucket_id, bucket_id, bucket_id),
        )
        return bool(rows[0][0])

    # -- Statistics ----------------------------------------------------
    #
    # Read-only aggregates for the usage gauges (anvil.worker.stats).

    async def usage_by_bucket(self) -> dict[int, tuple[int, int]]:
        """
        The live objects of every bucket that has any, in one aggregate
        query (soft-deleted rows, replaced or deleted, do not count).

        @return: C{{bucket_id: (object count, total logical bytes)}}.
        """
        rows = await self._db.run_query(
            "SELECT bucket_id, count(*), COALESCE(sum(size), 0) FROM objects "
            "WHERE deleted_at IS NULL GROUP BY bucket_id"
        )
        return {int(bucket_id): (int(objects), int(size)) for bucket_id, objects, size in rows}


def _check_object(record: ObjectRecord, contents: Sequence[ContentRecord]) -> Counter[str]:
    """
    Check that an object's manifest tiles the object with the given
    contents.

    @return: how many references each content gains.
    @raise InvalidArgument: when it does not.
    """
    by_hash: dict[str, ContentRecord] = {}
    for content in contents:
        _check_content(content)
        if content.hash in by_hash:
            raise InvalidArgument(f"Content {content.hash} is given twice.")
        by_hash[content.hash] = content
    if record.size < 0:
        raise InvalidArgument("An object's size cannot be negative.")
    offset = 0
    for index, piece in enumerate(record.manifest):
        used = by_hash.get(piece.content_hash)
        if used is None:
            raise InvalidArgument(f"The manifest names content {piece.content_hash}, which is not given.")
        if piece.offset != offset or piece.length != used.size:
            raise InvalidArgument("The manifest's pieces must be whole contents placed end to end.")
        expected_part = None if record.parts_count is None else index + 1
        if piece.part_number != expected_part:
            raise InvalidArgument("Manifest part numbers must count the parts of a multipart object from 1.")
        offset += piece.length
    if offset != record.size:
        raise InvalidArgument(f"The manifest covers {offset} bytes of a {record.size}-byte object.")
    if record.parts_count is not None and record.parts_count != len(record.manifest):
        raise InvalidArgument("parts_count must be the number of manifest pieces.")
    references = Counter(p.content_hash for p in record.manifest)
    unused = set(by_hash) - set(references)
    if unused:
        raise InvalidArgument("Contents the manifest does not use were given: " + ", ".join(sorted(unused)))
    return references


def _assemble(
    upload: Upload, parts: Sequence[Part], checksums: Mapping[str, str], last_modified: datetime
) -> ObjectRecord:
    """
    The object a completed upload makes of its chosen parts.
    """
    manifest = []
    offset = 0
    for ordinal, part in enumerate(parts, 1):
        manifest.append(ManifestPart(part.content_hash, offset, part.size, ordinal))
        offset += part.size
    metadata = upload.metadata
    return ObjectRecord(
        bucket_id=upload.bucket_id,
        key=upload.key,
        size=offset,
        etag=multipart_etag([p.etag for p in parts]),
        content_type=metadata.get("content_type") or "binary/octet-stream",
        user_metadata=dict(metadata.get("user_metadata") or {}),
        system_metadata=dict(metadata.get("system_metadata") or {}),
        checksums=dict(checksums),
        manifest=manifest,
        last_modified=truncate_to_ms(last_modified),
        parts_count=len(parts),
    )
