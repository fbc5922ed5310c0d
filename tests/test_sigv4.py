# -*- test-case-name: tests.test_sigv4 -*-
"""
Tests for L{anvil.s3.sigv4}: the AWS documentation's worked examples,
requests signed by botocore's pure-Python and CRT signers (header and
presigned), tampering, clocks, and malformed authentication.
"""

from __future__ import annotations

import calendar
import hashlib
import hmac
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, unquote_to_bytes, urlsplit

import botocore.auth
import botocore.crt.auth
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.crt.auth import CrtS3SigV4Auth, CrtS3SigV4QueryAuth
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from anvil.s3 import sigv4
from anvil.s3.errors import (
    AccessDenied,
    AuthorizationHeaderMalformed,
    AuthorizationQueryParametersError,
    InvalidArgument,
    InvalidRequest,
    InvalidToken,
    RequestTimeTooSkewed,
    S3Error,
    SignatureDoesNotMatch,
    XAmzContentSHA256Mismatch,
)
from anvil.s3.sigv4 import (
    EMPTY_SHA256,
    AuthRequest,
    PayloadMode,
    canonical_query_string,
    canonical_uri,
    header_map,
    parse_query,
    parse_request_auth,
    signing_key,
    verify,
)

# The AWS documentation's example credentials.
DOC_KEY = "AKIAIOSFODNN7EXAMPLE"
DOC_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
DOC_TIME = calendar.timegm((2013, 5, 24, 0, 0, 0))

KEY = "AKIDANVILTEST"
SECRET = "s3cr3t/with+chars=and~more"
SIGNING_TIME = datetime(2026, 3, 1, 12, 34, 56, tzinfo=UTC)
NOW = SIGNING_TIME.timestamp()

# Keys that exercise path encoding: spaces, '+', '%', unicode, dot
# segments, leading and trailing slashes, and every reserved character.
AWKWARD_KEYS = [
    "plain.txt",
    "with space/and+plus",
    "percent%20literal%",
    "unicode/ключ/日本語/é.txt",
    "../up/./dot/..",
    "/leading/slash",
    "trailing/slash/",
    "//double//slashes//",
    "reserved !#$&'()*,;=@[]:?",
    "tilde~and_under-score.",
    "emoji \U0001f600",
]


def _botocore_time(remove_tzinfo: bool = True) -> datetime:
    return SIGNING_TIME.replace(tzinfo=None) if remove_tzinfo else SIGNING_TIME


def _wire(request: AWSRequest) -> tuple[str, bytes, bytes, dict[str, str]]:
    """
    What the server receives for a botocore request: the method, the raw
    path and query, and the headers as http.client encodes them (ISO-8859-1),
    with the Host header the HTTP client adds.
    """
    split = urlsplit(request.url)
    raw: list[tuple[bytes, bytes]] = []
    for name, value in request.headers.items():
        if isinstance(value, str):
            value = value.encode("latin-1")
        raw.append((name.encode("latin-1"), value))
    if not any(name.lower() == b"host" for name, _ in raw):
        host = split.netloc
        if (split.scheme, split.port) in (("http", 80), ("https", 443)):
            host = split.hostname or host
        raw.append((b"Host", host.encode("ascii")))
    return request.method, split.path.encode("ascii"), split.query.encode("ascii"), header_map(raw)


def _parse(request: AWSRequest) -> AuthRequest:
    auth = parse_request_auth(*_wire(request))
    assert auth is not None
    return auth


def _doc_auth(signature: str, signed_headers: str) -> str:
    return (
        f"AWS4-HMAC-SHA256 Credential={DOC_KEY}/20130524/us-east-1/s3/aws4_request,"
        f"SignedHeaders={signed_headers},Signature={signature}"
    )


