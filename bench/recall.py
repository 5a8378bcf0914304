"""Evidence recall of the search tool on the LoCoMo calls, through the real service.

Starts the service on loopback (a subprocess, a temporary data directory), posts every
call of every file through the signed post-call webhook, asks every question through
POST /webhooks/search-data, and prints evidence recall (overall and per LoCoMo category)
with the search latency seen by the client. The data and the measure: bench/README.md
(build the data with bench/locomo_convert.py; it is not in the repository). Run by hand:

    .venv/bin/python bench/recall.py --data bench-data/locomo          # every file there
    .venv/bin/python bench/recall.py --data bench-data/locomo --limit 10 locomo-26.json
    SEARCH_EMBEDDINGS=off .venv/bin/python bench/recall.py --data DIR  # BM25 alone
    .venv/bin/python bench/recall.py --data DIR --backend openmemory  # the OpenMemory stand-in
    .venv/bin/python bench/recall.py --data DIR --backend postgres    # a throw-away PostgreSQL
    .venv/bin/python bench/recall.py --data DIR --backend sqlite,postgres  # both, compared
    .venv/bin/python bench/recall.py --data DIR --leave-one-out       # in process, see recall_loo.py

With the `embeddings` extra, each stored call's turns are embedded in the background;
until a caller's vectors are all there, their searches rank by BM25 alone. `--warm`
(default) waits for that backlog (`elaoms_embedding_batches_queued` on /metrics) before
asking; `--no-warm` asks at once, as a caller ringing right after a restart would.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
# The user's environment, as it was before anything here ran: the tests' helpers (the
# throw-away PostgreSQL) set their own defaults in os.environ when imported, such as
# SEARCH_EMBEDDINGS=off, which must not reach the services measured.
USER_ENVIRONMENT = dict(os.environ)
sys.path.insert(0, str(REPO_ROOT))

from elaoms.webhooks.signature import SIGNATURE_HEADER, sign  # noqa: E402

CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop"}


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()


@contextmanager
def backend_env(
    backend: str, data_dir: Path, openmemory_url: str | None, database_url: str | None = None
) -> Iterator[dict[str, str]]:
    """The service's settings for `backend`. OpenMemory: the server at `openmemory_url`
    (key from OPENMEMORY_API_KEY), or else the tests' stand-in, started on loopback.
    PostgreSQL: `database_url`, or else the tests' throw-away server (Debian's binaries)."""
    if backend == "sqlite":
        yield {"MEMORY_BACKEND": "sqlite"}
        return
    if backend == "postgres":
        if database_url:
            yield {"MEMORY_BACKEND": "postgres", "DATABASE_URL": database_url}
            return
        sys.path.insert(0, str(REPO_ROOT / "tests"))
        from postgres_server import PostgresServer

        server = PostgresServer().start()
        try:
            yield {"MEMORY_BACKEND": "postgres", "DATABASE_URL": server.create_database("recall")}
        finally:
            server.remove()
        return
    if backend != "openmemory":
        raise SystemExit(f"no such backend: {backend}")
    env = {
        "MEMORY_BACKEND": "openmemory",
        "OPENMEMORY_LEDGER_PATH": str(data_dir / "openmemory-ledger.sqlite3"),
        # Every unit is added with its own request: let a call finish before the answer,
        # so each question sees every call (the measure is ranking, not ingestion speed).
        "POST_CALL_STORE_TIMEOUT_MS": "120000",
    }
    if openmemory_url:
        yield {**env, "OPENMEMORY_URL": openmemory_url}
        return
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from openmemory_standin import StandIn

    with StandIn() as server:
        yield {**env, "OPENMEMORY_URL": server.url, "OPENMEMORY_API_KEY": server.api_key}


@contextmanager
def running_service(
    data_dir: Path, hmac_key: str, api_key: str, extra_env: dict[str, str] | None = None
) -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **USER_ENVIRONMENT,
        "PYTHONPATH": str(REPO_ROOT),
        "ELEVENLABS_POST_CALL_HMAC_KEY": hmac_key,
        "ELEVENLABS_CLIENT_DATA_WORKSPACE_SECRET": api_key,
        "SQLITE_PATH": str(data_dir / "memory.sqlite3"),
        "WEBHOOK_STORAGE_PATH": str(data_dir / "webhooks"),
        "WEBHOOK_QUARANTINE_PATH": str(data_dir / "webhooks" / "quarantine"),
        "ELEVENLABS_API_BASE_URL": "http://127.0.0.1:9",  # never call the real API
        "LOG_LEVEL": "WARNING",
        **(extra_env or {}),
    }
    command = [sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--app-dir", str(REPO_ROOT), "--no-access-log"]
    log = open(data_dir / "server.log", "wb")  # noqa: SIM115 - owned by the child process
    process = subprocess.Popen(
        command, cwd=data_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((data_dir / "server.log").read_text(errors="replace"))
            try:
                if httpx.get(f"{url}/health", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
        log.close()


def ingest(client: httpx.Client, bench: dict[str, Any], hmac_key: str) -> None:
    for call in bench["calls"]:
        body = json.dumps(call).encode()
        headers = {SIGNATURE_HEADER: sign(hmac_key, body), "Content-Type": "application/json"}
        response = client.post("/webhooks/post-call", content=body, headers=headers)
        response.raise_for_status()
        if response.json().get("status") != "received":
            raise RuntimeError(f"call not stored before the answer: {response.text}")


def embedding_backlog(client: httpx.Client) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("elaoms_embedding_batches_queued "):
            return float(line.split()[1])
    return 0.0


@dataclass
class RecallRun:
    """One backend's answers to every question, and what they cost."""

    backend: str
    paths: list[Path]
    found: dict[int, list[bool]] = field(default_factory=lambda: defaultdict(list))
    latencies: list[float] = field(default_factory=list)
    first_search: list[float] = field(default_factory=list)
    timed_out: int = 0
    contexts: list[str] = field(default_factory=list)


