"""Encryption at rest for webhook files, audio and stored payloads (Fernet).

`ENCRYPTION_KEY` holds one or more comma-separated Fernet keys: the first encrypts, all of
them decrypt, so a key is rotated by putting the new one first and keeping the old one
until `elaoms purge` or retention has aged out what it encrypted.

Two encrypted forms are read:
- a whole-file Fernet token (what every file was before streaming; `encrypt` still writes
  it for the small blobs the database keeps);
- the chunked form, written by `ChunkWriter` for bodies that are never held whole in
  memory (post-call deliveries, audio): `MAGIC`, then records of a 4-byte big-endian
  length and a Fernet token. Each token holds one chunk of at most `CHUNK_SIZE` bytes
  behind an 8-byte header (its index and a last-chunk flag), so chunks cannot be dropped,
  repeated or reordered, and a truncated file is refused instead of read short.
Plain files (written before encryption was turned on) read as they are; one whose own
first bytes would read as an encrypted form (our markers, or "gAAAAA") is written behind
`VERBATIM`, which reading strips.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import secrets
import struct
from typing import BinaryIO

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

# Every Fernet token starts with version byte 0x80, base64url-encoded as "gAAAAA".
_TOKEN_PREFIX = b"gAAAAA"
# Starts with bytes no JSON text, MP3 or Fernet token starts with.
MAGIC = b"\x00ELAOMS-CHUNKED-1\n"
VERBATIM = b"\x00ELAOMS-VERBATIM\n"
CHUNK_SIZE = 1024 * 1024
_RECORD = struct.Struct(">I")
_CHUNK_HEADER = struct.Struct(">IBxxx")  # index, last flag, padding
# A token of CHUNK_SIZE bytes is ~1.4 MB; anything far larger is not ours.
_MAX_TOKEN = 2 * CHUNK_SIZE + 4096


class EncryptionConfigError(ValueError):
    pass


class PayloadCipher:
    """Encrypts bytes when enabled; passes them through otherwise. Reads both forms, so
    turning encryption on does not make older plain files unreadable."""

    def __init__(self, keys: str = "", *, enabled: bool = False) -> None:
        self.enabled = enabled
        self._fernet: MultiFernet | None = None
        if enabled and not keys.strip():
            raise EncryptionConfigError(
                "ENABLE_ENCRYPTION_AT_REST=true needs ENCRYPTION_KEY (generate one with "
                "`python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'`)"
            )
        if keys.strip():
            try:
                self._fernet = MultiFernet(
                    [Fernet(k.strip()) for k in keys.split(",") if k.strip()]
                )
            except ValueError as error:
                raise EncryptionConfigError(
                    f"ENCRYPTION_KEY is not a valid Fernet key: {error}"
                ) from error

    @property
    def encrypting(self) -> bool:
        return self.enabled and self._fernet is not None

    def encrypt(self, data: bytes) -> bytes:
        if not self.encrypting:
            return VERBATIM + data if _ambiguous(data) else data
        assert self._fernet is not None
        return self._fernet.encrypt(data)

    def decrypt(self, data: bytes) -> bytes:
        if data.startswith(VERBATIM):
            return data[len(VERBATIM) :]
        if data.startswith(MAGIC):
            return self.reader(io.BytesIO(data)).read()
        if not data.startswith(_TOKEN_PREFIX):
            return data
        return self._decrypt_token(data)

    # Streaming -----------------------------------------------------------------------------
    def writer(self, handle: BinaryIO) -> ChunkWriter:
        """Writes to `handle` what `reader` reads back: chunked tokens, or plain bytes."""
        return ChunkWriter(handle, self._fernet if self.encrypting else None)

    def reader(self, handle: BinaryIO) -> io.BufferedReader:
        """A file object that reads any form (chunked, whole-file token, plain) as plain
        bytes, holding at most one chunk (a whole-file token: the whole file)."""
        return io.BufferedReader(_DecryptingReader(self, handle), buffer_size=CHUNK_SIZE)

    def _decrypt_token(self, token: bytes) -> bytes:
        if self._fernet is None:
            raise EncryptionConfigError("found an encrypted file but ENCRYPTION_KEY is not set")
        try:
            return self._fernet.decrypt(token)
        except InvalidToken as error:
            raise EncryptionConfigError("no key in ENCRYPTION_KEY decrypts this file") from error


class ChunkWriter:
    """Buffers up to one chunk; `close()` writes the last one (and must be called)."""

    def __init__(self, handle: BinaryIO, fernet: MultiFernet | None) -> None:
        self._handle = handle
        self._fernet = fernet
        self._buffer = bytearray()
        self._index = 0
        self.plain_bytes = 0
        # Plain: the first bytes wait until they show whether they need VERBATIM.
        self._head: bytearray | None = None if fernet is not None else bytearray()
        if fernet is not None:
            handle.write(MAGIC)

    def write(self, data: bytes) -> None:
        self.plain_bytes += len(data)
        if self._fernet is None:
            if self._head is not None:
                self._head += data
                if len(self._head) >= len(_OURS):
                    self._write_head()
                return
            self._handle.write(data)
            return
        self._buffer += data
        while len(self._buffer) > CHUNK_SIZE:
            self._emit(bytes(self._buffer[:CHUNK_SIZE]), last=False)
            del self._buffer[:CHUNK_SIZE]

    def close(self) -> None:
        if self._fernet is not None:
            self._emit(bytes(self._buffer), last=True)
            self._buffer.clear()
        elif self._head is not None:
            self._write_head()
        self._handle.flush()

    def _write_head(self) -> None:
        assert self._head is not None
        head, self._head = bytes(self._head), None
        self._handle.write(VERBATIM + head if _ambiguous(head) else head)

    def _emit(self, chunk: bytes, *, last: bool) -> None:
        assert self._fernet is not None
        token = self._fernet.encrypt(_CHUNK_HEADER.pack(self._index, int(last)) + chunk)
        self._handle.write(_RECORD.pack(len(token)) + token)
        self._index += 1


class _DecryptingReader(io.RawIOBase):
    def __init__(self, cipher: PayloadCipher, handle: BinaryIO) -> None:
        self._cipher = cipher
        self._handle = handle
        self._pending = b""
        self._offset = 0
        self._mode: str | None = None  # chunked | whole | plain, known after the first read
        self._index = 0
        self._finished = False

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self._handle.close()
        super().close()

    def readinto(self, target: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._mode is None:
            self._start()
        if self._mode == "plain" and self._offset >= len(self._pending):
            data = self._handle.read(len(target))
            target[: len(data)] = data
            return len(data)
        while self._offset >= len(self._pending):
            if self._mode != "chunked" or self._finished:
                return 0
            self._pending, self._offset = self._next_chunk(), 0
        size = min(len(target), len(self._pending) - self._offset)
        target[:size] = self._pending[self._offset : self._offset + size]
        self._offset += size
        return size

    def _start(self) -> None:
        head = _read_exactly(self._handle, len(MAGIC))
        if head.startswith(VERBATIM):
            self._mode = "plain"
            self._pending = head[len(VERBATIM) :]
        elif head == MAGIC:
            self._mode = "chunked"
        elif head.startswith(_TOKEN_PREFIX):
            self._mode = "whole"
            self._pending = self._cipher._decrypt_token(head + self._handle.read())
        else:
            self._mode = "plain"
            self._pending = head

    def _next_chunk(self) -> bytes:
        record = _read_exactly(self._handle, _RECORD.size)
        if len(record) < _RECORD.size:
            raise EncryptionConfigError("encrypted file is truncated (no last chunk)")
        (length,) = _RECORD.unpack(record)
        token = _read_exactly(self._handle, length) if length <= _MAX_TOKEN else b""
        if len(token) != length or not length:
            raise EncryptionConfigError("encrypted file is damaged (bad chunk length)")
        plain = self._cipher._decrypt_token(token)
        index, last = _CHUNK_HEADER.unpack_from(plain)
        if index != self._index:
            raise EncryptionConfigError("encrypted file is damaged (chunks out of order)")
        self._index += 1
        if last:
            self._finished = True
            if self._handle.read(1):
                raise EncryptionConfigError("encrypted file is damaged (data after the end)")
        return plain[_CHUNK_HEADER.size :]


_OURS = b"\x00ELAOMS-"  # how MAGIC and VERBATIM start


def _ambiguous(plain: bytes) -> bool:
    """Plain bytes that would read as one of the encrypted forms."""
    return plain.startswith((_OURS, _TOKEN_PREFIX))


def _read_exactly(handle: BinaryIO, size: int) -> bytes:
    parts: list[bytes] = []
    remaining = size
    while remaining:
        data = handle.read(remaining)
        if not data:
            break
        parts.append(data)
        remaining -= len(data)
    return b"".join(parts)


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
