# -*- test-case-name: tests.test_s3_multipart -*-
"""
Multipart uploads: CreateMultipartUpload, UploadPart, UploadPartCopy,
CompleteMultipartUpload, AbortMultipartUpload, ListParts and
ListMultipartUploads.

Every part is a content of its own, written and verified exactly like a
PutObject body (L{anvil.s3.handlers.object.receive_content}) and
referenced by the upload's part row. Completing an upload writes no data:
the object's manifest lists the parts' contents in order, and the object
row takes over their references (L{anvil.meta.objects.ObjectStore.complete_upload}).

Checksums: an upload created with C{x-amz-checksum-algorithm} gets that
checksum for every part (verified when the part declares it, computed
otherwise) and, at completion, a C{COMPOSITE} checksum (the checksum of the
concatenated part checksums, C{-N}) or a C{FULL_OBJECT} CRC combined from
the part CRCs, as the upload's C{x-amz-checksum-type} says.

UploadPartCopy references the source content when it copies a whole
single-content object whose checksum is known; otherwise (a byte range, a
multipart source) the bytes are streamed from the engine through a new
writer, stripe by stripe.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from twisted.logger import Logger

from anvil.meta.objects import (
    ContentMissingError,
    EntityTooSmallError,
    InvalidPartError,
    InvalidPartOrderError,
    NoSuchUploadError,
)
from anvil.meta.records import Part, truncate_to_ms
from anvil.s3 import metadata_headers as mh
from anvil.s3.checksums import (
    COMPOSITE,
    FULL_OBJECT,
    KNOWN_ALGORITHMS,
    b64,
    composite_checksum,
    full_object_checksum,
    header_name,
    new_hasher,
    parse_checksum_algorithm,
    parse_checksum_type,
)
from anvil.s3.dispatch import S3Response
from anvil.s3.errors import (
    BadDigest,
    EntityTooSmall,
    InvalidArgument,
    InvalidPart,
    InvalidPartOrder,
    InvalidRequest,
    MalformedXML,
    NoSuchKey,
    NoSuchUpload,
)
from anvil.s3.handlers.object import (
    MAX_PART_SIZE,
    StagedContent,
    _abort,
    _check_body_size,
    _response,
    checksum_elements,
    checksum_headers,
    commit_content,
    copy_source,
    current_etag,
    finished_md5,
    now,
    object_contents,
    object_slices,
    parse_part_number,
    read_slices,
    receive_content,
    require_bucket,
    write_condition,
)
from anvil.s3.xml import Element, document, parse_xml

if TYPE_CHECKING:
    from anvil.meta.records import Bucket, Upload
    from anvil.s3.dispatch import S3Call

_log = Logger()

#: Every part but the last must be at least this large (5 MiB).
MIN_PART_SIZE = 5 * 1024 * 1024
#: The most parts ListParts returns in one page (and the default).
MAX_PARTS_PAGE = 1000
#: The most uploads ListMultipartUploads returns in one page.
MAX_UPLOADS_PAGE = 1000
#: The largest CompleteMultipartUpload document accepted: 10,000 parts with
#: an ETag and a checksum each fit easily.
MAX_COMPLETE_XML = 4 * 1024 * 1024

# Keys of Upload.metadata.
_CONTENT_TYPE = "content_type"
_USER = "user_metadata"
_SYSTEM = "system_metadata"
_ALGORITHM = "checksum_algorithm"
_CHECKSUM_TYPE = "checksum_type"
_INITIATOR = "initiator"


def _xml(root: Element, status: int = 200, headers: Sequence[tuple[str, str]] = ()) -> S3Response:
    return _response(status, [("Content-Type", "application/xml"), *headers], root.to_bytes())


def _owner(call: S3Call) -> tuple[str, str]:
    """
    @return: the C{(ID, DisplayName)} shown as owner and initiator: the
        bucket's tenant.
    """
    bucket = call.bucket
    if bucket is not None:
        return str(bucket.tenant_id), bucket.tenant_name
    principal = call.principal
    if principal is not None:
        return str(principal.tenant_id), principal.tenant_name
    return "anonymous", "anonymous"


def _owner_elements(parent: Any, call: S3Call, initiator: Mapping[str, str] | None = None) -> None:
    owner_id, owner_name = _owner(call)
    who = parent.child("Initiator")
    who.text("ID", (initiator or {}).get("id", owner_id))
    who.text("DisplayName", (initiator or {}).get("name", owner_name))
    owner = parent.child("Owner")
    owner.text("ID", owner_id)
    owner.text("DisplayName", owner_name)


async def _upload(call: S3Call, bucket: Bucket) -> Upload:
    """
    Find the upload named by C{uploadId} for this bucket and key.

    @raise NoSuchUpload: when it does not exist, is finished, or belongs to
        another bucket or key.
    """
    upload_id = call.query.get("uploadId") or ""
    upload = await call.service.objects.get_upload(upload_id) if upload_id else None
    if upload is None or upload.bucket_id != bucket.id or upload.key != call.key:
        raise NoSuchUpload(UploadId=upload_id)
    return upload


def _upload_algorithm(upload: Upload) -> str | None:
    value = upload.metadata.get(_ALGORITHM)
    return str(value) if value else None


def _translate(error: Exception, upload_id: str) -> Exception:
    """
    Map the object store's multipart exceptions onto S3 errors.

    @param error: what the store raised.
    @param upload_id: the upload concerned.
    @return: the S3 error to raise (or C{error} itself when it is not a
        multipart exception).
    """
    if isinstance(error, NoSuchUploadError):
        return NoSuchUpload(UploadId=upload_id)
    if isinstance(error, InvalidPartError):
        return InvalidPart(UploadId=upload_id, PartNumber=error.part_number)
    if isinstance(error, InvalidPartOrderError):
        return InvalidPartOrder(UploadId=upload_id, PartNumber=error.part_number)
    if isinstance(error, EntityTooSmallError):
        return EntityTooSmall(
            ProposedSize=error.size, MinSizeAllowed=error.minimum, PartNumber=error.part_number
        )
    return error


# CreateMultipartUpload ------------------------------------------------------------


async def create_multipart_upload(call: S3Call) -> S3Response:
    """
    CreateMultipartUpload (C{POST /bucket/key?uploads}).

    @param call: the request.
    @return: 200 with C{InitiateMultipartUploadResult}.
    """
    bucket = require_bucket(call)
    mh.check_key(call.key)
    headers = call.headers
    stored = mh.parse_object_headers(headers)
    metadata: dict[str, Any] = {
        _CONTENT_TYPE: stored.content_type,
        _USER: stored.user_metadata,
        _SYSTEM: stored.system_metadata,
    }
    response_headers: list[tuple[str, str]] = []
    algorithm_header = headers.get("x-amz-checksum-algorithm")
    if algorithm_header is not None:
        algorithm = parse_checksum_algorithm(algorithm_header)
        kind = parse_checksum_type(headers.get("x-amz-checksum-type"), algorithm)
        metadata[_ALGORITHM] = algorithm
        metadata[_CHECKSUM_TYPE] = kind
        response_headers += [
            ("x-amz-checksum-algorithm", algorithm),
            ("x-amz-checksum-type", kind),
        ]
    elif "x-amz-checksum-type" in headers:
        raise InvalidRequest(
            "The x-amz-checksum-type header can only be used with the x-amz-checksum-algorithm header."
        )
    principal = call.principal
    if principal is not None:
        metadata[_INITIATOR] = {"id": str(principal.app_id), "name": principal.app_name}
    upload = await call.service.objects.create_upload(bucket.id, call.key, metadata)
    result = document("InitiateMultipartUploadResult")
    result.text("Bucket", bucket.name)
    result.text("Key", call.key)
    result.text("UploadId", upload.upload_id)
    return _xml(result, headers=response_headers)


# UploadPart / UploadPartCopy -------------------------------------------------------


def _check_part_checksum(call: S3Call, algorithm: str | None) -> None:
    """
    A part of an upload with a checksum algorithm may only declare that
    algorithm.

    @raise InvalidRequest: for another algorithm.
    """
    if algorithm is None:
        return
    for other in KNOWN_ALGORITHMS:
        declared = header_name(other) in call.headers or call.headers.get(
            "x-amz-trailer", ""
        ).strip().lower() == header_name(other)
        if declared and other != algorithm:
            raise InvalidRequest(
                "Checksum Type mismatch occurred, expected checksum Type: "
                f"{algorithm.lower()}, actual checksum Type: {other.lower()}"
            )


async def _store_part(call: S3Call, upload: Upload, number: int, staged: StagedContent) -> Part:
    """
    Commit a staged part content and record it as part C{number}.

    @return: the part record.
    @raise NoSuchUpload: the upload was completed or aborted meanwhile.
    """
    part = Part(
        part_number=number,
        content_hash=staged.content.hash,
        size=staged.content.size,
        etag=staged.md5_hex,
        checksums=staged.checksums,
        last_modified=truncate_to_ms(now(call)),
    )

    async def write(require_existing: bool) -> None:
        await call.service.objects.put_part(
            upload.upload_id, part, staged.content, require_existing=require_existing
        )

    try:
        await commit_content(call, staged, write)
    except NoSuchUploadError as error:
        raise _translate(error, upload.upload_id) from None
    return part


async def upload_part(call: S3Call) -> S3Response:
    """
    UploadPart (C{PUT /bucket/key?partNumber=N&uploadId=ID}).

    @param call: the request.
    @return: 200 with the part's ETag (and checksum).
    """
    if "x-amz-copy-source" in call.headers:
        return await upload_part_copy(call)
    bucket = require_bucket(call)
    number = parse_part_number(call.query.get("partNumber") or "")
    upload = await _upload(call, bucket)
    _check_body_size(call.headers, MAX_PART_SIZE)
    algorithm = _upload_algorithm(upload)
    _check_part_checksum(call, algorithm)
    staged = await receive_content(call, also_compute=algorithm)
    part = await _store_part(call, upload, number, staged)
    return _response(200, [("ETag", mh.quote_etag(part.etag)), *checksum_headers(part.checksums)])


class _ChecksumHasher:
    """An extra engine hasher computing one checksum of copied bytes."""

    def __init__(self, algorithm: str) -> None:
        self.algorithm = algorithm
        self._hasher = new_hasher(algorithm)

    def update(self, data: bytes | memoryview) -> None:
        """@param data: the next bytes."""
        self._hasher.update(data)

    def value(self) -> str:
        """@return: the base64 checksum."""
        return b64(self._hasher.digest())


async def upload_part_copy(call: S3Call) -> S3Response:
    """
    UploadPartCopy: a part copied from (a range of) an existing object.

    @param call: the request.
    @return: 200 with C{CopyPartResult}.
    """
    bucket = require_bucket(call)
    number = parse_part_number(call.query.get("partNumber") or "")
    upload = await _upload(call, bucket)
    _, source = await copy_source(call)
    selected = mh.parse_copy_source_range(call.headers.get("x-amz-copy-source-range"), source.size)
    start, stop = selected if selected is not None else (0, source.size)
    if stop - start > MAX_PART_SIZE:
        raise InvalidRequest(
            "The specified copy source is larger than the maximum allowable size for a "
            f"copy source: {MAX_PART_SIZE}"
        )
    algorithm = _upload_algorithm(upload)
    contents = await object_contents(call, source)
    slices = object_slices(source, contents, start, stop)

    staged: StagedContent | None = None
    whole_single = (
        source.parts_count is None
        and len(source.manifest) == 1
        and len(slices) == 1
        and slices[0].start == 0
        and slices[0].stop == slices[0].content.size
    )
    known_checksum = algorithm is None or (
        algorithm in source.checksums and "-" not in source.checksums[algorithm]
    )
    if whole_single and known_checksum:
        # The part is exactly the source's content: take a reference.
        content = slices[0].content
        checksums = {algorithm: source.checksums[algorithm]} if algorithm else {}
        part = Part(
            part_number=number,
            content_hash=content.hash,
            size=content.size,
            etag=source.etag,
            checksums=checksums,
            last_modified=truncate_to_ms(now(call)),
        )
        try:
            await call.service.objects.put_part(
                upload.upload_id, part, content, require_existing=True
            )
        except NoSuchUploadError as error:
            raise _translate(error, upload.upload_id) from None
        except ContentMissingError:
            # The source was deleted and collected meanwhile.
            raise NoSuchKey(Key=source.key) from None
    else:
        hasher = _ChecksumHasher(algorithm) if algorithm else None
        writer = call.service.engine.new_writer(extra_hashers=[hasher] if hasher else [])
        try:
            async for chunk in read_slices(call.service.engine, slices):
                await writer.write(chunk)
            content = await writer.finish()
        except BaseException:
            await _abort(writer)
            raise
        staged = StagedContent(
            content,
            finished_md5(writer),
            {hasher.algorithm: hasher.value()} if hasher else {},
            writer,
        )
        part = await _store_part(call, upload, number, staged)
    result = document("CopyPartResult")
    result.text("ETag", mh.quote_etag(part.etag))
    result.text("LastModified", mh.format_iso8601(part.last_modified))
    checksum_elements(result, part.checksums, with_type=False)
    return _xml(result)


# CompleteMultipartUpload -----------------------------------------------------------


def parse_complete_request(body: bytes) -> list[tuple[int, str, dict[str, str]]]:
    """
    Parse a C{CompleteMultipartUpload} document.

    @param body: the request body.
    @return: C{(part number, ETag without quotes, {algorithm: checksum})}
        for each C{<Part>}, in document order.
    @raise MalformedXML: for a document that is not well-formed, has no
        part, or a part without a number or ETag.
    @raise InvalidArgument: for a part number outside [1, 10000].
    """
    root = parse_xml(body, "CompleteMultipartUpload", max_size=MAX_COMPLETE_XML)
    parts: list[tuple[int, str, dict[str, str]]] = []
    for node in root.children("Part"):
        number_text = node.find_text("PartNumber")
        etag = node.find_text("ETag")
        if number_text is None or etag is None:
            raise MalformedXML()
        text = number_text.strip()
        if not text.isascii() or not text.lstrip("-").isdigit():
            raise MalformedXML()
        number = int(text)
        if not 1 <= number <= 10000:
            raise InvalidArgument(
                "Part number must be an integer between 1 and 10000, inclusive",
                ArgumentName="partNumber",
                ArgumentValue=text,
            )
        checksums = {}
        for algorithm in KNOWN_ALGORITHMS:
            value = node.find_text("Checksum" + algorithm)
            if value:
                checksums[algorithm] = value.strip()
        parts.append((number, etag.strip().strip('"'), checksums))
    if not parts:
        raise MalformedXML()
    return parts


async def _all_parts(call: S3Call, upload_id: str) -> dict[int, Part]:
    """
    @return: every part of an upload, by number.
    @raise NoSuchUpload: when the upload is not in progress.
    """
    found: dict[int, Part] = {}
    marker = 0
    while True:
        try:
            page = await call.service.objects.list_parts(upload_id, marker, MAX_PARTS_PAGE)
        except NoSuchUploadError as error:
            raise _translate(error, upload_id) from None
        for part in page.parts:
            found[part.part_number] = part
        if not page.is_truncated or page.next_part_number_marker is None:
            return found
        marker = page.next_part_number_marker


def _completed_checksum(
    upload: Upload,
    requested: Sequence[tuple[int, str, dict[str, str]]],
    parts: Mapping[int, Part],
) -> dict[str, str]:
    """
    The checksum of the object an upload completes to.

    @param upload: the upload.
    @param requested: the parts listed in the request.
    @param parts: the stored parts by number.
    @return: C{{algorithm: value}}, empty when the upload has no algorithm.
    @raise InvalidPart: a listed part's checksum differs from the stored one,
        or the part lacks the upload's checksum.
    """
    algorithm = _upload_algorithm(upload)
    for number, _, given in requested:
        part = parts.get(number)
        if part is None:
            continue  # complete_upload reports the missing part
        for name, value in given.items():
            if part.checksums.get(name) != value:
                raise InvalidPart(PartNumber=number)
    if algorithm is None:
        return {}
    values: list[tuple[str, int]] = []
    for number, _, _ in requested:
        part = parts.get(number)
        if part is None:
            return {}
        found = part.checksums.get(algorithm)
        if found is None:
            raise InvalidPart(
                f"The upload was created using a {algorithm.lower()} checksum. The complete "
                f"request referenced parts without a {algorithm.lower()} checksum.",
                PartNumber=number,
            )
        values.append((found, part.size))
    kind = str(upload.metadata.get(_CHECKSUM_TYPE) or COMPOSITE)
    if kind == FULL_OBJECT:
        return {algorithm: full_object_checksum(algorithm, values)}
    return {algorithm: composite_checksum(algorithm, [value for value, _ in values])}


async def complete_multipart_upload(call: S3Call) -> S3Response:
    """
    CompleteMultipartUpload (C{POST /bucket/key?uploadId=ID}).

    @param call: the request.
    @return: 200 with C{CompleteMultipartUploadResult}.
    """
    bucket = require_bucket(call)
    upload = await _upload(call, bucket)
    # x-amz-checksum-* on this request is the object's checksum, not the
    # XML body's: only the signature is checked on the body.
    body = await call.payload(verify_checksums=False).read_all(MAX_COMPLETE_XML)
    requested = parse_complete_request(body)
    numbers = [number for number, _, _ in requested]
    if any(b <= a for a, b in pairwise(numbers)):
        raise InvalidPartOrder(UploadId=upload.upload_id)
    condition = write_condition(call.headers)
    if condition is not None:
        condition(await current_etag(call, bucket, call.key))
    parts = await _all_parts(call, upload.upload_id)
    checksums = _completed_checksum(upload, requested, parts)
    expected = _expected_full_checksum(call, upload)
    if expected is not None:
        algorithm, value = expected
        if checksums.get(algorithm) != value:
            raise BadDigest(
                f"The {algorithm.lower()} you specified did not match the calculated checksum."
            )
    try:
        record = await call.service.objects.complete_upload(
            upload.upload_id,
            [(number, etag) for number, etag, _ in requested],
            min_part_size=MIN_PART_SIZE,
            checksums=checksums,
            condition=condition,
        )
    except (
        NoSuchUploadError,
        InvalidPartError,
        InvalidPartOrderError,
        EntityTooSmallError,
    ) as error:
        raise _translate(error, upload.upload_id) from None
    result = document("CompleteMultipartUploadResult")
    result.text("Location", _location(call, bucket))
    result.text("Bucket", bucket.name)
    result.text("Key", call.key)
    result.text("ETag", mh.quote_etag(record.etag))
    checksum_elements(result, record.checksums or checksums)
    return _xml(result)


def _expected_full_checksum(call: S3Call, upload: Upload) -> tuple[str, str] | None:
    """
    The whole-object checksum a CompleteMultipartUpload request may carry
    in an C{x-amz-checksum-<alg>} header, to be checked against the result.
    """
    for algorithm in KNOWN_ALGORITHMS:
        value = call.headers.get(header_name(algorithm))
        if value is not None:
            return algorithm, value.strip()
    return None


def _location(call: S3Call, bucket: Bucket) -> str:
    """
    @return: the URL of the completed object, as the client addressed the
        service.
    """
    host = call.headers.get("host", "")
    secure = bool(getattr(call.request, "isSecure", lambda: False)())
    scheme = "https" if secure else "http"
    return f"{scheme}://{host}/{quote(bucket.name)}/{quote(call.key, safe='/')}"


# AbortMultipartUpload --------------------------------------------------------------


async def abort_multipart_upload(call: S3Call) -> S3Response:
    """
    AbortMultipartUpload (C{DELETE /bucket/key?uploadId=ID}).

    @param call: the request.
    @return: 204.
    """
    bucket = require_bucket(call)
    upload = await _upload(call, bucket)
    try:
        await call.service.objects.abort_upload(upload.upload_id)
    except NoSuchUploadError as error:
        raise _translate(error, upload.upload_id) from None
    call.service.deleted()
    return _response(204, [], None)


# ListParts -------------------------------------------------------------------------


def _page_size(call: S3Call, name: str, limit: int) -> int:
    value = call.query.get(name)
    if value is None:
        return limit
    from anvil.s3.request import parse_int

    number = parse_int(value, name, minimum=0)
    return min(number, limit)


async def list_parts(call: S3Call) -> S3Response:
    """
    ListParts (C{GET /bucket/key?uploadId=ID}).

    @param call: the request.
    @return: 200 with C{ListPartsResult}.
    """
    bucket = require_bucket(call)
    upload = await _upload(call, bucket)
    max_parts = _page_size(call, "max-parts", MAX_PARTS_PAGE)
    marker_text = call.query.get("part-number-marker")
    marker = 0
    if marker_text:
        from anvil.s3.request import parse_int

        marker = parse_int(marker_text, "part-number-marker", minimum=0)
    if max_parts == 0:
        parts: list[Part] = []
        truncated = False
    else:
        try:
            page = await call.service.objects.list_parts(upload.upload_id, marker, max_parts)
        except NoSuchUploadError as error:
            raise _translate(error, upload.upload_id) from None
        parts, truncated = page.parts, page.is_truncated
    result = document("ListPartsResult")
    result.text("Bucket", bucket.name)
    result.text("Key", call.key)
    result.text("UploadId", upload.upload_id)
    _owner_elements(result, call, upload.metadata.get(_INITIATOR))
    result.text(
        "StorageClass", upload.metadata.get(_SYSTEM, {}).get("x-amz-storage-class", "STANDARD")
    )
    result.text("PartNumberMarker", marker)
    if parts:
        result.text("NextPartNumberMarker", parts[-1].part_number)
    result.text("MaxParts", max_parts)
    result.text("IsTruncated", truncated)
    for part in parts:
        element = result.child("Part")
        element.text("PartNumber", part.part_number)
        element.text("LastModified", mh.format_iso8601(part.last_modified))
        element.text("ETag", mh.quote_etag(part.etag))
        element.text("Size", part.size)
        checksum_elements(element, part.checksums, with_type=False)
    algorithm = _upload_algorithm(upload)
    if algorithm is not None:
        result.text("ChecksumAlgorithm", algorithm)
        result.text("ChecksumType", upload.metadata.get(_CHECKSUM_TYPE) or COMPOSITE)
    return _xml(result)


# ListMultipartUploads --------------------------------------------------------------


def _encode(value: str, url: bool) -> str:
    # As ListObjects does: only unreserved characters and "/" stay bare.
    return quote(value.encode("utf-8", "surrogatepass"), safe="/~") if url else value


async def list_multipart_uploads(call: S3Call) -> S3Response:
    """
    ListMultipartUploads (C{GET /bucket?uploads}).

    @param call: the request.
    @return: 200 with C{ListMultipartUploadsResult}.
    """
    bucket = require_bucket(call)
    query = call.query
    encoding = query.get("encoding-type")
    if encoding is not None and encoding != "url":
        raise InvalidArgument(
            "Invalid Encoding Method specified in Request",
            ArgumentName="encoding-type",
            ArgumentValue=encoding,
        )
    url = encoding == "url"
    prefix = query.get("prefix") or ""
    delimiter = query.get("delimiter") or ""
    key_marker = query.get("key-marker") or ""
    upload_id_marker = query.get("upload-id-marker") or ""
    if not key_marker:
        # S3 ignores upload-id-marker without key-marker.
        upload_id_marker = ""
    max_uploads = _page_size(call, "max-uploads", MAX_UPLOADS_PAGE)
    page = await call.service.objects.list_uploads(
        bucket.id, prefix, delimiter or None, key_marker, upload_id_marker, max_uploads
    )
    uploads = page.uploads
    prefixes = page.common_prefixes
    truncated = page.is_truncated
    result = document("ListMultipartUploadsResult")
    result.text("Bucket", bucket.name)
    result.text("KeyMarker", _encode(key_marker, url))
    result.text("UploadIdMarker", upload_id_marker)
    if truncated:
        result.text("NextKeyMarker", _encode(page.next_key_marker or "", url))
        result.text("NextUploadIdMarker", page.next_upload_id_marker or "")
    if delimiter:
        result.text("Delimiter", _encode(delimiter, url))
    if prefix:
        result.text("Prefix", _encode(prefix, url))
    result.text("MaxUploads", max_uploads)
    result.text("IsTruncated", truncated)
    for upload in uploads:
        element = result.child("Upload")
        element.text("Key", _encode(upload.key, url))
        element.text("UploadId", upload.upload_id)
        _owner_elements(element, call, upload.metadata.get(_INITIATOR))
        element.text(
            "StorageClass",
            upload.metadata.get(_SYSTEM, {}).get("x-amz-storage-class", "STANDARD"),
        )
        element.text("Initiated", mh.format_iso8601(upload.created_at))
        algorithm = _upload_algorithm(upload)
        if algorithm is not None:
            element.text("ChecksumAlgorithm", algorithm)
            element.text("ChecksumType", upload.metadata.get(_CHECKSUM_TYPE) or COMPOSITE)
    for common in prefixes:
        result.child("CommonPrefixes").text("Prefix", _encode(common, url))
    if url:
        result.text("EncodingType", "url")
    return _xml(result)
