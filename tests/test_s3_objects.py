# -*- test-case-name: tests.test_s3_objects -*-
"""
PutObject, GetObject, HeadObject, DeleteObject and CopyObject through boto3
against an in-process node (L{tests.s3fixture}): real PostgreSQL, real shard
files, a real socket.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import zlib
from datetime import UTC, datetime, timedelta
from typing import Any

from twisted.internet.defer import gatherResults
from twisted.trial.unittest import TestCase

from tests.s3fixture import S3Stack

#: The fixture's stripe size (small, so modest objects span stripes).
STRIPE = 64 * 1024


def md5_hex(data: bytes) -> str:
    """@return: the hex MD5 of C{data} (a simple object's ETag)."""
    return hashlib.md5(data).hexdigest()


def metadata(response: dict[str, Any]) -> dict[str, str]:
    """
    The user metadata of a GetObject/HeadObject response, names lower-cased.

    botocore keeps the header name's case after C{x-amz-meta-}; the node
    sends them in lower case as S3 does (checked on the wire by
    L{MetadataNameTests}), and these helpers compare case-insensitively so
    that other tests do not depend on it.
    """
    return {name.lower(): value for name, value in response.get("Metadata", {}).items()}


def crc32_b64(data: bytes) -> str:
    """@return: the base64 CRC32 of C{data}, as S3 sends it."""
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


class ObjectTestCase(TestCase):
    """
    Base class: a stack, an app with full access, a client and a bucket.
    """

    bucket = "objects"

    async def setUp(self) -> None:
        """Start a stack and create the bucket."""
        self.s3 = await S3Stack.start(self)
        self.app = await self.s3.create_app("acme", "web")
        self.client = self.s3.client(self.app)
        await self.s3.call(self.client.create_bucket, Bucket=self.bucket)

    async def put(self, key: str, body: bytes, **kwargs: Any) -> dict[str, Any]:
        """PutObject in a thread."""
        result: dict[str, Any] = await self.s3.call(
            self.client.put_object, Bucket=self.bucket, Key=key, Body=body, **kwargs
        )
        return result

    async def get(self, key: str, **kwargs: Any) -> tuple[dict[str, Any], bytes]:
        """GetObject in a thread, reading the whole body there."""

        def run() -> tuple[dict[str, Any], bytes]:
            response = self.client.get_object(Bucket=self.bucket, Key=key, **kwargs)
            return response, response["Body"].read()

        result: tuple[dict[str, Any], bytes] = await self.s3.call(run)
        return result

    async def error(self, fn: Any, **kwargs: Any) -> tuple[int, str]:
        """Run a call that must fail; return (HTTP status, S3 code)."""
        e = await self.s3.client_error(fn, **kwargs)
        return e.response["ResponseMetadata"]["HTTPStatusCode"], e.response["Error"]["Code"]

    async def assert_absent(self, key: str) -> None:
        """Assert that HeadObject of C{key} is 404."""
        status, _ = await self.error(self.client.head_object, Bucket=self.bucket, Key=key)
        self.assertEqual(status, 404)


class PutGetTests(ObjectTestCase):
    """
    Storing and reading objects of every size class.
    """

    async def check_round_trip(self, size: int) -> None:
        """Put C{size} random bytes and read them back with their ETag."""
        data = os.urandom(size)
        key = f"size-{size}"
        put = await self.put(key, data)
        self.assertEqual(put["ETag"], f'"{md5_hex(data)}"')
        response, body = await self.get(key)
        self.assertEqual(body, data)
        self.assertEqual(response["ContentLength"], size)
        self.assertEqual(response["ETag"], f'"{md5_hex(data)}"')
        self.assertEqual(response["ContentType"], "binary/octet-stream")
        self.assertEqual(response["AcceptRanges"], "bytes")

    async def test_empty(self) -> None:
        """A zero-length object round-trips."""
        await self.check_round_trip(0)

    async def test_one_byte(self) -> None:
        """A one-byte object round-trips (stored inline)."""
        await self.check_round_trip(1)

    async def test_stripe_minus_one(self) -> None:
        """An object one byte short of a stripe round-trips."""
        await self.check_round_trip(STRIPE - 1)

    async def test_exact_stripe(self) -> None:
        """An object of exactly one stripe round-trips."""
        await self.check_round_trip(STRIPE)

    async def test_stripe_plus_one(self) -> None:
        """An object one byte over a stripe round-trips."""
        await self.check_round_trip(STRIPE + 1)

    async def test_several_mib(self) -> None:
        """A multi-MiB object spanning many stripes round-trips."""
        await self.check_round_trip(3 * 1024 * 1024 + 12345)

    async def test_overwrite(self) -> None:
        """A second PUT replaces the object whole."""
        await self.put("k", b"first version")
        await self.put("k", b"second")
        _, body = await self.get("k")
        self.assertEqual(body, b"second")

    async def test_identical_contents_deduplicated(self) -> None:
        """Two keys with the same bytes share one content with two references."""
        data = os.urandom(200 * 1024)
        await self.put("a", data)
        await self.put("b", data)
        rows = await self.s3.regional_db.run_query(
            "SELECT refcount FROM contents WHERE hash = %s", (hashlib.sha256(data).hexdigest(),)
        )
        self.assertEqual([tuple(r) for r in rows], [(2,)])
        for key in ("a", "b"):
            _, body = await self.get(key)
            self.assertEqual(body, data)

    async def test_identical_inline_contents_deduplicated(self) -> None:
        """Small (inline) contents are shared by reference too."""
        data = b"small and shared"
        await self.put("a", data)
        await self.put("b", data)
        rows = await self.s3.regional_db.run_query(
            "SELECT refcount FROM contents WHERE hash = %s", (hashlib.sha256(data).hexdigest(),)
        )
        self.assertEqual([tuple(r) for r in rows], [(2,)])
        await self.s3.call(self.client.delete_object, Bucket=self.bucket, Key="a")
        _, body = await self.get("b")
        self.assertEqual(body, data)

    async def test_metadata_round_trip(self) -> None:
        """Content headers and user metadata are stored and returned."""
        await self.put(
            "doc.txt",
            b"hello",
            ContentType="text/plain; charset=utf-8",
            ContentDisposition='attachment; filename="doc.txt"',
            ContentEncoding="identity",
            ContentLanguage="en-GB",
            CacheControl="max-age=3600",
            Expires=datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC),
            Metadata={"Colour": "blue", "words": "two words"},
        )
        head = await self.s3.call(self.client.head_object, Bucket=self.bucket, Key="doc.txt")
        self.assertEqual(head["ContentType"], "text/plain; charset=utf-8")
        self.assertEqual(head["ContentDisposition"], 'attachment; filename="doc.txt"')
        self.assertEqual(head["ContentEncoding"], "identity")
        self.assertEqual(head["ContentLanguage"], "en-GB")
        self.assertEqual(head["CacheControl"], "max-age=3600")
        self.assertEqual(head["Expires"], datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC))
        # S3 lower-cases metadata names.
        self.assertEqual(metadata(head), {"colour": "blue", "words": "two words"})
        self.assertEqual(head["ContentLength"], 5)

    async def test_non_ascii_metadata(self) -> None:
        """A UTF-8 metadata value is stored as text and returned RFC 2047 encoded, as S3 does."""
        path = f"/{self.bucket}/uni"
        value = "naïve ☃"
        headers = self.s3.signed_headers(
            self.app, "PUT", path, headers={"x-amz-meta-uni": value}, body=b"x"
        )
        # http.client sends str headers as ISO-8859-1: hand it the UTF-8 bytes.
        headers["x-amz-meta-uni"] = value.encode("utf-8").decode("latin-1")
        response = await self.s3.raw_request("PUT", path, headers, b"x")
        self.assertEqual(response.status, 200, response.body)
        head = await self.s3.call(self.client.head_object, Bucket=self.bucket, Key="uni")
        self.assertEqual(metadata(head), {"uni": "=?UTF-8?B?bmHDr3ZlIOKYgw==?="})

    async def test_metadata_too_large(self) -> None:
        """More than 2 KB of user metadata is MetadataTooLarge and nothing is stored."""
        status, code = await self.error(
            self.client.put_object,
            Bucket=self.bucket,
            Key="big-meta",
            Body=b"x",
            Metadata={"a": "v" * 2048},
        )
        self.assertEqual((status, code), (400, "MetadataTooLarge"))
        await self.assert_absent("big-meta")

    async def test_metadata_at_limit(self) -> None:
        """Exactly 2 KB of user metadata is accepted."""
        await self.put("meta-2k", b"x", Metadata={"a": "v" * 2047})
        head = await self.s3.call(self.client.head_object, Bucket=self.bucket, Key="meta-2k")
        self.assertEqual(len(metadata(head)["a"]), 2047)

    async def test_content_md5(self) -> None:
        """A correct Content-MD5 is accepted."""
        data = b"checked body"
        md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
        put = await self.put("md5", data, ContentMD5=md5)
        self.assertEqual(put["ETag"], f'"{md5_hex(data)}"')

    async def test_bad_content_md5(self) -> None:
        """A wrong Content-MD5 is BadDigest and nothing is stored."""
        wrong = base64.b64encode(hashlib.md5(b"other").digest()).decode()
        status, code = await self.error(
            self.client.put_object,
            Bucket=self.bucket,
            Key="bad-md5",
            Body=os.urandom(100_000),
            ContentMD5=wrong,
        )
        self.assertEqual((status, code), (400, "BadDigest"))
        await self.assert_absent("bad-md5")

    async def test_malformed_content_md5(self) -> None:
        """A Content-MD5 that is not a base64 MD5 is InvalidDigest."""
        status, code = await self.error(
            self.client.put_object, Bucket=self.bucket, Key="k", Body=b"x", ContentMD5="nope"
        )
        self.assertEqual((status, code), (400, "InvalidDigest"))

    async def test_missing_key(self) -> None:
        """GetObject of a missing key is NoSuchKey; HeadObject is a bare 404."""
        status, code = await self.error(self.client.get_object, Bucket=self.bucket, Key="nope")
        self.assertEqual((status, code), (404, "NoSuchKey"))
        status, _ = await self.error(self.client.head_object, Bucket=self.bucket, Key="nope")
        self.assertEqual(status, 404)

    async def test_missing_bucket(self) -> None:
        """Object operations on a missing bucket are NoSuchBucket."""
        status, code = await self.error(
            self.client.put_object, Bucket="no-such-bucket", Key="k", Body=b"x"
        )
        self.assertEqual((status, code), (404, "NoSuchBucket"))
        status, code = await self.error(self.client.get_object, Bucket="no-such-bucket", Key="k")
        self.assertEqual((status, code), (404, "NoSuchBucket"))

    async def test_version_id_null(self) -> None:
        """versionId=null names the current object of an unversioned bucket; others are invalid."""
        await self.put("v", b"data")
        _, body = await self.get("v", VersionId="null")
        self.assertEqual(body, b"data")
        status, code = await self.error(
            self.client.get_object, Bucket=self.bucket, Key="v", VersionId="3HL4kqtJlcpXroDTDmJ"
        )
        self.assertEqual((status, code), (400, "InvalidArgument"))


