# -*- test-case-name: tests.test_errors -*-
"""
Domain exceptions shared by every part of Anvil.

Nothing here knows about HTTP: the S3 layer translates these into S3 error
documents, C{anvil-admin} prints them as one-line errors.  The C{str()} of
each exception is one complete sentence an operator can act on.
"""

from __future__ import annotations


class AnvilError(Exception):
    """
    Base class of Anvil's domain errors.

    @ivar message: the sentence C{str()} returns.
    """

    def __init__(self, message: str) -> None:
        """
        @param message: one sentence describing the problem.
        """
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _describe(kind: str, name: str, context: str | None) -> str:
    """
    Render C{Kind 'name'} plus an optional qualifier such as C{for app 'a'},
    capitalised to start a sentence.
    """
    text = f"{kind[:1].upper()}{kind[1:]} {name!r}"
    if context:
        text += f" {context}"
    return text


class NotFound(AnvilError):
    """
    A named thing (tenant, app, bucket, policy, ...) does not exist.

    @ivar kind: what was looked up, for example C{"tenant"}.
    @ivar name: the name that was looked up.
    """

    def __init__(self, kind: str, name: str, context: str | None = None) -> None:
        """
        @param kind: what was looked up, for example C{"tenant"}.
        @param name: the name that was looked up.
        @param context: an optional qualifier, for example C{"for app 'a'"}.
        """
        super().__init__(f"{_describe(kind, name, context)} does not exist.")
        self.kind = kind
        self.name = name


class AlreadyExists(AnvilError):
    """
    Creating a named thing failed because one with that name exists.

    @ivar kind: what was being created, for example C{"app"}.
    @ivar name: the name that is taken.
    """

    def __init__(self, kind: str, name: str, context: str | None = None) -> None:
        """
        @param kind: what was being created, for example C{"app"}.
        @param name: the name that is taken.
        @param context: an optional qualifier, for example C{"for app 'a'"}.
        """
        super().__init__(f"{_describe(kind, name, context)} already exists.")
        self.kind = kind
        self.name = name


class InvalidArgument(AnvilError):
    """
    An argument (a name, an action, a resource, a setting) is malformed.
    """


class DatabaseUnavailable(AnvilError):
    """
    PostgreSQL cannot be reached or did not answer in time.

    Callers treat this as temporary: the S3 layer answers 503, C{/ready}
    reports the database as failing, and the connection pool keeps trying to
    reconnect in the background.
    """


class SecretKeyMismatch(AnvilError):
    """
    Encrypted secrets cannot be decrypted with the configured key.
    """

    def __init__(self, message: str | None = None) -> None:
        """
        @param message: a more specific sentence; the default names
            C{ANVIL_SECRET_ENCRYPTION_KEY}.
        """
        super().__init__(
            message
            or "ANVIL_SECRET_ENCRYPTION_KEY does not match the key this "
            "cluster's secrets were encrypted with."
        )