class _SigningTestCase(SynchronousTestCase):
    """
    Signs requests with botocore at a fixed time.
    """

    def setUp(self) -> None:
        self.patch(botocore.auth, "get_current_datetime", _botocore_time)
        self.patch(botocore.crt.auth, "get_current_datetime", _botocore_time)

    def sign(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str] | None = None,
        body: bytes = b"",
        crt: bool = False,
        secret: str = SECRET,
        region: str = "eu-west-3",
        sign_payload: bool | None = None,
    ) -> AWSRequest:
        """Sign a request with S3SigV4Auth, or CrtS3SigV4Auth when C{crt}."""
        request = AWSRequest(method=method, url=url, headers=dict(headers or {}), data=body)
        if sign_payload is not None:
            request.context["payload_signing_enabled"] = sign_payload
        signer = CrtS3SigV4Auth if crt else S3SigV4Auth
        signer(Credentials(KEY, secret), "s3", region).add_auth(request)
        return request

    def presign(
        self,
        method: str,
        url: str,
        expires: int = 3600,
        headers: Mapping[str, str] | None = None,
        crt: bool = False,
    ) -> AWSRequest:
        """Presign a request with S3SigV4QueryAuth (or its CRT variant)."""
        request = AWSRequest(method=method, url=url, headers=dict(headers or {}))
        signer = CrtS3SigV4QueryAuth if crt else S3SigV4QueryAuth
        signer(Credentials(KEY, SECRET), "s3", "us-east-1", expires=expires).add_auth(request)
        return request

    def accept(self, request: AWSRequest, now: float = NOW) -> sigv4.VerifiedAuth:
        """Parse and verify a signed request with the right secret."""
        auth = _parse(request)
        self.assertEqual(auth.access_key, KEY)
        return verify(auth, SECRET, now)

    def refuse(
        self, request: AWSRequest, error: type[S3Error], secret: str = SECRET, now: float = NOW
    ) -> S3Error:
        """Parse and verify, expecting C{error}."""
        try:
            verify(_parse(request), secret, now)
        except S3Error as raised:
            self.assertIsInstance(raised, error)
            return raised
        self.fail(f"{request.method} {request.url} was accepted")


class DocumentationExampleTests(SynchronousTestCase):
    """
    The worked examples of the AWS SigV4 documentation verify.
    """

    def check(self, method: str, path: bytes, query: bytes, headers: dict[str, str]) -> None:
        auth = parse_request_auth(method, path, query, header_map(headers))
        assert auth is not None
        verified = verify(auth, DOC_SECRET, DOC_TIME)
        self.assertEqual(verified.access_key, DOC_KEY)
        self.assertEqual(str(verified.scope), "20130524/us-east-1/s3/aws4_request")
        with self.assertRaises(SignatureDoesNotMatch):
            verify(auth, DOC_SECRET + "x", DOC_TIME)

    def test_get_object(self) -> None:
        """Example: GET Object with a Range header."""
        self.check(
            "GET",
            b"/test.txt",
            b"",
            {
                "Host": "examplebucket.s3.amazonaws.com",
                "Range": "bytes=0-9",
                "x-amz-content-sha256": EMPTY_SHA256,
                "x-amz-date": "20130524T000000Z",
                "Authorization": _doc_auth(
                    "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
                    "host;range;x-amz-content-sha256;x-amz-date",
                ),
            },
        )

    def test_put_object(self) -> None:
        """Example: PUT Object, with a Date header and an encoded '$' in the key."""
        body = b"Welcome to Amazon S3."
        self.check(
            "PUT",
            b"/test%24file.text",
            b"",
            {
                "Host": "examplebucket.s3.amazonaws.com",
                "Date": "Fri, 24 May 2013 00:00:00 GMT",
                "x-amz-date": "20130524T000000Z",
                "x-amz-storage-class": "REDUCED_REDUNDANCY",
                "x-amz-content-sha256": hashlib.sha256(body).hexdigest(),
                "Authorization": _doc_auth(
                    "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd",
                    "date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class",
                ),
            },
        )

    def test_list_objects(self) -> None:
        """Example: GET Bucket (List Objects) with a query string."""
        self.check(
            "GET",
            b"/",
            b"max-keys=2&prefix=J",
            {
                "Host": "examplebucket.s3.amazonaws.com",
                "x-amz-content-sha256": EMPTY_SHA256,
                "x-amz-date": "20130524T000000Z",
                "Authorization": _doc_auth(
                    "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
                    "host;x-amz-content-sha256;x-amz-date",
                ),
            },
        )

    def test_presigned(self) -> None:
        """Example: a presigned GET Object URL valid for a day."""
        query = (
            b"X-Amz-Algorithm=AWS4-HMAC-SHA256"
            b"&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request"
            b"&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
            b"&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
        )
        headers = header_map({"Host": "examplebucket.s3.amazonaws.com"})
        auth = parse_request_auth("GET", b"/test.txt", query, headers)
        assert auth is not None
        self.assertTrue(auth.presigned)
        self.assertEqual(auth.payload_mode, PayloadMode.UNSIGNED)
        verify(auth, DOC_SECRET, DOC_TIME + 86400)
        error = self.assertRaises(AccessDenied, verify, auth, DOC_SECRET, DOC_TIME + 86401)
        self.assertEqual(error.message, "Request has expired")
        self.assertEqual(error.extra["X-Amz-Expires"], "86400")

    def test_streaming_seed(self) -> None:
        """The seed signatures of the chunked-upload examples verify."""
        headers = {
            "Host": "s3.amazonaws.com",
            "x-amz-date": "20130524T000000Z",
            "x-amz-storage-class": "REDUCED_REDUNDANCY",
            "Content-Encoding": "aws-chunked",
            "x-amz-decoded-content-length": "66560",
        }
        plain = dict(
            headers,
            **{
                "x-amz-content-sha256": sigv4.STREAMING_SIGNED,
                "Content-Length": "66824",
                "Authorization": _doc_auth(
                    "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9",
                    "content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;"
                    "x-amz-decoded-content-length;x-amz-storage-class",
                ),
            },
        )
        auth = parse_request_auth("PUT", b"/examplebucket/chunkObject.txt", b"", header_map(plain))
        assert auth is not None
        verified = verify(auth, DOC_SECRET, DOC_TIME)
        self.assertEqual(verified.payload_mode, PayloadMode.STREAMING_SIGNED)
        self.assertEqual(verified.decoded_content_length, 66560)
        self.assertEqual(verified.seed_signature, auth.signature)
        trailer = dict(
            headers,
            **{
                "x-amz-content-sha256": sigv4.STREAMING_SIGNED_TRAILER,
                "x-amz-trailer": "x-amz-checksum-crc32c",
                "Authorization": _doc_auth(
                    "106e2a8a18243abcf37539882f36619c00e2dfc72633413f02d3b74544bfeb8e",
                    "content-encoding;host;x-amz-content-sha256;x-amz-date;"
                    "x-amz-decoded-content-length;x-amz-storage-class;x-amz-trailer",
                ),
            },
        )
        auth = parse_request_auth(
            "PUT", b"/examplebucket/chunkObject.txt", b"", header_map(trailer)
        )
        assert auth is not None
        verified = verify(auth, DOC_SECRET, DOC_TIME)
        self.assertEqual(verified.payload_mode, PayloadMode.STREAMING_SIGNED_TRAILER)
        self.assertEqual(verified.trailer, "x-amz-checksum-crc32c")

    def test_chunk_signatures(self) -> None:
        """The chunk and trailer signature chain reproduces the documented values."""
        key = signing_key(DOC_SECRET, "20130524", "us-east-1", "s3")
        signer = sigv4.ChunkSigner(
            key,
            "20130524T000000Z",
            "20130524/us-east-1/s3/aws4_request",
            "106e2a8a18243abcf37539882f36619c00e2dfc72633413f02d3b74544bfeb8e",
        )
        chunks = [b"a" * 65536, b"a" * 1024, b""]
        expected = [
            "b474d8862b1487a5145d686f57f013e54db672cee1c953b3010fb58501ef5aa2",
            "1c1344b170168f8e65b41376b44b20fe354e373826ccbbe2c1d40a8cae51e5c7",
            "2ca2aba2005185cf7159c6277faf83795951dd77a3a99e6e65d5c9f85863f992",
        ]
        for chunk, signature in zip(chunks, expected, strict=True):
            self.assertEqual(signer.sign_chunk(hashlib.sha256(chunk).hexdigest()), signature)
        self.assertEqual(
            signer.sign_trailer(b"x-amz-checksum-crc32c:sOO8/Q==\n"),
            "d81f82fc3505edab99d459891051a732e8730629a2e4a59689829ca17fe2e435",
        )


