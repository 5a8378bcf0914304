"""`elaoms backfill`: store past conversations as if their post-call webhooks had arrived.

Pages through GET /v1/convai/conversations, fetches each finished conversation the store
does not have, wraps it in a `post_call_transcription` envelope and hands it to the same
ingestion as the webhook (files on disk, memories, profile hooks).

- At most `--concurrency` requests are in flight: ElevenLabs limits concurrent requests
  per plan (2 to 15) and answers 429 past it; the client retries 429 and 5xx with backoff.
- Resumable: a small state file keeps the cursor of the page being worked on and the
  conversations of that page already done. An interrupted run (Ctrl-C, a crash, an API
  that gave up) starts again from there. A finished run removes the file.
- Idempotent: a conversation the store already has is not even fetched, and ingestion
  dedups by conversation id anyway, so a second run stores nothing new.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from elaoms.cli.runtime import (
    EXIT_INCOMPLETE,
    CliError,
    console,
    err_console,
    load_settings,
    parse_when,
    print_json,
    run,
)
from elaoms.elevenlabs.client import ElevenLabsClient, ElevenLabsError
from elaoms.files import atomic_write
from elaoms.memory.records import TRANSCRIPTION, CallRecord
from elaoms.phone import mask
from elaoms.webhooks.identity import caller_of

if TYPE_CHECKING:
    from elaoms.services import Services

logger = logging.getLogger(__name__)

STATE_VERSION = 1
# Post-call webhooks only fire for conversations that ended; the others are picked up by a
# later run.
FINISHED_STATUSES = frozenset({"done", "failed"})
# Whole conversations with long transcripts take longer than the agent-profile lookups the
# client's default timeout is tuned for.
BACKFILL_TIMEOUT_SECONDS = 30.0


class ConversationSource(Protocol):
    """The two ElevenLabs calls backfill needs (elaoms.elevenlabs.client.ElevenLabsClient)."""

    async def list_conversations(
        self, cursor: str | None = None, agent_id: str | None = None, page_size: int = 100
    ) -> dict[str, Any]: ...

    async def get_conversation(self, conversation_id: str) -> dict[str, Any]: ...


class BackfillProgress(Protocol):
    def found(self, count: int) -> None: ...

    def advance(self, outcome: str) -> None: ...


@dataclass(frozen=True, slots=True)
class BackfillOptions:
    agent_id: str | None = None
    since: int | None = None  # unix seconds, inclusive
    until: int | None = None  # unix seconds, inclusive
    concurrency: int = 4
    page_size: int = 100
    state_path: Path = Path("data/backfill-state.json")
    restart: bool = False

    def filters(self) -> dict[str, Any]:
        return {"agent_id": self.agent_id, "since": self.since, "until": self.until}


@dataclass
class BackfillReport:
    listed: int = 0  # conversations the API listed
    stored: int = 0  # new in the store
    queued: int = 0  # kept on disk; the service stores them when the store answers
    already_stored: int = 0
    forgotten: int = 0  # forgotten with their caller (`elaoms forget`): not stored again
    quarantined: int = 0  # the API answered something ingestion could not read
    out_of_range: int = 0  # another agent or outside the dates
    unfinished: int = 0  # still in progress on ElevenLabs' side
    gone: int = 0  # listed, then 404 when fetched
    failed: dict[str, str] = field(default_factory=dict)  # conversation id -> error
    error: str | None = None  # why the run stopped early
    pages: int = 0
    resumed: bool = False
    complete: bool = False

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BackfillState:
    """Where an interrupted run stopped: the page being worked on and what is done in it."""

    path: Path
    filters: dict[str, Any]
    cursor: str | None = None
    completed: set[str] = field(default_factory=set)

    @classmethod
    def load(
        cls, path: Path, filters: dict[str, Any], *, restart: bool
    ) -> tuple[BackfillState, bool]:
        """The saved state when it is for the same filters; (state, resumed)."""
        fresh = cls(path, filters)
        if restart or not path.exists():
            return fresh, False
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            return fresh, False
        if saved.get("version") != STATE_VERSION or saved.get("filters") != filters:
            return fresh, False
        state = cls(path, filters, saved.get("cursor"), set(saved.get("completed") or []))
        return state, True

    def save(self, file_mode: int, dir_mode: int) -> None:
        body = {
            "version": STATE_VERSION,
            "filters": self.filters,
            "cursor": self.cursor,
            "completed": sorted(self.completed),
            "saved_at": int(time.time()),
        }
        atomic_write(self.path, json.dumps(body, indent=2).encode(), file_mode, dir_mode)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


class _Limited:
    """Every request to the source under one semaphore: retries and backoff happen while
    holding a slot, so the plan's concurrency limit is never exceeded."""

    def __init__(self, source: ConversationSource, limit: int) -> None:
        self.source = source
        self.slots = asyncio.Semaphore(limit)

    async def list_conversations(
        self, cursor: str | None, agent_id: str | None, page_size: int
    ) -> dict[str, Any]:
        async with self.slots:
            return await self.source.list_conversations(cursor, agent_id, page_size)

    async def get_conversation(self, conversation_id: str) -> dict[str, Any]:
        async with self.slots:
            return await self.source.get_conversation(conversation_id)


