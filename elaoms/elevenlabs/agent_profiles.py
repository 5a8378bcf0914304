"""Agent configurations, kept hot: process dict, then Redis, then the memory store.

A call is never held up by the ElevenLabs API. A cached profile is served as it is, and
one older than AGENT_PROFILE_TTL is refreshed in the background while it keeps serving.
Only an agent never seen before is waited for, briefly, because without its profile we
cannot name the placeholders its prompt needs.

An operator without API access can supply configurations as files instead
(`AGENT_CONFIG_DIR/<agent_id>.json`, the body of `GET /v1/convai/agents/{id}` as exported
from ElevenLabs); a file wins over the API. The demo agent of `elaoms demo` is bundled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from elaoms.elevenlabs.client import ElevenLabsClient, ElevenLabsError
from elaoms.memory.base import MemoryStore
from elaoms.operations.cache import TwoLevelCache
from elaoms.payloads import dig

logger = logging.getLogger(__name__)

AGENT_KEY_PREFIX = "elaoms:agent:"
# The agent `elaoms demo` delivers calls for: its configuration ships with the package.
DEMO_AGENTS_DIR = Path(__file__).resolve().parents[1] / "demo" / "agents"

# ElevenLabs agent ids are `agent_` and 28 letters and digits; older ones are 20 letters
# and digits. Checked before an id is put in a URL or a cache key: "../../../v1/user" as an
# agent id made the service call GET /v1/user with the operator's API key.
_AGENT_ID = re.compile(r"[A-Za-z0-9_]{1,100}")
# Agents remembered as unknown or failing, at most: the oldest are forgotten first.
_MAX_REMEMBERED = 10_000


def valid_agent_id(agent_id: str) -> bool:
    return bool(_AGENT_ID.fullmatch(agent_id))


class _TokenBucket:
    """At most `per_minute` events a minute, in bursts of up to `burst`."""

    def __init__(self, per_minute: float, burst: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, burst)
        self.tokens = self.capacity
        self.updated = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


class _Expiring:
    """Ids remembered until a deadline; bounded, the oldest forgotten first."""

    def __init__(self, limit: int = _MAX_REMEMBERED) -> None:
        self.limit = limit
        self._until: OrderedDict[str, float] = OrderedDict()

    def remember(self, key: str, seconds: float) -> None:
        self._until.pop(key, None)
        self._until[key] = time.monotonic() + seconds
        while len(self._until) > self.limit:
            self._until.popitem(last=False)

    def forget(self, key: str) -> None:
        self._until.pop(key, None)

    def __contains__(self, key: object) -> bool:
        until = self._until.get(key) if isinstance(key, str) else None
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        del self._until[key]  # type: ignore[arg-type]
        return False


Scalar = str | int | float | bool


@dataclass(frozen=True, slots=True)
class AgentProfile:
    """What personalization needs from `GET /v1/convai/agents/{id}`."""

    agent_id: str
    name: str = ""
    first_message: str = ""
    language: str = ""
    voice_id: str = ""
    placeholders: dict[str, Scalar] = field(default_factory=dict)
    allows_first_message: bool = False
    allows_language: bool = False
    allows_voice_id: bool = False
    fetched_at: float = 0.0

    @classmethod
    def from_api(cls, agent_id: str, raw: dict[str, Any]) -> AgentProfile:
        agent = dig(raw, "conversation_config", "agent") or {}
        placeholders = dig(agent, "dynamic_variables", "dynamic_variable_placeholders") or {}
        overrides = dig(raw, "platform_settings", "overrides", "conversation_config_override")
        return cls(
            agent_id=str(raw.get("agent_id") or agent_id),
            name=str(raw.get("name") or ""),
            first_message=str(agent.get("first_message") or ""),
            language=str(agent.get("language") or ""),
            voice_id=str(dig(raw, "conversation_config", "tts", "voice_id") or ""),
            placeholders={
                str(name): value if isinstance(value, Scalar) else ""
                for name, value in placeholders.items()
                # ElevenLabs fills system__ variables itself and refuses custom ones.
                if not str(name).startswith("system__")
            },
            allows_first_message=dig(overrides, "agent", "first_message") is True,
            allows_language=dig(overrides, "agent", "language") is True,
            allows_voice_id=dig(overrides, "tts", "voice_id") is True,
            fetched_at=float(raw.get("_fetched_at") or 0.0),
        )


class AgentProfiles:
    def __init__(
        self,
        client: ElevenLabsClient,
        store: MemoryStore,
        cache: TwoLevelCache,
        *,
        ttl: float = 3600,
        failure_backoff: float = 30.0,
        min_age_after_call: float = 60.0,
        unknown_ttl: float = 600.0,
        lookups_per_minute: float = 30.0,
        config_dir: Path | None = None,
    ) -> None:
        self.client = client
        self.files = AgentConfigFiles(config_dir)
        self.store = store
        self.cache = cache
        self.ttl = ttl
        self.failure_backoff = failure_backoff
        self.min_age_after_call = min(min_age_after_call, ttl)
        self._inflight: dict[str, asyncio.Task[AgentProfile | None]] = {}
        self.unknown_ttl = unknown_ttl
        # Both bounded: 20,000 made-up agent ids cost 19,999 API calls and grew these.
        self._failing = _Expiring()
        self._unknown = _Expiring()
        self._lookups = _TokenBucket(lookups_per_minute, burst=max(1.0, lookups_per_minute / 6))
        self._warned_unconfigured = False
        self._warned_rate_at = float("-inf")
        # The last profile parsed per agent, with the raw dict it came from: the local
        # cache hands back that same dict until it changes, so each call is not a parse.
        self._parsed: dict[str, tuple[dict[str, Any], AgentProfile]] = {}

    async def get(self, agent_id: str, *, wait: float = 0.0) -> AgentProfile | None:
        """The known profile at once (a stale one triggers a background refresh). An agent
        never seen is fetched, waiting at most `wait` seconds for it."""
        if not valid_agent_id(agent_id):
            return None
        if (from_file := self.files.get(agent_id)) is not None:
            return from_file
        profile = await self._cached(agent_id)
        if profile is None:
            profile = await self._stored(agent_id)
        if profile is not None:
            if time.time() - profile.fetched_at > self.ttl:
                self._refresh_in_background(agent_id)
            return profile
        task = self._refresh_in_background(agent_id, unseen=True)
        if task is None or wait <= 0:
            return None
        try:
            return await asyncio.wait_for(asyncio.shield(task), wait)
        except Exception:  # too slow or failed: the fetch goes on, this call does without
            return None

    def peek(self, agent_id: str) -> AgentProfile | None:
        """This process's copy, without any I/O (last-resort answers)."""
        if not valid_agent_id(agent_id):
            return None
        if (from_file := self.files.peek(agent_id)) is not None:
            return from_file
        return self._profile(agent_id, self.cache.peek(AGENT_KEY_PREFIX + agent_id))

    async def after_call(self, agent_id: str) -> AgentProfile | None:
        """The profile to prepare a greeting with: fetched now unless fetched very recently,
        so configuration changes reach the next call. Never raises."""
        if not valid_agent_id(agent_id):
            return None
        if (from_file := self.files.get(agent_id)) is not None:
            return from_file
        try:
            profile = await self._cached(agent_id) or await self._stored(agent_id)
        except Exception as error:
            logger.warning("agent profile %s not readable: %s", agent_id, error)
            profile = None
        if profile is not None and time.time() - profile.fetched_at < self.min_age_after_call:
            return profile
        task = self._refresh_in_background(agent_id, unseen=profile is None)
        if task is not None:
            with contextlib.suppress(Exception):
                return await asyncio.shield(task) or profile
        return profile

    async def refresh(self, agent_id: str) -> AgentProfile | None:
        """Fetch, then keep in the store and the cache. None when the API did not answer."""
        if not valid_agent_id(agent_id):
            return None
        try:
            raw = await self.client.get_agent(agent_id)
        except ElevenLabsError as error:
            # The API does not know this agent: not asked again for a long while.
            unknown = error.status_code in (400, 404, 422)
            backoff = self.unknown_ttl if unknown else self.failure_backoff
            (self._unknown if unknown else self._failing).remember(agent_id, backoff)
            logger.warning(
                "agent profile %s not fetched (%s); next try in %gs", agent_id, error, backoff
            )
            return None
        self._failing.forget(agent_id)
        self._unknown.forget(agent_id)
        fetched_at = time.time()
        try:
            await self.store.put_agent_profile(agent_id, raw, fetched_at)
        except Exception as error:  # the cache still serves it; the next refresh stores it
            logger.warning("agent profile %s not stored: %s", agent_id, error)
        raw = {**raw, "_fetched_at": fetched_at}
        await self.cache.set(AGENT_KEY_PREFIX + agent_id, raw, local_ttl=self.ttl)
        logger.info("agent profile %s refreshed", agent_id)
        return self._profile(agent_id, raw)

    async def close(self) -> None:
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    # Internals ---------------------------------------------------------------------------
    async def _cached(self, agent_id: str) -> AgentProfile | None:
        return self._profile(agent_id, await self.cache.get(AGENT_KEY_PREFIX + agent_id))

    def _profile(self, agent_id: str, raw: Any) -> AgentProfile | None:
        if not isinstance(raw, dict):
            return None
        parsed = self._parsed.get(agent_id)
        if parsed is not None and parsed[0] is raw:
            return parsed[1]
        profile = AgentProfile.from_api(agent_id, raw)
        self._parsed[agent_id] = (raw, profile)
        return profile

    async def _stored(self, agent_id: str) -> AgentProfile | None:
        raw = await self.store.get_agent_profile(agent_id)
        if not raw:
            return None
        await self.cache.set(AGENT_KEY_PREFIX + agent_id, raw, local_ttl=self.ttl)
        return self._profile(agent_id, raw)

    def _refresh_in_background(
        self, agent_id: str, *, unseen: bool = False
    ) -> asyncio.Task[AgentProfile | None] | None:
        """Start (or join) the one fetch of this agent; None when we should not fetch now.
        Fetches of agents never seen are rate-limited: anyone who can reach client-data
        can name agents, and each costs a call with the operator's API key."""
        if not self.client.configured:
            if not self._warned_unconfigured:
                self._warned_unconfigured = True
                logger.warning(
                    "ELEVENLABS_API_KEY is not set: agent profiles (placeholders, default "
                    "greeting, allowed overrides) are not fetched, so client-data sends no "
                    "first message for agent %s; set the key, or put the agent's exported "
                    "configuration in AGENT_CONFIG_DIR/<agent_id>.json",
                    agent_id,
                )
            return None
        task = self._inflight.get(agent_id)
        if task is not None:
            return task
        if agent_id in self._failing or agent_id in self._unknown:
            return None
        if unseen and not self._lookups.take():
            if time.monotonic() - self._warned_rate_at > 60:
                self._warned_rate_at = time.monotonic()
                logger.warning(
                    "agent profiles of unknown agents not fetched: more than the allowed "
                    "lookups per minute (AGENT_LOOKUPS_PER_MINUTE)"
                )
            return None
        task = asyncio.create_task(self.refresh(agent_id), name=f"agent-profile-{agent_id}")
        self._inflight[agent_id] = task
        task.add_done_callback(lambda _: self._inflight.pop(agent_id, None))
        return task


