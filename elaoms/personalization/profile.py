"""A caller's profile, derived from their stored calls and nothing else.

Deriving it from every stored `post_call_transcription` (not patching the previous profile)
makes the post-call hook idempotent: replays, retries and backfills give the same profile.
"""

from __future__ import annotations

import re
import time
from collections.abc import Collection
from datetime import UTC, datetime
from typing import Any

from elaoms.memory.base import StoredCall
from elaoms.memory.units import TRANSCRIPTION
from elaoms.payloads import dig
from elaoms.phone import normalize_caller_id

RECENT_CALLS = 5

# Data-collection items that name the caller (not a patient, a pet or the agent).
NAME_ITEMS = ("caller_name", "customer_name", "user_name", "full_name", "name", "first_name")
# Dynamic variables a client-data answer or an integration may have set for the caller.
NAME_VARIABLES = ("system__caller_name", "caller_name", "customer_name", "user_name", "name")
FOLLOW_UP_ITEMS = ("follow_up", "follow_ups", "followup", "next_steps", "action_items")
# "there" is what agents commonly declare as the caller_name placeholder's default ("Hi
# there"); echoed back in a call's variables it must not become a name.
_EMPTY_VALUES = {"", "none", "n/a", "na", "null", "unknown", "no", "false", "-", "there"}

# Self-introductions in the caller's own turns. Deliberately narrow: "I'm at work" must not
# become a name, so "I'm ..." is not a pattern and every word must be capitalized.
_NAME_WORD = r"[A-Z][a-z]+(?:[-'][A-Z]?[a-z]+)?"
_INTRODUCTION = re.compile(
    rf"\b(?:[Mm]y name is|[Tt]his is|[Nn]ame's)\s+({_NAME_WORD}(?:\s+{_NAME_WORD})?)"
    r"(?=\s*(?:[,.!?;]|$|\s+(?:and|calling|here|from)\b))"
)
# What carriers put in the caller ID of a withheld number (Twilio's "+266696687" spells
# ANONYMOUS on a keypad). All such callers would share one profile: they are strangers.
WITHHELD_CALLER_IDS = frozenset(
    {
        "anonymous",
        "restricted",
        "private",
        "unknown",
        "unavailable",
        "blocked",
        "+266696687",
        "+7378742833",
        "+2562533",
        "+8656696",
    }
)

_NOT_NAMES = {"Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"}


def caller_identity(raw: str | None) -> str | None:
    """The caller's user id for personalization; None for a missing or withheld number."""
    user_id = normalize_caller_id(raw)
    if user_id is None or user_id.lower() in WITHHELD_CALLER_IDS:
        return None
    return user_id


def clean_value(value: Any) -> str | None:
    """A data-collection or variable value worth repeating, else None."""
    if value is None or isinstance(value, bool):
        return None
    text = " ".join(str(value).split())
    return None if text.lower().strip(".") in _EMPTY_VALUES else text


def collected(data: dict[str, Any], item_id: str) -> str | None:
    """The value of one data-collection item of a call."""
    result = dig(data, "analysis", "data_collection_results", item_id)
    return clean_value(result.get("value") if isinstance(result, dict) else result)


def transcription_calls(calls: list[StoredCall]) -> list[StoredCall]:
    """Only finished conversations count as calls (not audio, not failed initiations)."""
    calls = [call for call in calls if call.event_type == TRANSCRIPTION]
    return sorted(
        calls, key=lambda call: (call.started_at or 0, call.conversation_id), reverse=True
    )


def find_name(calls: list[StoredCall]) -> tuple[str | None, str | None]:
    """(name, source): data collection beats dynamic variables beats the transcript; within a
    source the newest call wins. `calls` are newest first."""
    datas = [call.payload.get("data") or {} for call in calls]
    for data in datas:
        for item in NAME_ITEMS:
            if name := collected(data, item):
                return name, "data_collection"
    for data in datas:
        variables = dig(data, "conversation_initiation_client_data", "dynamic_variables") or {}
        for variable in NAME_VARIABLES:
            if name := clean_value(variables.get(variable)):
                return name, "dynamic_variable"
    for data in datas:
        for turn in data.get("transcript") or []:
            if not isinstance(turn, dict) or turn.get("role") != "user":
                continue
            match = _INTRODUCTION.search(str(turn.get("message") or ""))
            if match and match.group(1).split()[0] not in _NOT_NAMES:
                return match.group(1), "transcript"
    return None, None


def follow_ups(data: dict[str, Any]) -> list[str]:
    items = []
    for item in FOLLOW_UP_ITEMS:
        value = collected(data, item)
        if value and value not in items:
            items.append(value)
    return items


