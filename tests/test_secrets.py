# -*- test-case-name: tests.test_secrets -*-
"""
Tests for L{anvil.meta.secrets}.
"""

from __future__ import annotations

import os
import stat

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from anvil.errors import InvalidArgument, SecretKeyMismatch
from anvil.meta.database import Database
from anvil.meta.migrate import apply_migrations
from anvil.meta.secrets import (
    CHECK_SETTING,
    SecretBox,
    load_or_create_key_file,
    verify_or_record_key,
)
from tests.pg import fresh_database

KEY_A = "0123456789abcdef" * 4
KEY_B = "fedcba9876543210" * 4


class SecretBoxTests(SynchronousTestCase):
    """
    AES-256-GCM encryption with L{SecretBox}.
    """

    def test_round_trip(self) -> None:
        """
        What is encrypted with some associated data decrypts with it.
        """
        box = SecretBox.from_hex(KEY_A)
        blob = box.encrypt(b"secret", b"app-secret:AK1")
        self.assertNotIn(b"secret", blob)
        self.assertEqual(box.decrypt(blob, b"app-secret:AK1"), b"secret")

    def test_fresh_nonce(self) -> None:
        """
        Encrypting the same plaintext twice gives different blobs.
        """
        box = SecretBox.from_hex(KEY_A)
        self.assertNotEqual(box.encrypt(b"x", b""), box.encrypt(b"x", b""))

    def test_wrong_key(self) -> None:
        """
        A blob decrypted under another key raises L{SecretKeyMismatch} naming
        the key setting.
        """
        blob = SecretBox.from_hex(KEY_A).encrypt(b"secret", b"aad")
        e = self.assertRaises(SecretKeyMismatch, SecretBox.from_hex(KEY_B).decrypt, blob, b"aad")
        self.assertIn("ANVIL_SECRET_ENCRYPTION_KEY", str(e))

    def test_wrong_associated_data(self) -> None:
        """
        A blob moved to another owner (other associated data) does not
        decrypt.
        """
        box = SecretBox.from_hex(KEY_A)
        blob = box.encrypt(b"secret", b"app-secret:AK1")
        self.assertRaises(SecretKeyMismatch, box.decrypt, blob, b"app-secret:AK2")

    def test_tampered_or_truncated(self) -> None:
        """
        An altered or truncated blob raises L{SecretKeyMismatch}.
        """
        box = SecretBox.from_hex(KEY_A)
        blob = bytearray(box.encrypt(b"secret", b""))
        blob[-1] ^= 1
        self.assertRaises(SecretKeyMismatch, box.decrypt, bytes(blob), b"")
        self.assertRaises(SecretKeyMismatch, box.decrypt, bytes(blob[:10]), b"")

    def test_from_hex_validates(self) -> None:
        """
        C{from_hex} accepts exactly 64 hex characters (either case, outer
        whitespace ignored) and rejects anything else with L{InvalidArgument}.
        """
        SecretBox.from_hex(KEY_A.upper() + "\n")
        for bad in ("", KEY_A[:-1], KEY_A + "0", "g" * 64):
            e = self.assertRaises(InvalidArgument, SecretBox.from_hex, bad)
            self.assertIn("64 hex characters", str(e))

    def test_key_length(self) -> None:
        """
        A raw key must be 32 bytes.
        """
        self.assertRaises(InvalidArgument, SecretBox, b"short")


class KeyFileTests(SynchronousTestCase):
    """
    The embedded default's generated key file.
    """

    def test_created_private(self) -> None:
        """
        A missing key file is created with 64 hex characters, mode 0600, and
        no temporary file is left behind.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "secret.key")
        key = load_or_create_key_file(path)
        self.assertEqual(len(key), 32)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        with open(path) as f:
            self.assertEqual(f.read().strip(), key.hex())
        self.assertEqual(os.listdir(directory), ["secret.key"])

    def test_reused(self) -> None:
        """
        An existing key file is read, not replaced.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "secret.key")
        first = load_or_create_key_file(path)
        self.assertEqual(load_or_create_key_file(path), first)
        with open(path, "w") as f:
            f.write(KEY_B + "\n")
        self.assertEqual(load_or_create_key_file(path), bytes.fromhex(KEY_B))

    def test_invalid_file(self) -> None:
        """
        A key file that does not hold a key is an L{InvalidArgument} naming
        the file.
        """
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("not a key\n")
        e = self.assertRaises(InvalidArgument, load_or_create_key_file, path)
        self.assertIn(path, str(e))


class VerifyKeyTests(TestCase):
    """
    The cluster-wide key check against a real global database.
    """

    async def _database(self) -> Database:
        db = await Database.connect(fresh_database(self), reactor, pool_size=1)
        self.addCleanup(db.close)
        await apply_migrations(db, "global")
        return db

    async def test_record_then_verify(self) -> None:
        """
        The first call records a check value; later calls with the same key
        pass.
        """
        db = await self._database()
        await verify_or_record_key(db, SecretBox.from_hex(KEY_A))
        rows = await db.run_query("SELECT value FROM settings WHERE key = %s", (CHECK_SETTING,))
        self.assertEqual(len(rows), 1)
        await verify_or_record_key(db, SecretBox.from_hex(KEY_A))

    async def test_mismatch(self) -> None:
        """
        Another key is refused with L{SecretKeyMismatch}, and the recorded
        check value is kept.
        """
        db = await self._database()
        await verify_or_record_key(db, SecretBox.from_hex(KEY_A))
        with self.assertRaises(SecretKeyMismatch):
            await verify_or_record_key(db, SecretBox.from_hex(KEY_B))
        await verify_or_record_key(db, SecretBox.from_hex(KEY_A))
