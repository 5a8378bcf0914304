"""No call is ever lost: store failures, crashes, concurrent workers, full disks."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import shutil
import sqlite3
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from elaoms.crypto import PayloadCipher
from elaoms.memory.base import CallReceipt, StoreUnavailableError
from elaoms.memory.sqlite import SQLiteStore
from elaoms.memory.units import TRANSCRIPTION
from elaoms.services import Services
from elaoms.webhooks.storage import QueuedDelivery, WebhookStorage

from conftest import (
    InThreadServer,
    ServiceProcess,
    make_settings,
    signed_headers,
    transcription,
    wait_until,
)


def post(client: httpx.Client, payload: dict[str, Any]) -> httpx.Response:
    body = json.dumps(payload).encode()
    return client.post("/webhooks/post-call", content=body, headers=signed_headers(body))


def call_count(database: Path, conversation_prefix: str = "") -> int:
    with sqlite3.connect(database) as connection:
        return connection.execute(
            "SELECT count(*) FROM calls WHERE conversation_id LIKE ?", (conversation_prefix + "%",)
        ).fetchone()[0]


class FlakyStore(SQLiteStore):
    """A real SQLite store whose writes fail until `failures` attempts have been made."""

    def __init__(self, *args: Any, failures: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.failures_left = failures
        self.attempts = 0

    async def add_call(self, user_id: str, *call: Any) -> CallReceipt:
        self.attempts += 1
        if self.failures_left > 0:
            self.failures_left -= 1
            raise StoreUnavailableError("store is down (injected)")
        return await super().add_call(user_id, *call)


def test_a_failing_store_queues_the_call_and_the_retry_stores_it(settings_factory) -> None:
    # The backoff outlasts the webhook's deadline, so the answer must be `queued`.
    settings = settings_factory(
        max_retries=3, retry_base_delay_seconds=0.2, post_call_store_timeout_ms=100
    )
    store = FlakyStore(settings.sqlite_path, failures=2)
    with InThreadServer(settings, store=store) as server, server.client() as client:
        response = post(client, transcription("conv_flaky", caller="+14155550601"))
        assert response.status_code == 200
        assert response.json() == {"status": "queued"}
        wait_until(lambda: call_count(settings.sqlite_path, "conv_flaky") == 1)
        assert store.attempts == 3
        wait_until(lambda: not list(settings.pending_path.iterdir()))


def test_a_store_down_past_every_retry_keeps_the_call_pending_until_the_sweep(
    settings_factory,
) -> None:
    settings = settings_factory(
        max_retries=1,
        retry_base_delay_seconds=0.01,
        pending_sweep_interval_seconds=0.2,
        post_call_store_timeout_ms=100,
    )
    store = FlakyStore(settings.sqlite_path, failures=6)
    with InThreadServer(settings, store=store) as server, server.client() as client:
        assert post(client, transcription("conv_down", caller="+14155550602")).json() == {
            "status": "queued"
        }
        wait_until(lambda: call_count(settings.sqlite_path, "conv_down") == 1, timeout=15)
    assert store.attempts >= 7


def test_a_slow_store_answers_queued_within_the_deadline(settings_factory) -> None:
    settings = settings_factory(post_call_store_timeout_ms=200)

    # The store holds every write until the test lets go: the answer can only have come
    # from the deadline (a fixed 1 s sleep and an elapsed-time bound failed on busy hosts).
    release = threading.Event()

    class SlowStore(SQLiteStore):
        async def add_call(self, *args: Any) -> CallReceipt:
            await asyncio.to_thread(release.wait)
            return await super().add_call(*args)

    store = SlowStore(settings.sqlite_path)
    with InThreadServer(settings, store=store) as server, server.client() as client:
        try:
            response = post(client, transcription("conv_slow", caller="+14155550603"))
            assert response.json() == {"status": "queued"}
            assert call_count(settings.sqlite_path, "conv_slow") == 0
        finally:
            release.set()
        wait_until(lambda: call_count(settings.sqlite_path, "conv_slow") == 1)


def test_a_sweep_right_after_the_keep_leaves_the_delivery_to_its_receiver(
    tmp_path: Path,
) -> None:
    # A sweep (this worker's, or another worker's on the same disk) that ran between the
    # receiver's keep and its claim used to take the delivery: the receiver then answered
    # `queued` for a call that was being stored that instant (CI under load saw it).
    settings = make_settings(tmp_path)

    async def scenario() -> tuple[str, str | None, list[int], str | None]:
        services = Services.build(settings)
        loop = asyncio.get_running_loop()
        sweeps: list[int] = []
        keep_queued = services.storage.keep_queued

        def keep_then_sweep(path: Path, body: bytes) -> QueuedDelivery:
            queued = keep_queued(path, body)
            # The receiver is still in this thread: the sweep runs in the gap.
            sweeps.append(asyncio.run_coroutine_threadsafe(services.ingest.sweep(), loop).result())
            return queued

        services.storage.keep_queued = keep_then_sweep  # type: ignore[method-assign]
        try:
            body = json.dumps(transcription("conv_swept", caller="+14155550609")).encode()
            acknowledgement = await services.ingest.receive(body)
            await services.ingest.drain(timeout=None)
            call = await services.store.get_call("conv_swept", TRANSCRIPTION)
            return (
                acknowledgement.status,
                acknowledgement.memory_id,
                sweeps,
                call.memory_id if call else None,
            )
        finally:
            await services.close()

    status, memory_id, sweeps, stored_id = asyncio.run(scenario())
    assert sweeps == [0]  # the sweep found it held
    assert status == "received"
    assert memory_id is not None and memory_id == stored_id
    assert not list(settings.pending_path.iterdir())


def queue_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, between: str
) -> tuple[WebhookStorage, QueuedDelivery, bytes]:
    """A delivery queued by one receiver while a second receiver of the same delivery
    writes it at the same name, at the moment `between` names (an ElevenLabs retry, or a
    backfill racing the live webhook): returns the storage, the first receiver's queued
    entry, and the body the queue now names."""
    storage = WebhookStorage(make_settings(tmp_path), PayloadCipher())
    path = storage.delivery_path("+14155550610", TRANSCRIPTION, "conv_twice")
    real_flock = fcntl.flock

    def flock_then_second_write(handle: Any, operation: int) -> None:
        real_flock(handle, operation)
        monkeypatch.setattr(fcntl, "flock", real_flock)
        storage._write(path, b"second")  # written, not linked yet

    if between == "lock and link":
        monkeypatch.setattr(fcntl, "flock", flock_then_second_write)
        queued = storage.keep_queued(path, b"first")
    else:  # "write and lock": the second receiver locked what the first one wrote
        second_write = storage._write
        first = storage.keep_queued(path, b"first")
        monkeypatch.setattr(storage, "_write", lambda *args: None)
        queued = storage.keep_queued(path, b"second")
        monkeypatch.setattr(storage, "_write", second_write)
        first.release()
    named = storage.read(queued.entry.path)
    return storage, queued, named


@pytest.mark.parametrize("between", ["lock and link", "write and lock"])
def test_two_receivers_of_one_delivery_never_hold_a_file_the_queue_does_not_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, between: str
) -> None:
    # Between the lock and the link, the first receiver once kept a lock on a file the
    # queue no longer named, leaving the queued one to any sweep; between the write and
    # the lock, the second one's lock failed and the webhook answered 503.
    storage, queued, named = queue_twice(tmp_path, monkeypatch, between)
    with storage.claim(queued.entry, queued.lock) as body:
        assert body == named  # what the receiver stores is what the queue names
        if queued.lock is not None:
            with storage.claim(queued.entry) as swept:
                assert swept is None  # held: no sweep takes it meanwhile
    queued.release()


def test_a_held_delivery_forgotten_and_queued_anew_is_left_to_its_new_receiver(
    tmp_path: Path,
) -> None:
    storage = WebhookStorage(make_settings(tmp_path), PayloadCipher())
    path = storage.delivery_path("+14155550611", TRANSCRIPTION, "conv_anew")
    first = storage.keep_queued(path, b"before the forget")
    storage.done(first.entry)  # as a forget does, while the first receiver retries
    again = storage.keep_queued(path, b"after the forget")
    with storage.claim(first.entry, first.lock) as body:
        assert body is None  # not the forgotten body, under the new delivery's entry
    with storage.claim(again.entry, again.lock) as body:
        assert body == b"after the forget"
    first.release()
    again.release()


def test_our_own_disk_failing_is_the_only_5xx(settings_factory) -> None:
    settings = settings_factory()
    with InThreadServer(settings) as server, server.client() as client:
        storage = server.app.state.services.storage

        def full_disk(*args: object, **kwargs: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        # Where every kept file is written, however the receiver keeps it.
        storage._write = full_disk
        response = post(client, transcription("conv_disk_full", caller="+14155550604"))
    assert response.status_code == 503
    assert "No space left" in response.json()["detail"]


def test_sigkill_after_the_200_and_before_the_store_write_loses_nothing(tmp_path: Path) -> None:
    """The store is held locked so the write cannot happen, the 200 goes out as `queued`,
    the server is SIGKILLed, and a restarted server stores the call from disk."""
    env = {"POST_CALL_STORE_TIMEOUT_MS": "300"}
    server = ServiceProcess(tmp_path, env=env).start()
    database = tmp_path / "memory.sqlite3"
    blocker = sqlite3.connect(database, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # every write of the server now waits
    try:
        with server.client() as client:
            response = post(client, transcription("conv_crash", caller="+14155550605"))
        assert response.json() == {"status": "queued"}
        server.kill()
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert call_count(database, "conv_crash") == 0

    restarted = ServiceProcess(tmp_path, env=env).start()
    try:
        wait_until(lambda: call_count(database, "conv_crash") == 1, timeout=15)
    finally:
        restarted.stop()


def gunicorn_server(data_dir: Path, workers: int = 4) -> ServiceProcess:
    return ServiceProcess(
        data_dir,
        command=[
            sys.executable,
            "-m",
            "gunicorn",
            "main:app",
            "-w",
            str(workers),
            "-k",
            "uvicorn.workers.UvicornWorker",
            "-b",
            "127.0.0.1:{port}",
        ],
    )


async def deliver_all(
    url: str,
    deliveries: list[dict[str, Any]],
    concurrency: int = 50,
    acknowledged: asyncio.Queue[None] | None = None,
) -> list[httpx.Response | Exception]:
    """Send every delivery at once (bounded by the connection pool); keep failures."""
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def send(payload: dict[str, Any]) -> httpx.Response:
            body = json.dumps(payload).encode()
            response = await client.post(
                "/webhooks/post-call", content=body, headers=signed_headers(body)
            )
            if acknowledged is not None and response.status_code == 200:
                acknowledged.put_nowait(None)
            return response

        return await asyncio.gather(*(send(p) for p in deliveries), return_exceptions=True)


def test_four_workers_store_1000_concurrent_deliveries_with_duplicates_exactly_once(
    tmp_path: Path,
) -> None:
    server = gunicorn_server(tmp_path).start(timeout=40)
    unique = [
        transcription(f"conv_burst_{i:03d}", caller=f"+1415555{i % 40:04d}") for i in range(700)
    ]
    deliveries = unique + unique[::7][:100] + unique[:200]  # 30% duplicates, some racing
    try:
        responses = asyncio.run(deliver_all(server.url, deliveries))
        assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in responses)
        assert {r.json()["status"] for r in responses} <= {"received", "queued"}
        database = tmp_path / "memory.sqlite3"
        wait_until(lambda: call_count(database, "conv_burst_") == 700, timeout=60)
        with sqlite3.connect(database) as connection:
            summaries = connection.execute(
                "SELECT count(*) FROM memories WHERE kind = 'summary' AND id LIKE 'conv_burst_%'"
            ).fetchone()[0]
            mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
        assert summaries == 700
        assert mode == "wal"
        wait_until(lambda: not list((tmp_path / "webhooks" / "_pending").iterdir()), timeout=30)
    finally:
        server.stop()


def test_sigkill_during_a_burst_loses_no_acknowledged_call(tmp_path: Path) -> None:
    server = gunicorn_server(tmp_path, workers=2).start(timeout=40)
    deliveries = [
        transcription(f"conv_killed_{i:03d}", caller=f"+1415556{i % 20:04d}") for i in range(400)
    ]

    async def burst_then_kill() -> list[httpx.Response | Exception]:
        acknowledged: asyncio.Queue[None] = asyncio.Queue()
        sending = asyncio.ensure_future(
            deliver_all(server.url, deliveries, concurrency=20, acknowledged=acknowledged)
        )

        async def kill_after_50_acknowledgements() -> None:
            for _ in range(50):
                await acknowledged.get()
            server.kill()  # SIGKILL to master and workers, mid-burst

        killer = asyncio.ensure_future(kill_after_50_acknowledgements())
        results = await sending
        killer.cancel()
        return results

    results = asyncio.run(burst_then_kill())
    acknowledged = {
        payload["data"]["conversation_id"]
        for payload, result in zip(deliveries, results, strict=True)
        if isinstance(result, httpx.Response) and result.status_code == 200
    }
    outcomes = Counter(
        result.status_code if isinstance(result, httpx.Response) else type(result).__name__
        for result in results
    )
    assert 0 < len(acknowledged) < len(deliveries), f"the kill must land mid-burst: {outcomes}"

    restarted = ServiceProcess(tmp_path).start()
    try:
        database = tmp_path / "memory.sqlite3"

        def stored_ids() -> set[str]:
            with sqlite3.connect(database) as connection:
                rows = connection.execute(
                    "SELECT conversation_id FROM calls WHERE conversation_id LIKE 'conv_killed_%'"
                )
                return {row[0] for row in rows}

        wait_until(lambda: acknowledged <= stored_ids(), timeout=30)
    finally:
        restarted.stop()


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "main.py"],
        [sys.executable, "-m", "uvicorn", "main:app", "--host", "0.0.0.0", "--port", "{port}"],
        [
            sys.executable,
            "-m",
            "gunicorn",
            "main:app",
            "-w",
            "2",
            "-k",
            "uvicorn.workers.UvicornWorker",
        ],
        [sys.executable, "-m", "elaoms.cli", "serve"],
    ],
    ids=["python-main", "uvicorn", "gunicorn", "elaoms-serve"],
)
def test_every_documented_start_command_serves(tmp_path: Path, command: list[str]) -> None:
    from conftest import REPO_ROOT

    server = ServiceProcess(tmp_path, command=command)
    server.env["PORT"] = str(server.port)  # main.py and gunicorn.conf.py read HOST/PORT
    server.command = [
        str(REPO_ROOT / part) if part == "main.py" else part for part in server.command
    ]
    if "gunicorn" in command:
        server.command += ["-c", str(REPO_ROOT / "gunicorn.conf.py")]
    server.start(timeout=40)
    try:
        assert httpx.get(f"{server.url}/").json()["status"] == "running"
        assert f"0.0.0.0:{server.port}" in server.logs()
    finally:
        server.stop()


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "main.py"],
        [
            sys.executable,
            "-m",
            "gunicorn",
            "main:app",
            "-w",
            "1",
            "-k",
            "uvicorn.workers.UvicornWorker",
        ],
        [sys.executable, "-m", "elaoms.cli", "serve"],
    ],
    ids=["python-main", "gunicorn", "elaoms-serve"],
)
def test_every_start_command_that_reads_settings_binds_what_the_env_file_says(
    tmp_path: Path, command: list[str]
) -> None:
    """HOST and PORT only in `.env` (as `elaoms setup` writes them), none in the environment:
    gunicorn once bound 0.0.0.0:8000 regardless. gunicorn reads ./gunicorn.conf.py by
    itself, as the README's command expects."""
    from conftest import REPO_ROOT

    server = ServiceProcess(tmp_path, command=command)
    for name in ("HOST", "PORT"):
        server.env.pop(name, None)
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / ".env").write_text(f"HOST=127.0.0.1\nPORT={server.port}\n")
    shutil.copy(REPO_ROOT / "gunicorn.conf.py", tmp_path / "gunicorn.conf.py")
    server.command = [
        str(REPO_ROOT / part) if part == "main.py" else part for part in server.command
    ]
    server.start(timeout=40)
    try:
        assert httpx.get(f"{server.url}/").json()["status"] == "running"
        assert f"127.0.0.1:{server.port}" in server.logs()
        assert "0.0.0.0" not in server.logs()
    finally:
        server.stop()
