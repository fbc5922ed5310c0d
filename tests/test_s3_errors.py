# -*- test-case-name: tests.test_s3_errors -*-
"""
Tests for L{anvil.s3.errors}: codes, statuses and the XML error document.
"""

from __future__ import annotations

from xml.etree import ElementTree

from twisted.trial.unittest import SynchronousTestCase

from anvil.s3 import errors
from anvil.s3.errors import (
    ERRORS_BY_CODE,
    AccessDenied,
    InvalidArgument,
    InvalidRange,
    MethodNotAllowed,
    NoSuchKey,
    NotModified,
    S3Error,
    S3NotImplemented,
    SignatureDoesNotMatch,
    error_class,
)

# The statuses of the codes the S3 API issue names, from the AWS list.
_EXPECTED_STATUSES = {
    "AccessDenied": 403,
    "AccountProblem": 403,
    "AuthorizationHeaderMalformed": 400,
    "AuthorizationQueryParametersError": 400,
    "BadDigest": 400,
    "BucketAlreadyExists": 409,
    "BucketAlreadyOwnedByYou": 409,
    "BucketNotEmpty": 409,
    "EntityTooLarge": 400,
    "EntityTooSmall": 400,
    "ExpiredToken": 400,
    "IncompleteBody": 400,
    "InternalError": 500,
    "InvalidAccessKeyId": 403,
    "InvalidArgument": 400,
    "InvalidBucketName": 400,
    "InvalidChunkSizeError": 403,
    "InvalidDigest": 400,
    "InvalidPart": 400,
    "InvalidPartOrder": 400,
    "InvalidRange": 416,
    "InvalidRequest": 400,
    "InvalidStorageClass": 400,
    "KeyTooLongError": 400,
    "MalformedTrailerError": 400,
    "MalformedXML": 400,
    "MetadataTooLarge": 400,
    "MethodNotAllowed": 405,
    "MissingContentLength": 411,
    "MissingSecurityHeader": 400,
    "NoSuchBucket": 404,
    "NoSuchKey": 404,
    "NoSuchUpload": 404,
    "NotImplemented": 501,
    "NotModified": 304,
    "PreconditionFailed": 412,
    "RequestHeaderSectionTooLarge": 400,
    "RequestTimeTooSkewed": 403,
    "RequestTimeout": 400,
    "ServiceUnavailable": 503,
    "SignatureDoesNotMatch": 403,
    "SlowDown": 503,
    "XAmzContentSHA256Mismatch": 400,
}


def _parse(document: bytes) -> ElementTree.Element:
    return ElementTree.fromstring(document)


class ErrorClassTests(SynchronousTestCase):
    """
    Every AWS code Anvil needs has a class named after it with the AWS status.
    """

    def test_statuses(self) -> None:
        """Each needed code is defined with the status AWS documents."""
        for code, status in _EXPECTED_STATUSES.items():
            cls = error_class(code)
            self.assertIsNotNone(cls, code)
            assert cls is not None
            self.assertEqual((cls.code, cls.status), (code, status))

    def test_class_name_is_code(self) -> None:
        """The code of every class is its own name, except NotImplemented."""
        for code, cls in ERRORS_BY_CODE.items():
            if cls is S3NotImplemented:
                self.assertEqual(code, "NotImplemented")
            else:
                self.assertEqual(cls.__name__, code)
            self.assertIs(getattr(errors, cls.__name__), cls)

    def test_every_class_has_a_message(self) -> None:
        """Every error has a non-empty default message and a docstring."""
        for cls in ERRORS_BY_CODE.values():
            self.assertTrue(cls.message, cls)
            self.assertTrue(cls.__doc__, cls)

    def test_builtin_not_shadowed(self) -> None:
        """The module does not rebind the Python NotImplemented builtin."""
        self.assertFalse(hasattr(errors, "NotImplemented"))

    def test_message_override(self) -> None:
        """A raise site may replace the message for one instance only."""
        error = InvalidArgument("Invalid version id specified")
        self.assertEqual(error.message, "Invalid version id specified")
        self.assertEqual(str(error), "Invalid version id specified")
        self.assertEqual(InvalidArgument().message, "Invalid Argument")

    def test_is_exception(self) -> None:
        """S3 errors are exceptions that can be caught as S3Error."""
        with self.assertRaises(S3Error):
            raise NoSuchKey()


