"""Forget while the service is still working on the caller: nothing comes back afterwards."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from elaoms.memory.base import MemoryStore, StoreUnavailableError
from elaoms.memory.records import CallRecord
from elaoms.memory.units import call_memories
from elaoms.operations.cache import TwoLevelCache, caller_key
from elaoms.operations.privacy import forget_caller
from elaoms.services import Services

from conftest import WAIT_BOUND, ServiceProcess, make_settings, transcription, wait_until
from standins import LLMStandIn, RedisServer, ask, deliver

CALLER = "+13125550177"
ADMIN_KEY = "admin-key-for-forget-race-tests"


def profiles(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "memory.sqlite3") as connection:
        (count,) = connection.execute("SELECT COUNT(*) FROM caller_profiles").fetchone()
    return int(count)


def test_a_caller_forgotten_while_their_greeting_is_written_is_not_greeted_by_name_after(
    tmp_path: Path,
) -> None:
    writing, release = threading.Event(), threading.Event()

    def slow_greeting(messages: list[dict[str, Any]]) -> str:
        writing.set()
        release.wait(60)  # held until the caller has been forgotten
        return "Hi Maria, welcome back to Brightside Dental! How can I help today?"

    with LLMStandIn(slow_greeting) as llm:
        env = {
            "LLM_BASE_URL": llm.url,
            "LLM_API_KEY": "sk-test",
            "LLM_MODEL": "stand-in-1",
            "GREETING_DISCLOSURE": "name_and_topic",  # the LLM writes greetings only here
            "ADMIN_API_KEY": ADMIN_KEY,
        }
        server = ServiceProcess(tmp_path, env=env).start()
        try:
            with server.client() as client:
                payload = transcription("conv_forget_race", caller=CALLER)
                delivery = threading.Thread(target=deliver, args=(client, payload))
                delivery.start()
                assert writing.wait(WAIT_BOUND), "the greeting was never asked for"
                response = client.delete(
                    "/admin/callers/%2B13125550177", headers={"X-Admin-Key": ADMIN_KEY}
                )
                assert response.status_code == 200, response.text
                release.set()
                delivery.join(WAIT_BOUND)
                assert not delivery.is_alive()
                # The greeting's writer has finished, one way or the other.
                wait_until(
                    lambda: (
                        "profile of ***0177 prepared" in server.logs()
                        or "profile of ***0177 not kept" in server.logs()
                    )
                )
                answer, _ = ask(client, CALLER, payload["data"]["agent_id"])
                assert answer["dynamic_variables"]["call_count"] == 0
                assert "Maria" not in json.dumps(answer)
                assert profiles(server.data_dir) == 0
        finally:
            release.set()
            server.stop()


@asynccontextmanager
async def with_another_worker(
    tmp_path: Path, redis_server: RedisServer
) -> AsyncIterator[tuple[Services, TwoLevelCache]]:
    """This process's services on Redis, and another worker's view of Redis (read each
    time, no copy of its own)."""
    # The 50 ms default would send this process to its own cache on a loaded host: nothing
    # would reach Redis then, and the tests pass without showing anything.
    settings = make_settings(tmp_path, redis_url=redis_server.url, redis_timeout_ms=1000)
    services = Services.build(settings)
    other_worker = TwoLevelCache(redis_server.url, operation_timeout=1.0)
    try:
        yield services, other_worker
    finally:
        await other_worker.close()
        await services.close()


async def store_call(store: MemoryStore, conversation_id: str) -> None:
    payload = transcription(conversation_id, caller=CALLER)
    record = CallRecord.from_payload(payload)
    await store.add_call(CALLER, record, payload, call_memories(CALLER, payload))


def test_a_forget_between_a_profile_read_and_its_copy_into_redis_is_not_undone(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async def scenario() -> Any:
        async with with_another_worker(tmp_path, redis_server) as (services, other_worker):
            store = services.store
            await store_call(store, "conv_redis_race")
            await services.personalization.prepare_caller(CALLER)
            assert await other_worker.get(caller_key(CALLER), local_ttl=0) is not None
            # Cold: only the store has the profile, as on a replica that never saw the call.
            await services.personalization.cache.invalidate_caller(CALLER)
            read = store.get_caller_profile

            async def read_then_forget(user_id: str) -> dict[str, Any] | None:
                store.get_caller_profile = read  # type: ignore[method-assign]
                profile = await read(user_id)
                await forget_caller(services, user_id)  # lands between the read and the copy
                return profile

            store.get_caller_profile = read_then_forget  # type: ignore[method-assign]
            await services.personalization.caller_profile(CALLER)
            # What every worker's next client-data finds in Redis.
            return await other_worker.get(caller_key(CALLER), local_ttl=0)

    assert asyncio.run(scenario()) is None


def test_a_profile_cached_but_not_kept_does_not_outlive_a_forget_in_redis(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """The profile is cached before the store keeps it and checks for a forget: when the
    store fails then, the cached copy goes too (the forget may have come first, and no
    retry will come for a forgotten call)."""

    async def scenario() -> Any:
        async with with_another_worker(tmp_path, redis_server) as (services, other_worker):
            store, cache = services.store, services.personalization.cache
            cache_set = cache.set

            async def forget_then_set(key: str, value: Any, **options: Any) -> None:
                await forget_caller(services, CALLER)  # done while the greeting was written
                await cache_set(key, value, **options)

            async def store_down(*args: Any, **kwargs: Any) -> Any:
                raise StoreUnavailableError("sqlite: disk I/O error")

            await store_call(store, "conv_cached_not_kept")
            cache.set = forget_then_set  # type: ignore[method-assign]
            store.keep_caller_profile = store_down  # type: ignore[method-assign]
            with pytest.raises(StoreUnavailableError):
                await services.personalization.prepare_caller(CALLER)
            return await other_worker.get(caller_key(CALLER), local_ttl=0)

    assert asyncio.run(scenario()) is None
