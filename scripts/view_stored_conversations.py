#!/usr/bin/env python3
"""The seed's view_stored_conversations.py, kept for its users: it is `elaoms calls` now.

Arguments pass through: `python scripts/view_stored_conversations.py --help` lists them.
"""

import sys

from _project_python import use_project_python

use_project_python()

from elaoms.cli import app  # noqa: E402

app(prog_name="elaoms", args=["calls", *sys.argv[1:]])
