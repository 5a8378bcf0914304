"""`elaoms migrate --to postgres`: an embedded store copied into a real PostgreSQL answers
as the SQLite store did; a second run changes nothing; an interrupted run resumes.

The SQLite stores are made by the service's own ingestion (and forget, and the agent cache);
the copy is read back through the PostgreSQL store and the search side's `CallerIndexes`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import Result
from cryptography.fernet import Fernet
from typer.testing import CliRunner

from elaoms.cli import app
from elaoms.config import Settings
from elaoms.crypto import PayloadCipher
from elaoms.memory import transfer
from elaoms.memory.records import CallRecord
from elaoms.memory.sqlite import SQLiteStore
from elaoms.memory.units import record_memories
from elaoms.operations.privacy import forget_caller
from elaoms.search.indexes import CallerIndexes
from elaoms.services import Services

from conftest import REPO_ROOT, WAIT_BOUND, base_env, transcription, wait_until

MARIA = "+14155550123"
BOB = "+14155550177"
ANA = "user:ana-42"
CAROL = "+442071838750"  # forgotten before the move
AGENT = "agent_dental_desk"
QUESTIONS = ("cleaning Tuesday", "crown loose", "invoice refund", "what did I ask last time")
TABLES = [table.name for table in transfer.TABLES]
runner = CliRunner()

ENCRYPTED = {
    "clear": {},
    "encrypted": {
        "ENABLE_ENCRYPTION_AT_REST": "true",
        "ENCRYPTION_KEY": Fernet.generate_key().decode(),
    },
}


def elaoms(*args: str) -> Result:
    return runner.invoke(app, list(args), catch_exceptions=False)


@pytest.fixture(params=sorted(ENCRYPTED))
def shell(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """A user's shell on the embedded store, in clear or encrypted, DATABASE_URL set."""
    env = base_env(tmp_path / "data", **ENCRYPTED[request.param])
    env["DATABASE_URL"] = request.getfixturevalue("postgres_url")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    return env


def on_postgres(env: dict[str, str]) -> Settings:
    return Settings(_env_file=None, memory_backend="postgres", database_url=env["DATABASE_URL"])


def call(conversation_id: str, caller: str, started: int, *turns: tuple[str, str]) -> Any:
    app_user = caller.startswith("user:")  # an app's user, not a phone number
    payload = transcription(
        conversation_id, None if app_user else caller, turns=list(turns) or None
    )
    payload["data"]["metadata"]["start_time_unix_secs"] = started
    if app_user:  # a web or SDK conversation: no phone call at all
        payload["data"]["metadata"].pop("phone_call", None)
        payload["data"]["user_id"] = caller.removeprefix("user:")
    return payload


CALLS = [
    call(
        "conv_maria_1",
        MARIA,
        1_763_500_000,
        ("agent", "Thanks for calling Brightside Dental."),
        ("user", "Hi, this is Maria Lopez. I need to move my cleaning to Tuesday."),
    ),
    call(
        "conv_maria_2",
        MARIA,
        1_763_600_000,
        ("user", "About the invoice from my cleaning: can I get a refund of the deposit?"),
    ),
    call("conv_maria_3", MARIA, 1_763_700_000),
    call("conv_bob_1", BOB, 1_763_550_000, ("user", "My crown came loose, can I come in?")),
    call("conv_bob_2", BOB, 1_763_650_000, ("user", "The crown is fine now, thank you.")),
    call("conv_ana_1", ANA, 1_763_560_000, ("user", "I am Ana, I booked a whitening.")),
    call("conv_carol_1", CAROL, 1_763_570_000, ("user", "Carol here, cancel everything.")),
    call("conv_carol_2", CAROL, 1_763_580_000, ("user", "Please forget my number.")),
]


