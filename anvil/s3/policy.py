# -*- test-case-name: tests.test_policy -*-
"""
Policy evaluation (ARCHITECTURE §4): may an app do an action on a bucket or
an object?

An app holds policies, each an C{(action, resource)} pair:

  - actions: C{bucket:create}, C{bucket:read}, C{bucket:write},
    C{bucket:delete}, C{object:read}, C{object:write}, C{object:delete};
    C{bucket:*} and C{object:*} cover one family, C{*} everything;
  - resources: glob patterns over C{"<bucket>"} (bucket-level requests) or
    C{"<bucket>/<key>"} (object requests) in which C{*} matches any
    characters, C{/} included, and every other character only itself.
    C{*} covers everything, C{my-bucket} that bucket itself,
    C{my-bucket/*} all its objects, C{my-bucket/invoices/*} the objects
    under C{invoices/}.

A request is allowed when any policy matches both its action and its
resource; there are no deny rules.  A request naming no bucket (ListBuckets)
matches only the resource C{*}.  Tenant isolation is not decided here: the
S3 layer refuses another tenant's bucket whatever the policies say.
"""

from __future__ import annotations

from collections.abc import Sequence

#: The concrete actions a request can need.
ACTIONS = frozenset(
    {
        "bucket:create",
        "bucket:read",
        "bucket:write",
        "bucket:delete",
        "object:read",
        "object:write",
        "object:delete",
    }
)


def action_matches(granted: str, action: str) -> bool:
    """
    Whether the policy action C{granted} covers C{action}.

    @param granted: C{*}, C{family:*} or a concrete action.
    @param action: a concrete action such as C{object:read}.
    """
    if granted == "*" or granted == action:
        return True
    if granted.endswith(":*"):
        family = granted[:-1]
        return action.startswith(family) and len(action) > len(family)
    return False


def glob_matches(pattern: str, text: str) -> bool:
    """
    Whether C{text} matches C{pattern}, in which C{*} matches any run of
    characters (possibly empty) and every other character itself.

    Greedy matching with backtracking to the last star only: linear in
    practice and never exponential, whatever the pattern.
    """
    p = t = 0
    star = -1
    resume = 0
    while t < len(text):
        if p < len(pattern) and pattern[p] == "*":
            star = p
            resume = t
            p += 1
        elif p < len(pattern) and pattern[p] == text[t]:
            p += 1
            t += 1
        elif star >= 0:
            # Let the last star swallow one more character and retry.
            resume += 1
            t = resume
            p = star + 1
        else:
            return False
    return all(c == "*" for c in pattern[p:])


def resource_name(bucket: str | None, key: str | None) -> str | None:
    """
    The resource string a request is checked against: the bucket name, or
    C{bucket/key} for an object; C{None} when there is no bucket.
    """
    if bucket is None:
        return None
    return bucket if key is None else f"{bucket}/{key}"


def resource_matches(pattern: str, bucket: str | None, key: str | None) -> bool:
    """
    Whether the policy resource C{pattern} covers a request on C{bucket}
    (and C{key}).
    """
    if pattern == "*":
        return True
    resource = resource_name(bucket, key)
    return resource is not None and glob_matches(pattern, resource)


def is_allowed(
    policies: Sequence[tuple[str, str]],
    action: str,
    bucket: str | None,
    key: str | None,
) -> bool:
    """
    Whether any of C{policies} allows C{action} on C{bucket} (and C{key}).

    @param policies: C{(action, resource)} pairs an app holds.
    @param action: the concrete action the request needs.
    @param bucket: the bucket it addresses, or C{None} (ListBuckets).
    @param key: the object key for object requests, else C{None}.  The S3
        layer may pass a listing's prefix here, so that C{bucket/prefix*}
        grants can list under their prefix.
    """
    return any(
        action_matches(granted, action) and resource_matches(resource, bucket, key)
        for granted, resource in policies
    )
