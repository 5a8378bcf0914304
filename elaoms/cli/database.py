"""`elaoms db`: the PostgreSQL store's schema (MEMORY_BACKEND=postgres).

The service upgrades the schema itself when it starts (under a lock: replicas starting
together are safe); `elaoms db upgrade` does it ahead of a rollout, and `elaoms db
current` says where a database stands.
"""

from __future__ import annotations

from typing import Annotated

import typer

from elaoms.cli.runtime import CliError, console, load_settings, print_json
from elaoms.config import MemoryBackend, Settings
from elaoms.memory import migrations

db_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help=__doc__)


def _database_url(settings: Settings) -> str:
    if settings.memory_backend is not MemoryBackend.POSTGRES:
        raise CliError(
            f"MEMORY_BACKEND is {settings.memory_backend.value}: the schema commands are for "
            "MEMORY_BACKEND=postgres"
        )
    if not settings.database_url:
        raise CliError("DATABASE_URL is not set (postgresql://user:password@host/database)")
    return settings.database_url


def upgrade(
    revision: Annotated[
        str, typer.Argument(help="Target revision (default: the newest).")
    ] = "head",
) -> None:
    """Create or upgrade the schema; safe while replicas run or start."""
    from elaoms.memory.postgres import redacted, storage_error

    settings = load_settings()
    url = _database_url(settings)
    try:
        migrations.upgrade(url, revision, connect_timeout=settings.database_timeout_seconds)
        now = migrations.current(url, connect_timeout=settings.database_timeout_seconds)
    except ImportError:
        raise  # the postgres extra is missing: said as such
    except Exception as error:
        raise storage_error(error, url) from None
    console.print(f"{redacted(url)} is at revision {now}")


def current(
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """The schema revision the database is at, and the newest this version ships."""
    from elaoms.memory.postgres import redacted, storage_error

    settings = load_settings()
    url = _database_url(settings)
    try:
        now = migrations.current(url, connect_timeout=settings.database_timeout_seconds)
    except ImportError:
        raise  # the postgres extra is missing: said as such
    except Exception as error:
        raise storage_error(error, url) from None
    newest = migrations.head()
    if json_output:
        print_json({"current": now, "head": newest, "up_to_date": now == newest})
        return
    state = "up to date" if now == newest else f"behind: run `elaoms db upgrade` (newest: {newest})"
    console.print(f"{redacted(url)} is at revision {now or 'none (empty)'}: {state}")
