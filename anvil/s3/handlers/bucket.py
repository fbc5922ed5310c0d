# -*- test-case-name: tests.integration.test_s3_buckets -*-
"""
Service- and bucket-level S3 operations.

ListBuckets, CreateBucket, HeadBucket, DeleteBucket, GetBucketLocation,
ListObjects (v1), ListObjectsV2, ListObjectVersions (answered as for a
bucket that was never versioned: every object is its only version, with
version id C{null}), DeleteObjects, and the answers clients expect when they
probe bucket configuration Anvil does not keep (versioning, ACLs, CORS,
lifecycle, policy, tagging, ...).

Choices where AWS leaves room or differs by region:

  - CreateBucket of a bucket the caller's tenant already owns is
    C{409 BucketAlreadyOwnedByYou} in every region (AWS answers 200 in
    us-east-1 only, for legacy compatibility; the current documentation of
    the error and the issue both ask for the error).
  - The location constraint must name this node's region; none means
    us-east-1, as on AWS. Unlike AWS, an explicit C{us-east-1} is accepted
    on a us-east-1 node (it is the truth, and several S3 servers accept it).
    A region Anvil knows but this node does not serve is
    C{IllegalLocationConstraintException}; an unknown one is
    C{InvalidLocationConstraint}.
  - Bucket ACLs are those of a bucket with C{BucketOwnerEnforced} object
    ownership (the AWS default since 2023): the owner has FULL_CONTROL and
    canned ACLs other than C{private} / C{bucket-owner-full-control} are
    refused. Making a bucket public is an operator decision
    (C{anvil-admin bucket set-public-access}); object ACLs of a public
    bucket show the AllUsers READ grant.
  - ListBuckets lists the buckets of the caller's tenant that its policies
    allow it to read (C{bucket:read}).
  - The owner shown in listings is the bucket's tenant: ID is the tenant
    id, DisplayName its name.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from anvil.errors import InvalidArgument as DomainInvalidArgument
from anvil.s3.authn import is_allowed
from anvil.s3.checksums import checksum_from_headers
from anvil.s3.dispatch import S3Call, S3Response
from anvil.s3.errors import (
    AccessDenied,
    BucketAlreadyExists,
    BucketAlreadyOwnedByYou,
    BucketNotEmpty,
    IllegalLocationConstraintException,
    InvalidArgument,
    InvalidBucketAclWithObjectOwnership,
    InvalidBucketName,
    InvalidLocationConstraint,
    InvalidRequest,
    KeyTooLongError,
    MalformedXML,
    NoSuchBucket,
    NoSuchBucketPolicy,
    NoSuchCORSConfiguration,
    NoSuchKey,
    NoSuchLifecycleConfiguration,
    NoSuchPublicAccessBlockConfiguration,
    NoSuchTagSet,
    NoSuchVersion,
    NoSuchWebsiteConfiguration,
    ObjectLockConfigurationNotFoundError,
    OwnershipControlsNotFoundError,
    ReplicationConfigurationNotFoundError,
    S3Error,
    S3NotImplemented,
    ServerSideEncryptionConfigurationNotFoundError,
)
from anvil.s3.request import MAX_KEY_BYTES, parse_int
from anvil.s3.xml import XSI_NAMESPACE, Element, document, iso8601, parse_xml

if TYPE_CHECKING:
    from anvil.meta.records import Bucket, ObjectRecord, ObjectSummary

#: Bucket names the node's own endpoints use (C{/ready}, C{/metrics}).
RESERVED_BUCKET_NAMES = frozenset({"ready", "metrics"})

#: The most keys a listing returns, and the default.
MAX_KEYS = 1000

#: The most keys one DeleteObjects request may name.
MAX_DELETE_KEYS = 1000

#: The largest request document accepted at bucket level (DeleteObjects
#: with 1,000 keys of 1,024 bytes, escaped, fits).
MAX_BUCKET_XML = 2 * 1024 * 1024

_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_RESERVED_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_RESERVED_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")

_ALL_USERS = "http://acs.amazonaws.com/groups/global/AllUsers"


def check_bucket_name(name: str) -> None:
    """
    Apply the AWS naming rules for new general purpose buckets, plus
    Anvil's reserved names.

    @param name: the requested name.
    @raise InvalidBucketName: when it breaks a rule.
    """
    problem = _bucket_name_problem(name)
    if problem is not None:
        raise InvalidBucketName(problem, BucketName=name)


def _bucket_name_problem(name: str) -> str | None:
    if name in RESERVED_BUCKET_NAMES:
        return f"The bucket name {name!r} is reserved by Anvil."
    if not _BUCKET_NAME.match(name):
        return (
            "Bucket names must be 3 to 63 characters of lower-case letters, "
            "digits, dots and hyphens, beginning and ending with a letter or digit."
        )
    if ".." in name or ".-" in name or "-." in name:
        return "Bucket names must not contain two adjacent periods, or a period next to a hyphen."
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        pass
    else:
        return "Bucket names must not be formatted as an IP address."
    if name.startswith(_RESERVED_PREFIXES) or name.endswith(_RESERVED_SUFFIXES):
        return "The bucket name uses a reserved prefix or suffix."
    return None


def _xml(root: Element, status: int = 200, headers: Sequence[tuple[str, str]] = ()) -> S3Response:
    return S3Response(
        status, [("Content-Type", "application/xml"), *headers], root.to_bytes()
    )


def _owner(bucket: Bucket) -> tuple[str, str]:
    return str(bucket.tenant_id), bucket.tenant_name


def _owner_element(parent: Element, owner_id: str, name: str) -> None:
    owner = parent.child("Owner")
    owner.text("ID", owner_id)
    owner.text("DisplayName", name)


def _bucket(call: S3Call) -> Bucket:
    if call.bucket is None:
        raise NoSuchBucket(BucketName=call.bucket_name)
    return call.bucket


def _url(value: str) -> str:
    # encoding-type=url: everything but unreserved characters and '/' is
    # percent-encoded (a space is %20, a plus %2B), which decodes the same
    # with unquote and unquote_plus.
    return quote(value.encode("utf-8", "surrogatepass"), safe="/~")


def _encoding_type(call: S3Call) -> bool:
    value = call.query.get("encoding-type")
    if value is None:
        return False
    if value.lower() != "url":
        raise InvalidArgument(
            "Invalid Encoding Method specified in Request",
            ArgumentName="encoding-type",
            ArgumentValue=value,
        )
    return True


def _max_keys(call: S3Call, name: str = "max-keys") -> int:
    value = call.query.get(name)
    if value is None:
        return MAX_KEYS
    number = parse_int(
        value,
        name,
        minimum=0,
        message=f"Provided {name} not an integer or within integer range",
    )
    if number > 2**31 - 1:
        raise InvalidArgument(
            f"Provided {name} not an integer or within integer range",
            ArgumentName=name,
            ArgumentValue=value,
        )
    return min(number, MAX_KEYS)


def _etag(record: ObjectSummary) -> str:
    return f'"{record.etag}"'


def _storage_class(record: ObjectSummary) -> str:
    # Listings read summaries; a storage class other than STANDARD is kept
    # with the object's system metadata when the summary carries it.
    stored: Any = getattr(record, "system_metadata", None) or {}
    return str(getattr(record, "storage_class", None) or stored.get("x-amz-storage-class", "STANDARD"))


# Service level ----------------------------------------------------------------


def _encode_token(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode("utf-8", "surrogatepass")).decode("ascii")


def _decode_token(token: str, name: str = "continuation-token") -> str:
    try:
        padded = token + "=" * (-len(token) % 4)
        value = base64.b64decode(padded.encode("ascii"), altchars=b"-_", validate=True)
        if not value:
            raise ValueError("empty token")
        return value.decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        raise InvalidArgument(
            "The continuation token provided is incorrect",
            ArgumentName=name,
            ArgumentValue=token,
        ) from None


async def list_buckets(call: S3Call) -> S3Response:
    """
    ListBuckets: the buckets of the caller's tenant (that it may read), by
    name, with the optional C{prefix}, C{bucket-region}, C{max-buckets} and
    C{continuation-token} of the current API.
    """
    principal = call.principal
    if principal is None:
        raise AccessDenied()
    prefix = call.query.get("prefix") or ""
    region = call.query.get("bucket-region")
    limit_text = call.query.get("max-buckets")
    limit = None
    if limit_text is not None:
        limit = parse_int(
            limit_text, "max-buckets", minimum=1, maximum=10000,
            message="Argument max-buckets must be an integer between 1 and 10000",
        )
    token = call.query.get("continuation-token")
    after = _decode_token(token) if token else None
    buckets = await call.service.buckets.list_buckets(principal.tenant_id)
    chosen = [
        b
        for b in buckets
        if b.name.startswith(prefix)
        and (region is None or b.region == region)
        and (after is None or b.name > after)
        and is_allowed(principal.policies, "bucket:read", b.name, None)
    ]
    next_token = None
    if limit is not None and len(chosen) > limit:
        chosen = chosen[:limit]
        next_token = _encode_token(chosen[-1].name)
    root = document("ListAllMyBucketsResult")
    _owner_element(root, str(principal.tenant_id), principal.tenant_name)
    listing = root.child("Buckets")
    for bucket in chosen:
        entry = listing.child("Bucket")
        entry.text("Name", bucket.name)
        entry.text("CreationDate", iso8601(bucket.created_at))
        entry.text("BucketRegion", bucket.region)
    root.optional("ContinuationToken", next_token)
    if prefix:
        root.text("Prefix", prefix)
    return _xml(root)


# Bucket lifecycle ---------------------------------------------------------------


async def create_bucket(call: S3Call) -> S3Response:
    """
    CreateBucket with an optional C{CreateBucketConfiguration}.
    """
    name = call.bucket_name or ""
    check_bucket_name(name)
    principal = call.principal
    if principal is None:
        raise AccessDenied()
    acl = call.headers.get("x-amz-acl")
    if acl is not None and acl not in ("private", "bucket-owner-full-control"):
        raise InvalidBucketAclWithObjectOwnership()
    if any(h.startswith("x-amz-grant-") for h in call.headers):
        raise InvalidBucketAclWithObjectOwnership()
    if call.headers.get("x-amz-bucket-object-lock-enabled", "").lower() == "true":
        raise S3NotImplemented("Object Lock is not supported by Anvil")
    ownership = call.headers.get("x-amz-object-ownership")
    if ownership is not None and ownership not in (
        "BucketOwnerEnforced",
        "BucketOwnerPreferred",
        "ObjectWriter",
    ):
        raise InvalidArgument(
            "Invalid x-amz-object-ownership header",
            ArgumentName="x-amz-object-ownership",
            ArgumentValue=ownership,
        )
    body = await call.payload().read_all(MAX_BUCKET_XML)
    constraint = ""
    if body.strip():
        config = parse_xml(body, "CreateBucketConfiguration", MAX_BUCKET_XML)
        constraint = (config.find_text("LocationConstraint") or "").strip()
    await _check_location(call, constraint)

    from anvil.meta.buckets import BucketNameTaken

    try:
        await call.service.buckets.create_bucket(name, principal.tenant_id, call.service.region)
        call.service.bucket_cache.forget(name)
    except DomainInvalidArgument as e:
        raise InvalidBucketName(str(e), BucketName=name) from None
    except BucketNameTaken as taken:
        if taken.owned_by_caller:
            raise BucketAlreadyOwnedByYou(BucketName=name) from None
        raise BucketAlreadyExists(BucketName=name) from None
    return S3Response(200, [("Location", f"/{name}"), ("Content-Length", "0")])


async def _check_location(call: S3Call, constraint: str) -> None:
    region = call.service.region
    requested = constraint or "us-east-1"
    if requested == region:
        return
    known = {r["name"] for r in await call.service.global_store.list_regions()}
    if constraint and constraint not in known:
        raise InvalidLocationConstraint(LocationConstraint=constraint)
    if not constraint:
        raise IllegalLocationConstraintException()
    raise IllegalLocationConstraintException(
        f"The {constraint} location constraint is incompatible for the region "
        "specific endpoint this request was sent to."
    )


async def head_bucket(call: S3Call) -> S3Response:
    """
    HeadBucket: 200 with the bucket's region.
    """
    bucket = _bucket(call)
    return S3Response(
        200,
        [
            ("x-amz-bucket-region", bucket.region),
            ("x-amz-access-point-alias", "false"),
            ("Content-Length", "0"),
        ],
    )


async def get_bucket_location(call: S3Call) -> S3Response:
    """
    GetBucketLocation: the bucket's region; empty for us-east-1, as AWS.
    """
    bucket = _bucket(call)
    root = document("LocationConstraint")
    if bucket.region != "us-east-1":
        root.content(bucket.region)
    return _xml(root)


async def delete_bucket(call: S3Call) -> S3Response:
    """
    DeleteBucket: only an empty bucket (C{BucketNotEmpty}).
    """
    bucket = _bucket(call)
    if not await call.service.objects.bucket_is_empty(bucket.id):
        raise BucketNotEmpty(BucketName=bucket.name)
    await call.service.buckets.delete_bucket(bucket.id)
    call.service.bucket_cache.forget(bucket.name)
    call.service.deleted()
    return S3Response(204)


# Listings -----------------------------------------------------------------------


def _contents(
    parent: Element,
    record: ObjectSummary,
    url: bool,
    owner: tuple[str, str] | None,
    tag: str = "Contents",
    version: bool = False,
) -> None:
    entry = parent.child(tag)
    entry.text("Key", _url(record.key) if url else record.key)
    if version:
        entry.text("VersionId", "null")
        entry.text("IsLatest", "true")
    entry.text("LastModified", iso8601(record.last_modified))
    entry.text("ETag", _etag(record))
    for algorithm in sorted(record.checksums):
        entry.text("ChecksumAlgorithm", algorithm)
    entry.text("Size", record.size)
    if owner is not None and version:
        _owner_element(entry, *owner)
    entry.text("StorageClass", _storage_class(record))
    if owner is not None and not version:
        _owner_element(entry, *owner)


def _prefixes(parent: Element, prefixes: Sequence[str], url: bool) -> None:
    for prefix in prefixes:
        parent.child("CommonPrefixes").text("Prefix", _url(prefix) if url else prefix)


async def _list(
    call: S3Call, prefix: str, delimiter: str, start_after: str, max_keys: int
) -> Any:
    bucket = _bucket(call)
    return await call.service.objects.list_objects(
        bucket.id, prefix, delimiter or None, start_after or None, max_keys
    )


async def list_objects(call: S3Call) -> S3Response:
    """
    ListObjects (version 1). C{NextMarker} is sent only when the listing is
    truncated and a delimiter was given (without one, the client continues
    from the last key), as AWS documents.
    """
    bucket = _bucket(call)
    url = _encoding_type(call)
    max_keys = _max_keys(call)
    prefix = call.query.get("prefix") or ""
    delimiter = call.query.get("delimiter") or ""
    marker = call.query.get("marker") or ""
    result = await _list(call, prefix, delimiter, marker, max_keys)
    encode = _url if url else (lambda v: v)
    root = document("ListBucketResult")
    root.text("Name", bucket.name)
    root.text("Prefix", encode(prefix))
    root.text("Marker", encode(marker))
    if result.is_truncated and delimiter and result.last_key is not None:
        root.text("NextMarker", encode(result.last_key))
    root.text("MaxKeys", max_keys)
    if delimiter:
        root.text("Delimiter", encode(delimiter))
    root.text("IsTruncated", result.is_truncated)
    if url:
        root.text("EncodingType", "url")
    owner = _owner(bucket)
    for record in result.objects:
        _contents(root, record, url, owner)
    _prefixes(root, result.common_prefixes, url)
    return _xml(root)


async def list_objects_v2(call: S3Call) -> S3Response:
    """
    ListObjectsV2: C{continuation-token} (opaque: the base64 of the last
    key or common prefix returned) wins over C{start-after}; C{KeyCount}
    counts keys and common prefixes; C{Owner} only with C{fetch-owner}.
    """
    bucket = _bucket(call)
    url = _encoding_type(call)
    max_keys = _max_keys(call)
    prefix = call.query.get("prefix") or ""
    delimiter = call.query.get("delimiter") or ""
    start_after = call.query.get("start-after")
    token = call.query.get("continuation-token")
    fetch_owner_text = call.query.get("fetch-owner")
    fetch_owner = False
    if fetch_owner_text is not None:
        if fetch_owner_text.lower() not in ("true", "false"):
            raise InvalidArgument(
                "Invalid fetch-owner value",
                ArgumentName="fetch-owner",
                ArgumentValue=fetch_owner_text,
            )
        fetch_owner = fetch_owner_text.lower() == "true"
    if token is not None:
        if not token:
            raise InvalidArgument(
                "The continuation token provided is incorrect",
                ArgumentName="continuation-token",
                ArgumentValue=token,
            )
        position = _decode_token(token)
    else:
        position = start_after or ""
    result = await _list(call, prefix, delimiter, position, max_keys)
    encode = _url if url else (lambda v: v)
    root = document("ListBucketResult")
    root.text("Name", bucket.name)
    root.text("Prefix", encode(prefix))
    root.text("MaxKeys", max_keys)
    root.text("KeyCount", len(result.objects) + len(result.common_prefixes))
    if delimiter:
        root.text("Delimiter", encode(delimiter))
    root.text("IsTruncated", result.is_truncated)
    if url:
        root.text("EncodingType", "url")
    root.optional("ContinuationToken", token)
    if result.is_truncated and result.last_key is not None:
        root.text("NextContinuationToken", _encode_token(result.last_key))
    if start_after is not None:
        root.text("StartAfter", encode(start_after))
    owner = _owner(bucket) if fetch_owner else None
    for record in result.objects:
        _contents(root, record, url, owner)
    _prefixes(root, result.common_prefixes, url)
    return _xml(root)


async def list_object_versions(call: S3Call) -> S3Response:
    """
    ListObjectVersions of a never-versioned bucket: one C{Version} per
    object, version id C{null}, always the latest.
    """
    bucket = _bucket(call)
    url = _encoding_type(call)
    max_keys = _max_keys(call)
    prefix = call.query.get("prefix") or ""
    delimiter = call.query.get("delimiter") or ""
    key_marker = call.query.get("key-marker") or ""
    version_marker = call.query.get("version-id-marker")
    if version_marker is not None and version_marker != "":
        if not key_marker:
            raise InvalidArgument(
                "A version-id marker cannot be specified without a key marker.",
                ArgumentName="version-id-marker",
                ArgumentValue=version_marker,
            )
        if version_marker != "null":
            raise InvalidArgument(
                "Invalid version id specified",
                ArgumentName="version-id-marker",
                ArgumentValue=version_marker,
            )
    # With only one version per key, everything of key_marker has been
    # listed whether or not a version marker was given.
    result = await _list(call, prefix, delimiter, key_marker, max_keys)
    encode = _url if url else (lambda v: v)
    root = document("ListVersionsResult")
    root.text("Name", bucket.name)
    root.text("Prefix", encode(prefix))
    root.text("KeyMarker", encode(key_marker))
    root.text("VersionIdMarker", version_marker or "")
    if result.is_truncated and result.last_key is not None:
        root.text("NextKeyMarker", encode(result.last_key))
        last_is_key = bool(result.objects) and result.objects[-1].key == result.last_key
        if last_is_key:
            root.text("NextVersionIdMarker", "null")
    root.text("MaxKeys", max_keys)
    if delimiter:
        root.text("Delimiter", encode(delimiter))
    root.text("IsTruncated", result.is_truncated)
    if url:
        root.text("EncodingType", "url")
    owner = _owner(bucket)
    for record in result.objects:
        _contents(root, record, url, owner, tag="Version", version=True)
    _prefixes(root, result.common_prefixes, url)
    return _xml(root)


# DeleteObjects --------------------------------------------------------------------


async def delete_objects(call: S3Call) -> S3Response:
    """
    DeleteObjects: up to 1,000 keys; C{Content-MD5} or an
    C{x-amz-checksum-*} is required (AWS: "The Content-MD5 or
    x-amz-sdk-checksum-algorithm header is required"). Each key is
    authorised (C{object:delete}) and reported on its own; a missing key
    counts as deleted.
    """
    bucket = _bucket(call)
    if "content-md5" not in call.headers and checksum_from_headers(call.headers) is None:
        raise InvalidRequest("Missing required header for this request: Content-MD5")
    body = await call.payload().read_all(MAX_BUCKET_XML)
    request = parse_xml(body, "Delete", MAX_BUCKET_XML)
    quiet_text = request.find_text("Quiet")
    quiet = False
    if quiet_text is not None:
        if quiet_text.strip().lower() not in ("true", "false"):
            raise MalformedXML()
        quiet = quiet_text.strip().lower() == "true"
    entries: list[tuple[str, str | None]] = []
    for node in request.children("Object"):
        key_node = node.find("Key")
        if key_node is None:
            raise MalformedXML()
        # Key text is taken verbatim: spaces are part of keys.
        entries.append((key_node.raw, node.find_text("VersionId")))
    if not entries or len(entries) > MAX_DELETE_KEYS:
        raise MalformedXML()

    root = document("DeleteResult")
    deleted: list[tuple[str, str | None]] = []
    errors: list[tuple[str, str | None, S3Error]] = []
    to_delete: list[tuple[str, str | None]] = []
    for key, version in entries:
        try:
            if not key:
                raise InvalidArgument("Key must not be empty")
            if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
                raise KeyTooLongError()
            if version is not None and version != "null":
                raise NoSuchVersion()
            call.authorize("object:delete", bucket, key)
        except S3Error as refused:
            errors.append((key, version, refused))
            continue
        to_delete.append((key, version))
    objects = call.service.objects
    batch = getattr(objects, "delete_objects", None)
    if batch is not None and to_delete:
        await batch(bucket.id, [key for key, _ in to_delete])
    else:
        for key, _ in to_delete:
            await objects.delete_object(bucket.id, key)
    if to_delete:
        call.service.deleted()
    deleted = to_delete
    if not quiet:
        for key, version in deleted:
            entry = root.child("Deleted")
            entry.text("Key", key)
            entry.optional("VersionId", version)
    for key, version, failure in errors:
        entry = root.child("Error")
        entry.text("Key", key)
        entry.optional("VersionId", version)
        entry.text("Code", failure.code)
        entry.text("Message", failure.message)
    return _xml(root)


# Probes of configuration Anvil does not keep ---------------------------------------


async def get_bucket_versioning(call: S3Call) -> S3Response:
    """GetBucketVersioning: never enabled, so an empty configuration."""
    _bucket(call)
    return _xml(document("VersioningConfiguration"))


def _acl(owner: tuple[str, str], public: bool) -> Element:
    root = document("AccessControlPolicy")
    _owner_element(root, *owner)
    grants = root.child("AccessControlList")
    grant = grants.child("Grant")
    grantee = grant.child(
        "Grantee", {"xmlns:xsi": XSI_NAMESPACE, "xsi:type": "CanonicalUser"}
    )
    grantee.text("ID", owner[0])
    grantee.text("DisplayName", owner[1])
    grant.text("Permission", "FULL_CONTROL")
    if public:
        grant = grants.child("Grant")
        grantee = grant.child("Grantee", {"xmlns:xsi": XSI_NAMESPACE, "xsi:type": "Group"})
        grantee.text("URI", _ALL_USERS)
        grant.text("Permission", "READ")
    return root


async def get_bucket_acl(call: S3Call) -> S3Response:
    """GetBucketAcl: the owner has FULL_CONTROL."""
    bucket = _bucket(call)
    return _xml(_acl(_owner(bucket), False))


async def _object(call: S3Call) -> ObjectRecord:
    bucket = _bucket(call)
    version = call.query.get("versionId")
    if version is not None and version != "null":
        raise NoSuchVersion(Key=call.key, VersionId=version)
    record = await call.service.objects.get_object(bucket.id, call.key)
    if record is None:
        raise NoSuchKey(Key=call.key)
    return record


async def get_object_acl(call: S3Call) -> S3Response:
    """GetObjectAcl: owner FULL_CONTROL, and AllUsers READ in a public bucket."""
    bucket = _bucket(call)
    await _object(call)
    return _xml(_acl(_owner(bucket), bucket.public))


async def get_object_tagging(call: S3Call) -> S3Response:
    """GetObjectTagging: objects have no tags in Anvil."""
    await _object(call)
    root = document("Tagging")
    root.child("TagSet")
    return _xml(root)


async def delete_object_tagging(call: S3Call) -> S3Response:
    """DeleteObjectTagging: nothing to delete; 204 for an existing object."""
    await _object(call)
    return S3Response(204)


async def get_bucket_policy_status(call: S3Call) -> S3Response:
    """GetBucketPolicyStatus: public when anonymous reads are allowed."""
    bucket = _bucket(call)
    root = document("PolicyStatus")
    root.text("IsPublic", bucket.public)
    return _xml(root)


async def get_bucket_logging(call: S3Call) -> S3Response:
    """GetBucketLogging: logging is off."""
    _bucket(call)
    return _xml(document("BucketLoggingStatus"))


async def get_bucket_notification(call: S3Call) -> S3Response:
    """GetBucketNotificationConfiguration: no notifications."""
    _bucket(call)
    return _xml(document("NotificationConfiguration"))


async def get_bucket_request_payment(call: S3Call) -> S3Response:
    """GetBucketRequestPayment: the owner pays."""
    _bucket(call)
    root = document("RequestPaymentConfiguration")
    root.text("Payer", "BucketOwner")
    return _xml(root)


async def get_bucket_accelerate(call: S3Call) -> S3Response:
    """GetBucketAccelerateConfiguration: never configured."""
    _bucket(call)
    return _xml(document("AccelerateConfiguration"))


def _missing(error: type[S3Error]) -> Any:
    async def handler(call: S3Call) -> S3Response:
        bucket = _bucket(call)
        raise error(BucketName=bucket.name)

    handler.__doc__ = f"Anvil keeps no such configuration: {error.code}."
    return handler


get_bucket_cors = _missing(NoSuchCORSConfiguration)
get_bucket_lifecycle = _missing(NoSuchLifecycleConfiguration)
get_bucket_policy = _missing(NoSuchBucketPolicy)
get_bucket_tagging = _missing(NoSuchTagSet)
get_bucket_encryption = _missing(ServerSideEncryptionConfigurationNotFoundError)
get_bucket_website = _missing(NoSuchWebsiteConfiguration)
get_bucket_replication = _missing(ReplicationConfigurationNotFoundError)
get_object_lock_configuration = _missing(ObjectLockConfigurationNotFoundError)
get_bucket_ownership_controls = _missing(OwnershipControlsNotFoundError)
get_public_access_block = _missing(NoSuchPublicAccessBlockConfiguration)


async def delete_bucket_configuration(call: S3Call) -> S3Response:
    """
    DeleteBucketCors, DeleteBucketPolicy, ...: Anvil keeps none of these,
    so there is nothing to delete: 204, as AWS answers for a bucket without
    the configuration.
    """
    _bucket(call)
    return S3Response(204)
