# -*- test-case-name: tests.test_s3_metadata_headers -*-
"""
Object metadata as HTTP headers: what a PutObject (or CopyObject REPLACE,
or CreateMultipartUpload) stores, what GetObject/HeadObject send back, the
C{response-*} overrides, and the conditional headers.

Everything here is pure: headers come in as the lower-case name to value
mapping built by L{anvil.s3.sigv4.header_map} (values decoded as
ISO-8859-1, so every received byte survives) and go out as C{(name, value)}
pairs of ASCII text.

Stored metadata
===============
An object keeps:

  - its C{Content-Type} (C{binary/octet-stream} when the request has none,
    as S3 does);
  - its user metadata: every C{x-amz-meta-*} header, the name lower-cased
    and without the prefix. S3 limits it to 2 KB, measured as the UTF-8
    bytes of every name and value (L{MAX_USER_METADATA}); more is
    C{MetadataTooLarge}. Values are stored as text: a value sent as raw
    UTF-8 bytes, or as an RFC 2047 encoded word (what S3 returns for
    non-ASCII values), is stored decoded, and non-ASCII values are sent back
    as RFC 2047 encoded words, as S3 does, so headers stay ASCII;
  - its system metadata: C{Content-Disposition}, C{Content-Encoding}
    (without C{aws-chunked}, see
    L{anvil.s3.chunked.stored_content_encoding}), C{Cache-Control},
    C{Expires}, C{Content-Language}, and a storage class other than
    C{STANDARD}. The keys of L{ObjectHeaders.system_metadata} are the
    lower-case header names.

Conditionals
============
L{check_read_conditions} applies If-Match, If-Unmodified-Since,
If-None-Match and If-Modified-Since with the precedence S3 documents for
GetObject/HeadObject (RFC 9110 section 13.2.2): If-Match decides alone when
present (412 when it fails), otherwise If-Unmodified-Since; then
If-None-Match decides alone when present (304 when it matches), otherwise
If-Modified-Since (304 when not modified). L{check_copy_source_conditions}
applies the C{x-amz-copy-source-if-*} variants the same way, except that
every failure is a 412. L{check_write_conditions} implements the
conditional writes of PutObject and CompleteMultipartUpload
(C{If-None-Match: *} and C{If-Match}).

Dates compare at one-second granularity: C{Last-Modified} carries whole
seconds, so an object modified at 10:00:00.7 is I{not} modified since
"10:00:00".
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from typing import Protocol
from urllib.parse import unquote

from anvil.s3.chunked import stored_content_encoding
from anvil.s3.errors import (
    InvalidArgument,
    InvalidRequest,
    InvalidStorageClass,
    KeyTooLongError,
    MetadataTooLarge,
    NoSuchKey,
    NotModified,
    PreconditionFailed,
    S3NotImplemented,
)
from anvil.s3.errors import (
    InvalidRange as S3InvalidRange,
)

__all__ = [
    "COPY",
    "DEFAULT_CONTENT_TYPE",
    "MAX_KEY_LENGTH",
    "MAX_USER_METADATA",
    "REPLACE",
    "CopySource",
    "ObjectHeaders",
    "apply_overrides",
    "check_copy_source_conditions",
    "check_key",
    "check_read_conditions",
    "check_write_conditions",
    "etag_matches",
    "format_http_date",
    "format_iso8601",
    "metadata_directive",
    "object_headers",
    "parse_copy_source",
    "parse_copy_source_range",
    "parse_http_date",
    "parse_object_headers",
    "quote_etag",
    "response_overrides",
    "user_metadata_size",
]

#: What S3 stores as the Content-Type of an object uploaded without one.
DEFAULT_CONTENT_TYPE = "binary/octet-stream"
#: The most user metadata an object may carry, in UTF-8 bytes of names and
#: values (S3: "the user-defined metadata is limited to 2 KB in size").
MAX_USER_METADATA = 2048
#: The longest object key, in UTF-8 bytes.
MAX_KEY_LENGTH = 1024

_META_PREFIX = "x-amz-meta-"

#: System metadata stored as sent: request header name = response header name.
_STORED_SYSTEM_HEADERS = (
    "content-disposition",
    "cache-control",
    "expires",
    "content-language",
)

#: Response header spelling for every stored header, in the order sent.
_RESPONSE_NAMES = {
    "content-type": "Content-Type",
    "content-language": "Content-Language",
    "expires": "Expires",
    "cache-control": "Cache-Control",
    "content-disposition": "Content-Disposition",
    "content-encoding": "Content-Encoding",
}

#: The C{response-*} query parameters GetObject and HeadObject accept, and
#: the header each one overrides.
_OVERRIDES = {
    "response-content-type": "content-type",
    "response-content-language": "content-language",
    "response-expires": "expires",
    "response-cache-control": "cache-control",
    "response-content-disposition": "content-disposition",
    "response-content-encoding": "content-encoding",
}

_STORAGE_CLASS = "x-amz-storage-class"
#: Storage classes S3 defines; Anvil stores all of them the same way but
#: remembers and reports the one asked for, as S3 does.
STORAGE_CLASSES = frozenset(
    {
        "STANDARD",
        "REDUCED_REDUNDANCY",
        "STANDARD_IA",
        "ONEZONE_IA",
        "INTELLIGENT_TIERING",
        "GLACIER",
        "DEEP_ARCHIVE",
        "OUTPOSTS",
        "GLACIER_IR",
        "SNOW",
        "EXPRESS_ONEZONE",
        "FSX_OPENZFS",
    }
)

# RFC 2047 encoded word, as S3 sends non-ASCII metadata values back:
# =?charset?B|Q?text?=
_ENCODED_WORD = re.compile(r"=\?([^?]+)\?([bBqQ])\?([^?]*)\?=")


def check_key(key: str) -> None:
    """
    Check the length of an object key.

    @param key: the decoded key (undecodable bytes as surrogate escapes).
    @raise KeyTooLongError: if its UTF-8 form is longer than 1024 bytes.
    """
    size = len(key.encode("utf-8", "surrogateescape"))
    if size > MAX_KEY_LENGTH:
        raise KeyTooLongError(Size=size, MaxSizeAllowed=MAX_KEY_LENGTH)


@dataclass(frozen=True)
class ObjectHeaders:
    """
    The metadata of an object as stored in its record.

    @ivar content_type: the Content-Type.
    @ivar user_metadata: C{x-amz-meta-*} names (lower case, no prefix) to
        decoded values.
    @ivar system_metadata: lower-case header name to value for the other
        stored headers.
    """

    content_type: str = DEFAULT_CONTENT_TYPE
    user_metadata: dict[str, str] = field(default_factory=dict)
    system_metadata: dict[str, str] = field(default_factory=dict)


def _decode_rfc2047(value: str) -> str:
    """
    Decode RFC 2047 encoded words in a header value.

    Text that does not decode is kept as it was: S3 stores what it cannot
    interpret.

    @param value: the value (already converted to text).
    @return: the decoded text.
    """

    def decode_word(match: re.Match[str]) -> str:
        charset, encoding, text = match.groups()
        try:
            if encoding.upper() == "B":
                raw = base64.b64decode(text, validate=True)
            else:
                raw = binascii.a2b_qp(text.replace("_", " ").encode("ascii"), header=True)
            return raw.decode(charset)
        except (ValueError, LookupError, binascii.Error):
            return match.group(0)

    return _ENCODED_WORD.sub(decode_word, value)


def _decode_header_text(value: str) -> str:
    """
    Turn a received header value into the text it stands for.

    Values arrive decoded as ISO-8859-1 (one character per byte); clients
    such as botocore send non-ASCII text as UTF-8 bytes, so the bytes are
    reinterpreted as UTF-8 when they form valid UTF-8. RFC 2047 encoded
    words are decoded too.

    @param value: the received value.
    @return: the text.
    """
    if not value.isascii():
        raw = value.encode("latin-1", "replace")
        try:
            value = raw.decode("utf-8")
        except UnicodeDecodeError:
            pass
    if "=?" in value:
        value = _decode_rfc2047(value)
    return value


def _encode_header_text(value: str) -> str:
    """
    Make a stored value safe for an HTTP header, as S3 does.

    @param value: stored text.
    @return: the value itself when it is printable ASCII, else one RFC 2047
        encoded word holding its UTF-8 bytes.
    """
    if value.isascii() and value.isprintable():
        return value
    encoded = base64.b64encode(value.encode("utf-8", "surrogateescape")).decode("ascii")
    return f"=?UTF-8?B?{encoded}?="


def user_metadata_size(user_metadata: Mapping[str, str]) -> int:
    """
    @param user_metadata: names (without prefix) to values.
    @return: the size S3 counts against the 2 KB limit: UTF-8 bytes of
        every name and value.
    """
    return sum(
        len(name.encode("utf-8", "surrogateescape")) + len(value.encode("utf-8", "surrogateescape"))
        for name, value in user_metadata.items()
    )


def parse_object_headers(headers: Mapping[str, str]) -> ObjectHeaders:
    """
    Extract the metadata a write request asks to store.

    @param headers: request headers, lower-case names.
    @return: the metadata.
    @raise MetadataTooLarge: if the user metadata exceeds 2 KB.
    @raise InvalidStorageClass: for an unknown C{x-amz-storage-class}.
    """
    content_type = headers.get("content-type") or DEFAULT_CONTENT_TYPE
    user: dict[str, str] = {}
    for name, value in headers.items():
        if name.startswith(_META_PREFIX):
            user[name[len(_META_PREFIX) :]] = _decode_header_text(value)
    size = user_metadata_size(user)
    if size > MAX_USER_METADATA:
        raise MetadataTooLarge(Size=size, MaxSizeAllowed=MAX_USER_METADATA)
    system: dict[str, str] = {}
    for name in _STORED_SYSTEM_HEADERS:
        if name in headers:
            system[name] = _decode_header_text(headers[name])
    encoding = stored_content_encoding(headers.get("content-encoding"))
    if encoding is not None:
        system["content-encoding"] = encoding
    storage_class = headers.get(_STORAGE_CLASS)
    if storage_class is not None:
        storage_class = storage_class.strip()
        if storage_class not in STORAGE_CLASSES:
            raise InvalidStorageClass(StorageClassRequested=storage_class)
        if storage_class != "STANDARD":
            system[_STORAGE_CLASS] = storage_class
    return ObjectHeaders(_decode_header_text(content_type), user, system)


def object_headers(
    content_type: str,
    user_metadata: Mapping[str, str],
    system_metadata: Mapping[str, str],
) -> list[tuple[str, str]]:
    """
    The response headers describing a stored object's metadata.

    @param content_type: the stored Content-Type.
    @param user_metadata: stored user metadata.
    @param system_metadata: stored system metadata.
    @return: C{(name, value)} pairs: Content-Type, the stored system headers
        and C{x-amz-meta-*}.
    """
    out = [("Content-Type", _encode_header_text(content_type))]
    for name, spelled in _RESPONSE_NAMES.items():
        if name in system_metadata:
            out.append((spelled, _encode_header_text(system_metadata[name])))
    if _STORAGE_CLASS in system_metadata:
        out.append(("x-amz-storage-class", system_metadata[_STORAGE_CLASS]))
    missing = 0
    for name, value in sorted(user_metadata.items()):
        if not name.isascii() or not name:
            # Cannot be a header name; S3 reports such entries as a count.
            missing += 1
            continue
        out.append((_META_PREFIX + name, _encode_header_text(value)))
    if missing:
        out.append(("x-amz-missing-meta", str(missing)))
    return out


class QueryParameters(Protocol):
    """The query of a request: first value of each parameter by name."""

    def get(self, name: str, /) -> str | None:
        """@return: the parameter's first value, or C{None} when absent."""


