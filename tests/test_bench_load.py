"""The load benchmark still runs end to end, at a tiny size.

Its figures are measured by hand (docs/performance.md); this only checks that the script
seeds a store, starts the floor and the service with the production command, drives every
endpoint with wrk without an error, and finds every accepted delivery stored. No timing is
asserted.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


# Seeding, two servers and five wrk runs: minutes on a loaded 2-core host, where the
# suite's 120 s bound cut it short. The run is waited for; the bound only catches a hang.
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("backend", "replicas"),
    [
        ("sqlite", 1),
        # A throw-away PostgreSQL (tests/postgres_server.py) and two service replicas on it,
        # each driven with half the requests at once.
        ("postgres", 2),
    ],
)
def test_the_load_benchmark_drives_every_endpoint_and_finds_every_delivery_stored(
    tmp_path: Path, backend: str, replicas: int
) -> None:
    figures = tmp_path / "figures.json"
    # The seeds (and the PostgreSQL cluster kept with them) outside pytest's folder, which
    # PostgreSQL's own user may not enter when the tests run as root.
    seeds = Path(tempfile.mkdtemp(prefix="elaoms-bench-test-"))
    seeds.chmod(0o755)
    try:
        # A few connections, not the default 50: each endpoint's 1 s run must see answers
        # (and no search past its deadline, an error), which 50 queued connections on a
        # loaded 2-core host did not give (post-call p50 0.7 s, none answered within 1 s).
        completed = subprocess.run(
            [sys.executable, str(REPO_ROOT / "bench" / "load.py"),
             "--callers", "6", "--calls", "2", "--duration", "1", "--concurrency", "4",
             "--post-call-max", "3000",
             "--cache-dir", str(seeds), "--work-dir", str(tmp_path),
             "--log-dir", str(tmp_path / "logs"), "--json", str(figures),
             "--env", "SEARCH_EMBEDDINGS=off",
             "--backend", backend, "--replicas", str(replicas)],
            capture_output=True, text=True, timeout=840,
        )  # fmt: skip
    finally:
        shutil.rmtree(seeds, ignore_errors=True)
    assert completed.returncode == 0, completed.stdout + completed.stderr

    (run,) = json.loads(figures.read_text())
    assert (run["backend"], run["replicas"]) == (backend, replicas)
    results = {result["name"]: result for result in run["results"]}
    assert list(results) == [
        "floor",
        "client-data known",
        "client-data unknown",
        "search-data",
        "post-call",
    ]
    for result in results.values():
        assert result["requests"] > 0 and result["errors"] == 0, result
    assert not results["post-call"]["exhausted"]  # the run ended by its duration
    assert run["all_stored"] is True, run["verified"]
    assert run["stored_calls"] == 12 and run["worker_hwm_mb"] > 0
    assert "targets" in completed.stdout
