# -*- test-case-name: tests.test_s3_auth -*-
"""
Tests for L{anvil.s3.authn}: the authenticator and its secret cache,
authorisation (tenant isolation, policies, public buckets) and the payload
reader in every payload mode.

Requests are signed by botocore, as real clients sign them; time is a
L{Clock}.
"""

from __future__ import annotations

import base64
import hashlib
import time
import zlib
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from anvil.errors import NotFound
from anvil.meta.records import Bucket
from anvil.s3.authn import (
    Authenticator,
    PayloadReader,
    Principal,
    authorize,
    content_md5_matches,
)
from anvil.s3.errors import (
    AccessDenied,
    BadDigest,
    IncompleteBody,
    InvalidAccessKeyId,
    InvalidDigest,
    InvalidRequest,
    RequestTimeTooSkewed,
    S3Error,
    SignatureDoesNotMatch,
    XAmzContentSHA256Mismatch,
)
from anvil.s3.sigv4 import ChunkSigner, VerifiedAuth, header_map, parse_query
from tests.s3fixture import sign_request

ACCESS_KEY = "AKTESTTESTTESTTEST01"
SECRET = "secret/secret+secret=secret0123456789ABC"


class _Store:
    """
    A global store holding apps in memory; counts lookups.
    """

    def __init__(self) -> None:
        self.apps: dict[str, dict[str, Any]] = {}
        self.lookups = 0

    def add(self, client_id: str, secret: str, tenant_id: int = 1, policies: Any = (("*", "*"),)) -> None:
        self.apps[client_id] = {
            "id": len(self.apps) + 1,
            "name": f"app{len(self.apps) + 1}",
            "client_id": client_id,
            "client_secret": secret,
            "tenant_id": tenant_id,
            "tenant_name": f"tenant{tenant_id}",
            "policies": [{"action": a, "resource": r} for a, r in policies],
        }

    async def get_app_by_client_id(self, client_id: str) -> dict[str, Any]:
        self.lookups += 1
        if client_id not in self.apps:
            raise NotFound("client id", client_id)
        return self.apps[client_id]


def _signed(
    method: str,
    url: str,
    secret: str = SECRET,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    presign: int | None = None,
) -> tuple[str, bytes, list[tuple[str, str]], dict[str, str]]:
    """
    Sign a request with botocore.

    @return: method, raw path, query pairs and headers as the server sees
        them.
    """
    request = AWSRequest(method=method, url=url, data=body, headers=headers or {})
    credentials = Credentials(ACCESS_KEY, secret)
    if presign is not None:
        S3SigV4QueryAuth(credentials, "s3", "us-east-1", expires=presign).add_auth(request)
    else:
        S3SigV4Auth(credentials, "s3", "us-east-1").add_auth(request)
    parts = urlsplit(request.url)
    sent = dict(request.headers.items())
    sent["Host"] = parts.netloc
    return method, parts.path.encode(), parse_query(parts.query), header_map(sent)


def _run(test: SynchronousTestCase, coroutine: Any) -> Any:
    from twisted.internet.defer import Deferred

    d = Deferred.fromCoroutine(coroutine)
    return test.successResultOf(d)


def _fail(test: SynchronousTestCase, coroutine: Any, error: type[Exception]) -> Exception:
    from twisted.internet.defer import Deferred

    d = Deferred.fromCoroutine(coroutine)
    return test.failureResultOf(d, error).value


