"""`elaoms migrate --to postgres`: copy the embedded store into PostgreSQL.

Users start on the zero-setup SQLite file and move when they grow. The copy is resumable
(run it again after an interruption), idempotent (a second run copies nothing) and verified
by counting every table on both sides.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from elaoms.cli.runtime import CliError, console, err_console, load_settings, print_json
from elaoms.crypto import PayloadCipher


class Target(enum.StrEnum):
    POSTGRES = "postgres"


class _RichProgress:
    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.tasks: dict[str, TaskID] = {}

    def start(self, table: str, total: int) -> None:
        self.tasks[table] = self.bar.add_task(table, total=total)

    def advance(self, table: str, rows: int) -> None:
        self.bar.advance(self.tasks[table], rows)


def migrate(
    to: Annotated[Target, typer.Option("--to", help="The store to copy into.")],
    source: Annotated[
        Path | None,
        typer.Option("--from", help="The SQLite store to copy. Default: SQLITE_PATH."),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            help="The PostgreSQL database (postgresql://...). Default: DATABASE_URL.",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=10_000, help="Rows per transaction.")] = 500,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what there is on both sides; write nothing.")
    ] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON report.")] = False,
) -> None:
    """Copy the SQLite store into PostgreSQL: calls, memories, profiles, agent cache, forget
    tombstones and the hash key. Stop the service first, or run it twice (the second run
    copies what came meanwhile). Exit 1 when the counts differ at the end."""
    from elaoms.memory.postgres import redacted, storage_error
    from elaoms.memory.transfer import MigrationRefused, StoreMigration

    settings = load_settings()
    url = database_url or settings.database_url
    if not url:
        raise CliError(
            "DATABASE_URL is not set: give --database-url postgresql://user:password@host/db"
        )
    path = source or settings.sqlite_path
    cipher = PayloadCipher(settings.encryption_key, enabled=settings.enable_encryption_at_rest)
    migration = StoreMigration(
        path,
        url,
        cipher,
        batch_size=batch_size,
        connect_timeout=settings.database_timeout_seconds,
    )
    where = f"{escape(str(path))} -> {escape(redacted(url))}"
    try:
        if dry_run:
            if not path.is_file():
                raise MigrationRefused(f"no SQLite store at {path}")
            report = migration.plan()
        else:
            migration.prepare_source()
            if json_output or not err_console.is_terminal:  # no bar in logs or cron mail
                report = migration.run()
            else:
                columns = (
                    TextColumn("{task.description:<24}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                )
                with Progress(*columns, console=err_console) as bar:
                    report = migration.run(_RichProgress(bar))
    except MigrationRefused as error:
        raise CliError(f"{error}") from None
    except (ImportError, KeyboardInterrupt, CliError):
        raise
    except Exception as error:
        import psycopg
        from sqlalchemy.exc import SQLAlchemyError

        # The schema step reaches PostgreSQL through SQLAlchemy, the copy through psycopg:
        # either way one line, the URL's password masked.
        if isinstance(error, SQLAlchemyError) and getattr(error, "orig", None) is not None:
            raise storage_error(error.orig, url) from None  # type: ignore[attr-defined]
        if isinstance(error, psycopg.Error | SQLAlchemyError):
            raise storage_error(error, url) from None
        raise
    if json_output:
        print_json({"from": str(path), "to": redacted(url), **report.as_dict()})
    else:
        table = Table("table", "SQLite", "PostgreSQL", "copied now", "")
        for count in report.counts:
            state = "" if report.dry_run else ("ok" if count.matches else "[red]differs[/]")
            table.add_row(
                count.table, str(count.source), str(count.target), str(count.copied), state
            )
        console.print(table)
        key = {
            "copied": "the store's hash key is copied",
            "same": "the PostgreSQL store already has this store's hash key",
            "replaced": "the empty PostgreSQL store's own hash key is replaced by this store's",
        }[report.hash_key]
        if report.dry_run:
            console.print(f"dry run, nothing written: {where}; {key} when it runs")
        elif report.verified:
            console.print(
                f"[green]verified[/]: {where}, every table counts the same "
                f"({report.copied} rows copied now); {key}. Set MEMORY_BACKEND=postgres."
            )
    if not report.dry_run and not report.verified:
        err_console.print(
            "[red]the counts differ[/]: the SQLite store changed during the copy (run "
            "`elaoms migrate --to postgres` again once the service is stopped), or the "
            "PostgreSQL store holds rows of its own"
        )
        raise typer.Exit(1)