class ChecksumTests(ObjectTestCase):
    """
    x-amz-checksum-* on PutObject and their return on GET/HEAD.
    """

    async def test_each_algorithm(self) -> None:
        """Every supported algorithm is verified, stored and returned with checksum mode."""
        data = os.urandom(150_000)
        for algorithm in ("CRC32", "CRC32C", "SHA1", "SHA256", "CRC64NVME"):
            key = f"sum-{algorithm}"
            put = await self.put(key, data, ChecksumAlgorithm=algorithm)
            value = put[f"Checksum{algorithm}"]
            head = await self.s3.call(
                self.client.head_object, Bucket=self.bucket, Key=key, ChecksumMode="ENABLED"
            )
            self.assertEqual(head[f"Checksum{algorithm}"], value, algorithm)
            self.assertEqual(head["ChecksumType"], "FULL_OBJECT")
            response, body = await self.get(key, ChecksumMode="ENABLED")
            self.assertEqual(response[f"Checksum{algorithm}"], value)
            self.assertEqual(body, data)
        self.assertEqual(
            (
                await self.s3.call(
                    self.client.head_object,
                    Bucket=self.bucket,
                    Key="sum-CRC32",
                    ChecksumMode="ENABLED",
                )
            )["ChecksumCRC32"],
            crc32_b64(data),
        )

    async def test_not_returned_without_mode(self) -> None:
        """Checksums are only sent when the request enables checksum mode."""
        await self.put("sum", b"abc", ChecksumAlgorithm="SHA256")
        head = await self.s3.call(self.client.head_object, Bucket=self.bucket, Key="sum")
        self.assertNotIn("ChecksumSHA256", head)

    async def test_wrong_checksum(self) -> None:
        """A checksum that does not match the body is BadDigest and nothing is stored."""
        status, code = await self.error(
            self.client.put_object,
            Bucket=self.bucket,
            Key="bad-sum",
            Body=os.urandom(300_000),
            ChecksumCRC32=crc32_b64(b"something else"),
        )
        self.assertEqual((status, code), (400, "BadDigest"))
        await self.assert_absent("bad-sum")

    async def test_not_returned_for_ranges(self) -> None:
        """A range read carries no whole-object checksum."""
        await self.put("sum", b"abcdef", ChecksumAlgorithm="CRC32")
        response, body = await self.get("sum", Range="bytes=0-1", ChecksumMode="ENABLED")
        self.assertEqual(body, b"ab")
        self.assertNotIn("ChecksumCRC32", response)


