"""The service on MEMORY_BACKEND=postgres, as users run it: real uvicorn processes, each
with its own data folder (replicas in miniature), on one throw-away PostgreSQL."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from conftest import (
    WORKSPACE_SECRET,
    ServiceProcess,
    running,
    signed_headers,
    transcription,
    wait_until,
)
from postgres_server import PostgresServer
from standins import ElevenLabsStandIn, RedisServer, ask, deliver_and_wait, first_message

MARIA = "+14155550123"
AUTH = {"X-Api-Key": WORKSPACE_SECRET}


# The test server trusts loopback connections (any password passes): the password is
# there to show it never reaches a log.
PASSWORD = "pw-never-logged"


@pytest.fixture(scope="module")
def database(postgres_server: PostgresServer) -> str:
    url = postgres_server.create_database("service")
    return url.replace("postgres@", f"postgres:{PASSWORD}@", 1)


@pytest.fixture(scope="module")
def elevenlabs() -> Iterator[ElevenLabsStandIn]:
    with ElevenLabsStandIn() as api:
        yield api


def replica(data_dir: Path, database: str, elevenlabs: ElevenLabsStandIn) -> ServiceProcess:
    return ServiceProcess(
        data_dir,
        env={
            "MEMORY_BACKEND": "postgres",
            "DATABASE_URL": database,
            "ELEVENLABS_API_KEY": elevenlabs.api_key,
            "ELEVENLABS_API_BASE_URL": elevenlabs.url,
        },
    )


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory, database: str, elevenlabs: ElevenLabsStandIn
) -> Iterator[list[ServiceProcess]]:
    started = [
        replica(tmp_path_factory.mktemp(f"replica-{name}"), database, elevenlabs) for name in "ab"
    ]
    with running(started):
        yield started


def stored(database: str, conversation_id: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(database) as connection:
        return connection.execute(
            "SELECT memory_id, user_id FROM calls WHERE conversation_id = %s", (conversation_id,)
        ).fetchall()


def test_a_signed_call_is_kept_in_postgresql_and_answers_client_data_and_search(
    replicas: list[ServiceProcess], database: str
) -> None:
    first, second = replicas
    payload = transcription(
        "conv_pg_service",
        MARIA,
        turns=[
            ("agent", "Thanks for calling Brightside Dental."),
            ("user", "Hi, this is Maria Lopez. My crown came loose on the left side."),
        ],
    )
    with first.client() as client:
        answer = deliver_and_wait(client, payload, MARIA)

    assert answer["dynamic_variables"]["caller_name"] == "Maria Lopez"
    assert answer["dynamic_variables"]["call_count"] == 1
    greeting = first_message(answer)
    assert greeting is not None and "Maria" in greeting
    ((memory_id, user_id),) = stored(database, "conv_pg_service")
    assert (memory_id.startswith("mem_"), user_id) == (True, MARIA)

    # Another replica, with a data folder of its own, knows the caller from PostgreSQL.
    with second.client() as client:
        answer, _ = ask(client, MARIA)
        assert answer["dynamic_variables"]["call_count"] == 1
        found = client.post(
            "/webhooks/search-data",
            json={"query": "loose crown", "user_id": MARIA},
            headers=AUTH,
        ).json()
    assert found["memories_found"] >= 1
    assert "crown came loose" in json.dumps(found["memories"])


def test_a_call_delivered_to_both_replicas_is_stored_once(
    replicas: list[ServiceProcess], database: str
) -> None:
    body = json.dumps(transcription("conv_pg_twice", MARIA)).encode()

    answers = []
    for service in replicas:
        with service.client() as client:
            response = client.post(
                "/webhooks/post-call", content=body, headers=signed_headers(body)
            )
            assert response.status_code == 200, response.text
            answers.append(response.json())

    wait_until(lambda: stored(database, "conv_pg_twice"))
    assert len(stored(database, "conv_pg_twice")) == 1
    memory_ids = {answer.get("memory_id") for answer in answers} - {None}
    assert memory_ids <= {stored(database, "conv_pg_twice")[0][0]}


def test_each_replica_reports_itself_ready_and_never_logs_the_password(
    replicas: list[ServiceProcess],
) -> None:
    for service in replicas:
        with httpx.Client(base_url=service.url) as client:
            assert client.get("/ready").status_code == 200
        assert PASSWORD not in service.logs()


def test_a_call_delivered_while_postgresql_is_down_is_queued_then_stored(
    tmp_path: Path, elevenlabs: ElevenLabsStandIn
) -> None:
    # A server of the test's own: it is stopped mid-test.
    server = PostgresServer().start()
    service = replica(tmp_path / "replica", server.create_database("outage"), elevenlabs)
    service.env.update(
        {
            "DATABASE_TIMEOUT_SECONDS": "1",
            "MAX_RETRIES": "1",
            "RETRY_BASE_DELAY_SECONDS": "0.1",
            "PENDING_SWEEP_INTERVAL_SECONDS": "0.3",
            "POST_CALL_STORE_TIMEOUT_MS": "500",
        }
    )
    database = service.env["DATABASE_URL"]
    try:
        service.start()
        with service.client() as client:
            deliver_and_wait(client, transcription("conv_pg_up", MARIA), MARIA)
            server.stop()
            body = json.dumps(transcription("conv_pg_down", MARIA)).encode()
            answer = client.post("/webhooks/post-call", content=body, headers=signed_headers(body))
            assert answer.status_code == 200 and answer.json()["status"] == "queued"
            pending = service.data_dir / "webhooks" / "_pending"
            assert any(pending.iterdir())
            # The phone still rings: client-data and search answer, as for a new caller.
            answer_now, _ = ask(client, MARIA)
            assert answer_now["dynamic_variables"]["caller_id"] == MARIA
            found = client.post(
                "/webhooks/search-data", json={"query": "crown", "user_id": MARIA}, headers=AUTH
            )
            assert found.status_code == 200
            server.start()
            wait_until(lambda: stored(database, "conv_pg_down"))
            wait_until(lambda: not any(pending.iterdir()))
            wait_until(lambda: ask(client, MARIA)[0]["dynamic_variables"]["call_count"] == 2)
    finally:
        service.stop()
        server.remove()


def caller_files(service: ServiceProcess) -> list[Path]:
    """The files in the replica's caller folders (which it may be deleting meanwhile)."""
    files: list[Path] = []
    for folder in (service.data_dir / "webhooks").glob("c_*"):
        with contextlib.suppress(FileNotFoundError):  # the folder went as it was listed
            files += [path for path in folder.iterdir() if path.is_file()]
    return sorted(files)