class AuthenticatorTests(SynchronousTestCase):
    """
    Signatures are verified against the app's secret, which is cached
    briefly.
    """

    def setUp(self) -> None:
        self.store = _Store()
        self.store.add(ACCESS_KEY, SECRET)
        self.clock = Clock()
        self.clock.advance(time.time())
        self.authenticator = Authenticator(self.store, self.clock, cache_seconds=5, miss_seconds=1)  # type: ignore[arg-type]

    def authenticate(self, request: tuple[str, bytes, list[tuple[str, str]], dict[str, str]]) -> Any:
        return self.authenticator.authenticate(*request)

    def test_anonymous(self) -> None:
        """
        A request without a signature is anonymous.
        """
        result = _run(self, self.authenticate(("GET", b"/b/k", [], {"host": "h"})))
        self.assertEqual(result, (None, None))
        self.assertEqual(self.store.lookups, 0)

    def test_valid(self) -> None:
        """
        A botocore-signed request verifies and yields the app's principal.
        """
        auth, principal = _run(self, self.authenticate(_signed("GET", "http://127.0.0.1:9000/b/a%20b?list-type=2")))
        self.assertIsInstance(auth, VerifiedAuth)
        self.assertEqual(
            principal,
            Principal(1, "app1", 1, "tenant1", (("*", "*"),), ACCESS_KEY),
        )

    def test_presigned(self) -> None:
        """
        A presigned URL verifies; once expired it is AccessDenied.
        """
        request = _signed("GET", "http://127.0.0.1:9000/b/k", presign=60)
        auth, _ = _run(self, self.authenticate(request))
        self.assertTrue(auth.presigned)
        self.clock.advance(61)
        error = _fail(self, self.authenticate(request), AccessDenied)
        self.assertEqual(str(error), "Request has expired")

    def test_wrong_secret(self) -> None:
        """
        A signature made with another secret is SignatureDoesNotMatch.
        """
        _fail(self, self.authenticate(_signed("GET", "http://h/b/k", secret="wrong")), SignatureDoesNotMatch)

    def test_unknown_key(self) -> None:
        """
        An unknown access key is InvalidAccessKeyId, and the miss is cached
        briefly.
        """
        self.store.apps.clear()
        request = _signed("GET", "http://h/b/k")
        error = _fail(self, self.authenticate(request), InvalidAccessKeyId)
        self.assertEqual(error.extra["AWSAccessKeyId"], ACCESS_KEY)  # type: ignore[attr-defined]
        _fail(self, self.authenticate(request), InvalidAccessKeyId)
        self.assertEqual(self.store.lookups, 1)
        self.clock.advance(1.5)
        self.store.add(ACCESS_KEY, SECRET)
        _run(self, self.authenticate(request))
        self.assertEqual(self.store.lookups, 2)

    def test_skew(self) -> None:
        """
        A request signed more than 15 minutes away from the server's clock
        is RequestTimeTooSkewed; 14 minutes is fine.
        """
        request = _signed("GET", "http://h/b/k")
        self.clock.advance(14 * 60)
        _run(self, self.authenticate(request))
        self.clock.advance(2 * 60)
        _fail(self, self.authenticate(request), RequestTimeTooSkewed)

    def test_cache_and_rotation(self) -> None:
        """
        The secret is looked up once per cache period; after a rotation the
        old secret keeps working only until the cache expires.
        """
        for _ in range(3):
            _run(self, self.authenticate(_signed("GET", "http://h/b/k")))
        self.assertEqual(self.store.lookups, 1)
        self.store.add(ACCESS_KEY, "rotated-secret")
        _run(self, self.authenticate(_signed("GET", "http://h/b/k")))
        self.clock.advance(5.1)
        # Requests are signed with the real time; keep the clock near it.
        _fail(self, self.authenticate(_signed("GET", "http://h/b/k")), SignatureDoesNotMatch)
        _run(self, self.authenticate(_signed("GET", "http://h/b/k", secret="rotated-secret")))
        self.assertEqual(self.store.lookups, 2)

    def test_clear_cache(self) -> None:
        """
        Clearing the cache makes the next request look the app up again.
        """
        _run(self, self.authenticate(_signed("GET", "http://h/b/k")))
        self.authenticator.clear_cache()
        _run(self, self.authenticate(_signed("GET", "http://h/b/k")))
        self.assertEqual(self.store.lookups, 2)

    def test_cache_bounded(self) -> None:
        """
        A flood of unknown keys never grows the cache beyond its bound.
        """
        self.authenticator.max_entries = 10
        for i in range(25):
            key = f"AKUNKNOWN{i:011d}"
            self.assertEqual(_run(self, self.authenticator._lookup(key)), (None, None))
        self.assertLessEqual(len(self.authenticator._cache), 10)


def _bucket(tenant_id: int = 1, public: bool = False, name: str = "photos") -> Bucket:
    return Bucket(1, name, tenant_id, f"tenant{tenant_id}", "us-east-1", public, datetime.now(UTC))