class RangeTests(ObjectTestCase):
    """
    GetObject and HeadObject with Range.
    """

    data = bytes(range(256)) * 1024  # 256 KiB: four stripes

    async def setUp(self) -> None:
        """Store one multi-stripe object."""
        await super().setUp()
        await self.put("r", self.data)

    async def check(self, header: str, start: int, stop: int) -> None:
        """A Range selecting C{data[start:stop]} answers 206 with those bytes."""
        response, body = await self.get("r", Range=header)
        self.assertEqual(response["ResponseMetadata"]["HTTPStatusCode"], 206)
        self.assertEqual(body, self.data[start:stop])
        self.assertEqual(response["ContentRange"], f"bytes {start}-{stop - 1}/{len(self.data)}")
        self.assertEqual(response["ContentLength"], stop - start)

    async def test_first_byte(self) -> None:
        """bytes=0-0 is the first byte."""
        await self.check("bytes=0-0", 0, 1)

    async def test_across_stripes(self) -> None:
        """A range spanning a stripe boundary is exact."""
        await self.check(f"bytes={STRIPE - 10}-{2 * STRIPE + 9}", STRIPE - 10, 2 * STRIPE + 10)

    async def test_open_ended(self) -> None:
        """bytes=N- runs to the end."""
        await self.check("bytes=100000-", 100000, len(self.data))

    async def test_suffix(self) -> None:
        """bytes=-N is the last N bytes."""
        await self.check("bytes=-70000", len(self.data) - 70000, len(self.data))

    async def test_suffix_longer_than_object(self) -> None:
        """A suffix longer than the object is the whole object."""
        await self.check("bytes=-999999999", 0, len(self.data))

    async def test_end_clamped(self) -> None:
        """A last position beyond the end is clamped."""
        await self.check(f"bytes=5-{len(self.data) * 2}", 5, len(self.data))

    async def test_last_byte(self) -> None:
        """The last byte alone."""
        size = len(self.data)
        await self.check(f"bytes={size - 1}-{size - 1}", size - 1, size)

    async def test_unsatisfiable(self) -> None:
        """A range starting at the end is 416 InvalidRange with Content-Range bytes */size."""
        e = await self.s3.client_error(
            self.client.get_object, Bucket=self.bucket, Key="r", Range=f"bytes={len(self.data)}-"
        )
        self.assertEqual(e.response["ResponseMetadata"]["HTTPStatusCode"], 416)
        self.assertEqual(e.response["Error"]["Code"], "InvalidRange")
        self.assertEqual(
            e.response["ResponseMetadata"]["HTTPHeaders"]["content-range"],
            f"bytes */{len(self.data)}",
        )

    async def test_zero_suffix(self) -> None:
        """bytes=-0 is unsatisfiable."""
        status, code = await self.error(
            self.client.get_object, Bucket=self.bucket, Key="r", Range="bytes=-0"
        )
        self.assertEqual((status, code), (416, "InvalidRange"))

    async def test_invalid_ignored(self) -> None:
        """Syntactically invalid or multiple ranges are ignored: 200 with everything."""
        for header in ("bytes=5-1", "bytes=0-1,5-6", "items=0-1", "bytes=abc"):
            response, body = await self.get("r", Range=header)
            self.assertEqual(response["ResponseMetadata"]["HTTPStatusCode"], 200, header)
            self.assertEqual(body, self.data)

    async def test_head_range(self) -> None:
        """HeadObject with a range answers 206 with the range's length."""
        head = await self.s3.call(
            self.client.head_object, Bucket=self.bucket, Key="r", Range="bytes=10-19"
        )
        self.assertEqual(head["ResponseMetadata"]["HTTPStatusCode"], 206)
        self.assertEqual(head["ContentLength"], 10)
        self.assertEqual(head["ContentRange"], f"bytes 10-19/{len(self.data)}")

    async def test_empty_object_ranges(self) -> None:
        """On an empty object a suffix range returns it whole and bytes=0-0 is 416."""
        await self.put("empty", b"")
        response, body = await self.get("empty", Range="bytes=-5")
        self.assertEqual((response["ResponseMetadata"]["HTTPStatusCode"], body), (200, b""))
        status, code = await self.error(
            self.client.get_object, Bucket=self.bucket, Key="empty", Range="bytes=0-0"
        )
        self.assertEqual((status, code), (416, "InvalidRange"))

    async def test_part_number_of_simple_object(self) -> None:
        """partNumber=1 of a simple object is the whole object; 2 is InvalidPartNumber."""
        _, body = await self.get("r", PartNumber=1)
        self.assertEqual(body, self.data)
        status, code = await self.error(
            self.client.get_object, Bucket=self.bucket, Key="r", PartNumber=2
        )
        self.assertEqual((status, code), (416, "InvalidPartNumber"))

    async def test_part_number_and_range(self) -> None:
        """partNumber and Range together are refused."""
        status, code = await self.error(
            self.client.get_object, Bucket=self.bucket, Key="r", PartNumber=1, Range="bytes=0-1"
        )
        self.assertEqual((status, code), (400, "InvalidRequest"))


