#!/usr/bin/env python3
"""The seed's store_conversations.py, kept for its users: it is `elaoms backfill` now.

Arguments pass through: `python scripts/store_conversations.py --help` lists them.
"""

import sys

from elaoms.cli import app

app(prog_name="elaoms", args=["backfill", *sys.argv[1:]])
