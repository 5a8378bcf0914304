"""Profiles prepared from call digests: the same profile whatever order calls arrive in,
databases from before digests, digests at rest, and the greeting fact check over digests."""

from __future__ import annotations

import asyncio
import json
import random
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from cryptography.fernet import Fernet

from elaoms.config import Settings
from elaoms.crypto import PayloadCipher
from elaoms.memory.base import CallReceipt, HistoryRead
from elaoms.memory.digest import digest_call
from elaoms.memory.records import CallRecord
from elaoms.memory.sqlite import SQLiteStore
from elaoms.memory.units import call_memories
from elaoms.personalization.profile import PROFILE_READ
from elaoms.services import Services

from conftest import load_fixture, make_settings, transcription

T = TypeVar("T")
CALLER = "+14155550123"
DAY = 86_400
START = 1_763_000_000


def visit(number: int, **analysis: Any) -> dict[str, Any]:
    """A call of the caller `number` days after START, titled after its number."""
    payload = transcription(
        f"conv_visit_{number}",
        CALLER,
        call_summary_title=f"Visit {number}",
        transcript_summary=f"The caller came about visit {number}.",
        **analysis,
    )
    payload["data"]["metadata"]["start_time_unix_secs"] = START + number * DAY
    return payload


def with_services(data_dir: Path, work: Callable[[Services], Awaitable[T]], **settings: Any) -> T:
    async def scenario() -> T:
        services = Services.build(make_settings(data_dir, **settings))
        try:
            result = await work(services)
            await services.ingest.drain(timeout=None)  # profile hooks, however slow the host
            return result
        finally:
            await services.close()

    return asyncio.run(scenario())


def store_calls(data_dir: Path, payloads: list[dict[str, Any]]) -> None:
    async def work(services: Services) -> None:
        for payload in payloads:
            await services.store.add_call(
                CALLER, CallRecord.from_payload(payload), payload, call_memories(CALLER, payload)
            )

    with_services(data_dir, work)


def prepare(data_dir: Path, **settings: Any) -> dict[str, Any]:
    # The greetings checked here are written only at the fullest disclosure.
    settings.setdefault("greeting_disclosure", "name_and_topic")
    profile = with_services(
        data_dir, lambda services: services.personalization.prepare_caller(CALLER), **settings
    )
    assert profile is not None
    return profile | {"updated_at": 0}


def test_the_profile_is_the_same_whatever_order_the_calls_arrived_in(tmp_path: Path) -> None:
    calls = [visit(number) for number in range(8)]
    calls[2]["data"]["analysis"]["data_collection_results"]["caller_name"]["value"] = "Maria L."
    shuffled = calls[:]
    random.Random(8).shuffle(shuffled)

    store_calls(tmp_path / "in_order", calls)
    store_calls(tmp_path / "shuffled", shuffled)
    store_calls(tmp_path / "shuffled", calls[:3])  # replays store nothing new

    in_order = prepare(tmp_path / "in_order")
    assert in_order == prepare(tmp_path / "shuffled")
    assert in_order["call_count"] == 8
    assert in_order["last_call_title"] == "Visit 7"
    assert [entry["title"] for entry in in_order["recent_summaries"]] == [
        f"Visit {number}" for number in (7, 6, 5, 4, 3)
    ]
    assert in_order["name"] == "Maria Lopez"  # the newest call's data collection


def test_a_database_from_before_digests_gives_the_same_profile(tmp_path: Path) -> None:
    calls = [visit(number) for number in range(4)]
    store_calls(tmp_path / "current", calls)
    store_calls(tmp_path / "legacy", calls)
    legacy = tmp_path / "legacy" / "memory.sqlite3"
    with sqlite3.connect(legacy) as connection:  # what a database of the last release holds
        connection.execute("DROP TABLE call_digests")

    assert prepare(tmp_path / "legacy") == prepare(tmp_path / "current")
    with sqlite3.connect(legacy) as connection:  # digested once, kept for the next time
        assert connection.execute("SELECT count(*) FROM call_digests").fetchone()[0] == 4