def response_overrides(query: QueryParameters | Mapping[str, str], signed: bool) -> dict[str, str]:
    """
    The C{response-*} query parameters of a GetObject or HeadObject.

    S3 honours them only for signed requests (Authorization header or
    presigned URL); an anonymous request using them is refused.

    @param query: the request's query parameters (first values).
    @param signed: whether the request was authenticated.
    @return: lower-case header name to the value to send instead of the
        stored one.
    @raise InvalidRequest: for an anonymous request with overrides.
    """
    found = {}
    for parameter, header in _OVERRIDES.items():
        value = query.get(parameter)
        if value is not None:
            found[header] = value
    if found and not signed:
        raise InvalidRequest(
            "Request specific response headers cannot be used for anonymous GET requests."
        )
    return found


def apply_overrides(
    headers: Iterable[tuple[str, str]], overrides: Mapping[str, str]
) -> list[tuple[str, str]]:
    """
    Replace (or add) the overridden headers in a response header list.

    @param headers: the headers from L{object_headers}.
    @param overrides: from L{response_overrides}.
    @return: the new list.
    """
    out = [(name, value) for name, value in headers if name.lower() not in overrides]
    for name, value in overrides.items():
        out.append((_RESPONSE_NAMES[name], _encode_header_text(value)))
    return out


