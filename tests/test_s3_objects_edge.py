# -*- test-case-name: tests.test_s3_objects_edge -*-
"""
Edge cases of the object write and read paths against an in-process node
(L{tests.s3fixture}): every SigV4 payload mode with tampered bodies, client
disconnects mid-upload, concurrent writers of one key, corrupted shard
files, and body-length mistakes. After every refused upload nothing may be
stored: no object and no temporary shard file.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import io
import os
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater

from anvil.s3.sigv4 import (
    STREAMING_SIGNED,
    STREAMING_SIGNED_TRAILER,
    STREAMING_UNSIGNED_TRAILER,
    ChunkSigner,
    signing_key,
)
from anvil.storage.shardfile import HEADER_SIZE
from tests.s3fixture import RawResponse
from tests.test_s3_objects import STRIPE, ObjectTestCase, crc32_b64, md5_hex


def _authorization_parts(headers: dict[str, str]) -> tuple[str, str, str]:
    """
    @return: C{(signature, amz date, scope)} of signed request headers.
    """
    authorization = headers["Authorization"]
    signature = authorization.rsplit("Signature=", 1)[1]
    credential = authorization.split("Credential=", 1)[1].split(",", 1)[0]
    scope = credential.split("/", 1)[1]
    return signature, headers["x-amz-date"], scope


def aws_chunked(
    data: bytes,
    chunk_size: int,
    signer: ChunkSigner | None = None,
    trailer: tuple[str, str] | None = None,
    tamper_chunk: int | None = None,
) -> bytes:
    """
    Encode a body as aws-chunked, the way SDKs do.

    @param data: the decoded body.
    @param chunk_size: bytes per data chunk.
    @param signer: sign every chunk (and the trailer) with this chain.
    @param trailer: a C{(name, value)} trailing header.
    @param tamper_chunk: flip a byte of this chunk I{after} signing it.
    @return: the encoded body.
    """
    out = io.BytesIO()
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)] + [b""]
    for index, chunk in enumerate(chunks):
        header = f"{len(chunk):x}"
        if signer is not None:
            header += ";chunk-signature=" + signer.sign_chunk(hashlib.sha256(chunk).hexdigest())
        if tamper_chunk == index and chunk:
            chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
        out.write(header.encode() + b"\r\n")
        if chunk:
            out.write(chunk + b"\r\n")
    if trailer is not None:
        name, value = trailer
        out.write(f"{name}:{value}\r\n".encode())
        if signer is not None:
            signature = signer.sign_trailer(f"{name}:{value}\n".encode())
            out.write(f"x-amz-trailer-signature:{signature}\r\n".encode())
    out.write(b"\r\n")
    return out.getvalue()


def flip_byte(path: str) -> None:
    """Corrupt one byte in the middle of a shard file's blocks."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        offset = HEADER_SIZE + (size - HEADER_SIZE) // 2
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))


