"""Why a caller would hear the agent's own greeting instead of a personalized one.

Client-data withholds a first message for several reasons (an override the agent does not
allow fails the call, so without the agent's configuration nothing is sent); an operator
previewing a call must see which one applies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from elaoms.services import Services


async def greeting_withheld_reason(
    services: Services, profile: dict[str, Any] | None, agent_id: str | None
) -> str:
    """One sentence: why no personalized first message would be sent."""
    settings = services.settings
    if not profile:
        return "nothing is stored about this caller: a first-time caller hears the agent's own"
    if not agent_id:
        return "no agent is known for this caller: pass --agent ID"
    agents = services.personalization.agents
    agent = await agents.get(agent_id, wait=settings.elevenlabs_api_timeout_seconds)
    if agent is None:
        where = (
            f"AGENT_CONFIG_DIR ({settings.agent_config_dir}) has no {agent_id}.json"
            if settings.agent_config_dir
            else "AGENT_CONFIG_DIR is not set"
        )
        if not settings.elevenlabs_api_key:
            return (
                f"the configuration of agent {agent_id} is unknown: ELEVENLABS_API_KEY is not "
                f"set and {where}. Without it no override is sent (one the agent does not "
                "allow fails the call): set the key, or export the agent's JSON there"
            )
        return (
            f"the configuration of agent {agent_id} could not be fetched from the ElevenLabs "
            f"API ({settings.elevenlabs_api_base_url}) and {where}"
        )
    if not agent.allows_first_message:
        return (
            f"agent {agent_id} does not allow a first-message override (in ElevenLabs: "
            "Agent -> Security -> Overrides -> First message)"
        )
    if profile.get("agent_id") and profile["agent_id"] != agent_id:
        return "the caller's last call was with another agent: 'welcome back' would be wrong"
    if not profile.get("greeting") and profile.get("source") == "computed":
        return "no profile is prepared yet: the next stored call of this caller prepares one"
    if profile.get("greeting") == agent.first_message:
        return "the prepared greeting is the agent's own first message"
    return (
        "the prepared greeting is not in the language the agent speaks, or "
        "GREETING_DISCLOSURE leaves nothing to say"
    )
