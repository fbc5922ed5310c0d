# -*- test-case-name: tests.test_objects -*-
"""
The metadata records the S3 layer and the storage engine exchange with the
metadata stores (L{anvil.meta.buckets}, L{anvil.meta.objects}).

Records are frozen dataclasses holding plain values: strings, integers,
aware L{datetime}s (UTC), dicts of strings and lists of records.  They say
nothing about HTTP; ETags are stored and returned I{without} the double
quotes S3 puts around them on the wire.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


def truncate_to_ms(moment: datetime) -> datetime:
    """
    Drop the sub-millisecond part of a time, as S3 shows object times
    (C{2024-05-01T12:00:00.123Z}) and as the stores keep them, so that a
    time a caller holds compares equal to the one read back later.

    @param moment: an aware datetime (a naive one is taken to be UTC).
    @return: the same instant in UTC with microseconds rounded down to a
        whole millisecond.
    """
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    moment = moment.astimezone(UTC)
    return moment.replace(microsecond=moment.microsecond - moment.microsecond % 1000)


@dataclass(frozen=True)
class Bucket:
    """
    A live bucket (global database).

    @ivar id: the bucket's numeric id; objects refer to it.
    @ivar name: its globally unique name.
    @ivar tenant_id: the id of the tenant that owns it.
    @ivar tenant_name: that tenant's name.
    @ivar region: the region holding its objects.
    @ivar public: whether anonymous GetObject and HeadObject are allowed.
    @ivar created_at: when it was created.
    """

    id: int
    name: str
    tenant_id: int
    tenant_name: str
    region: str
    public: bool
    created_at: datetime


@dataclass(frozen=True)
class ContentRecord:
    """
    Content-addressed data: identical bytes in a region are stored once and
    reference-counted.

    @ivar hash: the SHA-256 of the bytes, 64 lower-case hex digits.
    @ivar size: the number of bytes.
    @ivar k: erasure data shards.
    @ivar m: erasure parity shards.
    @ivar stripe_size: bytes per stripe.
    @ivar shard_map: where each shard is (the placement chosen at write
        time); must survive a JSON round trip unchanged, so its keys are
        strings.
    @ivar inline_data: the bytes themselves for small contents kept in
        PostgreSQL instead of in shard files, else C{None}.
    """

    hash: str
    size: int
    k: int
    m: int
    stripe_size: int
    shard_map: dict[str, Any] = field(default_factory=dict)
    inline_data: bytes | None = None


@dataclass(frozen=True)
class ManifestPart:
    """
    One piece of an object: the whole of one content, placed at C{offset}
    in the object.  A simple object has one piece; a multipart object has
    one per part, in order.

    @ivar content_hash: the content holding the bytes.
    @ivar offset: where the piece starts in the object.
    @ivar length: its length; equal to the content's size (the piece is the
        content's bytes C{[0, length)}).
    @ivar part_number: for multipart objects, the part's position in the
        completed object, 1 to C{parts_count} (as GetObject C{?partNumber}
        counts, whatever numbers the client uploaded the parts under);
        C{None} for simple objects.
    """

    content_hash: str
    offset: int
    length: int
    part_number: int | None = None

    @property
    def part_size(self) -> int:
        """
        The size of the part this piece is (the same as C{length}).
        """
        return self.length

    def to_json(self) -> dict[str, Any]:
        """
        The piece as stored in C{objects.manifest}.
        """
        piece: dict[str, Any] = {
            "hash": self.content_hash,
            "offset": self.offset,
            "length": self.length,
        }
        if self.part_number is not None:
            piece["part"] = self.part_number
        return piece

    @classmethod
    def from_json(cls, piece: dict[str, Any]) -> ManifestPart:
        """
        Read a piece stored by L{to_json}.
        """
        return cls(piece["hash"], piece["offset"], piece["length"], piece.get("part"))


@dataclass(frozen=True)
class Segment:
    """
    The part of one manifest piece that a byte range of an object covers.

    @ivar piece: the manifest piece.
    @ivar start: the first byte to read, relative to the piece's content.
    @ivar stop: one past the last byte to read, relative to the content.
    """

    piece: ManifestPart
    start: int
    stop: int


@dataclass(frozen=True)
class ObjectRecord:
    """
    An object: what a key of a bucket names.

    @ivar bucket_id: the bucket's id.
    @ivar key: the key (any UTF-8 without NUL, up to 1024 bytes).
    @ivar size: the object's length in bytes.
    @ivar etag: the S3 ETag without quotes: the MD5 in hex, or for a
        multipart object C{"<md5 of the parts' binary MD5s>-<parts>"}.
    @ivar content_type: the Content-Type to answer with.
    @ivar user_metadata: C{x-amz-meta-*} headers, names lower-case without
        the prefix.
    @ivar system_metadata: other stored headers (Content-Disposition,
        Content-Encoding, Cache-Control, Expires, ...), as the S3 layer
        chooses to name them.
    @ivar checksums: C{x-amz-checksum-*} values by algorithm.
    @ivar manifest: the pieces the object is made of, in order.
    @ivar last_modified: when it was written, UTC, whole milliseconds.
    @ivar parts_count: the number of parts of a multipart object, else
        C{None}.
    """

    bucket_id: int
    key: str
    size: int
    etag: str
    content_type: str
    user_metadata: dict[str, str]
    system_metadata: dict[str, str]
    checksums: dict[str, str]
    manifest: list[ManifestPart]
    last_modified: datetime
    parts_count: int | None = None

    @property
    def content_hashes(self) -> list[str]:
        """
        The hashes of the contents the object is made of, in manifest
        order, without repetitions.
        """
        return list(dict.fromkeys(p.content_hash for p in self.manifest))

    def part_range(self, part_number: int) -> tuple[int, int] | None:
        """
        The bytes GetObject C{?partNumber=N} serves.

        Parts count from 1 in the completed object's order.  A simple object
        has exactly one part (as in S3): the whole object.

        @return: C{(start, stop)} with C{stop} exclusive, or C{None} when the
            object has no such part.
        """
        if self.parts_count is None:
            return (0, self.size) if part_number == 1 else None
        if not 1 <= part_number <= len(self.manifest):
            return None
        piece = self.manifest[part_number - 1]
        return (piece.offset, piece.offset + piece.length)

    def segments(self, start: int, stop: int) -> list[Segment]:
        """
        Map the object bytes C{[start, stop)} onto the contents holding them.

        @param start: the first byte, C{0 <= start}.
        @param stop: one past the last byte, C{start <= stop <= size}.
        @return: the segments to read, in order; empty for an empty range.
        """
        if not 0 <= start <= stop <= self.size:
            raise ValueError(f"Range [{start}, {stop}) is outside an object of {self.size} bytes.")
        return list(_segments(self.manifest, start, stop))


def _segments(manifest: list[ManifestPart], start: int, stop: int) -> Iterator[Segment]:
    if start >= stop:
        return
    for piece in manifest:
        end = piece.offset + piece.length
        if end <= start or piece.length == 0:
            continue
        if piece.offset >= stop:
            break
        yield Segment(piece, max(start, piece.offset) - piece.offset, min(stop, end) - piece.offset)


@dataclass(frozen=True)
class ObjectSummary:
    """
    What a bucket listing shows of an object (the attributes have the same
    names and meanings as L{ObjectRecord}'s).

    @ivar bucket_id: the bucket's id.
    @ivar key: the key.
    @ivar size: the object's length in bytes.
    @ivar etag: the S3 ETag without quotes.
    @ivar last_modified: when it was written, UTC, whole milliseconds.
    @ivar checksums: C{x-amz-checksum-*} values by algorithm (listings
        show the algorithms).
    @ivar parts_count: the number of parts of a multipart object, else
        C{None}.
    """

    bucket_id: int
    key: str
    size: int
    etag: str
    last_modified: datetime
    checksums: dict[str, str]
    parts_count: int | None = None


@dataclass(frozen=True)
class Upload:
    """
    A multipart upload in progress.

    @ivar upload_id: its id (URL-safe; ids of one key sort by initiation
        time).
    @ivar bucket_id: the bucket it writes to.
    @ivar key: the key it writes.
    @ivar metadata: what CreateMultipartUpload said about the object to be;
        at completion C{content_type}, C{user_metadata} and
        C{system_metadata} entries are copied onto the object, the rest is
        the S3 layer's own (a checksum algorithm, for example).
    @ivar created_at: when it was initiated, UTC, whole milliseconds.
    """

    upload_id: str
    bucket_id: int
    key: str
    metadata: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class Part:
    """
    One uploaded part of a multipart upload.

    @ivar part_number: 1 to 10000.
    @ivar content_hash: the content holding its bytes.
    @ivar size: its length in bytes.
    @ivar etag: the MD5 of its bytes in hex, without quotes.
    @ivar checksums: C{x-amz-checksum-*} values by algorithm.
    @ivar last_modified: when it was uploaded, UTC, whole milliseconds.
    """

    part_number: int
    content_hash: str
    size: int
    etag: str
    checksums: dict[str, str]
    last_modified: datetime
