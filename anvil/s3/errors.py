# -*- test-case-name: tests.test_s3_errors -*-
"""
S3 errors, one class per AWS error code, rendered as the S3 XML C{<Error>}
document.

The class name of each error is its S3 code (C{NoSuchBucket},
C{SignatureDoesNotMatch}, ...), C{status} is the HTTP status AWS answers
with and C{message} the default message; a raise site may pass a more
precise message and extra elements::

    raise InvalidArgument("Invalid version id specified",
                          ArgumentName="versionId", ArgumentValue=value)

Extra keyword arguments become child elements of C{<Error>} in the order
given (AWS adds such elements: C{BucketName}, C{Key}, C{ArgumentName} /
C{ArgumentValue}, C{StringToSign} / C{CanonicalRequest} for
C{SignatureDoesNotMatch}, C{RequestTime} / C{ServerTime} for
C{RequestTimeTooSkewed}, ...). C{headers} holds response headers that belong
to the error (C{Allow} for C{MethodNotAllowed}, C{Content-Range} for
C{InvalidRange}).

One code is also a Python builtin: C{NotImplemented}. Its class is
L{S3NotImplemented} with C{code = "NotImplemented"}; every other class leaves
C{code} to default to its own name. L{NotModified} (304) is modelled as an
error so that conditional GETs can raise it, but a 304 has no body: its
C{has_body} is C{False} and its L{S3Error.to_xml} returns C{b""}. The HTTP
layer must also send no body for any error answering a C{HEAD} request, as
AWS does.

Messages and statuses follow the AWS "Error responses" list
(U{https://docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html}),
using the wording S3 actually sends where that differs from the list.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import ClassVar
from xml.sax.saxutils import escape

#: Every S3 error class by its code, filled in as subclasses are defined.
ERRORS_BY_CODE: dict[str, type[S3Error]] = {}

# XML 1.0 cannot carry these code points even as character references, and
# object keys may contain any of them; they are shown as U+FFFD instead.
_XML_INVALID = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")

_XML_DECLARATION = b'<?xml version="1.0" encoding="UTF-8"?>\n'


def _xml_text(value: object) -> str:
    """
    Escape a value for use as XML character data.

    @param value: any value; it is converted with C{str}.
    @return: the escaped text, with characters XML 1.0 cannot represent
        replaced by U+FFFD.
    """
    return escape(_XML_INVALID.sub("\ufffd", str(value)))


def error_class(code: str) -> type[S3Error] | None:
    """
    Look up the error class for an S3 code.

    @param code: an S3 error code such as C{"NoSuchKey"}.
    @return: the class, or C{None} when Anvil defines no such error.
    """
    return ERRORS_BY_CODE.get(code)


class S3Error(Exception):
    """
    Rendered as an S3 C{<Error>} document; the class name is the S3 code.

    @ivar message: the message of this instance (the class default unless one
        was given).
    @ivar extra: extra C{<Error>} child elements, name to text, in order.
    @ivar headers: response headers that go with this error.
    """

    status: ClassVar[int] = 500
    message: str = "We encountered an internal error. Please try again."
    code: ClassVar[str] = "S3Error"
    #: C{False} for statuses that must not carry a body (304).
    has_body: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "code" not in cls.__dict__:
            cls.code = cls.__name__
        ERRORS_BY_CODE[cls.code] = cls

    def __init__(
        self,
        message: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        **extra: object,
    ) -> None:
        """
        @param message: a message more precise than the class default.
        @param headers: response headers to send with the error.
        @param extra: extra C{<Error>} elements; C{None} values are left out.
        """
        if message is not None:
            self.message = message
        self.extra: dict[str, str] = {
            name: str(value) for name, value in extra.items() if value is not None
        }
        self.headers: dict[str, str] = dict(headers or {})
        super().__init__(self.message)

    def __repr__(self) -> str:
        return f"{self.code}({self.message!r})"

    def to_xml(self, resource: str, request_id: str, host_id: str | None = None) -> bytes:
        """
        Render the error document.

        @param resource: the bucket or object path the request addressed,
            for example C{"/bucket/key"}.
        @param request_id: the request id, also sent as C{x-amz-request-id}.
        @param host_id: the C{x-amz-id-2} value, when the server has one.
        @return: the UTF-8 XML document with its declaration, or C{b""} for
            an error whose status has no body.
        """
        if not self.has_body:
            return b""
        parts = [
            "<Error><Code>",
            _xml_text(self.code),
            "</Code><Message>",
            _xml_text(self.message),
            "</Message>",
        ]
        for name, value in self.extra.items():
            parts.append(f"<{name}>{_xml_text(value)}</{name}>")
        parts.append(f"<Resource>{_xml_text(resource)}</Resource>")
        parts.append(f"<RequestId>{_xml_text(request_id)}</RequestId>")
        if host_id is not None:
            parts.append(f"<HostId>{_xml_text(host_id)}</HostId>")
        parts.append("</Error>")
        return _XML_DECLARATION + "".join(parts).encode("utf-8")


# 3xx ------------------------------------------------------------------------


class NotModified(S3Error):
    """A conditional GET/HEAD whose object has not changed (304, no body)."""

    status = 304
    message = "Not Modified"
    has_body = False


# 400 ------------------------------------------------------------------------


class AuthorizationHeaderMalformed(S3Error):
    """The Authorization header could not be parsed."""

    status = 400
    message = "The authorization header that you provided is not valid."


class AuthorizationQueryParametersError(S3Error):
    """The X-Amz-* query parameters of a presigned URL are not valid."""

    status = 400
    message = (
        "Query-string authentication version 4 requires the X-Amz-Algorithm, "
        "X-Amz-Credential, X-Amz-Signature, X-Amz-Date, X-Amz-SignedHeaders, "
        "and X-Amz-Expires parameters."
    )


class BadDigest(S3Error):
    """The Content-MD5 or x-amz-checksum-* did not match the body."""

    status = 400
    message = "The Content-MD5 you specified did not match what we received."


class EntityTooLarge(S3Error):
    """The upload is larger than Anvil allows."""

    status = 400
    message = "Your proposed upload exceeds the maximum allowed size"


class EntityTooSmall(S3Error):
    """A multipart part other than the last is smaller than 5 MiB."""

    status = 400
    message = "Your proposed upload is smaller than the minimum allowed size"


class ExpiredToken(S3Error):
    """A session token has expired."""

    status = 400
    message = "The provided token has expired."


class IllegalLocationConstraintException(S3Error):
    """A CreateBucket location constraint names another region."""

    status = 400
    message = (
        "The unspecified location constraint is incompatible for the region "
        "specific endpoint this request was sent to."
    )


class IncompleteBody(S3Error):
    """The body was shorter (or longer) than its declared length."""

    status = 400
    message = "You did not provide the number of bytes specified by the Content-Length HTTP header"


class InvalidArgument(S3Error):
    """A header or query parameter has an invalid value."""

    status = 400
    message = "Invalid Argument"


class InvalidBucketName(S3Error):
    """The bucket name does not follow the naming rules (or is reserved)."""

    status = 400
    message = "The specified bucket is not valid."


class InvalidBucketAclWithObjectOwnership(S3Error):
    """
    A canned ACL other than private on a bucket with enforced ownership
    (making a bucket public is an operator action in Anvil).
    """

    status = 400
    message = "Bucket cannot have ACLs set with ObjectOwnership's BucketOwnerEnforced setting"


class NoSuchPublicAccessBlockConfiguration(S3Error):
    """GetPublicAccessBlock on a bucket without one."""

    status = 404
    message = "The public access block configuration was not found"


class InvalidDigest(S3Error):
    """The Content-MD5 header is not a base64 MD5 digest."""

    status = 400
    message = "The Content-MD5 you specified is not valid."


class InvalidEncryptionAlgorithmError(S3Error):
    """An unsupported server-side encryption algorithm was requested."""

    status = 400
    message = "The encryption request you specified is not valid. The valid value is AES256."


class InvalidLocationConstraint(S3Error):
    """The CreateBucket location constraint is not a valid region."""

    status = 400
    message = "The specified location-constraint is not valid"


class InvalidPart(S3Error):
    """A part listed in CompleteMultipartUpload is missing or has another ETag."""

    status = 400
    message = (
        "One or more of the specified parts could not be found.  The part may "
        "not have been uploaded, or the specified entity tag may not match "
        "the part's entity tag."
    )


class InvalidPartOrder(S3Error):
    """The parts listed in CompleteMultipartUpload are not in ascending order."""

    status = 400
    message = "The list of parts was not in ascending order. Parts must be ordered by part number."


class InvalidRequest(S3Error):
    """The request is not valid (checksum headers, unsupported mechanisms...)."""

    status = 400
    message = "Invalid Request"


class InvalidStorageClass(S3Error):
    """The storage class is not one S3 defines."""

    status = 400
    message = "The storage class you specified is not valid"


class InvalidTag(S3Error):
    """The tagging input is not valid."""

    status = 400
    message = "The TagValue you have provided is invalid"


class InvalidToken(S3Error):
    """A session token was sent; Anvil issues none."""

    status = 400
    message = "The provided token is malformed or otherwise invalid."


class InvalidURI(S3Error):
    """The request URI could not be parsed."""

    status = 400
    message = "Couldn't parse the specified URI."


class KeyTooLongError(S3Error):
    """The object key is longer than 1024 bytes."""

    status = 400
    message = "Your key is too long"


class MalformedTrailerError(S3Error):
    """The trailer of an aws-chunked body is not well-formed."""

    status = 400
    message = (
        "The request contained trailing data that was not well-formed or did "
        "not conform to our published schema."
    )


class MalformedXML(S3Error):
    """The request body is not the XML document the operation expects."""

    status = 400
    message = (
        "The XML you provided was not well-formed or did not validate against our published schema"
    )


class MaxMessageLengthExceeded(S3Error):
    """A request body that must be small (an XML document) is too large."""

    status = 400
    message = "Your request was too big."


class MetadataTooLarge(S3Error):
    """User metadata is larger than 2 KiB."""

    status = 400
    message = "Your metadata headers exceed the maximum allowed metadata size."


class MissingRequestBodyError(S3Error):
    """An operation that needs a body received none."""

    status = 400
    message = "Request Body is empty"


class MissingSecurityHeader(S3Error):
    """A required header is missing."""

    status = 400
    message = "Your request is missing a required header."


class RequestHeaderSectionTooLarge(S3Error):
    """The request line and headers are larger than allowed."""

    status = 400
    message = "Your request header section exceeds the maximum allowed size."


class RequestTimeout(S3Error):
    """The client stopped sending the body."""

    status = 400
    message = (
        "Your socket connection to the server was not read from or written "
        "to within the timeout period. Idle connections will be closed."
    )


class TooManyBuckets(S3Error):
    """The tenant already has as many buckets as it may."""

    status = 400
    message = "You have attempted to create more buckets than allowed"


class UnexpectedContent(S3Error):
    """The request has a body that the operation does not take."""

    status = 400
    message = "This request does not support content"


class XAmzContentSHA256Mismatch(S3Error):
    """The body does not hash to the signed x-amz-content-sha256."""

    status = 400
    message = "The provided 'x-amz-content-sha256' header does not match what was computed."


# 403 ------------------------------------------------------------------------


class AccessDenied(S3Error):
    """Authentication succeeded (or was absent) but access is refused."""

    status = 403
    message = "Access Denied"


class AccountProblem(S3Error):
    """The app or tenant is disabled."""

    status = 403
    message = (
        "There is a problem with your account that prevents the operation "
        "from completing successfully."
    )


class InvalidAccessKeyId(S3Error):
    """The access key is unknown."""

    status = 403
    message = "The AWS Access Key Id you provided does not exist in our records."


class InvalidChunkSizeError(S3Error):
    """A signed chunk other than the last is smaller than 8 KiB."""

    status = 403
    message = "Only the last chunk is allowed to have a size less than 8192 bytes"


class InvalidObjectState(S3Error):
    """The operation is not valid for the object's current state."""

    status = 403
    message = "The operation is not valid for the object's storage class"


