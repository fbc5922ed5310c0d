# -*- test-case-name: tests.test_s3_multipart -*-
"""
Multipart uploads through boto3 against an in-process node
(L{tests.s3fixture}): Create, UploadPart, UploadPartCopy, Complete, Abort,
ListParts, ListMultipartUploads, GetObject with partNumber, checksums and
every documented error.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zlib
from typing import Any

from anvil.s3.checksums import composite_checksum
from tests.test_s3_objects import ObjectTestCase, crc32_b64, md5_hex, metadata

MiB = 1024 * 1024
#: The smallest part size allowed for all parts but the last.
PART = 5 * MiB


def multipart_etag(parts: list[bytes]) -> str:
    """@return: the S3 ETag of an object made of C{parts}, quoted."""
    digests = b"".join(hashlib.md5(p).digest() for p in parts)
    return f'"{hashlib.md5(digests).hexdigest()}-{len(parts)}"'


class MultipartTestCase(ObjectTestCase):
    """
    Helpers for uploads.
    """

    bucket = "uploads"

    async def create(self, key: str, **kwargs: Any) -> str:
        """CreateMultipartUpload; @return: the upload id."""
        response = await self.s3.call(
            self.client.create_multipart_upload, Bucket=self.bucket, Key=key, **kwargs
        )
        self.assertEqual(response["Bucket"], self.bucket)
        self.assertEqual(response["Key"], key)
        upload_id: str = response["UploadId"]
        return upload_id

    async def upload(
        self, key: str, upload_id: str, number: int, body: bytes, **kwargs: Any
    ) -> str:
        """UploadPart; @return: the part's ETag."""
        response = await self.s3.call(
            self.client.upload_part,
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=body,
            **kwargs,
        )
        etag: str = response["ETag"]
        return etag

    async def complete(
        self, key: str, upload_id: str, parts: list[dict[str, Any]], **kwargs: Any
    ) -> dict[str, Any]:
        """CompleteMultipartUpload."""
        result: dict[str, Any] = await self.s3.call(
            self.client.complete_multipart_upload,
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
            **kwargs,
        )
        return result

    async def upload_all(
        self, key: str, bodies: list[bytes], **create: Any
    ) -> tuple[str, list[dict[str, Any]]]:
        """Create an upload and upload every body as parts 1..N."""
        upload_id = await self.create(key, **create)
        parts = []
        for number, body in enumerate(bodies, 1):
            etag = await self.upload(key, upload_id, number, body)
            self.assertEqual(etag, f'"{md5_hex(body)}"')
            parts.append({"PartNumber": number, "ETag": etag})
        return upload_id, parts


