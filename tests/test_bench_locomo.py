"""The recall benchmark's data is built from LoCoMo's public release, never committed.

A tiny sample in LoCoMo's published structure (`locomo10.json`: a list of samples with
`conversation`, `session_<n>`, `session_<n>_date_time`, `qa` with `D<session>:<turn>`
evidence, `session_summary`) goes through the converter, then through the real service the
way bench/recall.py feeds it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import REPO_ROOT

CONVERTER = REPO_ROOT / "bench" / "locomo_convert.py"


def locomo_sample() -> dict[str, Any]:
    return {
        "sample_id": "conv-7",
        "conversation": {
            "speaker_a": "Ana",
            "speaker_b": "Ben",
            "session_1_date_time": "1:56 pm on 8 May, 2023",
            "session_1": [
                {"speaker": "Ana", "dia_id": "D1:1", "text": "Hi Ben! I adopted a puppy."},
                {
                    "speaker": "Ben",
                    "dia_id": "D1:2",
                    "text": "Lovely! Look at mine.",
                    "img_url": ["https://example.invalid/dog.jpg"],
                    "blip_caption": "a photo of a dog on a beach",
                },
            ],
            "session_2_date_time": "10:00 am on 9 May, 2023",
            "session_2": [
                {"speaker": "Ben", "dia_id": "D2:1", "text": "How is the puppy?"},
                {"speaker": "Ana", "dia_id": "D2:2", "text": "Milo chewed my violin case."},
            ],
        },
        "session_summary": {"session_1_summary": "Ana adopted a puppy."},
        "qa": [
            {"question": "What did Ana adopt?", "answer": "a puppy", "evidence": ["D1:1"],
             "category": 4},
            {"question": "What did Milo chew?", "answer": "a violin case",
             "evidence": ["D2:2", "D1:2"], "category": 1},
            {"question": "What did Ben adopt?", "adversarial_answer": "a cat",
             "evidence": ["D1:1"], "category": 5},
        ],
    }  # fmt: skip


def convert(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    source = tmp_path / "locomo10.json"
    source.write_text(json.dumps([locomo_sample()]))
    return subprocess.run(
        [sys.executable, str(CONVERTER), str(source), str(tmp_path / "out"), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_converter_turns_each_locomo_session_into_a_signed_call_and_keeps_the_evidence(
    tmp_path: Path,
) -> None:
    completed = convert(tmp_path, "--samples", "conv-7")
    assert completed.returncode == 0, completed.stderr
    bench = json.loads((tmp_path / "out" / "locomo-7.json").read_text())

    assert bench["caller_id"] == "+14155550007"
    assert bench["speakers"] == {"user": "Ana", "agent": "Ben"}
    first, second = (call["data"] for call in bench["calls"])
    assert [call["type"] for call in bench["calls"]] == ["post_call_transcription"] * 2
    assert first["metadata"]["start_time_unix_secs"] == 1683554160  # 2023-05-08 13:56 UTC
    assert [turn["role"] for turn in second["transcript"]] == ["agent", "user"]
    assert first["transcript"][1]["message"] == (
        "Lovely! Look at mine. [shares a photo of a dog on a beach]"
    )
    assert first["analysis"]["transcript_summary"] == "Ana adopted a puppy."
    variables = first["conversation_initiation_client_data"]["dynamic_variables"]
    assert variables["system__caller_id"] == bench["caller_id"]

    # Category 5 (adversarial) is left out; evidence points at the turns by position.
    assert [question["category"] for question in bench["questions"]] == [4, 1]
    evidence = bench["questions"][1]["evidence"]
    assert [(item["conversation_id"], item["turn_index"]) for item in evidence] == [
        ("conv_locomo7_s02", 1),
        ("conv_locomo7_s01", 1),
    ]
    for item in evidence:
        call = next(c["data"] for c in bench["calls"] if c["data"]["conversation_id"] == item[
            "conversation_id"])  # fmt: skip
        assert call["transcript"][item["turn_index"]]["message"] == item["text"]


def test_the_converter_says_where_to_get_locomo_when_the_file_is_missing(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(CONVERTER), str(tmp_path / "nope.json"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 2
    assert "locomo10.json" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_the_recall_benchmark_without_data_says_how_to_build_it(tmp_path: Path) -> None:
    for extra in ([], ["--data", str(tmp_path / "empty")]):
        completed = subprocess.run(
            [sys.executable, str(REPO_ROOT / "bench" / "recall.py"), *extra],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin"},
        )
        assert completed.returncode == 2, completed.stderr
        assert "bench/README.md" in completed.stderr
        assert "Traceback" not in completed.stderr


def test_the_recall_benchmark_measures_the_converted_data_through_the_service(
    tmp_path: Path,
) -> None:
    assert convert(tmp_path, "--samples", "all").returncode == 0
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "recall.py"), "--data", str(tmp_path / "out"),
         "--no-warm"],
        capture_output=True, text=True, timeout=180,
        env={"PATH": "/usr/bin:/bin", "SEARCH_EMBEDDINGS": "off"},
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "recall" in completed.stdout.lower()
