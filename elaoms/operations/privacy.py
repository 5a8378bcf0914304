"""Data-protection requests: forget a caller everywhere, or export all we hold about one.

Shared by `elaoms forget` / `elaoms export` and the admin endpoints, so both answer the
same request the same way. What we hold about a caller lives in four places: the memory
store (calls, memories, prepared profile), the webhook files on disk (deliveries and
audio, plus their pending links), audio still waiting for its transcription, and cached
profiles or greetings. Quarantined bodies that name the caller are included too: they are
the caller's data even though we could not process them.

Forgetting lasts: the caller's conversations are remembered as forgotten (keyed hashes of
their ids, never the number), so a replayed or backfilled copy is answered and not stored
again, while a new call from the same number is new memory. The store's -wal is
checkpointed after the delete, so no deleted row stays readable on disk.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

import phonenumbers

from elaoms.files import atomic_write
from elaoms.phone import default_region, mask
from elaoms.webhooks.storage import caller_dir_name, safe_name

if TYPE_CHECKING:
    from elaoms.services import Services

logger = logging.getLogger(__name__)

EXPORT_FORMAT = "elaoms.caller-export/1"
# In the data folder: the number of the last forget made on another replica applied here.
FORGETS_APPLIED = ".forgets-applied"
SHARED_FORGET_MIN_DAYS = 30


@dataclass
class ForgetReport:
    user_id: str
    store_items_deleted: int = 0
    conversations: list[str] = field(default_factory=list)
    files_deleted: list[str] = field(default_factory=list)
    unclaimed_audio_deleted: list[str] = field(default_factory=list)
    quarantined_deleted: list[str] = field(default_factory=list)
    cache_invalidated: bool = False

    @property
    def found_anything(self) -> bool:
        return bool(
            self.store_items_deleted
            or self.files_deleted
            or self.unclaimed_audio_deleted
            or self.quarantined_deleted
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "found_anything": self.found_anything}


async def forget_caller(services: Services, user_id: str) -> ForgetReport:
    """Delete everything about `user_id` in every store in use and say what went.

    Files go first: a pending delivery left on disk would put the caller back in the store
    at the next sweep. Other replicas delete the files they keep at their next maintenance
    pass (`apply_shared_forgets`).
    """
    report = ForgetReport(user_id=user_id)
    report.conversations = await _conversations_of(services, user_id)
    # First: a delivery of these conversations arriving meanwhile is no longer stored.
    await services.store.forget_conversations(report.conversations)
    await _forget_files(services, report)
    report.store_items_deleted = await services.store.delete_user(user_id)
    # Once all is gone here: its time then covers every call the deletion removed.
    await services.store.share_forget(
        user_id, report.conversations, keep_for=_shared_forget_lifetime(services)
    )
    services.indexes.forget(user_id)  # this process's copy of their search index
    await services.ingest.forget_receipts(report.conversations)
    report.cache_invalidated = await _invalidate_cache(services, user_id)
    logger.info(
        "forgot caller %s: %d store items, %d files",
        mask(user_id),
        report.store_items_deleted,
        len(report.files_deleted) + len(report.unclaimed_audio_deleted),
    )
    return report


async def apply_shared_forgets(services: Services) -> int:
    """Forgets made on any replica sharing this store, applied to this replica's own files
    (deliveries, pending links, unclaimed audio, quarantine) and caches; how many were
    read. Only files written before each forget go: a later call is new memory. The
    number of the last one applied is kept in the data folder, so a replica that was down
    catches up when it starts again."""
    storage = services.storage
    cursor = storage.root / FORGETS_APPLIED
    try:
        applied = int(cursor.read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        applied = 0
    requests = await services.store.forgets_after(applied)
    for request in requests:
        report = ForgetReport(user_id=request.user_id, conversations=list(request.conversation_ids))
        await _forget_files(services, report, before=request.requested_at)
        services.indexes.forget(request.user_id)
        await services.ingest.forget_receipts(report.conversations)
        if report.found_anything:
            logger.info(
                "applied the forget of caller %s: %d files",
                mask(request.user_id),
                len(report.files_deleted)
                + len(report.unclaimed_audio_deleted)
                + len(report.quarantined_deleted),
            )
        atomic_write(cursor, str(request.seq).encode(), storage.file_mode, storage.dir_mode)
    return len(requests)


def _shared_forget_lifetime(services: Services) -> float:
    """How long a forget is kept for the other replicas: until retention has removed each
    file it concerns, and at least SHARED_FORGET_MIN_DAYS (replicas may keep files longer,
    quarantine is not purged by retention, and a replica may be down for a while)."""
    days = max(services.settings.webhook_retention_days, SHARED_FORGET_MIN_DAYS)
    return days * 86400.0


async def _forget_files(
    services: Services, report: ForgetReport, *, before: float | None = None
) -> None:
    """This replica's files of `report`'s caller and conversations (written before
    `before`, when given)."""
    storage = services.storage
    removed = await asyncio.to_thread(storage.forget, report.user_id, before=before)
    report.files_deleted = [str(path) for path in removed]
    for conversation_id in report.conversations:
        audio = storage.unclaimed_audio_path(conversation_id)
        if audio.exists():
            audio.unlink(missing_ok=True)
            report.unclaimed_audio_deleted.append(str(audio))
    report.quarantined_deleted = [
        str(path)
        for path in await asyncio.to_thread(_forget_quarantined, services, report.user_id, before)
    ]


async def export_caller(
    services: Services, user_id: str, *, include_audio: bool = False
) -> dict[str, Any]:
    """Everything we hold about `user_id` as one JSON-ready document."""
    store = services.store
    calls = await store.list_calls(user_id)
    memories = await store.list_memories(user_id)
    profile = await store.get_caller_profile(user_id)
    stored = {(call.event_type, call.conversation_id) for call in calls}
    files = await asyncio.to_thread(_describe_files, services, user_id, stored, include_audio)
    return {
        "format": EXPORT_FORMAT,
        "user_id": user_id,
        "exported_at": int(time.time()),
        "memory_backend": store.name,
        "profile": profile,
        "calls": [
            {
                "conversation_id": call.conversation_id,
                "event_type": call.event_type,
                "agent_id": call.agent_id,
                "started_at": call.started_at,
                "event_timestamp": call.event_timestamp,
                "memory_id": call.memory_id,
                "payload": call.payload,
            }
            for call in calls
        ],
        "memories": [
            {
                "id": memory.id,
                "content": memory.content,
                "metadata": memory.metadata,
                "created_at": memory.created_at,
            }
            for memory in memories
        ],
        "files": files,
    }


async def _conversations_of(services: Services, user_id: str) -> list[str]:
    """The caller's conversations, from the store and from the delivery files (a delivery
    can be on disk and not yet in the store)."""
    ids = {call.conversation_id for call in await services.store.list_calls(user_id)}
    for path in services.storage.files_of(user_id):
        if path.suffix == ".json" and "__" in path.stem:
            body = _read_json(services, path)
            data = body.get("data") if isinstance(body, dict) else None
            if isinstance(data, dict) and data.get("conversation_id"):
                ids.add(str(data["conversation_id"]))
    return sorted(ids)


def _describe_files(
    services: Services,
    user_id: str,
    stored: set[tuple[str, str]],
    include_audio: bool,
) -> list[dict[str, Any]]:
    described: list[dict[str, Any]] = []
    for path in services.storage.files_of(user_id):
        stat = path.stat()
        entry: dict[str, Any] = {
            "path": str(path),
            "bytes": stat.st_size,
            "modified_at": int(stat.st_mtime),
        }
        if path.suffix == ".json":
            body = _read_json(services, path)
            data = body.get("data") if isinstance(body, dict) else None
            key = (
                str(body.get("type")) if isinstance(body, dict) else "",
                str(data.get("conversation_id")) if isinstance(data, dict) else "",
            )
            # A delivery the store has is already whole under `calls`; one it does not have
            # yet (still pending, or never storable) is only here.
            entry["in_store"] = key in stored
            if not entry["in_store"]:
                entry["content"] = body
        elif include_audio:
            entry["content_base64"] = base64.b64encode(services.storage.read(path)).decode()
        described.append(entry)
    return described


def _read_json(services: Services, path: Path) -> Any:
    try:
        return json.loads(services.storage.read(path))
    except (OSError, ValueError):
        return None


def _forget_quarantined(
    services: Services, user_id: str, before: float | None = None
) -> list[Path]:
    """Quarantined bodies that mention the caller (they never reached a caller directory),
    in any spelling of the number: each body is decrypted and every phone number in it is
    compared in E.164. `before`: only bodies quarantined before then."""
    root = services.storage.quarantine_root
    if not root.exists():
        return []
    removed: list[Path] = []
    for body_path in sorted(root.glob("*.body")):
        try:
            if before is not None and body_path.stat().st_mtime > before:
                continue
            body = services.storage.read(body_path)
        except (OSError, ValueError):
            continue
        if names_caller(body, user_id):
            removed.extend(services.storage.release(body_path))
    return removed


def names_caller(body: bytes, user_id: str) -> bool:
    """Whether `body` names the caller: their id as stored, its file-name and directory
    forms, or a phone number (in any spelling, URL-encoded too) equal to it in E.164."""
    needles = {user_id, safe_name(user_id), caller_dir_name(user_id)}
    if user_id.startswith("+"):
        needles.add(user_id[1:])
    text = body.decode("utf-8", errors="replace")
    if any(needle in text for needle in needles):
        return True
    if not user_id.startswith("+"):
        return False
    # Every spelling ends with the number's last four digits: only the text just before
    # each of their occurrences is parsed (running the phone-number matcher over megabytes
    # of base64 audio took seconds per body).
    last_four, position = user_id[-4:], 0
    while (position := text.find(last_four, position) + 1) > 0:
        window = unquote_plus(text[max(0, position - 48) : position + 3])
        for match in phonenumbers.PhoneNumberMatcher(
            window, default_region(), leniency=phonenumbers.Leniency.POSSIBLE
        ):
            found = phonenumbers.format_number(match.number, phonenumbers.PhoneNumberFormat.E164)
            if found == user_id:
                return True
    return False


async def _invalidate_cache(services: Services, user_id: str) -> bool:
    """Drop cached profiles and greetings when the service runs a cache (Redis or local)."""
    cache = getattr(services, "cache", None) or getattr(
        getattr(services, "personalization", None), "cache", None
    )
    invalidate = getattr(cache, "invalidate_caller", None)
    if invalidate is None:
        return False
    result = invalidate(user_id)
    if inspect.isawaitable(result):
        await result
    return True