class RequestTimeTooSkewed(S3Error):
    """The request time is more than 15 minutes from the server's."""

    status = 403
    message = "The difference between the request time and the current time is too large."


class SignatureDoesNotMatch(S3Error):
    """The signature (request, chunk or trailer) does not verify."""

    status = 403
    message = (
        "The request signature we calculated does not match the signature you "
        "provided. Check your key and signing method."
    )


# 404 ------------------------------------------------------------------------


class NoSuchBucket(S3Error):
    """The bucket does not exist (or belongs to another tenant)."""

    status = 404
    message = "The specified bucket does not exist"


class NoSuchBucketPolicy(S3Error):
    """GetBucketPolicy on a bucket without one."""

    status = 404
    message = "The bucket policy does not exist"


class NoSuchCORSConfiguration(S3Error):
    """GetBucketCors on a bucket without one."""

    status = 404
    message = "The CORS configuration does not exist"


class NoSuchKey(S3Error):
    """The object does not exist."""

    status = 404
    message = "The specified key does not exist."


class NoSuchLifecycleConfiguration(S3Error):
    """GetBucketLifecycleConfiguration on a bucket without one."""

    status = 404
    message = "The lifecycle configuration does not exist"


class NoSuchTagSet(S3Error):
    """GetBucketTagging on a bucket without tags."""

    status = 404
    message = "The TagSet does not exist"


