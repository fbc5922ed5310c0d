# -*- test-case-name: tests.test_s3_objects -*-
"""
Object operations: PutObject, GetObject, HeadObject, DeleteObject and
CopyObject.

Write path (PutObject; UploadPart in L{anvil.s3.handlers.multipart} shares
it through L{receive_content} and L{commit_content}):

  1. validate everything that can be validated from the headers alone
     (key length, metadata, Content-MD5 syntax, checksum headers, size
     limits, conditional-write headers), so a bad request fails before a
     byte of its body is stored;
  2. stream the decoded body (L{anvil.s3.dispatch.S3Call.payload}) into a
     storage-engine C{ContentWriter}; awaiting C{write} is the
     backpressure that pauses the client when encoding or disks are
     behind. The engine computes MD5 and SHA-256, and every extra hasher
     (the C{x-amz-checksum-*} verifier) in its CPU pool;
  3. C{writer.finish()}, then C{payload.finish()}: only now are the
     signature, chunk signatures, trailer, length, Content-MD5
     (C{BadDigest}) and the C{x-amz-checksum-*} known to be right (the
     payload reader's verifiers were fed by the engine, in its CPU pool);
  4. commit: the shards are renamed into place unless the content already
     exists (dedup), and the object row is inserted in one transaction that
     also takes the content reference and replaces the previous object.

Any failure before the commit, a client disconnect or a cancellation
aborts the writer: its temporary shards are removed and nothing becomes
visible.

Read path: the record and its contents are looked up, the conditions and
the range (or part number) are applied, and the response headers are
complete before the body starts streaming; the body is an asynchronous
iterator over the manifest's contents, read stripe by stripe from the
engine (only the stripes a range covers).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from anvil.meta.objects import ContentMissingError, WriteCondition
from anvil.meta.records import ContentRecord, ManifestPart, ObjectRecord, truncate_to_ms
from anvil.s3 import metadata_headers as mh
from anvil.s3.checksums import (
    COMPOSITE,
    FULL_OBJECT,
    b64,
    header_name,
    new_hasher,
    parse_checksum_algorithm,
)
from anvil.s3.dispatch import S3Response
from anvil.s3.errors import (
    EntityTooLarge,
    InternalError,
    InvalidArgument,
    InvalidPartNumber,
    InvalidRange,
    InvalidRequest,
    MissingContentLength,
    NoSuchBucket,
    NoSuchKey,
    S3Error,
    ServiceUnavailable,
)
from anvil.s3.xml import Element, document
from anvil.storage.engine import ContentUnavailable, ContentWriter, StorageEngine
from anvil.storage.ranges import InvalidRange as RangeNotSatisfiable
from anvil.storage.ranges import parse_range

if TYPE_CHECKING:
    from anvil.meta.records import Bucket
    from anvil.s3.dispatch import S3Call

_log = Logger()
_T = TypeVar("_T")

#: The largest object a single PutObject (or CopyObject) may create: 5 GiB.
MAX_PUT_SIZE = 5 * 1024**3
#: The largest multipart part, also 5 GiB.
MAX_PART_SIZE = 5 * 1024**3
#: Part numbers S3 accepts.
MIN_PART_NUMBER, MAX_PART_NUMBER = 1, 10000


def _response(
    status: int = 200,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | AsyncIterator[bytes] | None = None,
) -> S3Response:
    """
    Build the dispatcher's response object.

    @param status: the HTTP status.
    @param headers: response headers.
    @param body: C{bytes}, an asynchronous iterator of C{bytes}, or C{None}.
    @return: the response.
    """
    return S3Response(status=status, headers=list(headers), body=body)


def now(call: S3Call) -> datetime:
    """
    @param call: the request.
    @return: the service clock's current time, as an aware UTC datetime.
    """
    return datetime.fromtimestamp(call.service.clock.seconds(), UTC)


def require_bucket(call: S3Call) -> Bucket:
    """
    @param call: an object-level request.
    @return: the request's bucket.
    @raise NoSuchBucket: if it does not exist (for this tenant).
    """
    if call.bucket is None:
        raise NoSuchBucket(BucketName=call.bucket_name)
    return call.bucket


def parse_part_number(value: str) -> int:
    """
    @param value: a C{partNumber} query value.
    @return: the part number.
    @raise InvalidArgument: unless it is an integer in [1, 10000].
    """
    try:
        number = int(value) if value.strip().isdigit() else -1
    except ValueError:
        number = -1
    if not MIN_PART_NUMBER <= number <= MAX_PART_NUMBER:
        raise InvalidArgument(
            "Part number must be an integer between 1 and 10000, inclusive",
            ArgumentName="partNumber",
            ArgumentValue=value,
        )
    return number


def check_version_id(call: S3Call, parameter: str = "versionId") -> None:
    """
    Buckets are unversioned: the only version id that exists is C{null}.

    @param call: the request.
    @param parameter: the query parameter to check.
    @raise InvalidArgument: for any other version id, as S3 answers for an
        unversioned bucket.
    """
    value = call.query.get(parameter)
    if value is not None and value != "null":
        raise InvalidArgument(
            "Invalid version id specified", ArgumentName=parameter, ArgumentValue=value
        )


# Checksums ------------------------------------------------------------------------


def checksum_type(value: str) -> str:
    """
    @param value: a stored checksum value.
    @return: C{COMPOSITE} for a multipart composite value (C{...-N}), else
        C{FULL_OBJECT}.
    """
    return COMPOSITE if "-" in value else FULL_OBJECT


def checksum_headers(checksums: Mapping[str, str]) -> list[tuple[str, str]]:
    """
    The response headers carrying stored checksums.

    @param checksums: upper-case algorithm name to base64 value.
    @return: C{x-amz-checksum-<alg>} headers and C{x-amz-checksum-type}.
    """
    out = [(header_name(algorithm), value) for algorithm, value in sorted(checksums.items())]
    if checksums:
        out.append(("x-amz-checksum-type", checksum_type(next(iter(checksums.values())))))
    return out


def checksum_elements(
    parent: Element, checksums: Mapping[str, str], with_type: bool = True
) -> None:
    """
    Add C{<ChecksumCRC32>...} elements to an XML result.

    @param parent: an L{anvil.s3.xml.Element}.
    @param checksums: upper-case algorithm name to base64 value.
    @param with_type: also add C{<ChecksumType>}.
    """
    for algorithm, value in sorted(checksums.items()):
        parent.text("Checksum" + algorithm, value)
    if checksums and with_type:
        parent.text("ChecksumType", checksum_type(next(iter(checksums.values()))))


# Receiving a body ---------------------------------------------------------------


def declared_length(headers: Mapping[str, str]) -> int:
    """
    The length of the decoded body a write request announces.

    @param headers: request headers, lower-case names.
    @return: C{x-amz-decoded-content-length} for an aws-chunked body, else
        C{Content-Length}.
    @raise MissingContentLength: when neither is present (S3 refuses
        uploads of unknown length, including C{Transfer-Encoding: chunked}).
    @raise InvalidArgument: for a value that is not a non-negative integer.
    """
    for name in ("x-amz-decoded-content-length", "content-length"):
        value = headers.get(name)
        if value is None:
            continue
        text = value.strip()
        if not text.isdigit():
            raise InvalidArgument(f"Invalid {name}", ArgumentName=name, ArgumentValue=value)
        return int(text)
    raise MissingContentLength()


@dataclass
class StagedContent:
    """
    A body received and verified but not yet committed.

    @ivar content: the content record from the engine.
    @ivar md5_hex: the MD5 of the body (the ETag of a simple object).
    @ivar checksums: verified (or computed) checksums, algorithm to base64.
    @ivar writer: the engine's writer, to commit or abort.
    """

    content: ContentRecord
    md5_hex: str
    checksums: dict[str, str]
    writer: ContentWriter


class _Hasher:
    """
    An extra hasher for the engine computing a checksum nobody declared
    (the algorithm of a multipart upload whose part arrived without one).
    """

    def __init__(self, algorithm: str) -> None:
        self.algorithm = algorithm
        self._hasher = new_hasher(algorithm)

    def update(self, data: bytes | memoryview) -> None:
        """
        @param data: the next body bytes.
        """
        self._hasher.update(data)

    def value(self) -> str:
        """
        @return: the base64 checksum.
        """
        return b64(self._hasher.digest())


async def receive_content(
    call: S3Call,
    *,
    also_compute: str | None = None,
) -> StagedContent:
    """
    Stream the request body into a new content and verify it, without
    committing it.

    The payload reader's verifiers (signed SHA-256, Content-MD5, the
    declared C{x-amz-checksum-*}) are fed by the storage engine in its CPU
    pool, next to its own MD5 and SHA-256, so the reactor thread never
    hashes the body.

    @param call: the request.
    @param also_compute: an algorithm to compute when the request declares
        none (the checksum algorithm of a multipart upload).
    @return: the staged content; the caller commits it with
        L{commit_content} or aborts C{writer}.
    @raise S3Error: for a body that does not verify; the writer is then
        already aborted.
    """
    payload = call.payload(external_hashing=True)
    extra: _Hasher | None = None
    if payload.checksum is None and also_compute is not None:
        extra = _Hasher(also_compute)
    hashers: list[Any] = list(payload.hashers)
    if extra is not None:
        hashers.append(extra)
    writer = call.service.engine.new_writer(extra_hashers=hashers)
    try:
        while True:
            data = await payload.read()
            if not data:
                break
            await writer.write(data)
        content = await writer.finish()
        # Nothing is trusted before the payload verified: signatures,
        # chunk signatures, trailer, length, Content-MD5 and checksum.
        await payload.finish()
        md5_hex = finished_md5(writer)
        checksums: dict[str, str] = {}
        if payload.checksum is not None and payload.checksum_value is not None:
            checksums[payload.checksum.algorithm] = payload.checksum_value
        elif extra is not None:
            checksums[extra.algorithm] = extra.value()
    except BaseException:
        await _abort(writer)
        raise
    return StagedContent(content, md5_hex, checksums, writer)


def finished_md5(writer: ContentWriter) -> str:
    """
    @param writer: a finished content writer.
    @return: the hex MD5 of its content.
    """
    md5_hex = writer.md5_hex
    assert md5_hex is not None, "the writer is finished"
    return md5_hex


async def _abort(writer: ContentWriter) -> None:
    """
    Abort a writer, logging (not raising) a failure to clean up: the
    original error is what the client must see.
    """
    try:
        await writer.abort()
    except Exception:  # noqa: BLE001 - logged; the original error wins
        _log.failure("aborting a content writer failed")


async def commit_content(
    call: S3Call,
    staged: StagedContent,
    record: Callable[[bool], Awaitable[_T]],
) -> _T:
    """
    Make a staged content durable and record what uses it, following the
    object store's write-commit protocol (dedup).

    When the content is already stored, the writer's shards are dropped and
    C{record(True)} asks the store to reference the existing content; if
    that content vanished meanwhile (collected), the shards are committed
    after all and C{record(False)} runs. Otherwise the shards are committed
    first and C{record(False)} runs.

    @param call: the request.
    @param staged: from L{receive_content}.
    @param record: writes the metadata; its argument is C{require_existing}.
    @return: what C{record} returned.
    """
    writer = staged.writer
    if staged.content.inline_data is not None:
        # An inline content has no shards to commit or drop, and the
        # metadata write inserts or shares its row either way: one query
        # less per small PUT.
        await writer.commit()
        return await record(False)
    try:
        state = await call.service.objects.content_state(staged.content.hash)
        if state == "present":
            try:
                result = await record(True)
            except ContentMissingError:
                await writer.commit()
            else:
                await writer.commit(dedup=True)
                return result
        else:
            await writer.commit()
    except BaseException:
        # After a commit this is a no-op: committed shards whose metadata
        # was not written are orphans for the garbage collector.
        await _abort(writer)
        raise
    return await record(False)


async def compute_checksum(call: S3Call, slices: Sequence[ContentSlice], algorithm: str) -> str:
    """
    Compute a checksum of stored data, streaming it from the engine.

    The hashing runs in the reactor's thread pool (one chunk at a time, in
    order), not on the reactor thread.

    @param call: the request.
    @param slices: the data to hash.
    @param algorithm: the upper-case algorithm.
    @return: the base64 checksum.
    """
    hasher = new_hasher(algorithm)
    reactor = call.service.clock
    get_pool = getattr(reactor, "getThreadPool", None)
    async for chunk in read_slices(call.service.engine, slices):
        if get_pool is None:
            hasher.update(chunk)
        else:
            await deferToThreadPool(reactor, get_pool(), hasher.update, chunk)
    return b64(hasher.digest())


# PutObject -----------------------------------------------------------------------


def _check_body_size(headers: Mapping[str, str], limit: int) -> int:
    length = declared_length(headers)
    if length > limit:
        raise EntityTooLarge(ProposedSize=length, MaxSizeAllowed=limit)
    return length


def write_condition(headers: Mapping[str, str]) -> WriteCondition | None:
    """
    @return: the test of the request's conditional-write headers
        (If-None-Match, If-Match) for the metadata layer to apply to the
        key's current object, or C{None} when there are none.
    """
    if "if-none-match" not in headers and "if-match" not in headers:
        return None
    return functools.partial(mh.check_write_conditions, headers)


async def current_etag(call: S3Call, bucket: Bucket, key: str) -> str | None:
    """
    @return: the ETag of the live object under C{key}, or C{None}.
    """
    record = await call.service.objects.get_object(bucket.id, key)
    return None if record is None else record.etag


async def put_object(call: S3Call) -> S3Response:
    """
    PutObject: store the body as the object C{call.key}.

    @param call: the request.
    @return: 200 with the ETag (and the checksum, when one was sent).
    """
    if "x-amz-copy-source" in call.headers:
        return await copy_object(call)
    bucket = require_bucket(call)
    mh.check_key(call.key)
    headers = call.headers
    stored = mh.parse_object_headers(headers)
    _check_body_size(headers, MAX_PUT_SIZE)
    condition = write_condition(headers)
    if condition is not None:
        # Checked before the body is read so a doomed upload fails fast,
        # again before its shards are committed (a refusal then leaves
        # nothing behind), and atomically with the metadata write.
        condition(await current_etag(call, bucket, call.key))

    staged = await receive_content(call)
    try:
        if condition is not None:
            condition(await current_etag(call, bucket, call.key))
    except BaseException:
        await _abort(staged.writer)
        raise
    content = staged.content
    record = ObjectRecord(
        bucket_id=bucket.id,
        key=call.key,
        size=content.size,
        etag=staged.md5_hex,
        content_type=stored.content_type,
        user_metadata=stored.user_metadata,
        system_metadata=stored.system_metadata,
        checksums=staged.checksums,
        manifest=[ManifestPart(content.hash, 0, content.size)],
        last_modified=truncate_to_ms(now(call)),
        parts_count=None,
    )

    async def write(require_existing: bool) -> ObjectRecord | None:
        return await call.service.objects.put_object(
            record,
            [content],
            require_existing=[content.hash] if require_existing else (),
            condition=condition,
        )

    await commit_content(call, staged, write)
    return _response(
        200,
        [("ETag", mh.quote_etag(staged.md5_hex)), *checksum_headers(staged.checksums)],
    )


# Reading ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ContentSlice:
    """
    The bytes C{[start, stop)} of one content.

    @ivar content: the content.
    @ivar start: the first byte.
    @ivar stop: one past the last byte.
    """

    content: ContentRecord
    start: int
    stop: int


def object_slices(
    record: ObjectRecord, contents: Mapping[str, ContentRecord], start: int, stop: int
) -> list[ContentSlice]:
    """
    Map the object bytes C{[start, stop)} onto the contents holding them.

    @param record: the object.
    @param contents: its contents by hash (L{object_contents}).
    @param start: the first object byte.
    @param stop: one past the last object byte.
    @return: the content slices to read, in order.
    """
    return [
        ContentSlice(contents[segment.piece.content_hash], segment.start, segment.stop)
        for segment in record.segments(start, stop)
    ]


async def object_contents(call: S3Call, record: ObjectRecord) -> dict[str, ContentRecord]:
    """
    Look up every content an object's manifest references.

    @param call: the request.
    @param record: the object.
    @return: contents by hash.
    @raise S3Error: C{InternalError} when a content record is missing (the
        metadata is damaged).
    """
    hashes = sorted({part.content_hash for part in record.manifest})
    found = await call.service.objects.get_contents(hashes)
    check_contents(record, found)
    return dict(found)


def check_contents(record: ObjectRecord, found: Mapping[str, ContentRecord]) -> None:
    """
    Check that every content an object's manifest references was found.

    @param record: the object.
    @param found: the contents found, by hash.
    @raise S3Error: C{InternalError} when a content record is missing (the
        metadata is damaged).
    """
    hashes = sorted({part.content_hash for part in record.manifest})
    missing = [h for h in hashes if h not in found]
    if missing:
        _log.error(
            "object {bucket_id}/{key} references missing contents {missing}",
            bucket_id=record.bucket_id,
            key=record.key,
            missing=missing,
        )
        raise InternalError("The object's data is not available.")


async def read_slices(
    engine: StorageEngine, slices: Sequence[ContentSlice]
) -> AsyncIterator[bytes]:
    """
    Stream content slices from the storage engine.

    Closing this iterator (a client that went away) closes the engine
    reader it is in, so no more stripes are read or decoded.

    @param engine: the storage engine.
    @param slices: from L{object_slices}.
    @return: the bytes, in order.
    """
    for piece in slices:
        reader = engine.read(piece.content, piece.start, piece.stop)
        try:
            async for chunk in reader:
                if chunk:
                    yield chunk
        finally:
            close = getattr(reader, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()


@dataclass(frozen=True)
class _Selection:
    """
    What a GetObject/HeadObject returns.

    @ivar status: 200 or 206.
    @ivar start: first byte.
    @ivar stop: one past the last byte.
    @ivar headers: the range-specific headers (Content-Range,
        x-amz-mp-parts-count).
    @ivar whole: C{True} when the whole object is returned.
    """

    status: int
    start: int
    stop: int
    headers: tuple[tuple[str, str], ...]
    whole: bool


def _invalid_part_number(record: ObjectRecord, number: int) -> S3Error:
    return InvalidPartNumber(PartNumberRequested=number, ActualPartCount=record.parts_count or 1)


def select(call: S3Call, record: ObjectRecord) -> _Selection:
    """
    Apply C{partNumber} or C{Range} to an object.

    @param call: the GetObject/HeadObject request.
    @param record: the object.
    @return: what to send.
    @raise InvalidRange: (S3) for an unsatisfiable range, with
        C{Content-Range: bytes */size}.
    """
    size = record.size
    part_value = call.query.get("partNumber")
    range_header = call.headers.get("range")
    if part_value is not None:
        number = parse_part_number(part_value)
        if range_header is not None:
            raise InvalidRequest("Cannot specify both Range header and partNumber query parameter")
        bounds = record.part_range(number)
        if bounds is None:
            raise _invalid_part_number(record, number)
        if record.parts_count is None:
            # A simple object is its own single part.
            return _Selection(200, 0, size, (), True)
        start, stop = bounds
        headers: list[tuple[str, str]] = [("x-amz-mp-parts-count", str(record.parts_count))]
        if stop > start:
            headers.append(("Content-Range", f"bytes {start}-{stop - 1}/{size}"))
        return _Selection(206, start, stop, tuple(headers), start == 0 and stop == size)
    try:
        byte_range = parse_range(range_header, size)
    except RangeNotSatisfiable:
        raise InvalidRange(
            headers={"Content-Range": f"bytes */{size}"},
            RangeRequested=range_header,
            ActualObjectSize=size,
        ) from None
    if byte_range is None:
        return _Selection(200, 0, size, (), True)
    return _Selection(
        206,
        byte_range.start,
        byte_range.end + 1,
        (("Content-Range", byte_range.content_range(size)),),
        False,
    )


async def _lookup(call: S3Call) -> ObjectRecord:
    bucket = require_bucket(call)
    check_version_id(call)
    record = await call.service.objects.get_object(bucket.id, call.key)
    if record is None:
        raise NoSuchKey(Key=call.key)
    return record


def _read_headers(
    call: S3Call, record: ObjectRecord, selection: _Selection
) -> list[tuple[str, str]]:
    overrides = mh.response_overrides(call.query, signed=call.auth is not None)
    headers = [
        ("Last-Modified", mh.format_http_date(record.last_modified)),
        ("ETag", mh.quote_etag(record.etag)),
        ("Accept-Ranges", "bytes"),
        ("Content-Length", str(selection.stop - selection.start)),
        *selection.headers,
    ]
    headers += mh.apply_overrides(
        mh.object_headers(record.content_type, record.user_metadata, record.system_metadata),
        overrides,
    )
    if (
        call.headers.get("x-amz-checksum-mode", "").upper() == "ENABLED"
        and selection.whole
        and record.checksums
    ):
        headers += checksum_headers(record.checksums)
    return headers


async def get_object(call: S3Call) -> S3Response:
    """
    GetObject, with conditions, Range or partNumber, and response-*
    overrides; the body streams.

    @param call: the request.
    @return: 200 or 206 with the (partial) body.
    """
    bucket = require_bucket(call)
    check_version_id(call)
    # The object and its contents in one query: one round trip less per
    # GET, and both from one snapshot.
    found = await call.service.objects.get_object_with_contents(bucket.id, call.key)
    if found is None:
        raise NoSuchKey(Key=call.key)
    record, contents = found
    mh.check_read_conditions(call.headers, record.etag, record.last_modified)
    selection = select(call, record)
    headers = _read_headers(call, record, selection)
    check_contents(record, contents)
    slices = object_slices(record, contents, selection.start, selection.stop)
    inline = _inline_bytes(slices)
    if inline is not None:
        # Small objects kept in the metadata are in memory already: one
        # write, without a reader or the streaming machinery.
        return _response(selection.status, headers, inline)
    body = await primed(read_slices(call.service.engine, slices))
    return _response(selection.status, headers, body)


def _inline_bytes(slices: Sequence[ContentSlice]) -> bytes | None:
    """
    @param slices: from L{object_slices}.
    @return: their bytes when every slice is of an inline content (C{b""}
        for none at all), else C{None}.
    """
    pieces = []
    for piece in slices:
        data = piece.content.inline_data
        if data is None:
            return None
        pieces.append(data[piece.start : piece.stop])
    return b"".join(pieces)


async def primed(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes] | bytes:
    """
    Read the first chunk of a body before the response starts.

    A content that cannot be read at all then fails with a proper error
    response (503) instead of a connection cut after the headers.

    @param chunks: the body.
    @return: an iterator giving the same chunks, or C{b""} when the body is
        empty.
    @raise ServiceUnavailable: when the first stripe cannot be rebuilt.
    """
    try:
        first = await chunks.__anext__()
    except StopAsyncIteration:
        return b""
    except ContentUnavailable as error:
        await _close(chunks)
        _log.error("cannot read object data: {error}", error=str(error))
        raise ServiceUnavailable(
            "The object's data cannot be read at the moment; too many shards are unavailable."
        ) from None
    except BaseException:
        await _close(chunks)
        raise

    async def rest() -> AsyncIterator[bytes]:
        try:
            yield first
            async for chunk in chunks:
                yield chunk
        finally:
            await _close(chunks)

    return rest()


async def _close(chunks: AsyncIterator[bytes]) -> None:
    close = getattr(chunks, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


async def head_object(call: S3Call) -> S3Response:
    """
    HeadObject: the headers GetObject would send, without a body.

    @param call: the request.
    @return: 200 or 206.
    """
    record = await _lookup(call)
    mh.check_read_conditions(call.headers, record.etag, record.last_modified)
    selection = select(call, record)
    return _response(selection.status, _read_headers(call, record, selection), None)


# DeleteObject ----------------------------------------------------------------------


async def delete_object(call: S3Call) -> S3Response:
    """
    DeleteObject: 204 whether or not the key existed, as S3 answers.

    @param call: the request.
    @return: 204.
    """
    bucket = require_bucket(call)
    check_version_id(call)
    await call.service.objects.delete_object(bucket.id, call.key)
    call.service.deleted()
    return _response(204, [], None)


# CopyObject ------------------------------------------------------------------------

#: Headers whose presence makes a copy onto itself legal (they change the
#: object's storage class, redirect or encryption attributes).
_SELF_COPY_CHANGES = (
    "x-amz-storage-class",
    "x-amz-website-redirect-location",
    "x-amz-server-side-encryption",
)


async def copy_source(call: S3Call, action: str = "object:read") -> tuple[Bucket, ObjectRecord]:
    """
    Resolve and authorise the source of a CopyObject or UploadPartCopy and
    apply its C{x-amz-copy-source-if-*} conditions.

    @param call: the request.
    @param action: the permission needed on the source.
    @return: the source bucket and object.
    @raise NoSuchBucket: the source bucket does not exist for this tenant.
    @raise NoSuchKey: the source object does not exist.
    @raise PreconditionFailed: a copy-source condition fails.
    """
    source = mh.parse_copy_source(call.headers["x-amz-copy-source"])
    if source.version_id is not None and source.version_id != "null":
        raise InvalidArgument(
            "Invalid version id specified",
            ArgumentName="x-amz-copy-source",
            ArgumentValue=call.headers["x-amz-copy-source"],
        )
    if call.bucket is not None and source.bucket == call.bucket.name:
        bucket = call.bucket
        call.authorize(action, bucket, source.key)
    else:
        # NoSuchBucket, or AccessDenied for another tenant's bucket.
        bucket = await call.lookup_bucket(source.bucket, action, source.key)
    record = await call.service.objects.get_object(bucket.id, source.key)
    if record is None:
        raise NoSuchKey(Key=source.key)
    mh.check_copy_source_conditions(call.headers, record.etag, record.last_modified)
    return bucket, record


async def copy_object(call: S3Call) -> S3Response:
    """
    CopyObject: make C{call.key} a copy of the source object by reference
    (its contents gain a reference; no data is read or re-encoded).

    @param call: the request.
    @return: 200 with a C{CopyObjectResult} document.
    """
    bucket = require_bucket(call)
    mh.check_key(call.key)
    headers = call.headers
    directive = mh.metadata_directive(headers)
    replacement = mh.parse_object_headers(headers) if directive == mh.REPLACE else None
    source_bucket, source = await copy_source(call)
    if (
        source_bucket.id == bucket.id
        and source.key == call.key
        and directive == mh.COPY
        and not any(name in headers for name in _SELF_COPY_CHANGES)
    ):
        raise InvalidRequest(
            "This copy request is illegal because it is trying to copy an object to itself "
            "without changing the object's metadata, storage class, website redirect "
            "location or encryption attributes."
        )
    if source.size > MAX_PUT_SIZE:
        raise InvalidRequest(
            "The specified copy source is larger than the maximum allowable size for a "
            f"copy source: {MAX_PUT_SIZE}"
        )
    condition = write_condition(headers)
    if condition is not None:
        condition(await current_etag(call, bucket, call.key))
    if replacement is not None:
        content_type = replacement.content_type
        user_metadata = replacement.user_metadata
        system_metadata = replacement.system_metadata
    else:
        content_type = source.content_type
        user_metadata = dict(source.user_metadata)
        system_metadata = dict(source.system_metadata)
        storage_class = headers.get("x-amz-storage-class")
        if storage_class is not None:
            system_metadata.pop("x-amz-storage-class", None)
            system_metadata.update(
                mh.parse_object_headers({"x-amz-storage-class": storage_class}).system_metadata
            )
    contents = await object_contents(call, source)
    checksums = dict(source.checksums)
    if "x-amz-checksum-algorithm" in headers:
        algorithm = parse_checksum_algorithm(headers["x-amz-checksum-algorithm"])
        if algorithm not in checksums or checksum_type(checksums[algorithm]) != FULL_OBJECT:
            # Asked for a checksum the source does not have (or only as a
            # composite of parts): read the data once to compute it.
            checksums = {
                algorithm: await compute_checksum(
                    call, object_slices(source, contents, 0, source.size), algorithm
                )
            }
        else:
            checksums = {algorithm: checksums[algorithm]}
    modified = truncate_to_ms(now(call))
    record = ObjectRecord(
        bucket_id=bucket.id,
        key=call.key,
        size=source.size,
        etag=source.etag,
        content_type=content_type,
        user_metadata=user_metadata,
        system_metadata=system_metadata,
        checksums=checksums,
        manifest=list(source.manifest),
        last_modified=modified,
        parts_count=source.parts_count,
    )
    try:
        await call.service.objects.put_object(
            record,
            [contents[content_hash] for content_hash in source.content_hashes],
            require_existing=source.content_hashes,
            condition=condition,
        )
    except ContentMissingError:
        # The source was deleted and its data collected meanwhile.
        raise NoSuchKey(Key=source.key) from None
    result = document("CopyObjectResult")
    result.text("ETag", mh.quote_etag(record.etag))
    result.text("LastModified", mh.format_iso8601(modified))
    checksum_elements(result, record.checksums)
    return _response(200, [("Content-Type", "application/xml")], result.to_bytes())
