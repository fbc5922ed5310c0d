# -*- test-case-name: tests.test_s3_dispatch -*-
"""
Tests for the S3 protocol core: the operation table
(L{anvil.s3.dispatch}), request parsing (L{anvil.s3.request}), XML documents
(L{anvil.s3.xml}), bucket naming rules, and the rendering of responses and
errors by L{anvil.s3.resource.S3Resource} through a real L{AnvilSite}.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from anvil.config import ApiSection, NodeConfig
from anvil.errors import DatabaseUnavailable, NotFound
from anvil.meta.records import Bucket
from anvil.metrics import Metrics
from anvil.s3 import dispatch
from anvil.s3.errors import (
    InvalidArgument,
    InvalidBucketName,
    InvalidURI,
    MalformedXML,
    MethodNotAllowed,
    S3NotImplemented,
)
from anvil.s3.handlers.bucket import check_bucket_name
from anvil.s3.request import Query, host_bucket, parse_address, parse_int, split_target
from anvil.s3.service import S3Service, default_virtual_host_domains
from anvil.s3.xml import Element, document, iso8601, parse_xml
from anvil.web.readiness import Readiness
from anvil.web.root import RootResource
from anvil.web.server import AnvilSite


def _route(level: str, method: str, target: str = "", headers: dict[str, str] | None = None) -> str:
    return dispatch.route(level, method, Query.parse(target), headers or {}).operation


class RouteTests(SynchronousTestCase):
    """
    Requests are classified by level, method and sub-resources.
    """

    def test_service(self) -> None:
        """
        GET / is ListBuckets; other methods are not allowed there.
        """
        self.assertEqual(_route("service", "GET"), "ListBuckets")
        e = self.assertRaises(MethodNotAllowed, _route, "service", "PUT")
        self.assertEqual(e.headers["Allow"], "GET")

    def test_bucket_operations(self) -> None:
        """
        Each bucket-level method and sub-resource selects its operation.
        """
        cases = [
            ("GET", "", "ListObjects"),
            ("GET", "list-type=2", "ListObjectsV2"),
            ("GET", "list-type=2&prefix=a&x-id=ListObjectsV2", "ListObjectsV2"),
            ("GET", "prefix=a&delimiter=/", "ListObjects"),
            ("GET", "location", "GetBucketLocation"),
            ("GET", "versions", "ListObjectVersions"),
            ("GET", "uploads", "ListMultipartUploads"),
            ("GET", "versioning", "GetBucketVersioning"),
            ("GET", "acl", "GetBucketAcl"),
            ("GET", "cors", "GetBucketCors"),
            ("GET", "policy", "GetBucketPolicy"),
            ("HEAD", "", "HeadBucket"),
            ("PUT", "", "CreateBucket"),
            ("DELETE", "", "DeleteBucket"),
            ("DELETE", "cors", "DeleteBucketCors"),
            ("POST", "delete", "DeleteObjects"),
            ("POST", "delete=", "DeleteObjects"),
        ]
        for method, query, operation in cases:
            self.assertEqual(_route("bucket", method, query), operation, (method, query))

    def test_object_operations(self) -> None:
        """
        Each object-level method and sub-resource selects its operation; the
        copy-source header turns PUTs into copies.
        """
        copy = {"x-amz-copy-source": "/b/k"}
        cases = [
            ("GET", "", {}, "GetObject"),
            ("GET", "partNumber=2&versionId=null", {}, "GetObject"),
            ("GET", "response-content-type=text/plain", {}, "GetObject"),
            ("GET", "acl", {}, "GetObjectAcl"),
            ("GET", "uploadId=u", {}, "ListParts"),
            ("HEAD", "", {}, "HeadObject"),
            ("PUT", "", {}, "PutObject"),
            ("PUT", "", copy, "CopyObject"),
            ("PUT", "partNumber=1&uploadId=u", {}, "UploadPart"),
            ("PUT", "partNumber=1&uploadId=u", copy, "UploadPartCopy"),
            ("POST", "uploads", {}, "CreateMultipartUpload"),
            ("POST", "uploadId=u", {}, "CompleteMultipartUpload"),
            ("DELETE", "", {}, "DeleteObject"),
            ("DELETE", "uploadId=u", {}, "AbortMultipartUpload"),
        ]
        for method, query, headers, operation in cases:
            self.assertEqual(_route("object", method, query, headers), operation, (method, query))

    def test_unknown_subresource(self) -> None:
        """
        A sub-resource with no operation for the method is NotImplemented
        (501), never a 500; unrelated parameters are ignored.
        """
        for level, method, query in [
            ("bucket", "PUT", "versioning"),
            ("bucket", "GET", "analytics"),
            ("bucket", "GET", "acl&cors"),
            ("object", "POST", "restore"),
            ("object", "GET", "torrent"),
            ("object", "PUT", "tagging"),
        ]:
            e = self.assertRaises(S3NotImplemented, _route, level, method, query)
            self.assertEqual(e.status, 501)
            self.assertEqual(e.code, "NotImplemented")
        self.assertEqual(_route("bucket", "GET", "foo=bar"), "ListObjects")

    def test_method_not_allowed(self) -> None:
        """
        A method a level does not have is MethodNotAllowed with an Allow
        header listing the methods it has.
        """
        e = self.assertRaises(MethodNotAllowed, _route, "object", "PATCH")
        self.assertEqual(e.status, 405)
        self.assertEqual(
            sorted(e.headers["Allow"].split(", ")), ["DELETE", "GET", "HEAD", "POST", "PUT"]
        )

    def test_operation_names(self) -> None:
        """
        Every operation of the table is declared once, and every handler of
        the bucket module resolves.
        """
        self.assertEqual(len(dispatch.OPERATION_NAMES), len(set(dispatch.OPERATION_NAMES)))
        self.assertIn("ListBuckets", dispatch.OPERATION_NAMES)
        self.assertIn("PutObject", dispatch.OPERATION_NAMES)
        for row in dispatch.ROUTES:
            if row.handler.startswith("bucket:"):
                self.assertIsNotNone(dispatch.resolve(row.handler), row.handler)

    def test_resolve_missing(self) -> None:
        """
        A missing function of an optional handler module resolves to None
        (the route answers NotImplemented); of a required module, it is an
        error.
        """
        self.assertIsNone(dispatch.resolve("object:no_such_handler"))
        self.assertRaises(ImportError, dispatch.resolve, "bucket:no_such_handler")


class RequestParsingTests(SynchronousTestCase):
    """
    Targets, paths, hosts and queries are parsed as S3 does.
    """

    def test_split_target(self) -> None:
        """
        The path and query are split without decoding.
        """
        self.assertEqual(split_target(b"/b/a%20b?x=1&y"), (b"/b/a%20b", b"x=1&y"))
        self.assertEqual(split_target(b"/"), (b"/", b""))
        self.assertEqual(split_target(b"http://h:1/b/k?x"), (b"/b/k", b"x"))
        self.assertEqual(split_target(b"http://h:1?x"), (b"/", b"x"))

    def test_keys_decoded_once(self) -> None:
        """
        Keys are percent-decoded exactly once; '+', '%', '..', empty
        segments, leading and trailing slashes are kept.
        """
        cases = {
            b"/b/a+b": "a+b",
            b"/b/a%2Bb": "a+b",
            b"/b/100%25": "100%",
            b"/b/%2525": "%25",
            b"/b/a%20b": "a b",
            b"/b/../x": "../x",
            b"/b//leading": "/leading",
            b"/b/trailing/": "trailing/",
            b"/b/a%2Fb": "a/b",
            b"/b/%E2%82%AC": "\u20ac",
        }
        for path, key in cases.items():
            address = parse_address(path, "127.0.0.1:1", ["localhost"])
            self.assertEqual((address.bucket, address.key), ("b", key), path)
            self.assertEqual(address.level, "object")

    def test_levels(self) -> None:
        """
        '/' is the service, '/b' and '/b/' the bucket.
        """
        self.assertEqual(parse_address(b"/", None, []).level, "service")
        self.assertEqual(parse_address(b"/b", None, []).level, "bucket")
        self.assertEqual(parse_address(b"/b/", None, []).level, "bucket")
        self.assertEqual(parse_address(b"/b/", None, []).resource, "/b")
        self.assertEqual(parse_address(b"/b/k", None, []).resource, "/b/k")

    def test_invalid_utf8(self) -> None:
        """
        A path that is not UTF-8 once decoded is InvalidURI.
        """
        self.assertRaises(InvalidURI, parse_address, b"/b/%FF", None, [])

    def test_virtual_host(self) -> None:
        """
        A Host under a base domain names the bucket; the whole path is the
        key.
        """
        address = parse_address(b"/a/b%20c", "photos.s3.example.com:8080", ["s3.example.com"])
        self.assertEqual((address.bucket, address.key, address.virtual_host), ("photos", "a/b c", True))
        address = parse_address(b"/", "photos.localhost", ["localhost"])
        self.assertEqual((address.bucket, address.level), ("photos", "bucket"))
        self.assertEqual(parse_address(b"/", "s3.example.com", ["s3.example.com"]).level, "service")
        self.assertIsNone(host_bucket("[::1]:80", ["localhost"]))
        self.assertIsNone(host_bucket("127.0.0.1:80", ["localhost"]))
        self.assertEqual(host_bucket("My.Bucket.LOCALHOST", ["localhost"]), "My.Bucket")

    def test_default_domains(self) -> None:
        """
        The public address's DNS name and localhost are base domains; an IP
        address is not.
        """
        config = NodeConfig(api=ApiSection(public_addr="https://S3.Example.com:443"))
        self.assertEqual(default_virtual_host_domains(config), ("s3.example.com", "localhost"))
        config = NodeConfig(api=ApiSection(public_addr="http://10.0.0.1:50051"))
        self.assertEqual(default_virtual_host_domains(config), ("localhost",))

    def test_query(self) -> None:
        """
        Query pairs are decoded ('+' is a space), in order, first value wins.
        """
        query = Query.parse(b"prefix=a+b%2Bc&uploads&prefix=z")
        self.assertEqual(query.get("prefix"), "a b+c")
        self.assertIn("uploads", query)
        self.assertEqual(query.get("uploads"), "")
        self.assertEqual(query.names(), frozenset({"prefix", "uploads"}))

    def test_parse_int(self) -> None:
        """
        Integers are decimal and range-checked; anything else is
        InvalidArgument naming the parameter.
        """
        self.assertEqual(parse_int("10", "max-keys"), 10)
        self.assertEqual(parse_int("0", "max-keys"), 0)
        for bad in ("-1", "abc", "1.5", "", "\u0661", "9" * 30):
            e = self.assertRaises(InvalidArgument, parse_int, bad, "max-keys")
            self.assertEqual(e.extra["ArgumentName"], "max-keys")
        self.assertRaises(InvalidArgument, parse_int, "11", "n", 1, 10)


class XmlTests(SynchronousTestCase):
    """
    Response documents are well-formed; request documents are parsed
    safely.
    """

    def test_document(self) -> None:
        """
        Text is escaped, characters XML cannot carry are replaced, empty
        elements are self-closed, booleans are lower case.
        """
        root = document("R")
        root.text("Key", "a<b>&\"c\x01")
        root.text("Flag", True)
        root.child("Empty")
        body = root.to_bytes()
        self.assertEqual(
            body,
            b'<?xml version="1.0" encoding="UTF-8"?>\n'
            b'<R xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Key>a&lt;b&gt;&amp;"c\xef\xbf\xbd</Key>'
            b"<Flag>true</Flag><Empty/></R>",
        )
        self.assertTrue(Element("L").content("eu-1").to_bytes().endswith(b"\n<L>eu-1</L>"))

    def test_iso8601(self) -> None:
        """
        Times are UTC with milliseconds.
        """
        from datetime import datetime, timedelta, timezone

        moment = datetime(2024, 5, 1, 14, 0, 0, 123456, tzinfo=timezone(timedelta(hours=2)))
        self.assertEqual(iso8601(moment), "2024-05-01T12:00:00.123Z")

    def test_parse(self) -> None:
        """
        Elements are found by local name, with or without the namespace;
        raw text keeps surrounding whitespace.
        """
        node = parse_xml(
            b'<?xml version="1.0"?>\n<Delete xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            b"<Quiet>true</Quiet><Object><Key>  </Key></Object><Object><Key>a&amp;b</Key></Object></Delete>",
            "Delete",
        )
        self.assertEqual(node.find_text("Quiet"), "true")
        self.assertEqual([o.find("Key").raw for o in node.children("Object")], ["  ", "a&b"])  # type: ignore[union-attr]
        self.assertIsNone(node.find_text("Missing"))

    def test_refused(self) -> None:
        """
        Empty, oversized, ill-formed, DOCTYPE/entity-bearing, too deep and
        wrong-root documents are all MalformedXML.
        """
        laughs = (
            b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
            b'<!ENTITY lol2 "&lol;&lol;&lol;">]><Delete>&lol2;</Delete>'
        )
        external = b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><Delete>&e;</Delete>'
        for body in (
            b"",
            b"<Delete>",
            b"<Delete>&undefined;</Delete>",
            laughs,
            external,
            b"<Other/>",
            b"<Delete/><Delete/>",
            b"<Delete>" + b"<a>" * 40 + b"</a>" * 40 + b"</Delete>",
            b"\xff\xfe<",
        ):
            self.assertRaises(MalformedXML, parse_xml, body, "Delete")
        self.assertRaises(MalformedXML, parse_xml, b"<Delete>" + b" " * 100 + b"</Delete>", "Delete", 50)


class BucketNameTests(SynchronousTestCase):
    """
    New bucket names follow the AWS rules; Anvil reserves two more.
    """

    def test_valid(self) -> None:
        """
        Lower-case letters, digits, dots and hyphens, 3 to 63 long.
        """
        for name in ("abc", "my-bucket", "my.bucket.2", "a" * 63, "1bucket"):
            check_bucket_name(name)

    def test_invalid(self) -> None:
        """
        Everything else is InvalidBucketName, including the reserved names.
        """
        for name in (
            "ab",
            "a" * 64,
            "Upper",
            "under_score",
            "-start",
            "end-",
            "a..b",
            "a.-b",
            "192.168.1.1",
            "xn--abc",
            "sthree-x",
            "name-s3alias",
            "ready",
            "metrics",
            "sp ace",
            "",
        ):
            e = self.assertRaises(InvalidBucketName, check_bucket_name, name)
            self.assertEqual(e.extra["BucketName"], name)


# Resource rendering ------------------------------------------------------------


class _FakeStore:
    """
    A global store with no apps (every signed request has an unknown key).
    """

    async def get_app_by_client_id(self, client_id: str) -> dict[str, Any]:
        raise NotFound("client id", client_id)


class _Buckets:
    """
    A bucket store whose lookups fail as configured, or find a public
    bucket named C{public}.
    """

    def __init__(self, failure: Exception | None) -> None:
        self.failure = failure

    async def get_bucket(self, name: str) -> Bucket | None:
        if self.failure is not None:
            raise self.failure
        if name == "public":
            return Bucket(1, name, 1, "t", "us-east-1", True, datetime.now(UTC))
        return None


def _site(failure: Exception | None = None) -> tuple[AnvilSite, Metrics]:
    clock = Clock()
    metrics = Metrics()
    service = S3Service(
        NodeConfig(),
        clock,
        _FakeStore(),  # type: ignore[arg-type]
        _Buckets(failure),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        metrics,
    )
    readiness = Readiness([], timeout=1, clock=clock)
    root = RootResource(readiness, metrics, s3=service.resource())
    return AnvilSite(root, metrics, clock), metrics


def _request(site: AnvilSite, method: str, target: str, headers: dict[str, str] | None = None) -> bytes:
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 1234))
    protocol = site.buildProtocol(IPv4Address("TCP", "192.0.2.1", 1234))
    protocol.makeConnection(transport)
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    protocol.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    return transport.value()


def _status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


class RenderingTests(SynchronousTestCase):
    """
    Errors are S3 documents with Resource and RequestId; failures of the
    database are 503; anything unexpected is a logged 500 without details.
    """

    def test_error_document(self) -> None:
        """
        An anonymous request for a missing bucket is NoSuchBucket with the
        resource, the request id (also in x-amz-request-id) and the metric
        label of the operation.
        """
        site, metrics = _site()
        response = _request(site, "GET", "/no-such-bucket/some%20key?acl")
        self.assertEqual(_status(response), 404)
        request_id = re.search(rb"x-amz-request-id: ([0-9A-F]{16})", response, re.IGNORECASE)
        assert request_id is not None
        self.assertIn(b"<Code>NoSuchBucket</Code>", response)
        self.assertIn(b"<Resource>/no-such-bucket/some key</Resource>", response)
        self.assertIn(b"<RequestId>" + request_id.group(1) + b"</RequestId>", response)
        self.assertIn(b"<BucketName>no-such-bucket</BucketName>", response)
        self.assertIn(b"Content-Type: application/xml", response)
        from tests.test_metrics import requests_total

        self.assertEqual(requests_total(metrics, "s3", "GetObjectAcl", "4xx"), 1)

    def test_head_error_has_no_body(self) -> None:
        """
        Errors answering HEAD carry the status and headers only.
        """
        site, _ = _site()
        response = _request(site, "HEAD", "/no-such-bucket/k")
        self.assertEqual(_status(response), 404)
        self.assertTrue(response.endswith(b"\r\n\r\n"), response)
        self.assertNotIn(b"<Error>", response)

    def test_database_down(self) -> None:
        """
        A database outage is 503 ServiceUnavailable.
        """
        site, _ = _site(DatabaseUnavailable("no connection"))
        with capturedLogs() as events:
            response = _request(site, "GET", "/bucket")
        self.assertEqual(_status(response), 503)
        self.assertIn(b"<Code>ServiceUnavailable</Code>", response)
        self.assertTrue(any("no connection" in str(e.get("reason")) for e in events))

    def test_unexpected_failure(self) -> None:
        """
        An unexpected exception is logged with its traceback and answered
        with InternalError, without the exception's text.
        """
        site, _ = _site(RuntimeError("secret detail"))
        with capturedLogs() as events:
            response = _request(site, "GET", "/bucket")
        self.assertEqual(_status(response), 500)
        self.assertIn(b"<Code>InternalError</Code>", response)
        self.assertNotIn(b"secret detail", response)
        self.assertNotIn(b"Traceback", response)
        failures = [e for e in events if "log_failure" in e]
        self.assertEqual(len(failures), 1)
        self.assertIsInstance(failures[0]["log_failure"].value, RuntimeError)
        self.flushLoggedErrors(RuntimeError)

    def test_unknown_access_key(self) -> None:
        """
        A signed request with an unknown access key is InvalidAccessKeyId,
        checked before the operation is refused for its sub-resource.
        """
        site, _ = _site()
        authorization = (
            "AWS4-HMAC-SHA256 Credential=AKNOPE/20240101/us-east-1/s3/aws4_request, "
            "SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature=" + "0" * 64
        )
        response = _request(
            site,
            "GET",
            "/bucket?analytics",
            {
                "Authorization": authorization,
                "x-amz-date": "20240101T000000Z",
                "x-amz-content-sha256": "UNSIGNED-PAYLOAD",
            },
        )
        self.assertEqual(_status(response), 403)
        self.assertIn(b"<Code>InvalidAccessKeyId</Code>", response)

    def test_not_implemented_anonymous(self) -> None:
        """
        An anonymous request for an unimplemented sub-resource is refused
        as NotImplemented only after authentication (anonymous passes).
        """
        site, _ = _site()
        response = _request(site, "GET", "/bucket?analytics")
        self.assertEqual(_status(response), 501)
        self.assertIn(b"<Code>NotImplemented</Code>", response)

    def test_key_too_long(self) -> None:
        """
        Keys over 1,024 UTF-8 bytes are KeyTooLongError.
        """
        site, _ = _site()
        response = _request(site, "GET", "/bucket/" + "%C3%A9" * 513)
        self.assertEqual(_status(response), 400)
        self.assertIn(b"<Code>KeyTooLongError</Code>", response)

    def test_invalid_uri(self) -> None:
        """
        A path that is not UTF-8 is InvalidURI, not a 500.
        """
        site, _ = _site()
        response = _request(site, "GET", "/bucket/%FF")
        self.assertEqual(_status(response), 400)
        self.assertIn(b"<Code>InvalidURI</Code>", response)


class HandlerResponseTests(SynchronousTestCase):
    """
    Handler responses are rendered faithfully, and a body that fails before
    its first byte becomes a clean error response.
    """

    def handle(self, handler: Any, method: str = "GET") -> bytes:
        self.patch(dispatch, "_resolved", {"object:get_object": handler, "object:head_object": handler})
        site, _ = _site()
        return _request(site, method, "/public/key")

    def test_bytes_body(self) -> None:
        """
        A bytes body gets its Content-Length and an XML Content-Type unless
        the handler set one; HEAD sends the headers only.
        """

        async def handler(call: dispatch.S3Call) -> dispatch.S3Response:
            self.assertEqual((call.bucket_name, call.key, call.operation), ("public", "key", call.operation))
            return dispatch.S3Response(200, [("ETag", '"abc"'), ("x-amz-meta-a", "1")], b"<x/>")

        response = self.handle(handler)
        self.assertEqual(_status(response), 200)
        self.assertIn(b"Content-Length: 4\r\n", response)
        self.assertIn(b"Content-Type: application/xml", response)
        self.assertIn(b"ETag: \"abc\"", response)
        self.assertTrue(response.endswith(b"\r\n\r\n<x/>"))
        response = self.handle(handler, "HEAD")
        self.assertIn(b"Content-Length: 4\r\n", response)
        self.assertTrue(response.endswith(b"\r\n\r\n"))

    def test_body_fails_at_once(self) -> None:
        """
        A streamed body that fails before its first chunk is answered with
        InternalError, without the headers of the success.
        """

        async def chunks() -> AsyncIterator[bytes]:
            raise RuntimeError("disk on fire")
            yield b""  # pragma: no cover

        async def handler(call: dispatch.S3Call) -> dispatch.S3Response:
            return dispatch.S3Response(200, [("ETag", '"abc"'), ("Content-Length", "10")], chunks())

        with capturedLogs():
            response = self.handle(handler)
        self.flushLoggedErrors(RuntimeError)
        self.assertEqual(_status(response), 500)
        self.assertIn(b"<Code>InternalError</Code>", response)
        self.assertNotIn(b"ETag", response)
        self.assertIn(b"x-amz-request-id", response.lower())
        self.assertIn(b"date:", response.lower())
