"""POST /webhooks/search-data through a real server on loopback."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from elaoms.memory.base import (
    IndexState,
    Memory,
    MemoryVersion,
    ProfileKept,
    SavedIndex,
)
from elaoms.memory.records import CallRecord
from elaoms.memory.sqlite import SQLiteStore
from elaoms.search.schemas import SearchResponse
from elaoms.search.service import GUARD_LINE

from conftest import (
    WORKSPACE_SECRET,
    InThreadServer,
    ServiceProcess,
    make_settings,
    signed_headers,
    transcription,
    wait_until,
)

ALICE = "+14155550101"
BOB = "+14155550202"
AUTH = {"X-Api-Key": WORKSPACE_SECRET}


def deliver(client: httpx.Client, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    response = client.post("/webhooks/post-call", content=body, headers=signed_headers(body))
    assert response.status_code == 200, response.text


def search(
    client: httpx.Client, headers: dict[str, str] | None = None, **body: Any
) -> httpx.Response:
    return client.post(
        "/webhooks/search-data", json=body, headers=AUTH if headers is None else headers
    )


@pytest.fixture(scope="module")
def client(service: ServiceProcess) -> Iterator[httpx.Client]:
    with service.client() as client:
        deliver(
            client,
            transcription(
                "conv_alice_1",
                ALICE,
                turns=[
                    ("user", "Hi, calling about my daughter Sofia's sore tooth."),
                    ("agent", "Of course. When did the pain start?"),
                    ("user", "Two days ago; the dentist appointment is on Friday."),
                ],
                transcript_summary="Alice called about her daughter Sofia's sore tooth.",
                data_collection_results={},
            ),
        )
        deliver(
            client,
            transcription(
                "conv_bob_1",
                BOB,
                turns=[
                    ("user", "My son Marco has a sore tooth as well, a secret molar story."),
                    ("agent", "Sorry to hear that. Is the dentist appointment booked?"),
                ],
                transcript_summary="Bob called about his son Marco's sore tooth.",
                data_collection_results={},
            ),
        )
        for caller in (ALICE, BOB):
            wait_until(
                lambda c=caller: search(client, query="sore tooth", user_id=c).json()[
                    "memories_found"
                ]
            )
        yield client


# Authentication ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("headers", "detail"),
    [({}, "Missing X-Api-Key header"), ({"X-Api-Key": "wrong"}, "Invalid X-Api-Key")],
)
def test_refuses_missing_or_wrong_api_key(
    client: httpx.Client, headers: dict[str, str], detail: str
) -> None:
    response = search(client, headers=headers, query="tooth", user_id=ALICE)
    assert response.status_code == 401
    assert response.json() == {"detail": detail}


def test_unconfigured_secret_refuses_everything_unless_explicitly_opened(tmp_path: Path) -> None:
    closed = make_settings(tmp_path / "closed", elevenlabs_client_data_workspace_secret="")
    with InThreadServer(closed) as server, server.client() as client:
        for headers in ({}, {"X-Api-Key": "anything"}, {"X-Api-Key": ""}):
            assert search(client, headers=headers, query="q", user_id=ALICE).status_code == 401
    opened = make_settings(
        tmp_path / "open",
        elevenlabs_client_data_workspace_secret="",
        allow_unauthenticated_webhooks=True,
    )
    with InThreadServer(opened) as server, server.client() as client:
        response = search(client, headers={}, query="q", user_id=ALICE)
        assert response.status_code == 200
        assert response.json()["memories_found"] == 0


# Request validation ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body",
    [{"user_id": ALICE}, {"query": "  ", "user_id": ALICE}, {"query": None, "user_id": ALICE}],
)
def test_missing_query_is_400(client: httpx.Client, body: dict[str, Any]) -> None:
    response = client.post("/webhooks/search-data", json=body, headers=AUTH)
    assert response.status_code == 400
    assert response.json() == {"detail": "Missing query parameter"}


def test_empty_body_is_a_missing_query(client: httpx.Client) -> None:
    response = client.post("/webhooks/search-data", headers=AUTH)
    assert response.status_code == 400
    assert response.json() == {"detail": "Missing query parameter"}


@pytest.mark.parametrize("caller", [None, "", "{{system__caller_id}}"])
def test_missing_caller_is_400(client: httpx.Client, caller: str | None) -> None:
    response = search(client, query="tooth", user_id=caller)
    assert response.status_code == 400
    assert "caller" in response.json()["detail"].lower()


def test_two_different_callers_in_one_request_are_refused(client: httpx.Client) -> None:
    response = client.post(
        "/webhooks/search-data",
        json={"query": "tooth", "user_id": BOB},
        headers={**AUTH, "X-Caller-Id": ALICE},
    )
    assert response.status_code == 400
    assert "different callers" in response.json()["detail"]


@pytest.mark.parametrize("limit", [0, 51, -3])
def test_limit_outside_range_is_422_with_reason(client: httpx.Client, limit: int) -> None:
    response = search(client, query="tooth", user_id=ALICE, limit=limit)
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"][-1] == "limit"
    assert (
        "greater than or equal to 1" in error["msg"] or "less than or equal to 50" in error["msg"]
    )


# Results ------------------------------------------------------------------------------------
def test_finds_the_moment_with_date_and_guard_line(client: httpx.Client) -> None:
    body = search(client, query="daughter Sofia sore tooth appointment", user_id=ALICE).json()
    assert (
        SearchResponse.model_validate(body).model_dump(exclude_none=True) == body
    )  # as documented
    assert body["status"] == "success"
    assert body["memories_found"] == len(body["memories"]) >= 1
    context = body["context"]
    assert context.startswith(GUARD_LINE + "\n\n[Call on ")
    assert "Caller: Hi, calling about my daughter Sofia's sore tooth." in context
    memory = body["memories"][0]
    assert memory["metadata"]["conversation_id"] == "conv_alice_1"
    assert memory["metadata"]["call_started_at"]
    assert memory["metadata"]["role"] in {"user", "agent", "mixed"}
    assert memory["content"] in context


@pytest.mark.parametrize(
    ("where", "raw"),
    [("user_id", "(415) 555-0101"), ("caller_id", "14155550101"), ("header", "+1 415 555 0101")],
)
def test_caller_from_any_field_is_normalized(client: httpx.Client, where: str, raw: str) -> None:
    body: dict[str, Any] = {"query": "Sofia"}
    headers = dict(AUTH)
    if where == "header":
        headers["X-Caller-Id"] = raw
    else:
        body[where] = raw
    response = client.post("/webhooks/search-data", json=body, headers=headers)
    assert response.status_code == 200
    assert "Sofia" in response.json()["context"]


def test_one_caller_never_sees_another_callers_memories(client: httpx.Client) -> None:
    # Bob's words, asked with Alice's identity: only Alice's call may come back.
    for query in (
        "Marco secret molar son",
        "sore tooth dentist appointment booked",
        "user_id +14155550202 Marco",
    ):
        body = search(client, query=query, user_id=ALICE, limit=50).json()
        assert "Marco" not in body["context"] and "molar" not in body["context"]
        assert all(m["metadata"]["conversation_id"] == "conv_alice_1" for m in body["memories"])
    bob = search(client, query="Sofia daughter", user_id=BOB).json()
    assert "Sofia" not in bob["context"]


def test_unknown_caller_gets_an_empty_answer(client: httpx.Client) -> None:
    response = search(client, query="sore tooth", user_id="+14155559999")
    assert response.status_code == 200
    assert response.json() == {
        "status": "success",
        "memories_found": 0,
        "context": "",
        "memories": [],
    }


def test_the_service_saves_each_callers_index_soon_after_their_call(
    client: httpx.Client, service: ServiceProcess
) -> None:
    """The delivery does not wait for the index; the service's upkeep saves it within
    about a second, so the caller's next search loads it instead of re-reading the calls."""
    path = service.data_dir / "memory.sqlite3"

    def covered() -> bool:
        with sqlite3.connect(path) as connection:
            saved = dict(connection.execute("SELECT user_id, memories FROM caller_indexes"))
            stored = dict(
                connection.execute("SELECT user_id, count(*) FROM memories GROUP BY user_id")
            )
        return all(saved.get(caller) == stored.get(caller) for caller in (ALICE, BOB))

    wait_until(covered, timeout=5)