class ConditionalTests(ObjectTestCase):
    """
    If-Match, If-None-Match, If-Modified-Since and If-Unmodified-Since.
    """

    async def setUp(self) -> None:
        """Store one object and remember its validators."""
        await super().setUp()
        put = await self.put("c", b"conditional body")
        self.etag = put["ETag"]
        head = await self.s3.call(self.client.head_object, Bucket=self.bucket, Key="c")
        self.modified: datetime = head["LastModified"]

    async def status(self, method: str = "get_object", **conditions: Any) -> int:
        """The status of a conditional GET or HEAD (304/412 included)."""
        from botocore.exceptions import ClientError

        def run() -> int:
            try:
                response = getattr(self.client, method)(Bucket=self.bucket, Key="c", **conditions)
            except ClientError as e:
                return int(e.response["ResponseMetadata"]["HTTPStatusCode"])
            if "Body" in response:
                self.assertEqual(response["Body"].read(), b"conditional body")
            return int(response["ResponseMetadata"]["HTTPStatusCode"])

        result: int = await self.s3.call(run)
        return result

    async def test_if_match(self) -> None:
        """If-Match with the ETag (or *) passes; another ETag is 412."""
        self.assertEqual(await self.status(IfMatch=self.etag), 200)
        self.assertEqual(await self.status(IfMatch="*"), 200)
        self.assertEqual(await self.status(IfMatch='"0123"'), 412)
        self.assertEqual(await self.status("head_object", IfMatch='"0123"'), 412)

    async def test_if_none_match(self) -> None:
        """If-None-Match with the ETag is 304 for GET and HEAD; another ETag passes."""
        self.assertEqual(await self.status(IfNoneMatch=self.etag), 304)
        self.assertEqual(await self.status("head_object", IfNoneMatch=self.etag), 304)
        self.assertEqual(await self.status(IfNoneMatch='"0123"'), 200)

    async def test_if_modified_since(self) -> None:
        """Not modified since now is 304; modified since an hour ago is 200."""
        self.assertEqual(await self.status(IfModifiedSince=self.modified), 304)
        self.assertEqual(await self.status(IfModifiedSince=self.modified - timedelta(hours=1)), 200)

    async def test_if_unmodified_since(self) -> None:
        """Unmodified since an hour ago fails with 412; since its own time passes."""
        self.assertEqual(
            await self.status(IfUnmodifiedSince=self.modified - timedelta(hours=1)), 412
        )
        self.assertEqual(await self.status(IfUnmodifiedSince=self.modified), 200)

    async def test_documented_precedence(self) -> None:
        """If-Match true beats If-Unmodified-Since false; If-None-Match false beats If-Modified-Since true."""
        hour_ago = self.modified - timedelta(hours=1)
        self.assertEqual(await self.status(IfMatch=self.etag, IfUnmodifiedSince=hour_ago), 200)
        self.assertEqual(await self.status(IfNoneMatch=self.etag, IfModifiedSince=hour_ago), 304)

    async def test_304_headers(self) -> None:
        """A 304 carries the ETag and Last-Modified and no body."""
        response = await self.s3.raw_request(
            "GET",
            f"/{self.bucket}/c",
            self.s3.signed_headers(
                self.app, "GET", f"/{self.bucket}/c", headers={"If-None-Match": self.etag}
            ),
        )
        self.assertEqual(response.status, 304)
        self.assertEqual(response.headers["etag"], self.etag)
        self.assertIn("last-modified", response.headers)
        self.assertEqual(response.body, b"")

    async def test_conditional_put(self) -> None:
        """PutObject If-None-Match: * refuses to overwrite; If-Match needs the current ETag."""
        status, code = await self.error(
            self.client.put_object, Bucket=self.bucket, Key="c", Body=b"new", IfNoneMatch="*"
        )
        self.assertEqual((status, code), (412, "PreconditionFailed"))
        await self.put("fresh", b"new", IfNoneMatch="*")
        status, code = await self.error(
            self.client.put_object, Bucket=self.bucket, Key="c", Body=b"new", IfMatch='"0123"'
        )
        self.assertEqual((status, code), (412, "PreconditionFailed"))
        await self.put("c", b"replaced", IfMatch=self.etag)
        _, body = await self.get("c")
        self.assertEqual(body, b"replaced")


    async def test_racing_conditional_puts(self) -> None:
        """
        Of several PutObject If-None-Match: * of one new key at once exactly
        one succeeds and its body is the object; the others get 412.
        """
        from botocore.exceptions import ClientError

        bodies = [b"racer %d" % i for i in range(6)]

        def attempt(body: bytes) -> int:
            try:
                self.client.put_object(Bucket=self.bucket, Key="race", Body=body, IfNoneMatch="*")
            except ClientError as e:
                return int(e.response["ResponseMetadata"]["HTTPStatusCode"])
            return 200

        statuses = await gatherResults([self.s3.call(attempt, body) for body in bodies])
        self.assertEqual(sorted(statuses), [200] + [412] * 5)
        _, stored = await self.get("race")
        self.assertEqual(stored, bodies[statuses.index(200)])