class AgentConfigFiles:
    """Agent configurations supplied as files (no API needed), read once per change.

    The demo agents bundled with the package do not change while it runs: their names
    are listed once and each is read once, so an agent that is not among them costs no
    disk access (a stat on the event loop for every delivery and client-data request
    before). Only AGENT_CONFIG_DIR is looked at on every call, for files added or changed."""

    def __init__(self, config_dir: Path | None) -> None:
        self.config_dir = config_dir
        self._bundled: frozenset[str] | None = None  # agent ids of DEMO_AGENTS_DIR
        # Per agent id: the file read, its modification time, and what it held.
        self._loaded: dict[str, tuple[Path, float, AgentProfile | None]] = {}

    def _bundled_ids(self) -> frozenset[str]:
        if self._bundled is None:
            try:
                names = [path.stem for path in DEMO_AGENTS_DIR.glob("*.json")]
            except OSError:
                names = []
            self._bundled = frozenset(names)
        return self._bundled

    def path_of(self, agent_id: str) -> Path | None:
        """The file holding this agent's configuration, if any."""
        if not valid_agent_id(agent_id):  # it becomes a file name
            return None
        if self.config_dir is not None:
            path = self.config_dir / f"{agent_id}.json"
            if path.is_file():
                return path
        if agent_id in self._bundled_ids():
            return DEMO_AGENTS_DIR / f"{agent_id}.json"
        return None

    def get(self, agent_id: str) -> AgentProfile | None:
        path = self.path_of(agent_id)
        if path is None:
            return None
        known = self._loaded.get(agent_id)
        if known is not None and known[0] == path and path.parent == DEMO_AGENTS_DIR:
            return known[2]  # bundled: read once
        try:
            changed = path.stat().st_mtime
            if known is not None and known[:2] == (path, changed):
                return known[2]
            raw = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(raw, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as error:
            logger.warning("agent configuration %s not readable: %s", path, error)
            return None
        # A file is as fresh as it is: never "stale", never refreshed from the API.
        profile = AgentProfile.from_api(agent_id, {**raw, "_fetched_at": float("inf")})
        self._loaded[agent_id] = (path, changed, profile)
        return profile

    def peek(self, agent_id: str) -> AgentProfile | None:
        """What was read already, without touching the disk."""
        known = self._loaded.get(agent_id)
        return known[2] if known is not None else None
