"""What the console's pages show: typed records the service fills and the templates read.

No record holds a full phone number: callers are shown masked and addressed by opaque id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class CallerRow:
    opaque_id: str
    masked_number: str
    name: str | None
    call_count: int
    last_call: str  # YYYY-MM-DD, or "" when unknown


@dataclass(frozen=True, slots=True)
class CallerList:
    rows: list[CallerRow]
    total: int
    page: int
    pages: int
    query: str  # what was typed in the search box ("" for the whole list)


@dataclass(frozen=True, slots=True)
class GreetingVerdict:
    """The next greeting and whether client-data would send it, with the reason if not."""

    greeting: str  # the prepared greeting ("" when none)
    sent: bool
    first_message: str | None  # what the agent would say first, when we override it
    reason: str  # why it is or is not sent, in words an operator understands
    agent_id: str | None


@dataclass(frozen=True, slots=True)
class TimelineCall:
    conversation_id: str
    started: str  # YYYY-MM-DD HH:MM UTC
    title: str | None
    summary: str | None
    collected: dict[str, Any]
    has_audio: bool


@dataclass(frozen=True, slots=True)
class SearchAnswer:
    """Exactly what the search tool answers the agent for this caller and query."""

    query: str
    memories_found: int
    context: str
    timed_out: bool


@dataclass(frozen=True, slots=True)
class CallerPage:
    opaque_id: str
    masked_number: str
    name: str | None
    call_count: int
    first_call: str
    last_call: str
    topics: list[str]
    open_follow_ups: list[str]
    greeting: GreetingVerdict
    user_context: str
    dynamic_variables: dict[str, Any]
    timeline: list[TimelineCall]
    chart_svg: str
    has_profile: bool


@dataclass(frozen=True, slots=True)
class Turn:
    role: str
    message: str
    at: str  # m:ss into the call


@dataclass(frozen=True, slots=True)
class CallPage:
    opaque_id: str
    masked_number: str
    conversation_id: str
    agent_id: str | None
    started: str
    duration: str
    title: str | None
    summary: str | None
    collected: list[tuple[str, str]]
    transcript: list[Turn]
    has_audio: bool


@dataclass(frozen=True, slots=True)
class AgentLine:
    agent_id: str
    name: str
    cached: bool
    fetched: str
    first_message: str
    language: str
    placeholders: dict[str, Any]
    allows_first_message: bool
    allows_language: bool
    allows_voice_id: bool


@dataclass(frozen=True, slots=True)
class QueueLine:
    name: str
    age: str
    reason: str = ""
    size: int = 0


@dataclass(frozen=True, slots=True)
class AlertLine:
    raised: str
    kind: str
    message: str


@dataclass(frozen=True, slots=True)
class HealthPage:
    store_name: str
    store_status: str
    disk_status: str
    disk_free: str
    pending: list[QueueLine]
    quarantined: list[QueueLine]
    alerts: list[AlertLine]
    chart_svg: str
    notes: list[str] = field(default_factory=list)