class OverrideTests(ObjectTestCase):
    """
    response-* query parameters.
    """

    async def test_signed_overrides(self) -> None:
        """Every response-* parameter replaces its header on a signed GET."""
        await self.put("o", b"body", ContentType="text/plain")
        response, body = await self.get(
            "o",
            ResponseContentType="image/png",
            ResponseContentLanguage="fr",
            ResponseExpires=datetime(2031, 1, 1, tzinfo=UTC),
            ResponseCacheControl="no-store",
            ResponseContentDisposition="attachment; filename=x.png",
            ResponseContentEncoding="identity",
        )
        self.assertEqual(body, b"body")
        self.assertEqual(response["ContentType"], "image/png")
        self.assertEqual(response["ContentLanguage"], "fr")
        self.assertEqual(response["CacheControl"], "no-store")
        self.assertEqual(response["ContentDisposition"], "attachment; filename=x.png")
        self.assertEqual(response["ContentEncoding"], "identity")
        self.assertEqual(response["Expires"], datetime(2031, 1, 1, tzinfo=UTC))

    async def test_anonymous_refused(self) -> None:
        """An anonymous GET of a public object may not use overrides."""
        await self.put("o", b"body")
        await self.s3.service.buckets.set_public(self.bucket, True)
        anonymous = self.s3.client(None)
        _, body = await self.s3.call(
            lambda: (None, anonymous.get_object(Bucket=self.bucket, Key="o")["Body"].read())
        )
        self.assertEqual(body, b"body")
        e = await self.s3.client_error(
            anonymous.get_object, Bucket=self.bucket, Key="o", ResponseContentType="x/y"
        )
        self.assertEqual(e.response["Error"]["Code"], "InvalidRequest")


class DeleteTests(ObjectTestCase):
    """
    DeleteObject.
    """

    async def test_delete(self) -> None:
        """Deleting an object answers 204 and the key is gone."""
        await self.put("d", b"data")
        response = await self.s3.call(self.client.delete_object, Bucket=self.bucket, Key="d")
        self.assertEqual(response["ResponseMetadata"]["HTTPStatusCode"], 204)
        await self.assert_absent("d")

    async def test_delete_missing(self) -> None:
        """Deleting a missing key also answers 204."""
        response = await self.s3.call(self.client.delete_object, Bucket=self.bucket, Key="never")
        self.assertEqual(response["ResponseMetadata"]["HTTPStatusCode"], 204)

    async def test_delete_releases_reference(self) -> None:
        """Deleting the last object using a content drops its reference count to zero."""
        data = os.urandom(100_000)
        await self.put("d", data)
        await self.s3.call(self.client.delete_object, Bucket=self.bucket, Key="d")
        rows = await self.s3.regional_db.run_query(
            "SELECT refcount FROM contents WHERE hash = %s", (hashlib.sha256(data).hexdigest(),)
        )
        self.assertEqual([tuple(r) for r in rows], [(0,)])