class CompleteTests(MultipartTestCase):
    """
    A full upload and what it leaves.
    """

    async def test_three_parts(self) -> None:
        """Three parts complete into one object with the md5-of-md5s ETag."""
        bodies = [os.urandom(PART), os.urandom(PART + 17), os.urandom(1234)]
        upload_id, parts = await self.upload_all(
            "big/object", bodies, ContentType="video/mp4", Metadata={"origin": "mp"}
        )
        result = await self.complete("big/object", upload_id, parts)
        self.assertEqual(result["ETag"], multipart_etag(bodies))
        self.assertEqual(result["Key"], "big/object")
        self.assertEqual(result["Bucket"], self.bucket)
        self.assertTrue(result["Location"].endswith(f"/{self.bucket}/big/object"))
        response, body = await self.get("big/object")
        self.assertEqual(body, b"".join(bodies))
        self.assertEqual(response["ETag"], multipart_etag(bodies))
        self.assertEqual(response["ContentType"], "video/mp4")
        self.assertEqual(metadata(response), {"origin": "mp"})
        self.assertEqual(response["ContentLength"], sum(map(len, bodies)))

    async def test_part_number_reads(self) -> None:
        """GetObject/HeadObject with partNumber serve that part with the parts count."""
        bodies = [os.urandom(PART), os.urandom(777)]
        upload_id, parts = await self.upload_all("pn", bodies)
        await self.complete("pn", upload_id, parts)
        for number, body in enumerate(bodies, 1):
            response, data = await self.get("pn", PartNumber=number)
            self.assertEqual(data, body)
            self.assertEqual(response["PartsCount"], 2)
            self.assertEqual(response["ResponseMetadata"]["HTTPStatusCode"], 206)
            start = sum(map(len, bodies[: number - 1]))
            self.assertEqual(
                response["ContentRange"],
                f"bytes {start}-{start + len(body) - 1}/{sum(map(len, bodies))}",
            )
        head = await self.s3.call(
            self.client.head_object, Bucket=self.bucket, Key="pn", PartNumber=2
        )
        self.assertEqual((head["ContentLength"], head["PartsCount"]), (777, 2))
        status, code = await self.error(
            self.client.get_object, Bucket=self.bucket, Key="pn", PartNumber=3
        )
        self.assertEqual((status, code), (416, "InvalidPartNumber"))

    async def test_range_across_parts(self) -> None:
        """A range spanning the boundary between two parts is exact."""
        bodies = [os.urandom(PART), os.urandom(1000)]
        upload_id, parts = await self.upload_all("span", bodies)
        await self.complete("span", upload_id, parts)
        whole = b"".join(bodies)
        _, data = await self.get("span", Range=f"bytes={PART - 100}-{PART + 99}")
        self.assertEqual(data, whole[PART - 100 : PART + 100])

    async def test_subset_of_parts(self) -> None:
        """Completing with a subset of the uploaded parts uses only those; gaps in numbers are fine."""
        bodies = {1: os.urandom(PART), 3: os.urandom(PART), 7: os.urandom(10)}
        upload_id = await self.create("subset")
        etags = {n: await self.upload("subset", upload_id, n, b) for n, b in bodies.items()}
        await self.complete(
            "subset",
            upload_id,
            [{"PartNumber": 1, "ETag": etags[1]}, {"PartNumber": 7, "ETag": etags[7]}],
        )
        _, data = await self.get("subset")
        self.assertEqual(data, bodies[1] + bodies[7])
        _, data = await self.get("subset", PartNumber=2)
        self.assertEqual(data, bodies[7])

    async def test_reupload_part(self) -> None:
        """Uploading a part number again replaces it."""
        upload_id = await self.create("again")
        await self.upload("again", upload_id, 1, b"old contents")
        etag = await self.upload("again", upload_id, 1, b"new")
        await self.complete("again", upload_id, [{"PartNumber": 1, "ETag": etag}])
        _, data = await self.get("again")
        self.assertEqual(data, b"new")

    async def test_single_small_part(self) -> None:
        """A single part may be smaller than 5 MiB (it is the last)."""
        upload_id, parts = await self.upload_all("one", [b"tiny"])
        result = await self.complete("one", upload_id, parts)
        self.assertEqual(result["ETag"], multipart_etag([b"tiny"]))

    async def test_empty_part(self) -> None:
        """A single empty part completes to an empty object."""
        upload_id, parts = await self.upload_all("empty", [b""])
        await self.complete("empty", upload_id, parts)
        response, data = await self.get("empty")
        self.assertEqual((data, response["ContentLength"]), (b"", 0))

    async def test_upload_removed_after_complete(self) -> None:
        """A completed upload is no longer listed."""
        upload_id, parts = await self.upload_all("gone", [b"x"])
        await self.complete("gone", upload_id, parts)
        listed = await self.s3.call(self.client.list_multipart_uploads, Bucket=self.bucket)
        self.assertEqual(listed.get("Uploads", []), [])

    async def test_replaces_existing_object(self) -> None:
        """Completing over an existing key replaces the object."""
        await self.put("replace", b"simple")
        upload_id, parts = await self.upload_all("replace", [b"multi"])
        await self.complete("replace", upload_id, parts)
        _, data = await self.get("replace")
        self.assertEqual(data, b"multi")

    async def test_delete_multipart_object(self) -> None:
        """Deleting a multipart object releases every part's content."""
        bodies = [os.urandom(PART), os.urandom(10)]
        upload_id, parts = await self.upload_all("del", bodies)
        await self.complete("del", upload_id, parts)
        await self.s3.call(self.client.delete_object, Bucket=self.bucket, Key="del")
        rows = await self.s3.regional_db.run_query(
            "SELECT hash, refcount FROM contents WHERE hash = ANY(%s)",
            ([hashlib.sha256(b).hexdigest() for b in bodies],),
        )
        self.assertEqual(sorted(r[1] for r in rows), [0, 0])


