"""A call's digest: what a caller's profile needs from one finished call.

Computed once, when the call is stored, and kept beside it: preparing a profile then reads
a few small digests instead of decoding every stored payload of the caller (about 12 KB
each), so its cost does not grow with the caller's history. The rules for what counts as
the caller's name, a follow-up or a fact live here because the digest applies them;
`elaoms.personalization.profile` combines the digests of a caller's calls.

Bump `DIGEST_VERSION` whenever what a digest holds or how it is computed changes: stores
recompute digests of another version from the stored payloads the next time they are read.
"""

from __future__ import annotations

import re
from typing import Any

from elaoms.memory.base import CallDigest
from elaoms.memory.records import TRANSCRIPTION, CallRecord

# 2: read through `CallRecord` (timestamps clamped, wrong-typed parts dropped, text capped)
DIGEST_VERSION = 2

# Where a caller's name may come from, the most trusted first.
DATA_COLLECTION = "data_collection"
DYNAMIC_VARIABLE = "dynamic_variable"
TRANSCRIPT = "transcript"
NAME_SOURCES = (DATA_COLLECTION, DYNAMIC_VARIABLE, TRANSCRIPT)

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
_NOT_NAMES = {"Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"}

# The words a greeting is fact-checked by: names, numbers (with their separators), the
# words around them.
_TOKEN = re.compile(r"[^\W\d_][\w'\-]*|\d+(?:[:.,]\d+)*", re.UNICODE)


def words(text: str) -> list[str]:
    """The words of `text` as the greeting fact check compares them (case kept)."""
    text = text.replace("\u2019", "'")  # typographic apostrophes, as LLMs write them
    return [token.removesuffix("'s") for token in _TOKEN.findall(text)]


def vocabulary(text: str) -> set[str]:
    """The distinct words of `text`, lowercase."""
    return {word.lower() for word in words(text)}


def clean_value(value: Any) -> str | None:
    """A data-collection or variable value worth repeating, else None."""
    if value is None or isinstance(value, bool):
        return None
    text = " ".join(str(value).split())
    return None if text.lower().strip(".") in _EMPTY_VALUES else text


def follow_ups(values: dict[str, Any]) -> list[str]:
    """The follow-ups a call's data-collection `values` record, without repeats."""
    items: list[str] = []
    for item in FOLLOW_UP_ITEMS:
        value = clean_value(values.get(item))
        if value and value not in items:
            items.append(value)
    return items


def _names(record: CallRecord) -> dict[str, str]:
    """The caller's name as each source of this call gives it (sources without one left out)."""
    names: dict[str, str] = {}
    for item in NAME_ITEMS:
        if name := clean_value(record.collected.get(item)):
            names[DATA_COLLECTION] = name
            break
    for variable in NAME_VARIABLES:
        if name := clean_value(record.dynamic_variables.get(variable)):
            names[DYNAMIC_VARIABLE] = name
            break
    for turn in record.turns:
        if turn.role != "user":
            continue
        match = _INTRODUCTION.search(turn.message)
        if match and match.group(1).split()[0] not in _NOT_NAMES:
            names[TRANSCRIPT] = match.group(1)
            break
    return names


def digest_call(payload: Any) -> CallDigest:
    """The digest of one stored call's envelope (see `digest_record`)."""
    return digest_record(CallRecord.from_payload(payload))


def digest_record(record: CallRecord) -> CallDigest:
    """The digest of one stored call.

    `words` holds every word of the call a greeting may repeat except the data-collection
    values, which stay apart in `facts["collected"]`: a greeting taken from one of them
    must not vouch for itself (`elaoms.personalization.profile.call_vocabulary`). A call
    that is not a finished conversation (a failed initiation) tells nothing about its
    caller: its digest is empty, kept so that every stored call has one.
    """
    if record.event_type != TRANSCRIPTION:
        return CallDigest(record.conversation_id, record.agent_id, record.started_at, facts={})
    first_agent_message = next(
        (turn.message for turn in record.turns if turn.role == "agent"), None
    )
    names = _names(record)
    text = [
        record.agent_name or "",
        record.title or "",
        record.summary or "",
        *(turn.message for turn in record.turns),
    ]
    return CallDigest(
        conversation_id=record.conversation_id,
        agent_id=record.agent_id,
        started_at=record.started_at,
        facts={
            "title": clean_value(record.title),
            "summary": clean_value(record.summary),
            "names": names,
            "follow_ups": follow_ups(record.collected),
            "language": clean_value(record.language),
            "first_agent_message": first_agent_message,
            "collected": dict(record.collected),
        },
        marks=frozenset(names),
        words=frozenset(vocabulary("\n".join(text))),
    )
