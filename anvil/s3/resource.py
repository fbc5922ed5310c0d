# -*- test-case-name: tests.test_s3_dispatch -*-
"""
The S3 resource: the one place that turns HTTP requests into S3 operations
and S3 responses (or errors) back into HTTP.

For each request, in order:

  1. parse the target (path-style C{/bucket/key}, or virtual-host style
     C{bucket.<domain>/key}; the key is decoded from the raw path exactly
     once) and the query; reject keys over 1,024 bytes;
  2. authenticate (SigV4 header or presigned query, or anonymous);
  3. classify the request with the operation table
     (L{anvil.s3.dispatch.route}), which also sets the request's
     C{anvil_operation} metric label;
  4. look the bucket up (C{NoSuchBucket} unless the operation creates it;
     the owner's requests may reuse a record up to a second old, see
     L{anvil.s3.bucketcache});
  5. authorise: tenant isolation, the operation's policy action, public
     buckets;
  6. run the handler and render its L{S3Response}.

Any L{S3Error} is rendered as the S3 C{<Error>} document with C{Resource}
and C{RequestId} (headers only for HEAD, as AWS does). A database outage
becomes C{503 ServiceUnavailable} at once (the connection pool fails fast).
Any other exception is logged with its traceback and answered with
C{InternalError}: no traceback ever reaches the client. If the client goes
away, the handler's coroutine is cancelled so that it stops its work.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from anvil.errors import DatabaseUnavailable
from anvil.errors import InvalidArgument as DomainInvalidArgument
from anvil.s3 import dispatch
from anvil.s3.authn import authorize, public_flag_irrelevant
from anvil.s3.dispatch import S3Call, S3Response
from anvil.s3.errors import (
    AccessDenied,
    IncompleteBody,
    InternalError,
    InvalidArgument,
    KeyTooLongError,
    NoSuchBucket,
    PermanentRedirect,
    S3Error,
    ServiceUnavailable,
)
from anvil.s3.request import MAX_KEY_BYTES, Address, Query, parse_address, split_target
from anvil.s3.sigv4 import header_map
from anvil.s3.xml import XML_CONTENT_TYPE
from anvil.storage.engine import ContentUnavailable, WriteQuorumLost

if TYPE_CHECKING:
    from anvil.s3.service import S3Service


#: Domain failures that mean "this node cannot serve now": 503, not 500.
_UNAVAILABLE: tuple[type[BaseException], ...] = (DatabaseUnavailable, ContentUnavailable, WriteQuorumLost)


def _client_gone_errors() -> tuple[type[BaseException], ...]:
    # The request body or response stream ended because the client left.
    found: list[type[BaseException]] = []
    for module, name in (("anvil.web.body", "BodyIncomplete"), ("anvil.web.stream", "ClientDisconnected")):
        try:
            imported = __import__(module, fromlist=[name])
        except ImportError:
            continue
        cls = getattr(imported, name, None)
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)


class S3Resource(Resource):
    """
    The root of the S3 API (a leaf: it parses the whole path itself).
    """

    isLeaf = True
    _log = Logger()

    def __init__(self, service: S3Service) -> None:
        """
        @param service: the S3 service.
        """
        super().__init__()  # type: ignore[no-untyped-call]
        self._service = service
        self._client_gone = _client_gone_errors()

    def render(self, request: Any) -> int:
        """
        Start handling a request; it finishes asynchronously.

        @param request: the request.
        @return: C{NOT_DONE_YET}.
        """
        handling = Deferred.fromCoroutine(self._handle(request))

        def client_gone(reason: Failure) -> None:
            # Stop the work of a request nobody waits for any more (an
            # upload's staging is removed by the handler's cleanup).
            handling.cancel()

        request.notifyFinish().addErrback(client_gone)
        handling.addErrback(self._crashed, request)
        return NOT_DONE_YET

    def _crashed(self, reason: Failure, request: Any) -> None:
        # _handle catches everything; reaching this is a bug in it.
        self._log.failure("S3 request {request_id} crashed", reason, request_id=request.request_id)
        if not request.finished and not request._disconnected:
            request.channel.transport.abortConnection()

    async def _handle(self, request: Any) -> None:
        service = self._service
        address = Address(None, "")
        try:
            raw_path, raw_query = split_target(request.uri)
            headers = header_map(request.requestHeaders.getAllRawHeaders())
            method = request.method.decode("ascii", "replace")
            query = Query.parse(raw_query)
            address = parse_address(raw_path, headers.get("host"), service.virtual_host_domains)
            if len(address.key.encode("utf-8")) > MAX_KEY_BYTES:
                raise KeyTooLongError(Size=len(address.key.encode("utf-8")), MaxSizeAllowed=MAX_KEY_BYTES)
            # Classify first so that even a refused request is labelled, but
            # report an unroutable request only to an authenticated caller.
            try:
                row = dispatch.route(address.level, method, query, headers)
                unroutable = None
                request.anvil_operation = row.operation
            except S3Error as e:
                unroutable = e
            auth, principal = await service.authenticator.authenticate(
                method, raw_path, query.pairs, headers
            )
            if unroutable is not None:
                raise unroutable
            handler = dispatch.resolve(row.handler) or dispatch.not_implemented
            bucket = None
            if address.bucket is not None and row.needs_bucket:
                # CreateBucket looks no further: whether the name is taken,
                # and by whom, is its own business (BucketAlreadyExists).
                # For an object operation of the bucket's own tenant whose
                # outcome the public flag cannot change, a record up to a
                # second old is good enough; every other request (anonymous,
                # another tenant's, bucket operations such as DeleteBucket)
                # reads the database.
                owner = (
                    principal.tenant_id
                    if address.key
                    and public_flag_irrelevant(
                        principal, row.operation, row.action, address.bucket, address.key
                    )
                    else None
                )
                bucket = await service.bucket_cache.get_bucket(address.bucket, owner)
                if bucket is None:
                    raise NoSuchBucket(BucketName=address.bucket)
            authorize(principal, row.operation, row.action, bucket, address.bucket, address.key)
            expected_owner = headers.get("x-amz-expected-bucket-owner")
            if expected_owner is not None and bucket is not None and expected_owner != str(bucket.tenant_id):
                # The caller's safeguard against writing into a bucket that
                # changed hands; AWS answers 403.
                raise AccessDenied()
            if bucket is not None and bucket.region != service.region:
                await self._send(request, await self._other_region(request, bucket, headers))
                return
            call = S3Call(
                request,
                service,
                row.operation,
                address,
                query,
                headers,
                method,
                auth,
                principal,
                bucket,
            )
            response = await handler(call)
            await self._send(request, response)
        except CancelledError:
            # The client went away; there is nobody to answer.
            return
        except S3Error as error:
            self._send_error(request, address, error)
        except _UNAVAILABLE as e:
            self._log.warn(
                "S3 request {request_id} failed: {reason}",
                request_id=request.request_id,
                reason=str(e),
            )
            self._send_error(request, address, ServiceUnavailable())
        except DomainInvalidArgument as e:
            # Domain code refusing a value the request supplied: the
            # client's mistake, explained in one sentence.
            self._send_error(request, address, InvalidArgument(str(e)))
        except self._client_gone:
            if request._disconnected:
                return
            self._send_error(request, address, IncompleteBody())
        except Exception:  # noqa: BLE001 - logged in full, answered as InternalError
            self._log.failure(
                "S3 request {request_id} ({operation}) failed",
                request_id=request.request_id,
                operation=request.anvil_operation,
            )
            self._send_error(request, address, InternalError())

    async def _other_region(self, request: Any, bucket: Any, headers: dict[str, str]) -> S3Response:
        """
        Answer a request for a bucket of another region: forward it to a
        node of that region (L{anvil.s3.proxy}), or redirect as AWS does
        when this node has no way to reach one.
        """
        proxy = self._service.proxy
        if proxy is None:
            raise PermanentRedirect(
                headers={"x-amz-bucket-region": bucket.region},
                Bucket=bucket.name,
                Endpoint=f"region {bucket.region}",
            )
        return await proxy.forward(request, bucket.region, headers)

    async def _send(self, request: Any, response: S3Response) -> None:
        """
        Write a handler's response.
        """
        if request._disconnected:
            return
        request.setResponseCode(response.status)
        names = set()
        for name, value in response.headers:
            raw = name.encode("latin-1")
            if name.lower() in names:
                request.responseHeaders.addRawHeader(raw, value.encode("latin-1"))
            else:
                request.responseHeaders.setRawHeaders(raw, [value.encode("latin-1")])
                names.add(name.lower())
        body = response.body
        if body is None or isinstance(body, bytes):
            data = body or b""
            if data and "content-type" not in names:
                request.setHeader(b"Content-Type", XML_CONTENT_TYPE.encode("ascii"))
            if "content-length" not in names:
                request.setHeader(b"Content-Length", b"%d" % (len(data),))
            if data and request.method != b"HEAD":
                request.write(data)
            request.finish()
            return
        if request.method == b"HEAD":
            await _close(body)
            request.finish()
            return
        await _stream(request, body)

    def _send_error(self, request: Any, address: Address, error: S3Error) -> None:
        """
        Write an S3 error document (or abort a response already started).
        """
        discard = getattr(getattr(request, "body", None), "discard", None)
        if discard is not None:
            # Do not wait for (or buffer) an upload nobody will store.
            discard()
        if request._disconnected or request.finished:
            return
        if request.startedWriting:
            # Headers (and maybe data) are out: the client can only learn
            # of the failure from a connection that ends early.
            self._log.warn(
                "S3 request {request_id} failed after its response started: {error!r}",
                request_id=request.request_id,
                error=error,
            )
            request.channel.transport.abortConnection()
            return
        # A handler may have set the headers of a success (ETag, Content-
        # Length of an object) before its body failed to start: keep only
        # the request ids and what the server sets for every response.
        kept = {
            name: request.responseHeaders.getRawHeaders(name)
            for name in (b"x-amz-request-id", b"x-amz-id-2", b"date", b"server")
        }
        for name, _ in list(request.responseHeaders.getAllRawHeaders()):
            request.responseHeaders.removeHeader(name)
        for name, values in kept.items():
            if values:
                request.responseHeaders.setRawHeaders(name, values)
        request.setResponseCode(error.status)
        for name, value in error.headers.items():
            request.setHeader(name.encode("latin-1"), value.encode("latin-1"))
        body = error.to_xml(address.resource, request.request_id, request.host_id)
        if body:
            request.setHeader(b"Content-Type", XML_CONTENT_TYPE.encode("ascii"))
        request.setHeader(b"Content-Length", b"%d" % (len(body),) if request.method != b"HEAD" else b"0")
        if body and request.method != b"HEAD":
            request.write(body)
        request.finish()


async def _close(body: AsyncIterator[bytes]) -> None:
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        await aclose()


async def _stream(request: Any, body: AsyncIterator[bytes]) -> None:
    """
    Stream a response body with flow control (L{anvil.web.stream}).
    """
    from anvil.web.stream import stream_response

    await stream_response(request, body)
    if not request.finished and not request._disconnected:
        request.finish()
