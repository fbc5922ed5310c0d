# -*- test-case-name: tests.test_checksums -*-
"""
Tests for L{anvil.s3.checksums}: known vectors, agreement with botocore,
incremental use, header parsing, multipart combination and Content-MD5.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zlib

from botocore import httpchecksum
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from anvil.s3 import checksums
from anvil.s3.checksums import (
    COMPOSITE,
    FULL_OBJECT,
    ChecksumSpec,
    ChecksumVerifier,
    ContentMd5,
    checksum,
    checksum_from_headers,
    composite_checksum,
    crc_combine,
    full_object_checksum,
    new_hasher,
    parse_checksum_algorithm,
    parse_checksum_type,
    parse_content_md5,
    pure_crc,
    pure_crc_combine,
    supported_algorithms,
)
from anvil.s3.errors import BadDigest, InvalidDigest, InvalidRequest, MalformedTrailerError

_settings = settings(max_examples=100, deadline=None)

# The CRC "check" values: the CRC of the ASCII string "123456789".
_CHECK = {
    "CRC32": 0xCBF43926,
    "CRC32C": 0xE3069283,
    "CRC64NVME": 0xAE8B14860A799888,
}


def _b64(value: int, size: int) -> str:
    return base64.b64encode(value.to_bytes(size, "big")).decode()


class KnownVectorTests(SynchronousTestCase):
    """
    The algorithms give the published check values.
    """

    def test_crc_check_values(self) -> None:
        """CRC32, CRC32C and CRC64NVME of "123456789" are the catalogue values."""
        for algorithm, value in _CHECK.items():
            size = 8 if algorithm == "CRC64NVME" else 4
            self.assertEqual(checksum(algorithm, b"123456789"), _b64(value, size), algorithm)
            self.assertEqual(pure_crc(algorithm, b"123456789"), value, algorithm)

    def test_empty(self) -> None:
        """The CRCs of nothing are zero, as S3 reports for empty objects."""
        self.assertEqual(checksum("CRC32", b""), "AAAAAA==")
        self.assertEqual(checksum("CRC32C", b""), "AAAAAA==")
        self.assertEqual(checksum("CRC64NVME", b""), "AAAAAAAAAAA=")

    def test_hashes(self) -> None:
        """The SHA and MD5 checksums are the base64 of the hashlib digests."""
        for algorithm in ("SHA1", "SHA256", "SHA512", "MD5"):
            expected = base64.b64encode(hashlib.new(algorithm.lower(), b"abc").digest()).decode()
            self.assertEqual(checksum(algorithm, b"abc"), expected)

    def test_crc32_doc_value(self) -> None:
        """The CRC32 of "abc" in the trailer form botocore sends."""
        self.assertEqual(checksum("CRC32", b"abc"), "NSRBwg==")


class BotocoreAgreementTests(SynchronousTestCase):
    """
    Every algorithm agrees with botocore's own implementation on random data.
    """

    def test_agreement(self) -> None:
        """Anvil and botocore compute the same base64 value for each algorithm."""
        data = os.urandom(100_003)
        for algorithm in supported_algorithms():
            botocore_class = httpchecksum._CHECKSUM_CLS.get(algorithm.lower())
            if botocore_class is None:  # MD5 is not a botocore flexible checksum
                continue
            theirs = botocore_class()
            theirs.update(data)
            self.assertEqual(checksum(algorithm, data), theirs.b64digest(), algorithm)


class IncrementalTests(SynchronousTestCase):
    """
    Hashers may be fed in any pieces.
    """

    @_settings
    @given(
        data=st.binary(max_size=2000),
        cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
        algorithm=st.sampled_from(supported_algorithms()),
    )
    def test_any_split(self, data: bytes, cuts: list[int], algorithm: str) -> None:
        """Feeding the data in any pieces gives the one-shot digest."""
        hasher = new_hasher(algorithm)
        previous = 0
        for cut in sorted(min(cut, len(data)) for cut in cuts) + [len(data)]:
            hasher.update(memoryview(data)[previous:cut])
            previous = cut
        self.assertEqual(base64.b64encode(hasher.digest()).decode(), checksum(algorithm, data))

    @_settings
    @given(data=st.binary(max_size=600), algorithm=st.sampled_from(sorted(_CHECK)))
    def test_pure_matches_accelerated(self, data: bytes, algorithm: str) -> None:
        """The pure-Python CRCs agree with the accelerated ones."""
        size = 8 if algorithm == "CRC64NVME" else 4
        self.assertEqual(_b64(pure_crc(algorithm, data), size), checksum(algorithm, data))

    def test_without_crt(self) -> None:
        """Without awscrt, CRC32C and CRC64NVME still work and xxhash is unsupported."""
        self.patch(checksums, "_crt", None)
        self.assertNotIn("XXHASH64", supported_algorithms())
        self.assertIn("CRC64NVME", supported_algorithms())
        self.assertEqual(checksum("CRC32C", b"123456789"), _b64(0xE3069283, 4))
        self.assertEqual(checksum("CRC64NVME", b"123456789"), _b64(0xAE8B14860A799888, 8))
        self.assertEqual(
            crc_combine("CRC32C", pure_crc("CRC32C", b"1234"), pure_crc("CRC32C", b"56789"), 5),
            0xE3069283,
        )
        self.assertRaises(InvalidRequest, new_hasher, "XXHASH64")


class CombineTests(SynchronousTestCase):
    """
    CRCs of concatenations can be combined from the parts.
    """

    @_settings
    @given(
        first=st.binary(max_size=300),
        second=st.binary(max_size=300),
        algorithm=st.sampled_from(sorted(_CHECK)),
    )
    def test_combine(self, first: bytes, second: bytes, algorithm: str) -> None:
        """combine(crc(a), crc(b), len(b)) == crc(a + b), accelerated and pure."""
        a, b = pure_crc(algorithm, first), pure_crc(algorithm, second)
        whole = pure_crc(algorithm, first + second)
        self.assertEqual(crc_combine(algorithm, a, b, len(second)), whole)
        self.assertEqual(pure_crc_combine(algorithm, a, b, len(second)), whole)

    def test_large_length(self) -> None:
        """Combining across a multi-gigabyte part agrees with zlib's crc32_combine idea."""
        # crc(a + zeros(n)) can be checked without materialising n zeros by
        # combining with crc(zeros(n)) computed in 1 MiB steps.
        zeros = bytes(1 << 20)
        crc_zeros = 0
        for _ in range(8):
            crc_zeros = zlib.crc32(zeros, crc_zeros)
        head = zlib.crc32(b"head")
        expected = zlib.crc32(zeros * 8, head)
        self.assertEqual(crc_combine("CRC32", head, crc_zeros, 8 << 20), expected)
        self.assertEqual(pure_crc_combine("CRC32", head, crc_zeros, 8 << 20), expected)

    def test_full_object(self) -> None:
        """The FULL_OBJECT checksum equals the CRC of the concatenated parts."""
        parts = [os.urandom(n) for n in (1000, 1, 0, 4096)]
        for algorithm in sorted(_CHECK):
            values = [(checksum(algorithm, part), len(part)) for part in parts]
            self.assertEqual(
                full_object_checksum(algorithm, values), checksum(algorithm, b"".join(parts))
            )

    def test_full_object_needs_crc(self) -> None:
        """FULL_OBJECT is refused for SHA algorithms."""
        self.assertRaises(
            InvalidRequest, full_object_checksum, "SHA256", [(checksum("SHA256", b"x"), 1)]
        )

    def test_composite(self) -> None:
        """COMPOSITE is the checksum of the concatenated binary part checksums, then -N."""
        parts = [b"part one", b"part two", b"3"]
        for algorithm in ("SHA256", "CRC32", "SHA1", "CRC32C"):
            digests = [base64.b64decode(checksum(algorithm, part)) for part in parts]
            expected = checksum(algorithm, b"".join(digests)) + "-3"
            self.assertEqual(
                composite_checksum(algorithm, [checksum(algorithm, p) for p in parts]), expected
            )

    def test_checksum_types(self) -> None:
        """Checksum types follow the AWS rules per algorithm."""
        self.assertEqual(parse_checksum_type(None, "CRC32"), COMPOSITE)
        self.assertEqual(parse_checksum_type(None, "CRC64NVME"), FULL_OBJECT)
        self.assertEqual(parse_checksum_type("full_object", "CRC32C"), FULL_OBJECT)
        self.assertEqual(parse_checksum_type("COMPOSITE", "SHA256"), COMPOSITE)
        self.assertRaises(InvalidRequest, parse_checksum_type, "FULL_OBJECT", "SHA1")
        self.assertRaises(InvalidRequest, parse_checksum_type, "COMPOSITE", "CRC64NVME")
        self.assertRaises(InvalidRequest, parse_checksum_type, "OTHER", "CRC32")

    def test_algorithm_names(self) -> None:
        """Algorithm names are case-insensitive; unknown names are refused."""
        self.assertEqual(parse_checksum_algorithm("crc32c"), "CRC32C")
        self.assertRaises(InvalidRequest, parse_checksum_algorithm, "CRC16")


