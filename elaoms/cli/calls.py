"""`elaoms calls`: the stored calls as a table, and one call's transcript."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from elaoms.cli.runtime import (
    caller_id,
    console,
    format_time,
    not_found,
    parse_when,
    print_json,
    run,
)
from elaoms.memory.base import StoredCall
from elaoms.memory.records import TRANSCRIPTION, CallRecord, seconds_in_call

if TYPE_CHECKING:
    from elaoms.services import Services

calls_app = typer.Typer(no_args_is_help=False, rich_markup_mode=None)


# Below this width the table squeezes the agent and title out: a list reads better.
WIDE_TABLE_COLUMNS = 120


@calls_app.callback(invoke_without_command=True)
def calls(
    ctx: typer.Context,
    caller: Annotated[str | None, typer.Option(help="Only this caller's calls.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Calls started on or after (YYYY-MM-DD, ISO or unix).")
    ] = None,
    agent: Annotated[str | None, typer.Option(help="Only this agent's calls.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first.")] = 50,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List stored calls, newest first. `elaoms calls show ID` prints one transcript."""
    if ctx.invoked_subcommand is not None:
        return
    user_id = caller_id(caller, allow_withheld=True) if caller else None
    started_after = parse_when(since)

    async def work(services: Services) -> list[StoredCall]:
        return await services.store.list_calls(
            user_id, agent_id=agent, since=started_after, limit=limit
        )

    rows = [call_summary(call) for call in run(work)]
    if json_output:
        print_json(rows)
        return
    if not rows:
        console.print("no stored calls match")
        return
    cells = [
        (
            format_time(row["started_at"]).removesuffix(" UTC"),
            row["conversation_id"],
            row["user_id"],
            row["agent_name"] or row["agent_id"] or "-",
            row["duration_secs"] if row["duration_secs"] is not None else "-",
            row["title"] or "-",
        )
        for row in rows
    ]
    if console.width >= WIDE_TABLE_COLUMNS:
        table = Table()
        # Identifiers are copied into other commands: never broken across lines.
        for column in ("started (UTC)", "conversation", "caller"):
            table.add_column(column, no_wrap=True)
        table.add_column("agent", overflow="fold", max_width=24)
        table.add_column("secs", justify="right", no_wrap=True)
        table.add_column("title", overflow="fold")
        for cell in cells:
            table.add_row(*(escape(str(value)) for value in cell))
        console.print(table)
    else:
        # A table this narrow hid the agent and title, or folded ids over many lines: one
        # line of identifiers per call, whole, then what it was about.
        for started, conversation, user, agent_name, secs, title in cells:
            seconds = f"{secs}s" if secs != "-" else "-"
            console.print(
                f"[bold]{escape(started)}[/]  {escape(str(conversation))}  "
                f"{escape(str(user))}  {seconds}",
                no_wrap=True,
                overflow="ignore",
                crop=False,
            )
            console.print(f"  {escape(str(agent_name))}: {escape(str(title))}", style="dim")
    console.print(f"{len(rows)} call(s)" + (f" (--limit {limit})" if len(rows) == limit else ""))


@calls_app.command("show")
def show(
    conversation_id: Annotated[str, typer.Argument(help="The ElevenLabs conversation id.")],
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the whole stored payload.")
    ] = False,
) -> None:
    """Print one stored call's transcript (or its whole payload with --json)."""

    async def work(services: Services) -> StoredCall | None:
        return await services.store.get_call(conversation_id)

    call = run(work)
    if call is None:
        not_found(f"no stored call {conversation_id}")
    if json_output:
        print_json(call.payload)
        return
    print_transcript(call)


def call_summary(call: StoredCall) -> dict[str, Any]:
    # The payload is kept as sent: read through its checked record, as storing did.
    record = CallRecord.from_payload(call.payload)
    title = record.title
    if call.event_type != TRANSCRIPTION:
        title = f"{call.event_type}: {record.failure_reason or ''}".rstrip(": ")
    return {
        "conversation_id": call.conversation_id,
        "user_id": call.user_id,
        "agent_id": call.agent_id,
        "agent_name": record.agent_name,
        "event_type": call.event_type,
        "started_at": call.started_at,
        "duration_secs": record.duration_secs,
        "title": title,
        "summary": record.summary,
        "memory_id": call.memory_id,
    }


def print_transcript(call: StoredCall) -> None:
    summary = call_summary(call)
    data = call.payload.get("data") or {}
    agent = summary["agent_name"] or summary["agent_id"] or "-"
    console.print(
        f"[bold]{escape(call.conversation_id)}[/]  caller {escape(call.user_id)}  "
        f"agent {escape(str(agent))}"
    )
    duration = summary["duration_secs"]
    console.print(
        f"{format_time(call.started_at)}" + (f", {duration} s" if duration is not None else "")
    )
    if summary["title"]:
        console.print(f"[bold]{escape(str(summary['title']))}[/]")
    if summary["summary"]:
        console.print(escape(str(summary["summary"])))
    console.print()
    transcript = data.get("transcript")
    # Raw turns, not the record's: tool calls are shown too.
    for turn in transcript if isinstance(transcript, list) else []:
        if not isinstance(turn, dict):
            continue
        offset = seconds_in_call(turn.get("time_in_call_secs"))
        stamp = f"[{int(offset) // 60:02d}:{int(offset) % 60:02d}]" if offset is not None else ""
        speaker = "Caller" if turn.get("role") == "user" else "Agent"
        if turn.get("message"):
            console.print(f"[dim]{stamp}[/] [bold]{speaker}:[/] {escape(str(turn['message']))}")
        tools = turn.get("tool_calls")
        for tool in tools if isinstance(tools, list) else []:
            if isinstance(tool, dict):
                called = f"{tool.get('tool_name')} {tool.get('params_as_json') or ''}"
                console.print(f"[dim]{stamp} {speaker} called {escape(called)}[/]")
