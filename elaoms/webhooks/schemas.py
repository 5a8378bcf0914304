"""The shapes of ElevenLabs' post-call deliveries, as far as this service relies on them.

ElevenLabs keeps adding fields, so every model allows unknown ones; only what we read is
checked, and a delivery that lacks it is quarantined with the reason.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

AUDIO = "post_call_audio"


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Envelope(_Open):
    type: str = Field(min_length=1)
    event_timestamp: Any = None  # checked by `CallRecord`: out of range or not a number, ignored
    data: dict[str, Any]


class TranscriptionData(_Open):
    """Only what identifies the call is required. Every other part is read, checked and,
    when of the wrong type, dropped with a note by `elaoms.memory.records.CallRecord`:
    one odd field must not cost the whole call."""

    conversation_id: str = Field(min_length=1)
    transcript: list[Any]


class AudioData(_Open):
    conversation_id: str = Field(min_length=1)
    agent_id: str | None = None
    full_audio: str


class InitiationFailureData(_Open):
    conversation_id: str = Field(min_length=1)


class PostCallResponse(BaseModel):
    status: str = Field(description="received, queued (stored later) or quarantined")
    memory_id: str | None = None
    detail: str | None = None