class ErrorDocumentTests(SynchronousTestCase):
    """
    L{S3Error.to_xml} renders the S3 error document.
    """

    def test_document(self) -> None:
        """The document has the declaration, Code, Message, Resource, RequestId."""
        document = NoSuchKey().to_xml("/bucket/key", "4442587FB7D0A2F9")
        self.assertTrue(document.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n'))
        root = _parse(document)
        self.assertEqual(root.tag, "Error")
        self.assertEqual(
            [(child.tag, child.text) for child in root],
            [
                ("Code", "NoSuchKey"),
                ("Message", "The specified key does not exist."),
                ("Resource", "/bucket/key"),
                ("RequestId", "4442587FB7D0A2F9"),
            ],
        )

    def test_extra_elements(self) -> None:
        """Extra elements follow Message in order; None values are left out."""
        error = InvalidArgument(
            "Argument max-keys must be an integer between 0 and 2147483647",
            ArgumentName="max-keys",
            ArgumentValue="x",
            Missing=None,
        )
        root = _parse(error.to_xml("/b", "id", host_id="host"))
        self.assertEqual(
            [child.tag for child in root],
            ["Code", "Message", "ArgumentName", "ArgumentValue", "Resource", "RequestId", "HostId"],
        )
        self.assertEqual(root.findtext("ArgumentValue"), "x")
        self.assertEqual(root.findtext("HostId"), "host")

    def test_escaping(self) -> None:
        """Markup characters in keys and messages are escaped; the XML parses."""
        key = "a<b>&\"'c/ü/\u2603"
        error = NoSuchKey(Key=key)
        root = _parse(error.to_xml("/bucket/" + key, "id"))
        self.assertEqual(root.findtext("Key"), key)
        self.assertEqual(root.findtext("Resource"), "/bucket/" + key)

    def test_invalid_xml_characters(self) -> None:
        """Characters XML 1.0 cannot carry are replaced, keeping the document well-formed."""
        key = "a\x01b\x7fc\udcff"
        root = _parse(NoSuchKey(Key=key).to_xml("/b/" + key, "id"))
        self.assertEqual(root.findtext("Key"), "a\ufffdb\x7fc\ufffd")

    def test_signature_elements(self) -> None:
        """SignatureDoesNotMatch carries the string to sign with its newlines."""
        error = SignatureDoesNotMatch(
            AWSAccessKeyId="AKID",
            StringToSign="AWS4-HMAC-SHA256\n20130524T000000Z\nscope\nhash",
            CanonicalRequest="GET\n/\n\nhost:x\n\nhost\nUNSIGNED-PAYLOAD",
        )
        root = _parse(error.to_xml("/", "id"))
        self.assertEqual(root.findtext("Code"), "SignatureDoesNotMatch")
        self.assertEqual(
            root.findtext("StringToSign"), "AWS4-HMAC-SHA256\n20130524T000000Z\nscope\nhash"
        )
        self.assertEqual(error.status, 403)

    def test_not_implemented_code(self) -> None:
        """S3NotImplemented renders the NotImplemented code with status 501."""
        root = _parse(S3NotImplemented().to_xml("/", "id"))
        self.assertEqual(root.findtext("Code"), "NotImplemented")
        self.assertEqual(S3NotImplemented.status, 501)

    def test_not_modified_has_no_body(self) -> None:
        """A 304 renders no body at all."""
        self.assertEqual(NotModified().to_xml("/b/k", "id"), b"")
        self.assertEqual(NotModified.status, 304)

    def test_headers(self) -> None:
        """Errors carry response headers that belong with them."""
        error = MethodNotAllowed(headers={"Allow": "GET, HEAD"})
        self.assertEqual(error.headers, {"Allow": "GET, HEAD"})
        self.assertEqual(InvalidRange(headers={"Content-Range": "bytes */10"}).status, 416)
        self.assertEqual(AccessDenied().headers, {})
