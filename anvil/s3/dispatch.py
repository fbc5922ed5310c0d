# -*- test-case-name: tests.test_s3_dispatch -*-
"""
The S3 operation table and the handler contract.

Every S3 request is classified by one explicit table (as Swift's
C{S3Request.controller} does) on three things: the I{level} it addresses
(C{service} for C{/}, C{bucket}, C{object}), its I{method}, and the set of
I{sub-resource} query parameters it carries (C{?acl}, C{?uploads},
C{?uploadId}, ...; other parameters such as C{prefix} or C{versionId} do not
select an operation). Each row names the operation (also the metric label),
the handler and the policy action checked before the handler runs.

  - no row for the level and method: C{405 MethodNotAllowed} (with C{Allow});
  - rows for the method, none for the sub-resources: C{501 NotImplemented};

so an unknown sub-resource is never a 500.

Handlers
========
A handler is C{async def handler(call: S3Call) -> S3Response}. It raises
L{anvil.s3.errors.S3Error} subclasses for S3 errors; anything else becomes
a logged C{InternalError}. The resource layer (L{anvil.s3.resource}) has
already authenticated the request, looked the bucket up (C{NoSuchBucket}
unless the operation creates it) and checked the row's policy action for
the addressed bucket and key, including tenant isolation.

Handlers of object operations live in L{anvil.s3.handlers.object} and
L{anvil.s3.handlers.multipart}; they are resolved by name when first used,
and an operation whose handler does not exist (yet) answers
C{NotImplemented}.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.logger import Logger

from anvil.s3.authn import (
    BufferedBody,
    PayloadReader,
    Principal,
    authorize,
)
from anvil.s3.errors import MethodNotAllowed, NoSuchBucket, S3NotImplemented
from anvil.s3.request import Address, Query
from anvil.s3.sigv4 import VerifiedAuth

if TYPE_CHECKING:
    from anvil.meta.records import Bucket
    from anvil.s3.service import S3Service


@dataclass
class S3Response:
    """
    What a handler answers.

    @ivar status: the HTTP status.
    @ivar headers: response headers, in order (a name may repeat).
    @ivar body: the body: bytes (C{Content-Length} is set from it, and an
        XML C{Content-Type} unless the handler set one), an async iterator
        of bytes (streamed with flow control; the handler sets
        C{Content-Length}), or C{None} for no body. Bodies are never sent for
        HEAD requests.
    """

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | AsyncIterator[bytes] | None = None


Handler = Callable[["S3Call"], Awaitable[S3Response]]


class S3Call:
    """
    One S3 request as handlers see it.

    @ivar request: the L{anvil.web.server.AnvilRequest}.
    @ivar service: the L{S3Service}.
    @ivar operation: the operation name.
    @ivar address: the bucket and key addressed.
    @ivar bucket_name: the addressed bucket name (C{None} at service level).
    @ivar key: the decoded key, C{""} at bucket level.
    @ivar query: the decoded query (C{call.query.pairs}, C{call.query.get}).
    @ivar headers: lower-case header name to value.
    @ivar method: the HTTP method.
    @ivar auth: the verified signature, C{None} for anonymous requests.
    @ivar principal: the caller, C{None} for anonymous requests.
    @ivar bucket: the addressed bucket's record, when it exists.
    @ivar request_id: the request id (also C{x-amz-request-id}).
    """

    def __init__(
        self,
        request: Any,
        service: S3Service,
        operation: str,
        address: Address,
        query: Query,
        headers: Mapping[str, str],
        method: str,
        auth: VerifiedAuth | None,
        principal: Principal | None,
        bucket: Bucket | None,
    ) -> None:
        self.request = request
        self.service = service
        self.operation = operation
        self.address = address
        self.bucket_name = address.bucket
        self.key = address.key
        self.query = query
        self.headers = headers
        self.method = method
        self.auth = auth
        self.principal = principal
        self.bucket = bucket
        self.request_id: str = getattr(request, "request_id", "")
        self._payload: PayloadReader | None = None

    def payload(
        self, *, external_hashing: bool = False, verify_checksums: bool = True
    ) -> PayloadReader:
        """
        The request body, decoded and verified (see L{PayloadReader}).

        @param external_hashing: the caller feeds C{reader.hashers} itself
            (in the storage engine's CPU pool).
        @param verify_checksums: check C{Content-MD5} and C{x-amz-checksum-*}.
        @return: the reader; the same one on every call.
        @raise S3Error: for inconsistent checksum headers.
        """
        if self._payload is None:
            source = getattr(self.request, "body", None)
            if source is None:
                length = self.headers.get("content-length")
                source = BufferedBody(
                    getattr(self.request, "content", None),
                    int(length) if length and length.isdigit() else None,
                )
            self._payload = PayloadReader(
                source,
                self.auth,
                self.headers,
                external_hashing=external_hashing,
                verify_checksums=verify_checksums,
            )
        return self._payload

    def authorize(self, action: str, bucket: Bucket | str | None, key: str | None = None) -> None:
        """
        Check one more permission (beyond the operation's own), e.g.
        C{object:read} on the source of a copy, or C{object:delete} for
        each key of DeleteObjects.

        @param action: the policy action.
        @param bucket: the bucket record (tenant isolation is checked too),
            or a bucket name when the record is not needed.
        @param key: the key, if any.
        @raise AccessDenied: when not allowed.
        """
        if isinstance(bucket, str) or bucket is None:
            record = None
            name = bucket
        else:
            record = bucket
            name = bucket.name
        authorize(self.principal, "", action, record, name, key)

    async def lookup_bucket(self, name: str, action: str, key: str | None = None) -> Bucket:
        """
        Find another bucket the operation involves (the source of a copy)
        and check C{action} on it.

        @param name: the bucket name.
        @param action: the policy action needed.
        @param key: the key within it, if any.
        @return: the bucket record.
        @raise NoSuchBucket: when it does not exist.
        @raise AccessDenied: when it belongs to another tenant or the
            policies refuse.
        """
        bucket = await self.service.buckets.get_bucket(name)
        if bucket is None:
            raise NoSuchBucket(BucketName=name)
        self.authorize(action, bucket, key)
        return bucket


@dataclass(frozen=True)
class Route:
    """
    One row of the operation table.

    @ivar level: C{service}, C{bucket} or C{object}.
    @ivar method: the HTTP method.
    @ivar subresources: the exact set of sub-resource parameters.
    @ivar operation: the operation name (metric label).
    @ivar action: the policy action checked before the handler (C{None}:
        only authentication and tenant isolation).
    @ivar handler: C{"module:function"} under C{anvil.s3.handlers}.
    @ivar needs_bucket: whether the bucket must exist (C{NoSuchBucket}).
    @ivar when: an extra condition on the request, if any.
    """

    level: str
    method: str
    subresources: frozenset[str]
    operation: str
    action: str | None
    handler: str
    needs_bucket: bool = True
    when: Callable[[Query, Mapping[str, str]], bool] | None = None


#: Query parameters that select an operation (every other parameter is an
#: argument of the operation, or ignored). From the S3 API reference.
SUBRESOURCES = frozenset(
    {
        "accelerate",
        "acl",
        "analytics",
        "attributes",
        "cors",
        "delete",
        "encryption",
        "intelligent-tiering",
        "inventory",
        "legal-hold",
        "lifecycle",
        "location",
        "logging",
        "metadataConfiguration",
        "metadataTable",
        "metrics",
        "notification",
        "object-lock",
        "ownershipControls",
        "policy",
        "policyStatus",
        "publicAccessBlock",
        "renameObject",
        "replication",
        "requestPayment",
        "restore",
        "retention",
        "select",
        "session",
        "tagging",
        "torrent",
        "uploadId",
        "uploads",
        "versioning",
        "versions",
        "website",
    }
)


def _copy(query: Query, headers: Mapping[str, str]) -> bool:
    return "x-amz-copy-source" in headers


def _v2(query: Query, headers: Mapping[str, str]) -> bool:
    return query.get("list-type") == "2"


def _r(
    level: str,
    method: str,
    subresources: str,
    operation: str,
    action: str | None,
    handler: str,
    **options: Any,
) -> Route:
    return Route(
        level,
        method,
        frozenset(subresources.split()),
        operation,
        action,
        handler,
        **options,
    )


_READ = "bucket:read"
_WRITE = "bucket:write"

#: The operation table. For one (level, method, sub-resources), rows with a
#: condition come first; the first row that applies wins.
ROUTES: tuple[Route, ...] = (
    _r("service", "GET", "", "ListBuckets", None, "bucket:list_buckets", needs_bucket=False),
    # Bucket level.
    _r("bucket", "GET", "", "ListObjectsV2", _READ, "bucket:list_objects_v2", when=_v2),
    _r("bucket", "GET", "", "ListObjects", _READ, "bucket:list_objects"),
    _r("bucket", "GET", "location", "GetBucketLocation", _READ, "bucket:get_bucket_location"),
    _r("bucket", "GET", "versions", "ListObjectVersions", _READ, "bucket:list_object_versions"),
    _r("bucket", "GET", "uploads", "ListMultipartUploads", _READ, "multipart:list_multipart_uploads"),
    _r("bucket", "GET", "versioning", "GetBucketVersioning", _READ, "bucket:get_bucket_versioning"),
    _r("bucket", "GET", "acl", "GetBucketAcl", _READ, "bucket:get_bucket_acl"),
    _r("bucket", "GET", "policyStatus", "GetBucketPolicyStatus", _READ, "bucket:get_bucket_policy_status"),
    _r("bucket", "GET", "logging", "GetBucketLogging", _READ, "bucket:get_bucket_logging"),
    _r("bucket", "GET", "notification", "GetBucketNotificationConfiguration", _READ, "bucket:get_bucket_notification"),
    _r("bucket", "GET", "requestPayment", "GetBucketRequestPayment", _READ, "bucket:get_bucket_request_payment"),
    _r("bucket", "GET", "accelerate", "GetBucketAccelerateConfiguration", _READ, "bucket:get_bucket_accelerate"),
    _r("bucket", "GET", "cors", "GetBucketCors", _READ, "bucket:get_bucket_cors"),
    _r("bucket", "GET", "lifecycle", "GetBucketLifecycleConfiguration", _READ, "bucket:get_bucket_lifecycle"),
    _r("bucket", "GET", "policy", "GetBucketPolicy", _READ, "bucket:get_bucket_policy"),
    _r("bucket", "GET", "tagging", "GetBucketTagging", _READ, "bucket:get_bucket_tagging"),
    _r("bucket", "GET", "encryption", "GetBucketEncryption", _READ, "bucket:get_bucket_encryption"),
    _r("bucket", "GET", "website", "GetBucketWebsite", _READ, "bucket:get_bucket_website"),
    _r("bucket", "GET", "replication", "GetBucketReplication", _READ, "bucket:get_bucket_replication"),
    _r("bucket", "GET", "object-lock", "GetObjectLockConfiguration", _READ, "bucket:get_object_lock_configuration"),
    _r("bucket", "GET", "ownershipControls", "GetBucketOwnershipControls", _READ, "bucket:get_bucket_ownership_controls"),
    _r("bucket", "GET", "publicAccessBlock", "GetPublicAccessBlock", _READ, "bucket:get_public_access_block"),
    _r("bucket", "HEAD", "", "HeadBucket", _READ, "bucket:head_bucket"),
    _r("bucket", "PUT", "", "CreateBucket", "bucket:create", "bucket:create_bucket", needs_bucket=False),
    _r("bucket", "DELETE", "", "DeleteBucket", "bucket:delete", "bucket:delete_bucket"),
    # Deleting a configuration Anvil never stores succeeds, as on AWS for a
    # bucket that has none.
    _r("bucket", "DELETE", "cors", "DeleteBucketCors", _WRITE, "bucket:delete_bucket_configuration"),
    _r("bucket", "DELETE", "lifecycle", "DeleteBucketLifecycle", _WRITE, "bucket:delete_bucket_configuration"),
    _r("bucket", "DELETE", "policy", "DeleteBucketPolicy", _WRITE, "bucket:delete_bucket_configuration"),
    _r("bucket", "DELETE", "tagging", "DeleteBucketTagging", _WRITE, "bucket:delete_bucket_configuration"),
    _r("bucket", "DELETE", "website", "DeleteBucketWebsite", _WRITE, "bucket:delete_bucket_configuration"),
    _r("bucket", "DELETE", "encryption", "DeleteBucketEncryption", _WRITE, "bucket:delete_bucket_configuration"),
    _r("bucket", "DELETE", "replication", "DeleteBucketReplication", _WRITE, "bucket:delete_bucket_configuration"),
    _r("bucket", "DELETE", "ownershipControls", "DeleteBucketOwnershipControls", _WRITE, "bucket:delete_bucket_configuration"),
    _r("bucket", "DELETE", "publicAccessBlock", "DeletePublicAccessBlock", _WRITE, "bucket:delete_bucket_configuration"),
    # Per-key object:delete checks happen in the handler.
    _r("bucket", "POST", "delete", "DeleteObjects", None, "bucket:delete_objects"),
    # Object level.
    _r("object", "GET", "", "GetObject", "object:read", "object:get_object"),
    _r("object", "GET", "acl", "GetObjectAcl", "object:read", "bucket:get_object_acl"),
    _r("object", "GET", "tagging", "GetObjectTagging", "object:read", "bucket:get_object_tagging"),
    _r("object", "GET", "uploadId", "ListParts", "object:read", "multipart:list_parts"),
    _r("object", "HEAD", "", "HeadObject", "object:read", "object:head_object"),
    _r("object", "PUT", "", "CopyObject", "object:write", "object:copy_object", when=_copy),
    _r("object", "PUT", "", "PutObject", "object:write", "object:put_object"),
    _r("object", "PUT", "uploadId", "UploadPartCopy", "object:write", "multipart:upload_part_copy", when=_copy),
    _r("object", "PUT", "uploadId", "UploadPart", "object:write", "multipart:upload_part"),
    _r("object", "POST", "uploads", "CreateMultipartUpload", "object:write", "multipart:create_multipart_upload"),
    _r("object", "POST", "uploadId", "CompleteMultipartUpload", "object:write", "multipart:complete_multipart_upload"),
    _r("object", "DELETE", "", "DeleteObject", "object:delete", "object:delete_object"),
    _r("object", "DELETE", "uploadId", "AbortMultipartUpload", "object:write", "multipart:abort_multipart_upload"),
    _r("object", "DELETE", "tagging", "DeleteObjectTagging", "object:write", "bucket:delete_object_tagging"),
)

#: Every operation name (declared as metric series at start-up).
OPERATION_NAMES: tuple[str, ...] = tuple(dict.fromkeys(route.operation for route in ROUTES))

_BY_LEVEL_METHOD: dict[tuple[str, str], list[Route]] = {}
for _route in ROUTES:
    _BY_LEVEL_METHOD.setdefault((_route.level, _route.method), []).append(_route)
_METHODS_BY_LEVEL: dict[str, list[str]] = {}
for _level, _method in _BY_LEVEL_METHOD:
    _METHODS_BY_LEVEL.setdefault(_level, []).append(_method)

#: Handler modules written alongside this one; an operation whose module
#: or function is missing answers NotImplemented instead of failing.
_OPTIONAL_MODULES = frozenset({"object", "multipart"})

_log = Logger()


def route(level: str, method: str, query: Query, headers: Mapping[str, str]) -> Route:
    """
    Classify a request.

    @param level: C{service}, C{bucket} or C{object}.
    @param method: the HTTP method.
    @param query: the decoded query.
    @param headers: the request headers.
    @return: the matching row.
    @raise MethodNotAllowed: when the level has no operation for C{method}.
    @raise S3NotImplemented: when the sub-resources select no operation.
    """
    rows = _BY_LEVEL_METHOD.get((level, method))
    if rows is None:
        allowed = ", ".join(_METHODS_BY_LEVEL.get(level, ()))
        raise MethodNotAllowed(headers={"Allow": allowed}, Method=method, ResourceType=level.upper())
    present = query.names() & SUBRESOURCES
    for row in rows:
        if row.subresources == present and (row.when is None or row.when(query, headers)):
            return row
    names = ", ".join(sorted(present)) or "(none)"
    raise S3NotImplemented(f"{method} with sub-resource {names} is not implemented by Anvil")


_resolved: dict[str, Handler | None] = {}


def resolve(reference: str) -> Handler | None:
    """
    Import a handler by its C{"module:function"} reference.

    @param reference: e.g. C{"object:get_object"}.
    @return: the handler, or C{None} when its optional module or function
        does not exist.
    @raise ImportError: when a required module cannot be imported.
    """
    if reference in _resolved:
        return _resolved[reference]
    module_name, _, function = reference.partition(":")
    full = f"anvil.s3.handlers.{module_name}"
    handler: Handler | None
    try:
        module = importlib.import_module(full)
    except ModuleNotFoundError as e:
        if module_name in _OPTIONAL_MODULES and e.name == full:
            handler = None
        else:
            raise
    else:
        handler = getattr(module, function, None)
        if handler is None and module_name not in _OPTIONAL_MODULES:
            raise ImportError(f"{full} has no handler {function}")
    _resolved[reference] = handler
    return handler


async def not_implemented(call: S3Call) -> S3Response:
    """
    The handler of an operation whose implementation is not available.

    @raise S3NotImplemented: always.
    """
    raise S3NotImplemented(f"{call.operation} is not implemented by this node")