async def backfill(
    services: Services,
    source: ConversationSource,
    options: BackfillOptions,
    progress: BackfillProgress | None = None,
) -> BackfillReport:
    """Store every finished conversation the filters select. Stops at the first page with a
    failed conversation, leaving the state file to resume from there."""
    callers: set[str] = set()
    report = await _backfill_pages(services, source, options, progress, callers)
    await _settle_profiles(services, callers)
    return report


async def _settle_profiles(services: Services, callers: set[str]) -> None:
    """Prepare each touched caller's profile once more, after every hook of the run.

    Webhooks of one caller never arrive together, but a backfill stores several of their
    calls at once, and each call's hook rebuilds the profile from the calls it sees: the
    last hook to write may have seen fewer calls than are stored.
    """
    await services.ingest.drain(timeout=None)  # a hook still running would overwrite
    for user_id in sorted(callers):
        try:
            await services.personalization.prepare_caller(user_id)
        except Exception as error:  # the next call of this caller prepares it again
            logger.warning("profile of %s not refreshed: %s", mask(user_id), error)


async def _backfill_pages(
    services: Services,
    source: ConversationSource,
    options: BackfillOptions,
    progress: BackfillProgress | None,
    callers: set[str],
) -> BackfillReport:
    settings = services.settings
    state, resumed = BackfillState.load(
        options.state_path, options.filters(), restart=options.restart
    )
    report = BackfillReport(resumed=resumed)
    api = _Limited(source, options.concurrency)

    async def one(conversation_id: str) -> None:
        outcome, error, user_id = await _backfill_one(services, api, conversation_id)
        if user_id and outcome == "stored":
            callers.add(user_id)
        if outcome == "failed":
            report.failed[conversation_id] = error or "unknown error"
        else:
            # Recorded as each finishes, so an interrupted page resumes without repeats.
            state.completed.add(conversation_id)
            setattr(report, outcome, getattr(report, outcome) + 1)
        if progress:
            progress.advance(outcome)

    try:
        while True:
            try:
                page = await api.list_conversations(
                    state.cursor, options.agent_id, options.page_size
                )
            except ElevenLabsError as error:
                if not error.retryable:  # a wrong key or URL: resuming would not help
                    raise
                report.error = str(error)
                return report
            report.pages += 1
            items = [item for item in page.get("conversations") or [] if isinstance(item, dict)]
            report.listed += len(items)
            todo = [cid for item in items if (cid := _select(item, options, state, report))]
            if progress:
                progress.found(len(todo))
            await asyncio.gather(*(one(cid) for cid in todo))
            if report.failed:
                report.error = f"{len(report.failed)} conversation(s) could not be stored"
                return report
            next_cursor = page.get("next_cursor")
            if not page.get("has_more") or not next_cursor:
                report.complete = True
                return report
            state.cursor, state.completed = str(next_cursor), set()
            state.save(settings.file_permissions_mode, settings.directory_permissions_mode)
    finally:
        if report.complete:
            state.clear()
        else:  # also on Ctrl-C and API errors: the next run resumes here
            state.save(settings.file_permissions_mode, settings.directory_permissions_mode)


def _select(
    item: dict[str, Any], options: BackfillOptions, state: BackfillState, report: BackfillReport
) -> str | None:
    """The conversation id of a listed item to backfill, or None (counted in `report`)."""
    conversation_id = item.get("conversation_id")
    if not conversation_id:
        return None
    started = item.get("start_time_unix_secs")
    # The API filters by agent already; the dates are checked here because the list call
    # takes no date range.
    if (
        (options.agent_id and item.get("agent_id") not in (None, options.agent_id))
        or (options.since is not None and isinstance(started, int) and started < options.since)
        or (options.until is not None and isinstance(started, int) and started > options.until)
    ):
        report.out_of_range += 1
        return None
    if str(item.get("status") or "done") not in FINISHED_STATUSES:
        report.unfinished += 1
        return None
    if conversation_id in state.completed:
        report.already_stored += 1
        return None
    return str(conversation_id)


