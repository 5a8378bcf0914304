"""`elaoms setup`: write a `.env` with strong secrets and print what to paste into ElevenLabs."""

from __future__ import annotations

import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from dotenv import dotenv_values
from rich.markup import escape

from elaoms.cli.runtime import console, err_console, print_json, write_private
from elaoms.config import HMAC_PLACEHOLDER_PREFIX, MemoryBackend, Settings

# ElevenLabs generates the post-call HMAC secret itself (shown once, when the webhook is
# created). Until it is pasted, this placeholder lets the service start; every real
# delivery then gets 401, which says exactly what is wrong.
PLACEHOLDER_PREFIX = HMAC_PLACEHOLDER_PREFIX


@dataclass(frozen=True, slots=True)
class EnvChoices:
    memory_backend: MemoryBackend = MemoryBackend.SQLITE
    openmemory_url: str = "http://localhost:8080"
    openmemory_api_key: str = ""
    elevenlabs_api_key: str = ""
    post_call_hmac_key: str = ""
    admin_api: bool = False


def render_env(choices: EnvChoices) -> str:
    """The `.env` text for `choices`, with freshly generated secrets."""
    hmac_key = choices.post_call_hmac_key or PLACEHOLDER_PREFIX + secrets.token_hex(8)
    admin_key = secrets.token_urlsafe(32) if choices.admin_api else ""
    return f"""\
# Written by `elaoms setup`. Every variable is described in the README.
MEMORY_BACKEND={choices.memory_backend.value}
SQLITE_PATH=data/memory.sqlite3
OPENMEMORY_URL={choices.openmemory_url}
OPENMEMORY_API_KEY={choices.openmemory_api_key}

# ElevenLabs
ELEVENLABS_API_KEY={choices.elevenlabs_api_key}
ELEVENLABS_API_BASE_URL=https://api.elevenlabs.io
# The secret ElevenLabs shows when you create the post-call webhook. A placeholder
# starting with "{PLACEHOLDER_PREFIX}" must be replaced.
ELEVENLABS_POST_CALL_HMAC_KEY={hmac_key}
# The X-Api-Key value to configure on the client-data webhook and the search tool.
ELEVENLABS_CLIENT_DATA_WORKSPACE_SECRET={secrets.token_urlsafe(32)}

# Storage
WEBHOOK_STORAGE_PATH=data/webhooks
WEBHOOK_QUARANTINE_PATH=data/webhooks/quarantine
FILE_PERMISSIONS_MODE=0o600

# Admin endpoints for forget/export (X-Admin-Key); empty = the endpoints do not exist.
ADMIN_API_KEY={admin_key}
"""


def webhook_endpoints(settings: Settings, public_url: str) -> dict[str, Any]:
    """The three hooks to configure in ElevenLabs, with their headers."""
    base = public_url.rstrip("/")
    api_key = settings.elevenlabs_client_data_workspace_secret
    return {
        "post_call": {
            "url": f"{base}/webhooks/post-call",
            "method": "POST",
            "auth": "HMAC: paste the secret ElevenLabs shows into ELEVENLABS_POST_CALL_HMAC_KEY",
            "hmac_key_is_placeholder": is_placeholder(settings.elevenlabs_post_call_hmac_key),
        },
        "client_data": {
            "url": f"{base}/webhooks/client-data",
            "method": "POST",
            "headers": {"X-Api-Key": api_key},
        },
        "search_data": {
            "url": f"{base}/webhooks/search-data",
            "method": "POST",
            "headers": {"X-Api-Key": api_key},
            "body": {
                "query": "LLM prompt: what to look up in the caller's past calls",
                "user_id": "dynamic variable system__caller_id",
                "limit": "constant 5",
            },
        },
    }


def is_placeholder(hmac_key: str) -> bool:
    return not hmac_key or hmac_key.startswith(PLACEHOLDER_PREFIX)


