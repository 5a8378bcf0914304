#!/usr/bin/env python
"""Print what client-data would answer for a caller now: the first message they would hear
and the dynamic variables the agent gets.

    python scripts/generate_first_message.py +14155550123 [--agent AGENT_ID]

Reads the same settings as the service (.env, environment).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from elaoms.config import get_settings
from elaoms.personalization.service import preview_first_message
from elaoms.services import Services


async def main(caller: str, agent_id: str | None) -> int:
    services = Services.build(get_settings())
    try:
        answer = await preview_first_message(services, caller, agent_id)
    finally:
        await services.close()
    print(json.dumps(answer.model_dump(exclude_none=True), indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("caller", help="the caller's phone number (any format) or user id")
    parser.add_argument("--agent", dest="agent_id", help="the agent (default: of the last call)")
    arguments = parser.parse_args()
    sys.exit(asyncio.run(main(arguments.caller, arguments.agent_id)))
