"""`elaoms demo`: a one-command tour of a running service, no hand-made HMAC.

Sends the bundled example call to the service as ElevenLabs would (signed with the
webhook secret from the settings), waits until it is stored and its caller's profile is
prepared, then prints what client-data and the search tool now answer for that caller.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import httpx
import typer
from rich.markup import escape

from elaoms.cli.runtime import CliError, console, load_settings, print_json
from elaoms.config import Settings
from elaoms.demo import DEMO_AGENT_ID, DEMO_CALLER, DEMO_QUERY, demo_call
from elaoms.webhooks.signature import SIGNATURE_HEADER, sign

# How long the stored call may take to show in client-data's answer: the profile is
# prepared after the webhook answers. Generous, for a busy machine; usually instant.
READY_TIMEOUT_SECONDS = 60.0


def default_url(settings: Settings) -> str:
    host = settings.host
    if host in ("0.0.0.0", "::", ""):  # listening everywhere: loopback reaches it
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def _headers(settings: Settings) -> dict[str, str]:
    secret = settings.elevenlabs_client_data_workspace_secret
    return {"X-Api-Key": secret} if secret else {}


def _client_data(client: httpx.Client, settings: Settings) -> dict[str, Any]:
    request = {
        "caller_id": DEMO_CALLER,
        "agent_id": DEMO_AGENT_ID,
        "called_number": "+14155550199",
        "call_sid": "CAelaomsdemo",
    }
    response = client.post("/webhooks/client-data", json=request, headers=_headers(settings))
    if response.status_code == 401:
        raise CliError(
            "client-data answered 401: the service's ELEVENLABS_CLIENT_DATA_WORKSPACE_SECRET "
            "is not the one in this folder's settings"
        )
    response.raise_for_status()
    answer: dict[str, Any] = response.json()
    return answer


def _greeting(answer: dict[str, Any]) -> str | None:
    override = answer.get("conversation_config_override") or {}
    greeting = (override.get("agent") or {}).get("first_message")
    return str(greeting) if greeting else None


def demo(
    url: Annotated[
        str | None,
        typer.Option(help="The running service. Default: http://HOST:PORT from the settings."),
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Send a signed example call to the running service, then show what client-data and
    the search tool answer for that caller."""
    settings = load_settings()
    if not settings.elevenlabs_post_call_hmac_key:
        raise CliError(
            "ELEVENLABS_POST_CALL_HMAC_KEY is not set: run `elaoms setup` (or `make run`) "
            "in this folder, then start the service"
        )
    base = (url or default_url(settings)).rstrip("/")
    with httpx.Client(base_url=base, timeout=30.0) as client:
        try:
            client.get("/health").raise_for_status()
        except httpx.HTTPError as error:
            raise CliError(
                f"no service answers at {base} ({error}): start it in another terminal "
                "(`make run` or `elaoms serve`), or pass --url"
            ) from None

        payload = demo_call()
        payload["event_timestamp"] = int(time.time())
        body = json.dumps(payload).encode()
        signature = sign(settings.elevenlabs_post_call_hmac_key, body)
        posted = client.post(
            "/webhooks/post-call",
            content=body,
            headers={SIGNATURE_HEADER: signature, "Content-Type": "application/json"},
        )
        if posted.status_code == 401:
            raise CliError(
                f"post-call answered 401 ({posted.json().get('detail')}): the service runs "
                "with another ELEVENLABS_POST_CALL_HMAC_KEY than this folder's settings"
            )
        posted.raise_for_status()
        if not json_output:
            console.print(
                f"[bold]1. post-call[/] (signed example call from {DEMO_CALLER}): "
                f"{escape(json.dumps(posted.json()))}"
            )

        # Stored, and the caller's profile prepared: the next ring gets the greeting.
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while True:
            answer = _client_data(client, settings)
            if _greeting(answer) or time.monotonic() > deadline:
                break
            time.sleep(0.1)

        search = client.post(
            "/webhooks/search-data",
            json={"query": DEMO_QUERY, "user_id": DEMO_CALLER, "limit": 3},
            headers=_headers(settings),
        )
        search.raise_for_status()
        found = search.json()

    if json_output:
        print_json({"post_call": posted.json(), "client_data": answer, "search_data": found})
    else:
        variables = answer.get("dynamic_variables") or {}
        console.print("\n[bold]2. client-data[/] (the caller rings again): first message:")
        console.print(f"   {escape(_greeting(answer) or '(none: see `elaoms first-message`)')}")
        for name in ("caller_name", "call_count", "last_call_at", "user_context"):
            console.print(f"   {name}: {escape(str(variables.get(name, '')))}")
        console.print(
            f"\n[bold]3. search-data[/] (the agent asks {DEMO_QUERY!r}): "
            f"{found.get('memories_found', 0)} excerpt(s)"
        )
        console.print(escape(str(found.get("context") or "")))
        console.print(
            f"\n[dim]Remove the example caller with: elaoms forget {DEMO_CALLER} --yes[/]"
        )
    if not _greeting(answer) or not found.get("memories_found"):
        raise CliError(
            "the example call did not show up in the answers in time: see the service's log"
        )
