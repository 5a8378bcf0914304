"""`elaoms backfill` against a local stand-in of the ElevenLabs API.

Several pages, a 429 in between, a concurrency limit, a date range, an interruption
(SIGINT mid-run) and a second run that must store nothing new.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from typer.testing import CliRunner

from elaoms.cli import app
from elaoms.config import Settings
from elaoms.webhooks.storage import caller_dir_name

from conftest import REPO_ROOT, WAIT_BOUND, base_env, transcription, wait_until
from standins import AGENT_ID, ElevenLabsStandIn

API_KEY = "xi-test-key"
DAY = 86_400
FIRST_START = 1763760000  # 2025-11-21 21:20 UTC, the fixture's call
CALLERS = ["+14155550101", "+14155550102", "+14155550103"]
runner = CliRunner()


class Conversations(ElevenLabsStandIn):
    """The shared ElevenLabs stand-in, plus what these tests observe: requests in flight,
    one 429 on a chosen page, and a page that hangs until released."""

    def __init__(self) -> None:
        super().__init__(API_KEY)
        self.in_flight = 0
        self.max_in_flight = 0
        self.cursors: list[str | None] = []  # every listing request, in order
        self.fetched: list[str] = []  # every single-conversation request
        self.throttle_cursor: str | None = None  # first request for it gets a 429
        self.hold_cursor: str | None = None  # requests for it hang until `release`
        self.release = threading.Event()
        # Seconds a conversation fetch waits for another one to be in flight: concurrent
        # fetches then overlap however a loaded host spaces their arrivals (20 ms did not).
        self.overlap_wait = 0.0
        self._lock = threading.Lock()

    async def _observed(
        self, handler: Any, request: Request, overlap_wait: float = 0.0
    ) -> Response:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.02)  # long enough for concurrent requests to overlap
            deadline = time.monotonic() + overlap_wait
            while self.max_in_flight < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return await handler(request)
        finally:
            with self._lock:
                self.in_flight -= 1

    async def _conversations(self, request: Request) -> Response:
        cursor = request.query_params.get("cursor")
        self.cursors.append(cursor)
        if cursor is not None and cursor == self.throttle_cursor:
            self.throttle_cursor = None
            return JSONResponse({"detail": "too_many_concurrent_requests"}, status_code=429)
        if cursor is not None and cursor == self.hold_cursor:
            while not self.release.is_set():
                await asyncio.sleep(0.02)
        return await self._observed(super()._conversations, request)

    async def _conversation(self, request: Request) -> Response:
        self.fetched.append(request.path_params["conversation_id"])
        return await self._observed(super()._conversation, request, self.overlap_wait)


def add_calls(api: Conversations) -> list[str]:
    """Seven finished calls of three callers a day apart, newest first, one call still in
    progress, and one call of another agent. Returns the finished ids of AGENT_ID."""
    finished = []
    for index in range(7):
        conversation_id = f"conv_past_{index}"
        data = transcription(conversation_id, CALLERS[index % 3])["data"]
        data["metadata"]["start_time_unix_secs"] = FIRST_START - index * DAY
        api.add_conversation(data)
        finished.append(conversation_id)
    ongoing = transcription("conv_ongoing", CALLERS[0])["data"]
    ongoing["status"] = "processing"
    ongoing["metadata"]["start_time_unix_secs"] = FIRST_START + 60
    api.add_conversation(ongoing)
    other = transcription("conv_other_agent", CALLERS[1])["data"]
    other["agent_id"] = "agent_other"
    api.add_conversation(other)
    return finished


@pytest.fixture
def api() -> Iterator[Conversations]:
    with Conversations() as server:
        yield server
        server.release.set()


@pytest.fixture
def env(tmp_path: Path, api: Conversations, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = base_env(
        tmp_path / "data",
        ELEVENLABS_API_KEY=API_KEY,
        ELEVENLABS_API_BASE_URL=api.url,
        LOG_LEVEL="WARNING",
    )
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    return values


def backfill(*args: str) -> Result:
    return runner.invoke(app, ["backfill", "--json", *args], catch_exceptions=False)


def report_of(result: Result, exit_code: int = 0) -> dict[str, Any]:
    assert result.exit_code == exit_code, result.output
    return json.loads(result.stdout)


def stored_file(settings: Settings, caller: str, conversation_id: str) -> Path:
    return (
        settings.webhook_storage_path
        / caller_dir_name(caller)
        / f"post_call_transcription__{conversation_id}.json"
    )


def test_backfill_stores_every_page_within_the_limit_and_a_second_run_stores_nothing(
    api: Conversations, env: dict[str, str]
) -> None:
    finished = add_calls(api)
    api.throttle_cursor = "3"  # the second page answers 429 first
    # Ended by the first overlap; a client that fetches one at a time waits it out each time
    # (well below the backfill's own 30 s request timeout).
    api.overlap_wait = 5.0

    report = report_of(backfill("--agent", AGENT_ID, "--page-size", "3", "--concurrency", "2"))

    assert report["complete"] is True
    assert report["stored"] == 7
    assert report["unfinished"] == 1  # conv_ongoing waits for a later run
    assert report["pages"] == 3
    assert api.cursors.count("3") == 2  # retried after the 429
    assert api.max_in_flight == 2
    assert sorted(api.fetched) == sorted(finished)
    settings = Settings(_env_file=None)
    for index, conversation_id in enumerate(finished):
        path = stored_file(settings, CALLERS[index % 3], conversation_id)
        envelope = json.loads(path.read_text())
        assert envelope["type"] == "post_call_transcription"
        assert envelope["data"]["conversation_id"] == conversation_id
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not list(settings.pending_path.iterdir())  # all in the store, none waiting
    assert not (settings.webhook_storage_path.parent / "backfill-state.json").exists()

    # Stored "as if the webhook had arrived": the caller's profile was prepared too.
    profile = runner.invoke(app, ["profile", CALLERS[0], "--json"])
    assert json.loads(profile.stdout)["call_count"] == 3
    assert json.loads(profile.stdout)["source"] == "prepared"

    fetched_before = len(api.fetched)
    again = report_of(backfill("--agent", AGENT_ID, "--page-size", "3"))
    assert again["stored"] == 0
    assert again["already_stored"] == 7
    assert len(api.fetched) == fetched_before  # nothing fetched twice


def test_backfill_does_not_bring_back_a_forgotten_caller_but_stores_their_new_calls(
    api: Conversations, env: dict[str, str]
) -> None:
    finished = add_calls(api)
    report_of(backfill("--agent", AGENT_ID))
    forgotten = runner.invoke(app, ["forget", CALLERS[0], "--yes", "--json"])
    assert forgotten.exit_code == 0, forgotten.output
    gone = sorted(finished[0::3])  # CALLERS[0]'s three calls
    assert sorted(json.loads(forgotten.stdout)["conversations"]) == gone

    # The same conversations listed again (the state file is gone: a complete run).
    new = transcription("conv_new_after_forget", CALLERS[0])["data"]
    new["metadata"]["start_time_unix_secs"] = FIRST_START + DAY
    api.add_conversation(new)
    fetched_before = len(api.fetched)
    report = report_of(backfill("--agent", AGENT_ID))

    assert report["forgotten"] == 3  # skipped, counted, not even fetched
    assert report["stored"] == 1  # a new call from the number is new memory
    assert api.fetched[fetched_before:] == ["conv_new_after_forget"]
    settings = Settings(_env_file=None)
    for conversation_id in gone:
        assert not stored_file(settings, CALLERS[0], conversation_id).exists()
    calls = runner.invoke(app, ["calls", "--caller", CALLERS[0], "--json"])
    assert [call["conversation_id"] for call in json.loads(calls.stdout)] == [
        "conv_new_after_forget"
    ]


def test_backfill_takes_only_the_date_range(api: Conversations, env: dict[str, str]) -> None:
    add_calls(api)
    # conv_past_1 (2025-11-20) to conv_past_3 (2025-11-18)
    report = report_of(backfill("--since", "2025-11-18", "--until", "2025-11-20"))
    assert report["stored"] == 3
    assert sorted(api.fetched) == ["conv_past_1", "conv_past_2", "conv_past_3"]
    # Without --agent the other agent's call is listed too; it and conv_ongoing are outside
    # the dates, like conv_past_0 and conv_past_4 to 6.
    assert report["out_of_range"] == 6
    calls = json.loads(runner.invoke(app, ["calls", "--json"]).stdout)
    assert {row["conversation_id"] for row in calls} == set(api.fetched)


@pytest.mark.timeout(300)
def test_an_interrupted_backfill_resumes_where_it_stopped(
    api: Conversations, env: dict[str, str], tmp_path: Path
) -> None:
    finished = add_calls(api)
    api.hold_cursor = "2"  # the second page hangs: the operator presses Ctrl-C
    process = subprocess.Popen(
        [sys.executable, "-m", "elaoms.cli", "backfill", "--agent", AGENT_ID, "--page-size", "2"],
        cwd=tmp_path,
        # If it ever hangs, SIGABRT makes faulthandler print where: a failure to act on.
        env={**os.environ, **env, "PYTHONPATH": str(REPO_ROOT), "PYTHONFAULTHANDLER": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: "2" in api.cursors or process.poll() is not None)
        assert process.poll() is None, process.communicate()
        process.send_signal(signal.SIGINT)
        # The condition is the exit itself; the bound only reports a hang (with stacks).
        # A fixed 30 s once failed on a loaded 2-core host.
        _, stderr = process.communicate(timeout=WAIT_BOUND)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        raise AssertionError(f"no exit after SIGINT:\n{process.communicate()[1]}") from None
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr

    settings = Settings(_env_file=None)
    state_path = settings.webhook_storage_path.parent / "backfill-state.json"
    state = json.loads(state_path.read_text())
    assert state["cursor"] == "2"
    assert stat.S_IMODE(state_path.stat().st_mode) == 0o600
    first_page = ["conv_past_0"]  # conv_ongoing is the other item on page one
    assert stored_file(settings, CALLERS[0], "conv_past_0").exists()

    api.release.set()
    listed_before, fetched_before = len(api.cursors), len(api.fetched)
    report = report_of(backfill("--agent", AGENT_ID, "--page-size", "2"))
    assert report["resumed"] is True
    assert report["complete"] is True
    assert report["stored"] == len(finished) - len(first_page)
    assert None not in api.cursors[listed_before:]  # page one was not listed again
    assert not set(first_page) & set(api.fetched[fetched_before:])
    assert not state_path.exists()

    assert report_of(backfill("--agent", AGENT_ID, "--page-size", "2"))["stored"] == 0


def test_a_conversation_with_absurd_times_is_backfilled_all_the_same(
    api: Conversations, env: dict[str, str]
) -> None:
    data = transcription("conv_absurd", CALLERS[0])["data"]
    # Valid JSON: their sum is beyond a float's range.
    data["metadata"]["start_time_unix_secs"] = 1e308
    data["metadata"]["call_duration_secs"] = 1e308
    api.add_conversation(data)

    report = report_of(backfill())

    assert report["stored"] == 1, report


def test_a_wrong_api_key_fails_in_one_line(api: Conversations, env: dict[str, str]) -> None:
    result = runner.invoke(
        app, ["backfill"], env={"ELEVENLABS_API_KEY": "wrong"}, catch_exceptions=False
    )
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ElevenLabs API: GET /v1/convai/conversations: HTTP 401")
    assert result.stderr.count("\n") == 1


def test_a_caller_with_many_calls_on_one_page_gets_a_profile_of_all_of_them(
    api: Conversations, env: dict[str, str]
) -> None:
    for index in range(6):
        data = transcription(f"conv_many_{index}", CALLERS[0])["data"]
        data["metadata"]["start_time_unix_secs"] = FIRST_START - index * DAY
        api.add_conversation(data)
    assert report_of(backfill("--concurrency", "6"))["stored"] == 6
    profile = json.loads(runner.invoke(app, ["profile", CALLERS[0], "--json"]).stdout)
    assert profile["call_count"] == 6
    assert profile["first_call_at"] == FIRST_START - 5 * DAY
    # The search index is saved before the command ends: the service's first search of
    # this caller loads it rather than reading six calls.
    with sqlite3.connect(env["SQLITE_PATH"]) as connection:
        saved = connection.execute(
            "SELECT memories FROM caller_indexes WHERE user_id = ?", (CALLERS[0],)
        ).fetchone()
        stored = connection.execute(
            "SELECT count(*) FROM memories WHERE user_id = ?", (CALLERS[0],)
        ).fetchone()
    assert saved == stored
