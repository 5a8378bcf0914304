"""Poison payloads: a signed delivery with values out of range or parts of the wrong type
is kept, stored as far as it makes sense, and never breaks its caller's search or profile;
a delivery that cannot be stored leaves the queue for quarantine, never stays pending."""

from __future__ import annotations

import itertools
import json
import math
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from elaoms.cli import app
from elaoms.crypto import EncryptionConfigError, PayloadCipher
from elaoms.memory.base import CallReceipt, StoreUnavailableError
from elaoms.memory.records import MAX_CALL_CHARS, MAX_TURNS
from elaoms.memory.sqlite import SQLiteStore
from elaoms.operations.metrics import ALERTS
from elaoms.webhooks.storage import WebhookStorage

from conftest import (
    WORKSPACE_SECRET,
    InThreadServer,
    ServiceProcess,
    load_fixture,
    make_settings,
    signed_headers,
    transcription,
    wait_until,
)

AUTH = {"X-Api-Key": WORKSPACE_SECRET}


def post_body(client: httpx.Client, body: bytes) -> httpx.Response:
    return client.post("/webhooks/post-call", content=body, headers=signed_headers(body))


def post(client: httpx.Client, payload: dict[str, Any]) -> httpx.Response:
    # json.dumps writes NaN and Infinity as Python does: what a broken sender may send.
    return post_body(client, json.dumps(payload).encode())


def search(client: httpx.Client, caller: str, query: str) -> httpx.Response:
    return client.post(
        "/webhooks/search-data", json={"query": query, "user_id": caller}, headers=AUTH
    )


def client_data(client: httpx.Client, caller: str) -> httpx.Response:
    return client.post("/webhooks/client-data", json={"caller_id": caller}, headers=AUTH)


def pending(data_dir: Path) -> list[Path]:
    root = data_dir / "webhooks" / "_pending"
    return list(root.iterdir()) if root.exists() else []


