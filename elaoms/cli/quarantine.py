"""`elaoms requeue`: hand quarantined deliveries to ingestion again (after a fix or an
outage), as if ElevenLabs had just delivered them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from elaoms.cli.runtime import console, print_json, run

if TYPE_CHECKING:
    from elaoms.services import Services


def requeue(
    files: Annotated[
        list[Path] | None,
        typer.Argument(help="Quarantined .body files (default: every one in quarantine)."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Deliver quarantined bodies again. One that is now stored, queued or forgotten
    leaves quarantine; one refused again stays there once, with the current reason."""

    async def work(services: Services) -> list[dict[str, Any]]:
        root = services.storage.quarantine_root
        paths = files or (sorted(root.glob("*.body")) if root.exists() else [])
        outcomes = []
        for path in paths:
            acknowledgement = await services.ingest.requeue(path)
            # This process ends after the loop: let the stores it started finish first.
            await services.ingest.drain()
            outcomes.append({"file": path.name, **acknowledgement.as_response()})
        return outcomes

    outcomes = run(work)
    if json_output:
        print_json(outcomes)
        return
    for outcome in outcomes:
        console.print(
            f"{outcome['file']}: {json.dumps(outcome['status'])} {outcome.get('detail') or ''}"
        )
    console.print(f"{len(outcomes)} quarantined deliver(ies) requeued")