class CompleteErrorTests(MultipartTestCase):
    """
    CompleteMultipartUpload errors.
    """

    async def complete_error(
        self, key: str, upload_id: str, parts: list[dict[str, Any]]
    ) -> tuple[int, str]:
        """Complete, expecting an error."""
        return await self.error(
            self.client.complete_multipart_upload,
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
        )

    async def test_missing_part(self) -> None:
        """Listing a part that was never uploaded is InvalidPart."""
        upload_id, parts = await self.upload_all("missing", [os.urandom(PART), b"end"])
        parts.append({"PartNumber": 9, "ETag": parts[0]["ETag"]})
        self.assertEqual(
            await self.complete_error("missing", upload_id, parts), (400, "InvalidPart")
        )

    async def test_wrong_etag(self) -> None:
        """A part with another ETag is InvalidPart."""
        upload_id, parts = await self.upload_all("etag", [b"one"])
        parts[0]["ETag"] = '"00000000000000000000000000000000"'
        self.assertEqual(await self.complete_error("etag", upload_id, parts), (400, "InvalidPart"))

    async def test_reordered(self) -> None:
        """Parts not in ascending order are InvalidPartOrder."""
        upload_id, parts = await self.upload_all("order", [os.urandom(PART), b"end"])
        self.assertEqual(
            await self.complete_error("order", upload_id, list(reversed(parts))),
            (400, "InvalidPartOrder"),
        )

    async def test_duplicate_part_number(self) -> None:
        """A part listed twice is InvalidPartOrder."""
        upload_id, parts = await self.upload_all("dup", [os.urandom(PART)])
        self.assertEqual(
            await self.complete_error("dup", upload_id, parts + parts), (400, "InvalidPartOrder")
        )

    async def test_too_small(self) -> None:
        """A part under 5 MiB that is not the last is EntityTooSmall."""
        upload_id, parts = await self.upload_all("small", [b"tiny", b"end"])
        self.assertEqual(
            await self.complete_error("small", upload_id, parts), (400, "EntityTooSmall")
        )

    async def test_complete_twice(self) -> None:
        """Completing an upload a second time is NoSuchUpload."""
        upload_id, parts = await self.upload_all("twice", [b"x"])
        await self.complete("twice", upload_id, parts)
        self.assertEqual(
            await self.complete_error("twice", upload_id, parts), (404, "NoSuchUpload")
        )

    async def test_unknown_upload(self) -> None:
        """An unknown upload id is NoSuchUpload."""
        self.assertEqual(
            await self.complete_error("k", "no-such-upload", [{"PartNumber": 1, "ETag": '"x"'}]),
            (404, "NoSuchUpload"),
        )

    async def test_upload_of_other_key(self) -> None:
        """An upload id used with another key is NoSuchUpload."""
        upload_id, parts = await self.upload_all("right", [b"x"])
        self.assertEqual(
            await self.complete_error("wrong", upload_id, parts), (404, "NoSuchUpload")
        )

    async def test_malformed_xml(self) -> None:
        """A body that is not the CompleteMultipartUpload document is MalformedXML."""
        upload_id = await self.create("xml")
        path = f"/{self.bucket}/xml"
        for body in (
            b"not xml",
            b"<CompleteMultipartUpload></CompleteMultipartUpload>",
            b"<Other/>",
        ):
            response = await self.s3.raw_request(
                "POST",
                f"{path}?uploadId={upload_id}",
                self.s3.signed_headers(
                    self.app, "POST", path, query=f"uploadId={upload_id}", body=body
                ),
                body,
            )
            self.assertEqual(response.status, 400, body)
            self.assertIn(b"<Code>MalformedXML</Code>", response.body)

    async def test_failed_complete_keeps_upload(self) -> None:
        """After a refused Complete the upload still exists and can be completed."""
        upload_id, parts = await self.upload_all("retry", [b"tiny", b"end"])
        await self.complete_error("retry", upload_id, parts)
        await self.complete("retry", upload_id, parts[1:])
        _, data = await self.get("retry")
        self.assertEqual(data, b"end")


