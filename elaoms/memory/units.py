"""Break a post-call payload into searchable memories.

One memory per spoken transcript turn (with its call, role and time), one for the call's
summary, one per data-collection result. Search and profiles are built from these.
"""

from __future__ import annotations

from typing import Any

from elaoms.memory.base import Memory

TRANSCRIPTION = "post_call_transcription"
INITIATION_FAILURE = "call_initiation_failure"


def call_started_at(data: dict[str, Any], event_timestamp: int | None) -> int | None:
    metadata = data.get("metadata") or {}
    started = metadata.get("start_time_unix_secs")
    if isinstance(started, int | float):
        return int(started)
    return int(event_timestamp) if isinstance(event_timestamp, int | float) else None


def call_memories(user_id: str, payload: dict[str, Any]) -> list[Memory]:
    """The searchable units of one `post_call_transcription` envelope."""
    data = payload.get("data") or {}
    conversation_id = str(data.get("conversation_id") or "")
    event_timestamp = payload.get("event_timestamp")
    started_at = call_started_at(data, event_timestamp)
    base = {
        "conversation_id": conversation_id,
        "agent_id": data.get("agent_id"),
        "event_type": payload.get("type", TRANSCRIPTION),
        "event_timestamp": event_timestamp,
        "call_started_at": started_at,
    }
    created_at = float(started_at or 0)
    memories: list[Memory] = []
    for index, turn in enumerate(data.get("transcript") or []):
        if not isinstance(turn, dict):
            continue
        message = turn.get("message")
        if not isinstance(message, str) or not message.strip():
            continue  # tool-only turns carry no words to search
        offset = turn.get("time_in_call_secs")
        memories.append(
            Memory(
                id=f"{conversation_id}#t{index}",
                user_id=user_id,
                content=message.strip(),
                metadata={
                    **base,
                    "kind": "turn",
                    "role": turn.get("role"),
                    "turn_index": index,
                    "time_in_call_secs": offset,
                },
                created_at=created_at + (offset if isinstance(offset, int | float) else 0),
            )
        )
    analysis = data.get("analysis") or {}
    summary = analysis.get("transcript_summary")
    if isinstance(summary, str) and summary.strip():
        memories.append(
            Memory(
                id=f"{conversation_id}#summary",
                user_id=user_id,
                content=summary.strip(),
                metadata={**base, "kind": "summary", "title": analysis.get("call_summary_title")},
                created_at=created_at,
            )
        )
    for key, result in (analysis.get("data_collection_results") or {}).items():
        value = result.get("value") if isinstance(result, dict) else result
        if value is None or value == "":
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


def failure_memories(user_id: str, payload: dict[str, Any]) -> list[Memory]:
    """The one unit of a `call_initiation_failure`: that a call did not connect, and why."""
    data = payload.get("data") or {}
    reason = data.get("failure_reason") or "unknown"
    return [
        Memory(
            id=f"{data.get('conversation_id')}#failure",
            user_id=user_id,
            content=f"A call could not be connected ({reason}).",
            metadata={
                "kind": "call_failure",
                "conversation_id": data.get("conversation_id"),
                "agent_id": data.get("agent_id"),
                "event_type": INITIATION_FAILURE,
                "event_timestamp": payload.get("event_timestamp"),
                "failure_reason": reason,
            },
            created_at=float(payload.get("event_timestamp") or 0),
        )
    ]
