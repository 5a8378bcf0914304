"""The client-data webhook's request and answer, as ElevenLabs sends and expects them."""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict

CLIENT_DATA_TYPE: Final = "conversation_initiation_client_data"

Scalar = str | int | float | bool

# A `ClientDataResponse` as the JSON ElevenLabs receives (None fields left out), built and
# sent as plain dicts on the hot path; the models describe it (OpenAPI) and check it (tests).
ClientDataAnswer = dict[str, Any]


class ClientDataRequest(BaseModel):
    """What ElevenLabs POSTs while an inbound call rings. Every field may be missing: a
    withheld number has no `caller_id`, and ElevenLabs may add fields."""

    model_config = ConfigDict(extra="allow", coerce_numbers_to_str=True)

    caller_id: str | None = None
    agent_id: str | None = None
    called_number: str | None = None
    call_sid: str | None = None


class AgentOverride(BaseModel):
    first_message: str | None = None
    language: str | None = None


class TTSOverride(BaseModel):
    voice_id: str | None = None


class ConversationConfigOverride(BaseModel):
    agent: AgentOverride | None = None
    tts: TTSOverride | None = None


class ClientDataResponse(BaseModel):
    """Serialize with `exclude_none`: an override is present only where it applies."""

    type: Literal["conversation_initiation_client_data"] = CLIENT_DATA_TYPE
    dynamic_variables: dict[str, Scalar]
    conversation_config_override: ConversationConfigOverride | None = None

    @property
    def first_message(self) -> str | None:
        override = self.conversation_config_override
        return override.agent.first_message if override and override.agent else None
