"""Post-call ingestion: keep every delivery on disk, then put it in the memory store.

A verified delivery is written to disk (and queued) before the webhook answers. Storing it
in the memory store runs with a short deadline: within it the answer says `received`, past
it `queued`, and the work goes on in the background with retries. A pending delivery
stays queued on disk until the store has it, through crashes and restarts, but not for
ever: one that makes storing fail (the payload, not the store) goes to quarantine at once,
one that keeps failing otherwise after MAX_DELIVERY_ATTEMPTS tries, and one waiting for a
store that stays down after PENDING_MAX_AGE_SECONDS; each with its reason and an alert.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import ValidationError
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_not_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from elaoms.config import Settings
from elaoms.crypto import EncryptionConfigError
from elaoms.memory.base import (
    CallReceipt,
    HistoryRead,
    Memory,
    MemoryStore,
    StoredCall,
    StoreUnavailableError,
)
from elaoms.memory.records import CallRecord
from elaoms.memory.units import INITIATION_FAILURE, TRANSCRIPTION, record_memories
from elaoms.operations.alerts import AlertSink
from elaoms.operations.cache import TwoLevelCache
from elaoms.operations.metrics import QUARANTINED, STORE_ERRORS, STORE_RETRIES
from elaoms.payloads import decode
from elaoms.phone import mask, mask_phone_numbers
from elaoms.search.indexes import CallerIndexes
from elaoms.webhooks.identity import caller_of
from elaoms.webhooks.schemas import (
    AUDIO,
    AudioData,
    Envelope,
    InitiationFailureData,
    TranscriptionData,
)
from elaoms.webhooks.storage import (
    IncomingBody,
    PendingDelivery,
    QueuedDelivery,
    WebhookStorage,
)
from elaoms.webhooks.streaming import AUDIO_KEY, AUDIO_MARKER, SplitBody, split_audio

# Failures of the store or the set-up (down, slow, locked, a full disk, a missing key):
# the delivery waits for them to be fixed.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    StoreUnavailableError,
    OSError,
    TimeoutError,
    ConnectionError,
    EncryptionConfigError,
)
# Failures the payload causes in our own code: every retry would fail the same way.
PAYLOAD_ERRORS: tuple[type[BaseException], ...] = (
    TypeError,
    ValueError,
    KeyError,
    IndexError,
    AttributeError,
    OverflowError,
    RecursionError,
)

logger = logging.getLogger(__name__)

# The most of a delivery parsed in memory: everything but its audio, which is decoded from
# the file as it is read. A transcript of several hours is a few megabytes.
MAX_PARSED_BODY_BYTES = 32 * 1024 * 1024

# Event types ElevenLabs documents that never become memory: kept on disk (under the
# caller's directory when the body names one, so forget, export and retention cover them),
# logged, and answered 200. Unredacted bodies hold what the workspace chose to redact:
# search and greetings only ever use the redacted transcript.
KEPT_NOT_INDEXED = {
    "answering_machine_detection": "an outbound call reached voicemail; no conversation",
    "unredacted_transcript": "unredacted; search and greetings use the redacted one",
    "unredacted_audio": "unredacted; recordings come from post_call_audio",
}

# Called after a call is in the store (profile preparation, agent refresh). Runs outside
# the webhook's deadline; a failure leaves the delivery pending so it runs again.
CallStoredHook = Callable[[str, dict[str, Any], CallReceipt], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Acknowledgement:
    """What the post-call webhook answers (always with HTTP 200)."""

    status: str  # received | queued | quarantined | forgotten
    memory_id: str | None = None
    detail: str | None = None

    def as_response(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": self.status}
        if self.memory_id:
            body["memory_id"] = self.memory_id
        if self.detail:
            body["detail"] = self.detail
        return body


class DeliveryQuarantinedError(Exception):
    """A pending delivery was moved to quarantine instead of being stored."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class IngestService:
    def __init__(
        self,
        settings: Settings,
        store: MemoryStore,
        storage: WebhookStorage,
        hooks: list[CallStoredHook] | None = None,
        alerts: AlertSink | None = None,
        receipts: TwoLevelCache | None = None,
        indexes: CallerIndexes | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        # Told of every stored call, so the caller's saved search index is brought up to
        # date by the upkeep, off the delivery's path and once for several calls.
        self.indexes = indexes
        self.storage = storage
        self.hooks = list(hooks or [])
        # What the hooks read next of a call's caller's calls (given the caller and the
        # event type), for the store to read with the call's insert; None: nothing.
        self.history_read: Callable[[str, str], HistoryRead | None] | None = None
        self.alerts = alerts or AlertSink()
        # Memory ids of stored deliveries, shared through Redis by every worker and replica:
        # a retried or replayed delivery is answered at once, without a second write.
        self.receipts = receipts or TwoLevelCache()
        self._tasks: set[asyncio.Task[Any]] = set()

    # Receiving ---------------------------------------------------------------------------
    async def receive(self, body: bytes | IncomingBody) -> Acknowledgement:
        """Handle one verified delivery. Raises OSError only when our own disk fails.

        The webhook hands over the file it streamed the body to (`IncomingBody`), so no
        body larger than a chunk is ever held whole; the CLI's backfill hands over bytes."""
        if isinstance(body, IncomingBody):
            return await self._receive_streamed(body)
        try:
            envelope = Envelope.model_validate_json(body)
        except ValidationError as error:
            return self._quarantine(body, _describe(error))
        if envelope.type == TRANSCRIPTION:
            return await self._receive_call(body, envelope, TranscriptionData)
        if envelope.type == AUDIO:
            return await self._receive_audio(body, envelope)
        if envelope.type == INITIATION_FAILURE:
            return await self._receive_call(body, envelope, InitiationFailureData)
        return await self._receive_other(body, envelope)

    async def _receive_streamed(self, incoming: IncomingBody) -> Acknowledgement:
        body = incoming.held()
        if body is not None and AUDIO_KEY not in body:
            # Under a chunk, never written, and no audio to divert: what the split below
            # would hand over, without writing the body out and reading it back (a
            # transcription's whole cost before: 1 ms of CPU and two trips to a thread).
            return await self.receive(body)
        sink = _AudioSink(self.storage)
        try:
            await asyncio.to_thread(incoming.finish)
            split = await asyncio.to_thread(_split, incoming, sink)
            if split.too_large:
                return self._quarantine(
                    incoming,
                    f"body too large to process: more than {MAX_PARSED_BODY_BYTES} bytes "
                    "besides audio",
                )
            if not split.audio_values:  # the remainder is the body itself
                return await self.receive(split.remainder)
            try:
                envelope = Envelope.model_validate_json(split.remainder)
            except ValidationError as error:
                return self._quarantine(incoming, _describe(error))
            if envelope.type != AUDIO or envelope.data.get("full_audio") != AUDIO_MARKER:
                # A full_audio key elsewhere: bounded like any body, parsed as usual.
                return await self.receive(await asyncio.to_thread(incoming.read_all))
            if split.audio_error:
                return self._quarantine(incoming, split.audio_error)
            try:
                data = AudioData.model_validate(envelope.data)
            except ValidationError as error:
                return self._quarantine(incoming, _describe(error, prefix="data"))
            if await self._forgotten(data.conversation_id):
                return Acknowledgement(status="forgotten")
            call = await self._stored_call(data.conversation_id)
            user_id = call.user_id if call else None
            path = await asyncio.to_thread(
                self.storage.keep_audio, sink.file(), data.conversation_id, user_id
            )
            logger.info(
                "post-call audio for %s kept (%d bytes, %s)",
                data.conversation_id,
                split.audio_bytes,
                "claimed" if user_id else "awaiting its transcription",
            )
            return Acknowledgement(status="received", detail=f"audio kept as {path.name}")
        finally:
            sink.discard()

    def _quarantine(self, body: bytes | IncomingBody, reason: str) -> Acknowledgement:
        reason = mask_phone_numbers(reason)  # kept in a file and answered: no number in it
        try:
            path = self.storage.quarantine(body, reason)
        except OSError as error:
            if self.settings.alert_on_quarantine_failures:
                self.alerts.raise_alert(
                    "quarantine_write_failed",
                    "a signed payload could not be written to quarantine",
                    {"error": str(error), "reason": reason, "bytes": len(body)},
                )
            raise
        QUARANTINED.inc()
        logger.warning("post-call delivery quarantined (%s): %s", path.name, reason)
        return Acknowledgement(status="quarantined", detail=reason)

    async def _receive_call(
        self,
        body: bytes,
        envelope: Envelope,
        shape: type[TranscriptionData] | type[InitiationFailureData],
    ) -> Acknowledgement:
        """A delivery that becomes a stored call: kept and queued, then stored."""
        try:
            data = shape.model_validate(envelope.data)
        except ValidationError as error:
            return self._quarantine(body, _describe(error, prefix="data"))
        # Before the receipts: another worker's copy may still hold the forgotten memory id.
        if await self._forgotten(data.conversation_id):
            logger.info(
                "%s %s was forgotten: not stored again", envelope.type, data.conversation_id
            )
            return Acknowledgement(status="forgotten")
        if known := await self.receipts.get(_receipt_key(envelope.type, data.conversation_id)):
            return Acknowledgement(status="received", memory_id=known)
        user_id = caller_of(envelope.type, envelope.data) or data.conversation_id
        path = self.storage.delivery_path(user_id, envelope.type, data.conversation_id)
        # In a thread: three fsyncs per delivery on the event loop serialized every
        # delivery (and every other request) behind the disk.
        queued = await asyncio.to_thread(self.storage.keep_queued, path, body)
        logger.info("%s %s for %s kept", envelope.type, data.conversation_id, mask(user_id))
        return await self._store_within_deadline(queued, data.conversation_id, envelope.type)

    async def _receive_audio(self, body: bytes, envelope: Envelope) -> Acknowledgement:
        try:
            data = AudioData.model_validate(envelope.data)
            audio = base64.b64decode(data.full_audio, validate=True)
        except (ValidationError, binascii.Error, ValueError) as error:
            reason = (
                _describe(error, prefix="data")
                if isinstance(error, ValidationError)
                else (f"data.full_audio is not valid base64: {error}")
            )
            return self._quarantine(body, reason)
        if await self._forgotten(data.conversation_id):
            return Acknowledgement(status="forgotten")
        call = await self._stored_call(data.conversation_id)
        user_id = call.user_id if call else None
        path = await asyncio.to_thread(
            self.storage.keep_audio, audio, data.conversation_id, user_id
        )
        logger.info(
            "post-call audio for %s kept (%d bytes, %s)",
            data.conversation_id,
            len(audio),
            "claimed" if user_id else "awaiting its transcription",
        )
        return Acknowledgement(status="received", detail=f"audio kept as {path.name}")

    async def _forgotten(self, conversation_id: str) -> bool:
        """Whether the conversation was forgotten; False while the store is down (a store
        on a server, PostgreSQL): the delivery is then kept like any other, and storing it
        checks again in the same transaction (the store answers `forgotten` and the kept
        copy goes)."""
        try:
            return await self.store.is_forgotten(conversation_id)
        except TRANSIENT_ERRORS as error:
            logger.warning("forgotten conversations not checked (%s): delivery kept", error)
            return False

    async def _stored_call(
        self, conversation_id: str, event_type: str = TRANSCRIPTION
    ) -> StoredCall | None:
        """The stored call if the store answers quickly; None otherwise. Answers that use
        it can do without (audio is claimed by the sweep, a duplicate answers `queued`)."""
        try:
            return await asyncio.wait_for(
                self.store.get_call(conversation_id, event_type), timeout=0.5
            )
        except Exception:
            return None

    async def _receive_other(self, body: bytes, envelope: Envelope) -> Acknowledgement:
        data = envelope.data if isinstance(envelope.data, dict) else {}
        user_id = caller_of(envelope.type, data) if data else None
        delivery_id = str(data.get("conversation_id") or "")
        if not delivery_id:
            # Nothing names this delivery but its content: two different ones with the same
            # timestamp (or none) shared a file and the first was lost after its 200, while
            # a repeated one still lands on its own file.
            digest = hashlib.sha256(body).hexdigest()[:16]
            delivery_id = f"{envelope.event_timestamp or 'unknown'}-{digest}"
        path = self.storage.delivery_path(user_id, envelope.type, delivery_id)
        await asyncio.to_thread(self.storage.keep, path, body)
        if why := KEPT_NOT_INDEXED.get(envelope.type):
            logger.info("post-call %s kept as %s, not indexed (%s)", envelope.type, path.name, why)
            return Acknowledgement(
                status="received", detail=f"event type {envelope.type!r} kept, not indexed: {why}"
            )
        logger.warning("post-call event of unhandled type %r kept as %s", envelope.type, path.name)
        return Acknowledgement(
            status="received", detail=f"event type {envelope.type!r} kept, not processed"
        )

    async def claim_stored_audio(self) -> set[str]:
        """File audio that waits for a transcription already stored (it came after it, while
        the store was too slow to say whose it was), so it is never dropped as unclaimed.

        Background work: the store may take its time here. Returns the audio files (stems)
        whose call could not be looked up, which must not be dropped in this pass."""
        undecided: set[str] = set()
        for path in self.storage.unclaimed_audio():
            try:
                call = await asyncio.wait_for(self.store.get_call(path.stem), timeout=10)
            except Exception as error:
                logger.warning("audio %s not claimed yet: %s", path.name, error)
                undecided.add(path.stem)
                continue
            if call is not None:
                self.storage.claim_audio(path.stem, call.user_id)
        return undecided

    # Storing -----------------------------------------------------------------------------
    async def _store_within_deadline(
        self, queued: QueuedDelivery, conversation_id: str, event_type: str
    ) -> Acknowledgement:
        stored: asyncio.Future[CallReceipt | None] = asyncio.get_running_loop().create_future()
        task = self._spawn(self._process_with_retries(queued.entry, stored, queued.lock))
        # Released when its retries end, or if the task never ran (a shutdown).
        task.add_done_callback(lambda _: queued.release())
        try:
            receipt = await asyncio.wait_for(
                asyncio.shield(stored), timeout=self.settings.post_call_store_timeout_ms / 1000
            )
        except DeliveryQuarantinedError as error:
            return Acknowledgement(status="quarantined", detail=error.reason)
        except Exception:  # timed out, or the store failed: the retries go on
            return Acknowledgement(status="queued")
        if receipt is not None and receipt.forgotten:
            return Acknowledgement(status="forgotten")
        if receipt is None:  # another worker holds this delivery: it was a duplicate
            call = await self._stored_call(conversation_id, event_type)
            if call is None:
                return Acknowledgement(status="queued")
            return Acknowledgement(status="received", memory_id=call.memory_id)
        return Acknowledgement(status="received", memory_id=receipt.memory_id)

    def _spawn(self, coroutine: Awaitable[Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _process_with_retries(
        self,
        entry: PendingDelivery,
        stored: asyncio.Future[CallReceipt | None] | None = None,
        held: BinaryIO | None = None,
    ) -> None:
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.settings.max_retries + 1),
                wait=wait_exponential(multiplier=self.settings.retry_base_delay_seconds, max=60),
                retry=retry_if_not_exception_type(DeliveryQuarantinedError),
                reraise=False,
            ):
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        STORE_RETRIES.inc()
                    await self.process(entry, stored, held)
        except DeliveryQuarantinedError:
            pass  # logged, counted and alerted where it was quarantined
        except RetryError as error:
            logger.warning(
                "delivery %s still pending after %d attempts (%s); the sweep will retry it",
                entry.name,
                self.settings.max_retries + 1,
                error.last_attempt.exception(),
            )
        finally:
            if stored is not None and not stored.done():
                stored.set_exception(RuntimeError("not stored yet"))
                stored.exception()  # mark retrieved: the webhook may have stopped waiting

    async def process(
        self,
        entry: PendingDelivery,
        stored: asyncio.Future[CallReceipt | None] | None = None,
        held: BinaryIO | None = None,
    ) -> CallReceipt | None:
        """Store one pending delivery and run the hooks; None if another worker has it.
        `held`: the lock the receiver took when it queued the delivery."""
        with self.storage.claim(entry, held) as body:
            if body is None:
                if stored is not None and not stored.done():
                    stored.set_result(None)
                return None
            try:
                return await self._store(entry, body, stored)
            except Exception as error:
                self._after_failure(entry, body, error, stored)
                raise

    async def _store(
        self, entry: PendingDelivery, body: bytes, stored: asyncio.Future[CallReceipt | None] | None
    ) -> CallReceipt:
        payload = decode(body)
        record = CallRecord.from_payload(payload)
        user_id, memories = self._memories_of(payload, record)
        try:
            read = self.history_read(user_id, record.event_type) if self.history_read else None
            receipt = await self.store.add_call(user_id, record, payload, memories, read)
        except Exception:
            STORE_ERRORS.labels("add_call").inc()
            raise
        if receipt.created and self.indexes is not None:
            self.indexes.changed(user_id)
        if stored is not None and not stored.done():
            stored.set_result(receipt)
        conversation_id = record.conversation_id
        if receipt.forgotten:  # forgotten while it waited: its copy on disk goes too
            self.storage.done(entry)
            self.storage.delivery_path(user_id, record.event_type, conversation_id).unlink(
                missing_ok=True
            )
            return receipt
        await self.receipts.set(
            _receipt_key(record.event_type, conversation_id),
            receipt.memory_id,
            ttl=self.settings.redis_ttl,
        )
        if record.event_type == TRANSCRIPTION:
            self.storage.claim_audio(conversation_id, user_id)
        for hook in self.hooks:
            await hook(user_id, payload, receipt)
        self.storage.done(entry)
        if receipt.created:
            logger.info("call %s stored for %s", receipt.memory_id, mask(user_id))
        return receipt

    def _after_failure(
        self,
        entry: PendingDelivery,
        body: bytes,
        error: Exception,
        stored: asyncio.Future[CallReceipt | None] | None,
    ) -> None:
        """Count a failed try of `entry` (held by this process) and move it to quarantine
        when it cannot succeed: the payload breaks our code, it failed too often, or the
        store has been down for longer than a delivery may wait. Raises
        DeliveryQuarantinedError when it did."""
        description = f"{type(error).__name__}: {error}"[:300]
        try:
            attempts = self.storage.record_failure(entry, description)
        except OSError as disk_error:  # the try is not counted; it is retried all the same
            logger.warning("failed try of %s not counted: %s", entry.name, disk_error)
            return
        transient = isinstance(error, TRANSIENT_ERRORS)
        waited = time.time() - min(attempts.first_failed_at, _kept_at(entry))
        if isinstance(error, PAYLOAD_ERRORS) and not transient:
            reason = f"storing it failed ({description}): the payload breaks ingestion"
        elif not transient and attempts.count >= self.settings.max_delivery_attempts:
            reason = f"storing it failed {attempts.count} times; last: {description}"
        elif transient and waited >= self.settings.pending_max_age_seconds:
            reason = f"the store was unavailable for {waited:.0f} s; last: {description}"
        else:
            return
        try:
            path = self.storage.quarantine_pending(entry, body, reason)
        except OSError as disk_error:
            logger.warning("pending delivery %s not quarantined: %s", entry.name, disk_error)
            return
        QUARANTINED.inc()
        logger.warning("pending delivery %s quarantined as %s: %s", entry.name, path.name, reason)
        self.alerts.raise_alert(
            "delivery_quarantined",
            "a signed delivery could not be stored and was moved to quarantine",
            {"quarantined_as": path.name, "attempts": attempts.count, "reason": reason},
        )
        quarantined = DeliveryQuarantinedError(reason)
        if stored is not None and not stored.done():
            stored.set_exception(quarantined)
            stored.exception()  # mark retrieved: the webhook may have stopped waiting
        raise quarantined from error

    def _memories_of(
        self, payload: Any, record: CallRecord | None = None
    ) -> tuple[str, list[Memory]]:
        """The caller and the memories of a call (bench/load.py seeds a store with it)."""
        record = record or CallRecord.from_payload(payload)
        data = payload.get("data") if isinstance(payload, dict) else None
        data = data if isinstance(data, dict) else {}
        user_id = caller_of(record.event_type, data) or record.conversation_id
        if record.notes:
            # Field paths only: the values may be personal data.
            logger.warning(
                "call %s of %s read with corrections: %s",
                record.conversation_id,
                mask(user_id),
                "; ".join(record.notes[:10]),
            )
        return user_id, record_memories(user_id, record)

    async def sweep(self) -> int:
        """Try every pending delivery once more; return how many were stored."""
        done = 0
        for entry in self.storage.pending():
            try:
                if await self.process(entry) is not None:
                    done += 1
            except DeliveryQuarantinedError:
                pass  # logged, counted and alerted where it was quarantined
            except Exception as error:  # stays pending for the next sweep
                logger.warning("pending delivery %s not stored yet: %s", entry.name, error)
        return done

    async def requeue(self, path: Path) -> Acknowledgement:
        """Hand a quarantined body to ingestion again (after a fix or an outage), as if
        ElevenLabs had just delivered it. Accepted, it leaves quarantine. Refused again,
        ingestion has quarantined it anew with the current reason: under a new name (the
        old one goes), or under this very name within the same second (it stays)."""
        before = await asyncio.to_thread(path.stat)
        body = await asyncio.to_thread(self.storage.read, path)
        acknowledgement = await self.receive(body)
        if acknowledgement.status != "quarantined" or not _rewritten(path, before):
            await asyncio.to_thread(self.storage.release, path)
        return acknowledgement

    async def drain(self, timeout: float | None = 5.0) -> None:
        """Let in-flight background work finish (shutdown, tests); None waits for all."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)

    async def forget_receipts(self, conversation_ids: list[str]) -> None:
        """Drop the cached receipts of forgotten conversations (here and in Redis)."""
        for conversation_id in conversation_ids:
            for event_type in (TRANSCRIPTION, INITIATION_FAILURE):
                await self.receipts.delete(_receipt_key(event_type, conversation_id))


def _rewritten(path: Path, before: os.stat_result) -> bool:
    """Whether `path` was written anew since `before` (files are replaced, never edited)."""
    try:
        after = path.stat()
    except FileNotFoundError:
        return False
    return (after.st_ino, after.st_mtime_ns) != (before.st_ino, before.st_mtime_ns)


def _kept_at(entry: PendingDelivery) -> float:
    """When the delivery was written (its pending link shares the file's times)."""
    try:
        return entry.path.stat().st_mtime
    except OSError:
        return time.time()


class _AudioSink:
    """Decoded audio, to a temporary file next to the audio directory, created on the first
    bytes (most deliveries have none)."""

    def __init__(self, storage: WebhookStorage) -> None:
        self._storage = storage
        self._file: IncomingBody | None = None

    def file(self) -> IncomingBody:
        if self._file is None:
            self._file = self._storage.audio_file()
        return self._file

    def write(self, data: bytes) -> None:
        if self.file().write(data):
            self.file().flush()

    def discard(self) -> None:
        if self._file is not None:
            self._file.discard()


def _split(incoming: IncomingBody, sink: _AudioSink) -> SplitBody:
    """Decode the body's audio into `sink` while reading it; the rest is returned."""
    with incoming.open() as source:
        return split_audio(source, sink, max_remainder=MAX_PARSED_BODY_BYTES)


def _receipt_key(event_type: str, conversation_id: str) -> str:
    return f"elaoms:delivery:{event_type}:{conversation_id}"


def _describe(error: Exception, prefix: str = "") -> str:
    if isinstance(error, ValidationError):
        problems = []
        for item in error.errors()[:5]:
            location = ".".join(str(part) for part in item["loc"])
            if prefix:
                location = f"{prefix}.{location}" if location else prefix
            problems.append(f"{location or 'body'}: {item['msg']}")
        return "invalid payload: " + "; ".join(problems)
    return str(error)
