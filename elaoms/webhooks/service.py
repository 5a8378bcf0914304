"""Post-call ingestion: keep every delivery on disk, then put it in the memory store.

A verified delivery is written to disk (and queued) before the webhook answers. Storing it
in the memory store runs with a short deadline: within it the answer says `received`, past
it `queued`, and the work goes on in the background with retries. A pending delivery
stays queued on disk until the store has it, through crashes and restarts.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from tenacity import AsyncRetrying, RetryError, stop_after_attempt, wait_exponential

from elaoms.config import Settings
from elaoms.memory.base import CallReceipt, Memory, MemoryStore, StoredCall
from elaoms.memory.units import INITIATION_FAILURE, TRANSCRIPTION, call_memories, failure_memories
from elaoms.operations.alerts import AlertSink
from elaoms.operations.cache import TwoLevelCache
from elaoms.operations.metrics import QUARANTINED, STORE_ERRORS, STORE_RETRIES
from elaoms.payloads import decode
from elaoms.phone import mask
from elaoms.webhooks.identity import caller_of
from elaoms.webhooks.schemas import (
    AUDIO,
    AudioData,
    Envelope,
    InitiationFailureData,
    TranscriptionData,
)
from elaoms.webhooks.storage import PendingDelivery, WebhookStorage

logger = logging.getLogger(__name__)

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

    status: str  # received | queued | quarantined
    memory_id: str | None = None
    detail: str | None = None

    def as_response(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": self.status}
        if self.memory_id:
            body["memory_id"] = self.memory_id
        if self.detail:
            body["detail"] = self.detail
        return body


class IngestService:
    def __init__(
        self,
        settings: Settings,
        store: MemoryStore,
        storage: WebhookStorage,
        hooks: list[CallStoredHook] | None = None,
        alerts: AlertSink | None = None,
        receipts: TwoLevelCache | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.storage = storage
        self.hooks = list(hooks or [])
        self.alerts = alerts or AlertSink()
        # Memory ids of stored deliveries, shared through Redis by every worker and replica:
        # a retried or replayed delivery is answered at once, without a second write.
        self.receipts = receipts or TwoLevelCache()
        self._tasks: set[asyncio.Task[Any]] = set()

    # Receiving ---------------------------------------------------------------------------
    async def receive(self, body: bytes) -> Acknowledgement:
        """Handle one verified delivery. Raises OSError only when our own disk fails."""
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

    def _quarantine(self, body: bytes, reason: str) -> Acknowledgement:
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
        if known := await self.receipts.get(_receipt_key(envelope.type, data.conversation_id)):
            return Acknowledgement(status="received", memory_id=known)
        user_id = caller_of(envelope.type, envelope.data) or data.conversation_id
        path = self.storage.delivery_path(user_id, envelope.type, data.conversation_id)
        # In a thread: three fsyncs per delivery on the event loop serialized every
        # delivery (and every other request) behind the disk.
        await asyncio.to_thread(self.storage.keep, path, body, pending=True)
        logger.info("%s %s for %s kept", envelope.type, data.conversation_id, mask(user_id))
        return await self._store_within_deadline(
            self.storage.pending_entry(path), data.conversation_id, envelope.type
        )

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
        delivery_id = str(data.get("conversation_id") or envelope.event_timestamp or "unknown")
        path = self.storage.delivery_path(user_id, envelope.type, delivery_id)
        await asyncio.to_thread(self.storage.keep, path, body, pending=False)
        if why := KEPT_NOT_INDEXED.get(envelope.type):
            logger.info("post-call %s kept as %s, not indexed (%s)", envelope.type, path.name, why)
            return Acknowledgement(
                status="received", detail=f"event type {envelope.type!r} kept, not indexed: {why}"
            )
        logger.warning("post-call event of unhandled type %r kept as %s", envelope.type, path.name)
        return Acknowledgement(
            status="received", detail=f"event type {envelope.type!r} kept, not processed"
        )

    async def claim_stored_audio(self) -> int:
        """File audio that waits for a transcription already stored (it came after it, while
        the store was too slow to say whose it was), so it is never dropped as unclaimed."""
        claimed = 0
        for path in self.storage.unclaimed_audio():
            call = await self._stored_call(path.stem)
            if call is not None and self.storage.claim_audio(path.stem, call.user_id):
                claimed += 1
        return claimed

    # Storing -----------------------------------------------------------------------------
    async def _store_within_deadline(
        self, entry: PendingDelivery, conversation_id: str, event_type: str
    ) -> Acknowledgement:
        stored: asyncio.Future[CallReceipt | None] = asyncio.get_running_loop().create_future()
        self._spawn(self._process_with_retries(entry, stored))
        try:
            receipt = await asyncio.wait_for(
                asyncio.shield(stored), timeout=self.settings.post_call_store_timeout_ms / 1000
            )
        except Exception:  # timed out, or the store failed: the retries go on
            return Acknowledgement(status="queued")
        if receipt is None:  # another worker holds this delivery: it was a duplicate
            call = await self._stored_call(conversation_id, event_type)
            if call is None:
                return Acknowledgement(status="queued")
            return Acknowledgement(status="received", memory_id=call.memory_id)
        return Acknowledgement(status="received", memory_id=receipt.memory_id)

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _process_with_retries(
        self, entry: PendingDelivery, stored: asyncio.Future[CallReceipt | None] | None = None
    ) -> None:
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(self.settings.max_retries + 1),
                wait=wait_exponential(multiplier=self.settings.retry_base_delay_seconds, max=60),
                reraise=False,
            ):
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        STORE_RETRIES.inc()
                    await self.process(entry, stored)
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
        self, entry: PendingDelivery, stored: asyncio.Future[CallReceipt | None] | None = None
    ) -> CallReceipt | None:
        """Store one pending delivery and run the hooks; None if another worker has it."""
        with self.storage.claim(entry) as body:
            if body is None:
                if stored is not None and not stored.done():
                    stored.set_result(None)
                return None
            payload = decode(body)
            user_id, memories = self._memories_of(payload)
            try:
                receipt = await self.store.add_call(user_id, payload, memories)
            except Exception:
                STORE_ERRORS.labels("add_call").inc()
                raise
            if stored is not None and not stored.done():
                stored.set_result(receipt)
            conversation_id = str((payload.get("data") or {}).get("conversation_id"))
            await self.receipts.set(
                _receipt_key(str(payload.get("type")), conversation_id),
                receipt.memory_id,
                ttl=self.settings.redis_ttl,
            )
            if payload.get("type") == TRANSCRIPTION:
                self.storage.claim_audio(conversation_id, user_id)
            for hook in self.hooks:
                await hook(user_id, payload, receipt)
            self.storage.done(entry)
            if receipt.created:
                logger.info("call %s stored for %s", receipt.memory_id, mask(user_id))
            return receipt

    def _memories_of(self, payload: dict[str, Any]) -> tuple[str, list[Memory]]:
        data = payload.get("data") or {}
        event_type = payload.get("type")
        user_id = caller_of(event_type, data) or str(data.get("conversation_id"))
        units = failure_memories if event_type == INITIATION_FAILURE else call_memories
        return user_id, units(user_id, payload)

    async def sweep(self) -> int:
        """Try every pending delivery once more; return how many were stored."""
        done = 0
        for entry in self.storage.pending():
            try:
                if await self.process(entry) is not None:
                    done += 1
            except Exception as error:  # stays pending for the next sweep
                logger.warning("pending delivery %s not stored yet: %s", entry.name, error)
        return done

    async def drain(self, timeout: float | None = 5.0) -> None:
        """Let in-flight background work finish (shutdown, tests); None waits for all."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout)


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
