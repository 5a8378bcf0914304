"""The `elaoms` operator command line.

Every command reads the same settings as the service (environment, then `.env`) and works
on whichever memory store MEMORY_BACKEND names.
"""

from __future__ import annotations

import typer

from elaoms.cli import (
    backfill,
    callers,
    calls,
    database,
    demo,
    maintenance,
    migrate,
    quarantine,
    serve,
    setup,
)
from elaoms.cli.runtime import EXIT_CODES_HELP, ElaomsGroup

app = typer.Typer(
    name="elaoms",
    cls=ElaomsGroup,
    help=f"ELAOMS operator commands: a memory of every caller for ElevenLabs agents.\n\n"
    f"{EXIT_CODES_HELP}",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # a traceback must never print settings or secrets
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.command("setup")(setup.setup)
app.command("serve")(serve.serve)
app.command("demo")(demo.demo)
app.command("backfill")(backfill.backfill_command)
app.command("profile")(callers.profile)
app.add_typer(calls.calls_app, name="calls")
app.command("search")(callers.search)
app.command("first-message")(callers.first_message)
app.command("forget")(callers.forget)
app.command("export")(callers.export)
app.command("purge")(maintenance.purge)
app.command("requeue")(quarantine.requeue)
app.command("migrate")(migrate.migrate)
app.add_typer(database.db_app, name="db")
database.db_app.command("upgrade")(database.upgrade)
database.db_app.command("current")(database.current)

__all__ = ["app"]