def build_facts(user_id: str, calls: list[StoredCall]) -> dict[str, Any]:
    """Everything the greeting and user_context may say, from the stored calls only.

    Follow-ups come from the last call alone: a later call either dealt with an earlier
    promise or recorded it again, so older ones may be stale and must not be repeated.
    """
    calls = transcription_calls(calls)
    name, name_source = find_name(calls)
    recent = []
    for call in calls[:RECENT_CALLS]:
        analysis = dig(call.payload, "data", "analysis") or {}
        recent.append(
            {
                "conversation_id": call.conversation_id,
                "started_at": call.started_at,
                "title": clean_value(analysis.get("call_summary_title")),
                "summary": clean_value(analysis.get("transcript_summary")),
            }
        )
    last_data = (calls[0].payload.get("data") or {}) if calls else {}
    topics: list[str] = []
    for entry in recent:
        if entry["title"] and entry["title"] not in topics:
            topics.append(entry["title"])
    starts = [call.started_at for call in calls if call.started_at is not None]
    return {
        "user_id": user_id,
        "name": name,
        "name_source": name_source,
        "call_count": len(calls),
        "first_call_at": min(starts) if starts else None,
        "last_call_at": max(starts) if starts else None,
        "last_call_title": recent[0]["title"] if recent else None,
        "last_call_summary": recent[0]["summary"] if recent else None,
        "recent_summaries": recent,
        "topics": topics,
        "open_follow_ups": follow_ups(last_data),
        "last_conversation_id": calls[0].conversation_id if calls else None,
        "agent_id": calls[0].agent_id if calls else None,
        "language": clean_value(dig(last_data, "metadata", "main_language")),
    }


def last_agent_greeting(calls: list[StoredCall]) -> str | None:
    """What the agent said first in the caller's last call: the business's own words."""
    for call in transcription_calls(calls)[:1]:
        for turn in dig(call.payload, "data", "transcript") or []:
            if isinstance(turn, dict) and turn.get("role") == "agent" and turn.get("message"):
                return str(turn["message"])
    return None


def calls_text(calls: list[StoredCall], exclude_items: Collection[str] = ()) -> str:
    """Every word of the caller's calls a greeting may repeat (for the fact check), leaving
    out the data-collection items in `exclude_items` (a greeting must not vouch for itself).
    """
    parts: list[str] = []
    for call in transcription_calls(calls):
        data = call.payload.get("data") or {}
        analysis = data.get("analysis") or {}
        parts.append(str(data.get("agent_name") or ""))
        parts.append(str(analysis.get("call_summary_title") or ""))
        parts.append(str(analysis.get("transcript_summary") or ""))
        for item, result in (analysis.get("data_collection_results") or {}).items():
            if item not in exclude_items:
                parts.append(str(result.get("value") if isinstance(result, dict) else result))
        for turn in data.get("transcript") or []:
            if isinstance(turn, dict) and turn.get("message"):
                parts.append(str(turn["message"]))
    return "\n".join(parts)


def format_day(timestamp: int | float | None) -> str:
    if timestamp is None:
        return ""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d")


def user_context(facts: dict[str, Any], max_chars: int) -> str:
    """A compact, dated digest for the agent's prompt, cut to `max_chars`."""
    if not facts.get("call_count"):
        return ""
    head = [f"Returning caller, {facts['call_count']} earlier call(s)"]
    if facts.get("name"):
        head.insert(0, f"Name: {facts['name']}")
    if facts.get("first_call_at"):
        head.append(f"first {format_day(facts['first_call_at'])}")
    if facts.get("last_call_at"):
        head.append(f"last {format_day(facts['last_call_at'])}")
    lines = ["; ".join(head) + "."]
    if facts.get("open_follow_ups"):
        lines.append("Open follow-ups: " + "; ".join(facts["open_follow_ups"]) + ".")
    for entry in facts.get("recent_summaries") or []:
        text = entry.get("summary") or entry.get("title")
        if not text:
            continue
        title = f" ({entry['title']})" if entry.get("title") and entry.get("summary") else ""
        lines.append(f"{format_day(entry.get('started_at'))}{title}: {text}")
    return truncate("\n".join(lines), max_chars)


def truncate(text: str, max_chars: int) -> str:
    """`text` cut at a word boundary to at most `max_chars`, with an ellipsis when cut."""
    if len(text) <= max_chars:
        return text
    if max_chars <= 1:
        return text[:max_chars]
    cut = text[: max_chars - 1]
    space = cut.rfind(" ")
    if space > max_chars // 2:
        cut = cut[:space]
    return cut.rstrip(" ,;:.\n") + "…"


def stamp(profile: dict[str, Any]) -> dict[str, Any]:
    return {**profile, "updated_at": time.time()}
