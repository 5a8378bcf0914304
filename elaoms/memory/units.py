"""Break a post-call payload into searchable memories.

One memory per spoken transcript turn (with its call, role and time), one for the call's
summary, one per data-collection result. Search and profiles are built from these. The
payload is read through its `CallRecord`, so every value here is already checked and
capped (`elaoms.memory.records`).
"""

from __future__ import annotations

from typing import Any

from elaoms.memory.base import Memory
from elaoms.memory.records import INITIATION_FAILURE, TRANSCRIPTION, CallRecord

__all__ = [
    "INITIATION_FAILURE",
    "TRANSCRIPTION",
    "call_memories",
    "failure_memories",
    "record_memories",
]


def _base(record: CallRecord) -> dict[str, Any]:
    return {
        "conversation_id": record.conversation_id,
        "agent_id": record.agent_id,
        "event_type": record.event_type,
        "event_timestamp": record.event_timestamp,
        "call_started_at": record.started_at,
    }


def call_memories(user_id: str, payload: Any) -> list[Memory]:
    """The searchable units of one `post_call_transcription` envelope."""
    return record_memories(user_id, CallRecord.from_payload(payload))


def record_memories(user_id: str, record: CallRecord) -> list[Memory]:
    """The searchable units of one call, by its record (failed initiations included)."""
    if record.event_type == INITIATION_FAILURE:
        return _failure_memories(user_id, record)
    base = _base(record)
    conversation_id = record.conversation_id
    created_at = float(record.started_at or 0)
    memories: list[Memory] = [
        Memory(
            id=f"{conversation_id}#t{turn.index}",
            user_id=user_id,
            content=turn.message,
            metadata={
                **base,
                "kind": "turn",
                "role": turn.role,
                "turn_index": turn.index,
                "time_in_call_secs": turn.time_in_call_secs,
            },
            created_at=created_at + (turn.time_in_call_secs or 0),
        )
        for turn in record.turns
    ]
    if record.summary and record.summary.strip():
        memories.append(
            Memory(
                id=f"{conversation_id}#summary",
                user_id=user_id,
                content=record.summary.strip(),
                metadata={**base, "kind": "summary", "title": record.title},
                created_at=created_at,
            )
        )
    for key, value in record.collected.items():
        if value == "":
            continue
        memories.append(
            Memory(
                id=f"{conversation_id}#dc:{key}",
                user_id=user_id,
                content=f"{key}: {value}",
                metadata={**base, "kind": "data_collection", "field": key, "value": value},
                created_at=created_at,
            )
        )
    return memories


def failure_memories(user_id: str, payload: Any) -> list[Memory]:
    """The one unit of a `call_initiation_failure`: that a call did not connect, and why."""
    return _failure_memories(user_id, CallRecord.from_payload(payload))


def _failure_memories(user_id: str, record: CallRecord) -> list[Memory]:
    reason = record.failure_reason or "unknown"
    return [
        Memory(
            id=f"{record.conversation_id}#failure",
            user_id=user_id,
            content=f"A call could not be connected ({reason}).",
            metadata={
                "kind": "call_failure",
                "conversation_id": record.conversation_id,
                "agent_id": record.agent_id,
                "event_type": INITIATION_FAILURE,
                "event_timestamp": record.event_timestamp,
                "failure_reason": reason,
            },
            created_at=float(record.event_timestamp or 0),
        )
    ]