class ConditionalCompleteTests(MultipartTestCase):
    """
    Conditional writes on CompleteMultipartUpload.
    """

    async def test_if_none_match(self) -> None:
        """If-None-Match: * refuses to complete over an existing key; the upload remains."""
        await self.put("taken", b"first")
        upload_id, parts = await self.upload_all("taken", [b"second"])
        status, code = await self.error(
            self.client.complete_multipart_upload,
            Bucket=self.bucket,
            Key="taken",
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
            IfNoneMatch="*",
        )
        self.assertEqual((status, code), (412, "PreconditionFailed"))
        _, data = await self.get("taken")
        self.assertEqual(data, b"first")
        await self.complete("taken", upload_id, parts)
        _, data = await self.get("taken")
        self.assertEqual(data, b"second")

    async def test_if_match(self) -> None:
        """If-Match must name the current object's ETag."""
        put = await self.put("guarded", b"v1")
        upload_id, parts = await self.upload_all("guarded", [b"v2"])
        status, code = await self.error(
            self.client.complete_multipart_upload,
            Bucket=self.bucket,
            Key="guarded",
            UploadId=upload_id,
            MultipartUpload={"Parts": parts},
            IfMatch='"0123"',
        )
        self.assertEqual((status, code), (412, "PreconditionFailed"))
        await self.complete("guarded", upload_id, parts, IfMatch=put["ETag"])
        _, data = await self.get("guarded")
        self.assertEqual(data, b"v2")


class AbortTests(MultipartTestCase):
    """
    AbortMultipartUpload.
    """

    async def test_abort(self) -> None:
        """Abort answers 204; the upload then is NoSuchUpload for parts and listing."""
        upload_id, _ = await self.upload_all("ab", [b"data"])
        response = await self.s3.call(
            self.client.abort_multipart_upload, Bucket=self.bucket, Key="ab", UploadId=upload_id
        )
        self.assertEqual(response["ResponseMetadata"]["HTTPStatusCode"], 204)
        status, code = await self.error(
            self.client.upload_part,
            Bucket=self.bucket,
            Key="ab",
            UploadId=upload_id,
            PartNumber=2,
            Body=b"late",
        )
        self.assertEqual((status, code), (404, "NoSuchUpload"))
        status, code = await self.error(
            self.client.list_parts, Bucket=self.bucket, Key="ab", UploadId=upload_id
        )
        self.assertEqual((status, code), (404, "NoSuchUpload"))
        await self.assert_absent("ab")

    async def test_abort_unknown(self) -> None:
        """Aborting an unknown upload is NoSuchUpload."""
        status, code = await self.error(
            self.client.abort_multipart_upload, Bucket=self.bucket, Key="k", UploadId="nope"
        )
        self.assertEqual((status, code), (404, "NoSuchUpload"))

    async def test_abort_releases_parts(self) -> None:
        """Aborting releases the parts' content references."""
        body = os.urandom(100_000)
        upload_id, _ = await self.upload_all("release", [body])
        await self.s3.call(
            self.client.abort_multipart_upload,
            Bucket=self.bucket,
            Key="release",
            UploadId=upload_id,
        )
        rows = await self.s3.regional_db.run_query(
            "SELECT refcount FROM contents WHERE hash = %s", (hashlib.sha256(body).hexdigest(),)
        )
        self.assertEqual([tuple(r) for r in rows], [(0,)])


