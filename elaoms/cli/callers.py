"""Commands about one caller: profile, search, first-message, forget, export."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from elaoms.cli.runtime import (
    caller_id,
    console,
    err_console,
    format_time,
    not_found,
    print_json,
    run,
    store_description,
    write_private,
)
from elaoms.operations.privacy import ForgetReport, export_caller, forget_caller

if TYPE_CHECKING:
    from elaoms.services import Services

CallerArg = Annotated[str, typer.Argument(help="Caller ID: a phone number in any format.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]

# An operator waits for a cold index build that the live tool, mid-call, would not.
CLI_SEARCH_TIMEOUT_MS = 30_000


# profile ---------------------------------------------------------------------------------
async def caller_profile(services: Services, user_id: str) -> dict[str, Any] | None:
    """The prepared profile, or one computed from the stored calls when none is prepared
    yet (calls stored before profiles existed, or a profile hook that has not run)."""
    from elaoms.personalization.profile import build_facts, caller_history, user_context

    profile = await services.store.get_caller_profile(user_id)
    if profile:
        return {**profile, "source": "prepared"}
    history = await caller_history(services.store, user_id)
    if not history.count:
        return None
    facts = build_facts(user_id, history)
    context = user_context(facts, services.settings.user_context_max_chars)
    return {**facts, "greeting": None, "user_context": context, "source": "computed"}


def profile(
    caller: CallerArg,
    summaries: Annotated[int, typer.Option(min=0, help="Recent call summaries to show.")] = 3,
    json_output: JsonOption = False,
) -> None:
    """A caller's profile: name, calls, topics, follow-ups, and what the next call gets."""
    from elaoms.cli.greeting import greeting_withheld_reason

    user_id = caller_id(caller)

    async def work(services: Services) -> tuple[dict[str, Any] | None, str | None]:
        found = await caller_profile(services, user_id)
        if found is None or (found.get("greeting") and await _greeting_sent(services, user_id)):
            return found, None
        return found, await greeting_withheld_reason(services, found, found.get("agent_id"))

    found, withheld = run(work)
    if found is None:
        not_found(f"nothing stored about {user_id} in {store_description()}")
    if json_output:
        print_json(found if withheld is None else {**found, "greeting_withheld": withheld})
        return
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    rows = [
        ("caller", found.get("user_id") or user_id),
        ("name", _with_source(found.get("name"), found.get("name_source"))),
        ("calls", found.get("call_count")),
        ("first call", format_time(found.get("first_call_at"))),
        ("last call", format_time(found.get("last_call_at"))),
        ("topics", "; ".join(found.get("topics") or []) or "-"),
        ("open follow-ups", "; ".join(found.get("open_follow_ups") or []) or "-"),
    ]
    for entry in (found.get("recent_summaries") or [])[:summaries]:
        title = entry.get("title") or entry.get("conversation_id")
        rows.append(
            (format_time(entry.get("started_at")), f"{title}: {entry.get('summary') or '-'}")
        )
    greeting = found.get("greeting")
    rows.append(("next greeting", _with_source(greeting, found.get("greeting_source"))))
    if withheld:
        rows.append(("greeting sent", f"no: {withheld}"))
    rows.append(("user_context", found.get("user_context") or "-"))
    for label, value in rows:
        table.add_row(escape(label), escape(str(value if value is not None else "-")))
    console.print(table)
    if found["source"] == "computed":
        console.print(
            "[dim]computed from stored calls: no prepared profile yet (the next stored call "
            "prepares one, with its greeting)[/]"
        )


async def _greeting_sent(services: Services, user_id: str) -> bool:
    """Whether client-data would send a personalized first message to this caller now."""
    from elaoms.personalization.service import preview_first_message

    answer = (await preview_first_message(services, user_id)).model_dump(exclude_none=True)
    override = answer.get("conversation_config_override") or {}
    return bool((override.get("agent") or {}).get("first_message"))


def _with_source(value: Any, source: Any) -> str:
    if not value:
        return "-"
    return f"{value} ({source})" if source else str(value)


# search ----------------------------------------------------------------------------------
async def search_as_tool(
    services: Services, user_id: str, query: str, limit: int
) -> dict[str, Any]:
    """The body the search-data tool would answer, for this caller and query."""
    from elaoms.search.schemas import search_answer

    # The tool's own service, with only the deadline an operator can afford.
    service = dataclasses.replace(
        services.search, timeout_ms=max(services.search.timeout_ms, CLI_SEARCH_TIMEOUT_MS)
    )
    result = await service.search(user_id, query, limit)
    return search_answer(result)