# Dates and ETags ---------------------------------------------------------------


def format_http_date(moment: datetime) -> str:
    """
    @param moment: an aware datetime.
    @return: the IMF-fixdate form (C{Sun, 06 Nov 1994 08:49:37 GMT}) used by
        C{Last-Modified}; fractions of a second are dropped.
    """
    return format_datetime(moment.astimezone(UTC).replace(microsecond=0), usegmt=True)


def format_iso8601(moment: datetime) -> str:
    """
    @param moment: an aware datetime.
    @return: the timestamp form of S3 XML documents,
        C{2009-10-12T17:50:30.000Z} (milliseconds kept).
    """
    utc = moment.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def parse_http_date(value: str | None) -> datetime | None:
    """
    Parse an HTTP date (IMF-fixdate, RFC 850 or asctime form).

    @param value: the header value, or C{None}.
    @return: an aware UTC datetime, or C{None} when absent or not a valid
        date (RFC 9110: an invalid date in a conditional header is ignored).
    """
    if value is None:
        return None
    try:
        parsed = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        # asctime dates carry no zone and are GMT.
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def quote_etag(etag: str) -> str:
    """
    @param etag: an ETag with or without quotes.
    @return: the quoted form sent in headers and XML.
    """
    return etag if etag.startswith('"') else f'"{etag}"'


