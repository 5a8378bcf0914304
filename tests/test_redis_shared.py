"""Redis shared between replicas: delivery receipts, anomaly counts, and life without it."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import httpx
import redis

from conftest import (
    WORKSPACE_SECRET,
    ServiceProcess,
    clear_of_window_edge,
    signed_headers,
    transcription,
    wait_until,
)
from standins import RedisServer


def post(client: httpx.Client, payload: dict) -> httpx.Response:
    body = json.dumps(payload).encode()
    return client.post("/webhooks/post-call", content=body, headers=signed_headers(body))


def replica(data_dir: Path, redis_url: str, **env: str) -> ServiceProcess:
    # Redis's 50 ms default budget sends a loaded machine's replicas to their own caches,
    # which is what these tests must not mistake for not sharing.
    return ServiceProcess(
        data_dir, env={"REDIS_URL": redis_url, "REDIS_TIMEOUT_MS": "1000", **env}
    ).start()


def stored(database: Path) -> int:
    with sqlite3.connect(database) as connection:
        return connection.execute("SELECT count(*) FROM calls").fetchone()[0]


def test_a_delivery_stored_by_one_replica_is_answered_by_another_without_a_write(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    first = replica(tmp_path / "a", redis_server.url)
    second = replica(tmp_path / "b", redis_server.url)
    payload = transcription("conv_shared_receipt", caller="+14155550801")
    receipt = "elaoms:delivery:post_call_transcription:conv_shared_receipt"
    shared = redis.Redis.from_url(redis_server.url)
    try:
        with first.client() as client:
            original = post(client, payload).json()
        # The receipt reaches Redis just after the answer (the same task goes on to it).
        wait_until(lambda: shared.get(receipt))
        with second.client() as client:
            replayed = post(client, payload).json()
    finally:
        shared.close()
        first.stop()
        second.stop()
    assert original["status"] == "received"
    assert replayed == {"status": "received", "memory_id": original["memory_id"]}
    assert stored(tmp_path / "a" / "memory.sqlite3") == 1
    assert stored(tmp_path / "b" / "memory.sqlite3") == 0


def test_auth_failures_on_two_replicas_add_up_to_one_alert(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    # Counted per fixed window: a day, and the burst kept clear of its edge (straddling
    # one, it would be two counts of 3).
    window = 86400
    env = {"ANOMALY_FAILURE_THRESHOLD": "5", "ANOMALY_WINDOW_SECONDS": str(window)}
    replicas = [replica(tmp_path / name, redis_server.url, **env) for name in ("a", "b")]
    shared = redis.Redis.from_url(redis_server.url)

    def counted() -> int:
        return sum(int(shared.get(key) or 0) for key in shared.keys("elaoms:auth-failures:*"))

    try:
        clear_of_window_edge(window)
        for server in replicas:  # 3 + 3 failures: neither replica alone passes 5
            with server.client() as client:
                for _ in range(3):
                    response = client.post(
                        "/webhooks/search-data", json={"query": "x"}, headers={"X-Api-Key": "no"}
                    )
                    assert response.status_code == 401
        # Every failure counted in Redis (in the background, after each answer), then the
        # one alert: "one, not two" is read only once no count is left to make another.
        wait_until(lambda: counted() == 6)
        wait_until(lambda: any("ALERT auth_failures" in s.logs() for s in replicas))
    finally:
        shared.close()
        for server in replicas:
            server.stop()
    assert sum(server.logs().count("ALERT auth_failures") for server in replicas) == 1


def test_the_service_keeps_answering_when_redis_goes_away_and_recovers(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    server = replica(tmp_path / "svc", redis_server.url)
    headers = {"X-Api-Key": WORKSPACE_SECRET}
    try:
        with server.client() as client:
            assert post(client, transcription("conv_r1", caller="+14155550802")).status_code == 200
            redis_server.stop()
            for index in range(3):
                response = post(client, transcription(f"conv_r2_{index}", caller="+14155550802"))
                assert response.json()["status"] == "received"
                answer = client.post(
                    "/webhooks/client-data", json={"caller_id": "+14155550802"}, headers=headers
                )
                assert answer.status_code == 200
                assert answer.json()["type"] == "conversation_initiation_client_data"
                found = client.post(
                    "/webhooks/search-data",
                    json={"query": "cleaning Tuesday", "user_id": "+14155550802"},
                    headers=headers,
                )
                assert found.status_code == 200 and found.json()["memories_found"] >= 1
            assert server.logs().count("redis unavailable") == 1, "log once, not per request"

            redis_server.start()  # same port: the service finds it again

            attempts = iter(range(100))

            def recovered() -> bool:
                conversation_id = f"conv_r3_{next(attempts)}"  # new: not answered from memory
                post(client, transcription(conversation_id, caller="+14155550802"))
                return "redis is back" in server.logs()

            wait_until(recovered, timeout=20, interval=0.5)
    finally:
        server.stop()
    assert stored(tmp_path / "svc" / "memory.sqlite3") >= 5
