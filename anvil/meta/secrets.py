# -*- test-case-name: tests.test_secrets -*-
"""
Encryption of secrets at rest (app secrets, the cluster CA's key).

SigV4 needs an app's secret itself to check a signature, so secrets cannot be
hashed: they are encrypted with AES-256-GCM under
C{ANVIL_SECRET_ENCRYPTION_KEY}.  Each ciphertext is bound by its associated
data to what it belongs to (an app's client id, say), so a ciphertext copied
onto another row does not decrypt.

A cluster-wide check value in the global database's C{settings} table makes
a node started with the wrong key fail at start-up with a clear message,
rather than later with signatures that never match.
"""

from __future__ import annotations

import binascii
import os
import re
import secrets as _random
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from anvil.errors import InvalidArgument, SecretKeyMismatch

_NONCE_SIZE = 12
_KEY_SIZE = 32
_HEX_KEY = re.compile(r"^[0-9a-fA-F]{64}$")

#: The C{settings} row holding the key check value, and what it encrypts.
CHECK_SETTING = "secret_key_check"
_CHECK_PLAINTEXT = b"anvil secret encryption key check v1"
_CHECK_AAD = b"settings:" + CHECK_SETTING.encode("ascii")


class SecretBox:
    """
    AES-256-GCM encryption under one key.

    Blobs are C{nonce || ciphertext-with-tag}; a fresh random 96-bit nonce
    is used for every encryption.
    """

    def __init__(self, key: bytes) -> None:
        """
        @param key: 32 bytes.
        @raise InvalidArgument: when C{key} is not 32 bytes long.
        """
        if len(key) != _KEY_SIZE:
            raise InvalidArgument(
                f"The secret encryption key must be {_KEY_SIZE} bytes, not {len(key)}."
            )
        self._aead = AESGCM(key)

    @classmethod
    def from_hex(cls, text: str) -> SecretBox:
        """
        Build a box from the 64 hex characters of C{ANVIL_SECRET_ENCRYPTION_KEY}.

        @raise InvalidArgument: when C{text} is not 64 hex characters.
        """
        text = text.strip()
        if not _HEX_KEY.match(text):
            raise InvalidArgument(
                "ANVIL_SECRET_ENCRYPTION_KEY must be 64 hex characters (a "
                f"256-bit key), not {len(text)} characters."
            )
        return cls(binascii.unhexlify(text))

    def encrypt(self, plaintext: bytes, aad: bytes) -> bytes:
        """
        Encrypt and authenticate C{plaintext}, binding it to C{aad}.

        @param aad: associated data that must be given again to decrypt.
        @return: C{nonce || ciphertext}.
        """
        nonce = os.urandom(_NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, plaintext, aad)

    def decrypt(self, blob: bytes, aad: bytes) -> bytes:
        """
        Decrypt a blob made by L{encrypt} with the same C{aad}.

        @raise SecretKeyMismatch: when the blob was encrypted under another
            key or for other associated data, or was altered.
        """
        blob = bytes(blob)
        if len(blob) < _NONCE_SIZE + 16:
            raise SecretKeyMismatch(
                "An encrypted secret is truncated and cannot be decrypted."
            )
        try:
            return self._aead.decrypt(blob[:_NONCE_SIZE], blob[_NONCE_SIZE:], aad)
        except InvalidTag:
            raise SecretKeyMismatch() from None


def load_or_create_key_file(path: str) -> bytes:
    """
    Read the key kept in C{path}, creating the file with a new random key
    (64 hex characters, mode 0600) when it does not exist.

    The file appears atomically: it is written under a temporary name and
    hard-linked into place, so a concurrent reader never sees half a key and
    two processes creating it at once end up sharing one key.

    @return: the 32-byte key.
    @raise InvalidArgument: when the existing file does not hold a key.
    """
    try:
        return _read_key_file(path)
    except FileNotFoundError:
        pass
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{_random.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(_random.token_hex(_KEY_SIZE) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            # link() fails if the name exists: whoever linked first wins.
            os.link(temporary, path)
        except FileExistsError:
            pass
        else:
            _fsync_directory(directory)
    finally:
        os.unlink(temporary)
    return _read_key_file(path)


def _read_key_file(path: str) -> bytes:
    with open(path) as f:
        text = f.read().strip()
    if not _HEX_KEY.match(text):
        raise InvalidArgument(
            f"The key file {path} must hold 64 hex characters (a 256-bit key)."
        )
    return binascii.unhexlify(text)


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def verify_or_record_key(global_db: Any, box: SecretBox) -> None:
    """
    Check that C{box}'s key is the cluster's key.

    The first node to call this records a check value encrypted under its
    key; every later call decrypts it.

    @param global_db: the global L{anvil.meta.database.Database}.
    @raise SecretKeyMismatch: when the check value does not decrypt.
    """
    # ON CONFLICT DO NOTHING: two first nodes racing both insert; one row
    # wins and both then check against it.
    await global_db.run_operation(
        "INSERT INTO settings (key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING",
        (CHECK_SETTING, box.encrypt(_CHECK_PLAINTEXT, _CHECK_AAD)),
    )
    rows = await global_db.run_query(
        "SELECT value FROM settings WHERE key = %s", (CHECK_SETTING,)
    )
    if box.decrypt(bytes(rows[0][0]), _CHECK_AAD) != _CHECK_PLAINTEXT:
        raise SecretKeyMismatch()
