# -*- test-case-name: tests.test_s3_dispatch -*-
"""
Parsing the parts of an S3 request: target, path, host, query and headers.

The request target is used exactly as received: the path is percent-decoded
once (C{%2F} is a slash inside a key, C{+} is a plus sign, C{..} and empty
segments are kept), the query is split into decoded pairs (C{+} is a space
there, as in every HTML-form-encoded query). Twisted's own
C{request.postpath} is not used for keys: it is split and decoded segment by
segment, which is fine for routing but not a faithful key.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

from anvil.s3.errors import InvalidArgument, InvalidURI
from anvil.s3.sigv4 import parse_query

#: S3 keys are at most this many UTF-8 bytes.
MAX_KEY_BYTES = 1024


def split_target(target: bytes) -> tuple[bytes, bytes]:
    """
    Split a request target into its raw path and raw query.

    @param target: the request target (C{request.uri}), e.g.
        C{b"/bucket/a%20b?list-type=2"}. An absolute-form target
        (C{http://host/path}) is reduced to its path.
    @return: C{(raw_path, raw_query)}, both still percent-encoded; the
        query is C{b""} when there is none.
    """
    if not target.startswith(b"/"):
        _, separator, rest = target.partition(b"://")
        if separator:
            ends = [i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0]
            target = rest[min(ends) :] if ends else b""
            if not target.startswith(b"/"):
                target = b"/" + target
    path, _, query = target.partition(b"?")
    # A fragment is never sent by HTTP clients; drop it if one is.
    query = query.partition(b"#")[0]
    return path or b"/", query


def decode_component(raw: bytes) -> str:
    """
    Percent-decode a path component once and read it as UTF-8.

    @param raw: the percent-encoded bytes.
    @return: the text.
    @raise InvalidURI: if the bytes are not UTF-8.
    """
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidURI() from None


@dataclass(frozen=True)
class Address:
    """
    What a request addresses.

    @ivar bucket: the bucket name, or C{None} for the service (C{GET /}).
    @ivar key: the object key, C{""} at bucket level.
    @ivar virtual_host: whether the bucket came from the C{Host} header.
    """

    bucket: str | None
    key: str
    virtual_host: bool = False

    @property
    def level(self) -> str:
        """C{"service"}, C{"bucket"} or C{"object"}."""
        if self.bucket is None:
            return "service"
        return "object" if self.key else "bucket"

    @property
    def resource(self) -> str:
        """The C{Resource} of error documents: C{/}, C{/bucket} or C{/bucket/key}."""
        if self.bucket is None:
            return "/"
        if not self.key:
            return f"/{self.bucket}"
        return f"/{self.bucket}/{self.key}"


def host_bucket(host: str | None, domains: Iterable[str]) -> str | None:
    """
    The bucket named by a virtual-host style C{Host} header.

    @param host: the C{Host} header (may carry a port).
    @param domains: the service's base domains, lower case.
    @return: the bucket when C{host} is C{<bucket>.<domain>}, else C{None}
        (path style).
    """
    if not host:
        return None
    name = host.strip()
    if name.startswith("["):
        # An IPv6 literal: never a virtual host.
        return None
    name = name.rpartition(":")[0] if ":" in name else name
    name = name.rstrip(".")
    lowered = name.lower()
    for domain in domains:
        suffix = "." + domain
        if lowered.endswith(suffix) and len(lowered) > len(suffix):
            # Bucket names are lower case; keep the client's spelling so an
            # invalid name is reported as sent.
            return name[: -len(suffix)]
    return None


def parse_address(raw_path: bytes, host: str | None, domains: Iterable[str]) -> Address:
    """
    Find the bucket and key a request addresses.

    @param raw_path: the percent-encoded path.
    @param host: the C{Host} header.
    @param domains: base domains for virtual-host style addressing.
    @return: the address.
    @raise InvalidURI: if the path is not UTF-8 once decoded.
    @raise KeyTooLongError: never here; see L{check_key}.
    """
    bucket = host_bucket(host, domains)
    path = raw_path[1:] if raw_path.startswith(b"/") else raw_path
    if bucket is not None:
        return Address(bucket, decode_component(path), virtual_host=True)
    if not path:
        return Address(None, "")
    raw_bucket, _, raw_key = path.partition(b"/")
    return Address(decode_component(raw_bucket), decode_component(raw_key))


@dataclass(frozen=True)
class Query:
    """
    The decoded query parameters of a request.

    @ivar pairs: C{(name, value)} in order; a parameter without C{=} has
        the value C{""}.
    """

    pairs: tuple[tuple[str, str], ...]
    _first: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def parse(cls, raw_query: bytes | str) -> Query:
        """
        @param raw_query: the raw query string, without C{?}.
        @return: the parsed query.
        """
        pairs = tuple(parse_query(raw_query))
        first: dict[str, str] = {}
        for name, value in pairs:
            first.setdefault(name, value)
        return cls(pairs, first)

    def __contains__(self, name: object) -> bool:
        return name in self._first

    def get(self, name: str, default: str | None = None) -> str | None:
        """
        @param name: a parameter name (case-sensitive, as in S3).
        @param default: returned when absent.
        @return: the first value of C{name}.
        """
        return self._first.get(name, default)

    def names(self) -> frozenset[str]:
        """@return: every parameter name present."""
        return frozenset(self._first)

    @property
    def first(self) -> Mapping[str, str]:
        """The first value of each parameter."""
        return self._first


def parse_int(
    value: str,
    name: str,
    minimum: int | None = 0,
    maximum: int | None = None,
    message: str | None = None,
) -> int:
    """
    Parse an integer request parameter as S3 does.

    @param value: the text.
    @param name: the parameter name (for C{ArgumentName}).
    @param minimum: the smallest accepted value, if any.
    @param maximum: the largest accepted value, if any.
    @param message: the error message (default: a generic one).
    @return: the integer.
    @raise InvalidArgument: when C{value} is not a decimal integer in range.
    """
    text = value.strip()
    digits = text[1:] if text[:1] in ("-", "+") else text
    if not digits.isascii() or not digits.isdigit() or len(digits) > 18:
        raise InvalidArgument(
            message or f"Provided {name} not an integer or within integer range",
            ArgumentName=name,
            ArgumentValue=value,
        )
    number = int(text)
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise InvalidArgument(
            message or f"Argument {name} must be an integer between {minimum} and {maximum}"
            if maximum is not None
            else message or f"Argument {name} must be an integer >= {minimum}",
            ArgumentName=name,
            ArgumentValue=value,
        )
    return number


def parse_bool(value: str, name: str) -> bool:
    """
    Parse a boolean request parameter or element (C{true}/C{false}).

    @param value: the text.
    @param name: its name (for the error).
    @return: the value.
    @raise InvalidArgument: for anything else.
    """
    lowered = value.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    raise InvalidArgument(f"Invalid {name} value", ArgumentName=name, ArgumentValue=value)
