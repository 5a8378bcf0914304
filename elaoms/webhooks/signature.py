"""ElevenLabs webhook signatures: `ElevenLabs-Signature: t=<unix secs>,v0=<hex>`.

The hex is HMAC-SHA256(secret, "<t>.<raw body>"). The header is checked before the body is
read, and the body is fed to the MAC as it streams in, so a 50 MB audio delivery is never
held twice.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from dataclasses import dataclass

SIGNATURE_HEADER = "ElevenLabs-Signature"


class SignatureError(Exception):
    """Why a delivery's signature was refused; the message is safe to return."""


@dataclass(frozen=True, slots=True)
class SignatureHeader:
    timestamp: int
    signatures: tuple[str, ...]


# Strict ASCII: int() takes "1_700_000_000" and non-ASCII digits, and a non-ASCII v0 made
# hmac.compare_digest raise TypeError (a 500 that escaped the auth-failure count).
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")
_MAX_SIGNATURES = 8


def parse_signature_header(header: str | None) -> SignatureHeader:
    if not header:
        raise SignatureError(f"Missing {SIGNATURE_HEADER} header")
    timestamp: int | None = None
    signatures: list[str] = []
    for part in header.split(",", 2 * _MAX_SIGNATURES)[: 2 * _MAX_SIGNATURES]:
        key, _, value = part.strip().partition("=")
        value = value.strip()
        if key == "t":
            if not _TIMESTAMP.fullmatch(value):
                raise SignatureError("Malformed signature header: t is not a unix timestamp")
            timestamp = int(value)
        elif key == "v0" and value:
            value = value.lower()
            if not _HEX_DIGEST.fullmatch(value):
                raise SignatureError("Malformed signature header: v0 is not a hex SHA-256 digest")
            signatures.append(value)
    if timestamp is None or not signatures:
        raise SignatureError("Malformed signature header: expected t=<timestamp>,v0=<hex>")
    return SignatureHeader(timestamp=timestamp, signatures=tuple(signatures))


def check_timestamp(
    timestamp: int, *, max_age: int, max_future: int, now: float | None = None
) -> None:
    current = time.time() if now is None else now
    if timestamp < current - max_age:
        raise SignatureError("Stale signature timestamp: older than the allowed window")
    if timestamp > current + max_future:
        raise SignatureError("Signature timestamp is in the future")


class SignatureVerifier:
    """Incremental HMAC over `"{t}." + body` for one delivery."""

    def __init__(self, secret: str, header: SignatureHeader) -> None:
        self._header = header
        self._mac = hmac.new(secret.encode(), f"{header.timestamp}.".encode(), hashlib.sha256)

    def update(self, chunk: bytes) -> None:
        self._mac.update(chunk)

    def verify(self) -> None:
        expected = self._mac.hexdigest()
        if not any(hmac.compare_digest(expected, given) for given in self._header.signatures):
            raise SignatureError("Invalid signature")


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The header value ElevenLabs would send for `body`; used by tests, the CLI and benches."""
    t = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v0={digest}"