class HeaderTests(SynchronousTestCase):
    """
    L{checksum_from_headers} finds and validates the declared checksum.
    """

    def test_none(self) -> None:
        """Without checksum headers there is no checksum."""
        self.assertIsNone(checksum_from_headers({"content-type": "text/plain"}))

    def test_header(self) -> None:
        """An x-amz-checksum-* header declares the algorithm and value."""
        spec = checksum_from_headers({"x-amz-checksum-crc32": "NSRBwg=="})
        self.assertEqual(spec, ChecksumSpec("CRC32", "NSRBwg==", False))
        self.assertEqual(spec.header_name if spec else None, "x-amz-checksum-crc32")

    def test_related_headers_ignored(self) -> None:
        """x-amz-checksum-type, -algorithm and -mode are not checksum values."""
        headers = {
            "x-amz-checksum-type": "FULL_OBJECT",
            "x-amz-checksum-algorithm": "CRC32",
            "x-amz-checksum-mode": "ENABLED",
        }
        self.assertIsNone(checksum_from_headers(headers))

    def test_trailer(self) -> None:
        """x-amz-trailer announces a trailing checksum."""
        spec = checksum_from_headers(
            {
                "x-amz-trailer": "x-amz-checksum-crc64nvme",
                "x-amz-sdk-checksum-algorithm": "CRC64NVME",
            }
        )
        self.assertEqual(spec, ChecksumSpec("CRC64NVME", None, True))

    def test_bad_values(self) -> None:
        """Values that are not base64 of the right length are InvalidRequest."""
        for value in ("NSRBwg", "!!!!!!!!", "NSRBwgAA", "", "AAAAAAAAAAA="):
            error = self.assertRaises(
                InvalidRequest, checksum_from_headers, {"x-amz-checksum-crc32": value}
            )
            self.assertEqual(error.message, "Value for x-amz-checksum-crc32 header is invalid.")

    def test_multiple(self) -> None:
        """Two checksums, or a header and a trailer, are refused."""
        for headers in (
            {"x-amz-checksum-crc32": "NSRBwg==", "x-amz-checksum-crc32c": "AAAAAA=="},
            {"x-amz-checksum-crc32": "NSRBwg==", "x-amz-trailer": "x-amz-checksum-sha1"},
        ):
            error = self.assertRaises(InvalidRequest, checksum_from_headers, headers)
            self.assertIn("Multiple checksum Types are not allowed", error.message)

    def test_unknown_trailer(self) -> None:
        """A trailer other than an x-amz-checksum-* is refused."""
        for trailer in ("x-amz-meta-foo", "x-amz-checksum-crc16"):
            self.assertRaises(InvalidRequest, checksum_from_headers, {"x-amz-trailer": trailer})

    def test_sdk_algorithm(self) -> None:
        """x-amz-sdk-checksum-algorithm must name a known, matching, present checksum."""
        self.assertRaises(
            InvalidRequest,
            checksum_from_headers,
            {"x-amz-sdk-checksum-algorithm": "CRC32"},
        )
        self.assertRaises(
            InvalidRequest,
            checksum_from_headers,
            {"x-amz-sdk-checksum-algorithm": "SHA256", "x-amz-checksum-crc32": "NSRBwg=="},
        )
        self.assertRaises(
            InvalidRequest,
            checksum_from_headers,
            {"x-amz-sdk-checksum-algorithm": "BOGUS", "x-amz-checksum-crc32": "NSRBwg=="},
        )
        spec = checksum_from_headers(
            {"x-amz-sdk-checksum-algorithm": "crc32", "x-amz-checksum-crc32": "NSRBwg=="}
        )
        self.assertEqual(spec, ChecksumSpec("CRC32", "NSRBwg==", False))


