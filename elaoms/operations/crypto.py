"""Encryption at rest for webhook files, audio and stored payloads (Fernet).

`ENCRYPTION_KEY` holds one or more comma-separated Fernet keys: the first encrypts, all of
them decrypt, so a key is rotated by putting the new one first and keeping the old one
until `elaoms purge` or retention has aged out what it encrypted.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

# Every Fernet token starts with version byte 0x80, base64url-encoded as "gAAAAA".
_TOKEN_PREFIX = b"gAAAAA"


class EncryptionConfigError(ValueError):
    pass


class PayloadCipher:
    """Encrypts bytes when enabled; passes them through otherwise. Reads both forms, so
    turning encryption on does not make older plain files unreadable."""

    def __init__(self, keys: str = "", *, enabled: bool = False) -> None:
        self.enabled = enabled
        self._fernet: MultiFernet | None = None
        self._index_key: bytes | None = None
        if enabled and not keys.strip():
            raise EncryptionConfigError(
                "ENABLE_ENCRYPTION_AT_REST=true needs ENCRYPTION_KEY (generate one with "
                "`python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'`)"
            )
        if keys.strip():
            # Keyed hashes of words to search on (`blind`) use the first key, as encryption
            # does; rotating the key rebuilds them (the store writes them with profiles).
            first = next(k.strip() for k in keys.split(",") if k.strip())
            self._index_key = hashlib.sha256(b"elaoms blind index\0" + first.encode()).digest()
            try:
                self._fernet = MultiFernet(
                    [Fernet(k.strip()) for k in keys.split(",") if k.strip()]
                )
            except ValueError as error:
                raise EncryptionConfigError(
                    f"ENCRYPTION_KEY is not a valid Fernet key: {error}"
                ) from error

    def encrypt(self, data: bytes) -> bytes:
        if not self.enabled or self._fernet is None:
            return data
        return self._fernet.encrypt(data)

    def decrypt(self, data: bytes) -> bytes:
        if not data.startswith(_TOKEN_PREFIX):
            return data
        if self._fernet is None:
            raise EncryptionConfigError("found an encrypted file but ENCRYPTION_KEY is not set")
        try:
            return self._fernet.decrypt(data)
        except InvalidToken as error:
            raise EncryptionConfigError("no key in ENCRYPTION_KEY decrypts this file") from error

    def blind(self, word: str) -> str:
        """`word` as kept in a searchable column: itself, or with encryption on a keyed hash
        (an equal word finds it; the column alone does not reveal it)."""
        if not self.enabled or self._index_key is None:
            return word
        return hmac.new(self._index_key, word.encode(), hashlib.sha256).hexdigest()[:20]


def generate_key() -> str:
    return Fernet.generate_key().decode()


# Keyed hashes --------------------------------------------------------------------------
# Lookup keys that must not reveal what they stand for (a caller's number in a column, a
# forgotten conversation's id): HMAC-SHA256 under a random secret each store keeps, wrapped
# with ENCRYPTION_KEY when encryption is on (so rotating the Fernet keys keeps the hashes).
KEYED_HASH_PREFIX = "h1:"


def new_hash_key() -> bytes:
    return secrets.token_bytes(32)


def keyed_hash(key: bytes, value: str) -> str:
    return KEYED_HASH_PREFIX + hmac.new(key, value.encode(), hashlib.sha256).hexdigest()
