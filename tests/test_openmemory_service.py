"""The service on MEMORY_BACKEND=openmemory, as users run it, against the stand-in server."""

# Fixtures shared with other modules are imported by name, which ruff reads as shadowing.
# ruff: noqa: F811

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from conftest import (
    WORKSPACE_SECRET,
    ServiceProcess,
    load_fixture,
    signed_headers,
    transcription,
    wait_until,
)
from openmemory_standin import StandIn, standin  # noqa: F401 - fixture by name

ALICE = "+14155550301"
BOB = "+14155550302"
AUTH = {"X-Api-Key": WORKSPACE_SECRET}
SEARCH_TIMEOUT_MS = 600
CLIENT_DATA_TIMEOUT_MS = 500
# How long the stand-in stalls when told to be slow. An answer well before it shows the
# deadline cut the wait short; the margin is a loaded machine's scheduling, not the point.
SLOW_SERVER_SECONDS = 3.0
ANSWERED_BEFORE_THE_SLOW_SERVER = SLOW_SERVER_SECONDS - 1.0


@pytest.fixture(scope="module")
def service(standin: StandIn, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    data_dir = tmp_path_factory.mktemp("openmemory-service")
    env = {
        "MEMORY_BACKEND": "openmemory",
        "OPENMEMORY_URL": standin.url,
        "OPENMEMORY_API_KEY": standin.api_key,
        "OPENMEMORY_LEDGER_PATH": str(data_dir / "openmemory-ledger.sqlite3"),
        "OPENMEMORY_TIMEOUT_SECONDS": "2",
        "OPENMEMORY_RETRY_BASE_DELAY_SECONDS": "0.05",
        "MAX_RETRIES": "1",
        "RETRY_BASE_DELAY_SECONDS": "0.1",
        "PENDING_SWEEP_INTERVAL_SECONDS": "0.3",
        "SEARCH_TIMEOUT_MS": str(SEARCH_TIMEOUT_MS),
        "CLIENT_DATA_TIMEOUT_MS": str(CLIENT_DATA_TIMEOUT_MS),
        # A stored call is answered `received` when storing ends within this: 2 s by
        # default, which a loaded machine's first call to the server once missed (the
        # answer then says `queued`). A server that is down still fails at once.
        "POST_CALL_STORE_TIMEOUT_MS": "20000",
    }
    server = ServiceProcess(data_dir, env=env).start()
    yield server
    server.stop()


@pytest.fixture
def client(service: ServiceProcess, standin: StandIn) -> Iterator[httpx.Client]:
    if standin._server is None:
        standin.start()
    standin.state.faults.__init__()  # type: ignore[misc]  # every fault off, data kept
    with service.client() as client:
        yield client
    standin.state.faults.__init__()  # type: ignore[misc]


def deliver(client: httpx.Client, payload: dict[str, Any]) -> dict[str, Any]:
    body = json.dumps(payload).encode()
    response = client.post("/webhooks/post-call", content=body, headers=signed_headers(body))
    assert response.status_code == 200, response.text
    return response.json()


def stored_call(service: ServiceProcess, conversation_id: str) -> str | None:
    """The memory id the ledger recorded for a call, or None while it is not stored."""
    with sqlite3.connect(service.env["OPENMEMORY_LEDGER_PATH"]) as connection:
        row = connection.execute(
            "SELECT memory_id FROM calls WHERE conversation_id = ?", (conversation_id,)
        ).fetchone()
    return row[0] if row else None


def search(client: httpx.Client, caller: str, query: str) -> httpx.Response:
    return client.post(
        "/webhooks/search-data", json={"query": query, "user_id": caller}, headers=AUTH
    )


def test_a_call_is_stored_on_openmemory_and_answered_with_its_id(
    client: httpx.Client, service: ServiceProcess, standin: StandIn
) -> None:
    answer = deliver(client, transcription("conv_om_stored", ALICE))

    assert answer["status"] == "received"
    memory = standin.state.memories[answer["memory_id"]]
    assert memory["user_id"] == ALICE
    assert "conversation:conv_om_stored" in memory["tags"]
    assert stored_call(service, "conv_om_stored") == answer["memory_id"]


def test_a_call_made_while_the_server_is_down_is_queued_and_stored_later(
    client: httpx.Client, service: ServiceProcess, standin: StandIn
) -> None:
    standin.stop()
    try:
        answer = deliver(client, transcription("conv_om_down", BOB))
        assert answer == {"status": "queued"}
        # Its retries over, a sweep fails too while the server is down.
        wait_until(
            lambda: "post_call_transcription__conv_om_down.json not stored yet" in service.logs()
        )
        assert stored_call(service, "conv_om_down") is None
    finally:
        standin.start()

    memory_id = wait_until(lambda: stored_call(service, "conv_om_down"), timeout=15)
    assert standin.state.memories[memory_id]["user_id"] == BOB
    pending = service.data_dir / "webhooks" / "_pending"
    wait_until(lambda: not any(pending.iterdir()), timeout=15)


def test_search_never_returns_a_memory_the_server_leaks_from_another_caller(
    client: httpx.Client, standin: StandIn
) -> None:
    deliver(
        client,
        transcription("conv_om_alice", ALICE, turns=[("user", "My boiler is leaking again.")]),
    )
    deliver(
        client,
        transcription("conv_om_bob", BOB, turns=[("user", "Bob's boiler pressure code is 7731.")]),
    )
    wait_until(lambda: search(client, ALICE, "boiler").json()["memories_found"])
    standin.state.faults.leak = True

    found = search(client, ALICE, "boiler pressure code")

    assert found.status_code == 200
    body = found.json()
    assert "7731" not in json.dumps(body)
    assert any("My boiler is leaking again." in m["content"] for m in body["memories"])


def test_search_answers_empty_by_its_deadline_when_the_server_is_slow(
    client: httpx.Client, standin: StandIn, service: ServiceProcess
) -> None:
    caller = "+14155550397"
    # A memory of the caller on the server that no index covers yet (as another worker
    # just stored it): the search must read it from the server.
    with sqlite3.connect(service.env["OPENMEMORY_LEDGER_PATH"]) as connection:
        connection.execute(
            "INSERT INTO openmemory_units"
            " (user_id, event_type, conversation_id, unit, openmemory_id, call_order)"
            " VALUES (?, 'memory', '', 'note_slow', 'om_slow', 1)",
            (caller,),
        )
    standin.state.faults.delay = SLOW_SERVER_SECONDS

    started = time.monotonic()
    response = search(client, caller, "gate stuck")
    elapsed = time.monotonic() - started

    assert response.status_code == 200
    assert response.json()["memories_found"] == 0
    assert response.json()["timed_out"] is True
    assert elapsed < ANSWERED_BEFORE_THE_SLOW_SERVER


def test_search_answers_quickly_when_the_server_is_down(
    client: httpx.Client, standin: StandIn
) -> None:
    standin.stop()
    try:
        started = time.monotonic()
        response = search(client, "+14155550399", "anything at all")
        elapsed = time.monotonic() - started
    finally:
        standin.start()

    assert elapsed < ANSWERED_BEFORE_THE_SLOW_SERVER
    # A store that is down answers like an unknown caller, so the call goes on.
    assert response.status_code == 200
    assert response.json()["memories_found"] == 0 and response.json()["context"] == ""


@pytest.mark.parametrize("fault", ["down", "slow"])
def test_client_data_answers_in_time_whatever_the_server_does(
    client: httpx.Client, standin: StandIn, fault: str
) -> None:
    request = load_fixture("client_data_request") | {"caller_id": "+14155550398"}
    if fault == "down":
        standin.stop()
    else:
        standin.state.faults.delay = SLOW_SERVER_SECONDS
    try:
        started = time.monotonic()
        response = client.post("/webhooks/client-data", json=request, headers=AUTH)
        elapsed = time.monotonic() - started
    finally:
        if fault == "down":
            standin.start()

    assert response.status_code == 200
    assert response.json()["type"] == "conversation_initiation_client_data"
    assert elapsed < ANSWERED_BEFORE_THE_SLOW_SERVER
