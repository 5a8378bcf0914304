"""Local stand-ins for what the service talks to: the ElevenLabs API, an OpenAI-compatible
LLM, and a real Redis server. Each is a real server on a loopback port."""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from conftest import (
    WAIT_BOUND,
    WORKSPACE_SECRET,
    free_port,
    load_fixture,
    signed_headers,
    wait_until,
)

INSTALL_HINT = "redis-server is not installed: run scripts/install-test-services.sh"


class ThreadedApp:
    """A Starlette app served by uvicorn in a daemon thread."""

    def __init__(self, routes: list[Route]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        config = uvicorn.Config(
            Starlette(routes=routes),
            host="127.0.0.1",
            port=self.port,
            log_config=None,
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadedApp:
        self.thread.start()
        deadline = time.monotonic() + WAIT_BOUND
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{type(self).__name__} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(WAIT_BOUND)

    def _record(self, request: Request) -> None:
        self.requests.append((request.method, request.url.path, dict(request.headers)))


class ElevenLabsStandIn(ThreadedApp):
    """GET /v1/convai/agents/{id}, /v1/convai/conversations and /conversations/{id}.

    Switches: `delay` (seconds before every answer), `fail_status` (answer every request
    with it), `rate_limited` (answer the next N requests with 429).
    """

    def __init__(self, api_key: str = "xi-test-key") -> None:
        self.api_key = api_key
        agent = load_fixture("agent")
        self.agents: dict[str, dict[str, Any]] = {agent["agent_id"]: agent}
        self.conversations: dict[str, dict[str, Any]] = {}
        self.delay = 0.0
        self.fail_status: int | None = None
        self.rate_limited = 0
        super().__init__(
            [
                Route("/v1/convai/agents/{agent_id}", self._agent),
                Route("/v1/convai/conversations", self._conversations),
                Route("/v1/convai/conversations/{conversation_id}", self._conversation),
            ]
        )

    def add_agent(self, agent_id: str, **changes: Any) -> dict[str, Any]:
        """A copy of the fixture agent under a new id; `changes` are dotted paths."""
        agent = copy.deepcopy(load_fixture("agent"))
        agent["agent_id"] = agent_id
        for path, value in changes.items():
            target = agent
            *parents, leaf = path.split(".")
            for key in parents:
                target = target.setdefault(key, {})
            target[leaf] = value
        self.agents[agent_id] = agent
        return agent

    def add_conversation(self, data: dict[str, Any]) -> None:
        """`data` as in a post_call_transcription payload."""
        self.conversations[data["conversation_id"]] = copy.deepcopy(data)

    def agent_fetches(self, agent_id: str) -> int:
        path = f"/v1/convai/agents/{agent_id}"
        return sum(1 for _, seen, _ in self.requests if seen == path)

    async def _gate(self, request: Request) -> Response | None:
        self._record(request)
        if self.delay:
            await asyncio.sleep(self.delay)
        if request.headers.get("xi-api-key") != self.api_key:
            return JSONResponse({"detail": "invalid api key"}, status_code=401)
        if self.rate_limited > 0:
            self.rate_limited -= 1
            return JSONResponse({"detail": "too_many_concurrent_requests"}, status_code=429)
        if self.fail_status:
            return JSONResponse({"detail": "unavailable"}, status_code=self.fail_status)
        return None

    async def _agent(self, request: Request) -> Response:
        if refused := await self._gate(request):
            return refused
        agent = self.agents.get(request.path_params["agent_id"])
        if agent is None:
            return JSONResponse({"detail": "agent not found"}, status_code=404)
        return JSONResponse(agent)

    async def _conversations(self, request: Request) -> Response:
        if refused := await self._gate(request):
            return refused
        agent_id = request.query_params.get("agent_id")
        size = int(request.query_params.get("page_size") or 30)
        start = int(request.query_params.get("cursor") or 0)
        items = [
            _summary(data)
            for data in sorted(
                self.conversations.values(),
                key=lambda data: data["metadata"]["start_time_unix_secs"],
                reverse=True,
            )
            if agent_id in (None, data.get("agent_id"))
        ]
        page = items[start : start + size]
        more = start + size < len(items)
        return JSONResponse(
            {
                "conversations": page,
                "has_more": more,
                "next_cursor": str(start + size) if more else None,
            }
        )

    async def _conversation(self, request: Request) -> Response:
        if refused := await self._gate(request):
            return refused
        data = self.conversations.get(request.path_params["conversation_id"])
        if data is None:
            return JSONResponse({"detail": "conversation not found"}, status_code=404)
        return JSONResponse(data)


def _summary(data: dict[str, Any]) -> dict[str, Any]:
    analysis = data.get("analysis") or {}
    return {
        "agent_id": data.get("agent_id"),
        "agent_name": data.get("agent_name"),
        "conversation_id": data["conversation_id"],
        "start_time_unix_secs": data["metadata"]["start_time_unix_secs"],
        "call_duration_secs": data["metadata"].get("call_duration_secs"),
        "status": data.get("status", "done"),
        "call_successful": analysis.get("call_successful"),
        "transcript_summary": analysis.get("transcript_summary"),
        "call_summary_title": analysis.get("call_summary_title"),
        "direction": "inbound",
    }


class LLMStandIn(ThreadedApp):
    """POST /chat/completions in OpenAI's shape. `reply(messages) -> str` writes the answer."""

    def __init__(self, reply: Callable[[list[dict[str, Any]]], str] | str = "") -> None:
        self.reply = reply
        self.fail_status: int | None = None
        self.prompts: list[list[dict[str, Any]]] = []
        super().__init__([Route("/chat/completions", self._complete, methods=["POST"])])

    async def _complete(self, request: Request) -> Response:
        self._record(request)
        if self.fail_status:
            return JSONResponse({"error": {"message": "down"}}, status_code=self.fail_status)
        body = await request.json()
        self.prompts.append(body["messages"])
        text = self.reply(body["messages"]) if callable(self.reply) else self.reply
        return JSONResponse(
            {
                "id": "chatcmpl-standin",
                "object": "chat.completion",
                "model": body.get("model"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
            }
        )


class RedisServer:
    """A throw-away redis-server on a loopback port: no persistence, stopped at exit."""

    def __init__(self, work_dir: Path) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            raise RuntimeError(INSTALL_HINT)
        self.work_dir = work_dir
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                self.binary or "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.work_dir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + WAIT_BOUND
        while time.monotonic() < deadline:
            if self.ping():
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


class SilentServer:
    """Accepts TCP connections and never answers: a hung Redis, a black-holed API."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self._held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def __enter__(self) -> SilentServer:
        self._thread.start()
        return self

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            self._held.append(connection)

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
        for connection in self._held:
            connection.close()


# Talking to the service ----------------------------------------------------------------------
AGENT_ID = "agent_7201kb3x9tq8f5sv2m0d4hnp6e"  # the fixture agent
BASE_VARIABLES = {
    "caller_id",
    "called_number",
    "call_sid",
    "user_context",
    "caller_name",
    "call_count",
    "last_call_at",
    "is_returning_caller",
}


def ask(
    client: httpx.Client, caller: str | None, agent_id: str | None = AGENT_ID, **fields: Any
) -> tuple[dict[str, Any], float]:
    """POST /webhooks/client-data as ElevenLabs does; (answer, seconds it took)."""
    body: dict[str, Any] = {
        "agent_id": agent_id,
        "called_number": "+14155550199",
        "call_sid": "CA0000000000000000000000000000test",
        **fields,
    }
    if caller is not None:
        body["caller_id"] = caller
    started = time.perf_counter()
    response = client.post(
        "/webhooks/client-data", json=body, headers={"X-Api-Key": WORKSPACE_SECRET}
    )
    elapsed = time.perf_counter() - started
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["type"] == "conversation_initiation_client_data"
    assert answer["dynamic_variables"].keys() >= BASE_VARIABLES
    return answer, elapsed


def deliver(client: httpx.Client, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    response = client.post("/webhooks/post-call", content=body, headers=signed_headers(body))
    assert response.status_code == 200, response.text


def deliver_and_wait(
    client: httpx.Client, payload: dict[str, Any], caller: str, calls: int = 1
) -> dict[str, Any]:
    """Deliver a call, then wait until client-data knows `calls` calls of `caller`."""
    deliver(client, payload)
    agent_id = payload["data"].get("agent_id")

    def prepared() -> dict[str, Any] | None:
        answer, _ = ask(client, caller, agent_id)
        return answer if answer["dynamic_variables"]["call_count"] >= calls else None

    return wait_until(prepared, timeout=15)


def first_message(answer: dict[str, Any]) -> str | None:
    return ((answer.get("conversation_config_override") or {}).get("agent") or {}).get(
        "first_message"
    )
