"""The `elaoms` command as operators run it, on the embedded store and on OpenMemory.

Calls reach the store through the service's own ingestion (as if ElevenLabs had delivered
them); the commands then read the same settings from the environment.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from typer.testing import CliRunner

from elaoms.cli import app
from elaoms.config import Settings
from elaoms.memory.postgres_copies import CallerCopies
from elaoms.services import Services
from elaoms.webhooks.storage import caller_dir_name

from conftest import (
    REPO_ROOT,
    WORKSPACE_SECRET,
    InThreadServer,
    ServiceProcess,
    base_env,
    free_port,
    load_fixture,
    run_cli,
    transcription,
)
from openmemory_standin import fresh_standin, standin  # noqa: F401 - fixtures by name

MARIA = "+14155550123"
BOB = "+14155550177"
runner = CliRunner()


def elaoms(*args: str, input: str | None = None) -> Result:
    return runner.invoke(app, list(args), input=input, catch_exceptions=False)


def as_json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(params=["sqlite", "openmemory", "postgres"])
def settings(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Settings:
    """The environment a user's shell would have, in a fresh working directory."""
    data = tmp_path / "data"
    env = base_env(data)
    if request.param == "openmemory":
        server = request.getfixturevalue("fresh_standin")
        env |= {
            "MEMORY_BACKEND": "openmemory",
            "OPENMEMORY_URL": server.url,
            "OPENMEMORY_API_KEY": server.api_key,
            "OPENMEMORY_LEDGER_PATH": str(data / "openmemory-ledger.sqlite3"),
            "OPENMEMORY_RETRY_BASE_DELAY_SECONDS": "0.01",
            "MAX_RETRIES": "1",
        }
    elif request.param == "postgres":
        env |= {
            "MEMORY_BACKEND": "postgres",
            "DATABASE_URL": request.getfixturevalue("postgres_url"),
        }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    return Settings(_env_file=None)


def deliver(settings: Settings, *payloads: dict[str, Any], status: str = "received") -> None:
    """Through the service's ingestion, as the post-call webhook would."""

    async def main() -> None:
        services = Services.build(settings)
        try:
            for payload in payloads:
                acknowledgement = await services.ingest.receive(json.dumps(payload).encode())
                assert acknowledgement.status == status, acknowledgement
            # Every profile hook done, however long a busy machine takes: close() alone
            # waits 5 s, after which the last call's profile was missing (call_count 1).
            await services.ingest.drain(timeout=None)
        finally:
            await services.close()

    asyncio.run(main())


def audio(conversation_id: str) -> dict[str, Any]:
    payload = copy.deepcopy(load_fixture("post_call_audio"))
    payload["data"]["conversation_id"] = conversation_id
    return payload


@pytest.fixture
def callers(settings: Settings) -> Settings:
    """Maria with two calls (one recorded), Bob with one."""
    first = transcription(
        "conv_maria_1",
        MARIA,
        turns=[
            ("agent", "Thanks for calling Brightside Dental."),
            ("user", "Hi, this is Maria Lopez. I need to move my cleaning to Tuesday."),
        ],
    )
    first["data"]["metadata"]["start_time_unix_secs"] = 1763500000
    second = transcription("conv_maria_2", MARIA)
    bob = transcription(
        "conv_bob_1", BOB, turns=[("user", "My crown came loose, can I come in today?")]
    )
    bob["data"]["agent_id"] = "agent_other"
    deliver(settings, first, second, audio("conv_maria_2"), bob)
    return settings


