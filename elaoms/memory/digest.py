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
from elaoms.memory.units import TRANSCRIPTION, call_started_at
from elaoms.payloads import dig

DIGEST_VERSION = 1

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


def collected_values(data: dict[str, Any]) -> dict[str, Any]:
    """Every data-collection result of a call that has a value, by item id."""
    results = dig(data, "analysis", "data_collection_results")
    values: dict[str, Any] = {}
    for item, result in results.items() if isinstance(results, dict) else ():
        value = result.get("value") if isinstance(result, dict) else result
        if value is not None:
            values[item] = value
    return values


def follow_ups(values: dict[str, Any]) -> list[str]:
    """The follow-ups a call's data-collection `values` record, without repeats."""
    items: list[str] = []
    for item in FOLLOW_UP_ITEMS:
        value = clean_value(values.get(item))
        if value and value not in items:
            items.append(value)
    return items


def _names(
    data: dict[str, Any], values: dict[str, Any], turns: list[dict[str, Any]]
) -> dict[str, str]:
    """The caller's name as each source of this call gives it (sources without one left out)."""
    names: dict[str, str] = {}
    for item in NAME_ITEMS:
        if name := clean_value(values.get(item)):
            names[DATA_COLLECTION] = name
            break
    variables = dig(data, "conversation_initiation_client_data", "dynamic_variables")
    for variable in NAME_VARIABLES if isinstance(variables, dict) else ():
        if name := clean_value(variables.get(variable)):
            names[DYNAMIC_VARIABLE] = name
            break
    for turn in turns:
        if turn.get("role") != "user":
            continue
        match = _INTRODUCTION.search(str(turn.get("message") or ""))
        if match and match.group(1).split()[0] not in _NOT_NAMES:
            names[TRANSCRIPT] = match.group(1)
            break
    return names


def digest_call(payload: dict[str, Any]) -> CallDigest:
    """The digest of one stored call's envelope.

    `words` holds every word of the call a greeting may repeat except the data-collection
    values, which stay apart in `facts["collected"]`: a greeting taken from one of them
    must not vouch for itself (`elaoms.personalization.profile.call_vocabulary`). A call
    that is not a finished conversation (a failed initiation) tells nothing about its
    caller: its digest is empty, kept so that every stored call has one.
    """
    data = payload.get("data") or {}
    conversation_id = str(data.get("conversation_id") or "")
    started_at = call_started_at(data, payload.get("event_timestamp"))
    if payload.get("type", TRANSCRIPTION) != TRANSCRIPTION:
        return CallDigest(conversation_id, data.get("agent_id"), started_at, facts={})
    raw_analysis = data.get("analysis")
    analysis = raw_analysis if isinstance(raw_analysis, dict) else {}
    values = collected_values(data)
    turns = [turn for turn in data.get("transcript") or [] if isinstance(turn, dict)]
    spoken = [turn for turn in turns if turn.get("message")]
    first_agent_message = next(
        (str(turn["message"]) for turn in spoken if turn.get("role") == "agent"), None
    )
    names = _names(data, values, turns)
    text = [
        str(data.get("agent_name") or ""),
        str(analysis.get("call_summary_title") or ""),
        str(analysis.get("transcript_summary") or ""),
        *(str(turn["message"]) for turn in spoken),
    ]
    return CallDigest(
        conversation_id=conversation_id,
        agent_id=data.get("agent_id"),
        started_at=started_at,
        facts={
            "title": clean_value(analysis.get("call_summary_title")),
            "summary": clean_value(analysis.get("transcript_summary")),
            "names": names,
            "follow_ups": follow_ups(values),
            "language": clean_value(dig(data, "metadata", "main_language")),
            "first_agent_message": first_agent_message,
            "collected": values,
        },
        marks=frozenset(names),
        words=frozenset(vocabulary("\n".join(text))),
    )