class UploadPartTests(MultipartTestCase):
    """
    UploadPart validation.
    """

    async def test_invalid_part_numbers(self) -> None:
        """Part numbers outside 1..10000 are InvalidArgument."""
        upload_id = await self.create("numbers")
        for number in ("0", "10001", "-1", "x"):
            path = f"/{self.bucket}/numbers"
            query = f"partNumber={number}&uploadId={upload_id}"
            response = await self.s3.raw_request(
                "PUT",
                f"{path}?{query}",
                self.s3.signed_headers(self.app, "PUT", path, query=query, body=b"x"),
                b"x",
            )
            self.assertEqual(response.status, 400, number)
            self.assertIn(b"<Code>InvalidArgument</Code>", response.body)

    async def test_part_bad_md5(self) -> None:
        """A part whose Content-MD5 is wrong is BadDigest and is not recorded."""
        upload_id = await self.create("badmd5")
        status, code = await self.error(
            self.client.upload_part,
            Bucket=self.bucket,
            Key="badmd5",
            UploadId=upload_id,
            PartNumber=1,
            Body=b"data",
            ContentMD5=base64.b64encode(hashlib.md5(b"other").digest()).decode(),
        )
        self.assertEqual((status, code), (400, "BadDigest"))
        listed = await self.s3.call(
            self.client.list_parts, Bucket=self.bucket, Key="badmd5", UploadId=upload_id
        )
        self.assertEqual(listed.get("Parts", []), [])


class ListTests(MultipartTestCase):
    """
    ListParts and ListMultipartUploads.
    """

    async def test_list_parts_paging(self) -> None:
        """ListParts pages with max-parts and part-number-marker."""
        upload_id = await self.create("paged")
        bodies = {n: f"part {n}".encode() for n in (1, 2, 3, 5, 8)}
        for number, body in bodies.items():
            await self.upload("paged", upload_id, number, body)
        seen = []
        marker = 0
        pages = 0
        while True:
            page = await self.s3.call(
                self.client.list_parts,
                Bucket=self.bucket,
                Key="paged",
                UploadId=upload_id,
                MaxParts=2,
                PartNumberMarker=marker,
            )
            pages += 1
            self.assertEqual(page["MaxParts"], 2)
            self.assertEqual(page["PartNumberMarker"], marker)
            for part in page["Parts"]:
                seen.append(part["PartNumber"])
                self.assertEqual(part["ETag"], f'"{md5_hex(bodies[part["PartNumber"]])}"')
                self.assertEqual(part["Size"], len(bodies[part["PartNumber"]]))
            if not page["IsTruncated"]:
                break
            marker = page["NextPartNumberMarker"]
        self.assertEqual(seen, [1, 2, 3, 5, 8])
        self.assertEqual(pages, 3)
        whole = await self.s3.call(
            self.client.list_parts, Bucket=self.bucket, Key="paged", UploadId=upload_id
        )
        self.assertEqual(len(whole["Parts"]), 5)
        self.assertFalse(whole["IsTruncated"])
        self.assertEqual(whole["StorageClass"], "STANDARD")
        self.assertIn("ID", whole["Owner"])
        self.assertIn("ID", whole["Initiator"])

    async def test_list_uploads(self) -> None:
        """ListMultipartUploads lists uploads by key, with prefix, delimiter and paging."""
        ids = {}
        for key in ("a/1", "a/2", "b/1", "c"):
            ids[key] = await self.create(key)
        second = await self.create("a/1")
        listed = await self.s3.call(self.client.list_multipart_uploads, Bucket=self.bucket)
        self.assertEqual(
            [(u["Key"], u["UploadId"]) for u in listed["Uploads"]],
            sorted([(k, v) for k, v in ids.items()] + [("a/1", second)]),
        )
        self.assertFalse(listed["IsTruncated"])

        grouped = await self.s3.call(
            self.client.list_multipart_uploads, Bucket=self.bucket, Delimiter="/"
        )
        self.assertEqual([p["Prefix"] for p in grouped["CommonPrefixes"]], ["a/", "b/"])
        self.assertEqual([u["Key"] for u in grouped["Uploads"]], ["c"])

        prefixed = await self.s3.call(
            self.client.list_multipart_uploads, Bucket=self.bucket, Prefix="a/"
        )
        self.assertEqual(sorted(u["Key"] for u in prefixed["Uploads"]), ["a/1", "a/1", "a/2"])

        seen = []
        kwargs: dict[str, Any] = {}
        while True:
            page = await self.s3.call(
                self.client.list_multipart_uploads, Bucket=self.bucket, MaxUploads=2, **kwargs
            )
            seen += [(u["Key"], u["UploadId"]) for u in page.get("Uploads", [])]
            if not page["IsTruncated"]:
                break
            kwargs = {
                "KeyMarker": page["NextKeyMarker"],
                "UploadIdMarker": page["NextUploadIdMarker"],
            }
        self.assertEqual(seen, [(u["Key"], u["UploadId"]) for u in listed["Uploads"]])


