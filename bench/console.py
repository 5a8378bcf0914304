"""Console benchmark: how long each console page takes with a large store.

Seeds (or reuses) the store `bench/load.py` builds - 10,000 callers x 10 synthetic calls
by default, 100,000 stored calls - starts the service with the production command
(gunicorn, one worker, loopback) and a console secret, signs in, and requests every page
one after another, as an operator's browser does: the callers list (first page and a deep
page), a search by digits and by name, a caller's page, a call, a search on the caller's
page, agents and health. Prints p50/p90/p99/max per page. Run by hand:

    .venv/bin/python bench/console.py                              # 10,000 x 10 calls
    .venv/bin/python bench/console.py --callers 100000 --calls 1   # 100,000 callers
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import load  # noqa: E402

SECRET = "bench-console-secret-0123456789"


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def measure(name: str, request: Callable[[int], httpx.Response], count: int) -> list[float]:
    request(0)  # a first request warms what a page reads
    timings = []
    for number in range(count):
        started = time.perf_counter()
        response = request(number)
        timings.append((time.perf_counter() - started) * 1000)
        if response.status_code != 200:
            sys.exit(f"{name}: HTTP {response.status_code}\n{response.text[:500]}")
    print(
        f"{name:<34} p50 {statistics.median(timings):7.1f}  p90 {percentile(timings, 0.9):7.1f}"
        f"  p99 {percentile(timings, 0.99):7.1f}  max {max(timings):7.1f} ms"
    )
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--callers", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=10, help="calls per caller")
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--requests", type=int, default=100, help="requests per page")
    parser.add_argument(
        "--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "elaoms-bench-seeds"
    )
    args = parser.parse_args()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    print(f"machine: {load.machine()}")
    with tempfile.TemporaryDirectory(prefix="elaoms-console-bench-") as scratch:
        run_dir = Path(scratch)
        dataset = load.prepared_store(args, args.callers, args.calls, run_dir)
        env = {
            **load.service_env(run_dir),
            "PYTHONPATH": str(load.REPO_ROOT),
            "CONSOLE_SECRET": SECRET,
        }
        with load.gunicorn("main:app", run_dir, env, run_dir / "server.log") as (url, _):
            drive(url, dataset, args)


def drive(url: str, dataset: load.Dataset, args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    print(f"{args.callers:,} callers x {args.calls} calls = {args.callers * args.calls:,} calls")
    with httpx.Client(base_url=url, timeout=60) as client:
        origin = {"Origin": url}
        client.post("/console/login", data={"secret": SECRET}, headers=origin)
        listing = client.get("/console/callers")
        total = re.search(r"([\d,]+) caller\(s\)", listing.text)
        print(f"callers listed: {total.group(1) if total else '?'}")
        csrf = re.search(r'name="csrf_token" value="([0-9a-f]+)"', listing.text)
        assert csrf, listing.text[:500]
        token = csrf.group(1)
        ids = re.findall(r'href="/console/callers/([\w-]{20,})"', listing.text)
        people = dataset.callers

        def post(path: str, **fields: str) -> httpx.Response:
            return client.post(path, data={"csrf_token": token, **fields}, headers=origin)

        def caller_id(number: int) -> str:
            return ids[number % len(ids)]

        last_page = max(1, args.callers // 50)
        count = args.requests
        measure("callers, first page", lambda n: client.get("/console/callers"), count)
        measure(
            "callers, a deep page",
            lambda n: client.get(f"/console/callers?page={rng.randint(1, last_page)}"),
            count,
        )
        measure(
            "callers, search by last 4 digits",
            lambda n: post("/console/callers", q=rng.choice(people).number[-4:]),
            count,
        )
        measure(
            "callers, search by name",
            lambda n: post("/console/callers", q=rng.choice(people).name.split()[-1]),
            count,
        )
        measure("caller page", lambda n: client.get(f"/console/callers/{caller_id(n)}"), count)
        first_call = re.search(
            r'href="(/console/callers/[\w-]+/calls/[^"]+)"',
            client.get(f"/console/callers/{ids[0]}").text,
        )
        assert first_call
        measure("call page (transcript)", lambda n: client.get(first_call.group(1)), count)
        measure(
            "caller search (the tool's answer)",
            lambda n: post(f"/console/callers/{caller_id(n)}/search", query="appointment"),
            count,
        )
        measure("agents", lambda n: client.get("/console/agents"), count)
        measure("health", lambda n: client.get("/console/health"), count)


if __name__ == "__main__":
    main()
