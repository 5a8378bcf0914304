"""The ElevenLabs API client against the local stand-in: paging, 429 retries, errors."""

from __future__ import annotations

import asyncio

import pytest

from elaoms.elevenlabs.client import ElevenLabsClient, ElevenLabsError

from conftest import transcription
from standins import AGENT_ID, ElevenLabsStandIn


def test_conversations_are_paged_and_429_is_retried() -> None:
    with ElevenLabsStandIn() as api:
        for index in range(3):
            data = transcription(f"conv_page_{index}")["data"]
            data["metadata"]["start_time_unix_secs"] = 1763000000 + index
            api.add_conversation(data)
        api.rate_limited = 2  # ElevenLabs' too_many_concurrent_requests, twice

        async def scenario() -> tuple[list[str], dict, int]:
            client = ElevenLabsClient(api.url, api.api_key, retry_base_delay=0.01)
            try:
                ids, cursor = [], None
                while True:
                    page = await client.list_conversations(cursor, AGENT_ID, page_size=2)
                    ids += [item["conversation_id"] for item in page["conversations"]]
                    if not page["has_more"]:
                        break
                    cursor = page["next_cursor"]
                one = await client.get_conversation("conv_page_1")
                requests = len(api.requests)
                with pytest.raises(ElevenLabsError) as missing:
                    await client.get_conversation("conv_nope")
                assert missing.value.status_code == 404 and not missing.value.retryable
                assert len(api.requests) == requests + 1  # a 404 is not retried
                return ids, one, requests
            finally:
                await client.aclose()

        ids, one, requests = asyncio.run(scenario())
        assert ids == ["conv_page_2", "conv_page_1", "conv_page_0"]
        assert one["conversation_id"] == "conv_page_1" and one["transcript"]
        assert requests == 2 + 2 + 1  # two 429s, two pages, one conversation
        assert all(headers["xi-api-key"] == api.api_key for _, _, headers in api.requests)


def test_without_an_api_key_nothing_is_sent() -> None:
    async def scenario() -> None:
        client = ElevenLabsClient("http://127.0.0.1:9", "")
        with pytest.raises(ElevenLabsError, match="ELEVENLABS_API_KEY"):
            await client.get_agent(AGENT_ID)

    asyncio.run(scenario())
