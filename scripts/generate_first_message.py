#!/usr/bin/env python3
"""The seed's generate_first_message.py, kept for its users: it is
`elaoms first-message --json` now (what client-data would answer for a caller: the first
message they would hear and the dynamic variables the agent gets).

    python3 scripts/generate_first_message.py +14155550123 [--agent AGENT_ID]

Reads the same settings as the service (.env, environment).
"""

import sys

from _project_python import use_project_python

use_project_python()

from elaoms.cli import app  # noqa: E402

app(prog_name="elaoms", args=["first-message", "--json", *sys.argv[1:]])
