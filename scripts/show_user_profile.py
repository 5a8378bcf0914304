#!/usr/bin/env python3
"""The seed's show_user_profile.py, kept for its users: it is `elaoms profile` now.

Arguments pass through: `python scripts/show_user_profile.py --help` lists them.
"""

import sys

from _project_python import use_project_python

use_project_python()

from elaoms.cli import app  # noqa: E402

app(prog_name="elaoms", args=["profile", *sys.argv[1:]])