def _normalise_etag(value: str) -> str:
    value = value.strip()
    value = value.removeprefix("W/")
    return value.strip('"')


def etag_matches(header: str, etag: str) -> bool:
    """
    Evaluate an If-Match / If-None-Match list against an object's ETag.

    @param header: C{*} or a comma-separated list of entity tags (quoted or
        not; weak tags compare by their opaque part, as S3 does).
    @param etag: the object's ETag, quoted or not.
    @return: C{True} when the header names the ETag (or is C{*}).
    """
    wanted = _normalise_etag(etag)
    for candidate in header.split(","):
        candidate = candidate.strip()
        if candidate == "*" or (candidate and _normalise_etag(candidate) == wanted):
            return True
    return False


def _seconds(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(microsecond=0)


def _validator_headers(etag: str, last_modified: datetime) -> dict[str, str]:
    return {"ETag": quote_etag(etag), "Last-Modified": format_http_date(last_modified)}


def check_read_conditions(headers: Mapping[str, str], etag: str, last_modified: datetime) -> None:
    """
    Apply the conditional headers of a GetObject or HeadObject.

    @param headers: request headers, lower-case names.
    @param etag: the object's ETag.
    @param last_modified: the object's modification time.
    @raise PreconditionFailed: If-Match fails, or there is no If-Match and
        If-Unmodified-Since fails.
    @raise NotModified: If-None-Match matches, or there is no If-None-Match
        and the object was not modified since If-Modified-Since. The error
        carries the ETag and Last-Modified headers a 304 sends.
    """
    _check_conditions(
        etag,
        last_modified,
        if_match=headers.get("if-match"),
        if_unmodified_since=headers.get("if-unmodified-since"),
        if_none_match=headers.get("if-none-match"),
        if_modified_since=headers.get("if-modified-since"),
        names=("If-Match", "If-Unmodified-Since", "If-None-Match", "If-Modified-Since"),
        copy=False,
    )


def check_copy_source_conditions(
    headers: Mapping[str, str], etag: str, last_modified: datetime
) -> None:
    """
    Apply the C{x-amz-copy-source-if-*} headers of a CopyObject or
    UploadPartCopy to the source object.

    The precedence is that of L{check_read_conditions}; S3 documents both
    pairs: if-match true with unmodified-since false copies, if-none-match
    false with modified-since true fails.

    @param headers: request headers, lower-case names.
    @param etag: the source object's ETag.
    @param last_modified: the source object's modification time.
    @raise PreconditionFailed: if a condition fails.
    """
    prefix = "x-amz-copy-source-"
    _check_conditions(
        etag,
        last_modified,
        if_match=headers.get(prefix + "if-match"),
        if_unmodified_since=headers.get(prefix + "if-unmodified-since"),
        if_none_match=headers.get(prefix + "if-none-match"),
        if_modified_since=headers.get(prefix + "if-modified-since"),
        names=(
            "x-amz-copy-source-If-Match",
            "x-amz-copy-source-If-Unmodified-Since",
            "x-amz-copy-source-If-None-Match",
            "x-amz-copy-source-If-Modified-Since",
        ),
        copy=True,
    )


def _check_conditions(
    etag: str,
    last_modified: datetime,
    *,
    if_match: str | None,
    if_unmodified_since: str | None,
    if_none_match: str | None,
    if_modified_since: str | None,
    names: tuple[str, str, str, str],
    copy: bool,
) -> None:
    modified = _seconds(last_modified)
    if if_match is not None:
        if not etag_matches(if_match, etag):
            raise PreconditionFailed(Condition=names[0])
    else:
        since = parse_http_date(if_unmodified_since)
        if since is not None and modified > since:
            raise PreconditionFailed(Condition=names[1])
    if if_none_match is not None:
        if etag_matches(if_none_match, etag):
            if copy:
                raise PreconditionFailed(Condition=names[2])
            raise NotModified(headers=_validator_headers(etag, last_modified))
    else:
        since = parse_http_date(if_modified_since)
        if since is not None and modified <= since:
            if copy:
                raise PreconditionFailed(Condition=names[3])
            raise NotModified(headers=_validator_headers(etag, last_modified))


def check_write_conditions(headers: Mapping[str, str], current_etag: str | None) -> None:
    """
    Apply the conditional-write headers of PutObject and
    CompleteMultipartUpload to the object currently stored under the key.

    @param headers: request headers, lower-case names.
    @param current_etag: the ETag of the live object, or C{None} when the
        key has none.
    @raise S3NotImplemented: for an If-None-Match other than C{*} (the only
        value S3 supports on writes).
    @raise PreconditionFailed: C{If-None-Match: *} and the key exists, or
        If-Match does not name the current ETag.
    @raise NoSuchKey: If-Match on a key that has no object.
    """
    if_none_match = headers.get("if-none-match")
    if if_none_match is not None:
        if if_none_match.strip() != "*":
            raise S3NotImplemented(
                "A header you provided implies functionality that is not implemented",
                Header="If-None-Match",
            )
        if current_etag is not None:
            raise PreconditionFailed(Condition="If-None-Match")
    if_match = headers.get("if-match")
    if if_match is not None:
        if current_etag is None:
            raise NoSuchKey()
        if not etag_matches(if_match, current_etag):
            raise PreconditionFailed(Condition="If-Match")


# Copy ------------------------------------------------------------------------------

#: Values of C{x-amz-metadata-directive} (and C{x-amz-tagging-directive}).
COPY = "COPY"
REPLACE = "REPLACE"


def metadata_directive(headers: Mapping[str, str]) -> str:
    """
    @param headers: request headers, lower-case names.
    @return: C{COPY} (the default) or C{REPLACE}.
    @raise InvalidArgument: for any other value.
    """
    value = headers.get("x-amz-metadata-directive")
    if value is None:
        return COPY
    if value not in (COPY, REPLACE):
        raise InvalidArgument(
            "Unknown metadata directive.",
            ArgumentName="x-amz-metadata-directive",
            ArgumentValue=value,
        )
    return value


@dataclass(frozen=True)
class CopySource:
    """
    The object an C{x-amz-copy-source} header names.

    @ivar bucket: the source bucket name.
    @ivar key: the decoded source key.
    @ivar version_id: the C{versionId} asked for, if any.
    """

    bucket: str
    key: str
    version_id: str | None


def parse_copy_source(value: str) -> CopySource:
    """
    Parse C{x-amz-copy-source}: C{[/]bucket/key[?versionId=id]}, URL-encoded.

    The query is split off before decoding, so a key containing C{?} must
    be sent as C{%3F}, as S3 requires.

    @param value: the header value.
    @return: the source.
    @raise InvalidArgument: if no bucket or no key can be found.
    """
    raw, _, query = value.strip().partition("?")
    version_id = None
    if query:
        for pair in query.split("&"):
            name, _, text = pair.partition("=")
            if name == "versionId":
                version_id = unquote(text)
    decoded = unquote(raw, errors="surrogateescape")
    decoded = decoded.removeprefix("/")
    bucket, slash, key = decoded.partition("/")
    if not bucket or not slash or not key:
        raise InvalidArgument(
            "Copy Source must mention the source bucket and key: sourcebucket/sourcekey",
            ArgumentName="x-amz-copy-source",
            ArgumentValue=value,
        )
    return CopySource(bucket, key, version_id)


_COPY_RANGE = re.compile(r"bytes=([0-9]+)-([0-9]+)")


def parse_copy_source_range(value: str | None, size: int) -> tuple[int, int] | None:
    """
    Parse C{x-amz-copy-source-range} of an UploadPartCopy.

    Unlike C{Range}, only the C{bytes=first-last} form is allowed, and both
    positions must lie inside the source.

    @param value: the header value, or C{None}.
    @param size: the size of the source object.
    @return: C{(start, stop)} with C{stop} exclusive, or C{None} to copy the
        whole source.
    @raise InvalidArgument: if the value is not of that form.
    @raise InvalidRange: (the S3 error) if the range does not fit the source.
    """
    if value is None:
        return None
    match = _COPY_RANGE.fullmatch(value.strip())
    if match is None:
        raise InvalidArgument(
            "The x-amz-copy-source-range value must be of the form bytes=first-last "
            "where first and last are the zero-based offsets of the first and last bytes to copy",
            ArgumentName="x-amz-copy-source-range",
            ArgumentValue=value,
        )
    first, last = int(match.group(1)), int(match.group(2))
    if first > last or last >= size:
        raise S3InvalidRange(
            f"Range specified is not valid for source object of size: {size}",
            RangeRequested=value,
            ActualObjectSize=size,
        )
    return first, last + 1
