"""Shared test harness: real servers on loopback, signed deliveries, the example payloads."""

from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import uvicorn

from elaoms.app import create_app
from elaoms.config import Settings
from elaoms.memory.base import Memory, MemoryStore
from elaoms.webhooks.signature import sign

if TYPE_CHECKING:
    from postgres_server import PostgresServer
    from standins import RedisServer

REPO_ROOT = Path(__file__).resolve().parents[1]
# ElevenLabs example payloads kept in the repository: a clone needs nothing beside it.
FIXTURES = REPO_ROOT / "tests" / "fixtures" / "elevenlabs"

# Servers under test rank by BM25 alone: deterministic, and no background embedding
# competing for the CPU. tests/test_embeddings.py turns the semantic path on itself.
os.environ["SEARCH_EMBEDDINGS"] = "off"

# A wait ends as soon as its condition holds; the bound only turns a hang into a failure.
# CI shares two cores among many jobs: a bound must be far above what a loaded host needs.
WAIT_BOUND = 60.0

HMAC_KEY = "wsec_test_hmac_key_0123456789abcdef"
WORKSPACE_SECRET = "test-workspace-secret-0123456789"


def load_fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def signed_headers(
    body: bytes, secret: str = HMAC_KEY, timestamp: int | None = None
) -> dict[str, str]:
    return {
        "ElevenLabs-Signature": sign(secret, body, timestamp),
        "Content-Type": "application/json",
    }


def transcription(
    conversation_id: str = "conv_test_1",
    caller: str | None = "+14155550123",
    turns: list[tuple[str, str]] | None = None,
    **analysis: Any,
) -> dict[str, Any]:
    """The post_call_transcription fixture with a new id, caller and transcript."""
    payload = copy.deepcopy(load_fixture("post_call_transcription"))
    data = payload["data"]
    data["conversation_id"] = conversation_id
    variables = data["conversation_initiation_client_data"]["dynamic_variables"]
    variables["system__conversation_id"] = conversation_id
    if caller is None:
        variables.pop("system__caller_id", None)
        variables.pop("caller_id", None)
        data["metadata"]["phone_call"].pop("external_number", None)
    else:
        variables["system__caller_id"] = caller
        data["metadata"]["phone_call"]["external_number"] = caller
    if turns is not None:
        data["transcript"] = [
            {"role": role, "message": message, "time_in_call_secs": 5 * index}
            for index, (role, message) in enumerate(turns)
        ]
    data["analysis"].update(analysis)
    return payload


def turn_memories(conversation_id: str, started: int, *messages: str) -> list[Memory]:
    """One call's transcript turns as the store keeps them, caller and agent in turn."""
    return [
        Memory(
            id=f"{conversation_id}#t{index}",
            user_id="+14155550123",
            content=message,
            metadata={
                "kind": "turn",
                "conversation_id": conversation_id,
                "call_started_at": started,
                "role": "user" if index % 2 == 0 else "agent",
                "turn_index": index,
            },
        )
        for index, message in enumerate(messages)
    ]


def base_env(data_dir: Path, **overrides: str) -> dict[str, str]:
    env = {
        "ELEVENLABS_POST_CALL_HMAC_KEY": HMAC_KEY,
        "ELEVENLABS_CLIENT_DATA_WORKSPACE_SECRET": WORKSPACE_SECRET,
        "SQLITE_PATH": str(data_dir / "memory.sqlite3"),
        "WEBHOOK_STORAGE_PATH": str(data_dir / "webhooks"),
        "WEBHOOK_QUARANTINE_PATH": str(data_dir / "webhooks" / "quarantine"),
        "ELEVENLABS_API_BASE_URL": "http://127.0.0.1:9",  # nothing listens: no real API
        "LOG_LEVEL": "INFO",
        "SEARCH_EMBEDDINGS": "off",
        # A healthy store answers `received`: the 2 s default was once missed by a loaded
        # host's store, and the answer said `queued`. Tests of the deadline itself (a store
        # that hangs or is down) set their own.
        "POST_CALL_STORE_TIMEOUT_MS": "20000",
    }
    env.update(overrides)
    return env


class ServiceProcess:
    """The service as users run it: a separate process on a loopback port."""

    def __init__(
        self,
        data_dir: Path,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, **base_env(data_dir), **(env or {})}
        self.env["PYTHONPATH"] = str(REPO_ROOT)
        self.command = command or [
            sys.executable,
            "-m",
            "uvicorn",
            "main:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--app-dir",
            str(REPO_ROOT),
        ]
        self.command = [part.replace("{port}", str(self.port)) for part in self.command]
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / f"server-{self.port}.log"

    def start(self, timeout: float = WAIT_BOUND) -> ServiceProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.process = subprocess.Popen(
            self.command,
            cwd=self.data_dir,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + max(timeout, WAIT_BOUND)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.logs()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=0.5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not start:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the whole process group: no shutdown hook runs."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:  # a clean shutdown (pending work drained) takes a loaded host a while
                self.process.wait(WAIT_BOUND)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 30.0), **kwargs)


