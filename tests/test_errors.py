# -*- test-case-name: tests.test_errors -*-
"""
Tests for L{anvil.errors}.
"""

from twisted.trial.unittest import SynchronousTestCase

from anvil.errors import (
    AlreadyExists,
    AnvilError,
    DatabaseUnavailable,
    InvalidArgument,
    NotFound,
    SecretKeyMismatch,
)


class ErrorMessageTests(SynchronousTestCase):
    """
    Each error's C{str()} is one sentence an operator can read.
    """

    def test_not_found(self) -> None:
        """
        L{NotFound} names the kind and the name, and keeps both as attributes.
        """
        e = NotFound("tenant", "x")
        self.assertEqual(str(e), "Tenant 'x' does not exist.")
        self.assertEqual((e.kind, e.name), ("tenant", "x"))

    def test_already_exists(self) -> None:
        """
        L{AlreadyExists} names the kind and the name.
        """
        self.assertEqual(str(AlreadyExists("app", "a")), "App 'a' already exists.")

    def test_context(self) -> None:
        """
        An optional context qualifies the name.
        """
        e = NotFound("policy", "* on *", "for app 'a'")
        self.assertEqual(str(e), "Policy '* on *' for app 'a' does not exist.")

    def test_message_errors(self) -> None:
        """
        L{InvalidArgument} and L{DatabaseUnavailable} carry their message.
        """
        self.assertEqual(str(InvalidArgument("Bad name.")), "Bad name.")
        self.assertEqual(str(DatabaseUnavailable("Down.")), "Down.")

    def test_secret_key_mismatch(self) -> None:
        """
        L{SecretKeyMismatch} names the setting to fix by default.
        """
        self.assertEqual(
            str(SecretKeyMismatch()),
            "ANVIL_SECRET_ENCRYPTION_KEY does not match the key this cluster's "
            "secrets were encrypted with.",
        )

    def test_hierarchy(self) -> None:
        """
        Every domain error is an L{AnvilError}, so callers can catch them all.
        """
        for error in (
            NotFound("a", "b"),
            AlreadyExists("a", "b"),
            InvalidArgument("x"),
            DatabaseUnavailable("x"),
            SecretKeyMismatch(),
        ):
            self.assertIsInstance(error, AnvilError)