# setup -------------------------------------------------------------------------------------
def test_setup_writes_a_private_env_with_secrets_and_never_overwrites_it(tmp_path: Path) -> None:
    env_file = tmp_path / "project" / ".env"
    env_file.parent.mkdir()
    env_file.parent.chmod(0o755)  # explicit: an earlier in-process service set a private umask
    result = elaoms("setup", "--non-interactive", "--path", str(env_file))
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(env_file.parent.stat().st_mode) == 0o755  # the user's directory
    values = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    secret = values["ELEVENLABS_CLIENT_DATA_WORKSPACE_SECRET"]
    assert len(secret) >= 40
    assert values["ELEVENLABS_POST_CALL_HMAC_KEY"].startswith("replace-me")
    assert values["ADMIN_API_KEY"] == ""  # admin endpoints stay off unless asked for
    for path in ("/webhooks/post-call", "/webhooks/client-data", "/webhooks/search-data"):
        assert f"http://localhost:8000{path}" in result.stdout
    assert f"X-Api-Key: {secret}" in result.stdout
    assert "placeholder" in result.stdout

    again = elaoms("setup", "--non-interactive", "--path", str(env_file), "--json")
    assert again.exit_code == 0
    report = json.loads(again.stdout)
    assert report["written"] is False
    assert report["endpoints"]["client_data"]["headers"]["X-Api-Key"] == secret
    assert env_file.read_text().count(secret) == 1  # untouched

    forced = elaoms("setup", "--non-interactive", "--force", "--path", str(env_file))
    assert forced.exit_code == 0
    assert secret not in env_file.read_text()