class NoSuchUpload(S3Error):
    """The multipart upload does not exist (or was completed or aborted)."""

    status = 404
    message = (
        "The specified upload does not exist. The upload ID may be invalid, "
        "or the upload may have been aborted or completed."
    )


class NoSuchVersion(S3Error):
    """The version id does not name a version of the object."""

    status = 404
    message = "The version ID specified in the request does not match an existing version."


class NoSuchWebsiteConfiguration(S3Error):
    """GetBucketWebsite on a bucket without one."""

    status = 404
    message = "The specified bucket does not have a website configuration"


class ObjectLockConfigurationNotFoundError(S3Error):
    """GetObjectLockConfiguration on a bucket without one."""

    status = 404
    message = "Object Lock configuration does not exist for this bucket"


class OwnershipControlsNotFoundError(S3Error):
    """GetBucketOwnershipControls on a bucket without them."""

    status = 404
    message = "The bucket ownership controls were not found"


class ReplicationConfigurationNotFoundError(S3Error):
    """GetBucketReplication on a bucket without one."""

    status = 404
    message = "The replication configuration was not found"


class ServerSideEncryptionConfigurationNotFoundError(S3Error):
    """GetBucketEncryption on a bucket without one."""

    status = 404
    message = "The server side encryption configuration was not found"