def build_store(settings: Settings) -> None:
    """The SQLite store as the service leaves it: calls ingested (profiles prepared),
    an agent's configuration cached, saved search indexes, one caller forgotten."""

    async def main() -> None:
        services = Services.build(settings)
        try:
            for payload in CALLS:
                acknowledgement = await services.ingest.receive(json.dumps(payload).encode())
                assert acknowledgement.status == "received", acknowledgement
            await services.ingest.drain(timeout=None)
            await services.store.put_agent_profile(
                AGENT, {"name": "Dental desk", "first_message": "Hello {{name}}"}, 1_763_000_000.5
            )
            report = await forget_caller(services, CAROL)
            assert sorted(report.conversations) == ["conv_carol_1", "conv_carol_2"]
            for caller in (MARIA, BOB, ANA):
                await services.indexes.search(caller, "cleaning")
            await services.indexes.maintain()  # the saved indexes the copy carries over
        finally:
            await services.close()

    asyncio.run(main())


def answers(settings: Settings) -> dict[str, Any]:
    """What the store tells the service and the console, read through a new process's
    parts (no index held: search loads what the store saved)."""

    async def main() -> dict[str, Any]:
        services = Services.build(settings)
        store = services.store
        indexes = CallerIndexes(store)
        try:
            found: dict[str, Any] = {}
            for caller in (MARIA, BOB, ANA, CAROL, "+15550000000"):
                found[caller] = {
                    "search": {
                        question: [
                            (memory.id, memory.content, memory.metadata)
                            for memory in await indexes.search(caller, question, 5)
                        ]
                        for question in QUESTIONS
                    },
                    "history": await store.call_history(
                        caller, recent=2, marks=("data_collection",)
                    ),
                    "profile": await store.get_caller_profile(caller),
                    "memories": await store.list_memories(caller),
                    "calls": await store.list_calls(caller),
                }
            found["callers"] = await store.list_callers()
            found["callers named maria"] = await store.list_callers(name="maria")
            found["callers by number"] = await store.list_callers(number="0177")
            found["forgotten"] = {
                conversation: await store.is_forgotten(conversation)
                for conversation in ("conv_carol_1", "conv_carol_2", "conv_maria_1", "conv_x")
            }
            found["agent"] = await store.get_agent_profile(AGENT)
            found["agents"] = await store.list_agent_ids()
            return found
        finally:
            await services.close()

    return asyncio.run(main())


def counts(database_url: str) -> dict[str, int]:
    with psycopg.connect(database_url) as connection:
        return {
            table: connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]  # type: ignore[index]
            for table in TABLES
        }