def test_a_digest_of_another_version_is_recomputed_from_the_payload(tmp_path: Path) -> None:
    store_calls(tmp_path, [visit(0)])
    path = tmp_path / "memory.sqlite3"
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE call_digests SET version = 0, facts = ?", (b"{}",))

    (digest,) = asyncio.run(SQLiteStore(path).list_call_digests(CALLER))

    assert digest.facts == digest_call(visit(0)).facts


def test_digests_of_calls_forgotten_by_an_older_version_are_deleted(tmp_path: Path) -> None:
    store_calls(tmp_path, [visit(0), visit(1)])
    path = tmp_path / "memory.sqlite3"
    with sqlite3.connect(path) as connection:  # what `forget` deleted before digests existed
        for table in ("memories", "calls", "caller_profiles"):
            connection.execute(f"DELETE FROM {table} WHERE user_id = ?", (CALLER,))
    store_calls(tmp_path, [visit(2)])  # the caller calls again

    history = asyncio.run(SQLiteStore(path).call_history(CALLER, recent=5))

    assert [digest.conversation_id for digest in history.recent] == ["conv_visit_2"]
    with sqlite3.connect(path) as connection:
        assert connection.execute("SELECT count(*) FROM call_digests").fetchone()[0] == 1


def test_digests_are_encrypted_at_rest_like_the_payloads(tmp_path: Path) -> None:
    cipher = PayloadCipher(Fernet.generate_key().decode(), enabled=True)
    path = tmp_path / "memory.sqlite3"
    store = SQLiteStore(path, cipher=cipher)
    payload = visit(0)
    asyncio.run(
        store.add_call(
            CALLER, CallRecord.from_payload(payload), payload, call_memories(CALLER, payload)
        )
    )

    with sqlite3.connect(path) as connection:
        facts, words, marks = connection.execute(
            "SELECT facts, words, marks FROM call_digests"
        ).fetchone()
    assert b"Maria" not in facts and b"sofia" not in words
    assert marks == "data_collection transcript"  # which sources, never what they say
    (digest,) = asyncio.run(SQLiteStore(path, cipher=cipher).list_call_digests(CALLER, words=True))
    assert digest.facts["names"]["data_collection"] == "Maria Lopez"
    assert digest.words is not None and "sofia" in digest.words


# The greeting the agent's data collection wrote, checked against every call ------------
GREETING_ITEM = "next_call_greeting"


def with_greeting(payload: dict[str, Any], greeting: str) -> dict[str, Any]:
    results = payload["data"]["analysis"]["data_collection_results"]
    results[GREETING_ITEM] = {"value": greeting}
    return payload


def test_a_greeting_may_repeat_words_from_any_earlier_call(tmp_path: Path) -> None:
    calls = [visit(number) for number in range(9)]
    calls[0]["data"]["transcript"][1]["message"] = "My dog Biscuit bit my retainer, can you fix it?"
    written = "Hi Maria! Welcome back. Is the retainer Biscuit chewed fixed now?"
    store_calls(tmp_path, [*calls[:-1], with_greeting(calls[-1], written)])

    profile = prepare(tmp_path)

    assert (profile["greeting"], profile["greeting_source"]) == (written, "data_collection")


@pytest.mark.parametrize(
    "greeting",
    [
        "Hi Maria! Your root canal with Dr. Smith is on Friday.",  # in no call at all
        "Hi Maria! Welcome back, Nugget says hello.",  # only in an earlier greeting item
    ],
)
def test_a_greeting_with_a_word_absent_from_the_callers_calls_is_refused(
    tmp_path: Path, greeting: str
) -> None:
    calls = [visit(number) for number in range(6)]
    with_greeting(calls[0], "Hi Maria, Nugget says hello.")
    store_calls(tmp_path, [*calls[:-1], with_greeting(calls[-1], greeting)])

    profile = prepare(tmp_path)

    assert profile["greeting_source"] == "template"
    assert profile["greeting"].startswith("Hi Maria, welcome back")


