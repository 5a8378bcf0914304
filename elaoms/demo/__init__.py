"""What `elaoms demo` sends: one example call, for an agent whose configuration ships here.

The call and the agent are invented (a 555 number, a dental front desk); the agent id
cannot be a real ElevenLabs one, so its bundled configuration never stands in for yours.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DEMO_DIR = Path(__file__).resolve().parent
DEMO_AGENT_ID = "agent_elaoms_demo"
DEMO_CALLER = "+14155550123"
DEMO_QUERY = "daughter sore tooth appointment"


def demo_call() -> dict[str, Any]:
    """The example post_call_transcription webhook body."""
    payload: dict[str, Any] = json.loads(
        (DEMO_DIR / "post_call_transcription.json").read_text(encoding="utf-8")
    )
    return payload