class KeyTests(ObjectTestCase):
    """
    Keys of every shape S3 allows.
    """

    async def test_special_keys(self) -> None:
        """Spaces, '+', '%', unicode, '..', leading and trailing '/' are all distinct keys."""
        keys = [
            "with space",
            "plus+sign",
            "percent%20literal",
            "100%",
            "ünïcödé/日本語/🎉",
            "../dots/..",
            "/leading",
            "//double",
            "trailing/",
            "a?b&c=d#e",
            "tab\there",
            "~tilde*star'quote(paren)",
        ]
        for index, key in enumerate(keys):
            await self.put(key, f"body {index}".encode())
        for index, key in enumerate(keys):
            _, body = await self.get(key)
            self.assertEqual(body, f"body {index}".encode(), key)
        listed = await self.s3.call(self.client.list_objects_v2, Bucket=self.bucket)
        self.assertEqual(sorted(o["Key"] for o in listed["Contents"]), sorted(keys))

    async def test_longest_key(self) -> None:
        """A key of 1024 bytes works; 1025 is KeyTooLongError."""
        key = "k" * 1020 + "é" + "x" * 2  # 1024 bytes
        await self.put(key, b"long")
        _, body = await self.get(key)
        self.assertEqual(body, b"long")
        status, code = await self.error(
            self.client.put_object, Bucket=self.bucket, Key=key + "y", Body=b"x"
        )
        self.assertEqual((status, code), (400, "KeyTooLongError"))