class VerifierTests(SynchronousTestCase):
    """
    L{ChecksumVerifier} checks the body against the declared value.
    """

    def test_header_match(self) -> None:
        """A matching header value verifies and the computed value is returned."""
        verifier = ChecksumVerifier(ChecksumSpec("CRC32", "NSRBwg==", False))
        verifier.update(b"ab")
        verifier.update(b"c")
        self.assertEqual(verifier.finish(), "NSRBwg==")

    def test_header_mismatch(self) -> None:
        """A different body is BadDigest naming the algorithm."""
        verifier = ChecksumVerifier(ChecksumSpec("SHA256", checksum("SHA256", b"x"), False))
        verifier.update(b"y")
        error = self.assertRaises(BadDigest, verifier.finish)
        self.assertEqual(
            error.message, "The SHA256 you specified did not match the calculated checksum."
        )

    def test_trailer(self) -> None:
        """A trailer value is checked: missing, malformed and wrong values are refused."""
        spec = ChecksumSpec("CRC32C", None, True)
        right = checksum("CRC32C", b"data")
        cases = [
            (None, MalformedTrailerError),
            ("bogus", InvalidRequest),
            (checksum("CRC32C", b"other"), BadDigest),
        ]
        for value, error in cases:
            verifier = ChecksumVerifier(spec)
            verifier.update(b"data")
            self.assertRaises(error, verifier.finish, value)
        verifier = ChecksumVerifier(spec)
        verifier.update(b"data")
        self.assertEqual(verifier.finish(right), right)