# 405, 409, 411, 412, 416 ------------------------------------------------------


class MethodNotAllowed(S3Error):
    """The method is not allowed on this resource (send an Allow header)."""

    status = 405
    message = "The specified method is not allowed against this resource."


class BucketAlreadyExists(S3Error):
    """Another tenant owns a bucket with this name."""

    status = 409
    message = (
        "The requested bucket name is not available. The bucket namespace is "
        "shared by all users of the system. Please select a different name "
        "and try again."
    )


class BucketAlreadyOwnedByYou(S3Error):
    """The caller's tenant already owns this bucket."""

    status = 409
    message = "Your previous request to create the named bucket succeeded and you already own it."


class BucketNotEmpty(S3Error):
    """DeleteBucket on a bucket that still holds objects or uploads."""

    status = 409
    message = "The bucket you tried to delete is not empty"


class OperationAborted(S3Error):
    """A conflicting operation is in progress on this resource."""

    status = 409
    message = (
        "A conflicting conditional operation is currently in progress "
        "against this resource. Please try again."
    )


class MissingContentLength(S3Error):
    """A PUT without Content-Length (or x-amz-decoded-content-length)."""

    status = 411
    message = "You must provide the Content-Length HTTP header."


class PreconditionFailed(S3Error):
    """If-Match / If-Unmodified-Since (or copy-source variants) did not hold."""

    status = 412
    message = "At least one of the pre-conditions you specified did not hold"


class InvalidPartNumber(S3Error):
    """
    GetObject/HeadObject with a C{partNumber} the object does not have.
    """

    status = 416
    message = "The requested partnumber is not satisfiable"


class InvalidRange(S3Error):
    """The Range starts beyond the end of the object."""

    status = 416
    message = "The requested range is not satisfiable"


# 5xx ------------------------------------------------------------------------


class InternalError(S3Error):
    """An unexpected failure inside Anvil."""

    status = 500
    message = "We encountered an internal error. Please try again."


class S3NotImplemented(S3Error):
    """
    A header or subresource asks for functionality Anvil does not implement.

    Its code is C{NotImplemented}; the class has another name so as not to
    shadow the Python builtin.
    """

    code = "NotImplemented"
    status = 501
    message = "A header you provided implies functionality that is not implemented"


class PermanentRedirect(S3Error):
    """The bucket is in another region and this node cannot forward to it."""

    status = 301
    message = "The bucket you are attempting to access must be addressed using the specified endpoint."


class ServiceUnavailable(S3Error):
    """The node cannot serve the request now (metadata or storage down)."""

    status = 503
    message = "Please reduce your request rate."


class SlowDown(S3Error):
    """The node is shedding load."""

    status = 503
    message = "Please reduce your request rate."
