# -*- test-case-name: tests.test_policy -*-
"""
Tests for L{anvil.s3.policy}: actions, resource globs and the decision,
with hypothesis properties against a regular-expression model.
"""

from __future__ import annotations

import re
import time

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from anvil.meta.store import check_resource
from anvil.s3.policy import (
    ACTIONS,
    action_matches,
    glob_matches,
    is_allowed,
    resource_matches,
)

#: Policy actions as the admin CLI accepts them.
GRANTABLE = sorted(ACTIONS | {"*", "bucket:*", "object:*"})

#: Characters for resource patterns and keys: the glob star, the bucket
#: separator, regex specials (which must mean themselves) and others.
CHARS = st.sampled_from(["a", "b", "/", "*", ".", "?", "[", "]", "\\", "+", "%", " ", "é", "😀", "\n"])


def glob_model(pattern: str, text: str) -> bool:
    """
    The glob by definition: '*' is '.*', everything else is literal.
    """
    regex = ".*".join(re.escape(piece) for piece in pattern.split("*"))
    return re.fullmatch(regex, text, re.DOTALL) is not None


def allowed_model(policies: list[tuple[str, str]], action: str, bucket: str | None, key: str | None) -> bool:
    """
    ARCHITECTURE §4 by definition.
    """
    for granted, resource in policies:
        family = action.split(":")[0]
        if granted not in ("*", action, family + ":*"):
            continue
        if resource == "*":
            return True
        if bucket is None:
            continue
        if glob_model(resource, bucket if key is None else f"{bucket}/{key}"):
            return True
    return False


class ActionTests(SynchronousTestCase):
    """
    Policy actions and their wildcards.
    """

    def test_matches(self) -> None:
        """
        '*' covers everything, 'family:*' its family, others themselves.
        """
        for action in ACTIONS:
            self.assertTrue(action_matches("*", action))
            self.assertTrue(action_matches(action, action))
            self.assertEqual(action_matches("bucket:*", action), action.startswith("bucket:"))
            self.assertEqual(action_matches("object:*", action), action.startswith("object:"))
        self.assertFalse(action_matches("object:read", "object:write"))
        self.assertFalse(action_matches("object:*", "objects:read"))
        self.assertFalse(action_matches("object:*", "object:"))
        self.assertFalse(action_matches("bucket:read", "bucket:readx"))


class ResourceTests(SynchronousTestCase):
    """
    Resource globs.
    """

    def test_examples(self) -> None:
        """
        The resources of ARCHITECTURE §4: '*', a bucket, its objects, a
        prefix of its objects.
        """
        cases = [
            ("*", "photos", None, True),
            ("*", None, None, True),
            ("photos", "photos", None, True),
            ("photos", "photos", "a.jpg", False),
            ("photos", "photos2", None, False),
            ("photos/*", "photos", "a.jpg", True),
            ("photos/*", "photos", "deep/er/a.jpg", True),
            ("photos/*", "photos", None, False),
            ("photos/*", "photos2", "a.jpg", False),
            ("photos/invoices/*", "photos", "invoices/2024/x.pdf", True),
            ("photos/invoices/*", "photos", "invoices/", True),
            ("photos/invoices/*", "photos", "invoices", False),
            ("photos/invoices/*", "photos", "other/invoices/x", False),
            ("photos/a.jpg", "photos", "a.jpg", True),
            ("photos/a.jpg", "photos", "a.jpgx", False),
            ("photos/a.*", "photos", "a.b/c", True),
            ("photos", None, None, False),
        ]
        for pattern, bucket, key, expected in cases:
            self.assertEqual(resource_matches(pattern, bucket, key), expected, (pattern, bucket, key))

    def test_specials_are_literal(self) -> None:
        """
        Only '*' is special: '?', '[', '.', '\\' match themselves only.
        """
        self.assertTrue(glob_matches("b/a?[x].\\", "b/a?[x].\\"))
        self.assertFalse(glob_matches("b/a?", "b/ab"))
        self.assertFalse(glob_matches("b/[ab]", "b/a"))
        self.assertFalse(glob_matches("b/a.c", "b/abc"))

    @given(st.text(CHARS, max_size=8), st.text(CHARS, max_size=12))
    def test_glob_model(self, pattern: str, text: str) -> None:
        """
        The glob agrees with its regular-expression definition.
        """
        self.assertEqual(glob_matches(pattern, text), glob_model(pattern, text))

    @given(st.text(CHARS, max_size=6), st.text(CHARS, max_size=6), st.text(CHARS, max_size=6))
    def test_prefix_grants(self, prefix: str, rest: str, other: str) -> None:
        """
        'bucket/prefix*' covers exactly the keys starting with the prefix.
        """
        pattern = "bkt/" + prefix.replace("*", "") + "*"
        clean = prefix.replace("*", "")
        self.assertTrue(resource_matches(pattern, "bkt", clean + rest))
        self.assertEqual(resource_matches(pattern, "bkt", other), other.startswith(clean))

    def test_no_blow_up(self) -> None:
        """
        Patterns with many stars against long keys stay fast (no
        exponential backtracking).
        """
        started = time.perf_counter()
        self.assertFalse(glob_matches("*a*a*a*a*a*a*a*a*a*a*b", "a" * 1024))
        self.assertTrue(glob_matches("*a*a*a*a*a*a*a*a*a*a*", "a" * 1024))
        self.assertLess(time.perf_counter() - started, 0.5)


