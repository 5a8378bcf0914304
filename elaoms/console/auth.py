"""Who may use the console, and the ids it shows instead of phone numbers.

Everything is derived from one secret, the console's (`CONSOLE_SECRET`, else
`ADMIN_API_KEY`): changing it signs everyone out and changes every caller's page address.

- Sessions are a signed cookie (`<session id>.<expiry>.<HMAC>`), so every worker and
  replica accepts them without shared state; HttpOnly, SameSite=Strict, Secure over HTTPS.
- Every form carries a per-session CSRF token (an HMAC of the session id), and every
  POST must come from the console's own origin (Origin, else Referer).
- A caller is addressed by an opaque id: the caller id encrypted with AES-SIV, which is
  deterministic (one caller, one address) and read back on the server without an index.
  A phone number therefore never appears in a URL, so never in an access log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

COOKIE_NAME = "elaoms_console"
CSRF_FIELD = "csrf_token"
MAX_TRACKED_SOURCES = 10_000


def _derive(secret: str, purpose: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=purpose).derive(
        secret.encode()
    )


@dataclass(frozen=True, slots=True)
class Session:
    session_id: str
    expires_at: int

    @property
    def audit_id(self) -> str:
        """Names the session in audit lines without being usable to sign in."""
        return hashlib.sha256(self.session_id.encode()).hexdigest()[:10]


class ConsoleKeys:
    def __init__(self, secret: str, *, session_seconds: int) -> None:
        self._secret = secret
        self._session_key = _derive(secret, b"elaoms console session")
        self._ids = AESSIV(_derive(secret, b"elaoms console caller ids", 64))
        self.session_seconds = session_seconds

    # Sign-in -----------------------------------------------------------------------------
    def secret_matches(self, given: str) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), self._secret.encode())

    def new_session(self) -> tuple[Session, str]:
        """A session and the cookie value that carries it."""
        session = Session(secrets.token_urlsafe(18), int(time.time()) + self.session_seconds)
        body = f"{session.session_id}.{session.expires_at}"
        return session, f"{body}.{self._mac(body)}"

    def session_of(self, cookie: str | None) -> Session | None:
        """The session a cookie carries, or None when absent, forged or expired."""
        if not cookie or cookie.count(".") != 2:
            return None
        session_id, expires, mac = cookie.split(".")
        if not hmac.compare_digest(mac, self._mac(f"{session_id}.{expires}")):
            return None
        if not expires.isdigit() or int(expires) < time.time():
            return None
        return Session(session_id, int(expires))

    def csrf_token(self, session: Session) -> str:
        return self._mac(f"csrf:{session.session_id}")

    def csrf_matches(self, session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(str(token), self.csrf_token(session))

    def _mac(self, text: str) -> str:
        return hmac.new(self._session_key, text.encode(), hashlib.sha256).hexdigest()

    # Caller ids --------------------------------------------------------------------------
    def opaque_id(self, user_id: str) -> str:
        """The one place a caller id becomes the console's address for that caller."""
        token = self._ids.encrypt(user_id.encode(), None)
        return base64.urlsafe_b64encode(token).rstrip(b"=").decode()

    def user_id_of(self, opaque_id: str) -> str | None:
        """The caller id behind an opaque id, or None for anything we did not issue."""
        try:
            token = base64.urlsafe_b64decode(opaque_id + "=" * (-len(opaque_id) % 4))
            return self._ids.decrypt(token, None).decode()
        except (ValueError, InvalidTag, UnicodeDecodeError):
            return None


class SignInLimiter:
    """Refuses sign-in from a source address after too many failures in the window (per
    process; the anomaly monitor counts failures across workers and raises the alert)."""

    def __init__(self, max_failures: int, window_seconds: float) -> None:
        self.max_failures = max(1, max_failures)
        self.window_seconds = window_seconds
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def blocked(self, source: str) -> bool:
        with self._lock:
            failures = self._failures.get(source)
            if failures is None:
                return False
            self._prune(failures)
            if not failures:  # an address seen once must not stay in memory for good
                del self._failures[source]
                return False
            return len(failures) >= self.max_failures

    def failed(self, source: str) -> None:
        with self._lock:
            if len(self._failures) > MAX_TRACKED_SOURCES:  # many addresses: drop the stale
                for address, times in list(self._failures.items()):
                    self._prune(times)
                    if not times:
                        del self._failures[address]
            failures = self._failures.setdefault(source, deque())
            self._prune(failures)
            failures.append(time.monotonic())

    def _prune(self, failures: deque[float]) -> None:
        cutoff = time.monotonic() - self.window_seconds
        while failures and failures[0] < cutoff:
            failures.popleft()