def setup(
    path: Annotated[Path, typer.Option("--path", help="Where to write the file.")] = Path(".env"),
    interactive: Annotated[
        bool | None,
        typer.Option(
            "--interactive/--non-interactive",
            help="Ask for the choices, or use defaults [default: ask when on a terminal].",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
    public_url: Annotated[
        str | None,
        typer.Option(help="The address ElevenLabs reaches this service at (for the URLs)."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Write .env with generated secrets and print the URLs and headers for ElevenLabs.

    An existing file is never replaced without --force, so `make run` can call this every
    time.
    """
    written = False
    if path.exists() and not force:
        if not json_output:
            err_console.print(f"{escape(str(path))} exists, kept as it is (--force replaces it).")
    else:
        if interactive is None:
            interactive = sys.stdin.isatty()
        choices = _ask() if interactive else EnvChoices()
        write_private(path, render_env(choices).encode(), replace=force)
        written = True
    settings = Settings(**_lower_keys(dotenv_values(path)))
    url = public_url or f"http://localhost:{settings.port}"
    if written and interactive and public_url is None:
        url = typer.prompt("Public URL ElevenLabs reaches this service at", default=url)
    endpoints = webhook_endpoints(settings, url)
    if json_output:
        print_json({"env_file": str(path), "written": written, "endpoints": endpoints})
        return
    if written:
        console.print(f"[green]wrote {escape(str(path))}[/] (mode 0600)")
    _print_endpoints(endpoints, settings)


def _lower_keys(values: dict[str, str | None]) -> dict[str, Any]:
    # The file the user asked about wins over the environment and ./.env for the URLs shown.
    return {key.lower(): value for key, value in values.items() if value is not None}


def _backend(value: str) -> MemoryBackend:
    try:
        return MemoryBackend(value.strip().lower())
    except ValueError:
        choices = ", ".join(item.value for item in MemoryBackend)
        raise typer.BadParameter(f"{value!r} is not one of {choices}") from None


def _ask() -> EnvChoices:
    backend = MemoryBackend(
        typer.prompt(
            f"Memory backend ({', '.join(item.value for item in MemoryBackend)})",
            default=MemoryBackend.SQLITE.value,
            value_proc=_backend,
        )
    )
    openmemory_url, openmemory_key = "http://localhost:8080", ""
    if backend is MemoryBackend.OPENMEMORY:
        openmemory_url = typer.prompt("OpenMemory URL", default=openmemory_url)
        openmemory_key = typer.prompt(
            "OpenMemory API key", default="", show_default=False, hide_input=True
        )
    api_key = typer.prompt(
        "ElevenLabs API key (for backfill and agent profiles; Enter to skip)",
        default="",
        show_default=False,
        hide_input=True,
    )
    hmac_key = typer.prompt(
        "Post-call webhook secret from ElevenLabs (Enter to paste it later)",
        default="",
        show_default=False,
        hide_input=True,
    )
    admin = typer.confirm("Enable the admin endpoints for forget/export?", default=False)
    return EnvChoices(
        memory_backend=backend,
        openmemory_url=openmemory_url,
        openmemory_api_key=openmemory_key,
        elevenlabs_api_key=api_key,
        post_call_hmac_key=hmac_key,
        admin_api=admin,
    )


def _print_endpoints(endpoints: dict[str, Any], settings: Settings) -> None:
    post_call, client_data, search = (
        endpoints["post_call"],
        endpoints["client_data"],
        endpoints["search_data"],
    )
    console.print("\n[bold]Configure ElevenLabs with:[/]")
    console.print(f"1. Post-call webhook   POST {escape(post_call['url'])}")
    console.print(
        "   ElevenLabs shows its HMAC secret once: put it in ELEVENLABS_POST_CALL_HMAC_KEY."
    )
    if post_call["hmac_key_is_placeholder"]:
        console.print(
            "   [yellow]ELEVENLABS_POST_CALL_HMAC_KEY is a placeholder: post-call deliveries "
            "get 401 until you replace it with the secret ElevenLabs shows.[/]"
        )
    console.print(f"2. Client-data webhook POST {escape(client_data['url'])}")
    console.print(f"   header X-Api-Key: {escape(client_data['headers']['X-Api-Key'])}")
    console.print(f"3. Search tool         POST {escape(search['url'])}")
    console.print(f"   header X-Api-Key: {escape(search['headers']['X-Api-Key'])}")
    console.print(
        "   body: query (LLM), user_id (dynamic variable system__caller_id), limit (constant 5)"
    )
    if not settings.elevenlabs_client_data_workspace_secret:
        console.print(
            "   [yellow]ELEVENLABS_CLIENT_DATA_WORKSPACE_SECRET is empty: client-data and "
            "search-data answer 401 until it is set.[/]"
        )