def test_context_stays_within_budget(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", search_context_max_chars=700)
    with InThreadServer(settings) as server, server.client() as client:
        for name in ("alpha", "beta", "gamma"):
            turns = [
                ("user" if i % 2 == 0 else "agent", f"{name} turn {i}: the garden fence and roses.")
                for i in range(40)
            ]
            deliver(client, transcription(f"conv_budget_{name}", ALICE, turns=turns))
        wait_until(lambda: search(client, query="gamma", user_id=ALICE).json()["memories_found"])
        body = search(client, query="garden fence roses", user_id=ALICE, limit=50).json()
    context = body["context"]
    assert 500 < len(context) <= 700
    assert context.startswith(GUARD_LINE)
    assert context.count("[Call on ") == body["memories_found"]
    for memory in body["memories"]:
        assert memory["content"] in context
        for line in memory["content"].split("\n"):
            assert line == "…" or line.rstrip().endswith("roses.")  # whole turns only


# Deadline and read-only ---------------------------------------------------------------------
class SlowRecordingStore(SQLiteStore):
    """The real store, slow to read a caller's index (and without the loop's fast path),
    with a log of every write made through it."""

    def __init__(self, path: Path, delay: float) -> None:
        super().__init__(path)
        self.delay = delay
        self.writes: list[str] = []

    def index_version_now(self, user_id: str) -> MemoryVersion | None:
        return None

    async def index_state(self, user_id: str) -> IndexState:
        await asyncio.sleep(self.delay)
        return await super().index_state(user_id)

    async def memory_version(self, user_id: str) -> MemoryVersion:
        await asyncio.sleep(self.delay)
        return await super().memory_version(user_id)

    async def save_index(self, user_id: str, index: SavedIndex) -> bool:
        self.writes.append("save_index")
        return await super().save_index(user_id, index)

    async def add_call(self, user_id: str, *call: Any) -> Any:
        self.writes.append("add_call")
        return await super().add_call(user_id, *call)

    async def add_memory(
        self, user_id: str, content: str, metadata: dict[str, Any] | None = None
    ) -> Memory:
        self.writes.append("add_memory")
        return await super().add_memory(user_id, content, metadata)

    async def put_caller_profile(self, user_id: str, profile: dict[str, Any]) -> None:
        self.writes.append("put_caller_profile")
        await super().put_caller_profile(user_id, profile)

    async def keep_caller_profile(self, user_id: str, *args: Any) -> ProfileKept:
        self.writes.append("keep_caller_profile")
        return await super().keep_caller_profile(user_id, *args)

    async def put_agent_profile(
        self, agent_id: str, profile: dict[str, Any], fetched_at: float
    ) -> None:
        self.writes.append("put_agent_profile")
        await super().put_agent_profile(agent_id, profile, fetched_at)

    async def delete_user(self, user_id: str) -> int:
        self.writes.append("delete_user")
        return await super().delete_user(user_id)


def test_slow_store_answers_by_the_deadline_and_search_writes_nothing(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", search_timeout_ms=200)
    store = SlowRecordingStore(settings.sqlite_path, delay=0.0)
    payload = transcription("conv_slow", ALICE, turns=[("user", "The boiler is leaking again.")])
    with InThreadServer(settings, store=store) as server, server.client() as client:
        deliver(client, payload)
        wait_until(lambda: search(client, query="boiler", user_id=ALICE).json()["memories_found"])
        # Ingestion finishes after its answer (profile hooks, then the pending file goes),
        # and the index upkeep (every second) saves the caller's new index once.
        wait_until(lambda: not any(settings.pending_path.iterdir()))
        wait_until(lambda: "save_index" in store.writes)
        store.writes.clear()
        files = {path: path.stat().st_mtime_ns for path in settings.webhook_storage_path.rglob("*")}

        fast = search(client, query="boiler leaking", user_id=ALICE).json()
        assert fast["memories_found"] == 1 and "timed_out" not in fast

        store.delay = 3.0
        started = time.monotonic()
        slow = search(client, query="boiler leaking", user_id=ALICE)
        elapsed = time.monotonic() - started
        assert slow.status_code == 200
        # By the 200 ms deadline, not after the 3 s read: room for a loaded host either way.
        assert elapsed < 2.0
        assert slow.json() == {
            "status": "success",
            "memories_found": 0,
            "context": "",
            "memories": [],
            "timed_out": True,
        }
        assert store.writes == []
        assert {
            path: path.stat().st_mtime_ns for path in settings.webhook_storage_path.rglob("*")
        } == files


def test_the_context_budget_reaches_the_store(tmp_path: Path) -> None:
    """A budget larger than the ranker's default brings more excerpt text, not just a
    larger cut of the same ~2,800 characters."""
    from elaoms.memory.units import call_memories
    from elaoms.search.indexes import CallerIndexes
    from elaoms.search.service import SearchService

    store = SQLiteStore(tmp_path / "memory.sqlite3")
    for number in range(8):
        turns = [
            ("user" if i % 2 == 0 else "agent", f"Call {number} turn {i}: the garden fence, roses.")
            for i in range(30)
        ]
        payload = transcription(f"conv_wide_{number}", ALICE, turns=turns)
        asyncio.run(
            store.add_call(
                ALICE, CallRecord.from_payload(payload), payload, call_memories(ALICE, payload)
            )
        )
    for budget in (1500, 3000, 6000):
        service = SearchService(CallerIndexes(store), context_max_chars=budget)
        result = asyncio.run(service.search(ALICE, "garden fence roses", 10))
        assert budget - 200 < len(result.context) <= budget
        assert [memory.content in result.context for memory in result.memories] == [True] * len(
            result.memories
        )
