# -*- test-case-name: tests.test_checksums -*-
"""
The S3 checksum family: C{Content-MD5} and the C{x-amz-checksum-*} headers.

Everything here is incremental: a hasher is fed the body piece by piece as
it arrives and asked for its digest at the end, so nothing is ever held
whole in memory.

Algorithms
==========
C{CRC32} (zlib), C{CRC32C}, C{CRC64NVME}, C{SHA1}, C{SHA256}, C{SHA512},
C{MD5} and, when C{awscrt} provides them, C{XXHASH64}, C{XXHASH3} and
C{XXHASH128}. Values travel as the base64 of the big-endian digest (a CRC32
is 4 bytes, so 8 base64 characters).

CRC32C and CRC64NVME use C{awscrt} (the AWS common runtime, which botocore
itself uses for these checksums; hardware accelerated). Without it they fall
back to a table-driven pure-Python implementation that gives the same
results at a few MB/s: correct, but too slow for large objects, so C{awscrt}
should be installed (see L{HAVE_CRT}).

Multipart
=========
S3 knows two checksum types for a completed multipart upload:

  - C{COMPOSITE}: the checksum of the concatenated binary part checksums,
    followed by C{-N} (the part count): L{composite_checksum}. Supported
    for every algorithm except CRC64NVME (as on AWS).
  - C{FULL_OBJECT}: the checksum of the whole object, derived from the part
    CRCs and lengths without reading the data again: L{full_object_checksum}.
    Supported for the CRC algorithms only (as on AWS); it is the only type
    for CRC64NVME.

L{default_checksum_type} and L{parse_checksum_type} apply the AWS rules.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from anvil.s3.errors import (
    BadDigest,
    InvalidDigest,
    InvalidRequest,
    MalformedTrailerError,
)

try:
    from awscrt import checksums as _crt
except ImportError:  # pragma: no cover - exercised only without awscrt
    _crt = None

#: True when the C{awscrt} accelerated CRCs (and xxhash) are available.
HAVE_CRT: bool = _crt is not None

# Every algorithm S3 defines, in the order AWS lists them. Some may not be
# available here (see supported_algorithms()).
KNOWN_ALGORITHMS: tuple[str, ...] = (
    "CRC32",
    "CRC32C",
    "CRC64NVME",
    "SHA1",
    "SHA256",
    "SHA512",
    "MD5",
    "XXHASH64",
    "XXHASH3",
    "XXHASH128",
)

_DIGEST_SIZES: dict[str, int] = {
    "CRC32": 4,
    "CRC32C": 4,
    "CRC64NVME": 8,
    "SHA1": 20,
    "SHA256": 32,
    "SHA512": 64,
    "MD5": 16,
    "XXHASH64": 8,
    "XXHASH3": 8,
    "XXHASH128": 16,
}

#: The algorithms whose multipart checksum can be C{FULL_OBJECT}.
CRC_ALGORITHMS: frozenset[str] = frozenset({"CRC32", "CRC32C", "CRC64NVME"})

COMPOSITE = "COMPOSITE"
FULL_OBJECT = "FULL_OBJECT"

_HEADER_PREFIX = "x-amz-checksum-"


class Hasher(Protocol):
    """An incremental checksum."""

    def update(self, data: bytes | memoryview) -> None:
        """
        Add data.

        @param data: the next bytes of the message.
        """

    def digest(self) -> bytes:
        """
        @return: the big-endian digest of everything added so far.
        """


# CRCs -------------------------------------------------------------------------


@dataclass(frozen=True)
class _CrcParams:
    """
    A reflected CRC with all-ones initial value and final xor (CRC32, CRC32C
    and CRC64NVME all have this form).
    """

    width: int
    poly: int  # reflected polynomial

    @property
    def mask(self) -> int:
        return (1 << self.width) - 1


_CRC_PARAMS: dict[str, _CrcParams] = {
    "CRC32": _CrcParams(32, 0xEDB88320),
    "CRC32C": _CrcParams(32, 0x82F63B78),
    "CRC64NVME": _CrcParams(64, 0x9A6C9329AC4BC9B5),
}

_crc_tables: dict[str, list[int]] = {}


def _crc_table(algorithm: str) -> list[int]:
    """
    Build (once) the byte-at-a-time table of a CRC.

    @param algorithm: a key of C{_CRC_PARAMS}.
    @return: the 256-entry table.
    """
    table = _crc_tables.get(algorithm)
    if table is None:
        poly = _CRC_PARAMS[algorithm].poly
        table = []
        for byte in range(256):
            crc = byte
            for _ in range(8):
                crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
            table.append(crc)
        _crc_tables[algorithm] = table
    return table


def pure_crc(algorithm: str, data: bytes | memoryview, crc: int = 0) -> int:
    """
    Compute a CRC in pure Python (the fallback when C{awscrt} is missing).

    @param algorithm: C{"CRC32"}, C{"CRC32C"} or C{"CRC64NVME"}.
    @param data: the bytes to add.
    @param crc: the CRC of the preceding data (0 to start).
    @return: the CRC of the preceding data followed by C{data}.
    """
    params = _CRC_PARAMS[algorithm]
    table = _crc_table(algorithm)
    value = crc ^ params.mask
    for byte in bytes(data):
        value = table[(value ^ byte) & 0xFF] ^ (value >> 8)
    return value ^ params.mask


def _crc_function(algorithm: str) -> Callable[[bytes | memoryview, int], int]:
    """
    Choose the fastest available implementation of a CRC.

    @param algorithm: C{"CRC32"}, C{"CRC32C"} or C{"CRC64NVME"}.
    @return: C{f(data, previous_crc) -> crc}.
    """
    if algorithm == "CRC32":
        return zlib.crc32
    if _crt is not None:
        function: Callable[[bytes | memoryview, int], int] = (
            _crt.crc32c if algorithm == "CRC32C" else _crt.crc64nvme
        )
        return function
    return lambda data, crc: pure_crc(algorithm, data, crc)


class _Crc:
    """An incremental CRC hasher."""

    def __init__(self, algorithm: str) -> None:
        self._function = _crc_function(algorithm)
        self._bytes = _CRC_PARAMS[algorithm].width // 8
        self.value = 0

    def update(self, data: bytes | memoryview) -> None:
        self.value = self._function(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(self._bytes, "big")


def _multiply_mod_poly(a: int, b: int, params: _CrcParams) -> int:
    """
    Multiply two polynomials modulo the CRC polynomial, in the reflected
    representation (zlib's C{multmodp}, for any width).
    """
    top = 1 << (params.width - 1)
    product = 0
    while a:
        if a & top:
            product ^= b
        a = (a << 1) & params.mask
        b = (b >> 1) ^ params.poly if b & 1 else b >> 1
    return product


def pure_crc_combine(algorithm: str, crc1: int, crc2: int, length2: int) -> int:
    """
    Combine two CRCs in pure Python (zlib's C{crc32_combine} generalised).

    @param algorithm: C{"CRC32"}, C{"CRC32C"} or C{"CRC64NVME"}.
    @param crc1: the CRC of the first block.
    @param crc2: the CRC of the second block.
    @param length2: the length of the second block in bytes.
    @return: the CRC of the first block followed by the second.
    """
    params = _CRC_PARAMS[algorithm]
    # crc1 must be multiplied by x^(8 * length2); x^(2^k) is found by
    # repeated squaring starting from x^8 (x^1 is the bit below the top).
    power = 1 << (params.width - 1)  # x^0
    square = _multiply_mod_poly(1 << (params.width - 2), 1 << (params.width - 2), params)
    square = _multiply_mod_poly(square, square, params)
    square = _multiply_mod_poly(square, square, params)  # x^8
    n = length2
    while n:
        if n & 1:
            power = _multiply_mod_poly(square, power, params)
        n >>= 1
        if n:
            square = _multiply_mod_poly(square, square, params)
    return _multiply_mod_poly(power, crc1, params) ^ crc2


def crc_combine(algorithm: str, crc1: int, crc2: int, length2: int) -> int:
    """
    The CRC of two concatenated blocks, from their CRCs and the second length.

    @param algorithm: C{"CRC32"}, C{"CRC32C"} or C{"CRC64NVME"}.
    @param crc1: the CRC of the first block.
    @param crc2: the CRC of the second block.
    @param length2: the length of the second block in bytes.
    @return: the combined CRC.
    """
    if _crt is not None and hasattr(_crt, "combine_crc32"):
        combine = {
            "CRC32": _crt.combine_crc32,
            "CRC32C": _crt.combine_crc32c,
            "CRC64NVME": _crt.combine_crc64nvme,
        }[algorithm]
        return int(combine(crc1, crc2, length2))
    return pure_crc_combine(algorithm, crc1, crc2, length2)


# Other hashers ----------------------------------------------------------------


class _Hashlib:
    """An incremental hashlib digest."""

    def __init__(self, name: str) -> None:
        self._hash = hashlib.new(name)

    def update(self, data: bytes | memoryview) -> None:
        self._hash.update(data)

    def digest(self) -> bytes:
        return self._hash.digest()


class _XXHash:
    """An incremental awscrt xxhash digest."""

    def __init__(self, algorithm: str) -> None:
        assert _crt is not None
        factory = {
            "XXHASH64": _crt.XXHash.new_xxhash64,
            "XXHASH3": _crt.XXHash.new_xxhash3_64,
            "XXHASH128": _crt.XXHash.new_xxhash3_128,
        }[algorithm]
        self._hash = factory()
        self._digest: bytes | None = None

    def update(self, data: bytes | memoryview) -> None:
        self._hash.update(bytes(data))

    def digest(self) -> bytes:
        # finalize() may only be called once.
        if self._digest is None:
            self._digest = bytes(self._hash.finalize())
        return self._digest


def supported_algorithms() -> tuple[str, ...]:
    """
    @return: the algorithms this process can compute, in AWS order.
    """
    have_xxhash = _crt is not None and hasattr(_crt, "XXHash")
    return tuple(name for name in KNOWN_ALGORITHMS if have_xxhash or not name.startswith("XXHASH"))


def new_hasher(algorithm: str) -> Hasher:
    """
    Start an incremental checksum.

    @param algorithm: an upper-case name from L{supported_algorithms}.
    @return: the hasher.
    @raise InvalidRequest: for an algorithm this process cannot compute.
    """
    if algorithm not in supported_algorithms():
        raise _unsupported_algorithm()
    if algorithm in _CRC_PARAMS:
        return _Crc(algorithm)
    if algorithm.startswith("XXHASH"):
        return _XXHash(algorithm)
    return _Hashlib(algorithm.lower())


def checksum(algorithm: str, data: bytes | memoryview) -> str:
    """
    Compute a checksum in one go.

    @param algorithm: an upper-case algorithm name.
    @param data: the message.
    @return: the base64 value as S3 sends it.
    """
    hasher = new_hasher(algorithm)
    hasher.update(data)
    return b64(hasher.digest())


def b64(digest: bytes) -> str:
    """
    @param digest: a binary digest.
    @return: its standard base64 text.
    """
    return base64.b64encode(digest).decode("ascii")


def header_name(algorithm: str) -> str:
    """
    @param algorithm: an upper-case algorithm name.
    @return: the header carrying its value, e.g. C{x-amz-checksum-crc32}.
    """
    return _HEADER_PREFIX + algorithm.lower()


def _unsupported_algorithm() -> InvalidRequest:
    names = ", ".join(sorted(supported_algorithms()))
    return InvalidRequest(
        "Checksum algorithm provided is unsupported. Please try again with "
        f"any of the valid types: [{names}]"
    )


def decode_checksum_value(algorithm: str, value: str, where: str) -> bytes:
    """
    Validate a base64 checksum value.

    @param algorithm: the upper-case algorithm name.
    @param value: the base64 text as received.
    @param where: the header name, for the error message.
    @return: the binary digest.
    @raise InvalidRequest: if the value is not base64 or has the wrong length.
    """
    try:
        digest = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        digest = b""
    if len(digest) != _DIGEST_SIZES[algorithm]:
        raise InvalidRequest(f"Value for {where} header is invalid.")
    return digest


def parse_checksum_algorithm(value: str, where: str = "x-amz-checksum-algorithm") -> str:
    """
    Parse an algorithm name (C{x-amz-checksum-algorithm} on
    CreateMultipartUpload, C{x-amz-sdk-checksum-algorithm}).

    @param value: the header value, any case.
    @param where: the header name, for the error message.
    @return: the upper-case algorithm name.
    @raise InvalidRequest: for an unknown or unsupported algorithm.
    """
    name = value.strip().upper()
    if name not in KNOWN_ALGORITHMS:
        raise InvalidRequest(f"Value for {where} header is invalid.")
    if name not in supported_algorithms():
        raise _unsupported_algorithm()
    return name


def default_checksum_type(algorithm: str) -> str:
    """
    @param algorithm: the upper-case algorithm of a multipart upload.
    @return: the checksum type AWS uses when the client names none:
        C{FULL_OBJECT} for CRC64NVME, C{COMPOSITE} for the others.
    """
    return FULL_OBJECT if algorithm == "CRC64NVME" else COMPOSITE


def parse_checksum_type(value: str | None, algorithm: str) -> str:
    """
    Validate C{x-amz-checksum-type} against the upload's algorithm.

    @param value: the header value, or C{None} when absent.
    @param algorithm: the upper-case algorithm of the upload.
    @return: C{COMPOSITE} or C{FULL_OBJECT}.
    @raise InvalidRequest: for an unknown type or one the algorithm does not
        support (C{FULL_OBJECT} needs a CRC; CRC64NVME is C{FULL_OBJECT} only).
    """
    if value is None:
        return default_checksum_type(algorithm)
    kind = value.strip().upper()
    if kind not in (COMPOSITE, FULL_OBJECT):
        raise InvalidRequest("Value for x-amz-checksum-type header is invalid.")
    if kind == FULL_OBJECT and algorithm not in CRC_ALGORITHMS:
        raise InvalidRequest(
            f"The FULL_OBJECT checksum type cannot be used with the "
            f"{algorithm.lower()} checksum algorithm."
        )
    if kind == COMPOSITE and algorithm == "CRC64NVME":
        raise InvalidRequest(
            "The COMPOSITE checksum type cannot be used with the crc64nvme checksum algorithm."
        )
    return kind


@dataclass(frozen=True)
class ChecksumSpec:
    """
    The checksum a request declares for its body.

    @ivar algorithm: the upper-case algorithm name.
    @ivar value: the base64 value from the C{x-amz-checksum-*} header, or
        C{None} when it comes in the trailer.
    @ivar trailer: C{True} when the value comes in the aws-chunked trailer
        named by C{x-amz-trailer}.
    """

    algorithm: str
    value: str | None
    trailer: bool

    @property
    def header_name(self) -> str:
        """The header (or trailer) name, e.g. C{x-amz-checksum-crc32}."""
        return header_name(self.algorithm)


def checksum_from_headers(headers: Mapping[str, str]) -> ChecksumSpec | None:
    """
    Find the checksum a request declares, with the validation S3 applies.

    A request carries at most one of: an C{x-amz-checksum-<alg>} header, or
    an C{x-amz-trailer: x-amz-checksum-<alg>} announcing it at the end of an
    aws-chunked body. C{x-amz-sdk-checksum-algorithm}, when sent, must agree.

    @param headers: request headers with lower-case names (see
        L{anvil.s3.sigv4.header_map}).
    @return: the declared checksum, or C{None} when there is none.
    @raise InvalidRequest: for several checksums, a malformed value, an
        unknown or unsupported algorithm or trailer, or a disagreeing
        C{x-amz-sdk-checksum-algorithm}.
    """
    declared: list[ChecksumSpec] = []
    for algorithm in KNOWN_ALGORITHMS:
        name = header_name(algorithm)
        if name in headers:
            declared.append(ChecksumSpec(algorithm, headers[name], False))
    trailer = headers.get("x-amz-trailer", "").strip().lower()
    if trailer:
        algorithm = trailer[len(_HEADER_PREFIX) :].upper()
        if not trailer.startswith(_HEADER_PREFIX) or algorithm not in KNOWN_ALGORITHMS:
            raise InvalidRequest("The value specified in the x-amz-trailer header is not supported")
        declared.append(ChecksumSpec(algorithm, None, True))
    if len(declared) > 1:
        raise InvalidRequest(
            "Expecting a single x-amz-checksum- header. Multiple checksum Types are not allowed."
        )
    sdk = headers.get("x-amz-sdk-checksum-algorithm")
    if sdk is not None:
        sdk_algorithm = parse_checksum_algorithm(sdk, "x-amz-sdk-checksum-algorithm")
        if not declared:
            raise InvalidRequest(
                "x-amz-sdk-checksum-algorithm specified, but no corresponding "
                "x-amz-checksum-* or x-amz-trailer headers were found."
            )
        if declared[0].algorithm != sdk_algorithm:
            raise InvalidRequest("Value for x-amz-sdk-checksum-algorithm header is invalid.")
    if not declared:
        return None
    spec = declared[0]
    if spec.algorithm not in supported_algorithms():
        raise _unsupported_algorithm()
    if spec.value is not None:
        decode_checksum_value(spec.algorithm, spec.value, spec.header_name)
        spec = ChecksumSpec(spec.algorithm, spec.value.strip(), False)
    return spec


def _mismatch(algorithm: str) -> BadDigest:
    return BadDigest(f"The {algorithm} you specified did not match the calculated checksum.")


class ChecksumVerifier:
    """
    Compute a request's declared checksum over its (decoded) body and check
    it at the end.

    @ivar spec: what the request declared.
    """

    def __init__(self, spec: ChecksumSpec) -> None:
        """
        @param spec: from L{checksum_from_headers}.
        """
        self.spec = spec
        self._hasher = new_hasher(spec.algorithm)

    def update(self, data: bytes | memoryview) -> None:
        """
        Add the next piece of the decoded body.

        @param data: body bytes.
        """
        self._hasher.update(data)

    def finish(self, trailer_value: str | None = None) -> str:
        """
        Check the checksum.

        @param trailer_value: the value received in the trailer, for a
            trailer checksum.
        @return: the computed base64 value (to store and return on GET/HEAD).
        @raise BadDigest: if it does not match the declared value.
        @raise MalformedTrailerError: if a trailer checksum was announced but
            not received.
        @raise InvalidRequest: if the trailer value is malformed.
        """
        computed = self._hasher.digest()
        if self.spec.trailer:
            if trailer_value is None:
                raise MalformedTrailerError(
                    f"The {self.spec.header_name} trailer announced in x-amz-trailer was not sent."
                )
            expected = decode_checksum_value(
                self.spec.algorithm, trailer_value, self.spec.header_name
            )
        else:
            assert self.spec.value is not None
            expected = base64.b64decode(self.spec.value)
        if expected != computed:
            raise _mismatch(self.spec.algorithm)
        return b64(computed)


# Multipart --------------------------------------------------------------------


def composite_checksum(algorithm: str, part_values: Sequence[str]) -> str:
    """
    The C{COMPOSITE} checksum of a multipart object.

    @param algorithm: the upper-case algorithm of the upload.
    @param part_values: the base64 checksum of each part, in part order.
    @return: C{"<base64 of the checksum of the concatenated part digests>-N"}.
    """
    hasher = new_hasher(algorithm)
    for value in part_values:
        hasher.update(decode_checksum_value(algorithm, value, header_name(algorithm)))
    return f"{b64(hasher.digest())}-{len(part_values)}"


def full_object_checksum(algorithm: str, parts: Sequence[tuple[str, int]]) -> str:
    """
    The C{FULL_OBJECT} checksum of a multipart object, combined from the part
    CRCs without reading the data.

    @param algorithm: C{"CRC32"}, C{"CRC32C"} or C{"CRC64NVME"}.
    @param parts: C{(base64 part CRC, part length)} in part order.
    @return: the base64 CRC of the whole object.
    @raise InvalidRequest: for a non-CRC algorithm.
    """
    if algorithm not in CRC_ALGORITHMS:
        raise InvalidRequest(
            f"The FULL_OBJECT checksum type cannot be used with the "
            f"{algorithm.lower()} checksum algorithm."
        )
    crc = 0
    for value, length in parts:
        part = int.from_bytes(
            decode_checksum_value(algorithm, value, header_name(algorithm)), "big"
        )
        crc = crc_combine(algorithm, crc, part, length)
    return b64(crc.to_bytes(_DIGEST_SIZES[algorithm], "big"))


# Content-MD5 ------------------------------------------------------------------


def parse_content_md5(value: str) -> bytes:
    """
    Validate a C{Content-MD5} header.

    @param value: the header value.
    @return: the 16-byte digest.
    @raise InvalidDigest: if it is not the base64 of 16 bytes.
    """
    try:
        digest = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidDigest() from None
    if len(digest) != 16:
        raise InvalidDigest()
    return digest


class ContentMd5:
    """
    The MD5 of a body: the ETag of a simple object, checked against
    C{Content-MD5} when the request sent one.
    """

    def __init__(self, content_md5: str | None = None) -> None:
        """
        @param content_md5: the C{Content-MD5} header, if any.
        @raise InvalidDigest: if it is malformed (checked at once, before the
            body is read).
        """
        self._expected = parse_content_md5(content_md5) if content_md5 is not None else None
        self._hash = hashlib.md5()

    def update(self, data: bytes | memoryview) -> None:
        """
        Add the next piece of the body.

        @param data: body bytes.
        """
        self._hash.update(data)

    def finish(self) -> bytes:
        """
        Check the digest.

        @return: the 16-byte MD5 (its hex form is the ETag).
        @raise BadDigest: if it differs from C{Content-MD5}.
        """
        digest = self._hash.digest()
        if self._expected is not None and digest != self._expected:
            raise BadDigest()
        return digest