def sqlite_counts(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as connection:
        return {
            table: connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in TABLES
        }


def report_of(result: Result) -> dict[str, Any]:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_a_migrated_store_answers_as_the_sqlite_store_did(shell: dict[str, str]) -> None:
    settings = Settings(_env_file=None)
    build_store(settings)
    before = answers(settings)
    # The store is worth comparing: every kind of row is there.
    assert before[MARIA]["search"]["cleaning Tuesday"]
    assert before[BOB]["history"].count == 2
    assert before[ANA]["calls"] and before[ANA]["profile"] is not None  # an app's user
    assert before["callers"].total == 3
    assert before["callers named maria"].callers
    assert before["callers by number"].callers
    assert before["forgotten"]["conv_carol_1"] is True
    assert before[CAROL]["profile"] is None
    assert before["agent"]["name"] == "Dental desk"
    assert all(sqlite_counts(settings.sqlite_path).values())

    first = report_of(elaoms("migrate", "--to", "postgres", "--json"))
    assert first["verified"] is True
    assert first["hash_key"] == "copied"
    tables = first["tables"]
    assert all(entry["sqlite"] == entry["postgres"] == entry["copied"] for entry in tables.values())
    assert tables["calls"]["copied"] == 6  # Carol's two went with her
    assert tables["forgotten_conversations"]["copied"] == 2
    assert tables["caller_indexes"]["copied"] == 3

    after = answers(on_postgres(shell))
    for key, value in before.items():
        assert after[key] == value, key

    # A second run is a no-op.
    second = report_of(elaoms("migrate", "--to", "postgres", "--json"))
    assert second["verified"] is True
    assert second["hash_key"] == "same"
    assert second["copied"] == 0
    assert counts(shell["DATABASE_URL"]) == sqlite_counts(settings.sqlite_path)

    # The service kept writing to SQLite: a third run copies the new call and brings the
    # caller's profile and directory entry (rewritten by that call) up to date.
    async def one_more() -> None:
        services = Services.build(settings)
        try:
            later = call("conv_bob_3", BOB, 1_763_750_000, ("user", "Is my invoice ready?"))
            received = await services.ingest.receive(json.dumps(later).encode())
            assert received.status == "received"
            await services.ingest.drain(timeout=None)
        finally:
            await services.close()

    asyncio.run(one_more())
    before = answers(settings)
    assert before[BOB]["profile"]["call_count"] == 3
    third = report_of(elaoms("migrate", "--to", "postgres", "--json"))
    assert third["verified"] is True
    assert third["tables"]["calls"]["copied"] == 1
    assert third["tables"]["caller_profiles"]["copied"] == 1
    assert third["tables"]["caller_directory"]["copied"] == 1
    assert third["tables"]["memories"]["copied"] >= 1
    after = answers(on_postgres(shell))
    for key, value in before.items():
        assert after[key] == value, key

    # The service on PostgreSQL goes on: a new memory is numbered past the copied ones,
    # and a forgotten conversation delivered again is still refused.
    async def go_on() -> tuple[str, str]:
        services = Services.build(on_postgres(shell))
        try:
            new = await services.ingest.receive(
                json.dumps(call("conv_maria_4", MARIA, 1_763_800_000)).encode()
            )
            replay = await services.ingest.receive(json.dumps(CALLS[-1]).encode())
            return new.status, replay.status
        finally:
            await services.close()

    assert asyncio.run(go_on()) == ("received", "forgotten")
    with sqlite3.connect(settings.sqlite_path) as source:
        copied_last = source.execute("SELECT max(seq) FROM memories").fetchone()[0]
    with psycopg.connect(shell["DATABASE_URL"]) as target:
        newest = target.execute(
            "SELECT min(seq) FROM memories WHERE seq > %s", (copied_last,)
        ).fetchone()
    assert newest is not None and newest[0] is not None


def test_the_table_and_the_dry_run(shell: dict[str, str]) -> None:
    settings = Settings(_env_file=None)
    build_store(settings)
    planned = elaoms("migrate", "--to", "postgres", "--dry-run")
    assert planned.exit_code == 0, planned.output
    assert "dry run, nothing written" in planned.stdout
    assert "memories" in planned.stdout
    with psycopg.connect(shell["DATABASE_URL"]) as target:  # not even the schema
        assert target.execute("SELECT to_regclass('calls')").fetchone() == (None,)

    done = elaoms("migrate", "--to", "postgres")
    assert done.exit_code == 0, done.output
    assert "verified" in done.stdout
    for table in TABLES:
        assert table in done.stdout

    planned = report_of(elaoms("migrate", "--to", "postgres", "--dry-run", "--json"))
    assert planned["dry_run"] is True
    assert planned["hash_key"] == "same"
    assert all(entry["sqlite"] == entry["postgres"] for entry in planned["tables"].values())


def test_a_copy_stopped_after_some_batches_resumes(
    shell: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(_env_file=None)
    build_store(settings)
    before = answers(settings)
    batches: list[str] = []

    def crash(table: str) -> None:
        batches.append(table)
        if table == "memories" and batches.count("memories") == 3:
            raise KeyboardInterrupt  # as Ctrl-C would, between two batches

    monkeypatch.setattr(transfer, "after_batch", crash)
    stopped = elaoms("migrate", "--to", "postgres", "--batch-size", "2")
    assert stopped.exit_code == 130, stopped.output
    partial = counts(shell["DATABASE_URL"])
    assert partial["memories"] == 6  # three batches of two
    assert partial["caller_profiles"] == 0
    assert partial["calls"] == sqlite_counts(settings.sqlite_path)["calls"]

    monkeypatch.setattr(transfer, "after_batch", lambda table: None)
    resumed = report_of(elaoms("migrate", "--to", "postgres", "--batch-size", "2", "--json"))
    assert resumed["verified"] is True
    assert resumed["tables"]["calls"]["copied"] == 0  # done the first time
    assert resumed["tables"]["memories"]["copied"] == resumed["tables"]["memories"]["sqlite"] - 6
    assert counts(shell["DATABASE_URL"]) == sqlite_counts(settings.sqlite_path)
    after = answers(on_postgres(shell))
    for key, value in before.items():
        assert after[key] == value, key


@pytest.mark.parametrize("shell", ["encrypted"], indirect=True)
def test_a_replica_running_on_the_target_finds_the_profiles_of_an_unfinished_copy(
    shell: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica that knows every profiled caller (and so answers strangers without a
    read) hears of each profile as its batch commits: a copy stopped before its end, whose
    last word to the replicas never came, still leaves no caller a stranger."""
    settings = Settings(_env_file=None)
    build_store(settings)

    def stop_after(table: str) -> None:
        def crash(name: str) -> None:
            if name == table:
                raise KeyboardInterrupt

        monkeypatch.setattr(transfer, "after_batch", crash)

    stop_after("calls")  # the schema and the store's key in place, no profile yet
    assert elaoms("migrate", "--to", "postgres", "--batch-size", "2").exit_code == 130

    async def scenario() -> None:
        services = Services.build(on_postgres(shell))
        store: Any = services.store
        try:
            await store.check()
            deadline = asyncio.get_running_loop().time() + WAIT_BOUND
            while not store.copies.profiled.complete:
                assert asyncio.get_running_loop().time() < deadline, "profiled callers not read"
                await asyncio.sleep(0.01)
            assert await store.get_caller_profile(MARIA) is None  # a stranger so far

            stop_after("caller_directory")  # every profile copied, the end never reached
            stopped = await asyncio.to_thread(
                elaoms, "migrate", "--to", "postgres", "--batch-size", "2"
            )
            assert stopped.exit_code == 130, stopped.output
            deadline = asyncio.get_running_loop().time() + WAIT_BOUND
            for caller in (MARIA, BOB, ANA):
                while (await store.get_caller_profile(caller) or {}).get("call_count") is None:
                    assert asyncio.get_running_loop().time() < deadline, f"{caller} unknown"
                    await asyncio.sleep(0.01)
        finally:
            await services.close()

    asyncio.run(scenario())


def many_calls(path: Path, settings: Settings, count: int) -> None:
    """`count` calls of 40 callers through the store's own add_call (the ingestion's
    record and memories): a store large enough to stop mid-copy."""
    cipher = PayloadCipher(settings.encryption_key, enabled=settings.enable_encryption_at_rest)
    store = SQLiteStore(path, cipher=cipher)

    async def main() -> None:
        for number in range(count):
            caller = f"+1415555{number % 40:04d}"
            payload = call(
                f"conv_{number:05d}",
                caller,
                1_763_000_000 + number,
                ("user", f"Call {number}: my appointment number is {number * 7}."),
                ("agent", "Noted, thank you."),
            )
            record = CallRecord.from_payload(payload)
            await store.add_call(caller, record, payload, record_memories(caller, record))
        await store.close()

    asyncio.run(main())


@pytest.mark.timeout(300)
@pytest.mark.parametrize("shell", ["clear"], indirect=True)
def test_a_killed_copy_resumes_and_ends_with_the_same_counts(
    shell: dict[str, str], tmp_path: Path
) -> None:
    settings = Settings(_env_file=None)
    many_calls(settings.sqlite_path, settings, 1500)
    command = [sys.executable, "-m", "elaoms.cli", "migrate", "--to", "postgres"]
    env = {**os.environ, **shell, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [*command, "--batch-size", "5"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = shell["DATABASE_URL"]

    def copying_calls() -> bool:
        if process.poll() is not None:
            return True
        try:
            return counts(url)["calls"] > 0
        except psycopg.errors.UndefinedTable:
            return False

    try:
        wait_until(copying_calls, interval=0.01)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=WAIT_BOUND)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL
    expected = sqlite_counts(settings.sqlite_path)
    assert 0 < counts(url)["calls"] < expected["calls"], "killed before or after the copy"

    finished = subprocess.run(
        [*command, "--json"], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert finished.returncode == 0, finished.stderr
    report = json.loads(finished.stdout)
    assert report["verified"] is True
    assert 0 < report["tables"]["calls"]["copied"] < expected["calls"]
    assert counts(url) == expected


def test_a_target_holding_data_under_another_hash_key_is_refused(
    shell: dict[str, str],
) -> None:
    settings = Settings(_env_file=None)
    build_store(settings)
    elsewhere = on_postgres(shell)

    async def used_already() -> None:  # the service ran on PostgreSQL before the move
        services = Services.build(elsewhere)
        try:
            received = await services.ingest.receive(
                json.dumps(call("conv_other", "+15550001111", 1_763_000_000)).encode()
            )
            assert received.status == "received"
        finally:
            await services.close()

    asyncio.run(used_already())
    before = counts(shell["DATABASE_URL"])
    refused = elaoms("migrate", "--to", "postgres")
    assert refused.exit_code == 1
    assert "another hash key" in refused.stderr
    assert counts(shell["DATABASE_URL"]) == before


def test_an_empty_target_takes_the_stores_hash_key(shell: dict[str, str]) -> None:
    settings = Settings(_env_file=None)
    build_store(settings)
    before = answers(settings)

    async def started_once() -> None:  # a replica started on the new database, no call yet
        services = Services.build(on_postgres(shell))
        try:
            await services.store.check()
        finally:
            await services.close()

    asyncio.run(started_once())
    report = report_of(elaoms("migrate", "--to", "postgres", "--json"))
    assert report["hash_key"] == "replaced"
    assert report["verified"] is True
    after = answers(on_postgres(shell))
    assert after[MARIA] == before[MARIA]
    assert after["forgotten"] == before["forgotten"]


def test_a_missing_store_is_said_and_not_created(shell: dict[str, str], tmp_path: Path) -> None:
    missing = tmp_path / "elsewhere" / "memory.sqlite3"
    result = elaoms("migrate", "--to", "postgres", "--from", str(missing))
    assert result.exit_code == 1
    assert "no SQLite store at" in result.stderr
    assert not missing.exists()
    result = elaoms("migrate", "--to", "postgres", "--from", str(missing), "--dry-run")
    assert result.exit_code == 1
    assert not missing.parent.exists()


@pytest.mark.parametrize("shell", ["encrypted"], indirect=True)
def test_an_encrypted_store_needs_its_key(
    shell: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    build_store(Settings(_env_file=None))
    monkeypatch.delenv("ENCRYPTION_KEY")
    monkeypatch.delenv("ENABLE_ENCRYPTION_AT_REST")
    result = elaoms("migrate", "--to", "postgres")
    assert result.exit_code == 1
    assert "ENCRYPTION_KEY" in result.stderr


@pytest.mark.parametrize("shell", ["clear"], indirect=True)
def test_an_unreachable_postgresql_is_one_line_without_the_password(
    shell: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    build_store(Settings(_env_file=None))
    url = "postgresql://elaoms:pw-never-shown@127.0.0.1:9/elaoms"  # nothing listens there
    for dry_run in ((), ("--dry-run",)):
        result = elaoms("migrate", "--to", "postgres", "--database-url", url, *dry_run)
        assert result.exit_code == 1
        assert "memory store unavailable: postgres: connection failed" in result.stderr
        assert "Traceback" not in result.output
        assert "pw-never-shown" not in result.output
