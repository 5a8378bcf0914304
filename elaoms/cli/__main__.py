"""`python -m elaoms.cli`: the same as the `elaoms` command."""

from elaoms.cli import app

app(prog_name="elaoms")