def test_a_withheld_number_still_gets_no_profile(tmp_path: Path) -> None:
    payload = transcription("conv_withheld", "anonymous")

    async def work(services: Services) -> dict[str, Any] | None:
        await services.store.add_call(
            "anonymous",
            CallRecord.from_payload(payload),
            payload,
            call_memories("anonymous", payload),
        )
        return await services.personalization.prepare_caller("anonymous")

    assert with_services(tmp_path, work) is None


class CountingStore(SQLiteStore):
    """A real SQLite store that counts the hook's own history reads and records what each
    `add_call` was asked to read; `failing_reads` makes the first such read fail."""

    def __init__(self, *args: Any, failing_reads: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.history_reads = 0
        self.reads_asked: dict[str, HistoryRead | None] = {}
        self.receipts: list[CallReceipt] = []
        if failing_reads:
            read_history = self.tables.read_history

            def locked_once(*args: Any) -> Any:  # the read with the insert, not the hook's
                self.tables.read_history = read_history  # type: ignore[method-assign]
                raise sqlite3.OperationalError("database is locked")

            self.tables.read_history = locked_once  # type: ignore[method-assign]

    async def add_call(self, user_id: str, call: CallRecord, *rest: Any) -> CallReceipt:
        read = next((part for part in rest if isinstance(part, HistoryRead)), None)
        self.reads_asked[call.conversation_id] = read
        receipt = await super().add_call(user_id, call, *rest)
        self.receipts.append(receipt)
        return receipt

    async def call_history(self, *args: Any, **kwargs: Any) -> Any:
        self.history_reads += 1
        return await super().call_history(*args, **kwargs)


def deliver_to(store: CountingStore, settings: Settings, payloads: list[dict[str, Any]]) -> None:
    async def scenario() -> None:
        services = Services.build(settings, store=store)
        try:
            for payload in payloads:
                body = json.dumps(payload).encode()
                assert (await services.ingest.receive(body)).status == "received"
            await services.ingest.drain(timeout=None)
        finally:
            await services.close()

    asyncio.run(scenario())


def test_a_delivery_prepares_its_profile_from_the_calls_read_with_its_insert(
    tmp_path: Path,
) -> None:
    # The post-call hook read the caller's calls again after `add_call` (a trip to the
    # store's thread, a round trip on PostgreSQL); they now come with the insert.
    settings = make_settings(tmp_path)
    store = CountingStore(settings.sqlite_path)
    failure = load_fixture("call_initiation_failure")
    failure["data"]["conversation_id"] = "conv_not_answered"
    deliver_to(
        store,
        settings,
        [visit(0), visit(1), visit(2), transcription("conv_withheld", "anonymous"), failure],
    )

    profile = asyncio.run(store.get_caller_profile(CALLER))
    assert profile is not None and profile["call_count"] == 3
    assert profile["last_call_title"] == "Visit 2"
    assert store.history_reads == 0
    # Read only where the hook prepares a profile: not for nobody, nor for a failed call.
    assert store.reads_asked["conv_visit_2"] == PROFILE_READ
    assert store.reads_asked["conv_withheld"] is None
    assert store.reads_asked["conv_not_answered"] is None


def test_a_failed_read_after_the_insert_fails_neither_the_call_nor_its_profile(
    tmp_path: Path,
) -> None:
    # The call is committed before the read: a failed read that failed `add_call` made
    # its retry find the call already there (`created` False), so the caller's search
    # index was never told of it.
    settings = make_settings(tmp_path)
    store = CountingStore(settings.sqlite_path, failing_reads=True)
    deliver_to(store, settings, [visit(0)])

    assert [(receipt.created, receipt.history) for receipt in store.receipts] == [(True, None)]
    assert store.history_reads == 1  # the hook read for itself
    profile = asyncio.run(store.get_caller_profile(CALLER))
    assert profile is not None and profile["call_count"] == 1
