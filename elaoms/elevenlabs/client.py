"""An async client for the few ElevenLabs API calls this service makes.

Agent profiles are fetched in the background with one short attempt (the next refresh is
the retry); the conversation calls serve backfills, which retry 429 and 5xx with backoff
because ElevenLabs limits concurrent requests per plan.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import quote

import httpx
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from elaoms import __version__
from elaoms.config import Settings
from elaoms.retries import retryable_status

logger = logging.getLogger(__name__)

# An agent or a conversation is tens of kilobytes; an answer far larger is not read whole
# (a misconfigured base URL or a hostile endpoint must not fill the worker's memory).
MAX_RESPONSE_BYTES = 16 * 1024 * 1024


class ElevenLabsError(RuntimeError):
    """The API could not be reached or did not answer as expected."""

    def __init__(
        self, message: str, status_code: int | None = None, *, retryable: bool | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        # Network errors (no status) are worth another try; most HTTP errors are not.
        self.retryable = (
            retryable
            if retryable is not None
            else (status_code is None or retryable_status(status_code))
        )


class ElevenLabsClient:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: float = 2.0,
        retry_attempts: int = 5,
        retry_base_delay: float = 1.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self.retry_attempts = retry_attempts
        self.retry_base_delay = retry_base_delay
        self._http: httpx.AsyncClient | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> ElevenLabsClient:
        return cls(
            settings.elevenlabs_api_base_url,
            settings.elevenlabs_api_key,
            timeout=settings.elevenlabs_api_timeout_seconds,
        )

    @property
    def configured(self) -> bool:
        return bool(self.api_key)

    async def get_agent(self, agent_id: str) -> dict[str, Any]:
        """GET /v1/convai/agents/{agent_id}: one attempt within the client's timeout."""
        return await self._request(f"/v1/convai/agents/{_segment(agent_id)}")

    async def list_conversations(
        self, cursor: str | None = None, agent_id: str | None = None, page_size: int = 100
    ) -> dict[str, Any]:
        """One page: `{"conversations": [...], "has_more": bool, "next_cursor": str|None}`."""
        params: dict[str, str | int] = {"page_size": page_size}
        if cursor:
            params["cursor"] = cursor
        if agent_id:
            params["agent_id"] = agent_id
        return await self._with_retries("/v1/convai/conversations", params)

    async def get_conversation(self, conversation_id: str) -> dict[str, Any]:
        """One conversation, in the shape of a `post_call_transcription`'s `data`."""
        return await self._with_retries(f"/v1/convai/conversations/{_segment(conversation_id)}")

    async def aclose(self) -> None:
        if self._http is not None:
            client, self._http = self._http, None
            await client.aclose()

    # Internals ---------------------------------------------------------------------------
    def _client(self) -> httpx.AsyncClient:
        if self._http is None:
            # Created on first use so it belongs to the event loop that uses it (the CLI
            # builds services outside any loop).
            self._http = httpx.AsyncClient(
                base_url=self.base_url,
                timeout=httpx.Timeout(self.timeout),
                headers={"xi-api-key": self.api_key, "user-agent": f"elaoms/{__version__}"},
            )
        return self._http

    async def _request(self, path: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        if not self.api_key:
            raise ElevenLabsError("ELEVENLABS_API_KEY is not set", retryable=False)
        try:
            async with self._client().stream("GET", path, params=params) as response:
                content = await _bounded_read(response, MAX_RESPONSE_BYTES)
        except httpx.HTTPError as error:
            raise ElevenLabsError(f"GET {path}: {type(error).__name__} {error}".strip()) from error
        if content is None:
            raise ElevenLabsError(
                f"GET {path}: answer larger than {MAX_RESPONSE_BYTES} bytes", retryable=False
            )
        if response.status_code != 200:
            text = content[:200].decode("utf-8", "replace")
            raise ElevenLabsError(
                f"GET {path}: HTTP {response.status_code} {text}", response.status_code
            )
        try:
            body = json.loads(content)
        except ValueError as error:
            raise ElevenLabsError(f"GET {path}: answer is not JSON", retryable=True) from error
        if not isinstance(body, dict):
            raise ElevenLabsError(f"GET {path}: answer is not a JSON object", retryable=False)
        return body

    async def _with_retries(
        self, path: str, params: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(self.retry_attempts),
            wait=wait_exponential(multiplier=self.retry_base_delay, max=30),
            retry=retry_if_exception(
                lambda error: isinstance(error, ElevenLabsError) and error.retryable
            ),
            before_sleep=lambda state: logger.info(
                "ElevenLabs API busy or failing (%s), retry %d",
                state.outcome.exception() if state.outcome else "?",
                state.attempt_number,
            ),
            reraise=True,
        ):
            with attempt:
                return await self._request(path, params)
        raise AssertionError("unreachable: tenacity reraises the last error")


def _segment(value: str) -> str:
    """One URL path segment: "/", "." and "%" in an id cannot reach another endpoint."""
    return quote(value, safe="")


async def _bounded_read(response: httpx.Response, limit: int) -> bytes | None:
    """The body, or None once it passes `limit` (the rest is not read)."""
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    content = bytearray()
    async for chunk in response.aiter_bytes():
        content += chunk
        if len(content) > limit:
            return None
    return bytes(content)
