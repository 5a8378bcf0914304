"""What stays on disk: encrypted at rest, and nothing left of a caller after forget."""

# Fixtures shared with other modules are imported by name, which ruff reads as shadowing.
# ruff: noqa: F811

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet

from elaoms.config import Settings
from elaoms.crypto import PayloadCipher
from elaoms.memory.records import CallRecord
from elaoms.memory.sqlite import SQLiteStore
from elaoms.memory.units import call_memories
from elaoms.operations.privacy import names_caller
from elaoms.search.indexes import CallerIndexes
from elaoms.webhooks.storage import WebhookStorage, caller_dir_name

from conftest import ServiceProcess, signed_headers, transcription, wait_until
from openmemory_standin import (  # noqa: F401 - fixtures by name
    StandIn,
    fresh_standin,
    openmemory_store,
    standin,
)
from standins import ask

CALLER = "+13125550142"
SPELLINGS = [
    "+13125550142",
    "13125550142",
    "3125550142",
    "(312) 555-0142",
    "312-555-0142",
    "312.555.0142",
    "312 555 0142",
    "%2B13125550142",
]
# Words of the calls below that appear nowhere but in what the caller said and what the
# analysis wrote about them (turns, summary, data collection).
WORDS = ["Zanzibarian", "quokka", "marmalade", "Maria Lopez", "Sofia", "sore tooth"]
ADMIN_KEY = "admin-key-for-privacy-tests"


def leaks(directory: Path) -> list[str]:
    """Every (file, spelling or word) readable in clear in any file under `directory`."""
    found = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for needle in SPELLINGS + WORDS + [word.lower() for word in WORDS]:
            if needle.encode() in data or needle.encode("utf-16-le") in data:
                found.append(f"{path.relative_to(directory)}: {needle}")
    return found


def call(conversation_id: str, caller: str = CALLER) -> dict[str, Any]:
    return transcription(
        conversation_id,
        caller,
        turns=[
            ("agent", "Thanks for calling Brightside Dental, this is Ava."),
            ("user", "Hi, my Zanzibarian quokka ate the marmalade, and I chipped a tooth."),
            ("agent", "Let us book you in tomorrow at nine."),
        ],
    )


