"""Webhook files on disk: the durable record of every delivery and the retry queue.

Layout under WEBHOOK_STORAGE_PATH:
    c_<hash>/<event_type>__<conversation_id>.json   every delivery, per caller
    c_<hash>/<conversation_id>.mp3                  audio claimed by its transcription
    _pending/<caller dir>__<file name>              hard link: not yet in the memory store
    _attempts/<pending entry name>                  failed tries of a pending delivery
    _audio/<conversation_id>.mp3                    audio no transcription claimed yet
    _other/<event_type>__<id>.json                  deliveries that name no caller
    _incoming/                                      bodies still arriving (temporary)
The caller directory is a hash of the caller ID, so no phone number appears in a path;
with encryption at rest a keyed one (see `caller_dir_name`).
A post-call body streams into `_incoming/` (encrypted when configured) while its signature
is computed; only a verified one is moved or copied on, so nothing unsigned gets a name.
A pending entry is a hard link to the delivery file: creating it costs no second write,
and removing it once the store has the call leaves the record in place.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from elaoms.config import Settings
from elaoms.crypto import (
    CHUNK_SIZE,
    ChunkWriter,
    EncryptionConfigError,
    PayloadCipher,
    keyed_hash,
    new_hash_key,
)
from elaoms.files import atomic_write, ensure_private_dir, fsync_dir

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")
OTHER_DIR = "_other"
INCOMING_DIR = "_incoming"
# A body still in _incoming/ this long after it was started belongs to a process that died.
STALE_INCOMING_SECONDS = 3600
# Quarantined bodies are `<UTC stamp>-<16 hex digits>.body` (see `quarantine`).
QUARANTINE_NAME = re.compile(r"^\d{8}T\d{6}-[0-9a-f]{16}$")


# The random key of the caller directories' names, wrapped with ENCRYPTION_KEY.
CALLER_DIR_KEY_FILE = "_caller_dirs.key"


def caller_dir_name(user_id: str, key: bytes | None = None) -> str:
    """The caller's directory. Plain SHA-256 without `key`: a phone number's hash is
    reversed by hashing every number of a country in minutes, so with encryption at rest
    the name is keyed (`WebhookStorage` keeps the key)."""
    if key:
        return "c_" + keyed_hash(key, user_id)[-24:]
    return "c_" + hashlib.sha256(user_id.encode()).hexdigest()[:24]


def _written_before(path: Path, before: float | None) -> bool:
    if before is None:
        return True
    try:
        return path.stat().st_mtime <= before
    except FileNotFoundError:
        return False


def safe_name(value: str) -> str:
    cleaned = _SAFE_NAME.sub("_", value)[:120]
    if cleaned != value:
        cleaned += "-" + hashlib.sha256(value.encode()).hexdigest()[:8]
    return cleaned or hashlib.sha256(value.encode()).hexdigest()[:16]


class StreamedFile:
    """A file written chunk by chunk through the cipher, under a temporary name until
    `WebhookStorage` moves it into place. Never holds more than one chunk in memory.

    The file is created with the first chunk written to it: a body smaller than a chunk
    (every delivery but audio) stays in memory until `finish`, and `held` hands it over
    without a write and a read back of the disk."""

    def __init__(self, path: Path, cipher: PayloadCipher, file_mode: int, dir_mode: int) -> None:
        self.path = path
        self._cipher = cipher
        self._file_mode = file_mode
        self._dir_mode = dir_mode
        self._handle: BinaryIO | None = None
        self._writer: ChunkWriter | None = None
        self._written = 0  # plain bytes handed to the writer
        self._buffer = bytearray()
        self.finished = False

    @property
    def size(self) -> int:
        """Plain bytes written so far."""
        return self._written + len(self._buffer)

    def __len__(self) -> int:
        return self.size

    def held(self) -> bytes | None:
        """The whole body when none of it has gone to the file (it is under a chunk and
        not finished); None once the file exists."""
        return bytes(self._buffer) if self._handle is None and not self.finished else None

    def write(self, data: bytes) -> bool:
        """Buffer `data`; True when a chunk is ready for `flush` (which does the I/O)."""
        self._buffer += data
        return len(self._buffer) >= CHUNK_SIZE

    def _file(self) -> ChunkWriter:
        if self._writer is None:
            ensure_private_dir(self.path.parent, self._dir_mode)
            # O_EXCL: a name taken by someone else fails loudly.
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, self._file_mode)
            self._handle = os.fdopen(fd, "wb")
            self._writer = self._cipher.writer(self._handle)
        return self._writer

    def flush(self) -> None:
        if self._buffer:
            self._file().write(bytes(self._buffer))
            self._written += len(self._buffer)
            self._buffer.clear()

    def finish(self) -> None:
        """Write the rest and close: after this the file is complete and readable. Not
        fsynced here: most bodies are read once and dropped; `sync` makes one durable."""
        if self.finished:
            return
        writer = self._file()  # created even when empty: `open` and `_place` need it
        self.flush()
        writer.close()
        assert self._handle is not None
        self._handle.close()
        self.finished = True

    def sync(self) -> None:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def open(self) -> io.BufferedReader:
        """The plain bytes, decrypted as they are read."""
        return self._cipher.reader(open(self.path, "rb"))

    def read_all(self) -> bytes:
        with self.open() as reader:
            return reader.read()

    def discard(self) -> None:
        """Drop the temporary file (a no-op once it has been moved into place, or when it
        was never created)."""
        if self._handle is None:
            return
        if not self._handle.closed:
            self._handle.close()
        self.path.unlink(missing_ok=True)


IncomingBody = StreamedFile


@dataclass(frozen=True, slots=True)
class DeliveryAttempts:
    """The failed tries of one pending delivery, kept on disk across restarts."""

    count: int
    first_failed_at: float
    last_error: str


@dataclass(frozen=True, slots=True)
class PendingDelivery:
    path: Path  # the _pending link

    @property
    def name(self) -> str:
        return self.path.name


@dataclass(frozen=True, slots=True)
class QueuedDelivery:
    """A delivery just kept and queued by its receiver, with the lock its receiver took
    before queueing it; no lock when an earlier copy was already queued (that one is
    claimed as usual). Closing the lock hands the entry to any sweep."""

    entry: PendingDelivery
    lock: BinaryIO | None

    def release(self) -> None:
        if self.lock is not None:
            self.lock.close()


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
        for directory in (
            self.root,
            self.root / INCOMING_DIR,
            self.pending_root,
            self.audio_root,
            self.quarantine_root,
        ):
            ensure_private_dir(directory, self.dir_mode)
        self._drop_stale_incoming()

    # Bodies on their way in --------------------------------------------------------------
    def incoming(self) -> StreamedFile:
        """A temporary file for a post-call body that is still arriving."""
        return self._streamed(self.root / INCOMING_DIR, ".body")

    def audio_file(self) -> StreamedFile:
        """A temporary file for decoded audio, next to where audio is kept."""
        return self._streamed(self.audio_root, ".mp3")

    def _streamed(self, directory: Path, suffix: str) -> StreamedFile:
        # The directory and the file are made with the first chunk (StreamedFile._file):
        # nothing touches the disk for a body that stays in memory.
        path = directory / f".tmp-{secrets.token_hex(8)}{suffix}"
        return StreamedFile(path, self.cipher, self.file_mode, self.dir_mode)

    def _place(self, streamed: StreamedFile, target: Path) -> Path:
        """Move a finished streamed file to `target` (copied when on another disk)."""
        streamed.finish()
        streamed.sync()
        ensure_private_dir(target.parent, self.dir_mode)
        try:
            os.replace(streamed.path, target)
        except OSError as error:
            if error.errno != errno.EXDEV:
                raise
            temp = target.with_name(f".tmp-{os.urandom(6).hex()}{target.suffix}")
            try:
                with open(streamed.path, "rb") as source, open(temp, "xb") as copy:
                    os.fchmod(copy.fileno(), self.file_mode)
                    shutil.copyfileobj(source, copy, CHUNK_SIZE)
                    copy.flush()
                    os.fsync(copy.fileno())
                os.replace(temp, target)
            finally:
                temp.unlink(missing_ok=True)
            streamed.discard()
        fsync_dir(target.parent)
        return target

    def _drop_stale_incoming(self) -> None:
        cutoff = time.time() - STALE_INCOMING_SECONDS
        for directory in (self.root / INCOMING_DIR, self.audio_root):
            if not directory.exists():
                continue
            for path in directory.glob(".tmp-*"):
                with contextlib.suppress(OSError):
                    if path.stat().st_mtime < cutoff:
                        path.unlink()

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

    def keep(self, path: Path, body: bytes) -> Path:
        """Write a delivery durably, not queued for the memory store (`keep_queued`)."""
        return self._write(path, body)

    def keep_queued(self, path: Path, body: bytes) -> QueuedDelivery:
        """Write a delivery durably and queue it for the memory store, locked for its
        receiver from before it is queued: a sweep (of this worker or another) that took
        it between the two would leave the receiver unable to say it was stored."""
        self._write(path, body)
        lock = open(path, "rb")  # noqa: SIM115 - handed to the receiver
        entry = self.pending_entry(path)
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # another receiver of this very delivery, this instant
                lock.close()
            ensure_private_dir(self.pending_root, self.dir_mode)
            with contextlib.suppress(FileExistsError):  # an earlier copy is queued
                os.link(path, entry.path)
            fsync_dir(self.pending_root)
        except BaseException:
            lock.close()
            raise
        # The lock is the receiver's only if the queue names the file it holds: another
        # receiver of the same delivery may have replaced `path` since the write, or an
        # earlier copy be queued. Without it, the entry is claimed as usual.
        if lock.closed or not _names(entry.path, lock):
            lock.close()
            return QueuedDelivery(entry, None)
        return QueuedDelivery(entry, lock)

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
    def claim(self, entry: PendingDelivery, held: BinaryIO | None = None) -> Iterator[bytes | None]:
        """Lock a pending delivery for this process; yields None if another one holds it
        or it is already done. The lock dies with the process, so a crash frees it.
        `held`: the lock its receiver already has (`keep_queued`), left open for its retries."""
        if held is not None:
            yield self._claimed_body(entry, held)
            return
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
            yield self._claimed_body(entry, handle)

    def _claimed_body(self, entry: PendingDelivery, lock: BinaryIO) -> bytes | None:
        """The body of the file `lock` holds; None when the queue no longer names it:
        finished by another meanwhile, or forgotten and queued anew."""
        if not _names(entry.path, lock):
            return None
        lock.seek(0)  # a receiver's lock is read again by each of its retries
        return self.cipher.decrypt(lock.read())

    def done(self, entry: PendingDelivery) -> None:
        entry.path.unlink(missing_ok=True)
        self._attempts_path(entry).unlink(missing_ok=True)

    # Failed tries of pending deliveries: a small file per entry, beside `_pending/` so
    # that listing the queue is unchanged; it goes with the entry.
    def _attempts_path(self, entry: PendingDelivery) -> Path:
        return self.root / "_attempts" / entry.name

    def record_failure(self, entry: PendingDelivery, error: str) -> DeliveryAttempts:
        """Count one more failed try of `entry` (call it while holding its claim)."""
        path = self._attempts_path(entry)
        previous = self.attempts(entry)
        attempts = DeliveryAttempts(
            count=(previous.count if previous else 0) + 1,
            first_failed_at=previous.first_failed_at if previous else time.time(),
            last_error=error[:500],
        )
        # Not fsynced: losing a count in a crash only allows a try or two more.
        ensure_private_dir(path.parent, self.dir_mode)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(_as_dict(attempts)))
        os.chmod(temporary, self.file_mode)
        os.replace(temporary, path)
        return attempts

    def attempts(self, entry: PendingDelivery) -> DeliveryAttempts | None:
        try:
            saved = json.loads(self._attempts_path(entry).read_text())
            return DeliveryAttempts(
                int(saved["count"]), float(saved["first_failed_at"]), str(saved["last_error"])
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def quarantine_pending(self, entry: PendingDelivery, body: bytes, reason: str) -> Path:
        """Move a pending delivery that cannot be stored to quarantine with `reason`. Its
        file in the caller's directory stays (retention purges it in time)."""
        path = self.quarantine(body, reason)
        self.done(entry)
        return path

    def files_of(self, user_id: str) -> list[Path]:
        return sorted(
            path
            for directory in self.caller_dirs(user_id)
            if directory.exists()
            for path in directory.iterdir()
        )

    def forget(self, user_id: str, *, before: float | None = None) -> list[Path]:
        """Delete every file kept for a caller, and their pending links. `before`: only
        what was written before that time (what came later is a new call's)."""
        removed: list[Path] = []
        for directory in self.caller_dirs(user_id):
            if self.pending_root.exists():
                for link in self.pending_root.glob(f"{directory.name}__*"):
                    if _written_before(link, before):
                        self.done(PendingDelivery(link))
            if directory.exists():
                for path in sorted(directory.iterdir()):
                    if _written_before(path, before):
                        path.unlink(missing_ok=True)
                        removed.append(path)
                # Another worker applying the same forget, or a new delivery, may be here.
                with contextlib.suppress(OSError):
                    if not any(directory.iterdir()):
                        directory.rmdir()
        return removed

    # Quarantine --------------------------------------------------------------------------
    def quarantine(self, body: bytes | StreamedFile, reason: str) -> Path:
        """Keep a signed body we cannot process, with the reason. A streamed body is moved
        as it is, never read into memory."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        if isinstance(body, StreamedFile):
            # Not a content hash (that would mean reading it all): unique all the same.
            path = self.quarantine_root / f"{stamp}-{os.urandom(8).hex()}.body"
            self._place(body, path)
        else:
            digest = hashlib.sha256(body).hexdigest()[:16]
            path = self.quarantine_root / f"{stamp}-{digest}.body"
            self._write(path, body)
        self._write(
            path.with_suffix(".reason.json"),
            json.dumps({"reason": reason, "received_at": time.time(), "bytes": len(body)}).encode(),
        )
        return path

    def quarantined(self, name: str) -> Path:
        """The quarantined body called `name` (without `.body`); LookupError for a name
        `quarantine` never gives (a path, another directory) or one no longer there."""
        path = self.quarantine_root / f"{name}.body"
        if not QUARANTINE_NAME.match(name) or not path.is_file():
            raise LookupError(name)
        return path

    def release(self, path: Path) -> list[Path]:
        """Take a quarantined body and its reason out of quarantine; the files removed."""
        removed = []
        for done in (path, path.with_suffix(".reason.json")):
            with contextlib.suppress(FileNotFoundError):
                done.unlink()
                removed.append(done)
        return removed

    # Audio -------------------------------------------------------------------------------
    def unclaimed_audio_path(self, conversation_id: str) -> Path:
        return self.audio_root / f"{safe_name(conversation_id)}.mp3"

    def claimed_audio_path(self, user_id: str, conversation_id: str) -> Path:
        return self.caller_dir(user_id) / f"{safe_name(conversation_id)}.mp3"

    def keep_audio(
        self, audio: bytes | StreamedFile, conversation_id: str, user_id: str | None
    ) -> Path:
        if user_id:
            path = self.claimed_audio_path(user_id, conversation_id)
        else:
            path = self.unclaimed_audio_path(conversation_id)
        if isinstance(audio, StreamedFile):
            return self._place(audio, path)
        return self._write(path, audio)

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

    def unclaimed_audio(self) -> list[Path]:
        return sorted(self.audio_root.glob("*.mp3")) if self.audio_root.exists() else []

    def drop_unclaimed_audio(
        self, older_than_seconds: float, keep: Collection[str] = (), now: float | None = None
    ) -> int:
        """Delete audio no transcription claimed within `older_than_seconds` of `now`, but
        for the files named in `keep` (by stem: their call could not be looked up just now).
        `now` is when the claims began: audio that arrived since was not looked at."""
        cutoff = (time.time() if now is None else now) - older_than_seconds
        dropped = 0
        for path in self.unclaimed_audio():
            if path.stem not in keep and path.stat().st_mtime < cutoff:
                path.unlink(missing_ok=True)
                dropped += 1
        return dropped


def _names(path: Path, handle: BinaryIO) -> bool:
    """Whether `path` (still) names the file `handle` has open."""
    try:
        named = path.stat()
    except FileNotFoundError:
        return False
    opened = os.fstat(handle.fileno())
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _as_dict(attempts: DeliveryAttempts) -> dict[str, object]:
    return {
        "count": attempts.count,
        "first_failed_at": attempts.first_failed_at,
        "last_error": attempts.last_error,
    }