class BotocoreHeaderAuthTests(_SigningTestCase):
    """
    Requests signed by botocore (pure Python and CRT) verify, and any change
    to what was signed is refused.
    """

    def test_awkward_keys(self) -> None:
        """Keys with spaces, '+', '%', unicode, dot segments and slashes verify."""
        for crt in (False, True):
            for key in AWKWARD_KEYS:
                url = "https://s3.example.test:9000/bucket/" + quote(key, safe="/~")
                with self.subTest(key=key, crt=crt):
                    verified = self.accept(self.sign("GET", url, crt=crt))
                    self.assertIn(verified.payload_mode, (PayloadMode.UNSIGNED, PayloadMode.SHA256))

    def test_queries(self) -> None:
        """Query strings with subresources, repeats and special characters verify."""
        queries = [
            "uploads",
            "list-type=2&prefix=a%20b%2Bc%2F%25&delimiter=%2F&encoding-type=url",
            "partNumber=3&uploadId=abc%2Fdef%3D%3D",
            "delete=",
            "x=2&x=1&x=10&y=",
            "continuation-token=" + quote("tok+en/with=chars", safe=""),
            "prefix=" + quote("ключ é", safe=""),
        ]
        for crt in (False, True):
            for query in queries:
                with self.subTest(query=query, crt=crt):
                    self.accept(self.sign("GET", f"http://localhost:50051/bucket?{query}", crt=crt))

    def test_signed_payload(self) -> None:
        """A signed SHA-256 payload verifies, and the body is checked against it."""
        body = b"hello world" * 1000
        for crt in (False, True):
            request = self.sign("PUT", "http://localhost/bucket/key", body=body, crt=crt)
            verified = self.accept(request)
            self.assertEqual(verified.payload_mode, PayloadMode.SHA256)
            self.assertEqual(verified.payload_sha256, hashlib.sha256(body).hexdigest())
            checker = verified.payload_verifier()
            assert checker is not None
            checker.update(body[:7])
            checker.update(body[7:])
            checker.finish()
            tampered = verified.payload_verifier()
            assert tampered is not None
            tampered.update(body[:-1] + b"X")
            error = self.assertRaises(XAmzContentSHA256Mismatch, tampered.finish)
            self.assertEqual(error.extra["ClientComputedContentSHA256"], verified.payload_sha256)

    def test_metadata_headers(self) -> None:
        """Signed metadata with folded whitespace and non-ASCII text verifies."""
        headers = {
            "x-amz-meta-spaces": "  several   inner    spaces  ",
            "x-amz-meta-latin": "café",
            "Content-Type": "text/plain; charset=utf-8",
        }
        for crt in (False, True):
            self.accept(self.sign("PUT", "https://h/bucket/k", headers=headers, crt=crt))

    def test_any_region(self) -> None:
        """Any region in the credential scope is accepted as a signing input."""
        for region in ("us-east-1", "eu-central-1", "anvil-local", "auto"):
            verified = self.accept(self.sign("GET", "https://h/b/k", region=region))
            self.assertEqual(verified.scope.region, region)

    def test_wrong_secret(self) -> None:
        """A request signed with another secret is SignatureDoesNotMatch."""
        request = self.sign("GET", "https://h/b/k", secret="other")
        error = self.refuse(request, SignatureDoesNotMatch)
        self.assertEqual(error.extra["AWSAccessKeyId"], KEY)
        self.assertIn("CanonicalRequest", error.extra)
        self.assertTrue(error.extra["StringToSign"].startswith("AWS4-HMAC-SHA256\n"))

    def test_tampering(self) -> None:
        """Changing the method, path, query or a signed header breaks the signature."""

        def changed(**change: Any) -> AWSRequest:
            request = self.sign("GET", "https://h/bucket/a%20key?prefix=p", {"Range": "bytes=0-9"})
            for name, value in change.items():
                if name == "header":
                    request.headers.replace_header(value[0], value[1])
                else:
                    setattr(request, name, value)
            return request

        for request in (
            changed(method="DELETE"),
            changed(url="https://h/bucket/a%20kez?prefix=p"),
            changed(url="https://h/bucket/a+key?prefix=p"),
            changed(url="https://h/bucket/a%20key/?prefix=p"),
            changed(url="https://h/bucket/a%20key?prefix=q"),
            changed(url="https://h/bucket/a%20key?prefix=p&acl"),
            changed(url="https://h/bucket/a%20key"),
            changed(url="https://other/bucket/a%20key?prefix=p"),
            changed(header=("Range", "bytes=0-10")),
        ):
            self.refuse(request, SignatureDoesNotMatch)

    def test_encoded_slash_differs(self) -> None:
        """A %2F inside a segment is not the same request as a real slash."""
        request = self.sign("GET", "https://h/bucket/a%2Fb")
        self.accept(request)
        request.url = "https://h/bucket/a/b"
        self.refuse(request, SignatureDoesNotMatch)

    def test_unsigned_amz_header(self) -> None:
        """An x-amz-* header added after signing is refused; other headers are not."""
        request = self.sign("PUT", "https://h/bucket/key")
        request.headers["User-Agent"] = "added later"
        self.accept(request)
        request.headers["x-amz-copy-source"] = "/other/secret"
        error = self.assertRaises(AccessDenied, parse_request_auth, *_wire(request))
        self.assertEqual(error.extra["HeadersNotSigned"], "x-amz-copy-source")

    def test_clock_skew(self) -> None:
        """Fifteen minutes of skew either way are allowed, more is RequestTimeTooSkewed."""
        request = self.sign("GET", "https://h/b/k")
        for offset in (-900, 0, 900):
            self.accept(request, now=NOW + offset)
        for offset in (-901, 901, 86400):
            error = self.refuse(request, RequestTimeTooSkewed, now=NOW + offset)
            self.assertEqual(error.extra["RequestTime"], "20260301T123456Z")
            self.assertEqual(error.extra["MaxAllowedSkewMilliseconds"], "900000")

    def test_date_header_only(self) -> None:
        """A request dated by the Date header alone (no x-amz-date) verifies."""
        date = "Sun, 01 Mar 2026 12:34:56 GMT"
        canonical = (
            "GET\n/b/k\n\n"
            f"date:{date}\nhost:h\nx-amz-content-sha256:UNSIGNED-PAYLOAD\n\n"
            "date;host;x-amz-content-sha256\nUNSIGNED-PAYLOAD"
        )
        signature = _independent_signature(canonical, "20260301T123456Z", "20260301/us-east-1")
        headers = header_map(
            {
                "Host": "h",
                "Date": date,
                "x-amz-content-sha256": "UNSIGNED-PAYLOAD",
                "Authorization": "AWS4-HMAC-SHA256 "
                f"Credential={KEY}/20260301/us-east-1/s3/aws4_request, "
                f"SignedHeaders=date;host;x-amz-content-sha256, Signature={signature}",
            }
        )
        auth = parse_request_auth("GET", b"/b/k", b"", headers)
        assert auth is not None
        verify(auth, SECRET, NOW)
        self.assertRaises(RequestTimeTooSkewed, verify, auth, SECRET, NOW + 3600)

    def test_raw_utf8_header(self) -> None:
        """A client that signs the raw UTF-8 bytes it sends is accepted too."""
        value = "žluťoučký kůň".encode()
        canonical = (
            b"PUT\n/b/k\n\nhost:h\nx-amz-content-sha256:UNSIGNED-PAYLOAD\n"
            b"x-amz-date:20260301T123456Z\nx-amz-meta-name:" + value + b"\n\n"
            b"host;x-amz-content-sha256;x-amz-date;x-amz-meta-name\nUNSIGNED-PAYLOAD"
        )
        signature = _independent_signature(canonical, "20260301T123456Z", "20260301/us-east-1")
        headers = header_map(
            [
                (b"Host", b"h"),
                (b"x-amz-content-sha256", b"UNSIGNED-PAYLOAD"),
                (b"x-amz-date", b"20260301T123456Z"),
                (b"x-amz-meta-name", value),
                (
                    b"Authorization",
                    f"AWS4-HMAC-SHA256 Credential={KEY}/20260301/us-east-1/s3/"
                    "aws4_request,SignedHeaders=host;x-amz-content-sha256;x-amz-date;x-amz-meta-name,"
                    f"Signature={signature}".encode(),
                ),
            ]
        )
        auth = parse_request_auth("PUT", b"/b/k", b"", headers)
        assert auth is not None
        verify(auth, SECRET, NOW)

    def test_boto3_client_request(self) -> None:
        """A PutObject as a boto3 client sends it (aws-chunked, CRC32 trailer) verifies."""
        request = _boto3_put(self, b"hello world", "some key+with/odd chars %")
        verified = self.accept(request)
        self.assertEqual(verified.payload_mode, PayloadMode.STREAMING_UNSIGNED_TRAILER)
        self.assertEqual(verified.trailer, "x-amz-checksum-crc32")
        self.assertEqual(verified.decoded_content_length, 11)


