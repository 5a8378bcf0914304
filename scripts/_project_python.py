"""The seed's scripts run under whatever `python3` a user types: hand over to the project's
own interpreter (.venv, which `make install` creates), or say in one line what to do."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV = REPO_ROOT / ".venv"


def use_project_python() -> None:
    """Return when ELAOMS imports here; else re-run this script with .venv's Python."""
    try:
        import elaoms.cli  # noqa: F401 - only whether it imports
    except ImportError as error:
        venv_python = VENV / "bin" / "python"
        if venv_python.exists() and Path(sys.prefix).resolve() != VENV.resolve():
            os.execv(str(venv_python), [str(venv_python), *sys.argv])
        sys.stderr.write(
            f"error: ELAOMS is not installed for {sys.executable} ({error}): run `make install`"
            f" in {REPO_ROOT}, then use .venv/bin/elaoms\n"
        )
        sys.exit(1)