class ContentMd5Tests(SynchronousTestCase):
    """
    Content-MD5 parsing and checking.
    """

    def test_match(self) -> None:
        """A matching Content-MD5 verifies and the digest (the ETag) is returned."""
        digest = hashlib.md5(b"hello").digest()
        md5 = ContentMd5(base64.b64encode(digest).decode())
        md5.update(b"hel")
        md5.update(b"lo")
        self.assertEqual(md5.finish(), digest)

    def test_absent(self) -> None:
        """Without Content-MD5 the digest is still computed for the ETag."""
        md5 = ContentMd5()
        md5.update(b"x")
        self.assertEqual(md5.finish().hex(), hashlib.md5(b"x").hexdigest())

    def test_mismatch(self) -> None:
        """A different body is BadDigest."""
        md5 = ContentMd5(base64.b64encode(hashlib.md5(b"a").digest()).decode())
        md5.update(b"b")
        error = self.assertRaises(BadDigest, md5.finish)
        self.assertEqual(error.status, 400)

    def test_malformed(self) -> None:
        """Values that are not the base64 of 16 bytes are InvalidDigest, at once."""
        for value in (
            "",
            "abc",
            "not base64!",
            base64.b64encode(b"x" * 15).decode(),
            hashlib.md5(b"a").hexdigest(),
        ):
            self.assertRaises(InvalidDigest, ContentMd5, value)
            self.assertRaises(InvalidDigest, parse_content_md5, value)