def stored_calls(data_dir: Path, conversation_id: str) -> int:
    with sqlite3.connect(data_dir / "memory.sqlite3") as connection:
        return connection.execute(
            "SELECT count(*) FROM calls WHERE conversation_id = ?", (conversation_id,)
        ).fetchone()[0]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """Retries and sweeps fast, so that a delivery that would stay pending shows it."""
    service = ServiceProcess(
        tmp_path_factory.mktemp("poison"),
        env={
            "MAX_RETRIES": "1",
            "RETRY_BASE_DELAY_SECONDS": "0.05",
            "PENDING_SWEEP_INTERVAL_SECONDS": "0.2",
        },
    ).start()
    yield service
    service.stop()


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation setting `path` (dots, digits index lists) of a payload to `value`."""

    def apply(payload: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = payload
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        if last.isdigit():
            target[int(last)] = value
        else:
            target[last] = value

    return apply


POISONS: dict[str, Callable[[dict[str, Any]], None]] = {
    "start time of 10^15": _set("data.metadata.start_time_unix_secs", 10**15),
    "negative start time": _set("data.metadata.start_time_unix_secs", -5),
    "start time of 1e300": _set("data.metadata.start_time_unix_secs", 1e300),
    "start time beyond 64 bits": _set("data.metadata.start_time_unix_secs", 10**30),
    "NaN event timestamp": _set("event_timestamp", math.nan),
    "infinite event timestamp and start": lambda payload: (
        _set("event_timestamp", math.inf)(payload),
        _set("data.metadata.start_time_unix_secs", -math.inf)(payload),
    ),
    "data collection results as a list": _set("data.analysis.data_collection_results", []),
    "metadata as a string": _set("data.metadata", "oops"),
    "analysis as a string": _set("data.analysis", "oops"),
    "summary as a number": _set("data.analysis.transcript_summary", 12),
    "a message that is a number": _set("data.transcript.1.message", 42),
    "an unknown role": _set("data.transcript.1.role", {"who": "robot"}),
    "a turn that is a string": _set("data.transcript.1", "hello"),
    "a huge time in call": _set("data.transcript.1.time_in_call_secs", 1e300),
    "a NaN time in call": _set("data.transcript.1.time_in_call_secs", math.nan),
    "deeply nested tool calls": _set(
        "data.transcript.1.tool_calls", json.loads("[" * 100 + "]" * 100)
    ),
    "agent id as an object": _set("data.agent_id", {"id": 1}),
    "dynamic variables of other types": _set(
        "data.conversation_initiation_client_data.dynamic_variables.caller_name",
        {"first": ["Maria"]},
    ),
    "client data as a list": _set("data.conversation_initiation_client_data", []),
    "data collection values of every type": _set(
        "data.analysis.data_collection_results",
        {"a": {"value": math.nan}, "b": {"value": [1, {"x": 2}]}, "c": 10**40, "d": None},
    ),
}


@pytest.mark.parametrize("poison", list(POISONS))
def test_a_signed_call_with_a_poison_value_is_stored_and_its_caller_keeps_a_working_search(
    server: ServiceProcess, poison: str
) -> None:
    number = list(POISONS).index(poison)
    caller = f"+1415555{number:04d}"
    conversation_id = f"conv_poison_{number}"
    payload = transcription(
        conversation_id,
        caller,
        turns=[
            ("agent", "Brightside Dental, how can I help?"),
            ("user", "I need to move my cleaning appointment."),
            ("user", "Also my daughter has a sore molar."),
        ],
    )
    POISONS[poison](payload)
    with server.client() as client:
        response = post(client, payload)
        assert response.status_code == 200, response.text
        assert response.json()["status"] in {"received", "queued"}, response.text
        # Stored, and nothing of it waits in the queue for ever.
        wait_until(lambda: stored_calls(server.data_dir, conversation_id) == 1)
        wait_until(lambda: not pending(server.data_dir))
        found = search(client, caller, "sore molar")
        assert found.status_code == 200, found.text
        assert "sore molar" in found.json()["context"]
        answer = client_data(client, caller)
        assert answer.status_code == 200
        variables = answer.json()["dynamic_variables"]
        wait_until(lambda: client_data(client, caller).json()["dynamic_variables"]["call_count"])
        variables = client_data(client, caller).json()["dynamic_variables"]
        assert variables["call_count"] == 1
        if variables["last_call_at"]:  # a clamped start: a date this century, or none at all
            assert "2000" <= variables["last_call_at"][:4] <= time.strftime("%Y")


def test_a_body_nested_beyond_any_parser_limit_is_quarantined_with_its_reason(
    server: ServiceProcess,
) -> None:
    payload = transcription("conv_too_deep", "+14155559902")
    body = (
        json.dumps(payload)
        .encode()
        .replace(b'"data": {', b'"deep": ' + b"[" * 5000 + b"]" * 5000 + b', "data": {', 1)
    )
    with server.client() as client:
        response = post_body(client, body)
    assert response.status_code == 200
    assert response.json()["status"] == "quarantined"
    assert "recursion" in response.json()["detail"]


@pytest.mark.parametrize("body", ["oops", ["a", "list"], 42, None])
def test_a_call_initiation_failure_with_an_odd_body_is_kept_and_stored(
    server: ServiceProcess, body: Any
) -> None:
    payload = load_fixture("call_initiation_failure")
    conversation_id = f"conv_failure_body_{type(body).__name__}"
    payload["data"]["conversation_id"] = conversation_id
    payload["data"]["metadata"]["body"] = body
    with server.client() as client:
        response = post(client, payload)
    assert response.status_code == 200, response.text
    assert response.json()["status"] in {"received", "queued"}
    wait_until(
        lambda: (
            sqlite3.connect(server.data_dir / "memory.sqlite3")
            .execute("SELECT count(*) FROM calls WHERE conversation_id = ?", (conversation_id,))
            .fetchone()[0]
        )
    )
    kept = list(
        (server.data_dir / "webhooks").glob(f"*/call_initiation_failure__{conversation_id}*")
    )
    assert len(kept) == 1


def test_memories_stored_with_poison_values_before_the_fix_still_let_the_caller_search(
    server: ServiceProcess,
) -> None:
    caller = "+14155559901"
    with server.client() as client:
        payload = transcription(
            "conv_clean_row", caller, turns=[("user", "Please remember the blue umbrella.")]
        )
        assert post(client, payload).status_code == 200
        wait_until(lambda: stored_calls(server.data_dir, "conv_clean_row") == 1)
        # Rows as an older version stored them from a poison delivery: dates no calendar
        # holds, NaN and a time in the call beyond any float.
        with sqlite3.connect(server.data_dir / "memory.sqlite3") as connection:
            for number, started in enumerate([10**15, -(10**15), 1e300, math.nan, "soon"]):
                metadata = {
                    "kind": "turn",
                    "conversation_id": f"conv_old_poison_{number}",
                    "call_started_at": started,
                    "role": "user",
                    "turn_index": 0,
                    "time_in_call_secs": 1e308,
                }
                connection.execute(
                    "INSERT INTO memories (id, user_id, kind, content, metadata, created_at)"
                    " VALUES (?, ?, 'turn', ?, ?, ?)",
                    (
                        f"conv_old_poison_{number}#t0",
                        caller,
                        f"The umbrella story, part {number}, in May 2024.",
                        json.dumps(metadata),
                        1e300 if number % 2 else -1e300,
                    ),
                )
        for query in ("blue umbrella", "umbrella in May 2024", "umbrella 2024"):
            response = search(client, caller, query)
            assert response.status_code == 200, response.text
            assert "umbrella" in response.json()["context"]


# Bounded work ------------------------------------------------------------------------------
def test_a_20000_turn_call_is_kept_whole_yet_costs_its_callers_search_a_bounded_index(
    server: ServiceProcess,
) -> None:
    caller = "+14155559903"
    turns = [
        ("user" if number % 2 else "agent", f"Turn {number} about the {word} " + "la " * 120)
        for number, word in zip(range(20_000), itertools.cycle(["crown", "molar", "bill"]))
    ]
    payload = transcription("conv_huge", caller, turns=turns)
    body = json.dumps(payload).encode()
    assert len(body) > 7_000_000
    with server.client(timeout=120) as client:
        assert post_body(client, body).json()["status"] in {"received", "queued"}
        wait_until(lambda: stored_calls(server.data_dir, "conv_huge") == 1, timeout=60)
        with sqlite3.connect(server.data_dir / "memory.sqlite3") as connection:
            count, chars = connection.execute(
                "SELECT count(*), sum(length(content)) FROM memories WHERE user_id = ?", (caller,)
            ).fetchone()
        assert count <= MAX_TURNS + 10
        assert chars <= MAX_CALL_CHARS + 10_000  # the turns, and the summary and facts
        (kept,) = (server.data_dir / "webhooks").glob("c_*/post_call_transcription__conv_huge*")
        assert kept.read_bytes() == body  # the whole call is still on disk
        wait_until(lambda: search(client, caller, "molar").json()["memories_found"], timeout=60)


# Bounded retries ---------------------------------------------------------------------------
class RefusingStore(SQLiteStore):
    """A real store whose `add_call` fails with `error` for every call of one caller."""

    def __init__(self, *args: Any, error: Exception, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.error = error
        self.attempts = 0

    async def add_call(self, user_id: str, *call: Any) -> CallReceipt:
        if user_id == "+14155550666":
            self.attempts += 1
            raise self.error
        return await super().add_call(user_id, *call)


def quarantined_reasons(settings: Any) -> list[str]:
    root = settings.webhook_quarantine_path
    if not root.exists():
        return []
    return [json.loads(path.read_text())["reason"] for path in root.glob("*.reason.json")]


@pytest.mark.parametrize(
    ("error", "setting", "expected"),
    [
        # The payload breaks our code: every try would fail the same way, so at once.
        (TypeError("unhashable type: 'dict'"), {}, "breaks ingestion"),
        # Failing for another reason: after MAX_DELIVERY_ATTEMPTS tries.
        (RuntimeError("mystery"), {"max_delivery_attempts": 3}, "failed 3 times"),
        # The store is down: retried until the delivery is older than the allowed wait.
        (
            StoreUnavailableError("store is down"),
            {"pending_max_age_seconds": 1.0},
            "store was unavailable",
        ),
        # A set-up problem (a missing key) is not the payload's fault: waited for too.
        (
            EncryptionConfigError("no key in ENCRYPTION_KEY decrypts this file"),
            {"pending_max_age_seconds": 1.0},
            "store was unavailable",
        ),
    ],
)
def test_a_delivery_that_cannot_be_stored_moves_to_quarantine_with_its_reason_and_an_alert(
    settings_factory: Callable[..., Any],
    error: Exception,
    setting: dict[str, Any],
    expected: str,
) -> None:
    settings = settings_factory(
        max_retries=1,
        retry_base_delay_seconds=0.01,
        pending_sweep_interval_seconds=0.1,
        post_call_store_timeout_ms=300,
        **setting,
    )
    store = RefusingStore(settings.sqlite_path, error=error)
    alerts_before = ALERTS.labels("delivery_quarantined")._value.get()
    with InThreadServer(settings, store=store) as server, server.client() as client:
        response = post(client, transcription("conv_refused", caller="+14155550666"))
        assert response.status_code == 200
        assert response.json()["status"] in {"queued", "quarantined"}
        wait_until(lambda: any(expected in reason for reason in quarantined_reasons(settings)))
        wait_until(lambda: not list(settings.pending_path.iterdir()))
        # Raised just after the move, in the server's thread: waited for, then counted.
        wait_until(lambda: ALERTS.labels("delivery_quarantined")._value.get() > alerts_before)
        assert ALERTS.labels("delivery_quarantined")._value.get() == alerts_before + 1
        tries = store.attempts
        # Another caller's call is stored as usual meanwhile.
        assert post(client, transcription("conv_fine", caller="+14155550667")).json()["status"] in {
            "received",
            "queued",
        }
        wait_until(lambda: not list(settings.pending_path.iterdir()))
    assert store.attempts == tries  # nothing retried once quarantined
    # The delivery itself is still kept in the caller's directory.
    kept = list(settings.webhook_storage_path.glob("c_*/post_call_transcription__conv_refused*"))
    assert len(kept) == 1
    if type(error) is TypeError:
        assert store.attempts == 1
    if type(error) is RuntimeError:
        assert store.attempts == 3


def test_a_quarantined_delivery_is_stored_when_requeued_from_the_command_line(
    shell_data: Path,
) -> None:
    data = shell_data
    settings = make_settings(
        data,
        max_retries=0,
        pending_sweep_interval_seconds=0.1,
        post_call_store_timeout_ms=200,
        pending_max_age_seconds=0.5,
    )
    # The store is down for longer than a delivery may wait: it goes to quarantine.
    down = RefusingStore(settings.sqlite_path, error=StoreUnavailableError("down"))
    with InThreadServer(settings, store=down) as server, server.client() as client:
        post(client, transcription("conv_requeued", caller="+14155550666"))
        wait_until(lambda: quarantined_reasons(settings))
    # Back up: the operator requeues it.
    result = CliRunner().invoke(app, ["requeue", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (outcome,) = json.loads(result.stdout)
    assert outcome["status"] == "received"
    assert stored_calls(data, "conv_requeued") == 1
    assert not quarantined_reasons(settings)
    assert not list(settings.pending_path.iterdir())


def test_a_delivery_refused_again_when_requeued_stays_in_quarantine_once_with_its_new_reason(
    shell_data: Path,
) -> None:
    data = shell_data
    settings = make_settings(data)
    storage = WebhookStorage(settings, PayloadCipher())
    storage.prepare()
    # Quarantined by an earlier run (another second: ingestion cannot rewrite this name).
    kept = storage.quarantine(b'{"type": "post_call_transcription", "data": {}}', "old reason")
    earlier = kept.with_name(f"20200101T000000-{kept.stem.split('-', 1)[1]}.body")
    kept.rename(earlier)
    kept.with_suffix(".reason.json").rename(earlier.with_suffix(".reason.json"))

    result = CliRunner().invoke(app, ["requeue", "--json"], catch_exceptions=False)

    assert result.exit_code == 0, result.output
    (outcome,) = json.loads(result.stdout)
    assert outcome["status"] == "quarantined"
    (reason,) = quarantined_reasons(settings)
    assert "conversation_id" in reason
    assert len(list(settings.webhook_quarantine_path.glob("*.body"))) == 1
