"""Turn LoCoMo's public `locomo10.json` into the recall benchmark's files (bench/README.md).

LoCoMo (Maharana et al., ACL 2024; github.com/snap-research/locomo, `data/locomo10.json`,
licence CC BY-NC 4.0) is not redistributed here: download it yourself, then

    .venv/bin/python bench/locomo_convert.py locomo10.json bench-data/locomo
    .venv/bin/python bench/recall.py --data bench-data/locomo

Each session becomes one inbound call (a `post_call_transcription` webhook body), speaker A
talking as the caller and speaker B as the agent; each question keeps LoCoMo's answer and
category and names the transcript turns holding its evidence. Category 5 (adversarial,
no answer in the conversation) is left out, as in the published measure.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

AGENT_ID = "agent_locomo_bench"
AGENT_NUMBER = "+12025550100"
SECONDS_PER_TURN = 9  # a spoken turn, so calls last about as long as real ones
HANGUP_SECONDS = 14  # from the last turn's start to the end of the call
COST_PER_SECOND = 7
# The five conversations of the published reference figures (bench/README.md).
DEFAULT_SAMPLES = ("conv-26", "conv-30", "conv-41", "conv-42", "conv-43")
DIALOG_ID = re.compile(r"^D(\d+):(\d+)$")


def session_start(text: str) -> int:
    """LoCoMo's session date ("1:56 pm on 8 May, 2023") as Unix seconds, read as UTC."""
    moment = datetime.strptime(text.strip(), "%I:%M %p on %d %B, %Y")
    return int(moment.replace(tzinfo=UTC).timestamp())


def turn_text(turn: dict[str, Any]) -> str:
    # A shared photo is part of what was said: LoCoMo's evidence texts include its caption.
    text = str(turn["text"])
    caption = turn.get("blip_caption")
    return f"{text} [shares {caption}]" if caption else text


def sample_number(sample_id: str) -> int:
    return int(re.sub(r"\D", "", sample_id))


def convert_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """One LoCoMo sample (a conversation over many sessions) as a bench file."""
    number = sample_number(sample["sample_id"])
    conversation = sample["conversation"]
    caller_name, agent_name = conversation["speaker_a"], conversation["speaker_b"]
    caller_id = f"+1415555{number:04d}"
    summaries = sample.get("session_summary", {})
    sessions = sorted(
        int(key.removeprefix("session_"))
        for key in conversation
        if re.fullmatch(r"session_\d+", key) and conversation[key]
    )
    calls: list[dict[str, Any]] = []
    where: dict[str, tuple[str, int, str]] = {}  # dia_id -> (conversation, turn, text)
    for position, session in enumerate(sessions, start=1):
        conversation_id = f"conv_locomo{number}_s{position:02d}"
        call_sid = f"CAlocomo{number}{position:02d}"
        started = session_start(conversation[f"session_{session}_date_time"])
        transcript = []
        for index, turn in enumerate(conversation[f"session_{session}"]):
            text = turn_text(turn)
            where[turn["dia_id"]] = (conversation_id, index, text)
            transcript.append(
                {
                    "role": "user" if turn["speaker"] == caller_name else "agent",
                    "message": text,
                    "tool_calls": [],
                    "tool_results": [],
                    "feedback": None,
                    "time_in_call_secs": index * SECONDS_PER_TURN,
                    "interrupted": False,
                }
            )
        duration = (len(transcript) - 1) * SECONDS_PER_TURN + HANGUP_SECONDS
        calls.append(
            {
                "type": "post_call_transcription",
                "event_timestamp": started + duration,
                "data": {
                    "agent_id": AGENT_ID,
                    "conversation_id": conversation_id,
                    "status": "done",
                    "user_id": None,
                    "transcript": transcript,
                    "metadata": {
                        "start_time_unix_secs": started,
                        "accepted_time_unix_secs": started,
                        "call_duration_secs": duration,
                        "cost": duration * COST_PER_SECOND,
                        "phone_call": {
                            "type": "twilio",
                            "direction": "inbound",
                            "phone_number_id": "phnum_locomo_bench",
                            "agent_number": AGENT_NUMBER,
                            "external_number": caller_id,
                            "stream_sid": f"MZlocomo{number}{position:02d}",
                            "call_sid": call_sid,
                        },
                        "termination_reason": "Call ended by remote party",
                        "error": None,
                        "warnings": [],
                        "main_language": "en",
                        "text_only": False,
                        "conversation_initiation_source": "twilio",
                        "timezone": "UTC",
                    },
                    "analysis": {
                        "evaluation_criteria_results": {},
                        "data_collection_results": {},
                        "call_successful": "success",
                        "transcript_summary": summaries.get(f"session_{session}_summary", ""),
                        "call_summary_title": f"Call {position} with {caller_name}",
                    },
                    "conversation_initiation_client_data": {
                        "conversation_config_override": {"agent": None, "tts": None},
                        "custom_llm_extra_body": {},
                        "user_id": None,
                        "source_info": {"source": None, "version": None},
                        "dynamic_variables": {
                            "system__agent_id": AGENT_ID,
                            "system__conversation_id": conversation_id,
                            "system__caller_id": caller_id,
                            "system__called_number": AGENT_NUMBER,
                            "system__call_sid": call_sid,
                            "system__call_duration_secs": duration,
                        },
                    },
                    "has_audio": False,
                },
            }
        )
    questions = []
    for qa in sample.get("qa", []):
        if qa.get("category") == 5 or "answer" not in qa:
            continue
        evidence = []
        for dia_id in qa.get("evidence", []):
            # A few published ids carry stray text ("D8:6; D9:17"): take each id found.
            for found in re.findall(r"D\d+:\d+", str(dia_id)):
                if found in where:
                    conversation_id, index, text = where[found]
                    evidence.append(
                        {"conversation_id": conversation_id, "turn_index": index, "text": text}
                    )
        if evidence:
            questions.append(
                {
                    "question": qa["question"],
                    "answer": str(qa["answer"]),
                    "category": qa["category"],
                    "evidence": evidence,
                }
            )
    return {
        "source": f"LoCoMo conversation {number} (snap-research/locomo, data/locomo10.json)",
        "caller_id": caller_id,
        "agent_id": AGENT_ID,
        "speakers": {"user": caller_name, "agent": agent_name},
        "calls": calls,
        "questions": questions,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="LoCoMo's locomo10.json")
    parser.add_argument("out", type=Path, help="folder for the locomo-<n>.json files")
    parser.add_argument(
        "--samples",
        default=",".join(DEFAULT_SAMPLES),
        help="comma-separated sample ids, or 'all' (default: the five of the reference figures)",
    )
    args = parser.parse_args(argv)
    if not args.source.is_file():
        print(
            f"no such file: {args.source} (download LoCoMo's data/locomo10.json)", file=sys.stderr
        )
        return 2
    samples = json.loads(args.source.read_text())
    wanted = None if args.samples == "all" else set(args.samples.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    written = 0
    for sample in samples:
        if wanted is not None and sample["sample_id"] not in wanted:
            continue
        bench = convert_sample(sample)
        path = args.out / f"locomo-{sample_number(sample['sample_id'])}.json"
        path.write_text(json.dumps(bench, indent=1, ensure_ascii=False) + "\n")
        print(f"{path}: {len(bench['calls'])} calls, {len(bench['questions'])} questions")
        written += 1
    if not written:
        print("no sample matched --samples", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
