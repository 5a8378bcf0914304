"""Property-based fuzzing of every endpoint through a real server: no 500, ever, and
nothing stored from a body that is not correctly signed."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import sqlite3
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import snowballstemmer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elaoms.memory.digest import digest_record
from elaoms.memory.records import (
    EARLIEST_TIMESTAMP,
    MAX_CALL_CHARS,
    MAX_TURNS,
    CallRecord,
)
from elaoms.memory.units import record_memories
from elaoms.payloads import decode, encode
from elaoms.search import ranking
from elaoms.webhooks.signature import sign

from conftest import (
    HMAC_KEY,
    WORKSPACE_SECRET,
    ServiceProcess,
    signed_headers,
    transcription,
    wait_until,
)

FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
envelopes = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            ["post_call_transcription", "post_call_audio", "call_initiation_failure", "other"]
        )
        | st.text(max_size=10),
        "event_timestamp": st.integers() | st.none() | st.text(max_size=5),
        "data": st.dictionaries(
            st.sampled_from(
                ["conversation_id", "transcript", "agent_id", "metadata", "analysis", "full_audio"]
            ),
            json_values,
        ),
    }
)
bodies = st.binary(max_size=300) | envelopes.map(lambda value: json.dumps(value).encode())
signature_headers = st.one_of(
    st.just(None),
    st.text(max_size=80),
    st.builds(lambda t, v: f"t={t},v0={v}", st.integers(), st.text(max_size=64)),
)


def stored_call_count(service: ServiceProcess) -> int:
    with sqlite3.connect(service.data_dir / "memory.sqlite3") as connection:
        return connection.execute("SELECT count(*) FROM calls").fetchone()[0]


def header_value(text: str) -> str:
    """What an HTTP client can send: printable ASCII without surrounding blanks."""
    return "".join(char for char in text if 32 <= ord(char) < 127).strip()


@FUZZ
@given(body=bodies, header=signature_headers)
def test_unsigned_or_badly_signed_post_call_is_refused_and_stores_nothing(
    service: ServiceProcess, body: bytes, header: str | None
) -> None:
    before = stored_call_count(service)
    headers = {} if header is None else {"ElevenLabs-Signature": header_value(header)}
    with httpx.Client(base_url=service.url, timeout=30) as client:
        response = client.post("/webhooks/post-call", content=body, headers=headers)
    assert response.status_code == 401
    assert "detail" in response.json()
    assert stored_call_count(service) == before


@FUZZ
@given(body=bodies)
def test_any_signed_body_gets_200_never_500(service: ServiceProcess, body: bytes) -> None:
    with httpx.Client(base_url=service.url, timeout=30) as client:
        response = client.post("/webhooks/post-call", content=body, headers=signed_headers(body))
    assert response.status_code == 200, response.text
    assert response.json()["status"] in {"received", "queued", "quarantined"}


@FUZZ
@given(body=st.binary(max_size=200), skew=st.integers(min_value=-(10**10), max_value=10**10))
def test_signatures_outside_the_time_window_are_refused(
    service: ServiceProcess, body: bytes, skew: int
) -> None:
    timestamp = int(time.time()) + skew
    headers = {"ElevenLabs-Signature": sign(HMAC_KEY, body, timestamp)}
    with httpx.Client(base_url=service.url, timeout=30) as client:
        response = client.post("/webhooks/post-call", content=body, headers=headers)
    inside = -30 * 60 + 5 <= skew <= 5 * 60 - 5
    outside = skew < -30 * 60 - 5 or skew > 5 * 60 + 5
    if inside:
        assert response.status_code == 200
    elif outside:
        assert response.status_code == 401


api_bodies = st.one_of(
    st.binary(max_size=200),
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "query": json_values,
            "user_id": json_values,
            "caller_id": json_values,
            "limit": st.integers() | json_values,
            "agent_id": json_values,
            "called_number": json_values,
            "call_sid": json_values,
        },
    ),
)
api_keys = st.one_of(st.none(), st.text(max_size=40), st.just(WORKSPACE_SECRET))


@pytest.mark.parametrize("path", ["/webhooks/search-data", "/webhooks/client-data"])
@FUZZ
@given(body=api_bodies, api_key=api_keys)
def test_header_authenticated_webhooks_never_answer_500(
    service: ServiceProcess, path: str, body: Any, api_key: str | None
) -> None:
    headers = {} if api_key is None else {"X-Api-Key": header_value(api_key)}
    with httpx.Client(base_url=service.url, timeout=30) as client:
        if isinstance(body, bytes):
            response = client.post(path, content=body, headers=headers)
        else:
            response = client.post(path, json=body, headers=headers)
    if api_key != WORKSPACE_SECRET:
        assert response.status_code == 401, response.text
    else:
        assert response.status_code in {200, 400, 422}, response.text


ADMIN_KEY = "fuzz-admin-key-0123456789abcdef"


@pytest.fixture(scope="module")
def admin_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    server = ServiceProcess(
        tmp_path_factory.mktemp("admin-fuzz"), env={"ADMIN_API_KEY": ADMIN_KEY}
    ).start()
    yield server
    server.stop()


@FUZZ
@given(
    caller=st.text(min_size=1, max_size=30),
    key=st.one_of(st.none(), st.text(max_size=40), st.just(ADMIN_KEY)),
    method=st.sampled_from(["GET", "DELETE"]),
)
def test_admin_endpoints_never_answer_500(
    admin_service: ServiceProcess, caller: str, key: str | None, method: str
) -> None:
    path = f"/admin/callers/{quote(caller, safe='')}" + ("/export" if method == "GET" else "")
    headers = {} if key is None else {"X-Admin-Key": header_value(key)}
    with httpx.Client(base_url=admin_service.url, timeout=30) as client:
        response = client.request(method, path, headers=headers)
    # 404: not a caller route; 307: Starlette's trailing-slash redirect ("x/" decodes to it)
    if key != ADMIN_KEY:
        assert response.status_code in {401, 404, 307}, response.text
    else:
        assert response.status_code in {200, 400, 404, 307}, response.text  # 400: blank caller


# Poison values ------------------------------------------------------------------------------
# Numbers of every range and kind (NaN, infinities, integers beyond 64 bits), text, and
# parts of the wrong type, put anywhere in an otherwise valid call.
poison_numbers = (
    st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([10**15, -1, 0, 1e300, -1e300, 2**63, 2**64 + 1])
)
poison_parts = st.recursive(
    st.none() | st.booleans() | poison_numbers | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=8,
)
poison_values = poison_numbers | poison_parts  # numbers half the time: most paths hold one
POISON_PATHS = [
    ("event_timestamp",),
    ("data", "metadata"),
    ("data", "metadata", "start_time_unix_secs"),
    ("data", "metadata", "call_duration_secs"),
    ("data", "metadata", "main_language"),
    ("data", "agent_id"),
    ("data", "agent_name"),
    ("data", "analysis"),
    ("data", "analysis", "transcript_summary"),
    ("data", "analysis", "call_summary_title"),
    ("data", "analysis", "data_collection_results"),
    ("data", "analysis", "data_collection_results", "caller_name"),
    ("data", "analysis", "data_collection_results", "next_call_greeting", "value"),
    ("data", "conversation_initiation_client_data"),
    ("data", "conversation_initiation_client_data", "dynamic_variables"),
    ("data", "conversation_initiation_client_data", "dynamic_variables", "caller_name"),
    ("data", "transcript", 0),
    ("data", "transcript", 0, "message"),
    ("data", "transcript", 0, "role"),
    ("data", "transcript", 0, "time_in_call_secs"),
    ("data", "transcript", 1, "tool_calls"),
]
poisonings = st.lists(
    st.tuples(st.sampled_from(POISON_PATHS), poison_values), min_size=1, max_size=4
)


def poisoned(payload: dict[str, Any], changes: list[tuple[tuple[Any, ...], Any]]) -> dict[str, Any]:
    """`payload` with each change applied where its path still leads (an earlier change
    may have replaced a parent with something else)."""
    for path, value in changes:
        target: Any = payload
        for part in path[:-1]:
            try:
                target = target[part]
            except (KeyError, IndexError, TypeError):
                target = None
                break
        key = path[-1]
        if (isinstance(target, dict) and isinstance(key, str)) or (
            isinstance(target, list) and isinstance(key, int) and len(target) > key
        ):
            target[key] = value
    return payload


def fixture_call(conversation_id: str, caller: str) -> dict[str, Any]:
    return transcription(
        conversation_id,
        caller,
        turns=[("agent", "Brightside Dental, hello."), ("user", "My crown came loose again.")],
    )


@settings(max_examples=400, deadline=None)
@given(changes=poisonings, now=st.floats(min_value=1.6e9, max_value=2.5e9))
def test_any_poisoned_call_gives_a_checked_record_its_memories_and_its_digest(
    changes: list[tuple[tuple[Any, ...], Any]], now: float
) -> None:
    payload = poisoned(fixture_call("conv_fuzz", "+14155550123"), changes)
    record = CallRecord.from_payload(payload, now=now)
    for timestamp in (record.started_at, record.event_timestamp):
        assert timestamp is None or EARLIEST_TIMESTAMP <= timestamp <= now + 86_400
    assert len(record.turns) <= MAX_TURNS
    assert sum(len(turn.message) for turn in record.turns) <= MAX_CALL_CHARS
    for turn in record.turns:
        assert isinstance(turn.message, str) and turn.message
        offset = turn.time_in_call_secs
        assert offset is None or 0 <= offset <= 86_400
    for value in [*record.collected.values(), *record.dynamic_variables.values()]:
        assert isinstance(value, str | int | float | bool)
        assert not isinstance(value, float) or math.isfinite(value)
    memories = record_memories("+14155550123", record)
    for memory in memories:
        assert math.isfinite(memory.created_at)
        encode(memory.metadata)  # storable
    digest = digest_record(record)
    encode(digest.facts)
    # Building it once more gives the same record: nothing depends on chance.
    assert CallRecord.from_payload(payload, now=now) == record


@pytest.fixture(scope="module")
def poison_service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    server = ServiceProcess(
        tmp_path_factory.mktemp("poison-fuzz"),
        env={"RETRY_BASE_DELAY_SECONDS": "0.05", "PENDING_SWEEP_INTERVAL_SECONDS": "0.2"},
    ).start()
    yield server
    server.stop()


_fuzz_calls = itertools.count()


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(changes=poisonings)
def test_a_poisoned_signed_call_never_breaks_its_callers_search_or_greeting(
    poison_service: ServiceProcess, changes: list[tuple[tuple[Any, ...], Any]]
) -> None:
    number = next(_fuzz_calls)
    caller = f"+1415556{number % 10_000:04d}"
    payload = poisoned(fixture_call(f"conv_fuzz_{number}", caller), changes)
    body = json.dumps(payload).encode()  # NaN and Infinity as a careless sender writes them
    with poison_service.client() as client:
        response = client.post("/webhooks/post-call", content=body, headers=signed_headers(body))
        assert response.status_code == 200, response.text
        assert response.json()["status"] in {"received", "queued", "quarantined"}
        pending = poison_service.data_dir / "webhooks" / "_pending"
        # Stored or quarantined, never left to be retried for ever.
        wait_until(lambda: not list(pending.iterdir()), timeout=30)
        found = client.post(
            "/webhooks/search-data",
            json={"query": "crown loose", "user_id": caller},
            headers={"X-Api-Key": WORKSPACE_SECRET},
        )
        assert found.status_code == 200, found.text
        answer = client.post(
            "/webhooks/client-data",
            json={"caller_id": caller},
            headers={"X-Api-Key": WORKSPACE_SECRET},
        )
        assert answer.status_code == 200, answer.text


# Concurrency --------------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(
    words=st.lists(
        st.text(alphabet="abcdefghijklmnopqrstuvwxyz'", min_size=1, max_size=14),
        min_size=50,
        max_size=300,
    )
)
def test_tokenizing_from_eight_threads_at_once_gives_the_single_thread_terms(
    words: list[str],
) -> None:
    text = " ".join(words)
    expected = [
        stemmer.stemWord(word)
        for stemmer in [snowballstemmer.stemmer("english")]
        for word in ranking._WORD.findall(text.lower())
        if word not in ranking.STOP_WORDS
    ]
    ranking._stem.cache_clear()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(lambda _: ranking.tokenize(text), range(8)))
    finally:
        sys.setswitchinterval(interval)
    assert all(result == expected for result in results)


@settings(
    max_examples=5,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    starts=st.lists(
        st.lists(st.integers(min_value=1_700_000_000, max_value=1_760_000_000), max_size=4),
        min_size=1,
        max_size=6,
    ).filter(lambda calls: any(calls))
)
def test_concurrent_deliveries_leave_each_profile_with_every_stored_call(
    poison_service: ServiceProcess, starts: list[list[int]]
) -> None:
    batch = next(_fuzz_calls)
    payloads = []
    for caller_number, calls in enumerate(starts):
        for call_number, start in enumerate(calls):
            payload = fixture_call(
                f"conv_race_{batch}_{caller_number}_{call_number}",
                f"+1415557{batch % 100:02d}{caller_number:02d}",
            )
            payload["data"]["metadata"]["start_time_unix_secs"] = start
            payloads.append(payload)

    async def deliver_all() -> list[int]:
        async with httpx.AsyncClient(base_url=poison_service.url, timeout=60) as client:

            async def send(payload: dict[str, Any]) -> int:
                body = json.dumps(payload).encode()
                response = await client.post(
                    "/webhooks/post-call", content=body, headers=signed_headers(body)
                )
                return response.status_code

            return await asyncio.gather(*(send(payload) for payload in payloads))

    assert set(asyncio.run(deliver_all())) == {200}
    pending = poison_service.data_dir / "webhooks" / "_pending"
    wait_until(lambda: not list(pending.iterdir()), timeout=60)
    with sqlite3.connect(poison_service.data_dir / "memory.sqlite3") as connection:
        for caller_number, calls in enumerate(starts):
            if not calls:
                continue
            caller = f"+1415557{batch % 100:02d}{caller_number:02d}"
            (blob,) = connection.execute(
                "SELECT profile FROM caller_profiles WHERE user_id = ?", (caller,)
            ).fetchone()
            profile = decode(bytes(blob))
            assert profile["call_count"] == len(calls)
            assert profile["last_call_at"] == max(calls)
