"""The recall benchmark runs end to end on a tiny bench of its own format.

Its figures are measured by hand on the LoCoMo files (docs/search.md); this checks that
`bench/recall.py` measures the same recall through every backend and that its
leave-one-out mode chooses on the other files and reports each held-out one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import transcription

REPO_ROOT = Path(__file__).resolve().parents[1]

# Two callers' calls, each with a question whose answer is one turn, and one whose
# evidence turn shares no word with it (so the recall is below 1 and can differ).
STORIES = [
    ("boiler", "The boiler in the basement leaks since Monday.", "kitchen sink gurgles"),
    ("bike", "My red bike was stolen from the station on Friday.", "garden fence is broken"),
]


def bench_file(directory: Path, number: int, subject: str, said: str, other: str) -> Path:
    caller = f"+1415555{number:04d}"
    calls = []
    for index, turns in enumerate(
        [
            [("user", "Hello, it's me again."), ("agent", "Good to hear from you."),
             ("user", said), ("agent", "I am sorry to hear that.")],
            [("user", f"Also the {other}."), ("agent", "We will look into it.")],
        ]
    ):  # fmt: skip
        payload = transcription(f"conv_bench{number}_{index}", caller, turns=turns)
        payload["data"]["metadata"]["start_time_unix_secs"] = 1_683_554_327 + index * 86_400
        calls.append(payload)
    questions = [
        {
            "question": f"What happened with the {subject}?",
            "answer": said,
            "category": 4,
            "evidence": [{"conversation_id": calls[0]["data"]["conversation_id"],
                          "turn_index": 2, "text": said}],
        },
        {
            "question": "What else needed a repair at home?",
            "answer": other,
            "category": 1,
            "evidence": [{"conversation_id": calls[1]["data"]["conversation_id"],
                          "turn_index": 0, "text": f"Also the {other}."}],
        },
    ]  # fmt: skip
    path = directory / f"locomo-{number}.json"
    path.write_text(json.dumps({"caller_id": caller, "calls": calls, "questions": questions}))
    return path


@pytest.fixture
def bench_dir(tmp_path: Path) -> Path:
    for number, story in enumerate(STORIES, start=1):
        bench_file(tmp_path, number, *story)
    return tmp_path


def recall(bench_dir: Path, *options: str) -> subprocess.CompletedProcess[str]:
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "recall.py"), "--data", str(bench_dir),
         *options],
        capture_output=True, text=True, timeout=240, env=_env(),
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed


def test_every_backend_gives_the_same_recall_on_the_same_calls(bench_dir: Path) -> None:
    figures: dict[str, Any] = {}
    for backend in ("sqlite", "openmemory", "postgres"):
        output = recall(bench_dir, "--backend", backend).stdout
        assert f"backend: {backend}" in output
        figures[backend] = re.findall(r"(?:recall@\d+ chars:|^\s+\d \S+)\s+([\d.]+)", output, re.M)
    assert figures["sqlite"] == figures["openmemory"] == figures["postgres"]
    assert figures["sqlite"][0] == "0.500"  # the words of the first questions only


def test_leave_one_out_reports_each_held_out_file_and_what_each_signal_buys(
    bench_dir: Path,
) -> None:
    output = recall(bench_dir, "--leave-one-out").stdout
    for number in range(1, len(STORIES) + 1):
        assert re.search(rf"^\s+locomo-{number}\.json: [\d.]+ ", output, re.M)
    # Before and after the latest round's signals, in the one run.
    assert len(re.findall(r"mean [\d.]+, worst [\d.]+", output)) == 2
    assert "leave one out without number_boost (before):" in output
    for signal in ("summary_weight", "number_boost"):
        assert re.search(rf"^\s+{signal}: [+-][\d.]+$", output, re.M)


def _env() -> dict[str, str]:
    return {**os.environ, "SEARCH_EMBEDDINGS": "off"}