def _principal(tenant_id: int = 1, policies: tuple[tuple[str, str], ...] = (("*", "*"),)) -> Principal:
    return Principal(1, "app", tenant_id, f"tenant{tenant_id}", policies)


class AuthorizeTests(SynchronousTestCase):
    """
    Tenants are isolated whatever the policies; policies decide within a
    tenant; public buckets allow GetObject and HeadObject to anyone.
    """

    def test_tenant_isolation(self) -> None:
        """
        An app with '*' on '*' is refused every operation on another
        tenant's bucket.
        """
        bucket = _bucket(tenant_id=2)
        for operation, action in [
            ("GetObject", "object:read"),
            ("PutObject", "object:write"),
            ("ListObjects", "bucket:read"),
            ("DeleteBucket", "bucket:delete"),
            ("DeleteObjects", None),
        ]:
            self.assertRaises(
                AccessDenied, authorize, _principal(1), operation, action, bucket, "photos", "k"
            )
        authorize(_principal(2), "GetObject", "object:read", bucket, "photos", "k")

    def test_policies(self) -> None:
        """
        Within the tenant, the app's policies decide, per action and
        resource.
        """
        app = _principal(policies=(("object:read", "photos/public/*"), ("bucket:read", "photos")))
        bucket = _bucket()
        authorize(app, "GetObject", "object:read", bucket, "photos", "public/a.jpg")
        authorize(app, "ListObjects", "bucket:read", bucket, "photos", "")
        self.assertRaises(AccessDenied, authorize, app, "GetObject", "object:read", bucket, "photos", "private/a")
        self.assertRaises(AccessDenied, authorize, app, "PutObject", "object:write", bucket, "photos", "public/a")
        self.assertRaises(AccessDenied, authorize, app, "DeleteBucket", "bucket:delete", bucket, "photos", "")
        self.assertRaises(AccessDenied, authorize, app, "CreateBucket", "bucket:create", None, "other", None)

    def test_anonymous(self) -> None:
        """
        Anonymous requests may only GetObject/HeadObject a public bucket.
        """
        public = _bucket(public=True)
        authorize(None, "GetObject", "object:read", public, "photos", "k")
        authorize(None, "HeadObject", "object:read", public, "photos", "k")
        for operation, action in [
            ("ListObjects", "bucket:read"),
            ("ListObjectsV2", "bucket:read"),
            ("PutObject", "object:write"),
            ("DeleteObject", "object:delete"),
            ("GetObjectAcl", "object:read"),
        ]:
            self.assertRaises(AccessDenied, authorize, None, operation, action, public, "photos", "k")
        self.assertRaises(AccessDenied, authorize, None, "GetObject", "object:read", _bucket(), "photos", "k")
        self.assertRaises(AccessDenied, authorize, None, "ListBuckets", None, None, None, None)

    def test_public_for_other_tenants(self) -> None:
        """
        A public bucket is readable by a signed request of another tenant too
        (it could drop its signature), but nothing more.
        """
        public = _bucket(tenant_id=2, public=True)
        authorize(_principal(1), "GetObject", "object:read", public, "photos", "k")
        self.assertRaises(AccessDenied, authorize, _principal(1), "PutObject", "object:write", public, "photos", "k")


class _Body:
    """
    A raw request body delivered in given pieces.
    """

    def __init__(self, data: bytes, piece: int = 7, content_length: int | None = -1) -> None:
        self._pieces: Iterator[bytes] = iter([data[i : i + piece] for i in range(0, len(data), piece)])
        self.content_length = len(data) if content_length == -1 else content_length

    async def read(self) -> bytes:
        return next(self._pieces, b"")


