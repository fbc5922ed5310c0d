# -*- test-case-name: tests.test_s3_metadata_headers -*-
"""
Tests for L{anvil.s3.metadata_headers}: stored object headers, response
headers and overrides, conditional requests, copy sources and dates.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from anvil.s3 import metadata_headers as mh
from anvil.s3.errors import (
    InvalidArgument,
    InvalidRange,
    InvalidRequest,
    InvalidStorageClass,
    KeyTooLongError,
    MetadataTooLarge,
    NoSuchKey,
    NotModified,
    PreconditionFailed,
    S3NotImplemented,
)

_MODIFIED = datetime(2024, 5, 6, 7, 8, 9, 700000, tzinfo=UTC)
_ETAG = '"9b2cf535f27731c974343645a3985328"'


def _http(moment: datetime) -> str:
    return mh.format_http_date(moment)


class KeyTests(SynchronousTestCase):
    """
    Tests for L{mh.check_key}.
    """

    def test_limit_is_bytes(self) -> None:
        """A key of exactly 1024 UTF-8 bytes passes, even with multi-byte characters."""
        mh.check_key("a" * 1024)
        mh.check_key("é" * 512)

    def test_too_long(self) -> None:
        """A key of 1025 bytes is KeyTooLongError, reporting its size."""
        error = self.assertRaises(KeyTooLongError, mh.check_key, "é" * 512 + "a")
        self.assertEqual(error.extra["Size"], "1025")


class ParseObjectHeadersTests(SynchronousTestCase):
    """
    Tests for L{mh.parse_object_headers}.
    """

    def test_defaults(self) -> None:
        """Without headers the object is binary/octet-stream with no metadata."""
        parsed = mh.parse_object_headers({})
        self.assertEqual(parsed, mh.ObjectHeaders("binary/octet-stream", {}, {}))

    def test_all_headers(self) -> None:
        """Content-Type, user metadata and the stored system headers are kept."""
        parsed = mh.parse_object_headers(
            {
                "content-type": "text/plain",
                "x-amz-meta-colour": "blue",
                "x-amz-meta-size": "Large",
                "content-disposition": 'attachment; filename="a.txt"',
                "content-encoding": "gzip",
                "cache-control": "no-cache",
                "expires": "Thu, 01 Dec 1994 16:00:00 GMT",
                "content-language": "de",
                "x-amz-storage-class": "STANDARD_IA",
                "authorization": "ignored",
            }
        )
        self.assertEqual(parsed.content_type, "text/plain")
        self.assertEqual(parsed.user_metadata, {"colour": "blue", "size": "Large"})
        self.assertEqual(
            parsed.system_metadata,
            {
                "content-disposition": 'attachment; filename="a.txt"',
                "content-encoding": "gzip",
                "cache-control": "no-cache",
                "expires": "Thu, 01 Dec 1994 16:00:00 GMT",
                "content-language": "de",
                "x-amz-storage-class": "STANDARD_IA",
            },
        )

    def test_aws_chunked_removed(self) -> None:
        """aws-chunked is a transfer detail and is not stored as the encoding."""
        self.assertEqual(
            mh.parse_object_headers({"content-encoding": "aws-chunked"}).system_metadata, {}
        )
        self.assertEqual(
            mh.parse_object_headers({"content-encoding": "gzip,aws-chunked"}).system_metadata,
            {"content-encoding": "gzip"},
        )

    def test_standard_class_not_stored(self) -> None:
        """STANDARD is the default storage class and is not recorded."""
        parsed = mh.parse_object_headers({"x-amz-storage-class": "STANDARD"})
        self.assertEqual(parsed.system_metadata, {})

    def test_unknown_storage_class(self) -> None:
        """An unknown storage class is InvalidStorageClass."""
        self.assertRaises(
            InvalidStorageClass, mh.parse_object_headers, {"x-amz-storage-class": "COLD"}
        )

    def test_metadata_limit(self) -> None:
        """Exactly 2048 bytes of names and values pass; one more is MetadataTooLarge."""
        name = "k"
        fits = {"x-amz-meta-" + name: "v" * (2048 - len(name))}
        self.assertEqual(len(mh.parse_object_headers(fits).user_metadata["k"]), 2047)
        over = {"x-amz-meta-" + name: "v" * (2049 - len(name))}
        self.assertRaises(MetadataTooLarge, mh.parse_object_headers, over)

    def test_metadata_limit_counts_all_entries(self) -> None:
        """The limit applies to the sum over every entry."""
        headers = {f"x-amz-meta-m{i:02d}": "x" * 100 for i in range(20)}
        # 20 * (3 + 100) = 2060 bytes.
        self.assertRaises(MetadataTooLarge, mh.parse_object_headers, headers)

    def test_utf8_value_bytes(self) -> None:
        """A value sent as raw UTF-8 bytes (read as ISO-8859-1) is stored as text."""
        received = "naïve ☃".encode().decode("latin-1")
        parsed = mh.parse_object_headers({"x-amz-meta-word": received})
        self.assertEqual(parsed.user_metadata, {"word": "naïve ☃"})

    def test_rfc2047_value(self) -> None:
        """An RFC 2047 encoded word is decoded before storing."""
        parsed = mh.parse_object_headers({"x-amz-meta-word": "=?UTF-8?B?bmHDr3Zl?="})
        self.assertEqual(parsed.user_metadata, {"word": "naïve"})

    def test_bad_rfc2047_kept(self) -> None:
        """A malformed encoded word is stored as sent."""
        parsed = mh.parse_object_headers({"x-amz-meta-word": "=?nope?B?@@@?="})
        self.assertEqual(parsed.user_metadata, {"word": "=?nope?B?@@@?="})


class ObjectHeadersTests(SynchronousTestCase):
    """
    Tests for L{mh.object_headers} and the overrides.
    """

    def test_round_trip(self) -> None:
        """Stored metadata is rendered as the headers S3 sends."""
        parsed = mh.parse_object_headers(
            {
                "content-type": "text/plain",
                "x-amz-meta-b": "2",
                "x-amz-meta-a": "1",
                "cache-control": "max-age=60",
                "content-encoding": "gzip",
            }
        )
        rendered = mh.object_headers(
            parsed.content_type, parsed.user_metadata, parsed.system_metadata
        )
        self.assertEqual(
            rendered,
            [
                ("Content-Type", "text/plain"),
                ("Cache-Control", "max-age=60"),
                ("Content-Encoding", "gzip"),
                ("x-amz-meta-a", "1"),
                ("x-amz-meta-b", "2"),
            ],
        )

    def test_non_ascii_value_encoded(self) -> None:
        """A non-ASCII value goes out as an RFC 2047 word that decodes back to it."""
        rendered = dict(mh.object_headers("x/y", {"word": "naïve"}, {}))
        self.assertEqual(rendered["x-amz-meta-word"], "=?UTF-8?B?bmHDr3Zl?=")
        again = mh.parse_object_headers({"x-amz-meta-word": rendered["x-amz-meta-word"]})
        self.assertEqual(again.user_metadata, {"word": "naïve"})

    def test_storage_class_reported(self) -> None:
        """A non-standard storage class is sent as x-amz-storage-class."""
        rendered = dict(mh.object_headers("x/y", {}, {"x-amz-storage-class": "GLACIER_IR"}))
        self.assertEqual(rendered["x-amz-storage-class"], "GLACIER_IR")

    def test_overrides_signed(self) -> None:
        """Every response-* parameter replaces or adds its header for a signed request."""
        query = {
            "response-content-type": "image/png",
            "response-content-language": "fr",
            "response-expires": "Wed, 21 Oct 2015 07:28:00 GMT",
            "response-cache-control": "no-store",
            "response-content-disposition": "inline",
            "response-content-encoding": "br",
            "unrelated": "x",
        }
        overrides = mh.response_overrides(query, signed=True)
        headers = mh.apply_overrides(
            [("Content-Type", "text/plain"), ("Cache-Control", "max-age=1"), ("x-amz-meta-a", "1")],
            overrides,
        )
        self.assertEqual(
            sorted(headers),
            sorted(
                [
                    ("x-amz-meta-a", "1"),
                    ("Content-Type", "image/png"),
                    ("Content-Language", "fr"),
                    ("Expires", "Wed, 21 Oct 2015 07:28:00 GMT"),
                    ("Cache-Control", "no-store"),
                    ("Content-Disposition", "inline"),
                    ("Content-Encoding", "br"),
                ]
            ),
        )

    def test_overrides_anonymous(self) -> None:
        """An anonymous request may not use response-* parameters."""
        self.assertRaises(
            InvalidRequest,
            mh.response_overrides,
            {"response-content-type": "image/png"},
            signed=False,
        )
        self.assertEqual(mh.response_overrides({"x": "1"}, signed=False), {})


class DateTests(SynchronousTestCase):
    """
    Tests for HTTP and ISO 8601 dates.
    """

    def test_format_http_date(self) -> None:
        """Last-Modified is an IMF-fixdate in GMT without fractions."""
        self.assertEqual(mh.format_http_date(_MODIFIED), "Mon, 06 May 2024 07:08:09 GMT")

    def test_format_http_date_converts_zone(self) -> None:
        """A datetime in another zone is converted to GMT."""
        zone = _MODIFIED.astimezone(timezone(timedelta(hours=2)))
        self.assertEqual(mh.format_http_date(zone), "Mon, 06 May 2024 07:08:09 GMT")

    def test_format_iso8601(self) -> None:
        """XML timestamps keep milliseconds."""
        self.assertEqual(mh.format_iso8601(_MODIFIED), "2024-05-06T07:08:09.700Z")

    def test_parse_forms(self) -> None:
        """The three HTTP date forms parse to the same instant."""
        expected = datetime(1994, 11, 6, 8, 49, 37, tzinfo=UTC)
        for text in (
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ):
            self.assertEqual(mh.parse_http_date(text), expected, text)

    def test_parse_invalid(self) -> None:
        """Invalid or absent dates are None."""
        self.assertIsNone(mh.parse_http_date("yesterday"))
        self.assertIsNone(mh.parse_http_date(""))
        self.assertIsNone(mh.parse_http_date(None))

    @given(st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(9999, 1, 1)))
    def test_round_trip(self, moment: datetime) -> None:
        """Any formatted date parses back to the same whole second."""
        aware = moment.replace(tzinfo=UTC)
        self.assertEqual(
            mh.parse_http_date(mh.format_http_date(aware)), aware.replace(microsecond=0)
        )


class EtagMatchTests(SynchronousTestCase):
    """
    Tests for L{mh.etag_matches}.
    """

    def test_forms(self) -> None:
        """Quoted, unquoted, weak, listed and wildcard tags match."""
        for header in (
            _ETAG,
            _ETAG.strip('"'),
            "W/" + _ETAG,
            '"other", ' + _ETAG,
            "*",
            ' "x" ,' + _ETAG + " ",
        ):
            self.assertTrue(mh.etag_matches(header, _ETAG), header)

    def test_no_match(self) -> None:
        """Other tags and empty lists do not match."""
        for header in ('"other"', "", ",", '"9b2cf535f27731c974343645a398532"'):
            self.assertFalse(mh.etag_matches(header, _ETAG), header)

    def test_multipart_etag(self) -> None:
        """A multipart ETag matches itself."""
        self.assertTrue(mh.etag_matches('"abc-3"', "abc-3"))


class ReadConditionsTests(SynchronousTestCase):
    """
    Tests for L{mh.check_read_conditions}, with the precedence S3 documents.
    """

    def check(self, **headers: str) -> None:
        """Apply conditions given as keyword arguments (underscores for dashes)."""
        mh.check_read_conditions(
            {name.replace("_", "-"): value for name, value in headers.items()},
            _ETAG,
            _MODIFIED,
        )

    def test_no_conditions(self) -> None:
        """Without conditions nothing is raised."""
        self.check()

    def test_if_match(self) -> None:
        """If-Match passes on the ETag and fails with 412 on another."""
        self.check(if_match=_ETAG)
        error = self.assertRaises(PreconditionFailed, self.check, if_match='"nope"')
        self.assertEqual(error.extra["Condition"], "If-Match")

    def test_if_none_match(self) -> None:
        """If-None-Match naming the ETag is 304 with validators; another tag passes."""
        self.check(if_none_match='"nope"')
        error = self.assertRaises(NotModified, self.check, if_none_match=_ETAG)
        self.assertEqual(error.status, 304)
        self.assertEqual(
            error.headers, {"ETag": _ETAG, "Last-Modified": "Mon, 06 May 2024 07:08:09 GMT"}
        )
        self.assertRaises(NotModified, self.check, if_none_match="*")

    def test_if_modified_since(self) -> None:
        """Not modified since the same second (or later) is 304; earlier passes."""
        self.assertRaises(NotModified, self.check, if_modified_since=_http(_MODIFIED))
        self.assertRaises(
            NotModified, self.check, if_modified_since=_http(_MODIFIED + timedelta(days=1))
        )
        self.check(if_modified_since=_http(_MODIFIED - timedelta(seconds=1)))

    def test_if_unmodified_since(self) -> None:
        """Modified after the date is 412; the same second passes."""
        self.check(if_unmodified_since=_http(_MODIFIED))
        self.assertRaises(
            PreconditionFailed,
            self.check,
            if_unmodified_since=_http(_MODIFIED - timedelta(seconds=1)),
        )

    def test_invalid_dates_ignored(self) -> None:
        """Conditions with unparseable dates are ignored."""
        self.check(if_modified_since="not a date", if_unmodified_since="nor this")

    def test_if_match_beats_unmodified_since(self) -> None:
        """If-Match true and If-Unmodified-Since false: 200 (S3 documents this pair)."""
        self.check(if_match=_ETAG, if_unmodified_since=_http(_MODIFIED - timedelta(days=1)))

    def test_if_none_match_beats_modified_since(self) -> None:
        """If-None-Match false and If-Modified-Since true: 304 (S3 documents this pair)."""
        self.assertRaises(
            NotModified,
            self.check,
            if_none_match=_ETAG,
            if_modified_since=_http(_MODIFIED - timedelta(days=1)),
        )

    def test_if_none_match_passing_ignores_modified_since(self) -> None:
        """When If-None-Match passes, If-Modified-Since is not evaluated."""
        self.check(if_none_match='"nope"', if_modified_since=_http(_MODIFIED + timedelta(days=1)))

    def test_412_before_304(self) -> None:
        """A failing If-Match wins over a matching If-None-Match."""
        self.assertRaises(PreconditionFailed, self.check, if_match='"nope"', if_none_match=_ETAG)


class CopySourceConditionsTests(SynchronousTestCase):
    """
    Tests for L{mh.check_copy_source_conditions}.
    """

    def check(self, **headers: str) -> None:
        """Apply x-amz-copy-source-if-* conditions given as keyword arguments."""
        mh.check_copy_source_conditions(
            {"x-amz-copy-source-" + n.replace("_", "-"): v for n, v in headers.items()},
            _ETAG,
            _MODIFIED,
        )

    def test_each_fails_with_412(self) -> None:
        """Every failing copy-source condition is PreconditionFailed, never 304."""
        self.assertRaises(PreconditionFailed, self.check, if_match='"nope"')
        self.assertRaises(PreconditionFailed, self.check, if_none_match=_ETAG)
        self.assertRaises(PreconditionFailed, self.check, if_modified_since=_http(_MODIFIED))
        self.assertRaises(
            PreconditionFailed,
            self.check,
            if_unmodified_since=_http(_MODIFIED - timedelta(days=1)),
        )

    def test_pass(self) -> None:
        """Conditions that hold let the copy proceed."""
        self.check(
            if_match=_ETAG,
            if_none_match='"nope"',
        )
        self.check(
            if_modified_since=_http(_MODIFIED - timedelta(days=1)),
            if_unmodified_since=_http(_MODIFIED),
        )

    def test_documented_pairs(self) -> None:
        """if-match true beats unmodified-since false; if-none-match false beats modified-since true."""
        self.check(if_match=_ETAG, if_unmodified_since=_http(_MODIFIED - timedelta(days=1)))
        self.assertRaises(
            PreconditionFailed,
            self.check,
            if_none_match=_ETAG,
            if_modified_since=_http(_MODIFIED - timedelta(days=1)),
        )


class WriteConditionsTests(SynchronousTestCase):
    """
    Tests for L{mh.check_write_conditions}.
    """

    def test_if_none_match_star(self) -> None:
        """If-None-Match: * passes for a new key and fails with 412 for an existing one."""
        mh.check_write_conditions({"if-none-match": "*"}, None)
        self.assertRaises(
            PreconditionFailed, mh.check_write_conditions, {"if-none-match": "*"}, _ETAG
        )

    def test_if_none_match_other(self) -> None:
        """Any other If-None-Match on a write is NotImplemented."""
        self.assertRaises(
            S3NotImplemented, mh.check_write_conditions, {"if-none-match": _ETAG}, None
        )

    def test_if_match(self) -> None:
        """If-Match must name the current ETag; on a missing key it is NoSuchKey."""
        mh.check_write_conditions({"if-match": _ETAG}, _ETAG)
        self.assertRaises(PreconditionFailed, mh.check_write_conditions, {"if-match": '"x"'}, _ETAG)
        self.assertRaises(NoSuchKey, mh.check_write_conditions, {"if-match": _ETAG}, None)


class CopySourceTests(SynchronousTestCase):
    """
    Tests for L{mh.parse_copy_source}, L{mh.parse_copy_source_range} and
    L{mh.metadata_directive}.
    """

    def test_forms(self) -> None:
        """Leading slash, encoding and versionId are handled."""
        self.assertEqual(mh.parse_copy_source("b/k"), mh.CopySource("b", "k", None))
        self.assertEqual(
            mh.parse_copy_source("/b/dir/a%20b%2Bc%3F%25.txt"),
            mh.CopySource("b", "dir/a b+c?%.txt", None),
        )
        self.assertEqual(
            mh.parse_copy_source("/b/k%C3%A9?versionId=null"), mh.CopySource("b", "ké", "null")
        )

    def test_key_with_slashes(self) -> None:
        """Leading and doubled slashes inside the key are kept."""
        self.assertEqual(mh.parse_copy_source("b//k/"), mh.CopySource("b", "/k/", None))

    def test_invalid(self) -> None:
        """A source without bucket or key is InvalidArgument."""
        for value in ("", "/", "bucket", "/bucket/", "/bucket"):
            self.assertRaises(InvalidArgument, mh.parse_copy_source, value)

    def test_range(self) -> None:
        """bytes=a-b selects [a, b+1); absent means the whole source."""
        self.assertIsNone(mh.parse_copy_source_range(None, 10))
        self.assertEqual(mh.parse_copy_source_range("bytes=0-9", 10), (0, 10))
        self.assertEqual(mh.parse_copy_source_range("bytes=3-3", 10), (3, 4))

    def test_range_syntax(self) -> None:
        """Suffix, open-ended and other units are InvalidArgument."""
        for value in ("bytes=-5", "bytes=5-", "items=0-1", "0-1", "bytes=0-1,3-4"):
            self.assertRaises(InvalidArgument, mh.parse_copy_source_range, value, 10)

    def test_range_outside(self) -> None:
        """A range beyond the source, or reversed, is InvalidRange."""
        self.assertRaises(InvalidRange, mh.parse_copy_source_range, "bytes=0-10", 10)
        self.assertRaises(InvalidRange, mh.parse_copy_source_range, "bytes=5-4", 10)

    def test_directive(self) -> None:
        """COPY is the default, REPLACE is accepted, anything else is InvalidArgument."""
        self.assertEqual(mh.metadata_directive({}), mh.COPY)
        self.assertEqual(mh.metadata_directive({"x-amz-metadata-directive": "REPLACE"}), mh.REPLACE)
        self.assertRaises(
            InvalidArgument, mh.metadata_directive, {"x-amz-metadata-directive": "replace"}
        )