class EdgeTestCase(ObjectTestCase):
    """
    Helpers for raw requests and for looking at the shard store.
    """

    def tmp_files(self) -> list[str]:
        """@return: every temporary shard file in the stack's data dirs."""
        found = []
        for data_dir in self.s3.storage_dirs:
            tmp = os.path.join(data_dir, "tmp")
            if os.path.isdir(tmp):
                found += [os.path.join(tmp, name) for name in os.listdir(tmp)]
        return found

    def shard_files(self, content_hash: str) -> dict[int, str]:
        """@return: the committed shard files of a content by shard index."""
        found = {}
        for data_dir in self.s3.storage_dirs:
            leaf = os.path.join(data_dir, "shards", content_hash[:2], content_hash[2:4])
            if not os.path.isdir(leaf):
                continue
            for name in os.listdir(leaf):
                if name.startswith(content_hash + "."):
                    found[int(name.rsplit(".", 1)[1])] = os.path.join(leaf, name)
        return found

    async def wait_for(self, condition: Any, timeout: float = 10.0) -> None:
        """Poll C{condition()} on the reactor until it is true."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"condition not met within {timeout}s")
            await deferLater(reactor, 0.05, lambda: None)

    async def assert_nothing_stored(self, key: str) -> None:
        """No object under C{key} and, once the writer is aborted, no temporary shard."""
        await self.assert_absent(key)
        await self.wait_for(lambda: not self.tmp_files())

    async def signed_put(
        self,
        key: str,
        body: bytes,
        payload_hash: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> RawResponse:
        """PUT C{body} with SigV4 header authentication (default: signed SHA-256)."""
        path = f"/{self.bucket}/{key}"
        signed = self.s3.signed_headers(
            self.app, "PUT", path, headers=headers or {}, body=body, payload_hash=payload_hash
        )
        return await self.s3.raw_request("PUT", path, signed, body)

    async def streaming_put(
        self,
        key: str,
        data: bytes,
        mode: str,
        *,
        chunk_size: int = 64 * 1024,
        trailer_algorithm: str | None = None,
        trailer_value: str | None = None,
        tamper_chunk: int | None = None,
        decoded_length: int | None = None,
        transfer_chunked: bool = False,
    ) -> RawResponse:
        """
        PUT C{data} as an aws-chunked body in one of the STREAMING-* modes.

        @param trailer_algorithm: send a trailing checksum of this algorithm.
        @param trailer_value: the trailer value (default: the right one).
        @param tamper_chunk: corrupt this chunk after signing it.
        @param decoded_length: the x-amz-decoded-content-length to announce.
        @param transfer_chunked: send with Transfer-Encoding: chunked and no
            Content-Length, as botocore does for trailers over HTTPS.
        """
        path = f"/{self.bucket}/{key}"
        headers = {
            "Content-Encoding": "aws-chunked",
            "x-amz-decoded-content-length": str(
                len(data) if decoded_length is None else decoded_length
            ),
        }
        trailer = None
        if trailer_algorithm is not None:
            name = "x-amz-checksum-" + trailer_algorithm.lower()
            headers["x-amz-trailer"] = name
            if trailer_value is None:
                assert trailer_algorithm == "CRC32"
                trailer_value = crc32_b64(data)
            trailer = (name, trailer_value)
        signed = self.s3.signed_headers(self.app, "PUT", path, headers=headers, payload_hash=mode)
        signer = None
        if mode != STREAMING_UNSIGNED_TRAILER:
            signature, amz_date, scope = _authorization_parts(signed)
            date, region = scope.split("/")[:2]
            signer = ChunkSigner(
                signing_key(self.app.secret, date, region), amz_date, scope, signature
            )
        body = aws_chunked(data, chunk_size, signer, trailer, tamper_chunk)
        if transfer_chunked:
            return await self.s3.call(self._send_chunked, path, signed, body)
        return await self.s3.raw_request("PUT", path, signed, body)

    def _send_chunked(self, path: str, headers: dict[str, str], body: bytes) -> RawResponse:
        """Send a body with HTTP Transfer-Encoding: chunked (blocking)."""
        connection = http.client.HTTPConnection(
            "127.0.0.1", self.s3.port.getHost().port, timeout=30
        )

        def pieces() -> Iterator[bytes]:
            for i in range(0, len(body), 10_000):
                yield body[i : i + 10_000]

        try:
            connection.putrequest("PUT", path, skip_host=True, skip_accept_encoding=True)
            for name, value in headers.items():
                connection.putheader(name, value)
            connection.putheader("Transfer-Encoding", "chunked")
            connection.endheaders()
            for piece in pieces():
                connection.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            connection.send(b"0\r\n\r\n")
            response = connection.getresponse()
            return RawResponse(
                response.status,
                {name.lower(): value for name, value in response.getheaders()},
                response.read(),
            )
        finally:
            connection.close()


class PayloadModeTests(EdgeTestCase):
    """
    Every x-amz-content-sha256 payload mode on PutObject.
    """

    data = os.urandom(300_000)

    async def check_stored(self, key: str, data: bytes | None = None) -> None:
        """The object holds exactly C{data}."""
        _, body = await self.get(key)
        self.assertEqual(body, self.data if data is None else data)

    async def test_unsigned_payload(self) -> None:
        """UNSIGNED-PAYLOAD stores the body as sent."""
        response = await self.signed_put("unsigned", self.data, payload_hash="UNSIGNED-PAYLOAD")
        self.assertEqual(response.status, 200, response.body)
        self.assertEqual(response.headers["etag"], f'"{md5_hex(self.data)}"')
        await self.check_stored("unsigned")

    async def test_signed_sha256(self) -> None:
        """A body matching the signed SHA-256 is stored."""
        response = await self.signed_put("signed", self.data)
        self.assertEqual(response.status, 200, response.body)
        await self.check_stored("signed")

    async def test_tampered_sha256(self) -> None:
        """A body that differs from the signed SHA-256 is XAmzContentSHA256Mismatch; nothing is stored."""
        tampered = bytearray(self.data)
        tampered[-1] ^= 1
        response = await self.signed_put(
            "tampered", bytes(tampered), payload_hash=hashlib.sha256(self.data).hexdigest()
        )
        self.assertEqual(response.status, 400)
        self.assertIn(b"<Code>XAmzContentSHA256Mismatch</Code>", response.body)
        await self.assert_nothing_stored("tampered")

    async def test_streaming_signed(self) -> None:
        """STREAMING-AWS4-HMAC-SHA256-PAYLOAD with valid chunk signatures is stored."""
        response = await self.streaming_put("chunked", self.data, STREAMING_SIGNED)
        self.assertEqual(response.status, 200, response.body)
        await self.check_stored("chunked")

    async def test_streaming_signed_tampered(self) -> None:
        """A tampered signed chunk is SignatureDoesNotMatch and nothing is stored."""
        response = await self.streaming_put(
            "chunked-bad", self.data, STREAMING_SIGNED, tamper_chunk=2
        )
        self.assertEqual(response.status, 403)
        self.assertIn(b"<Code>SignatureDoesNotMatch</Code>", response.body)
        await self.assert_nothing_stored("chunked-bad")

    async def test_streaming_signed_last_chunk_tampered(self) -> None:
        """Tampering with the last data chunk is caught too."""
        response = await self.streaming_put(
            "chunked-bad-last", self.data, STREAMING_SIGNED, tamper_chunk=4
        )
        self.assertEqual(response.status, 403)
        await self.assert_nothing_stored("chunked-bad-last")

    async def test_streaming_wrong_decoded_length(self) -> None:
        """A decoded length that differs from the chunks is refused; nothing is stored."""
        response = await self.streaming_put(
            "short", self.data, STREAMING_SIGNED, decoded_length=len(self.data) + 1
        )
        self.assertEqual(response.status, 400, response.body)
        await self.assert_nothing_stored("short")

    async def test_unsigned_trailer(self) -> None:
        """STREAMING-UNSIGNED-PAYLOAD-TRAILER with a correct CRC32 stores the object and its checksum."""
        response = await self.streaming_put(
            "trailer", self.data, STREAMING_UNSIGNED_TRAILER, trailer_algorithm="CRC32"
        )
        self.assertEqual(response.status, 200, response.body)
        self.assertEqual(response.headers["x-amz-checksum-crc32"], crc32_b64(self.data))
        await self.check_stored("trailer")
        head = await self.s3.call(
            self.client.head_object, Bucket=self.bucket, Key="trailer", ChecksumMode="ENABLED"
        )
        self.assertEqual(head["ChecksumCRC32"], crc32_b64(self.data))

    async def test_unsigned_trailer_transfer_chunked(self) -> None:
        """The trailer form inside HTTP chunked transfer coding (botocore over HTTPS) works."""
        response = await self.streaming_put(
            "te-chunked",
            self.data,
            STREAMING_UNSIGNED_TRAILER,
            trailer_algorithm="CRC32",
            transfer_chunked=True,
        )
        self.assertEqual(response.status, 200, response.body)
        await self.check_stored("te-chunked")

    async def test_botocore_trailer_body(self) -> None:
        """A body encoded by botocore's own AwsChunkedWrapper is accepted."""
        from botocore.httpchecksum import AwsChunkedWrapper, Crc32Checksum

        body = AwsChunkedWrapper(
            io.BytesIO(self.data),
            checksum_cls=Crc32Checksum,
            checksum_name="x-amz-checksum-crc32",
        ).read()
        path = f"/{self.bucket}/botocore"
        signed = self.s3.signed_headers(
            self.app,
            "PUT",
            path,
            headers={
                "Content-Encoding": "aws-chunked",
                "x-amz-trailer": "x-amz-checksum-crc32",
                "x-amz-decoded-content-length": str(len(self.data)),
            },
            payload_hash=STREAMING_UNSIGNED_TRAILER,
        )
        response = await self.s3.raw_request("PUT", path, signed, body)
        self.assertEqual(response.status, 200, response.body)
        await self.check_stored("botocore")

    async def test_wrong_trailer_checksum(self) -> None:
        """A trailing checksum that does not match is refused and nothing is stored."""
        response = await self.streaming_put(
            "bad-trailer",
            self.data,
            STREAMING_UNSIGNED_TRAILER,
            trailer_algorithm="CRC32",
            trailer_value=crc32_b64(b"not the body"),
        )
        self.assertEqual(response.status, 400, response.body)
        self.assertTrue(
            b"<Code>BadDigest</Code>" in response.body
            or b"<Code>InvalidRequest</Code>" in response.body,
            response.body,
        )
        await self.assert_nothing_stored("bad-trailer")

    async def test_signed_trailer(self) -> None:
        """STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER with a signed CRC32 trailer is stored."""
        response = await self.streaming_put(
            "signed-trailer", self.data, STREAMING_SIGNED_TRAILER, trailer_algorithm="CRC32"
        )
        self.assertEqual(response.status, 200, response.body)
        await self.check_stored("signed-trailer")

    async def test_signed_trailer_wrong_checksum(self) -> None:
        """A signed but wrong trailing checksum is refused; nothing is stored."""
        response = await self.streaming_put(
            "signed-trailer-bad",
            self.data,
            STREAMING_SIGNED_TRAILER,
            trailer_algorithm="CRC32",
            trailer_value=crc32_b64(b"nope"),
        )
        self.assertEqual(response.status, 400, response.body)
        await self.assert_nothing_stored("signed-trailer-bad")

    async def test_content_encoding_kept(self) -> None:
        """gzip,aws-chunked is stored as Content-Encoding gzip."""
        path = f"/{self.bucket}/gz"
        data = b"pretend this is gzip"
        signed = self.s3.signed_headers(
            self.app,
            "PUT",
            path,
            headers={
                "Content-Encoding": "gzip,aws-chunked",
                "x-amz-decoded-content-length": str(len(data)),
            },
            payload_hash=STREAMING_SIGNED,
        )
        signature, amz_date, scope = _authorization_parts(signed)
        date, region = scope.split("/")[:2]
        signer = ChunkSigner(signing_key(self.app.secret, date, region), amz_date, scope, signature)
        response = await self.s3.raw_request("PUT", path, signed, aws_chunked(data, 8192, signer))
        self.assertEqual(response.status, 200, response.body)
        head = await self.s3.call(self.client.head_object, Bucket=self.bucket, Key="gz")
        self.assertEqual(head["ContentEncoding"], "gzip")

    async def test_boto3_checksum_when_supported(self) -> None:
        """boto3 with request_checksum_calculation=when_supported stores its CRC32."""
        client = self.s3.client(self.app, request_checksum_calculation="when_supported")
        put = await self.s3.call(client.put_object, Bucket=self.bucket, Key="sdk", Body=self.data)
        self.assertEqual(put["ChecksumCRC32"], crc32_b64(self.data))
        await self.check_stored("sdk")

    async def test_missing_length(self) -> None:
        """A PUT with neither Content-Length nor a decoded length is MissingContentLength."""
        path = f"/{self.bucket}/nolength"
        signed = self.s3.signed_headers(self.app, "PUT", path, payload_hash="UNSIGNED-PAYLOAD")
        response = await self.s3.call(self._send_chunked, path, signed, b"some data")
        self.assertEqual(response.status, 411, response.body)
        self.assertIn(b"<Code>MissingContentLength</Code>", response.body)
        await self.assert_nothing_stored("nolength")