class IsAllowedTests(SynchronousTestCase):
    """
    The decision over an app's policies.
    """

    def test_examples(self) -> None:
        """
        Read-only access to a prefix, full access to one bucket, creating
        buckets, and no policies at all.
        """
        policies = [("object:read", "photos/public/*"), ("bucket:read", "photos"), ("*", "scratch"), ("*", "scratch/*")]
        self.assertTrue(is_allowed(policies, "object:read", "photos", "public/a.jpg"))
        self.assertFalse(is_allowed(policies, "object:write", "photos", "public/a.jpg"))
        self.assertFalse(is_allowed(policies, "object:read", "photos", "private/a.jpg"))
        self.assertTrue(is_allowed(policies, "bucket:read", "photos", None))
        self.assertFalse(is_allowed(policies, "bucket:delete", "photos", None))
        self.assertTrue(is_allowed(policies, "bucket:delete", "scratch", None))
        self.assertTrue(is_allowed(policies, "object:delete", "scratch", "x/y"))
        self.assertFalse(is_allowed(policies, "bucket:create", None, None))
        self.assertFalse(is_allowed(policies, "bucket:create", "new-bucket", None))
        self.assertTrue(is_allowed([("bucket:create", "*")], "bucket:create", "new-bucket", None))
        self.assertTrue(is_allowed([("bucket:create", "new-*")], "bucket:create", "new-bucket", None))
        self.assertTrue(is_allowed([("*", "*")], "bucket:read", None, None))
        self.assertFalse(is_allowed([], "object:read", "photos", "a"))

    def test_validated_resources(self) -> None:
        """
        Every resource shape the admin CLI accepts works as documented.
        """
        for resource in ("*", "my-bucket", "my-bucket/*", "my-bucket/invoices/*", "my-bucket/a/b.txt"):
            check_resource(resource)
        self.assertTrue(is_allowed([("object:read", "my-bucket/a/b.txt")], "object:read", "my-bucket", "a/b.txt"))
        self.assertFalse(is_allowed([("object:read", "my-bucket/a/b.txt")], "object:read", "my-bucket", "a/b.txt2"))

    @given(
        policies=st.lists(
            st.tuples(
                st.sampled_from(GRANTABLE),
                st.one_of(st.just("*"), st.text(CHARS, max_size=6).map(lambda s: "bkt" + s)),
            ),
            max_size=4,
        ),
        action=st.sampled_from(sorted(ACTIONS)),
        bucket=st.one_of(st.none(), st.just("bkt"), st.just("bkt2")),
        key=st.one_of(st.none(), st.text(CHARS, max_size=6)),
    )
    def test_model(
        self, policies: list[tuple[str, str]], action: str, bucket: str | None, key: str | None
    ) -> None:
        """
        The decision agrees with its definition for any policies and
        request.
        """
        if bucket is None:
            key = None
        self.assertEqual(is_allowed(policies, action, bucket, key), allowed_model(policies, action, bucket, key))
