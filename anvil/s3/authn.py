# -*- test-case-name: tests.test_s3_auth -*-
"""
Authentication and authorisation glue between HTTP requests and SigV4.

L{Authenticator} turns a request into a L{Principal} (or C{None} for an
anonymous request): it parses the signature (L{anvil.s3.sigv4}), looks the
access key up through L{GlobalStore.get_app_by_client_id} and verifies the
signature and clock. App records (secret, tenant, policies) are cached in
memory for a few seconds: SigV4 needs the secret on every request, and a
database round trip per request would halve small-object throughput. The
cache is short so that a rotated secret, a deleted app or a changed policy
takes effect within seconds; unknown access keys are cached too, more
briefly, so a client hammering with a wrong key does not hammer the
database.

L{authorize} applies the rules of ARCHITECTURE §4: tenants are isolated
whatever the policies say; inside the tenant, the app's policies
(L{anvil.s3.policy.is_allowed}) decide; a public bucket additionally allows
GetObject and HeadObject to anyone.

L{PayloadReader} is the body of a request as handlers see it: the decoded
bytes (aws-chunked framing removed), with every check AWS makes on the way
(signed SHA-256, chunk signatures, trailing checksum, C{Content-MD5},
C{x-amz-checksum-*}, decoded length) completed by L{PayloadReader.finish}.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from twisted.logger import Logger

from anvil.errors import NotFound, SecretKeyMismatch
from anvil.meta.store import GlobalStore
from anvil.s3.checksums import (
    ChecksumSpec,
    ChecksumVerifier,
    ContentMd5,
    checksum_from_headers,
    parse_content_md5,
)
from anvil.s3.chunked import AwsChunkedDecoder
from anvil.s3.errors import (
    AccessDenied,
    IncompleteBody,
    InternalError,
    InvalidAccessKeyId,
    InvalidRequest,
)
from anvil.s3.sigv4 import (
    AuthRequest,
    PayloadSha256,
    VerifiedAuth,
    parse_request_auth,
    verify,
)

if TYPE_CHECKING:
    from anvil.meta.records import Bucket


@dataclass(frozen=True)
class Principal:
    """
    The authenticated caller: an app of a tenant, with its policies.

    @ivar app_id: the app's id.
    @ivar app_name: the app's name.
    @ivar tenant_id: its tenant's id.
    @ivar tenant_name: its tenant's name.
    @ivar policies: C{(action, resource)} grants.
    @ivar access_key: the access key id the request was signed with.
    """

    app_id: int
    app_name: str
    tenant_id: int
    tenant_name: str
    policies: tuple[tuple[str, str], ...]
    access_key: str = ""


@dataclass(frozen=True)
class _Cached:
    expires: float
    secret: str | None
    principal: Principal | None


class _Clock(Protocol):
    def seconds(self) -> float: ...


class Authenticator:
    """
    Verifies SigV4 requests against app secrets, with a short cache.

    @ivar cache_seconds: how long a found app is remembered.
    @ivar miss_seconds: how long an unknown access key is remembered.
    """

    _log = Logger()

    #: The cache never grows beyond this many access keys.
    max_entries = 10000

    def __init__(
        self,
        global_store: GlobalStore,
        clock: _Clock,
        cache_seconds: float = 5.0,
        miss_seconds: float = 1.0,
    ) -> None:
        """
        @param global_store: where apps are looked up.
        @param clock: "now" for signatures and the cache.
        @param cache_seconds: see L{cache_seconds}.
        @param miss_seconds: see L{miss_seconds}.
        """
        self._store = global_store
        self._clock = clock
        self.cache_seconds = cache_seconds
        self.miss_seconds = miss_seconds
        self._cache: dict[str, _Cached] = {}

    def clear_cache(self) -> None:
        """
        Forget every cached app (changes apply to the next request).
        """
        self._cache.clear()

    async def authenticate(
        self,
        method: str,
        raw_path: bytes,
        query: Sequence[tuple[str, str]],
        headers: Mapping[str, str],
    ) -> tuple[VerifiedAuth | None, Principal | None]:
        """
        Authenticate one request.

        @param method: the HTTP method.
        @param raw_path: the path as received.
        @param query: the decoded query pairs.
        @param headers: lower-case header names to values.
        @return: C{(None, None)} for an anonymous request, else the verified
            signature and the principal.
        @raise S3Error: C{InvalidAccessKeyId}, C{SignatureDoesNotMatch},
            C{RequestTimeTooSkewed}, C{AccessDenied} (expired presigned URL)
            or the error of a malformed signature.
        """
        parsed: AuthRequest | None = parse_request_auth(method, raw_path, list(query), headers)
        if parsed is None:
            return None, None
        secret, principal = await self._lookup(parsed.access_key)
        if secret is None or principal is None:
            raise InvalidAccessKeyId(AWSAccessKeyId=parsed.access_key)
        verified = verify(parsed, secret, now=self._clock.seconds())
        return verified, principal

    async def _lookup(self, access_key: str) -> tuple[str | None, Principal | None]:
        now = self._clock.seconds()
        cached = self._cache.get(access_key)
        if cached is not None and cached.expires > now:
            return cached.secret, cached.principal
        try:
            app = await self._store.get_app_by_client_id(access_key)
        except NotFound:
            self._remember(access_key, _Cached(now + self.miss_seconds, None, None))
            return None, None
        except SecretKeyMismatch:
            # The stored secret does not decrypt with this node's key: an
            # operator problem, not the client's; never a signature error.
            self._log.error(
                "The secret of access key {access_key} does not decrypt with this "
                "node's encryption key",
                access_key=access_key,
            )
            raise InternalError() from None
        principal = Principal(
            app_id=app["id"],
            app_name=app["name"],
            tenant_id=app["tenant_id"],
            tenant_name=app["tenant_name"],
            policies=tuple((p["action"], p["resource"]) for p in app["policies"]),
            access_key=access_key,
        )
        secret = app["client_secret"]
        self._remember(access_key, _Cached(now + self.cache_seconds, secret, principal))
        return secret, principal

    def _remember(self, access_key: str, entry: _Cached) -> None:
        if len(self._cache) >= self.max_entries:
            now = self._clock.seconds()
            for key in [k for k, v in self._cache.items() if v.expires <= now]:
                del self._cache[key]
            if len(self._cache) >= self.max_entries:
                # Every entry is fresh: a flood of distinct keys. Dropping
                # them all costs only extra lookups.
                self._cache.clear()
        self._cache[access_key] = entry


# Authorisation ----------------------------------------------------------------

#: Operations anyone may perform on a public bucket.
PUBLIC_OPERATIONS = frozenset({"GetObject", "HeadObject"})


def is_allowed(
    policies: Sequence[tuple[str, str]], action: str, bucket: str | None, key: str | None
) -> bool:
    """
    Apply an app's policies (see L{anvil.s3.policy.is_allowed}).

    @param policies: C{(action, resource)} grants.
    @param action: e.g. C{object:read}.
    @param bucket: the bucket, or C{None} for service-level actions.
    @param key: the key for object actions.
    @return: whether some policy allows it.
    """
    from anvil.s3.policy import is_allowed as policy_allows

    return policy_allows(policies, action, bucket, key)


def public_flag_irrelevant(
    principal: Principal | None,
    operation: str,
    action: str | None,
    bucket_name: str | None,
    key: str | None,
) -> bool:
    """
    Whether L{authorize} decides a request the same way whether or not the
    bucket is public, given that the bucket belongs to C{principal}'s
    tenant: then a bucket record with an out-of-date public flag
    (L{anvil.s3.bucketcache}) cannot change the outcome.

    @param principal: the caller, C{None} when anonymous.
    @param operation: the operation name.
    @param action: the operation's policy action, or C{None}.
    @param bucket_name: the addressed bucket name.
    @param key: the addressed key, if any.
    @return: C{False} for an anonymous caller, and for a public operation
        the caller's policies alone would refuse.
    """
    if principal is None:
        return False
    if operation not in PUBLIC_OPERATIONS or action is None:
        return True
    return is_allowed(principal.policies, action, bucket_name, key or None)


def authorize(
    principal: Principal | None,
    operation: str,
    action: str | None,
    bucket: Bucket | None,
    bucket_name: str | None,
    key: str | None,
) -> None:
    """
    Decide whether C{principal} may perform an operation.

    @param principal: the caller, C{None} when anonymous.
    @param operation: the operation name (C{GetObject}, ...).
    @param action: the policy action of the operation, or C{None} for an
        operation every authenticated app may perform (ListBuckets).
    @param bucket: the addressed bucket record, if it exists.
    @param bucket_name: the addressed bucket name (also when it does not
        exist, for CreateBucket).
    @param key: the addressed key, if any.
    @raise AccessDenied: when not allowed.
    """
    if bucket is not None and bucket.public and operation in PUBLIC_OPERATIONS:
        # A public bucket is readable by everyone, signed or not; refusing a
        # signed request from another tenant would only make it drop the
        # signature.
        return
    if principal is None:
        raise AccessDenied()
    if bucket is not None and bucket.tenant_id != principal.tenant_id:
        # Tenant isolation comes before policies: a '*' policy is '*' within
        # the app's own tenant.
        raise AccessDenied()
    if action is None:
        return
    if not is_allowed(principal.policies, action, bucket_name, key or None):
        raise AccessDenied()


# Request bodies ---------------------------------------------------------------


class BodySource(Protocol):
    """
    The raw request body (L{anvil.web.body.RequestBody}).
    """

    content_length: int | None

    async def read(self) -> bytes:
        """@return: the next piece; C{b""} once at the end."""


class BufferedBody:
    """
    A L{BodySource} over a body Twisted has already buffered in
    C{request.content} (requests not made through L{anvil.web.server}).
    """

    def __init__(self, content: Any, length: int | None) -> None:
        """
        @param content: a file-like object, or C{None}.
        @param length: its length, if known.
        """
        self._content = content
        self.content_length = length
        if content is not None:
            content.seek(0)

    async def read(self) -> bytes:
        """@return: up to 1 MiB; C{b""} at the end."""
        if self._content is None:
            return b""
        data: bytes = self._content.read(1 << 20)
        return data


class _TrailerChecksum(ChecksumVerifier):
    """
    A checksum fed by someone else (the storage engine's CPU pool): the
    aws-chunked decoder only asks it to check the trailer value at the end.
    """

    def __init__(self, real: ChecksumVerifier) -> None:
        super().__init__(real.spec)
        self._real = real

    def update(self, data: bytes | memoryview) -> None:
        """Ignore: the real verifier is fed elsewhere."""

    def finish(self, trailer_value: str | None = None) -> str:
        """@return: the real verifier's result."""
        return self._real.finish(trailer_value)


class PayloadReader:
    """
    The decoded request body, verified as AWS verifies it.

    Read with L{read} until it returns C{b""}, then call L{finish}: only
    when L{finish} returned may anything derived from the body be
    committed.

    With C{external_hashing=True}, the reader does not hash the data itself:
    the caller must feed every decoded piece, exactly once and in order, to
    each object of L{hashers} (the storage engine does so in its CPU pool,
    next to its own MD5 and SHA-256), and L{finish} then checks them.

    @ivar checksum: the declared C{x-amz-checksum-*} (header or trailer),
        if any.
    @ivar checksum_value: the verified base64 checksum, after L{finish}.
    @ivar md5: the MD5 of the decoded body after L{finish}, when
        C{Content-MD5} was verified by this reader.
    @ivar content_md5: the digest C{Content-MD5} announced, if any.
    @ivar length: decoded bytes returned so far.
    @ivar hashers: objects to feed the decoded data to (external hashing).
    """

    def __init__(
        self,
        source: BodySource,
        auth: VerifiedAuth | None,
        headers: Mapping[str, str],
        *,
        external_hashing: bool = False,
        verify_checksums: bool = True,
    ) -> None:
        """
        @param source: the raw body.
        @param auth: the verified signature (C{None} for anonymous requests:
            the body is then taken as sent).
        @param headers: the request headers (lower-case names).
        @param external_hashing: see the class docstring.
        @param verify_checksums: check C{Content-MD5} and
            C{x-amz-checksum-*}; C{False} leaves only the signature checks.
        @raise S3Error: for inconsistent checksum or length headers, before
            any byte is read.
        """
        self._source = source
        self._ended = False
        self._finished = False
        self.length = 0
        self.md5: bytes | None = None
        self.checksum_value: str | None = None
        self.checksum: ChecksumSpec | None = None
        self.content_md5: bytes | None = None
        self.hashers: list[Any] = []
        self._own: list[Any] = []

        mode = auth.payload_mode if auth is not None else None
        chunked = mode is not None and mode.chunked
        content_md5 = headers.get("content-md5")
        self._md5: ContentMd5 | None = None
        self._checksum: ChecksumVerifier | None = None
        if verify_checksums:
            self.checksum = checksum_from_headers(headers)
            if self.checksum is not None:
                if self.checksum.trailer and not chunked:
                    raise InvalidRequest(
                        "x-amz-trailer requires an aws-chunked body "
                        "(x-amz-content-sha256 STREAMING-*-TRAILER)"
                    )
                self._checksum = ChecksumVerifier(self.checksum)
            if content_md5 is not None:
                self.content_md5 = parse_content_md5(content_md5)
                self._md5 = ContentMd5(content_md5)
        self._sha256: PayloadSha256 | None = auth.payload_verifier() if auth is not None else None
        self._decoder: AwsChunkedDecoder | None = None
        if chunked:
            assert auth is not None
            given: ChecksumVerifier | None = self._checksum
            if given is not None and external_hashing:
                given = _TrailerChecksum(given)
            self._decoder = AwsChunkedDecoder.for_request(auth, checksum=given)
        for hasher in (self._sha256, self._md5, self._checksum):
            if hasher is None:
                continue
            if hasher is self._checksum and self._decoder is not None and not external_hashing:
                continue  # the decoder feeds it
            (self.hashers if external_hashing else self._own).append(hasher)
        self._pending: list[bytes] = []

    async def read(self) -> bytes:
        """
        @return: the next piece of decoded body; C{b""} (once) at the end.
        @raise S3Error: as soon as the body is known to be bad (a chunk
            signature, framing).
        @raise anvil.web.body.BodyIncomplete: if the client went away.
        """
        while not self._pending:
            if self._ended:
                return b""
            raw = await self._source.read()
            if not raw:
                self._ended = True
                return b""
            if self._decoder is not None:
                pieces = [piece for piece in self._decoder.feed(raw) if piece]
            else:
                pieces = [raw]
            self._pending.extend(pieces)
        piece = self._pending.pop(0)
        for hasher in self._own:
            hasher.update(piece)
        self.length += len(piece)
        return piece

    async def read_all(self, limit: int) -> bytes:
        """
        Read the whole decoded body (a small XML document) and L{finish}.

        @param limit: the largest body accepted.
        @return: the body.
        @raise MaxMessageLengthExceeded: when it is longer than C{limit}.
        """
        from anvil.s3.errors import MaxMessageLengthExceeded

        parts: list[bytes] = []
        size = 0
        while True:
            piece = await self.read()
            if not piece:
                break
            size += len(piece)
            if size > limit:
                raise MaxMessageLengthExceeded()
            parts.append(piece)
        await self.finish()
        return b"".join(parts)

    async def finish(self) -> None:
        """
        Check everything that could only be checked at the end.

        Reads (and checks) whatever the caller has not read yet.

        @raise S3Error: C{XAmzContentSHA256Mismatch}, C{SignatureDoesNotMatch}
            (trailer), C{BadDigest}, C{IncompleteBody}, C{MalformedTrailerError}.
        """
        if self._finished:
            return
        while await self.read():
            pass
        if self._decoder is not None:
            self._decoder.finish()
            self.checksum_value = self._decoder.checksum_value
        else:
            expected = self._source.content_length
            if expected is not None and self.length != expected:
                raise IncompleteBody()
            if self._checksum is not None:
                self.checksum_value = self._checksum.finish()
        if self._sha256 is not None:
            self._sha256.finish()
        if self._md5 is not None:
            self.md5 = self._md5.finish()
        self._finished = True


def content_md5_matches(expected: bytes | None, md5_hex: str) -> bool:
    """
    Compare a C{Content-MD5} digest with an MD5 computed elsewhere.

    @param expected: the announced digest, or C{None} when none was sent.
    @param md5_hex: the computed digest in hex.
    @return: C{True} when nothing was announced or it matches.
    """
    if expected is None:
        return True
    return hmac.compare_digest(expected.hex(), md5_hex.lower())
