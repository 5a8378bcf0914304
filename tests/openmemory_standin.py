"""A stand-in OpenMemory (CaviraOSS v1.x) server on loopback, with its known faults.

No registry carries the real server, so the backend is tested against this: the documented
v1.x endpoints (docs/openmemory.md in the shared docs) and switchable quirks - content cut
to 200 characters (OM_USE_SUMMARY_ONLY), the weak global near-duplicate check, a mode that
leaks another user's memory into a user's listing, 403 tenant_mismatch (main since
2026-04), 429s, 5xx, slow answers, and being down (its port closed).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from elaoms.memory.openmemory import OpenMemoryStore

from conftest import WAIT_BOUND, free_port

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]

API_KEY = "om-test-key-0123456789"
SUMMARY_MAX_LENGTH = 200
_WORD = re.compile(r"[a-z0-9]+")


def simhash16(text: str) -> int:
    """A simhash over words kept to 16 bits, like the real server's effectively is."""
    weights = [0] * 16
    for word in set(_WORD.findall(text.lower())):
        bits = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=2).digest())
        for bit in range(16):
            weights[bit] += 1 if bits >> bit & 1 else -1
    return sum(1 << bit for bit in range(16) if weights[bit] > 0)


@dataclass
class Faults:
    truncate: bool = False  # OM_USE_SUMMARY_ONLY=true: keep only the first 200 characters
    dedup: bool = True  # the global simhash check
    collide_next: int = 0  # the next N adds are "near duplicates" of the newest memory
    leak: bool = False  # a user's listing and query also return another user's memory
    tenant: str | None = None  # user_id bound to the key: any other answers 403
    rate_limit: int = 0  # the next N requests answer 429
    server_errors: int = 0  # the next N requests answer 500
    bad_requests: int = 0  # the next N requests answer 400
    delay: float = 0.0  # seconds before every answer


@dataclass
class State:
    faults: Faults = field(default_factory=Faults)
    memories: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)

    def of(self, user_id: str) -> list[dict[str, Any]]:
        return [m for m in self.memories.values() if m["user_id"] == user_id]


def _public(memory: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in memory.items() if key != "simhash"}