def _boto3_put(case: SynchronousTestCase, body: bytes, key: str) -> AWSRequest:
    """
    Capture the request a real boto3 client sends for PutObject over HTTPS
    (where botocore uses an unsigned aws-chunked body with a CRC32 trailer).
    """
    import boto3
    from botocore.awsrequest import AWSResponse

    captured: list[AWSRequest] = []

    class _Raw:
        def stream(self, *args: object, **kwargs: object) -> Any:
            return iter([b""])

    def before_send(request: AWSRequest, **kwargs: object) -> AWSResponse:
        captured.append(request)
        return AWSResponse(request.url, 200, {}, _Raw())

    client = boto3.client(
        "s3",
        endpoint_url="https://localhost:9000",
        aws_access_key_id=KEY,
        aws_secret_access_key=SECRET,
        region_name="us-east-1",
    )
    client.meta.events.register("before-send.s3.*", before_send)
    client.put_object(Bucket="bucket", Key=key, Body=body)
    case.assertEqual(len(captured), 1)
    return captured[0]


def _independent_signature(canonical: str | bytes, amz_date: str, scope: str) -> str:
    """Compute a SigV4 signature from an explicit canonical request."""
    if isinstance(canonical, str):
        canonical = canonical.encode("utf-8")
    full_scope = f"{scope}/s3/aws4_request"
    string_to_sign = (
        f"AWS4-HMAC-SHA256\n{amz_date}\n{full_scope}\n{hashlib.sha256(canonical).hexdigest()}"
    )
    date, region = scope.split("/")
    key = ("AWS4" + SECRET).encode()
    for part in (date, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


class PresignedTests(_SigningTestCase):
    """
    Presigned URLs from botocore verify until they expire.
    """

    def test_accepted(self) -> None:
        """Presigned URLs for awkward keys verify with both signers."""
        for crt in (False, True):
            for key in AWKWARD_KEYS:
                url = "https://s3.example.test/bucket/" + quote(key, safe="/~") + "?versionId=v%2B1"
                with self.subTest(key=key, crt=crt):
                    verified = self.accept(self.presign("GET", url, crt=crt))
                    self.assertTrue(verified.presigned)
                    self.assertEqual(verified.payload_mode, PayloadMode.UNSIGNED)

    def test_signed_headers(self) -> None:
        """Headers signed into a presigned URL must be sent unchanged."""
        request = self.presign("PUT", "https://h/b/k", headers={"x-amz-meta-a": "1"})
        self.accept(request)
        request.headers.replace_header("x-amz-meta-a", "2")
        self.refuse(request, SignatureDoesNotMatch)

    def test_unsigned_amz_header(self) -> None:
        """An x-amz-* header not signed into a presigned URL is refused."""
        request = self.presign("PUT", "https://h/b/k")
        request.headers["x-amz-acl"] = "public-read"
        self.assertRaises(AccessDenied, parse_request_auth, *_wire(request))

    def test_expiry(self) -> None:
        """A presigned URL is valid until its expiry, then AccessDenied."""
        for crt in (False, True):
            request = self.presign("GET", "https://h/b/k", expires=60, crt=crt)
            self.accept(request, now=NOW + 60)
            error = self.refuse(request, AccessDenied, now=NOW + 61)
            self.assertEqual(error.message, "Request has expired")
            self.assertEqual(error.extra["Expires"], "2026-03-01T12:35:56Z")

    def test_not_yet_valid(self) -> None:
        """A URL dated more than fifteen minutes in the future is refused."""
        request = self.presign("GET", "https://h/b/k")
        self.accept(request, now=NOW - 900)
        self.refuse(request, AccessDenied, now=NOW - 901)

    def test_seven_days(self) -> None:
        """Seven days is the longest lifetime; longer URLs are refused when parsed."""
        self.accept(self.presign("GET", "https://h/b/k", expires=604800), now=NOW + 604800)
        request = self.presign("GET", "https://h/b/k", expires=604801)
        error = self.assertRaises(
            AuthorizationQueryParametersError, parse_request_auth, *_wire(request)
        )
        self.assertIn("604800", error.message)

    def test_tampered(self) -> None:
        """Changing the path, the query or the method of a presigned URL breaks it."""
        original = self.presign("GET", "https://h/b/key?response-content-type=text%2Fplain")
        for url_change in (
            ("/b/key?", "/b/kez?"),
            ("text%2Fplain", "text%2Fhtml"),
            ("X-Amz-Expires=3600", "X-Amz-Expires=3601"),
        ):
            request = self.presign("GET", "https://h/b/key?response-content-type=text%2Fplain")
            request.url = original.url.replace(*url_change)
            self.assertNotEqual(request.url, original.url)
            self.refuse(request, SignatureDoesNotMatch)
        request = self.presign("GET", "https://h/b/key")
        request.method = "DELETE"
        self.refuse(request, SignatureDoesNotMatch)


class MalformedAuthTests(SynchronousTestCase):
    """
    Malformed authentication gets the error AWS answers.
    """

    def headers(self, **extra: str) -> dict[str, str]:
        base = {
            "host": "h",
            "x-amz-date": "20260301T123456Z",
            "x-amz-content-sha256": "UNSIGNED-PAYLOAD",
        }
        base.update({name.replace("_", "-"): value for name, value in extra.items()})
        return base

    def auth(
        self,
        credential: str = f"{KEY}/20260301/us-east-1/s3/aws4_request",
        signed: str = "host;x-amz-content-sha256;x-amz-date",
        signature: str = "0" * 64,
    ) -> str:
        return (
            f"AWS4-HMAC-SHA256 Credential={credential}, SignedHeaders={signed}, "
            f"Signature={signature}"
        )

    def raises(self, error: type[S3Error], headers: dict[str, str], query: bytes = b"") -> S3Error:
        return self.assertRaises(error, parse_request_auth, "GET", b"/b/k", query, headers)

    def test_anonymous(self) -> None:
        """A request without any authentication is anonymous."""
        self.assertIsNone(parse_request_auth("GET", b"/", b"prefix=a", {"host": "h"}))

    def test_components(self) -> None:
        """Missing, repeated or unknown components are AuthorizationHeaderMalformed."""
        for value in (
            f"AWS4-HMAC-SHA256 Credential={KEY}/20260301/us-east-1/s3/aws4_request",
            "AWS4-HMAC-SHA256 ",
            "AWS4-HMAC-SHA256 Credential=a, Credential=b, SignedHeaders=host, Signature=0",
            self.auth() + ", Extra=1",
            "AWS4-HMAC-SHA256 Credential, SignedHeaders=host, Signature=0",
        ):
            self.raises(AuthorizationHeaderMalformed, self.headers(authorization=value))

    def test_credential(self) -> None:
        """Bad credential scopes are AuthorizationHeaderMalformed with AWS's wording."""
        cases = {
            f"{KEY}/20260301/us-east-1/s3": "the Credential is mal-formed",
            f"{KEY}/2026031/us-east-1/s3/aws4_request": "the Credential is mal-formed",
            f"{KEY}//us-east-1/s3/aws4_request": "the Credential is mal-formed",
            f"{KEY}/20260301/us-east-1/ec2/aws4_request": 'incorrect service "ec2"',
            f"{KEY}/20260301/us-east-1/s3/aws4_reques": 'incorrect terminal "aws4_reques"',
            f"{KEY}/20260302/us-east-1/s3/aws4_request": "Invalid credential date",
        }
        for credential, text in cases.items():
            error = self.raises(
                AuthorizationHeaderMalformed, self.headers(authorization=self.auth(credential))
            )
            self.assertIn(text, error.message)

    def test_signed_headers(self) -> None:
        """SignedHeaders must be well-formed and include host."""
        for signed in (
            "x-amz-content-sha256;x-amz-date",
            "",
            "host;;x-amz-date",
            "host;bad header",
        ):
            self.raises(
                AuthorizationHeaderMalformed, self.headers(authorization=self.auth(signed=signed))
            )

    def test_other_mechanisms(self) -> None:
        """SigV2 is InvalidRequest; unknown schemes are InvalidArgument."""
        error = self.raises(InvalidRequest, self.headers(authorization="AWS AKID:c2lnbmF0dXJl"))
        self.assertIn("AWS4-HMAC-SHA256", error.message)
        error = self.raises(InvalidArgument, self.headers(authorization="Bearer token"))
        self.assertEqual(error.extra["ArgumentName"], "Authorization")
        self.raises(InvalidRequest, {"host": "h"}, b"AWSAccessKeyId=A&Signature=s&Expires=1")

    def test_two_mechanisms(self) -> None:
        """An Authorization header together with presigned parameters is InvalidArgument."""
        self.raises(
            InvalidArgument,
            self.headers(authorization=self.auth()),
            b"X-Amz-Algorithm=AWS4-HMAC-SHA256",
        )

    def test_security_token(self) -> None:
        """Session tokens are refused: Anvil issues none."""
        self.raises(InvalidToken, self.headers(authorization=self.auth(), x_amz_security_token="t"))

    def test_dates(self) -> None:
        """A missing or malformed request date is AccessDenied."""
        headers = self.headers(authorization=self.auth())
        del headers["x-amz-date"]
        self.raises(AccessDenied, headers)
        self.raises(AccessDenied, self.headers(authorization=self.auth(), x_amz_date="2026-03-01"))
        headers["date"] = "not a date"
        self.raises(AccessDenied, headers)

    def test_payload_hash(self) -> None:
        """x-amz-content-sha256 is required and must be a known mode or a SHA-256."""
        headers = self.headers(authorization=self.auth())
        del headers["x-amz-content-sha256"]
        error = self.raises(InvalidRequest, headers)
        self.assertIn("x-amz-content-sha256", error.message)
        for value in ("abc", "STREAMING-AWS4-ECDSA-P256-SHA256-PAYLOAD", "g" * 64):
            error = self.raises(
                InvalidArgument,
                self.headers(authorization=self.auth(), x_amz_content_sha256=value),
            )
            self.assertEqual(error.extra["ArgumentName"], "x-amz-content-sha256")

    def test_decoded_length(self) -> None:
        """x-amz-decoded-content-length must be a non-negative integer."""
        signed = "host;x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length"
        self.raises(
            InvalidArgument,
            self.headers(authorization=self.auth(signed=signed), x_amz_decoded_content_length="-1"),
        )

    def presigned_query(self, **change: str) -> bytes:
        params = {
            "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
            "X-Amz-Credential": f"{KEY}/20260301/us-east-1/s3/aws4_request",
            "X-Amz-Date": "20260301T123456Z",
            "X-Amz-Expires": "60",
            "X-Amz-SignedHeaders": "host",
            "X-Amz-Signature": "0" * 64,
        }
        params.update({name.replace("_", "-"): value for name, value in change.items()})
        return "&".join(
            f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params.items() if v != "DROP"
        ).encode()

    def test_presigned_parameters(self) -> None:
        """Bad presigned parameters are AuthorizationQueryParametersError."""
        for change in (
            {"X_Amz_Signature": "DROP"},
            {"X_Amz_Expires": "DROP"},
            {"X_Amz_Algorithm": "AWS4-HMAC-SHA1"},
            {"X_Amz_Expires": "-5"},
            {"X_Amz_Expires": "0"},
            {"X_Amz_Expires": "soon"},
            {"X_Amz_Expires": "604801"},
            {"X_Amz_Date": "2026-03-01T12:34:56Z"},
            {"X_Amz_Credential": f"{KEY}/20260301/us-east-1/iam/aws4_request"},
            {"X_Amz_Credential": f"{KEY}/20260302/us-east-1/s3/aws4_request"},
            {"X_Amz_SignedHeaders": "x-amz-date"},
        ):
            with self.subTest(change=change):
                self.raises(
                    AuthorizationQueryParametersError, {"host": "h"}, self.presigned_query(**change)
                )

    def test_presigned_streaming(self) -> None:
        """A presigned URL cannot announce an aws-chunked body."""
        query = self.presigned_query(X_Amz_Content_Sha256=sigv4.STREAMING_UNSIGNED_TRAILER)
        self.raises(InvalidRequest, {"host": "h"}, query)


class CanonicalFormTests(SynchronousTestCase):
    """
    The pieces of the canonical request.
    """

    def test_uri(self) -> None:
        """Paths are re-encoded per segment and never normalised."""
        self.assertEqual(canonical_uri(b""), "/")
        self.assertEqual(canonical_uri(b"/"), "/")
        self.assertEqual(canonical_uri(b"/b/a%20b+c"), "/b/a%20b%2Bc")
        self.assertEqual(canonical_uri(b"/b/a%2fb"), "/b/a%2Fb")
        self.assertEqual(canonical_uri(b"/b//../x/./"), "/b//../x/./")
        self.assertEqual(canonical_uri(b"/b/$!~"), "/b/%24%21~")
        self.assertEqual(canonical_uri("/b/é"), "/b/%C3%A9")

    @given(st.binary(max_size=40) | st.text(alphabet="ab/%2F~-._+ 7é", max_size=40).map(str.encode))
    def test_uri_plain_paths(self, path: bytes) -> None:
        """
        The shortcut for paths of unreserved characters gives what decoding
        and re-encoding every segment gives, for any path.
        """
        expected = "/".join(quote(unquote_to_bytes(segment), safe="") for segment in path.split(b"/"))
        self.assertEqual(canonical_uri(path), expected or "/")

    def test_query(self) -> None:
        """Queries decode '+' as space, keep empty values and sort by name then value."""
        pairs = parse_query(b"b=2&a=x+y&a=%2B&uploads&c=&&d=%E2%98%83")
        self.assertEqual(
            pairs,
            [("b", "2"), ("a", "x y"), ("a", "+"), ("uploads", ""), ("c", ""), ("d", "\u2603")],
        )
        self.assertEqual(canonical_query_string(pairs), "a=%2B&a=x%20y&b=2&c=&d=%E2%98%83&uploads=")

    def test_query_invalid_utf8(self) -> None:
        """Bytes that are not UTF-8 survive decoding and re-encoding."""
        self.assertEqual(canonical_query_string(parse_query("k=%FF%FE")), "k=%FF%FE")

    def test_header_map(self) -> None:
        """Header names are lower-cased and repeated values joined with commas."""
        headers = header_map([(b"X-Amz-Meta-A", [b" one ", b"two"]), ("Host", "h")])
        self.assertEqual(headers, {"x-amz-meta-a": "one,two", "host": "h"})

    def test_signing_key_cache(self) -> None:
        """Signing keys are cached and a rotated secret derives a new key."""
        first = signing_key("secret-a", "20260301", "us-east-1")
        self.assertIs(signing_key("secret-a", "20260301", "us-east-1"), first)
        self.assertNotEqual(signing_key("secret-b", "20260301", "us-east-1"), first)
        self.assertEqual(len(first), 32)

    def test_payload_modes(self) -> None:
        """Each x-amz-content-sha256 value maps to its payload mode."""
        self.assertEqual(sigv4.parse_payload_hash("UNSIGNED-PAYLOAD"), (PayloadMode.UNSIGNED, None))
        self.assertEqual(
            sigv4.parse_payload_hash(EMPTY_SHA256.upper()), (PayloadMode.SHA256, EMPTY_SHA256)
        )
        for mode in (
            PayloadMode.STREAMING_SIGNED,
            PayloadMode.STREAMING_SIGNED_TRAILER,
            PayloadMode.STREAMING_UNSIGNED_TRAILER,
        ):
            self.assertEqual(sigv4.parse_payload_hash(mode.value), (mode, None))
            self.assertTrue(mode.chunked)
        self.assertTrue(PayloadMode.STREAMING_SIGNED.signed_chunks)
        self.assertFalse(PayloadMode.STREAMING_UNSIGNED_TRAILER.signed_chunks)
        self.assertTrue(PayloadMode.STREAMING_UNSIGNED_TRAILER.has_trailer)
        self.assertFalse(PayloadMode.SHA256.chunked)