async def _backfill_one(
    services: Services, api: _Limited, conversation_id: str
) -> tuple[str, str | None, str | None]:
    """(outcome, error, caller): outcome is a BackfillReport counter name, or "failed"."""
    try:
        if await services.store.is_forgotten(conversation_id):
            return "forgotten", None, None
        if await services.store.get_call(conversation_id) is not None:
            return "already_stored", None, None
        data = await api.get_conversation(conversation_id)
        acknowledgement = await services.ingest.receive(envelope_of(data))
    except ElevenLabsError as failure:
        if failure.status_code == 404:
            return "gone", None, None
        return "failed", str(failure), None
    except Exception as failure:  # one bad conversation must not stop the others
        return "failed", f"{type(failure).__name__}: {failure}", None
    statuses = {"received": "stored", "queued": "queued", "forgotten": "forgotten"}
    outcome = statuses.get(acknowledgement.status, "quarantined")
    return outcome, None, caller_of(TRANSCRIPTION, data) or conversation_id


def envelope_of(data: dict[str, Any]) -> bytes:
    """The post-call webhook body ElevenLabs would have sent for this conversation."""
    record = CallRecord.from_payload({"data": data})
    if record.started_at is not None:
        # The webhook fires when the call ends.
        event_timestamp = int(record.started_at + (record.duration_secs or 0))
    else:
        event_timestamp = int(time.time())
    envelope = {"type": TRANSCRIPTION, "event_timestamp": event_timestamp, "data": data}
    return json.dumps(envelope, ensure_ascii=False).encode()


class _RichProgress:
    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.task = bar.add_task("conversations", total=0)

    def found(self, count: int) -> None:
        total = self.bar.tasks[0].total or 0
        self.bar.update(self.task, total=total + count)

    def advance(self, outcome: str) -> None:
        self.bar.advance(self.task)


def backfill_command(
    agent: Annotated[str | None, typer.Option("--agent", help="Only this agent's calls.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Calls started on or after (YYYY-MM-DD, ISO or unix).")
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Calls started on or before (YYYY-MM-DD, ISO or unix).")
    ] = None,
    concurrency: Annotated[
        int, typer.Option(min=1, max=15, help="Requests in flight (your plan allows 2 to 15).")
    ] = 4,
    page_size: Annotated[int, typer.Option(min=1, max=100)] = 100,
    state_file: Annotated[
        Path | None,
        typer.Option(help="Resume file. Default: backfill-state.json beside WEBHOOK_STORAGE_PATH."),
    ] = None,
    restart: Annotated[bool, typer.Option(help="Ignore a saved position; start over.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print a JSON report.")] = False,
) -> None:
    """Store past conversations from the ElevenLabs API as if their webhooks had arrived."""
    settings = load_settings()
    if not settings.elevenlabs_api_key:
        raise CliError("ELEVENLABS_API_KEY is not set: backfill reads past calls from the API")
    options = BackfillOptions(
        agent_id=agent,
        since=parse_when(since),
        until=parse_when(until, end_of_day=True),
        concurrency=concurrency,
        page_size=page_size,
        state_path=state_file or settings.webhook_storage_path.parent / "backfill-state.json",
        restart=restart,
    )

    async def work(services: Services) -> BackfillReport:
        client = ElevenLabsClient(
            settings.elevenlabs_api_base_url,
            settings.elevenlabs_api_key,
            timeout=max(settings.elevenlabs_api_timeout_seconds, BACKFILL_TIMEOUT_SECONDS),
        )
        try:
            if json_output or not err_console.is_terminal:  # no bar in logs or cron mail
                return await backfill(services, client, options)
            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            )
            with Progress(*columns, console=err_console, transient=True) as bar:
                return await backfill(services, client, options, _RichProgress(bar))
        finally:
            await client.aclose()

    report = run(work, settings=settings)
    if json_output:
        print_json(report.as_dict())
    else:
        _print_report(report, options)
    if not report.complete:
        raise typer.Exit(EXIT_INCOMPLETE)


def _print_report(report: BackfillReport, options: BackfillOptions) -> None:
    if report.resumed:
        console.print(f"resumed from {escape(str(options.state_path))}")
    console.print(
        f"[green]{report.stored} new[/], {report.already_stored} already stored, "
        f"{report.forgotten} forgotten (skipped), "
        f"{report.queued} queued, {report.quarantined} quarantined "
        f"({report.listed} listed on {report.pages} page(s), {report.out_of_range} filtered "
        f"out, {report.unfinished} still in progress, {report.gone} gone)"
    )
    for conversation_id, error in list(report.failed.items())[:5]:
        err_console.print(f"[red]failed[/] {escape(conversation_id)}: {escape(error)}")
    if not report.complete:
        err_console.print(
            f"[yellow]incomplete ({escape(str(report.error))}): run `elaoms backfill` again "
            f"to resume from {escape(str(options.state_path))}[/]"
        )
