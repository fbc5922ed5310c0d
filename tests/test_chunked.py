# -*- test-case-name: tests.test_chunked -*-
"""
Tests for L{anvil.s3.chunked}: the AWS worked examples, bodies produced by
botocore, arbitrary splits and single-byte corruption (hypothesis), framing
errors, trailers and the streaming behaviour.
"""

from __future__ import annotations

import hashlib
import io
import zlib

import botocore.auth
import botocore.crt.auth
from botocore import httpchecksum
from botocore.httpchecksum import AwsChunkedWrapper
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from anvil.s3 import sigv4
from anvil.s3.checksums import ChecksumSpec, ChecksumVerifier, checksum, checksum_from_headers
from anvil.s3.chunked import (
    MAX_CHUNK_HEADER,
    AwsChunkedDecoder,
    stored_content_encoding,
)
from anvil.s3.errors import (
    BadDigest,
    IncompleteBody,
    InvalidChunkSizeError,
    InvalidRequest,
    MalformedTrailerError,
    S3Error,
    SignatureDoesNotMatch,
)
from anvil.s3.sigv4 import ChunkSigner, PayloadMode, header_map, parse_request_auth, verify
from tests.test_sigv4 import (
    DOC_SECRET,
    DOC_TIME,
    NOW,
    SECRET,
    _boto3_put,
    _botocore_time,
    _doc_auth,
    _wire,
)

_KEY = hashlib.sha256(b"test signing key").digest()
_DATE = "20260301T123456Z"
_SCOPE = "20260301/us-east-1/s3/aws4_request"
_SEED = "f" * 64

_MODES = {
    "signed": PayloadMode.STREAMING_SIGNED,
    "signed-trailer": PayloadMode.STREAMING_SIGNED_TRAILER,
    "unsigned-trailer": PayloadMode.STREAMING_UNSIGNED_TRAILER,
}

_settings = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _signer() -> ChunkSigner:
    return ChunkSigner(_KEY, _DATE, _SCOPE, _SEED)


def encode(payload: bytes, chunk_size: int, mode: PayloadMode, algorithm: str = "CRC32") -> bytes:
    """
    Frame C{payload} as an aws-chunked body, as an SDK does.

    Trailer modes end with an C{x-amz-checksum-<algorithm>} trailer.
    """
    signer = _signer() if mode.signed_chunks else None
    out = bytearray()
    chunks = [payload[i : i + chunk_size] for i in range(0, len(payload), chunk_size)]
    for chunk in chunks + [b""]:
        if signer is not None:
            signature = signer.sign_chunk(hashlib.sha256(chunk).hexdigest())
            out += b"%x;chunk-signature=%s\r\n" % (len(chunk), signature.encode())
        else:
            out += b"%x\r\n" % len(chunk)
        if chunk:
            out += chunk + b"\r\n"
    if mode.has_trailer:
        line = f"x-amz-checksum-{algorithm.lower()}:{checksum(algorithm, payload)}"
        out += line.encode() + b"\r\n"
        if signer is not None:
            signature = signer.sign_trailer((line + "\n").encode())
            out += f"x-amz-trailer-signature:{signature}\r\n".encode()
    out += b"\r\n"
    return bytes(out)


def decoder(
    mode: PayloadMode, length: int | None, algorithm: str = "CRC32", **kwargs: object
) -> AwsChunkedDecoder:
    """A decoder for bodies made by L{encode}."""
    verifier = ChecksumVerifier(ChecksumSpec(algorithm, None, True)) if mode.has_trailer else None
    signer = _signer() if mode.signed_chunks else None
    return AwsChunkedDecoder(
        mode,
        signer=signer,
        expected_length=length,
        checksum=verifier,
        **kwargs,  # type: ignore[arg-type]
    )


def decode(body: bytes, decoder: AwsChunkedDecoder, pieces: list[int] | None = None) -> bytes:
    """Feed C{body} cut at C{pieces} (offsets), finish, return the data."""
    out = []
    cuts = sorted(set(pieces or [])) + [len(body)]
    previous = 0
    for cut in cuts:
        if cut > previous:
            out.extend(decoder.feed(body[previous:cut]))
            previous = cut
    decoder.finish()
    return b"".join(out)