class ListEncodingTests(MultipartTestCase):
    """
    ListMultipartUploads with encoding-type=url.
    """

    async def test_url_encoding(self) -> None:
        """Keys and prefixes are percent-encoded when encoding-type=url is asked for."""
        await self.create("dir one/a b+c%é")
        listed = await self.s3.call(
            self.client.list_multipart_uploads, Bucket=self.bucket, EncodingType="url"
        )
        self.assertEqual([u["Key"] for u in listed["Uploads"]], ["dir%20one/a%20b%2Bc%25%C3%A9"])
        self.assertEqual(listed["EncodingType"], "url")
        grouped = await self.s3.call(
            self.client.list_multipart_uploads,
            Bucket=self.bucket,
            Delimiter="/",
            EncodingType="url",
        )
        self.assertEqual([p["Prefix"] for p in grouped["CommonPrefixes"]], ["dir%20one/"])
        plain = await self.s3.call(self.client.list_multipart_uploads, Bucket=self.bucket)
        self.assertEqual([u["Key"] for u in plain["Uploads"]], ["dir one/a b+c%é"])

    async def test_invalid_encoding(self) -> None:
        """An unknown encoding-type is InvalidArgument."""
        path = f"/{self.bucket}"
        query = "encoding-type=base64&uploads="
        response = await self.s3.raw_request(
            "GET", f"{path}?{query}", self.s3.signed_headers(self.app, "GET", path, query=query)
        )
        self.assertEqual(response.status, 400)
        self.assertIn(b"<Code>InvalidArgument</Code>", response.body)


class UploadPartCopyTests(MultipartTestCase):
    """
    UploadPartCopy.
    """

    async def test_copy_whole_and_ranges(self) -> None:
        """Parts copied whole and by range assemble into the expected object."""
        source = os.urandom(PART + 50_000)
        await self.put("source", source)
        upload_id = await self.create("assembled")
        whole = await self.s3.call(
            self.client.upload_part_copy,
            Bucket=self.bucket,
            Key="assembled",
            UploadId=upload_id,
            PartNumber=1,
            CopySource={"Bucket": self.bucket, "Key": "source"},
        )
        self.assertEqual(whole["CopyPartResult"]["ETag"], f'"{md5_hex(source)}"')
        ranged = await self.s3.call(
            self.client.upload_part_copy,
            Bucket=self.bucket,
            Key="assembled",
            UploadId=upload_id,
            PartNumber=2,
            CopySource={"Bucket": self.bucket, "Key": "source"},
            CopySourceRange="bytes=100-70099",
        )
        piece = source[100:70100]
        self.assertEqual(ranged["CopyPartResult"]["ETag"], f'"{md5_hex(piece)}"')
        await self.complete(
            "assembled",
            upload_id,
            [
                {"PartNumber": 1, "ETag": whole["CopyPartResult"]["ETag"]},
                {"PartNumber": 2, "ETag": ranged["CopyPartResult"]["ETag"]},
            ],
        )
        _, data = await self.get("assembled")
        self.assertEqual(data, source + piece)

    async def test_copy_range_of_multipart_source(self) -> None:
        """A range spanning two parts of a multipart source is copied exactly."""
        bodies = [os.urandom(PART), os.urandom(30_000)]
        upload_id, parts = await self.upload_all("mp-source", bodies)
        await self.complete("mp-source", upload_id, parts)
        whole = b"".join(bodies)
        target = await self.create("from-mp")
        result = await self.s3.call(
            self.client.upload_part_copy,
            Bucket=self.bucket,
            Key="from-mp",
            UploadId=target,
            PartNumber=1,
            CopySource={"Bucket": self.bucket, "Key": "mp-source"},
            CopySourceRange=f"bytes={PART - 1000}-{PART + 999}",
        )
        await self.complete(
            "from-mp", target, [{"PartNumber": 1, "ETag": result["CopyPartResult"]["ETag"]}]
        )
        _, data = await self.get("from-mp")
        self.assertEqual(data, whole[PART - 1000 : PART + 1000])

    async def test_invalid_ranges(self) -> None:
        """Ranges outside the source are InvalidRange; malformed ones InvalidArgument."""
        await self.put("small-source", b"0123456789")
        upload_id = await self.create("bad-range")
        for value, expected in (
            ("bytes=0-10", "InvalidRange"),
            ("bytes=5-4", "InvalidRange"),
            ("bytes=3-", "InvalidArgument"),
            ("bytes=-3", "InvalidArgument"),
        ):
            e = await self.s3.client_error(
                self.client.upload_part_copy,
                Bucket=self.bucket,
                Key="bad-range",
                UploadId=upload_id,
                PartNumber=1,
                CopySource={"Bucket": self.bucket, "Key": "small-source"},
                CopySourceRange=value,
            )
            self.assertEqual(e.response["Error"]["Code"], expected, value)

    async def test_copy_source_conditions(self) -> None:
        """A failing x-amz-copy-source-if-match is 412."""
        await self.put("cond-source", b"abc")
        upload_id = await self.create("cond")
        status, code = await self.error(
            self.client.upload_part_copy,
            Bucket=self.bucket,
            Key="cond",
            UploadId=upload_id,
            PartNumber=1,
            CopySource={"Bucket": self.bucket, "Key": "cond-source"},
            CopySourceIfMatch='"0123"',
        )
        self.assertEqual((status, code), (412, "PreconditionFailed"))