def measure(args: argparse.Namespace, backend: str, paths: list[Path]) -> RecallRun:
    """Every call of `paths` through a fresh service on `backend`, then every question."""
    hmac_key, api_key = secrets.token_hex(16), secrets.token_hex(16)
    run = RecallRun(backend, paths)
    with (
        tempfile.TemporaryDirectory(prefix="elaoms-recall-") as tmp,
        backend_env(backend, Path(tmp), args.openmemory_url, args.database_url) as extra_env,
        running_service(Path(tmp), hmac_key, api_key, extra_env) as url,
        httpx.Client(base_url=url, timeout=30) as client,
    ):
        for path in paths:
            bench = json.loads(path.read_text())
            ingest(client, bench, hmac_key)
            if args.warm:
                # As in production, each stored call queued its turns for embedding; wait
                # until that backlog is empty (it is 0 at once without the extra).
                started = time.perf_counter()
                while embedding_backlog(client) > 0:
                    time.sleep(0.2)
                client.post(
                    "/webhooks/search-data",
                    json={"query": "hello", "user_id": bench["caller_id"]},
                    headers={"X-Api-Key": api_key},
                ).raise_for_status()
                run.first_search.append((time.perf_counter() - started) * 1000)
            for number, question in enumerate(bench["questions"]):
                body: dict[str, Any] = {
                    "query": question["question"],
                    "user_id": bench["caller_id"],
                }
                if args.limit:
                    body["limit"] = args.limit
                started = time.perf_counter()
                response = client.post(
                    "/webhooks/search-data", json=body, headers={"X-Api-Key": api_key}
                )
                elapsed = (time.perf_counter() - started) * 1000
                response.raise_for_status()
                # The first search of a caller builds their index; count it apart.
                (run.first_search if number == 0 and not args.warm else run.latencies).append(
                    elapsed
                )
                run.timed_out += bool(response.json().get("timed_out"))
                context = normalize(response.json()["context"][: args.chars])
                run.contexts.append(context)
                for evidence in question["evidence"]:
                    run.found[question["category"]].append(normalize(evidence["text"]) in context)
    return run


