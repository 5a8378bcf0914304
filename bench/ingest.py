"""CPU per post-call delivery, in process: what storing a call costs a worker.

Each delivery goes through `IngestService.receive` (the webhook's handler without HTTP
and the signature check: the kept copy, the store, the profile hook), one at a time, and
the process's CPU time is divided by their number once every hook has finished. A first
call of each caller warms the store and is not counted. The checkouts given (this one by
default, and any `--app-dir`, a before figure) are measured alternately in one run, each
round in a fresh process on a fresh store, so a busy machine weighs on all of them alike;
medians and their ratio to the first checkout are printed. Run by hand:

    .venv/bin/python bench/ingest.py
    .venv/bin/python bench/ingest.py --app-dir ../before --backend sqlite,postgres --rounds 6

Numbers from this machine are in docs/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def write_bodies(path: Path, callers: int, calls: int) -> None:
    """`calls` deliveries for each of `callers` callers, round by round (JSON lines)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from load import FIXTURES, make_call, make_callers

    rng = random.Random(7)
    template = json.loads((FIXTURES / "post_call_transcription.json").read_text())
    people = make_callers(rng, callers)
    with path.open("w") as out:
        for call in range(calls):
            for index, caller in enumerate(people):
                conversation = f"conv_ingest_{index:05d}_{call:03d}"
                started = 1_760_000_000 + call * 86_400 + index
                payload, _ = make_call(template, rng, caller, conversation, started)
                out.write(json.dumps(payload, separators=(",", ":")) + "\n")


def measure(bodies: Path, callers: int, backend: str, database_url: str) -> None:
    """In a fresh process whose `elaoms` is the checkout's: print the CPU and wall time
    per counted delivery as JSON."""
    import asyncio

    from elaoms.config import Settings
    from elaoms.services import Services

    async def run() -> dict[str, float]:
        data = Path(tempfile.mkdtemp(prefix="elaoms-ingest-"))
        settings = Settings(
            _env_file=None,
            sqlite_path=data / "memory.sqlite3",
            webhook_storage_path=data / "webhooks",
            webhook_quarantine_path=data / "webhooks" / "quarantine",
            elevenlabs_api_base_url="http://127.0.0.1:9",  # nothing listens: no real API
            search_embeddings="off",
            memory_backend=backend,
            database_url=database_url,
            post_call_store_timeout_ms=60_000,
        )
        services = Services.build(settings)
        lines = bodies.read_bytes().splitlines()
        try:
            for number, body in enumerate(lines):
                if number == callers:  # the first call of each caller is the warm-up
                    await services.ingest.drain(timeout=None)
                    cpu, wall = time.process_time(), time.perf_counter()
                acknowledgement = await services.ingest.receive(body)
                if acknowledgement.status != "received":
                    raise SystemExit(f"delivery {number} answered {acknowledgement.status}")
            await services.ingest.drain(timeout=None)
            counted = len(lines) - callers
            return {
                "cpu_ms": (time.process_time() - cpu) / counted * 1000,
                "wall_ms": (time.perf_counter() - wall) / counted * 1000,
            }
        finally:
            await services.close()

    print(json.dumps(asyncio.run(run())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--app-dir", action="append", type=Path, default=[])
    parser.add_argument("--backend", default="sqlite", help="sqlite, postgres or both")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--callers", type=int, default=100)
    parser.add_argument("--calls", type=int, default=6, help="per caller, the first uncounted")
    parser.add_argument("--database-url", default="", help="PostgreSQL: an admin URL of yours")
    parser.add_argument("--measure", nargs=2, metavar=("BODIES", "DATABASE_URL"))
    args = parser.parse_args()
    backends = args.backend.split(",")
    if args.measure:
        measure(Path(args.measure[0]), args.callers, backends[0], args.measure[1])
        return

    apps = [REPO_ROOT, *(path.resolve() for path in args.app_dir)]
    bodies = Path(tempfile.mkdtemp(prefix="elaoms-ingest-")) / "bodies.jsonl"
    write_bodies(bodies, args.callers, args.calls)
    server = None
    if "postgres" in backends and not args.database_url:
        sys.path.insert(0, str(REPO_ROOT / "tests"))
        from postgres_server import PostgresServer

        server = PostgresServer().start()
    figures: dict[tuple[str, Path], list[dict[str, float]]] = {}
    try:
        for round_number in range(1, args.rounds + 1):
            for backend in backends:
                for app in apps:
                    url = ""
                    if backend == "postgres":
                        url = server.create_database("ingest") if server else args.database_url
                    result = subprocess.run(
                        [
                            *(sys.executable, __file__, "--measure", str(bodies), url),
                            *("--backend", backend, "--callers", str(args.callers)),
                        ],
                        cwd=app,
                        # Embeddings off, as in bench/load.py's figures. The settings built
                        # in `measure` say so too; a checkout from before the vector cache
                        # followed the service's settings (a `--app-dir`) read this.
                        env={**os.environ, "PYTHONPATH": str(app), "SEARCH_EMBEDDINGS": "off"},
                        capture_output=True,
                        text=True,
                        check=False,
                    )
                    if result.returncode != 0:
                        raise SystemExit(f"{app} ({backend}) failed:\n{result.stderr[-3000:]}")
                    figure = json.loads(result.stdout.splitlines()[-1])
                    figures.setdefault((backend, app), []).append(figure)
                    print(
                        f"round {round_number} {backend:8} {app.name:20}"
                        f" cpu {figure['cpu_ms']:.2f} ms  wall {figure['wall_ms']:.2f} ms"
                        " per delivery",
                        flush=True,
                    )
    finally:
        if server is not None:
            server.stop()
            server.remove()
    counted = args.callers * (args.calls - 1)
    print(f"\nmedians over {args.rounds} rounds, {counted} counted deliveries each")
    for backend in backends:
        first = statistics.median(f["cpu_ms"] for f in figures[(backend, apps[0])])
        for app in apps:
            cpu = statistics.median(f["cpu_ms"] for f in figures[(backend, app)])
            wall = statistics.median(f["wall_ms"] for f in figures[(backend, app)])
            print(
                f"  {backend:8} {app!s:40} cpu {cpu:.2f} ms ({cpu / first:.2f}x)"
                f"  wall {wall:.2f} ms"
            )


if __name__ == "__main__":
    main()
