# -*- test-case-name: tests.test_chunked -*-
"""
Incremental decoding of C{aws-chunked} request bodies.

An aws-chunked body (C{x-amz-content-sha256: STREAMING-*}) frames the
object data as chunks, optionally followed by trailing headers::

    signed:    <hex size>;chunk-signature=<sig>\\r\\n<data>\\r\\n ...
               0;chunk-signature=<sig>\\r\\n
               [<trailer>:<value>\\r\\n x-amz-trailer-signature:<sig>\\r\\n]
               \\r\\n
    unsigned:  <hex size>\\r\\n<data>\\r\\n ... 0\\r\\n<trailer>:<value>\\r\\n\\r\\n

See U{https://docs.aws.amazon.com/AmazonS3/latest/API/sigv4-streaming.html}
and U{https://docs.aws.amazon.com/AmazonS3/latest/API/sigv4-streaming-trailers.html}.

Contract for the consumer
=========================
L{AwsChunkedDecoder.feed} returns the decoded data as it arrives, without
waiting for a whole chunk: a 1 MiB chunk streams through in as many pieces
as the network delivers, and the decoder itself buffers at most one chunk
header (4 KiB) or the trailer section (16 KiB). This means a piece can be
returned before the signature of its chunk (which covers the whole chunk)
or the trailing checksum (which covers the whole body) has been checked.
Therefore:

  1. The consumer writes every piece to I{staging} only (temporary shard
     files, an uncommitted upload), never where a reader could see it.
  2. When C{feed} or C{finish} raises, the consumer discards everything it
     staged for this request and answers with the raised L{S3Error}.
  3. Only after L{AwsChunkedDecoder.finish} has returned does the consumer
     commit (rename shards, write the metadata row).

L{AwsChunkedDecoder.verified_length} tells how many leading decoded bytes are
covered by verified chunk signatures so far, for consumers that want to
know; it does not replace the rule above, because the trailing checksum and
the decoded length are only known at the end.

When a L{ChecksumVerifier} is given to the decoder, the decoder feeds it
the decoded data and checks it in C{finish} (against the trailer or the
header value); the consumer must not feed it a second time. Its computed
value is then in L{AwsChunkedDecoder.checksum_value}.

The minimum chunk size of 8 KiB that AWS imposes on signed chunks is not
enforced by default (it protects nothing here and some clients send
smaller chunks); pass C{min_chunk_size=8192} to enforce it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable

from anvil.s3.checksums import ChecksumVerifier
from anvil.s3.errors import (
    IncompleteBody,
    InvalidChunkSizeError,
    InvalidRequest,
    MalformedTrailerError,
    S3Error,
    SignatureDoesNotMatch,
)
from anvil.s3.sigv4 import EMPTY_SHA256, ChunkSigner, PayloadMode, VerifiedAuth

#: The longest chunk header line accepted (a signed one is about 90 bytes).
MAX_CHUNK_HEADER = 4096
#: The largest trailer section accepted.
MAX_TRAILER_SECTION = 16384

_TRAILER_SIGNATURE = "x-amz-trailer-signature"
_SIZE = re.compile(rb"^[0-9a-fA-F]{1,16}$")
_SIGNATURE_EXTENSION = re.compile(rb"^chunk-signature=([0-9a-fA-F]{64})$")

# Decoder states.
_HEADER = "header"
_DATA = "data"
_DATA_END = "data-end"
_TRAILER = "trailer"
_DONE = "done"


def stored_content_encoding(content_encoding: str | None) -> str | None:
    """
    The Content-Encoding to store for an object uploaded aws-chunked.

    S3 removes C{aws-chunked} from the list and keeps any other coding
    (botocore sends C{gzip,aws-chunked} when the caller set C{gzip}).

    @param content_encoding: the request's Content-Encoding header.
    @return: the remaining codings, or C{None} when none remain.
    """
    if content_encoding is None:
        return None
    codings = [
        coding.strip()
        for coding in content_encoding.split(",")
        if coding.strip() and coding.strip().lower() != "aws-chunked"
    ]
    return ", ".join(codings) or None


class AwsChunkedDecoder:
    """
    Decode an aws-chunked body piece by piece, verifying chunk signatures,
    the trailer, its signature and checksum, and the decoded length.

    @ivar trailers: the trailing headers received (lower-case names), once
        the trailer section has been read.
    @ivar checksum_value: the base64 checksum computed by the checksum
        verifier, after a successful L{finish}.
    @ivar decoded_length: the number of decoded bytes returned so far.
    @ivar verified_length: how many of them are covered by verified chunk
        signatures (all of them in unsigned mode).
    """

    def __init__(
        self,
        mode: PayloadMode,
        *,
        signer: ChunkSigner | None = None,
        expected_length: int | None = None,
        checksum: ChecksumVerifier | None = None,
        min_chunk_size: int = 0,
    ) -> None:
        """
        @param mode: one of the C{STREAMING_*} payload modes.
        @param signer: the signature chain; required in signed modes.
        @param expected_length: C{x-amz-decoded-content-length}, if known.
        @param checksum: the request's declared checksum, if any; a trailer
            checksum needs a C{*_TRAILER} mode.
        @param min_chunk_size: the smallest size allowed for a data chunk
            other than the last (0 to allow any).
        @raise InvalidRequest: for an inconsistent combination.
        """
        if not mode.chunked:
            raise ValueError(f"{mode} is not an aws-chunked payload mode")
        if mode.signed_chunks and signer is None:
            raise ValueError("signed chunks need a ChunkSigner")
        if checksum is not None and checksum.spec.trailer and not mode.has_trailer:
            raise InvalidRequest(
                "x-amz-trailer requires x-amz-content-sha256 "
                "STREAMING-UNSIGNED-PAYLOAD-TRAILER or "
                "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
            )
        self._mode = mode
        self._signer = signer if mode.signed_chunks else None
        self._expected = expected_length
        self._checksum = checksum
        self._min_chunk = min_chunk_size
        self._allowed_trailer = (
            checksum.spec.header_name if checksum is not None and checksum.spec.trailer else None
        )
        self._state = _HEADER
        self._buffer = bytearray()
        self._remaining = 0
        self._chunk_size = 0
        self._chunk_signature = ""
        self._chunk_hash: hashlib._Hash | None = None
        self._previous_data_chunk: int | None = None
        self._chunk_index = 0
        self._trailer_lines: list[tuple[str, str]] = []
        self._trailer_bytes = 0
        self._failure: S3Error | None = None
        self._finished = False
        self.trailers: dict[str, str] = {}
        self.checksum_value: str | None = None
        self.decoded_length = 0
        self.verified_length = 0

    @classmethod
    def for_request(
        cls,
        auth: VerifiedAuth,
        checksum: ChecksumVerifier | None = None,
        min_chunk_size: int = 0,
    ) -> AwsChunkedDecoder:
        """
        Build the decoder of a verified streaming request.

        @param auth: from L{anvil.s3.sigv4.verify}; its payload mode must be
            one of the C{STREAMING_*} modes.
        @param checksum: the request's declared checksum, if any.
        @param min_chunk_size: see L{__init__}.
        @return: the decoder.
        """
        signer = auth.chunk_signer() if auth.payload_mode.signed_chunks else None
        return cls(
            auth.payload_mode,
            signer=signer,
            expected_length=auth.decoded_content_length,
            checksum=checksum,
            min_chunk_size=min_chunk_size,
        )

    # Public API -----------------------------------------------------------------

    def feed(self, data: bytes) -> list[bytes]:
        """
        Decode the next piece of the body.

        @param data: bytes as received, split anywhere.
        @return: the decoded data pieces, in order (possibly none). They are
            not yet verified: stage them, and commit only after L{finish}.
        @raise S3Error: as soon as the body is known to be bad; the decoder
            then raises the same error on every later call.
        """
        if self._failure is not None:
            raise self._failure
        if self._finished:
            raise InvalidRequest("The aws-chunked body was already finished")
        try:
            return self._feed(data)
        except S3Error as error:
            self._failure = error
            raise

    def finish(self) -> None:
        """
        Declare the end of the body and run the final checks.

        @raise IncompleteBody: if the body was truncated or its decoded length
            differs from C{x-amz-decoded-content-length}.
        @raise SignatureDoesNotMatch: for a bad or missing trailer signature.
        @raise MalformedTrailerError: for a missing or unexpected trailer.
        @raise BadDigest: if the checksum does not match.
        """
        if self._failure is not None:
            raise self._failure
        if self._finished:
            return
        try:
            self._finish()
        except S3Error as error:
            self._failure = error
            raise
        self._finished = True

    # Decoding ---------------------------------------------------------------------

    def _feed(self, data: bytes) -> list[bytes]:
        if not isinstance(data, bytes):
            data = bytes(data)
        out: list[bytes] = []
        view = memoryview(data)
        position = 0
        end = len(data)
        while position < end:
            state = self._state
            if state == _DATA:
                take = min(self._remaining, end - position)
                piece = data[position : position + take] if take != end or position else data
                position += take
                self._remaining -= take
                self._emit(piece)
                out.append(piece)
                if self._remaining == 0:
                    self._state = _DATA_END
            elif state == _HEADER:
                position = self._read_line(view, position, MAX_CHUNK_HEADER, self._header_line)
            elif state == _DATA_END:
                need = 2 - len(self._buffer)
                self._buffer += view[position : position + need]
                position += min(need, end - position)
                if len(self._buffer) == 2:
                    if self._buffer != b"\r\n":
                        raise InvalidRequest(
                            "Invalid aws-chunked body: chunk data must be followed by CRLF"
                        )
                    self._buffer.clear()
                    self._state = _HEADER
            elif state == _TRAILER:
                position = self._read_line(view, position, MAX_TRAILER_SECTION, self._trailer_line)
            else:
                raise InvalidRequest("Invalid aws-chunked body: data after the final chunk")
        return out

    def _read_line(
        self, view: memoryview, position: int, limit: int, handle: Callable[[bytes], None]
    ) -> int:
        """
        Accumulate one line (up to its LF) and hand it over.

        @return: the position after what was consumed.
        """
        room = limit + 2 - len(self._buffer)
        window = view[position : position + max(room, 0)]
        index = bytes(window).find(b"\n")
        if index < 0:
            if len(view) - position >= room:
                raise InvalidRequest(
                    "Invalid aws-chunked body: chunk header or trailer line too long"
                )
            self._buffer += view[position:]
            return len(view)
        self._buffer += window[: index + 1]
        line = bytes(self._buffer)
        self._buffer.clear()
        handle(line)
        return position + index + 1

    def _header_line(self, line: bytes) -> None:
        if not line.endswith(b"\r\n"):
            raise InvalidRequest("Invalid aws-chunked body: chunk header must end with CRLF")
        size_text, _, extension = line[:-2].partition(b";")
        if not _SIZE.match(size_text):
            raise InvalidRequest("Invalid aws-chunked body: bad chunk size")
        size = int(size_text, 16)
        if self._signer is not None:
            match = _SIGNATURE_EXTENSION.match(extension)
            if match is None:
                raise SignatureDoesNotMatch(
                    "The chunk is missing its chunk-signature or it is malformed."
                )
            self._chunk_signature = match.group(1).decode("ascii")
        if size and self._min_chunk and self._previous_data_chunk is not None:
            if self._previous_data_chunk < self._min_chunk:
                raise InvalidChunkSizeError(
                    Chunk=self._chunk_index - 1, BadChunkSize=self._previous_data_chunk
                )
        if self._expected is not None and self.decoded_length + size > self._expected:
            raise IncompleteBody("The aws-chunked body is longer than x-amz-decoded-content-length")
        self._chunk_size = size
        self._chunk_index += 1
        if size == 0:
            if self._expected is not None and self.decoded_length != self._expected:
                raise IncompleteBody(
                    "The aws-chunked body is shorter than x-amz-decoded-content-length"
                )
            self._verify_chunk(sha256_hex=EMPTY_SHA256)
            self._state = _TRAILER
            return
        self._previous_data_chunk = size
        self._remaining = size
        self._chunk_hash = hashlib.sha256() if self._signer is not None else None
        self._state = _DATA

    def _emit(self, piece: bytes) -> None:
        self.decoded_length += len(piece)
        if self._chunk_hash is not None:
            self._chunk_hash.update(piece)
        else:
            # No chunk signatures: everything decoded is as verified as it
            # will be until the trailer.
            self.verified_length = self.decoded_length
        if self._checksum is not None:
            self._checksum.update(piece)
        if self._remaining == 0 and self._chunk_hash is not None:
            self._verify_chunk(self._chunk_hash.hexdigest())

    def _verify_chunk(self, sha256_hex: str) -> None:
        if self._signer is None:
            return
        self._signer.verify_chunk(sha256_hex, self._chunk_signature)
        self.verified_length = self.decoded_length

    def _trailer_line(self, line: bytes) -> None:
        self._trailer_bytes += len(line)
        if self._trailer_bytes > MAX_TRAILER_SECTION:
            raise MalformedTrailerError("The trailer section is too large.")
        if not line.endswith(b"\r\n"):
            raise MalformedTrailerError("Trailer lines must end with CRLF.")
        text = line[:-2]
        if not text:
            self._complete_trailers()
            self._state = _DONE
            return
        try:
            decoded = text.decode("ascii")
        except UnicodeDecodeError:
            raise MalformedTrailerError() from None
        name, colon, value = decoded.partition(":")
        name = name.strip().lower()
        if not colon or not name:
            raise MalformedTrailerError()
        self._trailer_lines.append((name, value.strip()))

    def _complete_trailers(self) -> None:
        """Check the trailer section once it has been read."""
        signature: str | None = None
        canonical = []
        for name, value in self._trailer_lines:
            if name == _TRAILER_SIGNATURE and self._mode is PayloadMode.STREAMING_SIGNED_TRAILER:
                if signature is not None:
                    raise MalformedTrailerError("Duplicate x-amz-trailer-signature.")
                signature = value
                continue
            if name != self._allowed_trailer or name in self.trailers:
                raise MalformedTrailerError(
                    f"Unexpected trailing header {name!r}; x-amz-trailer must "
                    "announce the single trailing checksum."
                )
            self.trailers[name] = value
            canonical.append(f"{name}:{value}\n")
        if self._mode is PayloadMode.STREAMING_SIGNED_TRAILER and (
            self._trailer_lines or self._allowed_trailer is not None
        ):
            assert self._signer is not None
            if signature is None:
                raise SignatureDoesNotMatch("The trailer is missing x-amz-trailer-signature.")
            self._signer.verify_trailer("".join(canonical).encode("ascii"), signature)

    def _finish(self) -> None:
        if self._state == _TRAILER and not self._buffer:
            # The final empty line may be missing; everything it would
            # close has arrived.
            self._complete_trailers()
            self._state = _DONE
        if self._state != _DONE:
            raise IncompleteBody("The aws-chunked body ended before its final chunk")
        if self._expected is not None and self.decoded_length != self._expected:
            raise IncompleteBody(
                "The aws-chunked body is shorter than x-amz-decoded-content-length"
            )
        if self._checksum is not None:
            trailer_value = None
            if self._checksum.spec.trailer:
                trailer_value = self.trailers.get(self._checksum.spec.header_name)
            self.checksum_value = self._checksum.finish(trailer_value)
