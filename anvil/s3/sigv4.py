# -*- test-case-name: tests.test_sigv4 -*-
"""
AWS Signature Version 4 for S3: parsing, canonicalisation and verification.

Everything here is pure and synchronous; the HTTP layer drives it in three
steps so that the secret can be looked up asynchronously in between::

    headers = header_map(request.requestHeaders.getAllRawHeaders())
    auth = parse_request_auth(method, raw_path, raw_query, headers)
    if auth is None:
        ...                                  # anonymous request
    secret = await lookup_secret(auth.access_key)   # InvalidAccessKeyId if unknown
    verified = verify(auth, secret, now=reactor.seconds())

C{parse_request_auth} raises the S3 error AWS answers for a malformed
Authorization header or presigned query (C{AuthorizationHeaderMalformed},
C{AuthorizationQueryParametersError}, C{InvalidArgument}, C{InvalidRequest},
C{AccessDenied} for unsigned C{x-amz-*} headers...). C{verify} checks the
clock (C{RequestTimeTooSkewed}, or C{AccessDenied} for an expired presigned
URL) and the signature (C{SignatureDoesNotMatch}). The clock is passed in:
nothing here reads the time.

The body is checked later, as it streams, according to
L{VerifiedAuth.payload_mode}:

  - C{UNSIGNED}: nothing to check.
  - C{SHA256}: feed the body to L{VerifiedAuth.payload_verifier} and call
    its C{finish()} before committing (C{XAmzContentSHA256Mismatch}).
  - the three C{STREAMING_*} modes: the body is C{aws-chunked}; decode it with
    L{anvil.s3.chunked.AwsChunkedDecoder}, which checks every chunk
    signature with L{VerifiedAuth.chunk_signer} and the trailing checksum.

Canonicalisation follows S3, which differs from other services: the path is
not normalised (no removal of C{.} / C{..} segments or double slashes) and is
encoded once; each path segment is percent-decoded and re-encoded with only
the unreserved characters left bare, so a client's C{%2F} inside a segment
stays C{%2F}. Query keys and values are decoded (C{+} is a space) and
re-encoded the same way, then sorted.

Header values are received as bytes; the HTTP layer decodes them as
ISO-8859-1 (what L{header_map} does). botocore signs the UTF-8 encoding of
the same text, so the canonical request is built from the UTF-8 encoding;
clients that sign the raw bytes they send are accepted too, by a second
attempt made only when a signed header value has non-ASCII bytes.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from functools import lru_cache
from urllib.parse import quote, unquote_to_bytes

from anvil.s3.errors import (
    AccessDenied,
    AuthorizationHeaderMalformed,
    AuthorizationQueryParametersError,
    InvalidArgument,
    InvalidRequest,
    InvalidToken,
    RequestTimeTooSkewed,
    SignatureDoesNotMatch,
    XAmzContentSHA256Mismatch,
)

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

#: The largest accepted difference between request and server time.
MAX_SKEW_SECONDS = 15 * 60
#: The longest lifetime of a presigned URL (seven days).
MAX_PRESIGN_EXPIRES = 7 * 24 * 60 * 60

_SERVICE = "s3"
_TERMINAL = "aws4_request"
_AMZ_DATE = re.compile(r"^\d{8}T\d{6}Z$")
#: Paths made only of unreserved characters and slashes, which canonical
#: URI encoding leaves as they are.
_PLAIN_PATH = re.compile(rb"[A-Za-z0-9\-._~/]*")
_SCOPE_DATE = re.compile(r"^\d{8}$")
_HEX_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9a-z]+$")

_CREDENTIAL_FORMAT = (
    'the Credential is mal-formed; expecting "<YOUR-AKID>/YYYYMMDD/REGION/SERVICE/aws4_request".'
)
_HEADER_MALFORMED = "The authorization header is malformed; "
_QUERY_CREDENTIAL = "Error parsing the X-Amz-Credential parameter; "
_UNSUPPORTED_MECHANISM = (
    "The authorization mechanism you have provided is not supported. Please use AWS4-HMAC-SHA256."
)

_PRESIGN_PARAMETERS = (
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Signature",
    "X-Amz-Date",
    "X-Amz-SignedHeaders",
    "X-Amz-Expires",
)


class PayloadMode(enum.Enum):
    """How the body of a signed request is protected."""

    #: C{UNSIGNED-PAYLOAD}: the body is not covered by the signature.
    UNSIGNED = "UNSIGNED-PAYLOAD"
    #: A hex SHA-256 of the body was signed; check it as the body streams.
    SHA256 = "SHA256"
    #: aws-chunked body, every chunk signed.
    STREAMING_SIGNED = STREAMING_SIGNED
    #: aws-chunked body, every chunk and the trailer signed.
    STREAMING_SIGNED_TRAILER = STREAMING_SIGNED_TRAILER
    #: aws-chunked body without chunk signatures, with a trailing checksum.
    STREAMING_UNSIGNED_TRAILER = STREAMING_UNSIGNED_TRAILER

    @property
    def chunked(self) -> bool:
        """C{True} when the body is aws-chunked."""
        return self.name.startswith("STREAMING")

    @property
    def signed_chunks(self) -> bool:
        """C{True} when each chunk carries a signature."""
        return self in (PayloadMode.STREAMING_SIGNED, PayloadMode.STREAMING_SIGNED_TRAILER)

    @property
    def has_trailer(self) -> bool:
        """C{True} when trailing headers follow the last chunk."""
        return self.name.endswith("TRAILER")


def parse_payload_hash(value: str) -> tuple[PayloadMode, str | None]:
    """
    Interpret an C{x-amz-content-sha256} value.

    @param value: the header (or presigned query) value.
    @return: the payload mode and, for C{SHA256}, the lower-case hex digest.
    @raise InvalidArgument: for any other value, as S3 answers.
    """
    if _HEX_SHA256.match(value):
        return PayloadMode.SHA256, value.lower()
    for mode in PayloadMode:
        if mode is not PayloadMode.SHA256 and value == mode.value:
            return mode, None
    raise InvalidArgument(
        "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, "
        "STREAMING-UNSIGNED-PAYLOAD-TRAILER, STREAMING-AWS4-HMAC-SHA256-PAYLOAD, "
        "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER or a valid sha256 value.",
        ArgumentName="x-amz-content-sha256",
        ArgumentValue=value,
    )


# Request parts ----------------------------------------------------------------


def header_map(
    raw: Iterable[tuple[bytes | str, bytes | str | Sequence[bytes | str]]]
    | Mapping[bytes | str, bytes | str | Sequence[bytes | str]],
) -> dict[str, str]:
    """
    Normalise request headers for this module and L{anvil.s3.checksums}.

    Names are lower-cased; bytes are decoded as ISO-8859-1 (HTTP's own
    charset, which keeps every byte); repeated headers are joined with
    commas after trimming each value, as SigV4 canonicalises them.

    @param raw: C{(name, value)} pairs, or C{(name, [values])} pairs as
        Twisted's C{Headers.getAllRawHeaders()} yields, or a mapping.
    @return: lower-case name to value.
    """
    items = raw.items() if isinstance(raw, Mapping) else raw
    collected: dict[str, str] = {}
    # Runs for every request: joined as it goes, without a list per name.
    for name, value in items:
        key = (name.decode("latin-1") if isinstance(name, bytes) else name).lower()
        values = (value,) if isinstance(value, (bytes, str)) else value
        for one in values:
            text = (one.decode("latin-1") if isinstance(one, bytes) else one).strip()
            previous = collected.get(key)
            collected[key] = text if previous is None else previous + "," + text
    return collected


def parse_query(raw_query: bytes | str) -> list[tuple[str, str]]:
    """
    Split a raw query string into decoded pairs, in order.

    C{+} is a space and C{%XX} escapes are decoded to bytes, read as UTF-8
    (undecodable bytes are kept as surrogate escapes so that re-encoding
    gives them back). A parameter without C{=} has an empty value, as
    C{?uploads} does.

    @param raw_query: the part of the request target after C{?}.
    @return: C{(name, value)} pairs.
    """
    if isinstance(raw_query, bytes):
        raw_query = raw_query.decode("latin-1")
    pairs = []
    for part in raw_query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        pairs.append((_decode_component(name), _decode_component(value)))
    return pairs


def _decode_component(text: str) -> str:
    raw = unquote_to_bytes(text.replace("+", " "))
    return raw.decode("utf-8", "surrogateescape")


def _encode_component(text: str) -> str:
    return quote(text.encode("utf-8", "surrogateescape"), safe="")


def canonical_uri(raw_path: bytes | str) -> str:
    """
    The canonical URI of an S3 request.

    @param raw_path: the path as received (still percent-encoded, without the
        query string).
    @return: each segment decoded and re-encoded, joined with C{/}; no
        normalisation of C{.}, C{..} or empty segments.
    """
    if isinstance(raw_path, str):
        raw_path = raw_path.encode("utf-8", "surrogateescape")
    if not raw_path:
        return "/"
    if _PLAIN_PATH.fullmatch(raw_path):
        # Nothing to decode or encode (the usual key): the path is its own
        # canonical form.
        return raw_path.decode("ascii")
    return "/".join(quote(unquote_to_bytes(segment), safe="") for segment in raw_path.split(b"/"))


def canonical_query_string(pairs: Iterable[tuple[str, str]]) -> str:
    """
    The canonical query string.

    @param pairs: decoded C{(name, value)} pairs (see L{parse_query}).
    @return: the encoded pairs sorted by name, then value, joined with C{&}.
    """
    encoded = sorted((_encode_component(k), _encode_component(v)) for k, v in pairs)
    return "&".join(f"{k}={v}" for k, v in encoded)


def _trim(value: str) -> str:
    # SigV4 "trimall": strip, and fold runs of whitespace to one space.
    return " ".join(value.split())


def _canonical_headers(headers: Mapping[str, str], signed: Sequence[str], raw_bytes: bool) -> bytes:
    lines = []
    for name in signed:
        value = headers.get(name, "")
        if raw_bytes:
            encoded = b" ".join(value.encode("latin-1").split())
        else:
            encoded = _trim(value).encode("utf-8")
        lines.append(name.encode("ascii") + b":" + encoded + b"\n")
    return b"".join(lines)


def build_canonical_request(
    method: str,
    raw_path: bytes | str,
    query_pairs: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    signed_headers: Sequence[str],
    payload_hash: str,
    raw_header_bytes: bool = False,
) -> bytes:
    """
    Build the canonical request.

    @param method: the HTTP method.
    @param raw_path: the path as received.
    @param query_pairs: decoded query pairs, without C{X-Amz-Signature}.
    @param headers: from L{header_map}.
    @param signed_headers: lower-case names, in the order the client listed
        them.
    @param payload_hash: the payload line (hex SHA-256 or a mode name).
    @param raw_header_bytes: use the received header bytes instead of the
        UTF-8 encoding of their ISO-8859-1 reading (see the module docstring).
    @return: the canonical request as bytes.
    """
    head = "\n".join([method.upper(), canonical_uri(raw_path), canonical_query_string(query_pairs)])
    return b"".join(
        [
            head.encode("ascii"),
            b"\n",
            _canonical_headers(headers, signed_headers, raw_header_bytes),
            b"\n",
            ";".join(signed_headers).encode("ascii"),
            b"\n",
            payload_hash.encode("ascii"),
        ]
    )


# Parsing ----------------------------------------------------------------------


@dataclass(frozen=True)
class CredentialScope:
    """
    The credential scope of a signature.

    @ivar date: C{YYYYMMDD}.
    @ivar region: any region; Anvil accepts every region as signing input.
    @ivar service: always C{s3}.
    """

    date: str
    region: str
    service: str = _SERVICE

    def __str__(self) -> str:
        return f"{self.date}/{self.region}/{self.service}/{_TERMINAL}"


@dataclass(frozen=True)
class AuthRequest:
    """
    A parsed, not yet verified, SigV4 request.

    @ivar access_key: the access key id; look its secret up, then L{verify}.
    @ivar scope: the credential scope.
    @ivar signed_headers: lower-case signed header names.
    @ivar signature: the signature the client sent (lower-case hex).
    @ivar amz_date: the request timestamp as used in the string to sign.
    @ivar request_time: the same timestamp, as an aware UTC datetime.
    @ivar raw_date: the date exactly as the client sent it (for errors).
    @ivar presigned: C{True} for query-string authentication.
    @ivar expires: the presigned lifetime in seconds (C{None} otherwise).
    @ivar payload_hash: the payload line of the canonical request.
    @ivar payload_mode: how the body is protected.
    @ivar payload_sha256: the signed hex body digest in C{SHA256} mode.
    @ivar canonical_request: the canonical request.
    @ivar raw_canonical_request: the variant built from raw header bytes,
        when a signed header value has non-ASCII bytes.
    @ivar decoded_content_length: C{x-amz-decoded-content-length}, if sent.
    @ivar trailer: the lower-case C{x-amz-trailer} value, if sent.
    """

    access_key: str
    scope: CredentialScope
    signed_headers: tuple[str, ...]
    signature: str
    amz_date: str
    request_time: datetime
    raw_date: str
    presigned: bool
    expires: int | None
    payload_hash: str
    payload_mode: PayloadMode
    payload_sha256: str | None
    canonical_request: bytes = field(repr=False)
    raw_canonical_request: bytes | None = field(repr=False)
    decoded_content_length: int | None
    trailer: str | None

    def string_to_sign(self, canonical_request: bytes | None = None) -> str:
        """
        @param canonical_request: a canonical request; L{canonical_request}
            by default.
        @return: the SigV4 string to sign.
        """
        digest = hashlib.sha256(canonical_request or self.canonical_request).hexdigest()
        return f"{ALGORITHM}\n{self.amz_date}\n{self.scope}\n{digest}"


def _parse_amz_date(value: str) -> datetime | None:
    if not _AMZ_DATE.match(value):
        return None
    # The pattern fixed every position: slicing is strptime's result at a
    # fraction of its cost (it runs for every signed request).
    try:
        return datetime(
            int(value[0:4]),
            int(value[4:6]),
            int(value[6:8]),
            int(value[9:11]),
            int(value[11:13]),
            int(value[13:15]),
            tzinfo=UTC,
        )
    except ValueError:
        return None


def _format_amz_date(moment: datetime) -> str:
    return moment.strftime("%Y%m%dT%H%M%SZ")


def _iso8601(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_credential(value: str, presigned: bool) -> tuple[str, CredentialScope]:
    """
    Split C{AKID/YYYYMMDD/region/s3/aws4_request}.

    @raise AuthorizationHeaderMalformed: (or
        C{AuthorizationQueryParametersError} when presigned) if malformed.
    """
    prefix = _QUERY_CREDENTIAL if presigned else _HEADER_MALFORMED
    error = AuthorizationQueryParametersError if presigned else AuthorizationHeaderMalformed
    parts = value.rsplit("/", 4)
    if len(parts) != 5 or not all(parts) or not _SCOPE_DATE.match(parts[1]):
        raise error(prefix + _CREDENTIAL_FORMAT)
    access_key, date, region, service, terminal = parts
    if service != _SERVICE:
        raise error(
            prefix + f'incorrect service "{service}". This endpoint belongs to "{_SERVICE}".'
        )
    if terminal != _TERMINAL:
        raise error(prefix + f'incorrect terminal "{terminal}". This endpoint uses "{_TERMINAL}".')
    return access_key, CredentialScope(date, region)


def _parse_signed_headers(value: str, error: type[Exception], prefix: str) -> tuple[str, ...]:
    names = tuple(name.strip().lower() for name in value.split(";"))
    if not value or not all(_HEADER_NAME.match(name) for name in names):
        raise error(prefix + "SignedHeaders is mal-formed.")
    if "host" not in names:
        raise error(prefix + "SignedHeaders must include host.")
    return names


def _authorization_parts(value: str) -> dict[str, str]:
    """
    Split the part of the Authorization header after the algorithm.

    @raise AuthorizationHeaderMalformed: unless it has exactly Credential,
        SignedHeaders and Signature.
    """
    parts: dict[str, str] = {}
    for item in value.split(","):
        item = item.strip()
        if not item:
            continue
        key, equals, content = item.partition("=")
        key = key.strip()
        if not equals or key in parts:
            raise AuthorizationHeaderMalformed(
                _HEADER_MALFORMED + f'the authorization component "{item}" is malformed.'
            )
        parts[key] = content.strip()
    if set(parts) != {"Credential", "SignedHeaders", "Signature"}:
        raise AuthorizationHeaderMalformed(
            _HEADER_MALFORMED + "the authorization header requires three components: "
            "Credential, SignedHeaders, and Signature."
        )
    return parts


def _check_unsigned_amz_headers(headers: Mapping[str, str], signed: Sequence[str]) -> None:
    # S3 refuses x-amz-* headers that are not signed: otherwise anyone
    # holding a signed request (a presigned URL above all) could add
    # x-amz-copy-source, x-amz-meta-* or x-amz-acl to it.
    unsigned = sorted(name for name in headers if name.startswith("x-amz-") and name not in signed)
    if unsigned:
        raise AccessDenied(
            "There were headers present in the request which were not signed",
            HeadersNotSigned=", ".join(unsigned),
        )


def _decoded_content_length(headers: Mapping[str, str]) -> int | None:
    value = headers.get("x-amz-decoded-content-length")
    if value is None:
        return None
    if not value.isdigit() or not value.isascii():
        raise InvalidArgument(
            "x-amz-decoded-content-length must be a non-negative integer",
            ArgumentName="x-amz-decoded-content-length",
            ArgumentValue=value,
        )
    return int(value)


def parse_request_auth(
    method: str,
    raw_path: bytes | str,
    query: bytes | str | Sequence[tuple[str, str]],
    headers: Mapping[str, str],
) -> AuthRequest | None:
    """
    Parse the SigV4 authentication of a request, without the secret.

    @param method: the HTTP method.
    @param raw_path: the path as received, still percent-encoded.
    @param query: the raw query string, or pairs from L{parse_query}.
    @param headers: from L{header_map}.
    @return: the parsed request, or C{None} for an anonymous request.
    @raise S3Error: the error AWS answers for malformed authentication.
    """
    pairs = parse_query(query) if isinstance(query, (bytes, str)) else list(query)
    names = {name for name, _ in pairs}
    authorization = headers.get("authorization")
    presigned = (
        "X-Amz-Algorithm" in names or "X-Amz-Credential" in names or ("X-Amz-Signature" in names)
    )
    if authorization is not None and presigned:
        raise InvalidArgument(
            "Only one auth mechanism allowed; only the X-Amz-Algorithm query "
            "parameter, Signature query string parameter or the Authorization "
            "header should be specified",
            ArgumentName="Authorization",
            ArgumentValue=authorization,
        )
    if "x-amz-security-token" in headers or "X-Amz-Security-Token" in names:
        # Anvil issues no temporary credentials.
        raise InvalidToken()
    if authorization is not None:
        return _parse_header_auth(method, raw_path, pairs, headers, authorization)
    if presigned:
        return _parse_query_auth(method, raw_path, pairs, headers)
    if "AWSAccessKeyId" in names and "Signature" in names:
        raise InvalidRequest(_UNSUPPORTED_MECHANISM)
    return None


def _request_date(headers: Mapping[str, str]) -> tuple[str, datetime, str]:
    """
    The request time from x-amz-date, or else Date.

    @return: the string-to-sign timestamp, the time, and the raw value.
    @raise AccessDenied: when neither is present and valid.
    """
    raw = headers.get("x-amz-date")
    if raw is not None:
        moment = _parse_amz_date(raw)
        if moment is not None:
            return raw, moment, raw
    else:
        raw = headers.get("date")
        if raw is not None:
            try:
                parsed = parsedate_to_datetime(raw)
            except (TypeError, ValueError, IndexError):
                parsed = None
            if parsed is not None and parsed.tzinfo is not None:
                moment = parsed.astimezone(UTC)
                return _format_amz_date(moment), moment, raw
    raise AccessDenied("AWS authentication requires a valid Date or x-amz-date header")


def _parse_header_auth(
    method: str,
    raw_path: bytes | str,
    pairs: list[tuple[str, str]],
    headers: Mapping[str, str],
    authorization: str,
) -> AuthRequest:
    algorithm, _, rest = authorization.strip().partition(" ")
    if algorithm != ALGORITHM:
        if algorithm == "AWS":
            raise InvalidRequest(_UNSUPPORTED_MECHANISM)
        raise InvalidArgument(
            "Unsupported Authorization Type",
            ArgumentName="Authorization",
            ArgumentValue=authorization,
        )
    parts = _authorization_parts(rest)
    access_key, scope = _parse_credential(parts["Credential"], presigned=False)
    signed = _parse_signed_headers(
        parts["SignedHeaders"], AuthorizationHeaderMalformed, _HEADER_MALFORMED
    )
    amz_date, moment, raw_date = _request_date(headers)
    if scope.date != amz_date[:8]:
        raise AuthorizationHeaderMalformed(
            _HEADER_MALFORMED + f'Invalid credential date "{scope.date}". This date '
            f'is not the same as X-Amz-Date: "{amz_date[:8]}".'
        )
    payload_hash = headers.get("x-amz-content-sha256")
    if payload_hash is None:
        raise InvalidRequest("Missing required header for this request: x-amz-content-sha256")
    mode, sha256 = parse_payload_hash(payload_hash)
    _check_unsigned_amz_headers(headers, signed)
    return _auth_request(
        method,
        raw_path,
        pairs,
        headers,
        access_key,
        scope,
        signed,
        parts["Signature"],
        amz_date,
        moment,
        raw_date,
        False,
        None,
        payload_hash,
        mode,
        sha256,
    )


def _parse_query_auth(
    method: str,
    raw_path: bytes | str,
    pairs: list[tuple[str, str]],
    headers: Mapping[str, str],
) -> AuthRequest:
    params: dict[str, str] = {}
    for name, value in pairs:
        if name in _PRESIGN_PARAMETERS or name == "X-Amz-Content-Sha256":
            if name in params:
                raise AuthorizationQueryParametersError(f"{name} must be given only once.")
            params[name] = value
    if not all(name in params for name in _PRESIGN_PARAMETERS):
        raise AuthorizationQueryParametersError()
    if params["X-Amz-Algorithm"] != ALGORITHM:
        raise AuthorizationQueryParametersError(f'X-Amz-Algorithm only supports "{ALGORITHM}"')
    access_key, scope = _parse_credential(params["X-Amz-Credential"], presigned=True)
    raw_date = params["X-Amz-Date"]
    moment = _parse_amz_date(raw_date)
    if moment is None:
        raise AuthorizationQueryParametersError(
            "X-Amz-Date must be in the ISO8601 Long Format \"yyyyMMdd'T'HHmmss'Z'\""
        )
    if scope.date != raw_date[:8]:
        raise AuthorizationQueryParametersError(
            _QUERY_CREDENTIAL + "Invalid credential date. Date is not the same as X-Amz-Date."
        )
    expires_text = params["X-Amz-Expires"]
    if not expires_text.lstrip("-").isdigit() or not expires_text.isascii():
        raise AuthorizationQueryParametersError("X-Amz-Expires should be a number")
    expires = int(expires_text)
    if expires < 0:
        raise AuthorizationQueryParametersError("X-Amz-Expires must be non-negative")
    if expires == 0:
        raise AuthorizationQueryParametersError("X-Amz-Expires must be at least 1")
    if expires > MAX_PRESIGN_EXPIRES:
        raise AuthorizationQueryParametersError(
            "X-Amz-Expires must be less than a week (in seconds) that is 604800"
        )
    signed = _parse_signed_headers(
        params["X-Amz-SignedHeaders"], AuthorizationQueryParametersError, ""
    )
    payload_hash = params.get("X-Amz-Content-Sha256", UNSIGNED_PAYLOAD)
    mode, sha256 = parse_payload_hash(payload_hash)
    if mode.chunked:
        raise InvalidRequest("Presigned requests cannot use a streaming (aws-chunked) payload")
    _check_unsigned_amz_headers(headers, signed)
    unsigned_pairs = [(k, v) for k, v in pairs if k != "X-Amz-Signature"]
    return _auth_request(
        method,
        raw_path,
        unsigned_pairs,
        headers,
        access_key,
        scope,
        signed,
        params["X-Amz-Signature"],
        raw_date,
        moment,
        raw_date,
        True,
        expires,
        payload_hash,
        mode,
        sha256,
    )


def _auth_request(
    method: str,
    raw_path: bytes | str,
    pairs: list[tuple[str, str]],
    headers: Mapping[str, str],
    access_key: str,
    scope: CredentialScope,
    signed: tuple[str, ...],
    signature: str,
    amz_date: str,
    moment: datetime,
    raw_date: str,
    presigned: bool,
    expires: int | None,
    payload_hash: str,
    mode: PayloadMode,
    sha256: str | None,
) -> AuthRequest:
    canonical = build_canonical_request(method, raw_path, pairs, headers, signed, payload_hash)
    raw_canonical = None
    if any(not headers.get(name, "").isascii() for name in signed):
        raw_canonical = build_canonical_request(
            method, raw_path, pairs, headers, signed, payload_hash, raw_header_bytes=True
        )
    trailer = headers.get("x-amz-trailer")
    return AuthRequest(
        access_key=access_key,
        scope=scope,
        signed_headers=signed,
        signature=signature.lower(),
        amz_date=amz_date,
        request_time=moment,
        raw_date=raw_date,
        presigned=presigned,
        expires=expires,
        payload_hash=payload_hash,
        payload_mode=mode,
        payload_sha256=sha256,
        canonical_request=canonical,
        raw_canonical_request=raw_canonical,
        decoded_content_length=_decoded_content_length(headers),
        trailer=trailer.strip().lower() if trailer is not None else None,
    )


# Verification -----------------------------------------------------------------


def _hmac(key: bytes, message: str | bytes) -> bytes:
    if isinstance(message, str):
        message = message.encode("utf-8")
    return hmac.new(key, message, hashlib.sha256).digest()


@lru_cache(maxsize=1024)
def signing_key(secret_key: str, date: str, region: str, service: str = _SERVICE) -> bytes:
    """
    Derive the SigV4 signing key (cached: it changes once a day per key).

    The cache is keyed by the secret itself, so a rotated secret derives a
    new key at once.

    @param secret_key: the secret access key.
    @param date: C{YYYYMMDD} from the credential scope.
    @param region: the region from the credential scope.
    @param service: the service from the credential scope.
    @return: the 32-byte signing key.
    """
    key = _hmac(("AWS4" + secret_key).encode("utf-8"), date)
    key = _hmac(key, region)
    key = _hmac(key, service)
    return _hmac(key, _TERMINAL)


def _now_datetime(now: float) -> datetime:
    return datetime.fromtimestamp(now, tz=UTC)


def check_request_time(auth: AuthRequest, now: float) -> None:
    """
    Check the request time against the clock.

    @param auth: the parsed request.
    @param now: the current POSIX time (e.g. C{reactor.seconds()}).
    @raise RequestTimeTooSkewed: for a header-signed request more than 15
        minutes away from C{now}.
    @raise AccessDenied: for a presigned URL that has expired or is dated
        more than 15 minutes in the future.
    """
    request = auth.request_time.timestamp()
    server_time = _iso8601(_now_datetime(now))
    if auth.presigned:
        assert auth.expires is not None
        if request - now > MAX_SKEW_SECONDS:
            raise AccessDenied("Request is not valid yet")
        if now > request + auth.expires:
            expired = AccessDenied("Request has expired")
            expired.extra.update(
                {
                    "X-Amz-Expires": str(auth.expires),
                    "Expires": _iso8601(_now_datetime(request + auth.expires)),
                    "ServerTime": server_time,
                }
            )
            raise expired
    elif abs(now - request) > MAX_SKEW_SECONDS:
        raise RequestTimeTooSkewed(
            RequestTime=auth.raw_date,
            ServerTime=server_time,
            MaxAllowedSkewMilliseconds=MAX_SKEW_SECONDS * 1000,
        )


class ChunkSigner:
    """
    The signature chain of an aws-chunked body.

    Chunk I{n}'s signature signs C{AWS4-HMAC-SHA256-PAYLOAD}, the request
    date, the scope, the signature of chunk I{n-1} (the seed signature of
    the request for the first chunk), the SHA-256 of the empty string and
    the SHA-256 of the chunk data. The trailer signature signs
    C{AWS4-HMAC-SHA256-TRAILER}, the date, the scope, the final (empty)
    chunk's signature and the SHA-256 of the canonical trailer.
    """

    def __init__(self, key: bytes, amz_date: str, scope: str, seed_signature: str) -> None:
        """
        @param key: the signing key.
        @param amz_date: the request timestamp as signed.
        @param scope: the credential scope string.
        @param seed_signature: the signature of the request headers.
        """
        self._key = key
        self._amz_date = amz_date
        self._scope = scope
        #: The last verified signature of the chain.
        self.previous = seed_signature

    def chunk_string_to_sign(self, chunk_sha256: str) -> str:
        """
        @param chunk_sha256: the hex SHA-256 of the chunk data.
        @return: the string to sign of the next chunk.
        """
        return (
            f"AWS4-HMAC-SHA256-PAYLOAD\n{self._amz_date}\n{self._scope}\n"
            f"{self.previous}\n{EMPTY_SHA256}\n{chunk_sha256}"
        )

    def sign_chunk(self, chunk_sha256: str) -> str:
        """
        Sign the next chunk and advance the chain (used by tests and by
        clients; the server uses L{verify_chunk}).

        @param chunk_sha256: the hex SHA-256 of the chunk data.
        @return: its signature.
        """
        signature = _hmac(self._key, self.chunk_string_to_sign(chunk_sha256)).hex()
        self.previous = signature
        return signature

    def verify_chunk(self, chunk_sha256: str, provided: str) -> None:
        """
        Verify the next chunk's signature and advance the chain.

        @param chunk_sha256: the hex SHA-256 of the received chunk data.
        @param provided: the C{chunk-signature} the client sent.
        @raise SignatureDoesNotMatch: if it does not verify.
        """
        self.previous = self._check(self.chunk_string_to_sign(chunk_sha256), provided, "chunk")

    def trailer_string_to_sign(self, canonical_trailer: bytes) -> str:
        """
        @param canonical_trailer: C{name:value\\n} for each trailing header.
        @return: the trailer's string to sign.
        """
        digest = hashlib.sha256(canonical_trailer).hexdigest()
        return (
            f"AWS4-HMAC-SHA256-TRAILER\n{self._amz_date}\n{self._scope}\n{self.previous}\n{digest}"
        )

    def sign_trailer(self, canonical_trailer: bytes) -> str:
        """
        @param canonical_trailer: C{name:value\\n} for each trailing header.
        @return: the trailer signature.
        """
        return _hmac(self._key, self.trailer_string_to_sign(canonical_trailer)).hex()

    def verify_trailer(self, canonical_trailer: bytes, provided: str) -> None:
        """
        Verify the C{x-amz-trailer-signature}.

        @param canonical_trailer: C{name:value\\n} for each trailing header
            other than the signature, in the order received.
        @param provided: the signature the client sent.
        @raise SignatureDoesNotMatch: if it does not verify.
        """
        self._check(self.trailer_string_to_sign(canonical_trailer), provided, "trailer")

    def _check(self, string_to_sign: str, provided: str, what: str) -> str:
        """
        Compare a provided signature with ours for C{string_to_sign}.

        @param what: C{"chunk"} or C{"trailer"}, for the error message.
        @return: our signature (it chains to the next chunk).
        @raise SignatureDoesNotMatch: if they differ.
        """
        expected = _hmac(self._key, string_to_sign).hex()
        if not hmac.compare_digest(expected, provided.lower()):
            raise SignatureDoesNotMatch(
                f"The {what} signature we calculated does not match the signature "
                "you provided. Check your key and signing method.",
                StringToSign=string_to_sign,
                SignatureProvided=provided,
            )
        return expected


class PayloadSha256:
    """
    Check a body against the signed C{x-amz-content-sha256}, incrementally.
    """

    def __init__(self, expected: str) -> None:
        """
        @param expected: the signed hex digest.
        """
        self._expected = expected.lower()
        self._hash = hashlib.sha256()

    def update(self, data: bytes | memoryview) -> None:
        """
        Add the next piece of the body.

        @param data: body bytes.
        """
        self._hash.update(data)

    def finish(self) -> None:
        """
        @raise XAmzContentSHA256Mismatch: if the body hashes differently.
        """
        computed = self._hash.hexdigest()
        if not hmac.compare_digest(computed, self._expected):
            raise XAmzContentSHA256Mismatch(
                ClientComputedContentSHA256=self._expected,
                S3ComputedContentSHA256=computed,
            )


@dataclass(frozen=True)
class VerifiedAuth:
    """
    A request whose signature verified.

    @ivar access_key: the authenticated access key id.
    @ivar scope: the credential scope.
    @ivar signing_key: the derived key (for the chunk signature chain).
    @ivar seed_signature: the request signature (first link of the chain).
    @ivar amz_date: the request timestamp as signed.
    @ivar request_time: the request time.
    @ivar presigned: C{True} for a presigned URL.
    @ivar payload_mode: how the body must be checked.
    @ivar payload_sha256: the signed hex body digest in C{SHA256} mode.
    @ivar decoded_content_length: C{x-amz-decoded-content-length}, if sent.
    @ivar trailer: the C{x-amz-trailer} value, if sent.
    """

    access_key: str
    scope: CredentialScope
    signing_key: bytes = field(repr=False)
    seed_signature: str
    amz_date: str
    request_time: datetime
    presigned: bool
    payload_mode: PayloadMode
    payload_sha256: str | None
    decoded_content_length: int | None
    trailer: str | None

    def chunk_signer(self) -> ChunkSigner:
        """
        @return: a fresh signature chain starting at the seed signature.
        """
        return ChunkSigner(self.signing_key, self.amz_date, str(self.scope), self.seed_signature)

    def payload_verifier(self) -> PayloadSha256 | None:
        """
        @return: the body checker in C{SHA256} mode, else C{None}.
        """
        if self.payload_sha256 is None:
            return None
        return PayloadSha256(self.payload_sha256)


def verify(auth: AuthRequest, secret_key: str, now: float) -> VerifiedAuth:
    """
    Verify a request's time and signature.

    @param auth: from L{parse_request_auth}.
    @param secret_key: the secret of C{auth.access_key}.
    @param now: the current POSIX time.
    @return: the verified request.
    @raise RequestTimeTooSkewed: see L{check_request_time}.
    @raise AccessDenied: see L{check_request_time}.
    @raise SignatureDoesNotMatch: if the signature does not verify.
    """
    check_request_time(auth, now)
    key = signing_key(secret_key, auth.scope.date, auth.scope.region, auth.scope.service)
    string_to_sign = auth.string_to_sign()
    expected = _hmac(key, string_to_sign).hex()
    matched = hmac.compare_digest(expected, auth.signature)
    if not matched and auth.raw_canonical_request is not None:
        alternative = _hmac(key, auth.string_to_sign(auth.raw_canonical_request)).hex()
        matched = hmac.compare_digest(alternative, auth.signature)
    if not matched:
        raise SignatureDoesNotMatch(
            AWSAccessKeyId=auth.access_key,
            StringToSign=string_to_sign,
            SignatureProvided=auth.signature,
            StringToSignBytes=" ".join(f"{b:02x}" for b in string_to_sign.encode("utf-8")),
            CanonicalRequest=auth.canonical_request.decode("utf-8", "replace"),
            CanonicalRequestBytes=" ".join(f"{b:02x}" for b in auth.canonical_request),
        )
    return VerifiedAuth(
        access_key=auth.access_key,
        scope=auth.scope,
        signing_key=key,
        seed_signature=auth.signature,
        amz_date=auth.amz_date,
        request_time=auth.request_time,
        presigned=auth.presigned,
        payload_mode=auth.payload_mode,
        payload_sha256=auth.payload_sha256,
        decoded_content_length=auth.decoded_content_length,
        trailer=auth.trailer,
    )