def deliver(client: httpx.Client, payload: dict[str, Any] | bytes) -> tuple[dict[str, Any], bytes]:
    """POST a signed delivery; (answer, the exact body) so it can be replayed."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = signed_headers(body)
    response = client.post("/webhooks/post-call", content=body, headers=headers)
    assert response.status_code == 200, response.text
    return response.json(), body


def replay(client: httpx.Client, body: bytes, headers: dict[str, str]) -> dict[str, Any]:
    response = client.post("/webhooks/post-call", content=body, headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def search(client: httpx.Client, query: str, caller: str = CALLER) -> list[str]:
    response = client.post(
        "/webhooks/search-data",
        json={"query": query, "caller_id": caller},
        headers={"X-Api-Key": "test-workspace-secret-0123456789"},
    )
    assert response.status_code == 200, response.text
    return [json.dumps(item) for item in response.json()["memories"]]


def data_env(tmp_path: Path, **extra: str) -> tuple[Path, dict[str, str]]:
    """Every file the service writes goes under `data` (the server's log stays outside)."""
    data = tmp_path / "data"
    return data, {
        "SQLITE_PATH": str(data / "memory.sqlite3"),
        "WEBHOOK_STORAGE_PATH": str(data / "webhooks"),
        "WEBHOOK_QUARANTINE_PATH": str(data / "webhooks" / "quarantine"),
        "ADMIN_API_KEY": ADMIN_KEY,
        **extra,
    }


def encrypted_env(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    key = Fernet.generate_key().decode()
    return data_env(tmp_path, ENABLE_ENCRYPTION_AT_REST="true", ENCRYPTION_KEY=key)


# Encryption at rest ------------------------------------------------------------------------
def test_with_encryption_on_no_caller_word_or_number_is_readable_in_any_file_and_search_works(
    tmp_path: Path,
) -> None:
    data, env = encrypted_env(tmp_path)
    server = ServiceProcess(tmp_path, env=env).start()
    try:
        with server.client() as client:
            for number in range(3):
                answer, _ = deliver(client, call(f"conv_at_rest_{number}"))
                assert answer["status"] in ("received", "queued")
            # Search and client-data still answer, from what they decrypt in memory.
            assert wait_until(lambda: any("quokka" in hit for hit in search(client, "quokka")))
            variables = wait_until(
                lambda: (v := ask(client, CALLER)[0]["dynamic_variables"])["call_count"] >= 3 and v
            )
            assert variables["caller_name"] == "Maria Lopez"
            # The upkeep saves the caller's search index within a second or so.
            wait_until(lambda: _count(data / "memory.sqlite3", "caller_indexes") >= 1)
            # The server runs: its -wal holds the latest pages, not yet checkpointed.
            assert (data / "memory.sqlite3-wal").stat().st_size > 0
            assert leaks(data) == []
    finally:
        server.stop()
    assert leaks(data) == []


def test_the_caller_columns_hold_keyed_hashes_and_the_cli_still_lists_the_number(
    tmp_path: Path,
) -> None:
    cipher = PayloadCipher(Fernet.generate_key().decode(), enabled=True)
    path = tmp_path / "memory.sqlite3"
    store = SQLiteStore(path, cipher=cipher)
    payload = call("conv_hashed")
    _run(
        store.add_call(
            CALLER, CallRecord.from_payload(payload), payload, call_memories(CALLER, payload)
        )
    )
    with sqlite3.connect(path) as connection:
        keys = {
            row[0]
            for table in ("calls", "memories", "call_digests")
            for row in connection.execute(f"SELECT user_id FROM {table}")
        }
    assert len(keys) == 1 and next(iter(keys)).startswith("h1:")
    (stored,) = _run(SQLiteStore(path, cipher=cipher).list_calls())
    assert stored.user_id == CALLER
    memories = _run(store.list_memories(CALLER))
    assert any("quokka" in memory.content for memory in memories)


def test_a_plain_database_keeps_working_when_encryption_is_turned_on(tmp_path: Path) -> None:
    path = tmp_path / "memory.sqlite3"
    plain = SQLiteStore(path)
    payload = call("conv_was_plain")
    _run(
        plain.add_call(
            CALLER, CallRecord.from_payload(payload), payload, call_memories(CALLER, payload)
        )
    )
    _run(plain.put_caller_profile(CALLER, {"caller_name": "Maria Lopez"}))
    _run(plain.close())
    assert b"quokka" in path.read_bytes()  # closed: the -wal is in the file

    cipher = PayloadCipher(Fernet.generate_key().decode(), enabled=True)
    store = SQLiteStore(path, cipher=cipher)  # start-up encrypts the old rows
    assert [hit.content for hit in _run(CallerIndexes(store).search(CALLER, "quokka"))]
    assert _run(store.get_caller_profile(CALLER)) == {"caller_name": "Maria Lopez"}
    (stored,) = _run(store.list_calls(CALLER))
    assert stored.user_id == CALLER and stored.payload == payload
    leaked = leaks(tmp_path)
    assert leaked == []


def test_rotating_the_key_keeps_callers_found(tmp_path: Path) -> None:
    path = tmp_path / "memory.sqlite3"
    old = Fernet.generate_key().decode()
    store = SQLiteStore(path, cipher=PayloadCipher(old, enabled=True))
    payload = call("conv_rotated")
    _run(
        store.add_call(
            CALLER, CallRecord.from_payload(payload), payload, call_memories(CALLER, payload)
        )
    )
    _run(store.close())
    new = Fernet.generate_key().decode()
    rotated = SQLiteStore(path, cipher=PayloadCipher(f"{new},{old}", enabled=True))
    assert [found.conversation_id for found in _run(rotated.list_calls(CALLER))] == ["conv_rotated"]
    _run(rotated.close())
    # The hash key is wrapped with the new key now: callers stay found under it once the
    # old rows are gone (retention) and the old key is dropped.
    only_new = SQLiteStore(path, cipher=PayloadCipher(new, enabled=True))
    assert only_new.database.key(CALLER) == store.database.key(CALLER)


def test_rotating_the_key_keeps_callers_found_by_name_and_number_in_the_console_list(
    tmp_path: Path,
) -> None:
    path = tmp_path / "memory.sqlite3"
    old = Fernet.generate_key().decode()
    store = SQLiteStore(path, cipher=PayloadCipher(old, enabled=True))
    profile = {"name": "Maria Lopez", "call_count": 1, "last_call_at": 1_700_000_000}
    _run(store.put_caller_profile(CALLER, profile))
    _run(store.close())
    new = Fernet.generate_key().decode()
    rotated = SQLiteStore(path, cipher=PayloadCipher(f"{new},{old}", enabled=True))
    for search in ({"name": "lopez"}, {"number": CALLER}, {"number": CALLER[-4:]}):
        page = _run(rotated.list_callers(**search))
        assert [caller.user_id for caller in page.callers] == [CALLER], search
    _run(rotated.close())


# Forget ------------------------------------------------------------------------------------
def test_after_forget_nothing_of_the_caller_is_readable_and_a_replay_is_not_stored(
    tmp_path: Path,
) -> None:
    data, env = data_env(tmp_path)  # encryption off: what forget deletes must be gone
    server = ServiceProcess(tmp_path, env=env).start()
    try:
        with server.client() as client:
            first = call("conv_forget_1")
            answer, body = deliver(client, first)
            headers = signed_headers(body)
            assert replay(client, body, headers)["memory_id"] == answer["memory_id"]
            deliver(client, call("conv_forget_2"))
            # Quarantined bodies naming the caller in other spellings.
            for spelling in ("(312) 555-0142", "+1 312-555-0142", "%2B13125550142"):
                bad = json.dumps({"type": "post_call_transcription", "data": {"n": spelling}})
                assert deliver(client, bad.encode())[0]["status"] == "quarantined"
            unrelated = json.dumps(
                {"type": "post_call_transcription", "data": {"n": "+442079460958"}}
            )
            deliver(client, unrelated.encode())
            wait_until(lambda: search(client, "quokka"))
            # Both calls stored and their profile hooks over (they run after the answer): a
            # forget meanwhile is undone only after its own answer.
            wait_until(lambda: not _pending(data))
            assert leaks(data)  # the test sees what is there

            response = client.delete(
                "/admin/callers/%2B13125550142", headers={"X-Admin-Key": ADMIN_KEY}
            )
            assert response.status_code == 200, response.text
            report = response.json()
            assert len(report["quarantined_deleted"]) == 6  # three bodies and their reasons

            # Nothing readable anywhere on disk, the -wal included, while the server runs.
            assert leaks(data) == []
            assert len(list((data / "webhooks" / "quarantine").glob("*.body"))) == 1

            # The same signed delivery, within the receipt cache's minute and after it.
            again = replay(client, body, headers)
            assert again == {"status": "forgotten"}
            assert search(client, "quokka") == []
            assert leaks(data) == []
            assert ask(client, CALLER)[0]["dynamic_variables"]["call_count"] == 0

            # A new call from the same number is new memory.
            answer, _ = deliver(client, call("conv_after_forget"))
            assert answer["status"] in ("received", "queued")
            wait_until(lambda: search(client, "quokka"))
    finally:
        server.stop()


def test_forget_survives_a_restart_and_the_receipt_cache(tmp_path: Path) -> None:
    _, env = encrypted_env(tmp_path)
    server = ServiceProcess(tmp_path, env=env).start()
    with server.client() as client:
        _, body = deliver(client, call("conv_restart"))
        headers = signed_headers(body)
        client.delete("/admin/callers/%2B13125550142", headers={"X-Admin-Key": ADMIN_KEY})
    server.stop()
    server = ServiceProcess(tmp_path, env=env).start()
    try:
        with server.client() as client:
            assert replay(client, body, headers) == {"status": "forgotten"}
            assert search(client, "quokka") == []
    finally:
        server.stop()


def _count(path: Path, table: str) -> int:
    with sqlite3.connect(path) as connection:
        return int(connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


def _run(coroutine: Any) -> Any:
    import asyncio

    return asyncio.run(coroutine)


# The OpenMemory backend's ledger -----------------------------------------------------------
def test_the_openmemory_ledger_is_encrypted_and_forget_lasts_there_too(
    fresh_standin: StandIn, tmp_path: Path
) -> None:
    cipher = PayloadCipher(Fernet.generate_key().decode(), enabled=True)
    store = openmemory_store(fresh_standin, tmp_path, cipher=cipher)
    ledger = tmp_path / "openmemory-ledger.sqlite3"

    async def scenario() -> None:
        payload = call("conv_om_1")
        first = await store.add_call(
            CALLER, CallRecord.from_payload(payload), payload, call_memories(CALLER, payload)
        )
        assert first.created
        await store.put_caller_profile(CALLER, {"caller_name": "Maria Lopez"})
        assert leaks(tmp_path) == []  # the ledger and its -wal, store open
        assert [found.user_id for found in await store.list_calls(CALLER)] == [CALLER]

        await store.forget_conversations(["conv_om_1"])
        await store.delete_user(CALLER)
        assert not [m for m in fresh_standin.state.memories.values() if m["user_id"] == CALLER]
        sent = len(fresh_standin.state.requests)
        again = await store.add_call(
            CALLER, CallRecord.from_payload(payload), payload, call_memories(CALLER, payload)
        )
        assert again.forgotten and not again.memory_id
        assert len(fresh_standin.state.requests) == sent  # nothing sent to the server
        assert await store.list_calls(CALLER) == []
        await store.close()

    _run(scenario())
    with sqlite3.connect(ledger) as connection:
        for table in ("calls", "caller_profiles", "call_digests", "openmemory_units"):
            assert connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == 0


@pytest.mark.parametrize(
    "text",
    [
        '{"data": {"caller": "(312) 555-0142"}}',
        '{"n": "+1 312-555-0142"}',
        "caller=%2B13125550142&x=1",
        "q=%28312%29+555-0142",
        "call 312.555.0142 back",
        '{"id": "13125550142"}',
    ],
)
def test_a_quarantined_body_naming_the_caller_in_any_spelling_is_found(text: str) -> None:
    assert names_caller(text.encode(), CALLER)


@pytest.mark.parametrize(
    "text", ['{"n": "+13125550143"}', "room 0142", '{"n": "+44 20 7946 0142"}', "5550142"]
)
def test_a_body_naming_another_number_is_not_taken_for_the_caller(text: str) -> None:
    assert not names_caller(text.encode(), CALLER)


def test_with_encryption_off_the_store_format_stays_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "memory.sqlite3"
    store = SQLiteStore(path)
    payload = call("conv_plain")
    _run(
        store.add_call(
            CALLER, CallRecord.from_payload(payload), payload, call_memories(CALLER, payload)
        )
    )
    with sqlite3.connect(path) as connection:
        assert {row[0] for row in connection.execute("SELECT user_id FROM calls")} == {CALLER}
        contents = [row[0] for row in connection.execute("SELECT content FROM memories")]
        assert any("quokka" in content for content in contents)
        assert connection.execute("SELECT caller FROM calls").fetchone() == (None,)


def test_an_openmemory_ledger_written_in_clear_is_encrypted_when_encryption_is_turned_on(
    fresh_standin: StandIn, tmp_path: Path
) -> None:
    async def scenario() -> None:
        plain = openmemory_store(fresh_standin, tmp_path)
        payload = call("conv_om_plain")
        await plain.add_call(
            CALLER, CallRecord.from_payload(payload), payload, call_memories(CALLER, payload)
        )
        await plain.close()
        assert leaks(tmp_path)

        cipher = PayloadCipher(Fernet.generate_key().decode(), enabled=True)
        store = openmemory_store(fresh_standin, tmp_path, cipher=cipher)
        assert [found.user_id for found in await store.list_calls(CALLER)] == [CALLER]
        assert await CallerIndexes(store).search(CALLER, "quokka")
        assert leaks(tmp_path) == []
        await store.close()

    _run(scenario())


def test_a_forget_s_checkpoint_held_back_by_a_reader_is_completed_by_the_upkeep(
    tmp_path: Path,
) -> None:
    path = tmp_path / "memory.sqlite3"
    store = SQLiteStore(path)
    store.database.checkpoint_timeout = 0  # do not wait for the reader below
    payload = call("conv_held_back")
    _run(
        store.add_call(
            CALLER, CallRecord.from_payload(payload), payload, call_memories(CALLER, payload)
        )
    )
    reader = sqlite3.connect(path, isolation_level=None)  # another worker, mid-read
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM memories").fetchone()

    _run(store.delete_user(CALLER))
    wal = Path(f"{path}-wal")
    assert b"quokka" in wal.read_bytes()  # the reader holds the old pages back

    reader.execute("COMMIT")
    reader.close()
    _run(store.maintain())  # the service's upkeep, every second
    assert b"quokka" not in wal.read_bytes() + path.read_bytes()
    assert leaks(tmp_path) == []


# Caller directories --------------------------------------------------------------------------
def test_with_encryption_on_no_path_is_the_plain_hash_of_a_number_and_forget_finds_both(
    tmp_path: Path,
) -> None:
    # A plain SHA-256 of a number is reversed by hashing every number of a country: a
    # directory named by it tells a copy of the disk who called.
    plain_name = caller_dir_name(CALLER)
    data, env = data_env(tmp_path)
    server = ServiceProcess(tmp_path, env=env).start()  # before encryption was turned on
    try:
        with server.client() as client:
            deliver(client, call("conv_before_encryption"))
        wait_until(lambda: list((data / "webhooks" / plain_name).glob("*.json")))
    finally:
        server.stop()
    key = Fernet.generate_key().decode()
    env.update(ENABLE_ENCRYPTION_AT_REST="true", ENCRYPTION_KEY=key)
    server = ServiceProcess(tmp_path, env=env).start()
    try:
        with server.client() as client:
            deliver(client, call("conv_after_encryption"))
            wait_until(lambda: search(client, "quokka", CALLER) and not _pending(data))
            named = {path.name for path in (data / "webhooks").rglob("*")}
            new_files = [p for p in (data / "webhooks").rglob("*conv_after_encryption*")]
            assert new_files and all(plain_name not in str(path) for path in new_files)
            assert plain_name in named  # the older files stay where they were
            response = client.delete(
                "/admin/callers/%2B13125550142", headers={"X-Admin-Key": ADMIN_KEY}
            )
            assert response.status_code == 200, response.text
            deleted = " ".join(response.json()["files_deleted"])
            assert "conv_before_encryption" in deleted and "conv_after_encryption" in deleted
            assert not list((data / "webhooks").rglob("*conv_*"))
    finally:
        server.stop()

    # The key survives a rotation: under new,old it is re-wrapped with the new key, so the
    # old key can then be dropped and the caller's directory stays the same.
    def directory(keys: str) -> Path:
        settings = Settings(_env_file=None, webhook_storage_path=data / "webhooks")
        return WebhookStorage(settings, PayloadCipher(keys, enabled=True)).caller_dir(CALLER)

    new = Fernet.generate_key().decode()
    before = directory(key)
    assert before.name != plain_name
    assert directory(f"{new},{key}") == before
    assert directory(new) == before


def _pending(data: Path) -> list[Path]:
    return [p for p in (data / "webhooks").rglob("_pending/*") if p.is_file()]


def test_files_written_while_encryption_was_on_are_still_forgotten_after_it_is_turned_off(
    tmp_path: Path,
) -> None:
    key = Fernet.generate_key().decode()
    settings = Settings(_env_file=None, webhook_storage_path=tmp_path / "webhooks")
    encrypted = WebhookStorage(settings, PayloadCipher(key, enabled=True))
    kept = encrypted.delivery_path(CALLER, "post_call_transcription", "conv_while_on")
    encrypted.keep_queued(kept, json.dumps(call("conv_while_on")).encode()).release()
    assert encrypted.pending()

    # Turned off, its key kept so the older files still read: forget must still find them.
    plain = WebhookStorage(settings, PayloadCipher(key, enabled=False))
    assert plain.caller_dir(CALLER).name == caller_dir_name(CALLER)
    assert plain.files_of(CALLER) == [kept]
    assert plain.forget(CALLER) == [kept]
    assert not kept.exists() and plain.pending() == []