class DocumentationExampleTests(SynchronousTestCase):
    """
    The chunked-upload examples of the AWS documentation decode.
    """

    def body(self, trailer: bool) -> bytes:
        signatures = (
            [
                "b474d8862b1487a5145d686f57f013e54db672cee1c953b3010fb58501ef5aa2",
                "1c1344b170168f8e65b41376b44b20fe354e373826ccbbe2c1d40a8cae51e5c7",
                "2ca2aba2005185cf7159c6277faf83795951dd77a3a99e6e65d5c9f85863f992",
            ]
            if trailer
            else [
                "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648",
                "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497",
                "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9",
            ]
        )
        body = (
            b"10000;chunk-signature="
            + signatures[0].encode()
            + b"\r\n"
            + b"a" * 65536
            + b"\r\n400;chunk-signature="
            + signatures[1].encode()
            + b"\r\n"
            + b"a" * 1024
            + b"\r\n0;chunk-signature="
            + signatures[2].encode()
            + b"\r\n"
        )
        if trailer:
            body += (
                b"x-amz-checksum-crc32c:sOO8/Q==\r\n"
                b"x-amz-trailer-signature:"
                b"d81f82fc3505edab99d459891051a732e8730629a2e4a59689829ca17fe2e435\r\n"
            )
        return body + b"\r\n"

    def decoder(self, trailer: bool) -> AwsChunkedDecoder:
        headers = {
            "Host": "s3.amazonaws.com",
            "x-amz-date": "20130524T000000Z",
            "x-amz-storage-class": "REDUCED_REDUNDANCY",
            "Content-Encoding": "aws-chunked",
            "x-amz-decoded-content-length": "66560",
        }
        if trailer:
            headers.update(
                {
                    "x-amz-content-sha256": sigv4.STREAMING_SIGNED_TRAILER,
                    "x-amz-trailer": "x-amz-checksum-crc32c",
                    "Authorization": _doc_auth(
                        "106e2a8a18243abcf37539882f36619c00e2dfc72633413f02d3b74544bfeb8e",
                        "content-encoding;host;x-amz-content-sha256;x-amz-date;"
                        "x-amz-decoded-content-length;x-amz-storage-class;x-amz-trailer",
                    ),
                }
            )
        else:
            headers.update(
                {
                    "x-amz-content-sha256": sigv4.STREAMING_SIGNED,
                    "Content-Length": "66824",
                    "Authorization": _doc_auth(
                        "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9",
                        "content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;"
                        "x-amz-decoded-content-length;x-amz-storage-class",
                    ),
                }
            )
        mapped = header_map(headers)
        auth = parse_request_auth("PUT", b"/examplebucket/chunkObject.txt", b"", mapped)
        assert auth is not None
        spec = checksum_from_headers(mapped)
        verifier = ChecksumVerifier(spec) if spec is not None else None
        return AwsChunkedDecoder.for_request(verify(auth, DOC_SECRET, DOC_TIME), verifier)

    def test_signed(self) -> None:
        """The 64 KiB + 1 KiB example decodes in pieces of any size."""
        body = self.body(trailer=False)
        self.assertEqual(len(body), 66824)
        for step in (1, 3, 100, 8192, 70000):
            d = self.decoder(trailer=False)
            self.assertEqual(decode(body, d, list(range(0, len(body), step))), b"a" * 66560)
            self.assertEqual(d.verified_length, 66560)

    def test_signed_trailer(self) -> None:
        """The example with a CRC32C trailer decodes and its checksum is kept."""
        d = self.decoder(trailer=True)
        self.assertEqual(decode(self.body(trailer=True), d, [5, 70000]), b"a" * 66560)
        self.assertEqual(d.trailers, {"x-amz-checksum-crc32c": "sOO8/Q=="})
        self.assertEqual(d.checksum_value, "sOO8/Q==")

    def test_bad_signatures(self) -> None:
        """Replacing any one of the documented signatures is SignatureDoesNotMatch."""
        for trailer in (False, True):
            body = self.body(trailer)
            start = 0
            while True:
                index = body.find(b"signature", start)
                if index < 0:
                    break
                at = body.index(b"=" if body[index - 6 : index] == b"chunk-" else b":", index) + 1
                forged = body[:at] + (b"0" if body[at : at + 1] != b"0" else b"1") + body[at + 1 :]
                with self.assertRaises(SignatureDoesNotMatch):
                    decode(forged, self.decoder(trailer))
                start = index + 1