class InThreadServer:
    """A real uvicorn server in this process, for apps built with injected parts."""

    def __init__(self, settings: Settings, store: MemoryStore | None = None) -> None:
        self.app = create_app(settings, store=store)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_config=None,
            lifespan="on",
            proxy_headers=False,  # see the allowlist test: only ELAOMS decides whom to trust
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> InThreadServer:
        self.thread.start()
        deadline = time.monotonic() + WAIT_BOUND
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("in-thread server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(WAIT_BOUND)
        if self.thread.is_alive():
            raise RuntimeError("in-thread server did not stop")

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 30.0), **kwargs)


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        k.lower(): v for k, v in base_env(data_dir).items() if k != "LOG_LEVEL"
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A throw-away redis-server of the test's own (the Debian package `make test` installs)."""
    from standins import RedisServer  # standins imports this module: imported when used

    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One throw-away PostgreSQL for the whole run (started on first use: a few seconds),
    stopped and removed at the end; tests each take a database of their own."""
    from postgres_server import PostgresServer  # imports this module: imported when used

    with PostgresServer() as server:
        yield server


@contextmanager
def running(services: list[ServiceProcess]) -> Iterator[list[ServiceProcess]]:
    """Start every service (replicas, say), and stop them all whatever happens."""
    try:
        for service in services:
            service.start()
        yield services
    finally:
        for service in services:
            service.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The URL of a new, empty database of this test's own."""
    return postgres_server.create_database()


@pytest.fixture
def shell_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The data folder of a user's shell: `base_env` exported, a fresh working directory
    (where the CLI looks for `.env`). Commands run in-process read their settings from it."""
    data = tmp_path / "data"
    for name, value in base_env(data).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    return data


@pytest.fixture
def settings_factory(tmp_path: Path) -> Callable[..., Settings]:
    return lambda **overrides: make_settings(tmp_path / "data", **overrides)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """One real server per test module, on the embedded store."""
    server = ServiceProcess(tmp_path_factory.mktemp("service")).start()
    yield server
    server.stop()


@pytest.fixture
def client(server: ServiceProcess) -> Iterator[httpx.Client]:
    """A client of the test module's own `server` fixture."""
    with server.client() as http:
        yield http


def run_cli(
    *args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 2 * WAIT_BOUND
) -> subprocess.CompletedProcess[str]:
    """`elaoms ARGS` in its own process, as a shell runs it. The bound only reports a hang:
    then SIGABRT makes faulthandler print every thread's stack into the failure."""
    process = subprocess.Popen(
        [sys.executable, "-m", "elaoms.cli", *args],
        cwd=cwd,
        env={**env, "PYTHONPATH": str(REPO_ROOT), "PYTHONFAULTHANDLER": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        _, stacks = process.communicate()
        command = " ".join(args)
        raise AssertionError(f"elaoms {command}: no exit in {timeout:.0f} s:\n{stacks}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def wait_until(
    predicate: Callable[[], Any], timeout: float = WAIT_BOUND, interval: float = 0.05
) -> Any:
    """The predicate's first truthy result, polled until it comes (at least `WAIT_BOUND`)."""
    deadline = time.monotonic() + max(timeout, WAIT_BOUND)
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def pending_deliveries(webhooks: Path) -> list[Path]:
    """The deliveries a service keeps queued under its `webhooks` folder."""
    folder = webhooks / "_pending"
    return sorted(folder.iterdir()) if folder.exists() else []


def wait_settled(webhooks: Path) -> None:
    """Wait until a service has no delivery queued: each is stored and its hooks (profile
    preparation) have run, which happen after the webhook's answer. A check that something
    did *not* happen is only meaningful after this."""
    wait_until(lambda: not pending_deliveries(webhooks))


def clear_of_window_edge(window_seconds: float, needed: float = 30.0) -> None:
    """Anomaly counts run in fixed windows (epoch-aligned, `window_seconds` long): a burst
    that straddles an edge is counted in two. When fewer than `needed` seconds are left in
    the current window, wait for the next one to begin."""
    left = window_seconds - time.time() % window_seconds
    if left < needed:
        time.sleep(left + 0.05)