def build_app(state: State, api_key: str = API_KEY) -> Starlette:
    def refuse_tenant(user_id: str | None) -> Response | None:
        tenant = state.faults.tenant
        if tenant is not None and user_id is not None and user_id != tenant:
            return JSONResponse(
                {"error": "tenant_mismatch", "message": "user_id does not match the API key"},
                status_code=403,
            )
        return None

    def leaked(user_id: str) -> list[dict[str, Any]]:
        if not state.faults.leak:
            return []
        return [m for m in state.memories.values() if m["user_id"] != user_id][:1]

    async def add(request: Request) -> Response:
        body = await request.json()
        content = body.get("content")
        if not isinstance(content, str) or not content:
            return JSONResponse({"err": "content"}, status_code=400)
        user_id = body.get("user_id")
        if refusal := refuse_tenant(user_id):
            return refusal
        fingerprint = simhash16(content)
        faults = state.faults
        twin = None
        if faults.collide_next and state.memories:
            faults.collide_next -= 1
            twin = next(reversed(state.memories.values()))
        elif faults.dedup:
            twin = next((m for m in state.memories.values() if m["simhash"] == fingerprint), None)
        if twin is not None:
            twin["salience"] = min(1.0, twin["salience"] + 0.1)
            return JSONResponse({"id": twin["id"], "deduplicated": True})
        now = int(time.time() * 1000)
        memory = {
            "id": str(uuid.uuid4()),
            "user_id": user_id,
            "content": content[:SUMMARY_MAX_LENGTH] if faults.truncate else content,
            "tags": body.get("tags") or [],
            "metadata": body.get("metadata") or {},
            "primary_sector": "episodic",
            "created_at": now,
            "updated_at": now,
            "last_seen_at": now,
            "salience": 0.5,
            "simhash": fingerprint,
        }
        state.memories[memory["id"]] = memory
        return JSONResponse(
            {"id": memory["id"], "primary_sector": "episodic", "sectors": ["episodic"], "chunks": 1}
        )

    async def query(request: Request) -> Response:
        try:
            body = await request.json()
            user_id = (body.get("filters") or {}).get("user_id")
            if refusal := refuse_tenant(user_id):
                return refusal
            words = set(_WORD.findall(str(body["query"]).lower()))
            scored = sorted(
                state.memories.values(),
                key=lambda m: -len(words & set(_WORD.findall(m["content"].lower()))),
            )[: int(body.get("k") or 8)]
            if user_id is not None:
                scored = [m for m in scored if m["user_id"] == user_id] + leaked(user_id)
        except Exception:  # the real server hides its failures as "nothing found"
            return JSONResponse({"query": None, "matches": []})
        matches = [
            {"id": m["id"], "content": m["content"], "score": 0.5, "sectors": ["episodic"]}
            for m in scored
        ]
        return JSONResponse({"query": body["query"], "matches": matches})

    async def one(request: Request) -> Response:
        memory_id = request.path_params["id"]
        memory = state.memories.get(memory_id)
        if memory is None:
            return JSONResponse({"err": "nf"}, status_code=404)
        if request.method == "DELETE":
            del state.memories[memory_id]
            return JSONResponse({"ok": True})
        if request.method == "PATCH":
            body = await request.json()
            for key in ("content", "tags", "metadata"):
                if body.get(key) is not None:
                    memory[key] = body[key]
            memory["updated_at"] = int(time.time() * 1000)
            return JSONResponse({"id": memory_id, "updated": True})
        return JSONResponse(_public(memory))

    def page(request: Request, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        limit = int(request.query_params.get("l", 100))
        offset = int(request.query_params.get("u", 0))
        return [_public(m) for m in items[offset : offset + limit]]

    async def everything(request: Request) -> Response:
        return JSONResponse({"items": page(request, list(state.memories.values()))})

    async def user_memories(request: Request) -> Response:
        user_id = request.path_params["user_id"]
        if refusal := refuse_tenant(user_id):
            return refusal
        if request.method == "DELETE":
            mine = state.of(user_id)
            for memory in mine:
                del state.memories[memory["id"]]
            return JSONResponse({"ok": True, "deleted": len(mine)})
        newest_first = sorted(state.of(user_id), key=lambda m: -m["created_at"])
        items = page(request, newest_first)
        if request.query_params.get("u", "0") == "0":
            items += [_public(m) for m in leaked(user_id)]
        return JSONResponse({"user_id": user_id, "items": items})

    async def summary(request: Request) -> Response:
        user_id = request.path_params["user_id"]
        if not state.of(user_id):
            return JSONResponse({"err": "user not found"}, status_code=404)
        return JSONResponse({"user_id": user_id, "summary": "User profile initializing..."})

    async def health(request: Request) -> Response:
        return JSONResponse({"ok": True, "version": "1.3.0-standin"})

    class Gate(BaseHTTPMiddleware):
        async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
            state.requests.append((request.method, request.url.path))
            faults = state.faults
            if faults.delay:
                await asyncio.sleep(faults.delay)
            if request.url.path == "/health":
                return await call_next(request)
            key = request.headers.get("x-api-key") or request.headers.get(
                "authorization", ""
            ).removeprefix("Bearer ")
            if key != api_key:
                return JSONResponse({"error": "unauthorized"}, status_code=401)
            if faults.rate_limit:
                faults.rate_limit -= 1
                return JSONResponse(
                    {"error": "rate_limited"}, status_code=429, headers={"Retry-After": "0"}
                )
            if faults.server_errors:
                faults.server_errors -= 1
                return JSONResponse({"err": "internal"}, status_code=500)
            if faults.bad_requests:
                faults.bad_requests -= 1
                return JSONResponse({"err": "bad request"}, status_code=400)
            return await call_next(request)

    app = Starlette(
        routes=[
            Route("/health", health),
            Route("/memory/add", add, methods=["POST"]),
            Route("/memory/query", query, methods=["POST"]),
            Route("/memory/all", everything),
            Route("/memory/{id}", one, methods=["GET", "PATCH", "DELETE"]),
            Route("/users/{user_id}/memories", user_memories, methods=["GET", "DELETE"]),
            Route("/users/{user_id}/summary", summary),
        ]
    )
    app.add_middleware(Gate)
    return app


class StandIn:
    """The stand-in on a fixed loopback port that can go down and come back with its data."""

    def __init__(self, api_key: str = API_KEY) -> None:
        self.api_key = api_key
        self.state = State()
        self.app = build_app(self.state, api_key)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def faults(self) -> Faults:
        return self.state.faults

    def start(self) -> StandIn:
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_config=None,
            lifespan="off",
            timeout_graceful_shutdown=0,  # "down" means now, even mid-request
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + WAIT_BOUND
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("OpenMemory stand-in did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Close the port: clients see connection refused, as with a server that is down."""
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(WAIT_BOUND)
            if self._thread.is_alive():  # its port would still answer: not "down"
                raise RuntimeError("OpenMemory stand-in did not stop")
            self._server = None

    def reset(self) -> None:
        self.state.faults = Faults()
        self.state.memories.clear()
        self.state.requests.clear()

    def __enter__(self) -> StandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def openmemory_store(server: StandIn, directory: Path, **options: Any) -> OpenMemoryStore:
    """A backend on `server` with quick retries and its ledger in `directory`."""
    defaults: dict[str, Any] = {"timeout": 2.0, "max_retries": 3, "retry_base_delay": 0.01}
    return OpenMemoryStore(
        server.url,
        server.api_key,
        ledger_path=directory / "openmemory-ledger.sqlite3",
        **{**defaults, **options},
    )


# Fixtures: test modules import them by name.
@pytest.fixture(scope="module")
def standin() -> Iterator[StandIn]:
    """One stand-in per test module; use `fresh_standin` for a clean one per test."""
    with StandIn() as server:
        yield server


@pytest.fixture
def fresh_standin(standin: StandIn) -> StandIn:
    if standin._server is None:
        standin.start()
    standin.reset()
    return standin


@pytest.fixture
def run() -> Iterator[Run[Any]]:
    """Run coroutines on one event loop kept for the whole test (pooled clients bind to it)."""
    with asyncio.Runner() as runner:
        yield runner.run
