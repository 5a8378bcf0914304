"""One typed record per stored call, built once from the raw post-call payload.

ElevenLabs' JSON is read in one place only, here: every value is checked where it enters.
A part of the wrong type is dropped (with a note), a number out of range is clamped or
dropped, NaN and infinities are never let through, and text is capped, so that nothing a
signed delivery holds can make storing, profiling or searching the call fail later, nor
make one call cost more than a bounded amount of work and memory. The raw payload itself
is kept whole on disk and in the store; only what is derived from it goes through here.

Building a record never raises, whatever `payload` is.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

from elaoms.payloads import encode

TRANSCRIPTION = "post_call_transcription"
INITIATION_FAILURE = "call_initiation_failure"

# Timestamps before this (2000-01-01) are not a call of this service: a unit mix-up
# (milliseconds read as seconds go the other way) or a broken clock.
EARLIEST_TIMESTAMP = 946_684_800
# A call is never more than a day in the future, whatever clock skew the sender has.
FUTURE_SLACK_SECONDS = 86_400
# No call lasts a day: an offset beyond it is not a time in the call.
MAX_TIME_IN_CALL_SECS = 86_400.0

# Bounds on what one call may cost. A 20,000-turn call (7.5 MB) once kept a caller's
# search busy for a minute and grew the worker by 500 MB; a real call of an hour is about
# 600 turns and 60,000 characters. What is cut is still kept whole in the raw payload.
MAX_TURNS = 2_000
MAX_TURN_CHARS = 4_000
MAX_CALL_CHARS = 200_000
MAX_SUMMARY_CHARS = 4_000
MAX_SHORT_TEXT_CHARS = 300  # ids, titles, roles, languages, names
MAX_VALUE_CHARS = 1_000  # one data-collection value or dynamic variable
MAX_ITEMS = 200  # data-collection results or dynamic variables per call

Scalar = str | int | float | bool


@dataclass(frozen=True, slots=True)
class Turn:
    """One spoken transcript turn (turns without words are not kept)."""

    index: int  # its position in the raw transcript (memory ids use it)
    role: str | None
    message: str
    time_in_call_secs: int | float | None


@dataclass(frozen=True, slots=True)
class CallRecord:
    """What the service reads of one post-call delivery, every value checked."""

    event_type: str
    conversation_id: str
    agent_id: str | None
    agent_name: str | None
    event_timestamp: int | None  # unix seconds, within the sane range, else None
    started_at: int | None  # the call's start, else the event's time, else None
    turns: tuple[Turn, ...] = ()
    summary: str | None = None
    title: str | None = None
    collected: dict[str, Scalar] = field(default_factory=dict)  # data-collection values
    dynamic_variables: dict[str, Scalar] = field(default_factory=dict)
    language: str | None = None
    failure_reason: str | None = None
    duration_secs: int | float | None = None  # within a day, else None
    # What was dropped, clamped or cut, as field paths (never values: they may be personal).
    notes: tuple[str, ...] = ()

    @classmethod
    def from_payload(cls, payload: Any, *, now: float | None = None) -> CallRecord:
        return _Builder(now).build(payload)


def clamp_timestamp(value: Any, *, now: float | None = None) -> int | None:
    """`value` as whole unix seconds if it is a finite number within [2000-01-01, now + 1
    day], else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    latest = (time.time() if now is None else now) + FUTURE_SLACK_SECONDS
    if not EARLIEST_TIMESTAMP <= value <= latest:
        return None
    return int(value)


