"""The ElevenLabs API: a small async client and the agent-profile cache."""