class BotocoreBodyTests(SynchronousTestCase):
    """
    Bodies framed by botocore's own aws-chunked writer decode.
    """

    def test_every_algorithm(self) -> None:
        """botocore's AwsChunkedWrapper bodies decode for every checksum it supports."""
        payload = bytes(range(256)) * 40
        for name, cls in httpchecksum._CHECKSUM_CLS.items():
            if name.upper() not in (
                "CRC32",
                "CRC32C",
                "CRC64NVME",
                "SHA1",
                "SHA256",
                "SHA512",
                "XXHASH64",
                "XXHASH3",
                "XXHASH128",
            ):
                continue
            header = f"x-amz-checksum-{name}"
            wrapper = AwsChunkedWrapper(
                io.BytesIO(payload), checksum_cls=cls, checksum_name=header, chunk_size=1000
            )
            body = wrapper.read()
            headers = {"x-amz-trailer": header, "x-amz-sdk-checksum-algorithm": name.upper()}
            spec = checksum_from_headers(headers)
            assert spec is not None
            d = AwsChunkedDecoder(
                PayloadMode.STREAMING_UNSIGNED_TRAILER,
                expected_length=len(payload),
                checksum=ChecksumVerifier(spec),
            )
            with self.subTest(algorithm=name):
                self.assertEqual(decode(body, d, [1, 999, 1005, 4000]), payload)
                self.assertEqual(d.checksum_value, checksum(name.upper(), payload))

    def test_boto3_put_object(self) -> None:
        """The body of a real boto3 PutObject request decodes and verifies."""
        self.patch(botocore.auth, "get_current_datetime", _botocore_time)
        self.patch(botocore.crt.auth, "get_current_datetime", _botocore_time)
        payload = b"0123456789" * 30000
        request = _boto3_put(self, payload, "k")
        _, path, query, headers = _wire(request)
        auth = parse_request_auth("PUT", path, query, headers)
        assert auth is not None
        verified = verify(auth, SECRET, NOW)
        spec = checksum_from_headers(headers)
        assert spec is not None
        body = request.body.read()
        d = AwsChunkedDecoder.for_request(verified, ChecksumVerifier(spec))
        self.assertEqual(decode(body, d, list(range(0, len(body), 65536))), payload)
        self.assertEqual(d.checksum_value, checksum("CRC32", payload))
        self.assertEqual(stored_content_encoding(headers.get("content-encoding")), None)
        corrupt = bytearray(body)
        corrupt[len(body) // 2] ^= 1
        d = AwsChunkedDecoder.for_request(verified, ChecksumVerifier(spec))
        self.assertRaises(BadDigest, decode, bytes(corrupt), d)


class PropertyTests(SynchronousTestCase):
    """
    Properties of the decoder over generated bodies.
    """

    @_settings
    @given(
        payload=st.binary(max_size=3000),
        chunk_size=st.integers(min_value=1, max_value=1200),
        mode=st.sampled_from(sorted(_MODES)),
        algorithm=st.sampled_from(["CRC32", "CRC32C", "CRC64NVME", "SHA256"]),
        data=st.data(),
    )
    def test_any_split(
        self, payload: bytes, chunk_size: int, mode: str, algorithm: str, data: st.DataObject
    ) -> None:
        """Any split of a valid body into feed() pieces decodes to the same bytes."""
        body = encode(payload, chunk_size, _MODES[mode], algorithm)
        cuts = data.draw(st.lists(st.integers(min_value=0, max_value=len(body)), max_size=12))
        d = decoder(_MODES[mode], len(payload), algorithm)
        self.assertEqual(decode(body, d, cuts), payload)
        self.assertEqual(d.decoded_length, len(payload))
        self.assertEqual(d.verified_length, len(payload))
        if _MODES[mode].has_trailer:
            self.assertEqual(d.checksum_value, checksum(algorithm, payload))

    @_settings
    @given(
        payload=st.binary(min_size=1, max_size=1500),
        chunk_size=st.integers(min_value=1, max_value=600),
        mode=st.sampled_from(sorted(_MODES)),
        data=st.data(),
    )
    def test_flipped_byte(
        self, payload: bytes, chunk_size: int, mode: str, data: st.DataObject
    ) -> None:
        """
        Any single changed byte is rejected, unless it only changes the case
        of a letter in a case-insensitive place (a hex digit or a trailer
        name), in which case the decoded data and checksum are unchanged.
        """
        body = encode(payload, chunk_size, _MODES[mode])
        index = data.draw(st.integers(min_value=0, max_value=len(body) - 1))
        mask = data.draw(st.integers(min_value=1, max_value=255))
        corrupt = bytearray(body)
        corrupt[index] ^= mask
        d = decoder(_MODES[mode], len(payload))
        try:
            out = decode(bytes(corrupt), d)
        except S3Error:
            return
        self.assertEqual(mask, 0x20, (index, body[index : index + 1]))
        self.assertTrue(chr(body[index]).isalpha())
        self.assertEqual(out, payload)
        if _MODES[mode].has_trailer:
            self.assertEqual(d.checksum_value, checksum("CRC32", payload))

    @_settings
    @given(
        payload=st.binary(max_size=800),
        chunk_size=st.integers(min_value=1, max_value=300),
        mode=st.sampled_from(sorted(_MODES)),
        data=st.data(),
    )
    def test_truncated(
        self, payload: bytes, chunk_size: int, mode: str, data: st.DataObject
    ) -> None:
        """A body cut anywhere before its final line is rejected."""
        body = encode(payload, chunk_size, _MODES[mode])
        cut = data.draw(st.integers(min_value=0, max_value=len(body) - 3))
        self.assertRaises(S3Error, decode, body[:cut], decoder(_MODES[mode], len(payload)))
        # Without the declared length, truncation is still detected.
        self.assertRaises(S3Error, decode, body[:cut], decoder(_MODES[mode], None))


class FramingErrorTests(SynchronousTestCase):
    """
    Malformed framing gets a clear S3 error.
    """

    def feed_all(
        self,
        body: bytes,
        mode: PayloadMode = PayloadMode.STREAMING_UNSIGNED_TRAILER,
        length: int | None = None,
    ) -> None:
        d = AwsChunkedDecoder(
            mode, signer=_signer() if mode.signed_chunks else None, expected_length=length
        )
        d.feed(body)
        d.finish()

    def test_bad_sizes(self) -> None:
        """Chunk sizes that are not 1-16 hex digits are InvalidRequest."""
        for header in (
            b"zz\r\n",
            b"-1\r\n",
            b"\r\n",
            b"1 \r\n",
            b" 1\r\n",
            b"0x1\r\n",
            b"1" * 17 + b"\r\n",
        ):
            self.assertRaises(InvalidRequest, self.feed_all, header + b"a\r\n0\r\n\r\n")

    def test_header_line_endings(self) -> None:
        """A chunk header must end with CRLF."""
        self.assertRaises(InvalidRequest, self.feed_all, b"1\na\r\n0\r\n\r\n")

    def test_missing_data_crlf(self) -> None:
        """Chunk data must be followed by CRLF."""
        self.assertRaises(InvalidRequest, self.feed_all, b"3\r\nabcXY0\r\n\r\n")
        self.assertRaises(InvalidRequest, self.feed_all, b"3\r\nabc\n0\r\n\r\n")

    def test_oversized_header(self) -> None:
        """A chunk header longer than the limit is refused without buffering the rest."""
        d = AwsChunkedDecoder(PayloadMode.STREAMING_UNSIGNED_TRAILER)
        self.assertRaises(InvalidRequest, d.feed, b"1" * (10 * MAX_CHUNK_HEADER))
        d = AwsChunkedDecoder(PayloadMode.STREAMING_UNSIGNED_TRAILER)
        d.feed(b"0" * (MAX_CHUNK_HEADER // 2))
        self.assertRaises(InvalidRequest, d.feed, b"0" * MAX_CHUNK_HEADER)

    def test_missing_signature(self) -> None:
        """Signed chunks without a well-formed chunk-signature are SignatureDoesNotMatch."""
        for header in (b"1\r\n", b"1;chunk-signature=abc\r\n", b"1;other=" + b"0" * 64 + b"\r\n"):
            self.assertRaises(
                SignatureDoesNotMatch,
                self.feed_all,
                header + b"a\r\n",
                PayloadMode.STREAMING_SIGNED,
            )

    def test_decoded_length(self) -> None:
        """The decoded length must equal x-amz-decoded-content-length."""
        body = encode(b"hello", 2, PayloadMode.STREAMING_SIGNED)
        for length in (4, 6, 0):
            d = decoder(PayloadMode.STREAMING_SIGNED, length)
            self.assertRaises(IncompleteBody, decode, body, d)

    def test_data_after_end(self) -> None:
        """Bytes after the end of the body are refused."""
        body = encode(b"hello", 2, PayloadMode.STREAMING_UNSIGNED_TRAILER)
        self.assertRaises(
            InvalidRequest, decode, body + b"x", decoder(PayloadMode.STREAMING_UNSIGNED_TRAILER, 5)
        )

    def test_sticky_failure(self) -> None:
        """After an error, every call raises the same error."""
        d = AwsChunkedDecoder(PayloadMode.STREAMING_UNSIGNED_TRAILER)
        error = self.assertRaises(InvalidRequest, d.feed, b"zz\r\n")
        self.assertIs(self.assertRaises(InvalidRequest, d.feed, b"1\r\n"), error)
        self.assertIs(self.assertRaises(InvalidRequest, d.finish), error)

    def test_min_chunk_size(self) -> None:
        """With a minimum chunk size, only the last data chunk may be smaller."""
        body = encode(b"x" * 20, 8, PayloadMode.STREAMING_SIGNED)
        self.assertEqual(
            decode(body, decoder(PayloadMode.STREAMING_SIGNED, 20, min_chunk_size=8)), b"x" * 20
        )
        error = self.assertRaises(
            InvalidChunkSizeError,
            decode,
            body,
            decoder(PayloadMode.STREAMING_SIGNED, 20, min_chunk_size=9),
        )
        self.assertEqual(error.extra["BadChunkSize"], "8")

    def test_mode_checks(self) -> None:
        """A trailer checksum needs a trailer mode; non-chunked modes are not decoders."""
        self.assertRaises(
            InvalidRequest,
            AwsChunkedDecoder,
            PayloadMode.STREAMING_SIGNED,
            signer=_signer(),
            checksum=ChecksumVerifier(ChecksumSpec("CRC32", None, True)),
        )
        self.assertRaises(ValueError, AwsChunkedDecoder, PayloadMode.UNSIGNED)
        self.assertRaises(ValueError, AwsChunkedDecoder, PayloadMode.STREAMING_SIGNED)


class TrailerTests(SynchronousTestCase):
    """
    Trailers: announced, unexpected, signed.
    """

    def test_unsigned_mismatch(self) -> None:
        """A wrong trailing checksum is BadDigest."""
        body = encode(b"hello", 10, PayloadMode.STREAMING_UNSIGNED_TRAILER).replace(
            checksum("CRC32", b"hello").encode(), checksum("CRC32", b"hellO").encode()
        )
        error = self.assertRaises(
            BadDigest, decode, body, decoder(PayloadMode.STREAMING_UNSIGNED_TRAILER, 5)
        )
        self.assertIn("CRC32", error.message)

    def test_missing_trailer(self) -> None:
        """An announced trailer that never comes is MalformedTrailerError."""
        body = b"5\r\nhello\r\n0\r\n\r\n"
        self.assertRaises(
            MalformedTrailerError, decode, body, decoder(PayloadMode.STREAMING_UNSIGNED_TRAILER, 5)
        )

    def test_unexpected_trailer(self) -> None:
        """Trailers that were not announced are MalformedTrailerError."""
        for mode, body in (
            (PayloadMode.STREAMING_UNSIGNED_TRAILER, b"0\r\nx-amz-meta-a:b\r\n\r\n"),
            (PayloadMode.STREAMING_UNSIGNED_TRAILER, b"0\r\nx-amz-trailer-signature:00\r\n\r\n"),
        ):
            d = AwsChunkedDecoder(mode, expected_length=0)
            self.assertRaises(MalformedTrailerError, decode, body, d)
        signer = _signer()
        zero = signer.sign_chunk(sigv4.EMPTY_SHA256)
        body = f"0;chunk-signature={zero}\r\nx-amz-checksum-crc32:AAAAAA==\r\n\r\n".encode()
        d = AwsChunkedDecoder(PayloadMode.STREAMING_SIGNED, signer=_signer())
        self.assertRaises(MalformedTrailerError, decode, body, d)

    def test_malformed_lines(self) -> None:
        """Trailer lines without a colon or CRLF are MalformedTrailerError."""
        for section in (
            b"x-amz-checksum-crc32 AAAAAA==\r\n\r\n",
            b"x-amz-checksum-crc32:AAAAAA==\n\r\n",
            b"\xff:1\r\n\r\n",
        ):
            d = decoder(PayloadMode.STREAMING_UNSIGNED_TRAILER, 0)
            self.assertRaises(MalformedTrailerError, decode, b"0\r\n" + section, d)

    def test_oversized_trailer(self) -> None:
        """A huge trailer section is refused."""
        d = decoder(PayloadMode.STREAMING_UNSIGNED_TRAILER, 0)
        lines = b"0\r\n" + b"x-amz-checksum-crc32:AAAAAA==\r\n" * 1000
        self.assertRaises(S3Error, d.feed, lines)

    def test_signed_trailer_signature(self) -> None:
        """In the signed trailer mode the trailer signature is required and checked."""
        body = encode(b"hello", 2, PayloadMode.STREAMING_SIGNED_TRAILER)
        start = body.index(b"x-amz-trailer-signature:")
        end = body.index(b"\r\n", start) + 2
        without = body[:start] + body[end:]
        self.assertRaises(
            SignatureDoesNotMatch, decode, without, decoder(PayloadMode.STREAMING_SIGNED_TRAILER, 5)
        )
        forged = body[:start] + b"x-amz-trailer-signature:" + b"0" * 64 + b"\r\n" + body[end:]
        self.assertRaises(
            SignatureDoesNotMatch, decode, forged, decoder(PayloadMode.STREAMING_SIGNED_TRAILER, 5)
        )

    def test_header_checksum_with_streaming(self) -> None:
        """A checksum sent as a header is checked against the decoded aws-chunked body."""
        body = encode(b"hello world", 4, PayloadMode.STREAMING_SIGNED)
        value = checksum("SHA256", b"hello world")
        d = AwsChunkedDecoder(
            PayloadMode.STREAMING_SIGNED,
            signer=_signer(),
            checksum=ChecksumVerifier(ChecksumSpec("SHA256", value, False)),
        )
        self.assertEqual(decode(body, d), b"hello world")
        self.assertEqual(d.checksum_value, value)
        d = AwsChunkedDecoder(
            PayloadMode.STREAMING_SIGNED,
            signer=_signer(),
            checksum=ChecksumVerifier(ChecksumSpec("SHA256", checksum("SHA256", b"x"), False)),
        )
        self.assertRaises(BadDigest, decode, body, d)

    def test_missing_final_line(self) -> None:
        """A body that ends right after its last trailer line is accepted."""
        body = encode(b"hello", 5, PayloadMode.STREAMING_UNSIGNED_TRAILER)
        self.assertTrue(body.endswith(b"\r\n\r\n"))
        d = decoder(PayloadMode.STREAMING_UNSIGNED_TRAILER, 5)
        self.assertEqual(decode(body[:-2], d), b"hello")


class StreamingTests(SynchronousTestCase):
    """
    Data streams through without waiting for whole chunks.
    """

    def test_large_chunk_piecewise(self) -> None:
        """A 1 MiB chunk comes out as its pieces arrive, before its signature is checked."""
        payload = bytes(range(256)) * 4096
        body = encode(payload, len(payload), PayloadMode.STREAMING_SIGNED)
        d = decoder(PayloadMode.STREAMING_SIGNED, len(payload))
        header_end = body.index(b"\r\n") + 2
        self.assertEqual(d.feed(body[:header_end]), [])
        received = 0
        for start in range(header_end, header_end + len(payload), 65536):
            pieces = d.feed(body[start : start + 65536])
            received += sum(len(piece) for piece in pieces)
            self.assertEqual(received, start + 65536 - header_end)
            if received < len(payload):
                self.assertEqual(d.verified_length, 0)
            self.assertLessEqual(len(d._buffer), 2)
        self.assertEqual(d.verified_length, len(payload))
        self.assertEqual(d.feed(body[header_end + len(payload) :]), [])
        d.finish()

    def test_verified_length(self) -> None:
        """verified_length advances chunk by chunk in signed mode."""
        body = encode(b"a" * 10 + b"b" * 10, 10, PayloadMode.STREAMING_SIGNED)
        d = decoder(PayloadMode.STREAMING_SIGNED, 20)
        first = body.index(b"\r\n") + 2
        d.feed(body[: first + 5])
        self.assertEqual((d.decoded_length, d.verified_length), (5, 0))
        d.feed(body[first + 5 : first + 10])
        self.assertEqual((d.decoded_length, d.verified_length), (10, 10))
        d.feed(body[first + 10 :])
        d.finish()
        self.assertEqual(d.verified_length, 20)

    def test_tampered_chunk_detected_at_chunk_end(self) -> None:
        """A corrupted chunk is refused when that chunk ends, not only at finish."""
        body = bytearray(encode(b"a" * 100, 50, PayloadMode.STREAMING_SIGNED))
        first = body.index(b"\r\n") + 2
        body[first + 3] ^= 1
        d = decoder(PayloadMode.STREAMING_SIGNED, 100)
        d.feed(bytes(body[: first + 49]))
        self.assertRaises(SignatureDoesNotMatch, d.feed, bytes(body[first + 49 : first + 50]))

    def test_crc_of_stream(self) -> None:
        """The trailing CRC32 covers exactly the decoded data."""
        payload = b"x" * 100_000
        d = decoder(PayloadMode.STREAMING_UNSIGNED_TRAILER, len(payload))
        decode(encode(payload, 8192, PayloadMode.STREAMING_UNSIGNED_TRAILER), d)
        expected = zlib.crc32(payload).to_bytes(4, "big")
        self.assertEqual(d.checksum_value, checksum("CRC32", payload))
        import base64

        self.assertEqual(base64.b64decode(d.checksum_value or ""), expected)


class ContentEncodingTests(SynchronousTestCase):
    """
    L{stored_content_encoding} removes aws-chunked.
    """

    def test_stored(self) -> None:
        """aws-chunked is removed; other codings are kept."""
        self.assertIsNone(stored_content_encoding(None))
        self.assertIsNone(stored_content_encoding("aws-chunked"))
        self.assertEqual(stored_content_encoding("gzip,aws-chunked"), "gzip")
        self.assertEqual(stored_content_encoding("AWS-Chunked, br, gzip"), "br, gzip")