class ChecksumTests(MultipartTestCase):
    """
    Checksums of multipart uploads.
    """

    async def test_composite_crc32(self) -> None:
        """A CRC32 upload gets a COMPOSITE checksum of the part CRCs, -N."""
        bodies = [os.urandom(PART), os.urandom(1000)]
        upload_id = await self.create("crc", ChecksumAlgorithm="CRC32")
        parts = []
        for number, body in enumerate(bodies, 1):
            response = await self.s3.call(
                self.client.upload_part,
                Bucket=self.bucket,
                Key="crc",
                UploadId=upload_id,
                PartNumber=number,
                Body=body,
                ChecksumAlgorithm="CRC32",
            )
            self.assertEqual(response["ChecksumCRC32"], crc32_b64(body))
            parts.append(
                {"PartNumber": number, "ETag": response["ETag"], "ChecksumCRC32": crc32_b64(body)}
            )
        result = await self.complete("crc", upload_id, parts)
        expected = composite_checksum("CRC32", [crc32_b64(b) for b in bodies])
        self.assertEqual(result["ChecksumCRC32"], expected)
        self.assertEqual(result["ChecksumType"], "COMPOSITE")
        head = await self.s3.call(
            self.client.head_object, Bucket=self.bucket, Key="crc", ChecksumMode="ENABLED"
        )
        self.assertEqual(head["ChecksumCRC32"], expected)

    async def test_full_object_crc32(self) -> None:
        """A FULL_OBJECT CRC32 upload gets the CRC32 of the whole object."""
        bodies = [os.urandom(PART), os.urandom(999)]
        upload_id = await self.create("full", ChecksumAlgorithm="CRC32", ChecksumType="FULL_OBJECT")
        parts = []
        for number, body in enumerate(bodies, 1):
            etag = await self.upload("full", upload_id, number, body, ChecksumAlgorithm="CRC32")
            parts.append({"PartNumber": number, "ETag": etag})
        result = await self.complete("full", upload_id, parts)
        whole = b"".join(bodies)
        self.assertEqual(
            result["ChecksumCRC32"],
            base64.b64encode(zlib.crc32(whole).to_bytes(4, "big")).decode(),
        )
        self.assertEqual(result["ChecksumType"], "FULL_OBJECT")

    async def test_full_object_checksum_read_back(self) -> None:
        """A FULL_OBJECT CRC32 multipart object is read back and validated by botocore."""
        bodies = [os.urandom(PART), os.urandom(4321)]
        upload_id = await self.create(
            "validated", ChecksumAlgorithm="CRC32", ChecksumType="FULL_OBJECT"
        )
        parts = []
        for number, body in enumerate(bodies, 1):
            etag = await self.upload(
                "validated", upload_id, number, body, ChecksumAlgorithm="CRC32"
            )
            parts.append({"PartNumber": number, "ETag": etag})
        await self.complete("validated", upload_id, parts)
        response, data = await self.get("validated", ChecksumMode="ENABLED")
        self.assertEqual(data, b"".join(bodies))
        self.assertEqual(response["ChecksumCRC32"], crc32_b64(data))
        self.assertEqual(response["ChecksumType"], "FULL_OBJECT")

    async def test_complete_with_whole_checksum(self) -> None:
        """A whole-object checksum sent with Complete must match the computed one."""
        bodies = [os.urandom(PART), os.urandom(10)]
        whole = b"".join(bodies)
        for key, value, expected in (
            ("right", crc32_b64(whole), None),
            ("wrong", crc32_b64(b"other"), "BadDigest"),
        ):
            upload_id = await self.create(
                key, ChecksumAlgorithm="CRC32", ChecksumType="FULL_OBJECT"
            )
            parts = []
            for number, body in enumerate(bodies, 1):
                etag = await self.upload(key, upload_id, number, body, ChecksumAlgorithm="CRC32")
                parts.append({"PartNumber": number, "ETag": etag})
            if expected is None:
                result = await self.complete(key, upload_id, parts, ChecksumCRC32=value)
                self.assertEqual(result["ChecksumCRC32"], value)
            else:
                status, code = await self.error(
                    self.client.complete_multipart_upload,
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    ChecksumCRC32=value,
                )
                self.assertEqual((status, code), (400, expected))
                await self.assert_absent(key)

    async def test_part_checksum_computed(self) -> None:
        """Parts of a checksummed upload sent without a checksum get one computed."""
        upload_id = await self.create("computed", ChecksumAlgorithm="SHA256")
        plain = self.s3.client(self.app, request_checksum_calculation="when_required")
        await self.s3.call(
            plain.upload_part,
            Bucket=self.bucket,
            Key="computed",
            UploadId=upload_id,
            PartNumber=1,
            Body=b"no checksum sent",
        )
        listed = await self.s3.call(
            self.client.list_parts, Bucket=self.bucket, Key="computed", UploadId=upload_id
        )
        self.assertEqual(
            listed["Parts"][0]["ChecksumSHA256"],
            base64.b64encode(hashlib.sha256(b"no checksum sent").digest()).decode(),
        )
        self.assertEqual(listed["ChecksumAlgorithm"], "SHA256")

    async def test_part_with_other_algorithm(self) -> None:
        """A part declaring another algorithm than the upload's is InvalidRequest."""
        upload_id = await self.create("other-alg", ChecksumAlgorithm="SHA256")
        status, code = await self.error(
            self.client.upload_part,
            Bucket=self.bucket,
            Key="other-alg",
            UploadId=upload_id,
            PartNumber=1,
            Body=b"data",
            ChecksumAlgorithm="CRC32",
        )
        self.assertEqual((status, code), (400, "InvalidRequest"))

    async def test_mismatched_part_checksum_in_complete(self) -> None:
        """A part checksum in the Complete document that differs from the stored one is InvalidPart."""
        upload_id = await self.create("mismatch", ChecksumAlgorithm="CRC32")
        etag = await self.upload("mismatch", upload_id, 1, b"abc", ChecksumAlgorithm="CRC32")
        status, code = await self.error(
            self.client.complete_multipart_upload,
            Bucket=self.bucket,
            Key="mismatch",
            UploadId=upload_id,
            MultipartUpload={
                "Parts": [{"PartNumber": 1, "ETag": etag, "ChecksumCRC32": crc32_b64(b"xyz")}]
            },
        )
        self.assertEqual((status, code), (400, "InvalidPart"))

    async def test_invalid_checksum_type(self) -> None:
        """FULL_OBJECT with SHA256 is refused at creation."""
        status, code = await self.error(
            self.client.create_multipart_upload,
            Bucket=self.bucket,
            Key="bad",
            ChecksumAlgorithm="SHA256",
            ChecksumType="FULL_OBJECT",
        )
        self.assertEqual((status, code), (400, "InvalidRequest"))