def search(
    caller: CallerArg,
    query: Annotated[str, typer.Argument(help="What the agent would look up.")],
    limit: Annotated[int, typer.Option(min=1, max=50, help="Past calls to quote at most.")] = 5,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the tool's exact JSON answer.")
    ] = False,
) -> None:
    """What the search-data tool would answer the agent for this caller and query."""
    user_id = caller_id(caller)

    async def work(services: Services) -> tuple[dict[str, Any], bool]:
        answer = await search_as_tool(services, user_id, query, limit)
        known = bool(answer["memories_found"]) or bool(await services.store.list_calls(user_id))
        return answer, known

    answer, known = run(work)
    if json_output:
        print_json(answer)
    else:
        console.print(f"{answer['memories_found']} excerpt(s) for {escape(user_id)}")
        if answer["context"]:
            console.print()
            console.print(escape(answer["context"]))
    if not known:  # as `profile` does: a caller we know nothing about is "not found"
        not_found(f"nothing stored about {user_id} in {store_description()}")


# first-message ---------------------------------------------------------------------------
def first_message(
    caller: CallerArg,
    agent: Annotated[str | None, typer.Option("--agent", help="The agent taking the call.")] = None,
    json_output: JsonOption = False,
) -> None:
    """What the client-data webhook would answer when this caller rings next."""
    from elaoms.cli.greeting import greeting_withheld_reason
    from elaoms.personalization.service import preview_first_message

    user_id = caller_id(caller)

    async def work(services: Services) -> tuple[dict[str, Any], str | None]:
        response = await preview_first_message(services, user_id, agent_id=agent)
        answer = response.model_dump(exclude_none=True)
        override = answer.get("conversation_config_override") or {}
        if (override.get("agent") or {}).get("first_message"):
            return answer, None
        found = await caller_profile(services, user_id)
        agent_id = agent or (found or {}).get("agent_id")
        return answer, await greeting_withheld_reason(services, found, agent_id)

    answer, withheld = run(work)
    if json_output:
        print_json(answer if withheld is None else {**answer, "greeting_withheld": withheld})
        return
    override = answer.get("conversation_config_override") or {}
    greeting = (override.get("agent") or {}).get("first_message")
    if greeting:
        console.print(f"[bold]first message:[/] {escape(str(greeting))}")
    else:
        console.print(f"[bold]first message:[/] (the agent's own) because {escape(str(withheld))}")
    for name, value in sorted((answer.get("dynamic_variables") or {}).items()):
        console.print(f"[bold]{escape(name)}:[/] {escape(str(value))}")


# forget / export -------------------------------------------------------------------------
def forget(
    caller: CallerArg,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    json_output: JsonOption = False,
    withheld_pool: Annotated[
        bool,
        typer.Option(
            "--withheld-pool",
            help="CALLER is a withheld marker: delete the calls an older version pooled "
            "under it (many strangers' calls).",
        ),
    ] = False,
) -> None:
    """Delete everything about a caller: memories, calls, profile, files, cached greetings."""
    user_id = caller_id(caller, allow_withheld=withheld_pool)

    async def work(services: Services) -> ForgetReport | None:
        if not yes:
            calls = await services.store.list_calls(user_id)
            files = services.storage.files_of(user_id)
            err_console.print(
                f"About to delete everything about {escape(user_id)}: {len(calls)} stored "
                f"call(s), their memories and profile, {len(files)} file(s) on disk."
            )
            if not typer.confirm("Delete?", default=False, err=True):
                return None
        return await forget_caller(services, user_id)

    report = run(work)
    if report is None:  # the operator's answer, not a failure
        err_console.print("nothing deleted")
        return
    if json_output:
        print_json(report.as_dict())
        return
    if not report.found_anything:
        console.print(f"nothing was held about {escape(user_id)}")
        return
    console.print(
        f"[green]forgot {escape(user_id)}[/]: {report.store_items_deleted} item(s) from the "
        f"memory store (calls, memories, profile), "
        f"{len(report.conversations)} conversation(s)"
    )
    deleted = report.files_deleted + report.unclaimed_audio_deleted + report.quarantined_deleted
    for path in deleted:
        console.print(f"  deleted {escape(path)}")
    if report.cache_invalidated:
        console.print("  cached profile and greeting dropped")


def export(
    caller: CallerArg,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file (mode 0600).")
    ] = None,
    include_audio: Annotated[
        bool, typer.Option(help="Include recordings (base64); can be large.")
    ] = False,
) -> None:
    """Everything held about a caller as one JSON document (data-protection requests)."""
    user_id = caller_id(caller)
    document = run(lambda services: export_caller(services, user_id, include_audio=include_audio))
    if not (document["calls"] or document["memories"] or document["profile"] or document["files"]):
        not_found(f"nothing is held about {user_id}")
    if output is None:
        print_json(document)
        return
    body = json.dumps(document, indent=2, ensure_ascii=False).encode()
    write_private(output, body)
    err_console.print(
        f"wrote {escape(str(output))}: {len(document['calls'])} call(s), "
        f"{len(document['memories'])} memories, {len(document['files'])} file(s)"
    )