def forgets_applied(service: ServiceProcess) -> str:
    cursor = service.data_dir / "webhooks" / ".forgets-applied"
    return cursor.read_text() if cursor.exists() else ""


def test_a_forget_on_one_replica_deletes_the_callers_files_on_every_replica(
    tmp_path: Path, postgres_server: PostgresServer, elevenlabs: ElevenLabsStandIn
) -> None:
    database = postgres_server.create_database("forget")
    services = []
    for name in "ab":
        service = replica(tmp_path / f"replica-{name}", database, elevenlabs)
        service.env.update({"ADMIN_API_KEY": "admin-key", "PENDING_SWEEP_INTERVAL_SECONDS": "0.3"})
        services.append(service)
    with running(services):
        first, second = services
        # Each replica keeps the files of the deliveries it received.
        with second.client() as client:
            deliver_and_wait(client, transcription("conv_forget_b", MARIA), MARIA)
        with first.client() as client:
            deliver_and_wait(client, transcription("conv_forget_a", MARIA), MARIA, calls=2)
        assert caller_files(first) and caller_files(second)

        with first.client() as client:
            report = client.delete(
                f"/admin/callers/{MARIA}", headers={"X-Admin-Key": "admin-key"}
            ).json()
        assert report["store_items_deleted"] > 0 and caller_files(first) == []
        # The other replica deletes its own at its next maintenance pass.
        wait_until(lambda: caller_files(second) == [])
        assert stored(database, "conv_forget_b") == []

        # A call after the forget is new memory, on either replica: it stays.
        after = transcription("conv_after_forget", MARIA)
        after["event_timestamp"] = int(time.time()) + 1
        with second.client() as client:
            deliver_and_wait(client, after, MARIA)
        kept = caller_files(second)
        assert kept
        with psycopg.connect(database) as connection:
            forgets = connection.execute("SELECT count(*) FROM forget_requests").fetchone()
        assert forgets == (1,)
        # Applied once: the replica's later passes leave the new call's files alone.
        wait_until(lambda: forgets_applied(second) == "1")
        with second.client() as client:
            assert ask(client, MARIA)[0]["dynamic_variables"]["call_count"] == 1
        assert caller_files(second) == kept


def test_while_postgresql_is_down_a_known_caller_is_greeted_from_redis(
    tmp_path: Path, elevenlabs: ElevenLabsStandIn, redis_server: RedisServer
) -> None:
    """On a shared store no replica keeps a profile of its own, so without Redis an outage
    greets every caller as new; with Redis, which holds the last profile any replica
    prepared, the caller is still known."""
    server = PostgresServer().start()
    service = replica(tmp_path / "replica", server.create_database("redis"), elevenlabs)
    service.env.update(
        {
            "REDIS_URL": redis_server.url,
            "REDIS_TIMEOUT_MS": "1000",
            "DATABASE_TIMEOUT_SECONDS": "1",
        }
    )
    try:
        with running([service]), service.client() as client:
            deliver_and_wait(client, transcription("conv_pg_redis", MARIA), MARIA)
            server.stop()
            answer, _ = ask(client, MARIA)
            assert answer["dynamic_variables"]["call_count"] == 1
            assert answer["dynamic_variables"]["caller_name"] == "Maria Lopez"
    finally:
        server.remove()
