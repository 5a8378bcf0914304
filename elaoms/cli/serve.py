"""`elaoms serve`: run the service with uvicorn."""

from __future__ import annotations

from typing import Annotated

import typer

from elaoms.cli.runtime import CliError, load_settings


def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on [default: HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [default: PORT].")] = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    reload: Annotated[bool, typer.Option(help="Restart on code changes (development).")] = False,
) -> None:
    """Run the service (the same app as `python main.py` and gunicorn)."""
    import uvicorn

    settings = load_settings()  # fail here, in one line, rather than inside a worker
    if reload and workers > 1:
        raise CliError("--reload runs a single process; drop --workers")
    uvicorn.run(
        "elaoms.app:create_app",
        factory=True,
        host=host or settings.host,
        port=port or settings.port,
        workers=workers,
        reload=reload,
        log_config=None,  # the app configures logging (masked phone numbers)
    )
