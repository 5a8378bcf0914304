"""Webhook files on disk: the durable record of every delivery and the retry queue.

Layout under WEBHOOK_STORAGE_PATH:
    c_<hash>/<event_type>__<conversation_id>.json   every delivery, per caller
    c_<hash>/<conversation_id>.mp3                  audio claimed by its transcription
    _pending/<caller dir>__<file name>              hard link: not yet in the memory store
    _audio/<conversation_id>.mp3                    audio no transcription claimed yet
    _other/<event_type>__<id>.json                  deliveries that name no caller
The caller directory is a hash of the caller ID, so no phone number appears in a path;
with encryption at rest a keyed one (see `caller_dir_name`).
A pending entry is a hard link to the delivery file: creating it costs no second write,
and removing it once the store has the call leaves the record in place.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from elaoms.config import Settings
from elaoms.operations.crypto import (
    EncryptionConfigError,
    PayloadCipher,
    keyed_hash,
    new_hash_key,
)
from elaoms.operations.files import atomic_write, ensure_private_dir, fsync_dir

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")
OTHER_DIR = "_other"


# The random key of the caller directories' names, wrapped with ENCRYPTION_KEY.
CALLER_DIR_KEY_FILE = "_caller_dirs.key"


def caller_dir_name(user_id: str, key: bytes | None = None) -> str:
    """The caller's directory. Plain SHA-256 without `key`: a phone number's hash is
    reversed by hashing every number of a country in minutes, so with encryption at rest
    the name is keyed (`WebhookStorage` keeps the key)."""
    if key:
        return "c_" + keyed_hash(key, user_id)[-24:]
    return "c_" + hashlib.sha256(user_id.encode()).hexdigest()[:24]


def safe_name(value: str) -> str:
    cleaned = _SAFE_NAME.sub("_", value)[:120]
    if cleaned != value:
        cleaned += "-" + hashlib.sha256(value.encode()).hexdigest()[:8]
    return cleaned or hashlib.sha256(value.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class PendingDelivery:
    path: Path  # the _pending link

    @property
    def name(self) -> str:
        return self.path.name


class WebhookStorage:
    def __init__(self, settings: Settings, cipher: PayloadCipher) -> None:
        self.root = settings.webhook_storage_path
        self.quarantine_root = settings.webhook_quarantine_path
        self.pending_root = settings.pending_path
        self.audio_root = settings.audio_storage_path
        self.file_mode = settings.file_permissions_mode
        self.dir_mode = settings.directory_permissions_mode
        self.cipher = cipher
        self._dir_key: bytes | None = None

    def prepare(self) -> None:
        """Create the directories; raise OSError when the disk is not usable."""
        for directory in (self.root, self.pending_root, self.audio_root, self.quarantine_root):
            ensure_private_dir(directory, self.dir_mode)

    def _write(self, path: Path, data: bytes) -> Path:
        return atomic_write(path, self.cipher.encrypt(data), self.file_mode, self.dir_mode)

    def read(self, path: Path) -> bytes:
        return self.cipher.decrypt(path.read_bytes())

    # Caller directories ------------------------------------------------------------------
    def caller_dir(self, user_id: str) -> Path:
        """Where the caller's files are written: keyed name with encryption at rest."""
        key = self._caller_dir_key(create=True) if self.cipher.enabled else None
        return self.root / caller_dir_name(user_id, key)

    def caller_dirs(self, user_id: str) -> list[Path]:
        """Every directory that may hold the caller's files: the plain name holds what was
        written while encryption was off (before it was turned on, or after it was turned
        off again), the keyed one what was written while it was on."""
        directories = [self.caller_dir(user_id)]
        if key := self._caller_dir_key(create=False):
            directories.append(self.root / caller_dir_name(user_id, key))
        directories.append(self.root / caller_dir_name(user_id))
        return list(dict.fromkeys(directories))

    def _caller_dir_key(self, *, create: bool) -> bytes | None:
        if self._dir_key is None:
            path = self.root / CALLER_DIR_KEY_FILE
            try:
                token = path.read_bytes()
            except FileNotFoundError:
                if not create:
                    return None
                self._dir_key = self._create_caller_dir_key(path)
                return self._dir_key
            try:
                key = self.cipher.decrypt(token)
            except EncryptionConfigError:
                if self.cipher.enabled:
                    raise
                return None  # encryption off and its key gone: those files are unreadable too
            if self.cipher.enabled:
                # Re-wrapped with the first ENCRYPTION_KEY, so the old one can be dropped.
                atomic_write(path, self.cipher.encrypt(key), self.file_mode, self.dir_mode)
            self._dir_key = key
        return self._dir_key

    def _create_caller_dir_key(self, path: Path) -> bytes:
        """A new key, unless another worker created one first: theirs is used then."""
        temp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
        key = new_hash_key()
        atomic_write(temp, self.cipher.encrypt(key), self.file_mode, self.dir_mode)
        try:
            os.link(temp, path)
        except FileExistsError:
            key = self.cipher.decrypt(path.read_bytes())
        finally:
            temp.unlink(missing_ok=True)
        fsync_dir(path.parent)
        return key

    # Deliveries --------------------------------------------------------------------------
    def delivery_path(self, user_id: str | None, event_type: str, delivery_id: str) -> Path:
        directory = self.caller_dir(user_id).name if user_id else OTHER_DIR
        return self.root / directory / f"{safe_name(event_type)}__{safe_name(delivery_id)}.json"

    def keep(self, path: Path, body: bytes, *, pending: bool) -> Path:
        """Write a delivery durably; with `pending`, also queue it for the memory store."""
        self._write(path, body)
        if pending:
            ensure_private_dir(self.pending_root, self.dir_mode)
            with contextlib.suppress(FileExistsError):  # the same delivery is already queued
                os.link(path, self.pending_entry(path).path)
            fsync_dir(self.pending_root)
        return path

    def pending_entry(self, path: Path) -> PendingDelivery:
        """The queue entry of the delivery kept at `path` (whether it exists or not)."""
        return PendingDelivery(self.pending_root / f"{path.parent.name}__{path.name}")

    def pending(self) -> list[PendingDelivery]:
        if not self.pending_root.exists():
            return []
        entries = [p for p in self.pending_root.iterdir() if p.is_file()]
        entries.sort(key=lambda p: p.stat().st_mtime)
        return [PendingDelivery(path) for path in entries]

    @contextmanager
    def claim(self, entry: PendingDelivery) -> Iterator[bytes | None]:
        """Lock a pending delivery for this process; yields None if another one holds it
        or it is already done. The lock dies with the process, so a crash frees it."""
        try:
            handle = open(entry.path, "rb")  # noqa: SIM115 - held for the lock's lifetime
        except FileNotFoundError:
            yield None
            return
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield None
                return
            if not entry.path.exists():  # finished by someone else while we opened it
                yield None
                return
            yield self.cipher.decrypt(handle.read())

    def done(self, entry: PendingDelivery) -> None:
        entry.path.unlink(missing_ok=True)

    def files_of(self, user_id: str) -> list[Path]:
        return sorted(
            path
            for directory in self.caller_dirs(user_id)
            if directory.exists()
            for path in directory.iterdir()
        )

    def forget(self, user_id: str) -> list[Path]:
        """Delete every file kept for a caller, and their pending links."""
        removed: list[Path] = []
        for directory in self.caller_dirs(user_id):
            if self.pending_root.exists():
                for link in self.pending_root.glob(f"{directory.name}__*"):
                    link.unlink(missing_ok=True)
            if directory.exists():
                for path in sorted(directory.iterdir()):
                    path.unlink(missing_ok=True)
                    removed.append(path)
                directory.rmdir()
        return removed

    # Quarantine --------------------------------------------------------------------------
    def quarantine(self, body: bytes, reason: str) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        digest = hashlib.sha256(body).hexdigest()[:16]
        path = self.quarantine_root / f"{stamp}-{digest}.body"
        self._write(path, body)
        self._write(
            path.with_suffix(".reason.json"),
            json.dumps({"reason": reason, "received_at": time.time(), "bytes": len(body)}).encode(),
        )
        return path

    # Audio -------------------------------------------------------------------------------
    def unclaimed_audio_path(self, conversation_id: str) -> Path:
        return self.audio_root / f"{safe_name(conversation_id)}.mp3"

    def claimed_audio_path(self, user_id: str, conversation_id: str) -> Path:
        return self.caller_dir(user_id) / f"{safe_name(conversation_id)}.mp3"

    def keep_audio(self, audio: bytes, conversation_id: str, user_id: str | None) -> Path:
        if user_id:
            return self._write(self.claimed_audio_path(user_id, conversation_id), audio)
        return self._write(self.unclaimed_audio_path(conversation_id), audio)

    def claim_audio(self, conversation_id: str, user_id: str) -> Path | None:
        """Move audio that arrived before its transcription into the caller's directory."""
        source = self.unclaimed_audio_path(conversation_id)
        if not source.exists():
            return None
        target = self.claimed_audio_path(user_id, conversation_id)
        ensure_private_dir(target.parent, self.dir_mode)
        try:
            os.replace(source, target)
        except FileNotFoundError:
            return None
        fsync_dir(target.parent)
        return target

    def drop_unclaimed_audio(self, older_than_seconds: float) -> int:
        cutoff = time.time() - older_than_seconds
        dropped = 0
        for path in self.audio_root.glob("*.mp3") if self.audio_root.exists() else ():
            if path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                dropped += 1
        return dropped
