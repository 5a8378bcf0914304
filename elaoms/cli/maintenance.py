"""`elaoms purge`: apply the retention policy now."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import TYPE_CHECKING, Annotated

import typer

from elaoms.cli.runtime import console, print_json, run
from elaoms.operations.retention import PurgeReport, purge_expired

if TYPE_CHECKING:
    from elaoms.services import Services


def purge(
    days: Annotated[
        float | None,
        typer.Option(help="Retention in days (default: WEBHOOK_RETENTION_DAYS)."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Delete webhook files older than the retention period and unclaimed audio.

    Memories stay; deliveries still waiting for the store are never purged."""

    async def work(services: Services) -> PurgeReport:
        settings = services.settings
        retention = settings.webhook_retention_days if days is None else days
        return await asyncio.to_thread(
            purge_expired, services.storage, retention, settings.audio_cache_ttl
        )

    report = run(work)
    if json_output:
        print_json(asdict(report))
        return
    console.print(
        f"purged {report.files} webhook file(s) ({report.bytes} bytes) and "
        f"{report.unclaimed_audio} unclaimed audio file(s)"
    )
