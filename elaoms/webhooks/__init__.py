"""ElevenLabs' post-call webhook: verify, keep on disk, turn into memory."""
