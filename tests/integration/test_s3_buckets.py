# -*- test-case-name: tests.integration.test_s3_buckets -*-
"""
Bucket-level S3 operations, authentication and authorisation, driven by
boto3 (and by raw signed HTTP where boto3 refuses to send what a test
needs) against an in-process S3 node on a real PostgreSQL
(L{tests.s3fixture}).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import time
import xml.etree.ElementTree as ET
from typing import Any, ClassVar
from urllib.parse import quote

import botocore.auth
import botocore.crt.auth
from botocore.exceptions import ClientError
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from tests.s3fixture import AppCredentials, RawResponse, S3Stack, sign_request
from tests.test_metrics import requests_total

NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def code(error: ClientError) -> str:
    """The S3 error code of a boto3 error."""
    return str(error.response["Error"]["Code"])


def status(error: ClientError) -> int:
    """The HTTP status of a boto3 error."""
    return int(error.response["ResponseMetadata"]["HTTPStatusCode"])


def xml(response: RawResponse) -> ET.Element:
    """Parse a raw response body."""
    return ET.fromstring(response.body)


def md5_header(body: bytes) -> str:
    """A Content-MD5 value."""
    return base64.b64encode(hashlib.md5(body).digest()).decode()


class _Base(TestCase):
    """
    One stack and one app with full rights in tenant C{acme}.
    """

    stack_options: ClassVar[dict[str, Any]] = {}

    async def setUp(self) -> None:
        self.s3 = await S3Stack.start(self, **self.stack_options)
        self.app = await self.s3.create_app("acme", "web")
        self.client = self.s3.client(self.app)

    async def raw(
        self,
        method: str,
        path: str,
        query: str = "",
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        app: AppCredentials | None = None,
        host: str | None = None,
    ) -> RawResponse:
        """
        Send a raw request signed for C{app} (default: the full-rights app).
        """
        app = app or self.app
        port = self.s3.port.getHost().port
        signed = sign_request(
            app.client_id,
            app.secret,
            method,
            host or f"127.0.0.1:{port}",
            path,
            query,
            headers or {},
            body,
        )
        target = path + (f"?{query}" if query else "")
        return await self.s3.raw_request(method, target, signed, body)

    def client_clock(self, offset: float) -> None:
        """
        Make botocore sign as if its clock were C{offset} seconds off (both
        its Python and its CRT signers), for the rest of the test.
        """
        moment = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=offset)

        def now(remove_tzinfo: bool = True) -> dt.datetime:
            return moment.replace(tzinfo=None) if remove_tzinfo else moment

        self.patch(botocore.auth, "get_current_datetime", now)
        self.patch(botocore.crt.auth, "get_current_datetime", now)

    async def create(self, bucket: str, client: Any = None) -> None:
        """Create a bucket."""
        await self.s3.call((client or self.client).create_bucket, Bucket=bucket)


class BucketTests(_Base):
    """
    CreateBucket, HeadBucket, ListBuckets, GetBucketLocation, DeleteBucket.
    """

    async def test_lifecycle(self) -> None:
        """
        A bucket is created, seen, located and deleted.
        """
        created = await self.s3.call(self.client.create_bucket, Bucket="photos")
        self.assertEqual(created["Location"], "/photos")
        head = await self.s3.call(self.client.head_bucket, Bucket="photos")
        self.assertEqual(head["ResponseMetadata"]["HTTPHeaders"]["x-amz-bucket-region"], "us-east-1")
        listing = await self.s3.call(self.client.list_buckets)
        self.assertEqual([b["Name"] for b in listing["Buckets"]], ["photos"])
        self.assertEqual(listing["Owner"]["DisplayName"], "acme")
        self.assertEqual(listing["Buckets"][0]["BucketRegion"], "us-east-1")
        self.assertLess(
            abs(listing["Buckets"][0]["CreationDate"].timestamp() - time.time()), 60
        )
        location = await self.s3.call(self.client.get_bucket_location, Bucket="photos")
        self.assertIsNone(location["LocationConstraint"])
        deleted = await self.s3.call(self.client.delete_bucket, Bucket="photos")
        self.assertEqual(deleted["ResponseMetadata"]["HTTPStatusCode"], 204)
        error = await self.s3.client_error(self.client.head_bucket, Bucket="photos")
        self.assertEqual(status(error), 404)
        listing = await self.s3.call(self.client.list_buckets)
        self.assertEqual(listing["Buckets"], [])
        self.assertEqual(requests_total(self.s3.metrics, "s3", "CreateBucket", "2xx"), 1)
        self.assertEqual(requests_total(self.s3.metrics, "s3", "HeadBucket", "4xx"), 1)

    async def test_list_buckets_sorted_and_paged(self) -> None:
        """
        ListBuckets is sorted by name and honours prefix, max-buckets and
        continuation tokens.
        """
        for name in ("c-bucket", "a-bucket", "b-bucket", "a-other"):
            await self.create(name)
        listing = await self.s3.call(self.client.list_buckets)
        self.assertEqual(
            [b["Name"] for b in listing["Buckets"]], ["a-bucket", "a-other", "b-bucket", "c-bucket"]
        )
        page = await self.s3.call(self.client.list_buckets, MaxBuckets=2)
        self.assertEqual([b["Name"] for b in page["Buckets"]], ["a-bucket", "a-other"])
        rest = await self.s3.call(
            self.client.list_buckets, MaxBuckets=2, ContinuationToken=page["ContinuationToken"]
        )
        self.assertEqual([b["Name"] for b in rest["Buckets"]], ["b-bucket", "c-bucket"])
        self.assertNotIn("ContinuationToken", rest)
        prefixed = await self.s3.call(self.client.list_buckets, Prefix="a-")
        self.assertEqual([b["Name"] for b in prefixed["Buckets"]], ["a-bucket", "a-other"])

    async def test_already_exists(self) -> None:
        """
        Creating one's own bucket again is BucketAlreadyOwnedByYou; another
        tenant's is BucketAlreadyExists.
        """
        await self.create("photos")
        error = await self.s3.client_error(self.client.create_bucket, Bucket="photos")
        self.assertEqual((status(error), code(error)), (409, "BucketAlreadyOwnedByYou"))
        other = self.s3.client(await self.s3.create_app("globex", "rival"))
        error = await self.s3.client_error(other.create_bucket, Bucket="photos")
        self.assertEqual((status(error), code(error)), (409, "BucketAlreadyExists"))

    async def test_invalid_names(self) -> None:
        """
        Names breaking the rules, and the reserved names, are
        InvalidBucketName; nothing is created.
        """
        for name in ("ab", "Upper-Case", "under_score", "a..b", "192.168.0.1", "-dash", "ready", "metrics"):
            response = await self.raw("PUT", f"/{name}")
            self.assertEqual(response.status, 400, name)
            self.assertEqual(xml(response).findtext("Code"), "InvalidBucketName", name)
            self.assertEqual(xml(response).findtext("BucketName"), name)
        listing = await self.s3.call(self.client.list_buckets)
        self.assertEqual(listing["Buckets"], [])

    async def test_location_constraint(self) -> None:
        """
        On a us-east-1 node, no constraint or 'us-east-1' is accepted; a
        region Anvil knows but this node does not serve is
        IllegalLocationConstraintException; an unknown one is
        InvalidLocationConstraint.
        """
        await self.s3.call(
            self.client.create_bucket,
            Bucket="explicit",
            CreateBucketConfiguration={"LocationConstraint": "us-east-1"},
        )
        await self.s3.global_store.create_region("eu-west-1")
        error = await self.s3.client_error(
            self.client.create_bucket,
            Bucket="elsewhere",
            CreateBucketConfiguration={"LocationConstraint": "eu-west-1"},
        )
        self.assertEqual((status(error), code(error)), (400, "IllegalLocationConstraintException"))
        error = await self.s3.client_error(
            self.client.create_bucket,
            Bucket="nowhere",
            CreateBucketConfiguration={"LocationConstraint": "mars-north-7"},
        )
        self.assertEqual((status(error), code(error)), (400, "InvalidLocationConstraint"))

    async def test_malformed_configuration(self) -> None:
        """
        A CreateBucketConfiguration that is not well-formed is MalformedXML.
        """
        for body in (b"<CreateBucketConfiguration><LocationConstraint>", b"<Other/>", b"not xml"):
            response = await self.raw("PUT", "/photos", body=body)
            self.assertEqual(response.status, 400)
            self.assertEqual(xml(response).findtext("Code"), "MalformedXML")

    async def test_acl_headers(self) -> None:
        """
        A private canned ACL is accepted; public ones are refused as on a
        bucket with enforced ownership.
        """
        await self.s3.call(self.client.create_bucket, Bucket="private-one", ACL="private")
        error = await self.s3.client_error(
            self.client.create_bucket, Bucket="public-one", ACL="public-read"
        )
        self.assertEqual(code(error), "InvalidBucketAclWithObjectOwnership")

    async def test_delete_not_empty(self) -> None:
        """
        A bucket with objects is BucketNotEmpty; once emptied it deletes.
        """
        await self.create("photos")
        await self.s3.insert_objects("photos", ["k"])
        error = await self.s3.client_error(self.client.delete_bucket, Bucket="photos")
        self.assertEqual((status(error), code(error)), (409, "BucketNotEmpty"))
        await self.s3.call(self.client.delete_object, Bucket="photos", Key="k")
        await self.s3.call(self.client.delete_bucket, Bucket="photos")

    async def test_expected_owner(self) -> None:
        """
        x-amz-expected-bucket-owner other than the bucket's owner is
        AccessDenied.
        """
        await self.create("photos")
        listing = await self.s3.call(self.client.list_buckets)
        owner = listing["Owner"]["ID"]
        await self.s3.call(self.client.list_objects_v2, Bucket="photos", ExpectedBucketOwner=owner)
        error = await self.s3.client_error(
            self.client.list_objects_v2, Bucket="photos", ExpectedBucketOwner="999999"
        )
        self.assertEqual((status(error), code(error)), (403, "AccessDenied"))

    async def test_missing_bucket(self) -> None:
        """
        Operations on a missing bucket are NoSuchBucket with the bucket
        name and resource.
        """
        for call, args in [
            (self.client.delete_bucket, {}),
            (self.client.list_objects_v2, {}),
            (self.client.list_objects, {}),
            (self.client.get_bucket_location, {}),
            (self.client.list_object_versions, {}),
        ]:
            error = await self.s3.client_error(call, Bucket="missing", **args)
            self.assertEqual((status(error), code(error)), (404, "NoSuchBucket"))
        response = await self.raw("GET", "/missing", "list-type=2")
        self.assertEqual(xml(response).findtext("Resource"), "/missing")
        self.assertEqual(xml(response).findtext("BucketName"), "missing")
        self.assertEqual(xml(response).findtext("RequestId"), response.headers["x-amz-request-id"])

    async def test_other_region(self) -> None:
        """
        A node of another region creates buckets there with that constraint
        and reports it; no constraint means us-east-1, which it refuses.
        """
        s3 = await S3Stack.start(self, region="eu-central-9")
        client = s3.client(await s3.create_app("acme", "web"))
        await s3.call(
            client.create_bucket,
            Bucket="euro",
            CreateBucketConfiguration={"LocationConstraint": "eu-central-9"},
        )
        location = await s3.call(client.get_bucket_location, Bucket="euro")
        self.assertEqual(location["LocationConstraint"], "eu-central-9")
        error = await s3.client_error(client.create_bucket, Bucket="plain")
        self.assertEqual(code(error), "IllegalLocationConstraintException")

    async def test_health_and_list_buckets(self) -> None:
        """
        An anonymous GET / is the health check; a signed one is ListBuckets.
        """
        health = await self.s3.raw_request("GET", "/")
        self.assertEqual((health.status, health.body), (200, b"OK"))
        signed = await self.raw("GET", "/")
        self.assertEqual(signed.status, 200)
        self.assertEqual(xml(signed).tag, NS + "ListAllMyBucketsResult")

    async def test_anonymous_list_buckets(self) -> None:
        """
        Anonymous requests cannot create buckets; unknown methods are 405.
        """
        anonymous = self.s3.client(None)
        error = await self.s3.client_error(anonymous.create_bucket, Bucket="photos")
        self.assertEqual(code(error), "AccessDenied")
        response = await self.raw("PATCH", "/photos")
        self.assertEqual(response.status, 405)
        self.assertEqual(xml(response).findtext("Code"), "MethodNotAllowed")

    async def test_virtual_host(self) -> None:
        """
        A Host of C{<bucket>.localhost} addresses the bucket; its path is
        the key.
        """
        await self.create("photos")
        await self.s3.insert_objects("photos", ["dir/a b"])
        port = self.s3.port.getHost().port
        response = await self.raw("GET", "/", "list-type=2", host=f"photos.localhost:{port}")
        self.assertEqual(response.status, 200)
        self.assertEqual(xml(response).findtext(f"{NS}Name"), "photos")
        self.assertEqual(xml(response).findtext(f"{NS}Contents/{NS}Key"), "dir/a b")
        response = await self.raw("GET", "/dir/a%20b", host=f"photos.localhost:{port}")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b"x")

    async def test_database_down(self) -> None:
        """
        While the global database is unreachable, requests fail fast with
        503 ServiceUnavailable.
        """
        await self.create("photos")
        self.s3.global_db.close()
        started = time.monotonic()
        error = await self.s3.client_error(self.client.list_objects_v2, Bucket="photos")
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual((status(error), code(error)), (503, "ServiceUnavailable"))


class ListingTests(_Base):
    """
    ListObjects v1 and v2 and ListObjectVersions, as AWS lists.
    """

    async def setUp(self) -> None:
        await super().setUp()
        await self.create("photos")

    async def keys(self, **kwargs: Any) -> tuple[list[str], list[str], dict[str, Any]]:
        """List with V2; return keys, common prefixes and the response."""
        page = await self.s3.call(self.client.list_objects_v2, Bucket="photos", **kwargs)
        return (
            [o["Key"] for o in page.get("Contents", [])],
            [p["Prefix"] for p in page.get("CommonPrefixes", [])],
            page,
        )

    async def test_prefix_and_delimiter(self) -> None:
        """
        Keys under a delimiter roll up into common prefixes, which count
        towards KeyCount.
        """
        await self.s3.insert_objects("photos", ["a/1", "a/2", "b/1", "c", "d/e/f", "d/g"])
        keys, prefixes, page = await self.keys(Delimiter="/")
        self.assertEqual((keys, prefixes), (["c"], ["a/", "b/", "d/"]))
        self.assertEqual(page["KeyCount"], 4)
        self.assertEqual(page["Delimiter"], "/")
        keys, prefixes, page = await self.keys(Prefix="d/", Delimiter="/")
        self.assertEqual((keys, prefixes), (["d/g"], ["d/e/"]))
        self.assertEqual(page["Prefix"], "d/")
        keys, prefixes, _ = await self.keys(Prefix="a")
        self.assertEqual((keys, prefixes), (["a/1", "a/2"], []))
        keys, prefixes, _ = await self.keys(Delimiter="1")
        self.assertEqual((keys, prefixes), (["a/2", "c", "d/e/f", "d/g"], ["a/1", "b/1"]))

    async def test_v2_pagination(self) -> None:
        """
        Continuation tokens walk the listing, including across common
        prefixes, without repeats; StartAfter starts after a key.
        """
        await self.s3.insert_objects("photos", ["a", "b/1", "b/2", "c", "d/1", "e"])
        seen: list[str] = []
        token = None
        pages = 0
        while True:
            kwargs: dict[str, Any] = {"MaxKeys": 2, "Delimiter": "/"}
            if token:
                kwargs["ContinuationToken"] = token
            keys, prefixes, page = await self.keys(**kwargs)
            pages += 1
            self.assertEqual(page["KeyCount"], len(keys) + len(prefixes))
            if token:
                self.assertEqual(page["ContinuationToken"], token)
            seen.extend(sorted(keys + prefixes))
            if not page["IsTruncated"]:
                self.assertNotIn("NextContinuationToken", page)
                break
            token = page["NextContinuationToken"]
        self.assertEqual(seen, ["a", "b/", "c", "d/", "e"])
        self.assertEqual(pages, 3)
        keys, _, page = await self.keys(StartAfter="b/1")
        self.assertEqual(keys, ["b/2", "c", "d/1", "e"])
        self.assertEqual(page["StartAfter"], "b/1")
        # The token wins over StartAfter.
        first = await self.keys(MaxKeys=1)
        keys, _, _ = await self.keys(
            StartAfter="d", ContinuationToken=first[2]["NextContinuationToken"]
        )
        self.assertEqual(keys, ["b/1", "b/2", "c", "d/1", "e"])

    async def test_pagination_while_adding(self) -> None:
        """
        A token stays valid while keys are added: keys after it appear,
        keys before it do not, nothing repeats.
        """
        await self.s3.insert_objects("photos", ["k02", "k04", "k06", "k08"])
        keys, _, page = await self.keys(MaxKeys=2)
        self.assertEqual(keys, ["k02", "k04"])
        await self.s3.insert_objects("photos", ["k01", "k03", "k05", "k09"])
        rest, _, _ = await self.keys(ContinuationToken=page["NextContinuationToken"])
        self.assertEqual(rest, ["k05", "k06", "k08", "k09"])

    async def test_v1_markers(self) -> None:
        """
        V1 gives NextMarker only with a delimiter; without one the client
        continues from the last key.
        """
        await self.s3.insert_objects("photos", ["a/1", "a/2", "b", "c/1", "d"])
        page = await self.s3.call(self.client.list_objects, Bucket="photos", MaxKeys=2)
        self.assertTrue(page["IsTruncated"])
        self.assertNotIn("NextMarker", page)
        self.assertEqual([o["Key"] for o in page["Contents"]], ["a/1", "a/2"])
        self.assertEqual(page["Contents"][0]["Owner"]["DisplayName"], "acme")
        page = await self.s3.call(self.client.list_objects, Bucket="photos", Marker="a/2", MaxKeys=2)
        self.assertEqual([o["Key"] for o in page["Contents"]], ["b", "c/1"])
        self.assertEqual(page["Marker"], "a/2")
        page = await self.s3.call(
            self.client.list_objects, Bucket="photos", Delimiter="/", MaxKeys=2
        )
        self.assertEqual(page["NextMarker"], "b")
        self.assertEqual([p["Prefix"] for p in page["CommonPrefixes"]], ["a/"])
        page = await self.s3.call(
            self.client.list_objects, Bucket="photos", Delimiter="/", MaxKeys=2, Marker="b"
        )
        self.assertEqual([p["Prefix"] for p in page["CommonPrefixes"]], ["c/"])
        self.assertEqual([o["Key"] for o in page["Contents"]], ["d"])
        self.assertFalse(page["IsTruncated"])
        self.assertNotIn("NextMarker", page)

    async def test_max_keys(self) -> None:
        """
        max-keys 0 is an empty, untruncated page; values over 1,000 are
        capped; invalid ones are InvalidArgument.
        """
        await self.s3.insert_objects("photos", ["a", "b"])
        keys, prefixes, page = await self.keys(MaxKeys=0)
        self.assertEqual((keys, prefixes, page["IsTruncated"], page["KeyCount"]), ([], [], False, 0))
        _, _, page = await self.keys(MaxKeys=5000)
        self.assertEqual(page["MaxKeys"], 1000)
        for value in ("-1", "abc", "1.5", "99999999999999999999"):
            for query in (f"list-type=2&max-keys={value}", f"max-keys={value}"):
                response = await self.raw("GET", "/photos", query)
                self.assertEqual(response.status, 400, query)
                self.assertEqual(xml(response).findtext("Code"), "InvalidArgument")
                self.assertEqual(xml(response).findtext("ArgumentName"), "max-keys")

    async def test_many_keys(self) -> None:
        """
        A bucket of 1,050 keys lists 1,000 by default, and paginators of
        both versions return every key once, in order.
        """
        keys = [f"key-{i:05d}" for i in range(1050)]
        await self.s3.insert_objects("photos", keys)
        first, _, page = await self.keys()
        self.assertEqual(len(first), 1000)
        self.assertTrue(page["IsTruncated"])
        for operation in ("list_objects_v2", "list_objects"):
            paginator = self.client.get_paginator(operation)

            def collect(paginator: Any = paginator) -> list[str]:
                found = []
                for page in paginator.paginate(Bucket="photos", PaginationConfig={"PageSize": 300}):
                    found.extend(o["Key"] for o in page.get("Contents", []))
                return found

            self.assertEqual(await self.s3.call(collect), keys, operation)

    async def test_special_characters(self) -> None:
        """
        Keys with spaces, '+', '%', '..', slashes at either end, XML
        specials and non-ASCII round-trip through listings, with and
        without encoding-type=url.
        """
        special = [
            "a b",
            "a+b",
            "100%",
            "%2F",
            "../up",
            "/leading",
            "trailing/",
            "x//y",
            "<&>\"'",
            "\u00e9t\u00e9/\u65e5\u672c",
            "tab\there",
            "~tilde",
        ]
        for key in special:
            await self.s3.call(self.client.put_object, Bucket="photos", Key=key, Body=b"x")
        expected = sorted(special, key=lambda k: k.encode("utf-8"))
        keys, _, _ = await self.keys()
        self.assertEqual(keys, expected)
        page = await self.s3.call(self.client.list_objects, Bucket="photos")
        self.assertEqual([o["Key"] for o in page["Contents"]], expected)
        response = await self.raw("GET", "/photos", "list-type=2")
        raw_keys = [e.text or "" for e in xml(response).iter(f"{NS}Key")]
        self.assertEqual(raw_keys, expected)
        response = await self.raw("GET", "/photos", "list-type=2&encoding-type=url&prefix=a%20")
        root = xml(response)
        self.assertEqual(root.findtext(f"{NS}EncodingType"), "url")
        self.assertEqual(root.findtext(f"{NS}Prefix"), "a%20")
        self.assertEqual([e.text for e in root.iter(f"{NS}Key")], ["a%20b"])
        response = await self.raw("GET", "/photos", "list-type=2&encoding-type=url&prefix=a%2B")
        self.assertEqual([e.text for e in xml(response).iter(f"{NS}Key")], ["a%2Bb"])
        for key in special:
            response = await self.raw("GET", "/photos/" + quote(key, safe="/"))
            self.assertEqual((response.status, response.body), (200, b"x"), key)

    async def test_encoding_type_invalid(self) -> None:
        """
        An encoding-type other than url is InvalidArgument.
        """
        response = await self.raw("GET", "/photos", "list-type=2&encoding-type=base64")
        self.assertEqual(response.status, 400)
        self.assertEqual(xml(response).findtext("Code"), "InvalidArgument")

    async def test_byte_order(self) -> None:
        """
        Keys list in UTF-8 byte order.
        """
        keys = ["z", "a", "B", "\u00e9", "~", "\U0001f600", "a0", "a/"]
        await self.s3.insert_objects("photos", keys)
        listed, _, _ = await self.keys()
        self.assertEqual(listed, sorted(keys, key=lambda k: k.encode("utf-8")))

    async def test_fetch_owner(self) -> None:
        """
        V2 entries carry the owner only with fetch-owner.
        """
        await self.s3.insert_objects("photos", ["a"])
        _, _, page = await self.keys()
        self.assertNotIn("Owner", page["Contents"][0])
        _, _, page = await self.keys(FetchOwner=True)
        self.assertEqual(page["Contents"][0]["Owner"]["DisplayName"], "acme")
        self.assertEqual(page["Contents"][0]["Size"], 1)
        self.assertEqual(page["Contents"][0]["ETag"], f'"{hashlib.md5(b"x").hexdigest()}"')
        self.assertEqual(page["Contents"][0]["StorageClass"], "STANDARD")

    async def test_bad_continuation_token(self) -> None:
        """
        A token that is not one of ours is InvalidArgument.
        """
        for token in ("!!!", "%FF%FE"):
            response = await self.raw("GET", "/photos", f"list-type=2&continuation-token={token}")
            self.assertEqual(response.status, 400, token)
            self.assertEqual(xml(response).findtext("Code"), "InvalidArgument")

    async def test_object_versions(self) -> None:
        """
        ListObjectVersions answers as for an unversioned bucket: each object
        is its only version, id 'null', paginated by key marker.
        """
        await self.s3.insert_objects("photos", ["a", "b", "c/1", "c/2"])
        page = await self.s3.call(self.client.list_object_versions, Bucket="photos", MaxKeys=2)
        self.assertEqual([v["Key"] for v in page["Versions"]], ["a", "b"])
        self.assertEqual({v["VersionId"] for v in page["Versions"]}, {"null"})
        self.assertTrue(all(v["IsLatest"] for v in page["Versions"]))
        self.assertTrue(page["IsTruncated"])
        self.assertEqual((page["NextKeyMarker"], page["NextVersionIdMarker"]), ("b", "null"))
        page = await self.s3.call(
            self.client.list_object_versions,
            Bucket="photos",
            KeyMarker="b",
            VersionIdMarker="null",
            Delimiter="/",
        )
        self.assertEqual(page.get("Versions", []), [])
        self.assertEqual([p["Prefix"] for p in page["CommonPrefixes"]], ["c/"])
        self.assertFalse(page["IsTruncated"])
        response = await self.raw("GET", "/photos", "versions&version-id-marker=null")
        self.assertEqual(xml(response).findtext("Code"), "InvalidArgument")
        response = await self.raw("GET", "/photos", "versions&key-marker=a&version-id-marker=v1")
        self.assertEqual(xml(response).findtext("Code"), "InvalidArgument")

    async def test_put_objects_listed(self) -> None:
        """
        Objects written with PutObject are listed with their size and ETag.
        """
        await self.s3.call(self.client.put_object, Bucket="photos", Key="p q", Body=b"hello")
        page = await self.s3.call(self.client.list_objects_v2, Bucket="photos")
        entry = page["Contents"][0]
        self.assertEqual((entry["Key"], entry["Size"]), ("p q", 5))
        self.assertEqual(entry["ETag"], f'"{hashlib.md5(b"hello").hexdigest()}"')


class DeleteObjectsTests(_Base):
    """
    DeleteObjects: quiet and verbose, limits, integrity headers, per-key
    errors.
    """

    async def setUp(self) -> None:
        await super().setUp()
        await self.create("photos")

    def document(self, keys: list[str], quiet: bool | None = None) -> bytes:
        """A Delete request document."""
        parts = ["<Delete>"]
        if quiet is not None:
            parts.append(f"<Quiet>{'true' if quiet else 'false'}</Quiet>")
        for key in keys:
            escaped = key.replace("&", "&amp;").replace("<", "&lt;")
            parts.append(f"<Object><Key>{escaped}</Key></Object>")
        parts.append("</Delete>")
        return "".join(parts).encode()

    async def test_verbose(self) -> None:
        """
        Every key is reported deleted, missing ones too; the objects are
        gone.
        """
        await self.s3.insert_objects("photos", ["a", "b b", "c"])
        result = await self.s3.call(
            self.client.delete_objects,
            Bucket="photos",
            Delete={"Objects": [{"Key": "a"}, {"Key": "b b"}, {"Key": "missing"}]},
        )
        self.assertEqual(sorted(d["Key"] for d in result["Deleted"]), ["a", "b b", "missing"])
        self.assertNotIn("Errors", result)
        page = await self.s3.call(self.client.list_objects_v2, Bucket="photos")
        self.assertEqual([o["Key"] for o in page["Contents"]], ["c"])

    async def test_quiet(self) -> None:
        """
        Quiet mode reports errors only.
        """
        await self.s3.insert_objects("photos", ["a"])
        result = await self.s3.call(
            self.client.delete_objects,
            Bucket="photos",
            Delete={"Objects": [{"Key": "a"}], "Quiet": True},
        )
        self.assertNotIn("Deleted", result)
        self.assertNotIn("Errors", result)
        page = await self.s3.call(self.client.list_objects_v2, Bucket="photos")
        self.assertEqual(page["KeyCount"], 0)

    async def test_thousand_keys(self) -> None:
        """
        1,000 keys are accepted; 1,001 are MalformedXML.
        """
        keys = [f"k{i:04d}" for i in range(1000)]
        await self.s3.insert_objects("photos", keys)
        body = self.document(keys, quiet=True)
        response = await self.raw(
            "POST", "/photos", "delete", body, {"Content-MD5": md5_header(body)}
        )
        self.assertEqual(response.status, 200, response.body)
        page = await self.s3.call(self.client.list_objects_v2, Bucket="photos")
        self.assertEqual(page["KeyCount"], 0)
        body = self.document(keys + ["one-more"])
        response = await self.raw(
            "POST", "/photos", "delete", body, {"Content-MD5": md5_header(body)}
        )
        self.assertEqual(response.status, 400)
        self.assertEqual(xml(response).findtext("Code"), "MalformedXML")

    async def test_integrity_required(self) -> None:
        """
        Without Content-MD5 or a checksum the request is refused; a wrong
        one is BadDigest; a checksum header alone is enough.
        """
        await self.s3.insert_objects("photos", ["a"])
        body = self.document(["a"])
        response = await self.raw("POST", "/photos", "delete", body)
        self.assertEqual(response.status, 400)
        self.assertEqual(xml(response).findtext("Code"), "InvalidRequest")
        response = await self.raw(
            "POST", "/photos", "delete", body, {"Content-MD5": md5_header(b"other")}
        )
        self.assertEqual(xml(response).findtext("Code"), "BadDigest")
        sha256 = base64.b64encode(hashlib.sha256(body).digest()).decode()
        response = await self.raw(
            "POST", "/photos", "delete", body, {"x-amz-checksum-sha256": sha256}
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(xml(response).findtext(f"{NS}Deleted/{NS}Key"), "a")

    async def test_malformed(self) -> None:
        """
        Bad documents are MalformedXML: empty, no objects, no key, bad Quiet.
        """
        for body in (
            b"",
            b"<Delete></Delete>",
            b"<Delete><Object><VersionId>null</VersionId></Object></Delete>",
            b"<Delete><Quiet>maybe</Quiet><Object><Key>a</Key></Object></Delete>",
            b"<Delete><Object><Key>a</Key></Object>",
        ):
            response = await self.raw(
                "POST", "/photos", "delete", body, {"Content-MD5": md5_header(body)}
            )
            self.assertEqual(response.status, 400, body)
            self.assertEqual(xml(response).findtext("Code"), "MalformedXML", body)

    async def test_per_key_errors(self) -> None:
        """
        Keys the app may not delete, and unknown version ids, are reported
        per key; the others are deleted.
        """
        await self.s3.insert_objects("photos", ["tmp/a", "keep/b"])
        limited = await self.s3.create_app(
            "acme", "cleaner", [("object:delete", "photos/tmp/*"), ("bucket:read", "photos")]
        )
        client = self.s3.client(limited)
        result = await self.s3.call(
            client.delete_objects,
            Bucket="photos",
            Delete={
                "Objects": [
                    {"Key": "tmp/a"},
                    {"Key": "keep/b"},
                    {"Key": "tmp/a", "VersionId": "3HL4kqtJlcpXroDTDmjVBH40Nrjfkd"},
                ]
            },
        )
        self.assertEqual([d["Key"] for d in result["Deleted"]], ["tmp/a"])
        errors = {(e["Key"], e["Code"]) for e in result["Errors"]}
        self.assertEqual(errors, {("keep/b", "AccessDenied"), ("tmp/a", "NoSuchVersion")})
        page = await self.s3.call(self.client.list_objects_v2, Bucket="photos")
        self.assertEqual([o["Key"] for o in page["Contents"]], ["keep/b"])


class AuthenticationTests(_Base):
    """
    SigV4 failures as boto3 meets them.
    """

    stack_options: ClassVar[dict[str, Any]] = {"secret_cache_seconds": 0.5}

    async def test_wrong_secret(self) -> None:
        """
        A wrong secret is SignatureDoesNotMatch (403).
        """
        client = self.s3.client(self.app, secret="not-the-secret")
        error = await self.s3.client_error(client.list_buckets)
        self.assertEqual((status(error), code(error)), (403, "SignatureDoesNotMatch"))

    async def test_unknown_key(self) -> None:
        """
        An unknown access key is InvalidAccessKeyId (403).
        """
        client = self.s3.client(AppCredentials("acme", "ghost", "AKNOSUCHKEY000000000", "x"))
        error = await self.s3.client_error(client.list_buckets)
        self.assertEqual((status(error), code(error)), (403, "InvalidAccessKeyId"))

    async def test_clock_skew(self) -> None:
        """
        A client whose clock is 20 minutes off is RequestTimeTooSkewed.
        """
        self.client_clock(-20 * 60)
        error = await self.s3.client_error(self.client.list_buckets)
        self.assertEqual((status(error), code(error)), (403, "RequestTimeTooSkewed"))

    async def test_presigned_urls(self) -> None:
        """
        A presigned URL works until it expires, then is AccessDenied;
        lifetimes over 7 days are refused.
        """
        await self.create("photos")
        await self.s3.insert_objects("photos", ["doc.txt"], data=b"presigned")
        url = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": "photos", "Key": "doc.txt"}, ExpiresIn=60
        )
        target = url.split("/", 3)[3]
        response = await self.s3.raw_request("GET", "/" + target)
        self.assertEqual((response.status, response.body), (200, b"presigned"))
        self.client_clock(-5 * 60)
        url = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": "photos", "Key": "doc.txt"}, ExpiresIn=60
        )
        response = await self.s3.raw_request("GET", "/" + url.split("/", 3)[3])
        self.assertEqual(response.status, 403)
        self.assertEqual(xml(response).findtext("Code"), "AccessDenied")
        self.assertEqual(xml(response).findtext("Message"), "Request has expired")
        url = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": "photos", "Key": "doc.txt"}, ExpiresIn=8 * 24 * 3600
        )
        response = await self.s3.raw_request("GET", "/" + url.split("/", 3)[3])
        self.assertEqual(response.status, 400)
        self.assertEqual(xml(response).findtext("Code"), "AuthorizationQueryParametersError")

    async def test_rotation(self) -> None:
        """
        After a secret rotation the old secret stops working within the
        cache period and the new one works.
        """
        await self.s3.call(self.client.list_buckets)
        secret = await self.s3.global_store.rotate_secret("web")
        await deferLater(reactor, 0.6, lambda: None)
        error = await self.s3.client_error(self.client.list_buckets)
        self.assertEqual(code(error), "SignatureDoesNotMatch")
        rotated = self.s3.client(AppCredentials("acme", "web", self.app.client_id, secret))
        await self.s3.call(rotated.list_buckets)


class IsolationTests(_Base):
    """
    An app never reaches another tenant's buckets, whatever its policies.
    """

    async def setUp(self) -> None:
        await super().setUp()
        await self.create("acme-data")
        await self.s3.insert_objects("acme-data", ["secret.txt"])
        self.rival = self.s3.client(await self.s3.create_app("globex", "rival"))

    async def test_invisible_in_listings(self) -> None:
        """
        ListBuckets shows only the caller's tenant's buckets.
        """
        await self.create("globex-data", self.rival)
        mine = await self.s3.call(self.client.list_buckets)
        theirs = await self.s3.call(self.rival.list_buckets)
        self.assertEqual([b["Name"] for b in mine["Buckets"]], ["acme-data"])
        self.assertEqual([b["Name"] for b in theirs["Buckets"]], ["globex-data"])
        self.assertEqual(theirs["Owner"]["DisplayName"], "globex")

    async def test_every_operation_denied(self) -> None:
        """
        Listing, reading, writing, deleting objects and the bucket are all
        AccessDenied for the other tenant, and nothing changes.
        """
        rival = self.rival
        attempts = [
            (rival.list_objects_v2, {"Bucket": "acme-data"}),
            (rival.list_objects, {"Bucket": "acme-data"}),
            (rival.head_bucket, {"Bucket": "acme-data"}),
            (rival.get_bucket_location, {"Bucket": "acme-data"}),
            (rival.get_object, {"Bucket": "acme-data", "Key": "secret.txt"}),
            (rival.head_object, {"Bucket": "acme-data", "Key": "secret.txt"}),
            (rival.put_object, {"Bucket": "acme-data", "Key": "planted", "Body": b"x"}),
            (rival.delete_object, {"Bucket": "acme-data", "Key": "secret.txt"}),
            (
                rival.delete_objects,
                {"Bucket": "acme-data", "Delete": {"Objects": [{"Key": "secret.txt"}]}},
            ),
            (rival.delete_bucket, {"Bucket": "acme-data"}),
            (rival.get_bucket_acl, {"Bucket": "acme-data"}),
            (
                rival.copy_object,
                {"Bucket": "acme-data", "Key": "copy", "CopySource": "acme-data/secret.txt"},
            ),
        ]
        for call, kwargs in attempts:
            error = await self.s3.client_error(call, **kwargs)
            self.assertEqual(status(error), 403, call)
        page = await self.s3.call(self.client.list_objects_v2, Bucket="acme-data")
        self.assertEqual([o["Key"] for o in page["Contents"]], ["secret.txt"])

    async def test_copy_from_other_tenant(self) -> None:
        """
        Copying another tenant's object into one's own bucket is denied.
        """
        await self.create("globex-data", self.rival)
        error = await self.s3.client_error(
            self.rival.copy_object,
            Bucket="globex-data",
            Key="stolen",
            CopySource={"Bucket": "acme-data", "Key": "secret.txt"},
        )
        self.assertEqual(status(error), 403)


class PolicyTests(_Base):
    """
    Policies are checked for every operation, per action and resource.
    """

    async def setUp(self) -> None:
        await super().setUp()
        await self.create("photos")
        await self.create("other")
        await self.s3.insert_objects("photos", ["public/a.jpg", "private/b.jpg"])

    async def test_prefix_read(self) -> None:
        """
        object:read on a prefix reads there only; nothing else is allowed.
        """
        reader = self.s3.client(
            await self.s3.create_app("acme", "reader", [("object:read", "photos/public/*")])
        )
        got = await self.s3.call(reader.get_object, Bucket="photos", Key="public/a.jpg")
        self.assertEqual(got["Body"].read(), b"x")
        for call, kwargs in [
            (reader.get_object, {"Bucket": "photos", "Key": "private/b.jpg"}),
            (reader.list_objects_v2, {"Bucket": "photos"}),
            (reader.put_object, {"Bucket": "photos", "Key": "public/new", "Body": b"x"}),
            (reader.delete_object, {"Bucket": "photos", "Key": "public/a.jpg"}),
            (reader.create_bucket, {"Bucket": "mine"}),
            (reader.delete_bucket, {"Bucket": "other"}),
        ]:
            error = await self.s3.client_error(call, **kwargs)
            self.assertEqual((status(error), code(error)), (403, "AccessDenied"), call)
        listing = await self.s3.call(reader.list_buckets)
        self.assertEqual(listing["Buckets"], [])

    async def test_bucket_actions(self) -> None:
        """
        bucket:create, bucket:read and bucket:delete each allow their
        operations on the named buckets only.
        """
        manager = self.s3.client(
            await self.s3.create_app(
                "acme",
                "manager",
                [
                    ("bucket:create", "new-one"),
                    ("bucket:read", "photos"),
                    ("bucket:delete", "new-one"),
                ],
            )
        )
        await self.s3.call(manager.create_bucket, Bucket="new-one")
        error = await self.s3.client_error(manager.create_bucket, Bucket="forbidden")
        self.assertEqual(code(error), "AccessDenied")
        page = await self.s3.call(manager.list_objects_v2, Bucket="photos")
        self.assertEqual(page["KeyCount"], 2)
        error = await self.s3.client_error(manager.list_objects_v2, Bucket="other")
        self.assertEqual(code(error), "AccessDenied")
        listing = await self.s3.call(manager.list_buckets)
        self.assertEqual([b["Name"] for b in listing["Buckets"]], ["photos"])
        await self.s3.call(manager.delete_bucket, Bucket="new-one")
        error = await self.s3.client_error(manager.delete_bucket, Bucket="other")
        self.assertEqual(code(error), "AccessDenied")

    async def test_policy_change_applies(self) -> None:
        """
        A granted policy applies once the credentials cache is refreshed.
        """
        app = await self.s3.create_app("acme", "late", [])
        client = self.s3.client(app)
        error = await self.s3.client_error(client.list_objects_v2, Bucket="photos")
        self.assertEqual(code(error), "AccessDenied")
        await self.s3.grant(app, "bucket:read", "photos")
        self.s3.forget_cached_credentials()
        await self.s3.call(client.list_objects_v2, Bucket="photos")


class PublicBucketTests(_Base):
    """
    A public bucket allows anonymous GetObject and HeadObject, nothing else.
    """

    async def setUp(self) -> None:
        await super().setUp()
        await self.create("site")
        await self.s3.insert_objects("site", ["index.html"], data=b"<html/>")
        self.anonymous = self.s3.client(None)

    async def test_public_reads(self) -> None:
        """
        Anonymous reads work once the bucket is public and stop as soon as
        it is private again; listing and writing never work.
        """
        error = await self.s3.client_error(self.anonymous.get_object, Bucket="site", Key="index.html")
        self.assertEqual((status(error), code(error)), (403, "AccessDenied"))
        await self.s3.global_store.set_public_access("site", True)
        got = await self.s3.call(self.anonymous.get_object, Bucket="site", Key="index.html")
        self.assertEqual(got["Body"].read(), b"<html/>")
        head = await self.s3.call(self.anonymous.head_object, Bucket="site", Key="index.html")
        self.assertEqual(head["ContentLength"], 7)
        error = await self.s3.client_error(self.anonymous.get_object, Bucket="site", Key="missing")
        self.assertEqual(code(error), "NoSuchKey")
        for call, kwargs in [
            (self.anonymous.list_objects_v2, {"Bucket": "site"}),
            (self.anonymous.list_objects, {"Bucket": "site"}),
            (self.anonymous.put_object, {"Bucket": "site", "Key": "x", "Body": b"x"}),
            (self.anonymous.delete_object, {"Bucket": "site", "Key": "index.html"}),
            (self.anonymous.get_object_acl, {"Bucket": "site", "Key": "index.html"}),
        ]:
            error = await self.s3.client_error(call, **kwargs)
            self.assertEqual((status(error), code(error)), (403, "AccessDenied"), call)
        acl = await self.s3.call(self.client.get_object_acl, Bucket="site", Key="index.html")
        self.assertIn(
            ("Group", "READ"), [(g["Grantee"]["Type"], g["Permission"]) for g in acl["Grants"]]
        )
        await self.s3.global_store.set_public_access("site", False)
        error = await self.s3.client_error(self.anonymous.get_object, Bucket="site", Key="index.html")
        self.assertEqual(code(error), "AccessDenied")


class ProbeTests(_Base):
    """
    The bucket configuration probes clients send get the answers AWS gives
    a bucket without that configuration.
    """

    async def setUp(self) -> None:
        await super().setUp()
        await self.create("photos")
        await self.s3.insert_objects("photos", ["k"])

    async def test_configuration_probes(self) -> None:
        """
        Versioning is off, the owner has FULL_CONTROL, and CORS, lifecycle,
        policy, tagging, encryption, website, replication, object lock and
        ownership controls do not exist.
        """
        versioning = await self.s3.call(self.client.get_bucket_versioning, Bucket="photos")
        self.assertNotIn("Status", versioning)
        acl = await self.s3.call(self.client.get_bucket_acl, Bucket="photos")
        self.assertEqual(acl["Owner"]["DisplayName"], "acme")
        self.assertEqual([g["Permission"] for g in acl["Grants"]], ["FULL_CONTROL"])
        missing = [
            (self.client.get_bucket_cors, "NoSuchCORSConfiguration"),
            (self.client.get_bucket_lifecycle_configuration, "NoSuchLifecycleConfiguration"),
            (self.client.get_bucket_policy, "NoSuchBucketPolicy"),
            (self.client.get_bucket_tagging, "NoSuchTagSet"),
            (self.client.get_bucket_encryption, "ServerSideEncryptionConfigurationNotFoundError"),
            (self.client.get_bucket_website, "NoSuchWebsiteConfiguration"),
            (self.client.get_bucket_replication, "ReplicationConfigurationNotFoundError"),
            (self.client.get_object_lock_configuration, "ObjectLockConfigurationNotFoundError"),
            (self.client.get_bucket_ownership_controls, "OwnershipControlsNotFoundError"),
            (self.client.get_public_access_block, "NoSuchPublicAccessBlockConfiguration"),
        ]
        for call, expected in missing:
            error = await self.s3.client_error(call, Bucket="photos")
            self.assertEqual((status(error), code(error)), (404, expected), call)
        status_ = await self.s3.call(self.client.get_bucket_policy_status, Bucket="photos")
        self.assertFalse(status_["PolicyStatus"]["IsPublic"])
        deleted = await self.s3.call(self.client.delete_bucket_cors, Bucket="photos")
        self.assertEqual(deleted["ResponseMetadata"]["HTTPStatusCode"], 204)

    async def test_object_probes(self) -> None:
        """
        Object ACLs show the owner; objects have no tags; missing objects
        are NoSuchKey.
        """
        acl = await self.s3.call(self.client.get_object_acl, Bucket="photos", Key="k")
        self.assertEqual([g["Permission"] for g in acl["Grants"]], ["FULL_CONTROL"])
        tags = await self.s3.call(self.client.get_object_tagging, Bucket="photos", Key="k")
        self.assertEqual(tags["TagSet"], [])
        error = await self.s3.client_error(self.client.get_object_acl, Bucket="photos", Key="nope")
        self.assertEqual(code(error), "NoSuchKey")

    async def test_not_implemented(self) -> None:
        """
        Configuration changes Anvil does not support are NotImplemented,
        never a 500.
        """
        error = await self.s3.client_error(
            self.client.put_bucket_versioning,
            Bucket="photos",
            VersioningConfiguration={"Status": "Enabled"},
        )
        self.assertEqual((status(error), code(error)), (501, "NotImplemented"))
        error = await self.s3.client_error(
            self.client.put_bucket_tagging,
            Bucket="photos",
            Tagging={"TagSet": [{"Key": "a", "Value": "b"}]},
        )
        self.assertEqual(code(error), "NotImplemented")
        response = await self.raw("GET", "/photos", "analytics&id=x")
        self.assertEqual(response.status, 501)