@pytest.mark.filterwarnings("ignore::getpass.GetPassWarning")  # no terminal under the runner
def test_setup_asks_when_interactive(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    answers = "openmemory\nhttp://om:8080\nom-key\nxi-key\nwsec_from_elevenlabs\ny\n"
    answers += "https://memory.example.com\n"
    result = elaoms("setup", "--interactive", "--path", str(env_file), input=answers)
    assert result.exit_code == 0, result.output
    settings = Settings(_env_file=env_file)
    assert settings.memory_backend == "openmemory"
    assert settings.openmemory_url == "http://om:8080"
    assert settings.openmemory_api_key == "om-key"
    assert settings.elevenlabs_api_key == "xi-key"
    assert settings.elevenlabs_post_call_hmac_key == "wsec_from_elevenlabs"
    assert len(settings.admin_api_key) >= 40
    assert "POST https://memory.example.com/webhooks/post-call" in result.stdout
    assert "placeholder" not in result.stdout


def test_the_service_starts_on_what_setup_wrote(tmp_path: Path) -> None:
    assert elaoms("setup", "--non-interactive", "--path", str(tmp_path / ".env")).exit_code == 0
    settings = Settings(_env_file=tmp_path / ".env")
    assert settings.webhooks_authenticated
    assert settings.elevenlabs_post_call_hmac_key


# reading -----------------------------------------------------------------------------------
def test_calls_lists_and_filters_stored_calls(callers: Settings) -> None:
    everything = as_json(elaoms("calls", "--json"))
    assert {row["conversation_id"] for row in everything} == {
        "conv_maria_1",
        "conv_maria_2",
        "conv_bob_1",
    }
    marias = as_json(elaoms("calls", "--caller", "(415) 555-0123", "--json"))
    assert [row["conversation_id"] for row in marias] == ["conv_maria_2", "conv_maria_1"]
    assert as_json(elaoms("calls", "--agent", "agent_other", "--json"))[0]["user_id"] == BOB
    recent = as_json(elaoms("calls", "--since", "2025-11-20", "--json"))
    assert "conv_maria_1" not in {row["conversation_id"] for row in recent}

    table = elaoms("calls", "--caller", MARIA)
    assert table.exit_code == 0
    assert "conv_maria_2" in table.stdout and "conv_bob_1" not in table.stdout


@pytest.mark.parametrize("columns", [80, 100, 160])
def test_calls_keeps_ids_whole_and_shows_agent_and_title_at_any_width(
    callers: Settings, columns: int
) -> None:
    """At 80 columns the table hid the agent and title; at 100 it folded ids over lines."""
    long_id = "conv_5301kb4c2yrj9e7qn8w6t3v0xa_long"
    # Not +14155550199: that is the fixture's agent_number, and the agent's own line is
    # never a caller (such a call is kept on its own, under its conversation id).
    payload = transcription(long_id, "+14155550188")
    payload["data"]["agent_id"] = "agent_7201kb3x9tq8f5sv2m0d4hnp6e"
    deliver(callers, payload)
    shown = run_cli("calls", env={**os.environ, "COLUMNS": str(columns)})
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    for whole in (long_id, "conv_maria_2", "+14155550188", "+14155550123"):
        assert any(whole in line for line in lines), (whole, shown.stdout)
    assert "Cleaning rescheduled" in shown.stdout  # the title
    assert "Brightside" in shown.stdout or "agent_7201" in shown.stdout  # the agent
    assert all(len(line) <= columns for line in lines if long_id not in line)


def test_calls_list_and_show_a_stored_call_whose_parts_are_of_the_wrong_type(
    settings: Settings,
) -> None:
    odd = transcription(
        "conv_odd", MARIA, turns=[("user", "Hi, this is Maria Lopez."), ("agent", "Hello.")]
    )
    # Stored all the same (each odd part is dropped with a note); kept as sent.
    odd["data"]["analysis"] = ["not", "an", "object"]
    odd["data"]["transcript"][0]["time_in_call_secs"] = "soon"
    odd["data"]["transcript"][1]["tool_calls"] = 7
    odd["data"]["metadata"]["call_duration_secs"] = "long"
    deliver(settings, odd)

    (row,) = as_json(elaoms("calls", "--json"))
    table = elaoms("calls")
    shown = elaoms("calls", "show", "conv_odd")

    assert row["conversation_id"] == "conv_odd" and row["title"] is None
    assert table.exit_code == 0 and "conv_odd" in table.stdout
    assert shown.exit_code == 0, shown.output
    assert "Caller: Hi, this is Maria Lopez." in shown.stdout


def test_calls_show_prints_a_transcript(callers: Settings) -> None:
    shown = elaoms("calls", "show", "conv_maria_1")
    assert shown.exit_code == 0
    assert "Caller: Hi, this is Maria Lopez." in shown.stdout
    payload = as_json(elaoms("calls", "show", "conv_maria_1", "--json"))
    assert payload["data"]["conversation_id"] == "conv_maria_1"

    missing = elaoms("calls", "show", "conv_nope")
    assert missing.exit_code == 3
    assert "no stored call conv_nope" in missing.stderr


def test_profile_shows_what_the_next_call_gets(callers: Settings) -> None:
    profile = as_json(elaoms("profile", "415-555-0123", "--json"))
    assert profile["user_id"] == MARIA
    assert profile["call_count"] == 2
    assert profile["first_call_at"] == 1763500000
    assert profile["user_context"]
    assert profile["greeting"]
    shown = elaoms("profile", MARIA)
    assert shown.exit_code == 0
    assert "next greeting" in shown.stdout and "user_context" in shown.stdout

    unknown = elaoms("profile", "+14155550000")
    assert unknown.exit_code == 3
    assert unknown.stderr.count("\n") == 1


def test_a_command_on_postgres_reads_without_following_other_replicas(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, postgres_url: str
) -> None:
    # The service listens for other replicas' changes to keep copies of profiles, and
    # reads every profiled caller when it starts; a one-shot command would do both for
    # nothing (at a million callers, a read of a million rows for one profile).
    for name, value in (base_env(tmp_path / "data") | {"MEMORY_BACKEND": "postgres"}).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DATABASE_URL", postgres_url)
    monkeypatch.chdir(tmp_path)
    settings = Settings(_env_file=None)
    deliver(settings, transcription("conv_one_shot", MARIA))

    def follow(*args: object) -> None:
        raise AssertionError("started following other replicas")

    async def open_store(*, serving: bool) -> None:
        services = Services.build(settings, serving=serving)
        try:
            await services.store.check()
        finally:
            await services.close()

    monkeypatch.setattr(CallerCopies, "start", follow)
    with pytest.raises(AssertionError, match="started following"):
        asyncio.run(open_store(serving=True))  # as the service opens it
    profile = as_json(elaoms("profile", MARIA, "--json"))
    assert profile["call_count"] == 1


def test_search_answers_what_the_tool_answers(callers: Settings) -> None:
    answer = as_json(elaoms("search", MARIA, "cleaning Tuesday", "--json"))
    assert answer["memories_found"] >= 1
    assert "cleaning" in answer["context"].lower()
    conversations = {memory["metadata"].get("conversation_id") for memory in answer["memories"]}
    assert conversations <= {"conv_maria_1", "conv_maria_2"}
    if callers.memory_backend != "sqlite":
        return
    # The live tool, on a server over the same files, answers the same body.
    with InThreadServer(callers) as server, server.client() as client:
        tool = client.post(
            "/webhooks/search-data",
            json={"query": "cleaning Tuesday", "user_id": MARIA, "limit": 5},
            headers={"X-Api-Key": WORKSPACE_SECRET},
        )
    assert tool.status_code == 200
    assert tool.json() == answer


def test_first_message_previews_the_client_data_answer(callers: Settings) -> None:
    answer = as_json(elaoms("first-message", MARIA, "--json"))
    variables = answer["dynamic_variables"]
    assert variables["caller_id"] == MARIA
    assert variables["call_count"] == 2
    assert variables["user_context"]


def test_a_command_returns_only_once_the_calls_it_stored_have_their_profiles(
    settings: Settings,
) -> None:
    """On a loaded host a profile hook took longer than the 5 s the service's shutdown
    waits: the command returned with the caller's last call missing from the profile."""
    from elaoms.cli.runtime import run

    prepared: list[str] = []

    async def work(services: Services) -> None:
        async def slow_hook(user_id: str, payload: dict[str, Any], receipt: Any) -> None:
            await asyncio.sleep(6)  # a profile preparation on a very busy machine
            prepared.append(user_id)

        services.ingest.hooks.append(slow_hook)
        body = json.dumps(transcription("conv_slow_hook", MARIA)).encode()
        assert (await services.ingest.receive(body)).status == "received"

    run(work, settings=settings)
    assert prepared == [MARIA]


# privacy -----------------------------------------------------------------------------------
def test_export_holds_everything_about_the_caller_and_nothing_else(callers: Settings) -> None:
    document = as_json(elaoms("export", MARIA))
    assert {call["conversation_id"] for call in document["calls"]} == {
        "conv_maria_1",
        "conv_maria_2",
    }
    assert document["memories"] and document["profile"]["user_id"] == MARIA
    on_disk = sorted(
        str(path) for path in (callers.webhook_storage_path / caller_dir_name(MARIA)).iterdir()
    )
    assert sorted(entry["path"] for entry in document["files"]) == on_disk
    assert any(path.endswith("conv_maria_2.mp3") for path in on_disk)
    text = json.dumps(document)
    assert "conv_bob_1" not in text, text[text.index("conv_bob_1") - 300 :][:600]
    assert BOB not in text

    target = Path("export.json")
    assert elaoms("export", MARIA, "--output", str(target), "--include-audio").exit_code == 0
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    recorded = [
        entry for entry in json.loads(target.read_text())["files"] if "content_base64" in entry
    ]
    assert len(recorded) == 1

    assert elaoms("export", "+14155550000").exit_code == 3


def test_forget_deletes_the_caller_everywhere_and_only_the_caller(callers: Settings) -> None:
    storage = callers.webhook_storage_path
    maria_dir, bob_dir = storage / caller_dir_name(MARIA), storage / caller_dir_name(BOB)
    # A signed body we could not process, naming Maria: quarantined, still her data.
    quarantined = {"type": "post_call_transcription", "data": {"caller": MARIA}}
    deliver(callers, quarantined, status="quarantined")
    maria_files = sorted(maria_dir.iterdir())
    assert len(maria_files) == 3  # two transcriptions and one recording

    declined = elaoms("forget", MARIA, input="n\n")
    assert declined.exit_code == 0  # a refusal is the operator's answer, not a failure
    assert "About to delete everything about +14155550123: 2 stored call(s)" in declined.stderr
    assert all(path.exists() for path in maria_files)

    report = as_json(elaoms("forget", "(415) 555-0123", "--yes", "--json"))
    assert sorted(report["files_deleted"]) == [str(path) for path in maria_files]
    assert report["conversations"] == ["conv_maria_1", "conv_maria_2"]
    assert report["store_items_deleted"] > 0
    assert len(report["quarantined_deleted"]) == 2  # the body and its reason
    assert report["cache_invalidated"] is True
    assert not maria_dir.exists()
    assert not list(callers.webhook_quarantine_path.glob("*"))
    assert not [p for p in callers.pending_path.iterdir() if p.name.startswith(maria_dir.name)]
    assert as_json(elaoms("calls", "--caller", MARIA, "--json")) == []
    assert elaoms("profile", MARIA).exit_code == 3
    assert elaoms("export", MARIA).exit_code == 3
    searched = elaoms("search", MARIA, "cleaning", "--json")
    assert searched.exit_code == 3  # as profile: an unknown caller is "not found"
    assert json.loads(searched.stdout)["memories_found"] == 0

    # Bob is untouched.
    assert len(list(bob_dir.iterdir())) == 1
    assert as_json(elaoms("profile", BOB, "--json"))["call_count"] == 1

    again = as_json(elaoms("forget", MARIA, "--yes", "--json"))
    assert again["found_anything"] is False


# errors ------------------------------------------------------------------------------------
def cli_process(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The command in its own process, as a shell runs it."""
    return run_cli(*args, env={**os.environ, **base_env(tmp_path / "data"), **env}, cwd=tmp_path)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MEMORY_BACKEND": "mysql"}, "error: invalid setting MEMORY_BACKEND"),
        ({"ENABLE_ENCRYPTION_AT_REST": "true"}, "error: encryption: ENABLE_ENCRYPTION_AT_REST"),
        (
            {"MEMORY_BACKEND": "openmemory", "OPENMEMORY_URL": "http://127.0.0.1:{port}"},
            "error: memory store unavailable",
        ),
        ({}, "error: ELEVENLABS_API_KEY is not set"),
    ],
    ids=["bad-setting", "no-encryption-key", "openmemory-down", "no-api-key"],
)
def test_a_missing_setting_or_service_is_one_line_not_a_traceback(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    env = {key: value.format(port=free_port()) for key, value in env.items()}
    env |= {"MAX_RETRIES": "0", "OPENMEMORY_TIMEOUT_SECONDS": "1"}
    command = ("backfill",) if "API_KEY" in message else ("calls",)
    process = cli_process(tmp_path, *command, **env)
    assert process.returncode == 1, process.stderr
    assert process.stderr.startswith(message), process.stderr
    assert process.stderr.count("\n") == 1
    assert "Traceback" not in process.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert cli_process(tmp_path, "calls", "--since", "last tuesday").returncode == 2
    assert cli_process(tmp_path, "backfill", "--concurrency", "50").returncode == 2


def test_python_m_and_the_console_script_are_the_same_command(tmp_path: Path) -> None:
    process = cli_process(tmp_path, "--help")
    assert process.returncode == 0
    assert "Exit codes: 0 ok" in process.stdout


@pytest.mark.parametrize(
    ("script", "usage"),
    [
        ("store_conversations.py", "elaoms backfill"),
        ("show_user_profile.py", "elaoms profile"),
        ("build_comprehensive_user_profile.py", "elaoms profile"),
        ("view_stored_conversations.py", "elaoms calls"),
    ],
)
def test_the_seed_scripts_are_the_commands(tmp_path: Path, script: str, usage: str) -> None:
    process = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / script), "--help"],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert process.returncode == 0, process.stderr
    assert f"Usage: {usage}" in process.stdout


def test_the_seed_setup_script_writes_the_env(tmp_path: Path) -> None:
    target = tmp_path / ".env"
    process = subprocess.run(
        [str(REPO_ROOT / "scripts" / "setup.sh"), "--non-interactive", "--path", str(target)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 0, process.stderr
    assert "ELEVENLABS_CLIENT_DATA_WORKSPACE_SECRET=" in target.read_text()


def test_serve_runs_the_service(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "elaoms.cli", "serve", "--host", "127.0.0.1"]
    server = ServiceProcess(tmp_path, command=[*command, "--port", "{port}"]).start()
    try:
        with server.client() as client:
            assert client.get("/").json()["status"] == "running"
    finally:
        server.stop()


def test_output_piped_into_a_reader_that_closes_early_ends_quietly(tmp_path: Path) -> None:
    """`elaoms ... --json | head` once printed "disk error: Broken pipe"."""
    process = subprocess.Popen(
        [sys.executable, "-m", "elaoms.cli", "setup", "--non-interactive", "--json",
         "--path", str(tmp_path / ".env")],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stdout is not None
    process.stdout.close()  # the reader is gone before the command writes a byte
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    assert stderr == ""


def test_setup_asks_again_for_a_backend_it_does_not_know(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    answers = "mongodb\nsqlite\n\n\nn\n\n"  # backend twice, API key, secret, admin, URL
    result = elaoms("setup", "--interactive", "--path", str(env_file), input=answers)
    assert result.exit_code == 0, result.output
    assert "'mongodb' is not one of sqlite, openmemory" in result.output
    assert "(sqlite, openmemory) (sqlite, openmemory)" not in result.output
    assert "MEMORY_BACKEND=sqlite" in env_file.read_text()


def test_setup_interrupted_at_a_prompt_ends_without_a_traceback(tmp_path: Path) -> None:
    result = elaoms("setup", "--interactive", "--path", str(tmp_path / ".env"), input="")
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    assert not (tmp_path / ".env").exists()


BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)  # the one without our venv


@pytest.mark.parametrize(
    "script",
    [
        "show_user_profile.py",
        "build_comprehensive_user_profile.py",
        "view_stored_conversations.py",
        "store_conversations.py",
        "generate_first_message.py",
    ],
)
def test_the_seed_scripts_run_under_a_python_without_elaoms(script: str, tmp_path: Path) -> None:
    """They crashed with ModuleNotFoundError under the system python; now they hand over to
    .venv, or say in one line what to do when there is none."""
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    if (REPO_ROOT / ".venv" / "bin" / "python").exists():
        shown = subprocess.run(
            [BASE_PYTHON, str(REPO_ROOT / "scripts" / script), "--help"],
            cwd=tmp_path, env=clean, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        assert "Usage: elaoms" in shown.stdout

    lonely = tmp_path / "clone" / "scripts"  # a checkout that was never installed
    lonely.mkdir(parents=True)
    for name in (script, "_project_python.py"):
        (lonely / name).write_text((REPO_ROOT / "scripts" / name).read_text())
    failed = subprocess.run(
        [BASE_PYTHON, "-s", str(lonely / script), "--help"],
        cwd=tmp_path, env=clean, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if failed.returncode == 0:
        pytest.skip(f"{BASE_PYTHON} has ELAOMS installed itself")
    assert failed.returncode == 1
    assert "Traceback" not in failed.stderr
    assert "run `make install`" in failed.stderr


def test_run_from_another_folder_says_which_store_it_opened_and_how_to_point_elsewhere(
    tmp_path: Path,
) -> None:
    """It silently opened an empty store and said "nothing stored about +1..."."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SQLITE_", "MEMORY_"))}
    for command in (["profile", MARIA], ["search", MARIA, "cleaning"]):
        shown = subprocess.run(
            [sys.executable, "-m", "elaoms.cli", *command],
            cwd=elsewhere, env={**clean, "PYTHONPATH": str(REPO_ROOT)},
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert shown.returncode == 3, shown.stderr
        message = " ".join(shown.stderr.split())  # rich may wrap the line
        assert f"SQLite store {elsewhere / 'data' / 'memory.sqlite3'}" in message
        assert f"no .env in {elsewhere}" in message
        assert "set SQLITE_PATH" in message
