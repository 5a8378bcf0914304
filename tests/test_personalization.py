"""Profiles and greetings prepared after each call: sources, LLM path, disclosure, facts."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from elaoms.services import Services

from conftest import (
    REPO_ROOT,
    InThreadServer,
    ServiceProcess,
    base_env,
    make_settings,
    transcription,
    wait_settled,
    wait_until,
)
from standins import (
    ElevenLabsStandIn,
    LLMStandIn,
    ask,
    deliver,
    deliver_and_wait,
    first_message,
)

PROFILE_KEYS = {
    "user_id": str,
    "name": (str, type(None)),
    "name_source": (str, type(None)),
    "call_count": int,
    "first_call_at": (int, type(None)),
    "last_call_at": (int, type(None)),
    "last_call_title": (str, type(None)),
    "last_call_summary": (str, type(None)),
    "recent_summaries": list,
    "topics": list,
    "open_follow_ups": list,
    "greeting": str,
    "greeting_source": str,
    "user_context": str,
    "updated_at": float,
}
GOOD_LLM_GREETING = (
    "Hi Maria, welcome back to Brightside Dental! Last time we moved your cleaning to "
    "Tuesday, and we still owe you a call about Sofia's tooth. How can I help today?"
)
INVENTED_LLM_GREETING = "Hi Tom, welcome back! Your root canal with Dr. Smith is on Friday at 3 pm."


def llm_reply(messages: list[dict[str, Any]]) -> str:
    facts = json.loads(messages[-1]["content"])
    return GOOD_LLM_GREETING if facts["caller_first_name"] == "Maria" else INVENTED_LLM_GREETING


@pytest.fixture(scope="module")
def elevenlabs() -> Iterator[ElevenLabsStandIn]:
    with ElevenLabsStandIn() as api:
        yield api


@pytest.fixture(scope="module")
def llm() -> Iterator[LLMStandIn]:
    with LLMStandIn(llm_reply) as model:
        yield model


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, elevenlabs: ElevenLabsStandIn, llm: LLMStandIn
) -> Iterator[ServiceProcess]:
    env = {
        "ELEVENLABS_API_KEY": elevenlabs.api_key,
        "ELEVENLABS_API_BASE_URL": elevenlabs.url,
        "LLM_BASE_URL": llm.url,
        "LLM_API_KEY": "sk-test",
        "LLM_MODEL": "stand-in-1",
        # LLM and data-collection greetings are written only at the fullest disclosure.
        "GREETING_DISCLOSURE": "name_and_topic",
    }
    service = ServiceProcess(tmp_path_factory.mktemp("personalization"), env=env).start()
    yield service
    service.stop()


def stored_profile(data_dir: Path, user_id: str, calls: int = 1) -> dict[str, Any]:
    """The caller's profile in the store, once it counts `calls` calls: the cache has it
    first (what client-data answers from), the store a moment later."""

    def stored() -> dict[str, Any] | None:
        with sqlite3.connect(data_dir / "memory.sqlite3") as connection:
            row = connection.execute(
                "SELECT profile FROM caller_profiles WHERE user_id = ?", (user_id,)
            ).fetchone()
        profile = json.loads(row[0]) if row else None
        return profile if profile and profile["call_count"] >= calls else None

    return wait_until(stored)


def stored_calls_text(data_dir: Path, user_id: str) -> str:
    with sqlite3.connect(data_dir / "memory.sqlite3") as connection:
        rows = connection.execute("SELECT payload FROM calls WHERE user_id = ?", (user_id,))
        return "\n".join(bytes(row[0]).decode() for row in rows)


# Written apart from the service's own check: every name, number, weekday or month a
# greeting states must be written somewhere in the caller's stored calls.
_FACT = re.compile(
    r"\b(?:[A-Z][a-z]+|\d+|monday|tuesday|wednesday|thursday|friday|saturday|sunday)\b"
)
_PLAIN = {"Hi", "Welcome", "Last", "We", "How", "I", "Your", "Thanks"}


def invented_facts(greeting: str, calls_text: str) -> list[str]:
    return [
        word
        for word in _FACT.findall(greeting)
        if word not in _PLAIN and word.lower() not in calls_text.lower()
    ]


def call_with(conversation_id: str, caller: str, start: int, **analysis: Any) -> dict[str, Any]:
    payload = transcription(conversation_id, caller, **analysis)
    payload["data"]["metadata"]["start_time_unix_secs"] = start
    return payload


def test_llm_writes_the_greeting_from_stored_facts_only(
    client: httpx.Client, server: ServiceProcess, llm: LLMStandIn
) -> None:
    caller = "+14155550601"
    answer = deliver_and_wait(client, transcription("conv_llm_1", caller), caller)
    assert first_message(answer) == GOOD_LLM_GREETING
    profile = stored_profile(server.data_dir, caller)
    assert profile["greeting_source"] == "llm"
    assert not invented_facts(GOOD_LLM_GREETING, stored_calls_text(server.data_dir, caller))

    prompt = json.loads(llm.prompts[-1][-1]["content"])
    assert prompt["caller_first_name"] == "Maria"
    assert prompt["business"] == "Brightside Dental"
    assert "I'm at work until then" not in json.dumps(prompt)  # facts, not the transcript

    # A replayed delivery does not ask the model again (counted once its handling is over:
    # hooks run after the answer).
    prompts = len(llm.prompts)
    deliver(client, transcription("conv_llm_1", caller))
    wait_settled(server.data_dir / "webhooks")
    ask(client, caller)
    assert len(llm.prompts) == prompts


def test_an_llm_greeting_with_invented_facts_is_refused(
    client: httpx.Client, server: ServiceProcess, caplog: pytest.LogCaptureFixture
) -> None:
    caller = "+14155550602"
    payload = transcription("conv_llm_2", caller)
    payload["data"]["analysis"]["data_collection_results"]["caller_name"]["value"] = "Tom Becker"
    answer = deliver_and_wait(client, payload, caller)
    greeting = first_message(answer)
    assert greeting.startswith("Hi Tom, welcome back to Brightside Dental. Last time we talked")
    assert stored_profile(server.data_dir, caller)["greeting_source"] == "template"
    assert "LLM greeting refused" in server.logs()
    assert invented_facts(INVENTED_LLM_GREETING, stored_calls_text(server.data_dir, caller))


def test_llm_down_falls_back_to_the_template(
    client: httpx.Client, server: ServiceProcess, llm: LLMStandIn
) -> None:
    caller = "+14155550603"
    llm.fail_status = 503
    try:
        answer = deliver_and_wait(client, transcription("conv_llm_3", caller), caller)
    finally:
        llm.fail_status = None
    assert first_message(answer).startswith("Hi Maria, welcome back to Brightside Dental.")
    assert stored_profile(server.data_dir, caller)["greeting_source"] == "template"


def test_no_greeting_states_a_fact_absent_from_the_callers_calls(
    client: httpx.Client, server: ServiceProcess, llm: LLMStandIn
) -> None:
    """Three callers, several calls each, every greeting source the server picks."""
    llm.reply = lambda messages: ""  # the model answers nothing: template greetings
    try:
        for index, name in enumerate(["Ana Ortiz", "Ben Okafor", "Chloe Martin"]):
            caller = f"+1415555061{index}"
            for number in range(3):
                payload = call_with(
                    f"conv_facts_{index}_{number}",
                    caller,
                    1763000000 + number * 86400,
                    call_summary_title=f"Visit {number} for {name.split()[0]}",
                    transcript_summary=f"{name} called about visit {number}.",
                    data_collection_results={
                        "caller_name": {"value": name},
                        "follow_up": {"value": f"Send the invoice for visit {number}"},
                    },
                )
                answer = deliver_and_wait(client, payload, caller, calls=number + 1)
                greeting = first_message(answer)
                assert greeting, answer
                calls_text = stored_calls_text(server.data_dir, caller)
                assert not invented_facts(greeting, calls_text), greeting
                assert f"visit {number}" in greeting  # the newest call, not an older one
    finally:
        llm.reply = llm_reply


def test_profile_has_the_agreed_shape_and_is_idempotent(
    client: httpx.Client, server: ServiceProcess, elevenlabs: ElevenLabsStandIn, llm: LLMStandIn
) -> None:
    caller = "+14155550621"
    deliver_and_wait(client, call_with("conv_shape_1", caller, 1763000000), caller)
    deliver_and_wait(client, call_with("conv_shape_2", caller, 1763500000), caller, calls=2)
    profile = stored_profile(server.data_dir, caller, calls=2)
    for key, kind in PROFILE_KEYS.items():
        assert isinstance(profile[key], kind), (key, profile[key])
    assert profile["name"] == "Maria Lopez" and profile["name_source"] == "data_collection"
    assert (profile["first_call_at"], profile["last_call_at"]) == (1763000000, 1763500000)
    assert [entry["conversation_id"] for entry in profile["recent_summaries"]] == [
        "conv_shape_2",
        "conv_shape_1",
    ]
    assert profile["open_follow_ups"] == [
        "Call back after 5 pm about an appointment for daughter Sofia (sore tooth)"
    ]

    # Preparing again from the same calls (a retried hook, a backfill) changes nothing.
    settings = make_settings(
        server.data_dir,
        elevenlabs_api_key=elevenlabs.api_key,
        elevenlabs_api_base_url=elevenlabs.url,
        llm_base_url=llm.url,
        llm_api_key="sk-test",
        llm_model="stand-in-1",
        greeting_disclosure="name_and_topic",
    )

    async def prepare_again() -> dict[str, Any] | None:
        services = Services.build(settings)
        try:
            return await services.personalization.prepare_caller(caller)
        finally:
            await services.close()

    again = asyncio.run(prepare_again())
    assert again is not None and again["updated_at"] > profile["updated_at"]
    assert again | {"updated_at": 0} == profile | {"updated_at": 0}


def test_user_context_keeps_to_its_budget_newest_first(
    client: httpx.Client, server: ServiceProcess
) -> None:
    caller = "+14155550631"
    long_summary = "The caller discussed many details of the treatment plan. " * 8
    for number in range(6):
        payload = call_with(
            f"conv_budget_{number}",
            caller,
            1762000000 + number * 86400,
            call_summary_title=f"Plan review {number}",
            transcript_summary=f"Review {number}. {long_summary}",
        )
        answer = deliver_and_wait(client, payload, caller, calls=number + 1)
    context = answer["dynamic_variables"]["user_context"]
    assert 900 < len(context) <= 1000
    assert context.index("Plan review 5") < context.index("Plan review 4")


@pytest.mark.parametrize(
    ("disclosure", "expected"),
    [
        ("name", "Hi Maria, welcome back to Brightside Dental. How can I help today?"),
        ("none", None),
    ],
)
def test_disclosure_setting_caps_what_a_greeting_reveals(
    tmp_path: Path, elevenlabs: ElevenLabsStandIn, disclosure: str, expected: str | None
) -> None:
    """Prepared under name_and_topic, answered after the setting was narrowed."""
    caller = "+14155550641"
    options = {"elevenlabs_api_key": elevenlabs.api_key, "elevenlabs_api_base_url": elevenlabs.url}
    with InThreadServer(make_settings(tmp_path, **options)) as server, server.client() as client:
        deliver_and_wait(client, transcription("conv_disclosure", caller), caller)
    narrowed = make_settings(tmp_path, greeting_disclosure=disclosure, **options)
    with InThreadServer(narrowed) as server, server.client() as client:
        answer, _ = ask(client, caller)
    assert first_message(answer) == expected
    assert answer["dynamic_variables"]["caller_name"] == (
        "there" if disclosure == "none" else "Maria Lopez"
    )
    assert "Sofia" not in (first_message(answer) or "")


def test_first_message_preview_script(
    client: httpx.Client, server: ServiceProcess, elevenlabs: ElevenLabsStandIn
) -> None:
    caller = "+14155550651"
    answer = deliver_and_wait(client, transcription("conv_preview", caller), caller)
    env = {
        **base_env(server.data_dir),
        "ELEVENLABS_API_KEY": elevenlabs.api_key,
        "ELEVENLABS_API_BASE_URL": elevenlabs.url,
        "GREETING_DISCLOSURE": "name_and_topic",
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "generate_first_message.py"), "415-555-0651"],
        cwd=server.data_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    preview = json.loads(result.stdout)
    assert first_message(preview) == first_message(answer)
    assert preview["dynamic_variables"]["caller_name"] == "Maria Lopez"