def _auth(payload_hash: str, extra: dict[str, str] | None = None, body: bytes = b"") -> tuple[VerifiedAuth, dict[str, str]]:
    """
    A verified signature of a PUT with C{payload_hash}, and its headers.
    """
    headers = sign_request(
        ACCESS_KEY, SECRET, "PUT", "h", "/b/k", "", dict(extra or {}), body, payload_hash
    )
    store = _Store()
    store.add(ACCESS_KEY, SECRET)
    clock = Clock()
    clock.advance(time.time())
    authenticator = Authenticator(store, clock)  # type: ignore[arg-type]
    lowered = header_map(headers)
    d = authenticator.authenticate("PUT", b"/b/k", [], lowered)
    from twisted.internet.defer import Deferred

    result: list[Any] = []
    Deferred.fromCoroutine(d).addBoth(result.append)
    assert isinstance(result[0], tuple), result
    return result[0][0], lowered


def _chunked(auth: VerifiedAuth, data: bytes, chunk: int, trailer: str | None = None) -> bytes:
    """
    Encode C{data} aws-chunked with chunk signatures continuing C{auth}'s
    seed signature (and a signed trailer, if given).
    """
    signer = ChunkSigner(auth.signing_key, auth.amz_date, str(auth.scope), auth.seed_signature)
    out = []
    for i in range(0, len(data), chunk):
        piece = data[i : i + chunk]
        signature = signer.sign_chunk(hashlib.sha256(piece).hexdigest())
        out.append(b"%x;chunk-signature=%s\r\n%s\r\n" % (len(piece), signature.encode(), piece))
    signature = signer.sign_chunk(hashlib.sha256(b"").hexdigest())
    out.append(b"0;chunk-signature=%s\r\n" % signature.encode())
    if trailer is not None:
        line = f"x-amz-checksum-crc32:{trailer}\n"
        out.append(line.encode().replace(b"\n", b"\r\n"))
        out.append(b"x-amz-trailer-signature:%s\r\n" % signer.sign_trailer(line.encode()).encode())
    out.append(b"\r\n")
    return b"".join(out)


