#!/usr/bin/env python3
"""The seed's view_stored_conversations.py, kept for its users: it is `elaoms calls` now.

Arguments pass through: `python scripts/view_stored_conversations.py --help` lists them.
"""

import sys

from elaoms.cli import app

app(prog_name="elaoms", args=["calls", *sys.argv[1:]])
