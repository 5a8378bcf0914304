"""Who a post-call delivery is about, and from which namespace (`CallerIdentity`).

A phone caller comes only from what the telephony side reported: ElevenLabs'
`system__caller_id` or `metadata.phone_call.external_number` (a failed call's Twilio
`From`/`To`). A web or SDK conversation has neither; its `user_id` is whatever the browser
chose, so it becomes an app user ("user:<id>"), never a phone number. A withheld number
is nobody in particular: such a call is stored on its own, under its conversation id.
"""

from __future__ import annotations

from typing import Any

from elaoms.memory.units import INITIATION_FAILURE
from elaoms.payloads import dig
from elaoms.phone import NO_CALLER, WITHHELD, CallerIdentity, app_user, phone_caller

# What ElevenLabs itself reports about the phone line, most specific first.
_TELEPHONY_PATHS: tuple[tuple[str, ...], ...] = (
    ("conversation_initiation_client_data", "dynamic_variables", "system__caller_id"),
    ("metadata", "phone_call", "external_number"),
)
# On an outbound call the agent dials out: `system__caller_id` is then the agent's own line
# (Twilio's `From`), and the other party is the number called.
_OUTBOUND_PATHS: tuple[tuple[str, ...], ...] = (
    ("metadata", "phone_call", "external_number"),
    ("conversation_initiation_client_data", "dynamic_variables", "system__called_number"),
)
# Where a web/SDK application's own user id may arrive.
_APP_USER_PATHS: tuple[tuple[str, ...], ...] = (
    ("user_id",),
    ("conversation_initiation_client_data", "user_id"),
    ("metadata", "user_id"),
    ("conversation_initiation_client_data", "dynamic_variables", "user_id"),
)


def _present(value: Any) -> bool:
    return value not in (None, "") and isinstance(value, str | int) and not isinstance(value, bool)


def call_identity(data: dict[str, Any]) -> CallerIdentity:
    """The caller of a `post_call_transcription` (or similar) `data` object: the other
    party of the call, never the agent's own line (every call of the agent has that one:
    filed under it, everyone the agent called would share one memory)."""
    phone_call = dig(data, "metadata", "phone_call")
    phone_call = phone_call if isinstance(phone_call, dict) else None
    agent_line = None
    if phone_call is not None and _present(phone_call.get("agent_number")):
        agent_line = phone_caller(str(phone_call["agent_number"])).key
    direction = str((phone_call or {}).get("direction") or "").lower()
    for path in _OUTBOUND_PATHS if direction.startswith("outbound") else _TELEPHONY_PATHS:
        value = dig(data, *path)
        if _present(value):
            identity = phone_caller(str(value))
            if agent_line is not None and identity.key == agent_line:
                continue
            return identity
    if phone_call is not None:
        return WITHHELD  # a phone call without a number: the number was withheld
    for path in _APP_USER_PATHS:
        value = dig(data, *path)
        if _present(value):
            return app_user(value)
    return NO_CALLER


def failed_call_identity(data: dict[str, Any]) -> CallerIdentity:
    """The other party of a `call_initiation_failure`: who was called, or who called."""
    body = dig(data, "metadata", "body")
    if isinstance(body, dict):  # the provider's request; not a dict from every provider
        direction = str(body.get("Direction") or body.get("direction") or "")
        number = body.get("To") if direction.startswith("outbound") else body.get("From")
        if _present(number):
            return phone_caller(str(number))
    return call_identity(data)


def identity_of(event_type: str | None, data: dict[str, Any]) -> CallerIdentity:
    """Whom a delivery of `event_type` is about (the other party of a failed call)."""
    if event_type == INITIATION_FAILURE:
        return failed_call_identity(data)
    return call_identity(data)


def caller_of(event_type: str | None, data: dict[str, Any]) -> str | None:
    """The store key of whom a delivery is about: the caller's, else the conversation's
    (a withheld number is kept on its own, never merged with other withheld calls)."""
    conversation_id = data.get("conversation_id")
    key = identity_of(event_type, data).key
    return key or (str(conversation_id) if conversation_id else None)