def report(run: RecallRun, args: argparse.Namespace) -> None:
    every = [hit for hits in run.found.values() for hit in hits]
    print(f"backend: {run.backend}; files: {', '.join(path.name for path in run.paths)}")
    print(f"evidence recall@{args.chars} chars: {sum(every) / len(every):.3f} ({len(every)} turns)")
    for category in sorted(run.found):
        hits = run.found[category]
        name = CATEGORIES.get(category, str(category))
        print(f"  {category} {name:<12} {sum(hits) / len(hits):.3f} ({len(hits)} turns)")
    latencies = sorted(run.latencies)
    p99 = latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))]
    print(
        f"search latency over {len(latencies)} searches: p50 {statistics.median(latencies):.1f} ms,"
        f" p99 {p99:.1f} ms, max {latencies[-1]:.1f} ms"
    )
    what = "embedding backlog + first search" if args.warm else "first search, index build"
    print(f"warm-up per caller ({what}): max {max(run.first_search):.1f} ms")
    print(f"searches past the deadline (answered empty): {run.timed_out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help="bench files (default: all in --data)")
    parser.add_argument(
        "--data",
        type=Path,
        default=os.environ.get("ELAOMS_BENCH_DATA"),
        help="folder of locomo-*.json files (bench/README.md builds them; or ELAOMS_BENCH_DATA)",
    )
    parser.add_argument("--limit", type=int, help="send this limit (default: the service's)")
    parser.add_argument("--chars", type=int, default=3000, help="context cut for the measure")
    parser.add_argument(
        "--warm",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wait for the embedding backlog, then one unmeasured search per caller "
        "before the questions (default: on)",
    )
    parser.add_argument(
        "--backend",
        default="sqlite",
        help="memory store the service runs on: sqlite (default), postgres or openmemory;"
        " several, comma-separated (sqlite,postgres), are measured one after the other and"
        " their answers compared",
    )
    parser.add_argument(
        "--database-url",
        help="with --backend postgres: a database to fill (default: a throw-away server)",
    )
    parser.add_argument(
        "--openmemory-url",
        help="with --backend openmemory: a running server (default: the tests' stand-in)",
    )
    parser.add_argument(
        "--leave-one-out",
        action="store_true",
        help="in process: choose settings on all files but one, measure on that one",
    )
    parser.add_argument(
        "--vary",
        help="with --leave-one-out: the signals the grid tries, comma-separated (default:"
        " all; the others stay at their shipped values)",
    )
    args = parser.parse_args()
    if args.data is None:
        parser.error("--data DIR is required: bench/README.md says how to build it from LoCoMo")
    args.data = Path(args.data)
    paths = [args.data / name for name in args.files] or sorted(args.data.glob("locomo-*.json"))
    missing = [path for path in paths if not path.is_file()]
    if not paths or missing:
        parser.error(
            f"no bench file in {args.data} ({', '.join(map(str, missing)) or 'no locomo-*.json'}):"
            " build them with bench/locomo_convert.py (bench/README.md)"
        )
    if args.leave_one_out:
        from recall_loo import run

        from elaoms.search.embeddings import default_cache

        run(paths, args.chars, default_cache(), args.vary.split(",") if args.vary else None)
        return

    runs = [measure(args, backend, paths) for backend in args.backend.split(",")]
    for measured in runs:
        report(measured, args)
    for other in runs[1:]:
        same = sum(a == b for a, b in zip(runs[0].contexts, other.contexts, strict=True))
        print(
            f"{other.backend} vs {runs[0].backend}: {same} of {len(other.contexts)} answers"
            " identical (same memories, same order)"
        )


if __name__ == "__main__":
    main()