class DisconnectTests(EdgeTestCase):
    """
    A client that goes away in the middle of an upload.
    """

    async def test_disconnect_mid_upload(self) -> None:
        """Half a body then a closed socket: no object and no temporary shard left."""
        path = f"/{self.bucket}/half"
        length = 2 * 1024 * 1024
        signed = self.s3.signed_headers(self.app, "PUT", path, payload_hash="UNSIGNED-PAYLOAD")
        signed["Content-Length"] = str(length)
        sock = socket.create_connection(("127.0.0.1", self.s3.port.getHost().port))
        self.addCleanup(sock.close)
        head = f"PUT {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in signed.items())
        await self.s3.call(sock.sendall, head.encode() + b"\r\n" + os.urandom(length // 2))
        # The upload is in progress: stripes are being written to temporary
        # shard files.
        await self.wait_for(lambda: bool(self.tmp_files()))
        sock.close()
        await self.assert_nothing_stored("half")

    async def test_disconnect_during_streaming_upload(self) -> None:
        """The same for an aws-chunked upload cut off after some chunks."""
        path = f"/{self.bucket}/half-chunked"
        data = os.urandom(1024 * 1024)
        headers = {
            "Content-Encoding": "aws-chunked",
            "x-amz-decoded-content-length": str(len(data)),
        }
        signed = self.s3.signed_headers(
            self.app, "PUT", path, headers=headers, payload_hash=STREAMING_SIGNED
        )
        signature, amz_date, scope = _authorization_parts(signed)
        date, region = scope.split("/")[:2]
        signer = ChunkSigner(signing_key(self.app.secret, date, region), amz_date, scope, signature)
        body = aws_chunked(data, 64 * 1024, signer)
        signed["Content-Length"] = str(len(body))
        sock = socket.create_connection(("127.0.0.1", self.s3.port.getHost().port))
        self.addCleanup(sock.close)
        head = f"PUT {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in signed.items())
        await self.s3.call(sock.sendall, head.encode() + b"\r\n" + body[: len(body) * 2 // 3])
        await self.wait_for(lambda: bool(self.tmp_files()))
        sock.close()
        await self.assert_nothing_stored("half-chunked")

    async def test_disconnect_mid_download(self) -> None:
        """A client that reads part of a large GET and leaves does not break the node."""
        data = os.urandom(4 * 1024 * 1024)
        await self.put("big", data)
        path = f"/{self.bucket}/big"
        signed = self.s3.signed_headers(self.app, "GET", path)
        sock = socket.create_connection(("127.0.0.1", self.s3.port.getHost().port))
        self.addCleanup(sock.close)
        head = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in signed.items())
        await self.s3.call(sock.sendall, head.encode() + b"\r\n")
        await self.s3.call(sock.recv, 65536)
        sock.close()
        _, body = await self.get("big")
        self.assertEqual(body, data)


class ConcurrencyTests(EdgeTestCase):
    """
    Concurrent writers of one key.
    """

    async def test_concurrent_puts_one_wins_whole(self) -> None:
        """Two PUTs racing on one key leave exactly one of the two bodies, whole."""
        bodies = [os.urandom(700_000), os.urandom(900_000)]
        clients = [self.s3.client(self.app) for _ in bodies]
        for round_ in range(3):
            key = f"race-{round_}"
            barrier = threading.Barrier(2)

            def put(index: int, key: str = key, barrier: threading.Barrier = barrier) -> Any:
                barrier.wait()
                return clients[index].put_object(Bucket=self.bucket, Key=key, Body=bodies[index])

            from twisted.internet.defer import gatherResults

            await gatherResults([self.s3.call(put, 0), self.s3.call(put, 1)])
            response, body = await self.get(key)
            self.assertIn(body, bodies)
            self.assertEqual(response["ETag"], f'"{md5_hex(body)}"')
            rows = await self.s3.regional_db.run_query(
                "SELECT count(*) FROM objects WHERE key = %s AND deleted_at IS NULL", (key,)
            )
            self.assertEqual(rows[0][0], 1)

    async def test_reads_during_overwrites(self) -> None:
        """Readers during overwrites see one complete version or the other, never a mix."""
        bodies = [bytes([i]) * 400_000 for i in range(2)]
        await self.put("flip", bodies[0])
        writer = self.s3.client(self.app)
        stop = threading.Event()

        def overwrite() -> None:
            index = 1
            while not stop.is_set():
                writer.put_object(Bucket=self.bucket, Key="flip", Body=bodies[index])
                index ^= 1

        writing = self.s3.call(overwrite)
        try:
            for _ in range(8):
                _, body = await self.get("flip")
                self.assertIn(body, bodies)
        finally:
            stop.set()
            await writing


class CorruptionTests(EdgeTestCase):
    """
    Reads of contents with damaged shard files.
    """

    async def test_corrupt_byte_read_via_parity(self) -> None:
        """A flipped byte in a data shard of a multi-stripe object is read around via parity."""
        data = os.urandom(5 * STRIPE + 123)
        await self.put("fragile", data)
        files = self.shard_files(hashlib.sha256(data).hexdigest())
        self.assertEqual(sorted(files), list(range(6)))
        flip_byte(files[0])
        _, body = await self.get("fragile")
        self.assertEqual(body, data)
        _, part = await self.get("fragile", Range=f"bytes={2 * STRIPE}-{3 * STRIPE + 5}")
        self.assertEqual(part, data[2 * STRIPE : 3 * STRIPE + 6])

    async def test_two_missing_shards(self) -> None:
        """With m=2 shard files gone (one data, one parity) the object still reads exactly."""
        data = os.urandom(3 * STRIPE + 7)
        await self.put("damaged", data)
        files = self.shard_files(hashlib.sha256(data).hexdigest())
        os.remove(files[1])
        os.remove(files[5])
        _, body = await self.get("damaged")
        self.assertEqual(body, data)

    async def test_too_many_missing_shards(self) -> None:
        """With more than m shards gone the GET is 503 ServiceUnavailable, never wrong bytes."""
        data = os.urandom(3 * STRIPE + 7)
        await self.put("lost", data)
        files = self.shard_files(hashlib.sha256(data).hexdigest())
        for index in (0, 1, 2):
            os.remove(files[index])
        from botocore.exceptions import ClientError

        def read() -> bytes | int | str:
            try:
                return bytes(self.client.get_object(Bucket=self.bucket, Key="lost")["Body"].read())
            except ClientError as e:
                return int(e.response["ResponseMetadata"]["HTTPStatusCode"])
            except (OSError, ValueError) as e:
                # botocore raises these when a response ends early.
                return repr(e)

        result = await self.s3.call(read)
        # The first stripe cannot be rebuilt: a clean 503 before any byte.
        self.assertEqual(result, 503)


class SizeBoundaryTests(EdgeTestCase):
    """
    Length limits and mismatches.
    """

    async def test_too_large(self) -> None:
        """A Content-Length over 5 GiB is EntityTooLarge before any byte is stored."""
        path = f"/{self.bucket}/huge"
        signed = self.s3.signed_headers(self.app, "PUT", path, payload_hash="UNSIGNED-PAYLOAD")
        signed["Content-Length"] = str(5 * 1024**3 + 1)
        sock = socket.create_connection(("127.0.0.1", self.s3.port.getHost().port))
        self.addCleanup(sock.close)
        head = f"PUT {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in signed.items())
        await self.s3.call(sock.sendall, head.encode() + b"\r\n" + b"x" * 1000)
        sock.settimeout(10)
        answer = await self.s3.call(sock.recv, 65536)
        self.assertIn(b" 400 ", answer.split(b"\r\n", 1)[0])
        self.assertIn(b"EntityTooLarge", answer + await self._rest(sock))
        await self.assert_nothing_stored("huge")

    async def _rest(self, sock: socket.socket) -> bytes:
        def read() -> bytes:
            try:
                return sock.recv(65536)
            except OSError:
                return b""

        data: bytes = await self.s3.call(read)
        return data

    async def test_content_md5_base64(self) -> None:
        """Content-MD5 is checked against the whole body, also for a multi-stripe one."""
        data = os.urandom(3 * STRIPE)
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        put = await self.put("md5-big", data, ContentMD5=md5)
        self.assertEqual(put["ETag"], f'"{md5_hex(data)}"')
        self.assertEqual(zlib.crc32(data), zlib.crc32((await self.get("md5-big"))[1]))
