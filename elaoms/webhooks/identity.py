"""Who a post-call delivery is about."""

from __future__ import annotations

from typing import Any

from elaoms.memory.units import INITIATION_FAILURE
from elaoms.payloads import dig
from elaoms.phone import normalize_caller_id

# The seed's priority order: the caller ID ElevenLabs filled in for the call first,
# explicit user ids next, the raw phone number after, the conversation itself last.
_USER_ID_PATHS: tuple[tuple[str, ...], ...] = (
    ("conversation_initiation_client_data", "dynamic_variables", "system__caller_id"),
    ("conversation_initiation_client_data", "user_id"),
    ("metadata", "user_id"),
    ("conversation_initiation_client_data", "dynamic_variables", "user_id"),
    ("dynamic_variables", "user_id"),
    ("metadata", "caller_id"),
    ("metadata", "phone_call", "external_number"),
    ("user_id",),
)


def extract_user_id(data: dict[str, Any]) -> str | None:
    """The caller of a `post_call_transcription` (or similar) `data` object, normalized."""
    for path in _USER_ID_PATHS:
        value = dig(data, *path)
        if value not in (None, "") and isinstance(value, str | int):
            return normalize_caller_id(str(value))
    conversation_id = data.get("conversation_id")
    return str(conversation_id) if conversation_id else None


def extract_failed_call_party(data: dict[str, Any]) -> str | None:
    """The other party of a `call_initiation_failure`: who was called, or who called."""
    body = dig(data, "metadata", "body")
    if not isinstance(body, dict):  # ElevenLabs' own shape varies; a string was a 500
        body = {}
    direction = str(body.get("Direction") or body.get("direction") or "")
    number = body.get("To") if direction.startswith("outbound") else body.get("From")
    number = number or dig(data, "metadata", "phone_call", "external_number")
    if number and isinstance(number, str | int) and not isinstance(number, bool):
        return normalize_caller_id(str(number))
    return extract_user_id(data)


def caller_of(event_type: str | None, data: dict[str, Any]) -> str | None:
    """Whom a delivery of `event_type` is about (the other party of a failed call)."""
    if event_type == INITIATION_FAILURE:
        return extract_failed_call_party(data)
    return extract_user_id(data)
