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
    event_timestamp: int | float | None = None
    data: dict[str, Any]


class TranscriptTurn(_Open):
    role: str
    message: str | None = None
    time_in_call_secs: float | None = None


class TranscriptionData(_Open):
    conversation_id: str = Field(min_length=1)
    agent_id: str | None = None
    transcript: list[TranscriptTurn]
    metadata: dict[str, Any] = Field(default_factory=dict)
    analysis: dict[str, Any] | None = None
    conversation_initiation_client_data: dict[str, Any] | None = None


class AudioData(_Open):
    conversation_id: str = Field(min_length=1)
    agent_id: str | None = None
    full_audio: str


class InitiationFailureData(_Open):
    conversation_id: str = Field(min_length=1)
    agent_id: str | None = None
    failure_reason: str | None = None


class PostCallResponse(BaseModel):
    status: str = Field(description="received, queued (stored later) or quarantined")
    memory_id: str | None = None
    detail: str | None = None