def finite(value: Any) -> float | None:
    """`value` as a float if it is a finite number (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond a float's range
        return None
    return number if math.isfinite(number) else None


def seconds_in_call(value: Any) -> int | float | None:
    """A time within a call (an offset, a duration): an int kept as sent (the stored
    metadata repeats it), None when not a number or beyond a day."""
    seconds = finite(value)
    if seconds is None or not 0 <= seconds <= MAX_TIME_IN_CALL_SECS:
        return None
    return value if isinstance(value, int) else seconds


class _Builder:
    def __init__(self, now: float | None) -> None:
        self.now = time.time() if now is None else now
        self.notes: list[str] = []

    def note(self, path: str, what: str) -> None:
        self.notes.append(f"{path}: {what}")

    def object(self, value: Any, path: str) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.note(path, f"{type(value).__name__} instead of an object, ignored")
            return {}
        return value

    def text(self, value: Any, path: str, limit: int) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            self.note(path, f"{type(value).__name__} instead of text, ignored")
            return None
        if len(value) > limit:
            self.note(path, f"{len(value)} characters, cut to {limit}")
            return value[:limit]
        return value

    def scalar(self, value: Any, path: str) -> Scalar | None:
        """A JSON scalar worth keeping, or None (nested values are kept as compact JSON)."""
        if value is None or isinstance(value, bool | str):
            return self.text(value, path, MAX_VALUE_CHARS) if isinstance(value, str) else value
        if isinstance(value, int | float):
            number = finite(value)
            if number is None:
                self.note(path, "not a finite number, ignored")
                return None
            return value if isinstance(value, int) and abs(value) < 2**53 else number
        if isinstance(value, dict | list):
            try:
                text = encode(value).decode()
            except (TypeError, ValueError, RecursionError):
                self.note(path, "unreadable value, ignored")
                return None
            return self.text(text, path, MAX_VALUE_CHARS)
        self.note(path, f"{type(value).__name__} ignored")
        return None

    def build(self, payload: Any) -> CallRecord:
        envelope = self.object(payload, "body")
        event_type = self.text(envelope.get("type"), "type", MAX_SHORT_TEXT_CHARS)
        data = self.object(envelope.get("data"), "data")
        raw_event_timestamp = envelope.get("event_timestamp")
        event_timestamp = clamp_timestamp(raw_event_timestamp, now=self.now)
        if raw_event_timestamp is not None and event_timestamp is None:
            self.note("event_timestamp", "out of range or not a number, ignored")
        metadata = self.object(data.get("metadata"), "data.metadata")
        raw_start = metadata.get("start_time_unix_secs")
        started_at = clamp_timestamp(raw_start, now=self.now)
        if raw_start is not None and started_at is None:
            self.note("data.metadata.start_time_unix_secs", "out of range, event time used")
        conversation_id = data.get("conversation_id")
        if isinstance(conversation_id, int | float) and not isinstance(conversation_id, bool):
            conversation_id = str(conversation_id)
        analysis = self.object(data.get("analysis"), "data.analysis")
        client_data = self.object(
            data.get("conversation_initiation_client_data"),
            "data.conversation_initiation_client_data",
        )
        record = CallRecord(
            event_type=event_type or TRANSCRIPTION,
            conversation_id=self.text(conversation_id, "data.conversation_id", 1_000) or "",
            agent_id=self.text(data.get("agent_id"), "data.agent_id", MAX_SHORT_TEXT_CHARS),
            agent_name=self.text(data.get("agent_name"), "data.agent_name", MAX_SHORT_TEXT_CHARS),
            event_timestamp=event_timestamp,
            started_at=started_at if started_at is not None else event_timestamp,
            turns=self.turns(data.get("transcript")),
            summary=self.text(
                analysis.get("transcript_summary"),
                "data.analysis.transcript_summary",
                MAX_SUMMARY_CHARS,
            ),
            title=self.text(
                analysis.get("call_summary_title"),
                "data.analysis.call_summary_title",
                MAX_SHORT_TEXT_CHARS,
            ),
            collected=self.collected(analysis.get("data_collection_results")),
            dynamic_variables=self.variables(client_data.get("dynamic_variables")),
            language=self.text(
                metadata.get("main_language"), "data.metadata.main_language", MAX_SHORT_TEXT_CHARS
            ),
            failure_reason=self.text(
                data.get("failure_reason"), "data.failure_reason", MAX_VALUE_CHARS
            ),
            duration_secs=seconds_in_call(metadata.get("call_duration_secs")),
        )
        return replace(record, notes=tuple(self.notes)) if self.notes else record

    def turns(self, transcript: Any) -> tuple[Turn, ...]:
        if transcript is None:
            return ()
        if not isinstance(transcript, list):
            self.note("data.transcript", f"{type(transcript).__name__} instead of a list, ignored")
            return ()
        turns: list[Turn] = []
        chars = 0
        skipped = 0
        for index, raw in enumerate(transcript):
            if not isinstance(raw, dict):
                skipped += 1
                continue
            message = raw.get("message")
            if not isinstance(message, str):
                if message is not None:
                    skipped += 1
                continue
            message = message.strip()
            if not message:
                continue  # tool-only turns carry no words to search
            if len(turns) >= MAX_TURNS or chars >= MAX_CALL_CHARS:
                self.note("data.transcript", f"cut at turn {index} of {len(transcript)}")
                break
            message = message[: min(MAX_TURN_CHARS, MAX_CALL_CHARS - chars)]
            chars += len(message)
            role = raw.get("role")
            turns.append(
                Turn(
                    index=index,
                    role=role[:MAX_SHORT_TEXT_CHARS] if isinstance(role, str) else None,
                    message=message,
                    time_in_call_secs=seconds_in_call(raw.get("time_in_call_secs")),
                )
            )
        if skipped:
            self.note("data.transcript", f"{skipped} turns of the wrong shape ignored")
        return tuple(turns)

    def collected(self, results: Any) -> dict[str, Scalar]:
        values: dict[str, Scalar] = {}
        path = "data.analysis.data_collection_results"
        for number, (item, result) in enumerate(self.object(results, path).items()):
            if number >= MAX_ITEMS:
                self.note(path, f"more than {MAX_ITEMS} items, the rest ignored")
                break
            raw = result.get("value") if isinstance(result, dict) else result
            value = self.scalar(raw, f"{path}.{item[:40]}")
            if value is not None:
                values[item[:MAX_SHORT_TEXT_CHARS]] = value
        return values

    def variables(self, variables: Any) -> dict[str, Scalar]:
        path = "data.conversation_initiation_client_data.dynamic_variables"
        kept: dict[str, Scalar] = {}
        for number, (name, raw) in enumerate(self.object(variables, path).items()):
            if number >= MAX_ITEMS:
                self.note(path, f"more than {MAX_ITEMS} variables, the rest ignored")
                break
            if isinstance(raw, dict | list):
                self.note(f"{path}.{name[:40]}", "not a scalar, ignored")
                continue
            value = self.scalar(raw, f"{path}.{name[:40]}")
            if value is not None:
                kept[name[:MAX_SHORT_TEXT_CHARS]] = value
        return kept