def _crc32(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


def _md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


async def _drain(reader: PayloadReader) -> bytes:
    parts = []
    while True:
        piece = await reader.read()
        if not piece:
            break
        parts.append(piece)
    await reader.finish()
    return b"".join(parts)


class PayloadReaderTests(SynchronousTestCase):
    """
    The payload reader returns the decoded body and completes every check
    only at the end.
    """

    data = b"The quick brown fox jumps over the lazy dog. " * 500

    def read(self, reader: PayloadReader) -> bytes:
        return _run(self, _drain(reader))  # type: ignore[no-any-return]

    def refuse(self, reader: PayloadReader, error: type[S3Error]) -> S3Error:
        return _fail(self, _drain(reader), error)  # type: ignore[return-value]

    def test_unsigned(self) -> None:
        """
        UNSIGNED-PAYLOAD bodies are returned as sent.
        """
        auth, headers = _auth("UNSIGNED-PAYLOAD")
        self.assertEqual(self.read(PayloadReader(_Body(self.data), auth, headers)), self.data)

    def test_signed_sha256(self) -> None:
        """
        A signed SHA-256 is verified at the end: right passes, wrong is
        XAmzContentSHA256Mismatch.
        """
        digest = hashlib.sha256(self.data).hexdigest()
        auth, headers = _auth(digest, body=self.data)
        self.assertEqual(self.read(PayloadReader(_Body(self.data), auth, headers)), self.data)
        tampered = b"X" + self.data[1:]
        self.refuse(PayloadReader(_Body(tampered), auth, headers), XAmzContentSHA256Mismatch)

    def test_streaming_signed(self) -> None:
        """
        Chunk signatures are verified; a tampered chunk is
        SignatureDoesNotMatch.
        """
        length = str(len(self.data))
        auth, headers = _auth(
            "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
            {"x-amz-decoded-content-length": length, "Content-Encoding": "aws-chunked"},
        )
        body = _chunked(auth, self.data, 8192)
        reader = PayloadReader(_Body(body, piece=1000), auth, headers)
        self.assertEqual(self.read(reader), self.data)
        self.assertEqual(reader.length, len(self.data))
        index = body.index(b"fox", 9000)
        tampered = body[:index] + b"cat" + body[index + 3 :]
        self.refuse(PayloadReader(_Body(tampered), auth, headers), SignatureDoesNotMatch)

    def test_streaming_signed_trailer(self) -> None:
        """
        A signed trailer checksum is verified, and its value is kept.
        """
        auth, headers = _auth(
            "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER",
            {
                "x-amz-decoded-content-length": str(len(self.data)),
                "x-amz-trailer": "x-amz-checksum-crc32",
                "Content-Encoding": "aws-chunked",
            },
        )
        reader = PayloadReader(_Body(_chunked(auth, self.data, 8192, _crc32(self.data))), auth, headers)
        self.assertEqual(self.read(reader), self.data)
        self.assertEqual(reader.checksum_value, _crc32(self.data))
        wrong = _chunked(auth, self.data, 8192, _crc32(b"other"))
        self.refuse(PayloadReader(_Body(wrong), auth, headers), BadDigest)

    def test_external_hashing(self) -> None:
        """
        With external hashing, the caller feeds the hashers; the trailer
        checksum is still checked against what they computed.
        """
        auth, headers = _auth(
            "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER",
            {
                "x-amz-decoded-content-length": str(len(self.data)),
                "x-amz-trailer": "x-amz-checksum-crc32",
            },
        )
        body = _chunked(auth, self.data, 8192, _crc32(self.data))

        async def feed(reader: PayloadReader, corrupt: bool) -> None:
            while True:
                piece = await reader.read()
                if not piece:
                    break
                for hasher in reader.hashers:
                    hasher.update(piece.upper() if corrupt else piece)
            await reader.finish()

        reader = PayloadReader(_Body(body), auth, headers, external_hashing=True)
        self.assertEqual(len(reader.hashers), 1)
        _run(self, feed(reader, False))
        self.assertEqual(reader.checksum_value, _crc32(self.data))
        reader = PayloadReader(_Body(body), auth, headers, external_hashing=True)
        _fail(self, feed(reader, True), BadDigest)

    def test_content_md5(self) -> None:
        """
        Content-MD5 is verified (BadDigest), and malformed ones are refused
        before reading (InvalidDigest).
        """
        auth, headers = _auth("UNSIGNED-PAYLOAD", {"Content-MD5": _md5(self.data)})
        reader = PayloadReader(_Body(self.data), auth, headers)
        self.read(reader)
        self.assertEqual(reader.md5, hashlib.md5(self.data).digest())
        self.assertTrue(content_md5_matches(reader.content_md5, hashlib.md5(self.data).hexdigest()))
        auth, headers = _auth("UNSIGNED-PAYLOAD", {"Content-MD5": _md5(b"other")})
        self.refuse(PayloadReader(_Body(self.data), auth, headers), BadDigest)
        self.assertRaises(InvalidDigest, PayloadReader, _Body(b""), auth, {"content-md5": "nope"})

    def test_checksum_header(self) -> None:
        """
        An x-amz-checksum-* header is verified over the body.
        """
        auth, headers = _auth("UNSIGNED-PAYLOAD", {"x-amz-checksum-crc32": _crc32(self.data)})
        reader = PayloadReader(_Body(self.data), auth, headers)
        self.read(reader)
        self.assertEqual(reader.checksum_value, _crc32(self.data))
        auth, headers = _auth("UNSIGNED-PAYLOAD", {"x-amz-checksum-crc32": _crc32(b"x")})
        self.refuse(PayloadReader(_Body(self.data), auth, headers), BadDigest)

    def test_trailer_needs_chunked(self) -> None:
        """
        A trailer checksum on a body that is not aws-chunked is refused at
        once.
        """
        auth, headers = _auth("UNSIGNED-PAYLOAD", {"x-amz-trailer": "x-amz-checksum-crc32"})
        self.assertRaises(InvalidRequest, PayloadReader, _Body(b""), auth, headers)

    def test_short_body(self) -> None:
        """
        A body shorter than its Content-Length is IncompleteBody.
        """
        auth, headers = _auth("UNSIGNED-PAYLOAD")
        body = _Body(self.data, content_length=len(self.data) + 1)
        self.refuse(PayloadReader(body, auth, headers), IncompleteBody)

    def test_anonymous(self) -> None:
        """
        Anonymous bodies are taken as sent, checksums still verified.
        """
        reader = PayloadReader(_Body(self.data), None, {"content-md5": _md5(self.data)})
        self.assertEqual(self.read(reader), self.data)