class MetadataNameTests(ObjectTestCase):
    """
    How metadata header names look on the wire.
    """

    async def test_metadata_names_lower_case_on_the_wire(self) -> None:
        """x-amz-meta-* names are sent in lower case, as S3 sends them (SDKs keep the case)."""
        await self.put("named", b"x", Metadata={"colour": "blue"})
        path = f"/{self.bucket}/named"
        head = self.s3.signed_headers(self.app, "HEAD", path)
        port = self.s3.port.getHost().port

        def fetch() -> bytes:
            import socket

            with socket.create_connection(("127.0.0.1", port)) as sock:
                request = f"HEAD {path} HTTP/1.1\r\n" + "".join(
                    f"{k}: {v}\r\n" for k, v in head.items()
                )
                sock.sendall(request.encode() + b"Connection: close\r\n\r\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
                return data

        raw = await self.s3.call(fetch)
        self.assertIn(b"\r\nx-amz-meta-colour: blue\r\n", raw)


class CopyTests(ObjectTestCase):
    """
    CopyObject.
    """

    async def setUp(self) -> None:
        """Store a source object with metadata."""
        await super().setUp()
        self.data = os.urandom(200_000)
        put = await self.put(
            "src key+1",
            self.data,
            ContentType="text/csv",
            Metadata={"origin": "source"},
            CacheControl="no-cache",
        )
        self.etag = put["ETag"]

    async def copy(self, key: str, source_key: str = "src key+1", **kwargs: Any) -> dict[str, Any]:
        """CopyObject within the bucket."""
        result: dict[str, Any] = await self.s3.call(
            self.client.copy_object,
            Bucket=self.bucket,
            Key=key,
            CopySource={"Bucket": self.bucket, "Key": source_key},
            **kwargs,
        )
        return result

    async def test_copy_keeps_metadata(self) -> None:
        """The default COPY directive keeps the data, ETag and metadata."""
        result = await self.copy("dst")
        self.assertEqual(result["CopyObjectResult"]["ETag"], self.etag)
        response, body = await self.get("dst")
        self.assertEqual(body, self.data)
        self.assertEqual(response["ContentType"], "text/csv")
        self.assertEqual(metadata(response), {"origin": "source"})
        self.assertEqual(response["CacheControl"], "no-cache")
        self.assertEqual(response["ETag"], self.etag)

    async def test_copy_by_reference(self) -> None:
        """A copy takes a reference on the source's content instead of storing it again."""
        await self.copy("dst")
        rows = await self.s3.regional_db.run_query(
            "SELECT refcount FROM contents WHERE hash = %s",
            (hashlib.sha256(self.data).hexdigest(),),
        )
        self.assertEqual([tuple(r) for r in rows], [(2,)])
        await self.s3.call(self.client.delete_object, Bucket=self.bucket, Key="src key+1")
        _, body = await self.get("dst")
        self.assertEqual(body, self.data)

    async def test_replace_metadata(self) -> None:
        """REPLACE takes the metadata from the request."""
        await self.copy(
            "dst", MetadataDirective="REPLACE", ContentType="text/plain", Metadata={"new": "1"}
        )
        response, body = await self.get("dst")
        self.assertEqual(body, self.data)
        self.assertEqual(response["ContentType"], "text/plain")
        self.assertEqual(metadata(response), {"new": "1"})
        self.assertNotIn("CacheControl", response)

    async def test_copy_onto_itself(self) -> None:
        """Copying onto itself needs REPLACE (InvalidRequest otherwise)."""
        status, code = await self.error(
            self.client.copy_object,
            Bucket=self.bucket,
            Key="src key+1",
            CopySource={"Bucket": self.bucket, "Key": "src key+1"},
        )
        self.assertEqual((status, code), (400, "InvalidRequest"))
        await self.copy("src key+1", MetadataDirective="REPLACE", Metadata={"v": "2"})
        response, body = await self.get("src key+1")
        self.assertEqual((metadata(response), body), ({"v": "2"}, self.data))

    async def test_invalid_directive(self) -> None:
        """An unknown metadata directive is InvalidArgument."""
        response = await self.s3.raw_request(
            "PUT",
            f"/{self.bucket}/dst",
            self.s3.signed_headers(
                self.app,
                "PUT",
                f"/{self.bucket}/dst",
                headers={
                    "x-amz-copy-source": f"/{self.bucket}/src%20key%2B1",
                    "x-amz-metadata-directive": "MERGE",
                },
            ),
        )
        self.assertEqual(response.status, 400)
        self.assertIn(b"<Code>InvalidArgument</Code>", response.body)

    async def test_source_conditions(self) -> None:
        """x-amz-copy-source-if-* conditions that fail are 412 and nothing is copied."""
        hour_ago = datetime.now(UTC) - timedelta(hours=1)
        for conditions in (
            {"CopySourceIfMatch": '"0123"'},
            {"CopySourceIfNoneMatch": self.etag},
            {"CopySourceIfUnmodifiedSince": hour_ago},
            {"CopySourceIfModifiedSince": datetime.now(UTC) + timedelta(hours=1)},
        ):
            status, code = await self.error(
                self.client.copy_object,
                Bucket=self.bucket,
                Key="dst",
                CopySource={"Bucket": self.bucket, "Key": "src key+1"},
                **conditions,
            )
            self.assertEqual((status, code), (412, "PreconditionFailed"), conditions)
        await self.assert_absent("dst")
        await self.copy("dst", CopySourceIfMatch=self.etag, CopySourceIfModifiedSince=hour_ago)
        _, body = await self.get("dst")
        self.assertEqual(body, self.data)

    async def test_missing_source(self) -> None:
        """A missing source key is NoSuchKey; a missing source bucket NoSuchBucket."""
        status, code = await self.error(
            self.client.copy_object,
            Bucket=self.bucket,
            Key="dst",
            CopySource={"Bucket": self.bucket, "Key": "nope"},
        )
        self.assertEqual((status, code), (404, "NoSuchKey"))
        status, code = await self.error(
            self.client.copy_object,
            Bucket=self.bucket,
            Key="dst",
            CopySource={"Bucket": "no-such-bucket", "Key": "k"},
        )
        self.assertEqual((status, code), (404, "NoSuchBucket"))

    async def test_across_buckets(self) -> None:
        """A copy into another bucket of the tenant works."""
        await self.s3.call(self.client.create_bucket, Bucket="other")
        await self.s3.call(
            self.client.copy_object,
            Bucket="other",
            Key="copied",
            CopySource={"Bucket": self.bucket, "Key": "src key+1"},
        )
        body = await self.s3.call(
            lambda: self.client.get_object(Bucket="other", Key="copied")["Body"].read()
        )
        self.assertEqual(body, self.data)

    async def test_other_tenant_source(self) -> None:
        """Another tenant's object cannot be a copy source."""
        rival = await self.s3.create_app("rival", "thief")
        client = self.s3.client(rival)
        await self.s3.call(client.create_bucket, Bucket="rival-bucket")
        e = await self.s3.client_error(
            client.copy_object,
            Bucket="rival-bucket",
            Key="stolen",
            CopySource={"Bucket": self.bucket, "Key": "src key+1"},
        )
        self.assertIn(e.response["Error"]["Code"], ("AccessDenied", "NoSuchBucket"))

    async def test_source_read_permission(self) -> None:
        """The caller needs object:read on the source."""
        writer = await self.s3.create_app(
            "acme", "writer-only", policies=[("object:write", f"{self.bucket}/*")]
        )
        client = self.s3.client(writer)
        e = await self.s3.client_error(
            client.copy_object,
            Bucket=self.bucket,
            Key="dst",
            CopySource={"Bucket": self.bucket, "Key": "src key+1"},
        )
        self.assertEqual(e.response["Error"]["Code"], "AccessDenied")

    async def test_checksum_algorithm_on_copy(self) -> None:
        """A copy asking for another checksum algorithm gets it computed from the data."""
        await self.put("summed", self.data, ChecksumAlgorithm="SHA256")
        result = await self.copy("crc-copy", source_key="summed", ChecksumAlgorithm="CRC32")
        self.assertEqual(result["CopyObjectResult"]["ChecksumCRC32"], crc32_b64(self.data))
        head = await self.s3.call(
            self.client.head_object, Bucket=self.bucket, Key="crc-copy", ChecksumMode="ENABLED"
        )
        self.assertEqual(head["ChecksumCRC32"], crc32_b64(self.data))
        self.assertNotIn("ChecksumSHA256", head)

    async def test_checksum_copied(self) -> None:
        """A copy keeps the source's checksum."""
        put = await self.put("summed", b"abc", ChecksumAlgorithm="SHA256")
        await self.copy("summed-copy", source_key="summed")
        head = await self.s3.call(
            self.client.head_object, Bucket=self.bucket, Key="summed-copy", ChecksumMode="ENABLED"
        )
        self.assertEqual(head["ChecksumSHA256"], put["ChecksumSHA256"])


def _load_s3load() -> Any:
    """Import C{bench/s3load.py} (the bench directory is not a package)."""
    import importlib.util
    import sys

    name = "anvil_bench_s3load"
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(os.path.dirname(__file__), "..", "bench", "s3load.py")
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Dataclasses look their module up while the module runs.
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class S3LoadSmokeTests(ObjectTestCase):
    """
    Smoke test for C{bench/s3load.py}, so the load tool keeps working.
    """

    async def run_tool(self, *argv: str) -> tuple[int, list[str]]:
        """Run the tool against the stack in a thread; @return: status and lines."""
        s3load = _load_s3load()
        lines: list[str] = []
        arguments = [
            "--endpoint",
            self.s3.endpoint_url,
            "--access-key",
            self.app.client_id,
            "--secret-key",
            self.app.secret,
            "--bucket",
            "bench",
            *argv,
        ]
        status: int = await self.s3.call(s3load.main, arguments, lines.append)
        return status, lines

    async def test_put_get(self) -> None:
        """PUT and verified GET figures are printed, one line each, and the run succeeds."""
        status, lines = await self.run_tool(
            "--size", "100KiB", "--count", "6", "--concurrency", "3", "--rss-pid", str(os.getpid())
        )
        self.assertEqual(status, 0, lines)
        self.assertTrue(lines[0].startswith("put   6 objects x 100.0 KiB"), lines)
        self.assertIn("MB/s", lines[0])
        self.assertIn("ops/s", lines[0])
        self.assertIn("p99", lines[0])
        self.assertTrue(lines[1].startswith("get   6 objects"), lines)
        self.assertEqual(lines[2], "verify 6 of 6 GETs matched the SHA-256 written")
        self.assertTrue(lines[3].startswith(f"rss   pid {os.getpid()}"), lines)
        # The objects were deleted afterwards.
        listed = await self.s3.call(self.client.list_objects_v2, Bucket="bench")
        self.assertEqual(listed["KeyCount"], 0)

    async def test_cpu_per_request(self) -> None:
        """
        With C{--cpu}, each phase also prints the CPU time per request of the
        named processes (here this process, which serves the stack) and of
        the client's own.
        """
        status, lines = await self.run_tool(
            "--size", "4KiB", "--count", "20", "--concurrency", "2", "--cpu", f"node={os.getpid()}"
        )
        self.assertEqual(status, 0, lines)
        cpu = [line for line in lines if line.startswith("cpu ")]
        self.assertEqual([line.split()[1] for line in cpu], ["put", "get"], lines)
        for line in cpu:
            match = re.fullmatch(r"cpu   (put|get)   ms per request: client ([0-9.]+)  node ([0-9.]+)", line)
            self.assertIsNotNone(match, line)
            assert match is not None
            # The node here is this very process, which serves the
            # requests: it cannot have been idle.
            self.assertGreater(float(match.group(3)), 0)

    def test_cpu_group_parsing(self) -> None:
        """C{--cpu} takes NAME=PID[,PID...] and refuses anything else."""
        s3load = _load_s3load()
        self.assertEqual(s3load.parse_cpu_group("postgres=1,2,3"), ("postgres", [1, 2, 3]))
        for bad in ("node", "=12", "node=", "node=x"):
            with self.assertRaises(argparse.ArgumentTypeError):
                s3load.parse_cpu_group(bad)

    async def test_listing(self) -> None:
        """The listing benchmark fills the keys once and walks them with both clients."""
        status, lines = await self.run_tool("--list-keys", "30", "--list-repeat", "1")
        self.assertEqual(status, 0, lines)
        self.assertTrue(lines[0].startswith("fill  30 objects"), lines)
        self.assertEqual(len(lines), 3, lines)
        self.assertIn("30 keys  max-keys 1000  client boto3  1 pages", lines[1])
        self.assertIn("client http", lines[2])

    def test_sizes(self) -> None:
        """Sizes take binary and decimal units."""
        s3load = _load_s3load()
        self.assertEqual(s3load.parse_size("64MiB"), 64 * 1024 * 1024)
        self.assertEqual(s3load.parse_size("4KiB"), 4096)
        self.assertEqual(s3load.parse_size("2MB"), 2_000_000)
        self.assertEqual(s3load.parse_size("1GiB"), 1024**3)

    def test_body_stream(self) -> None:
        """Bodies are reproducible from their seed, differ between seeds and rewind."""
        s3load = _load_s3load()
        size = 3 * 1024 * 1024 + 5
        body = s3load.BodyStream(7, size)
        data = body.read(10) + body.read(100_000) + body.read()
        self.assertEqual(len(data), size)
        body.seek(0)
        self.assertEqual(body.read(), data)
        self.assertEqual(hashlib.sha256(data).hexdigest(), s3load.body_digest(7, size))
        self.assertNotEqual(s3load.BodyStream(8, size).read(), data)
