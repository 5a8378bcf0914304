"""Personalization: prepare each caller's profile after a call, answer client-data from it.

The two halves run at very different moments. `prepare_caller` runs after a call is
stored (the post-call hook): it reads the caller's calls, may call the ElevenLabs API and
an LLM, and writes the profile with the next greeting. `client_data` runs while the phone
rings: two cache lookups (caller, agent) and string assembly, under a hard deadline with a
valid default answer whatever fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from elaoms.config import GreetingDisclosure, Settings
from elaoms.elevenlabs.agent_profiles import AgentProfile, AgentProfiles
from elaoms.memory.base import CallDigest, CallHistory, CallReceipt, HistoryRead, MemoryStore
from elaoms.memory.digest import clean_value, vocabulary
from elaoms.memory.records import clamp_timestamp
from elaoms.memory.units import TRANSCRIPTION
from elaoms.operations.cache import TwoLevelCache, caller_key
from elaoms.personalization.greeting import (
    LLMGreetingWriter,
    acceptable,
    business_name,
    fact_terms,
    first_name,
    template_greeting,
)
from elaoms.personalization.profile import (
    PROFILE_READ,
    build_facts,
    call_vocabulary,
    caller_history,
    caller_identity,
    history_version,
    profiled,
    user_context,
)
from elaoms.personalization.schemas import (
    CLIENT_DATA_TYPE,
    ClientDataAnswer,
    ClientDataRequest,
    ClientDataResponse,
    Scalar,
)
from elaoms.phone import mask

if TYPE_CHECKING:
    from elaoms.services import Services

logger = logging.getLogger(__name__)

# Workers without Redis (or with Redis down) each keep their own copy of a caller's profile:
# short enough that a profile prepared by another worker is seen by the next call.
CALLER_LOCAL_TTL = 10.0
TEMPLATE_LANGUAGE = "en"
# Share of the client-data deadline an agent never seen before may be waited for.
COLD_AGENT_WAIT_SHARE = 0.6
# Calls read at a time when a greeting's words are looked for in the caller's calls.
WORDS_PAGE = 4
# Times a profile is prepared again when calls of the caller arrived meanwhile.
PREPARE_ROUNDS = 5


class PersonalizationService:
    def __init__(
        self,
        settings: Settings,
        store: MemoryStore,
        cache: TwoLevelCache,
        agents: AgentProfiles,
        llm: LLMGreetingWriter,
    ) -> None:
        self.settings = settings
        self.store = store
        self.cache = cache
        self.agents = agents
        self.llm = llm
        # A store other replicas write to (PostgreSQL) keeps its own copies of callers'
        # profiles, each dropped the moment any replica changes the caller; no copy is
        # kept here (it would greet a caller from before the call another replica just
        # stored: read-your-writes). Redis, when set, gets each profile prepared.
        self._shared_store = not store.caller_profiles_on_loop

    # After a call ------------------------------------------------------------------------
    async def on_call_stored(
        self, user_id: str, payload: dict[str, Any], receipt: CallReceipt
    ) -> None:
        """The post-call hook. A store failure raises, so the delivery stays pending and
        the profile is prepared on the retry; every other failure degrades instead."""
        if payload.get("type") == TRANSCRIPTION:
            await self.prepare_caller(user_id, receipt.history)

    def history_to_read(self, user_id: str, event_type: str) -> HistoryRead | None:
        """What `on_call_stored` reads of the caller's calls after such a call: the store
        reads it with the call's insert (`add_call`), not in a trip of its own."""
        return PROFILE_READ if event_type == TRANSCRIPTION and profiled(user_id) else None

    async def prepare_caller(
        self, user_id: str, history: CallHistory | None = None
    ) -> dict[str, Any] | None:
        """Rebuild the caller's profile and next greeting from their stored calls.

        Deliveries of one caller may be prepared at once, by several workers: each wrote
        the profile of the calls it had read, and the last to write won, even when it had
        read fewer calls. So after writing, the calls are read again, and a profile that
        missed one is prepared anew: the last profile written is then always checked
        against calls read after it was written, and reflects every stored call.

        `history`: the caller's calls as read after the call was stored (`add_call`'s
        receipt), so that they are not read again.
        """
        if not profiled(user_id):
            return None  # a withheld call is nobody's: it must not become a profile
        if history is None:
            history = await caller_history(self.store, user_id)
        profile: dict[str, Any] | None = None
        for _ in range(PREPARE_ROUNDS):
            if not history.count:
                return profile
            prepared = await self._prepare(user_id, history)
            if prepared is None:
                return await self._forgotten_meanwhile(user_id)
            profile, latest = prepared
            if history_version(latest) == history_version(history):
                break
            history = latest
        else:
            logger.warning(
                "profile of %s kept changing while it was prepared; the next call redoes it",
                mask(user_id),
            )
        return profile

    async def _prepare(
        self, user_id: str, history: CallHistory
    ) -> tuple[dict[str, Any], CallHistory] | None:
        """Write the profile of `history` to the store and the cache: (the profile, the
        caller's calls read after it was written); None when the call it was prepared
        from was forgotten meanwhile."""
        facts = build_facts(user_id, history)
        last = history.recent[0]
        agent = await self.agents.after_call(facts["agent_id"]) if facts["agent_id"] else None
        business = business_name(
            agent.first_message if agent else None, last.facts.get("first_agent_message")
        )
        greeting, source, language = await self._write_greeting(facts, last, agent, business)
        profile = {
            **facts,
            "greeting": greeting,
            "greeting_source": source,
            "greeting_language": language,
            "greeting_disclosure": self.settings.greeting_disclosure.value,
            "business_name": business,
            "user_context": user_context(facts, self.settings.user_context_max_chars),
            "updated_at": time.time(),
        }
        await self.cache.set(
            caller_key(user_id), profile, local_ttl=0.0 if self._shared_store else CALLER_LOCAL_TTL
        )
        try:
            kept = await self.store.keep_caller_profile(
                user_id, profile, last.conversation_id, PROFILE_READ
            )
        except BaseException:
            # Not kept, so not checked: a caller forgotten meanwhile must not stay cached.
            with contextlib.suppress(Exception):
                await self.cache.invalidate_caller(user_id)
            raise
        if kept.call_forgotten:
            # Forgotten while the greeting was written (an LLM takes seconds): what was just
            # kept would greet the caller by name again. Cached and kept first, checked
            # after: either forget's own deletion (store and cache) comes later, or this
            # check sees its tombstones.
            return None
        logger.info(
            "profile of %s prepared (%d calls, greeting from %s)",
            mask(user_id),
            facts["call_count"],
            source,
        )
        return profile, kept.history

    async def _forgotten_meanwhile(self, user_id: str) -> dict[str, Any] | None:
        if (await caller_history(self.store, user_id)).count:
            return await self.prepare_caller(user_id)  # a new call since: from it alone
        await self.store.delete_user(user_id)
        await self.cache.invalidate_caller(user_id)
        # Logged once it is gone: until then client-data may still read what was kept.
        logger.info("profile of %s not kept: the caller was forgotten meanwhile", mask(user_id))
        return None

    async def _write_greeting(
        self,
        facts: dict[str, Any],
        last: CallDigest,
        agent: AgentProfile | None,
        business: str | None,
    ) -> tuple[str, str, str | None]:
        """(greeting, source, language): the agent owner's data-collection greeting, else the
        LLM's, else the template. Only the template can honour a narrower disclosure."""
        disclosure = self.settings.greeting_disclosure
        language = facts.get("language") or (agent.language if agent else None)
        if disclosure is GreetingDisclosure.NAME_AND_TOPIC:
            item = self.settings.greeting_data_collection_id
            owned = clean_value((last.facts.get("collected") or {}).get(item))
            if owned:
                known = await self._known_words(facts["user_id"], owned, item, agent)
                if greeting := acceptable(owned, known, "data-collection"):
                    return greeting, "data_collection", language
            if self.llm.configured:
                greeting = await self._llm_greeting(facts, business, language)
                if greeting:
                    return greeting, "llm", language
        return template_greeting(facts, business, disclosure), "template", TEMPLATE_LANGUAGE

    async def _known_words(
        self, user_id: str, greeting: str, item: str, agent: AgentProfile | None
    ) -> set[str]:
        """The words of `greeting` the fact check needs that the agent's own words or the
        caller's calls (all of them, `item`'s own values aside) hold. Newest calls first, a
        few at a time, until every word is found: the words of a greeting written in the
        last call are nearly always in it, so one small read is the usual cost."""
        needed = fact_terms(greeting)
        agent_words = [agent.first_message, agent.name] if agent else []
        missing = needed - vocabulary("\n".join(filter(None, agent_words)))
        offset = 0
        while missing:
            page = await self.store.list_call_digests(
                user_id, limit=WORDS_PAGE, offset=offset, words=True
            )
            for digest in page:
                missing -= call_vocabulary(digest, {item})
            if len(page) < WORDS_PAGE:
                break
            offset += WORDS_PAGE
        return needed - missing

    async def _llm_greeting(
        self, facts: dict[str, Any], business: str | None, language: str | None
    ) -> str | None:
        try:  # a replayed delivery must not pay for (or change) the same greeting twice
            previous = await self.store.get_caller_profile(facts["user_id"]) or {}
        except Exception:
            previous = {}
        if (
            previous.get("greeting_source") == "llm"
            and previous.get("last_conversation_id") == facts["last_conversation_id"]
            and previous.get("call_count") == facts["call_count"]
        ):
            return str(previous["greeting"])
        prompt = {
            "business": business,
            "caller_first_name": first_name(facts.get("name")),
            "last_call_title": facts.get("last_call_title"),
            "last_call_summary": facts.get("last_call_summary"),
            "open_follow_ups": facts.get("open_follow_ups") or [],
            "language": language or TEMPLATE_LANGUAGE,
        }
        # Checked against exactly what the model was given: anything else is invented.
        return acceptable(await self.llm.write(prompt), json.dumps(prompt), "LLM")

    # While the phone rings ---------------------------------------------------------------
    async def client_data(self, request: ClientDataRequest) -> ClientDataAnswer:
        """The webhook's answer within CLIENT_DATA_TIMEOUT_MS, the default one on any
        failure (the reason is logged)."""
        timeout = self.settings.client_data_timeout_ms / 1000
        budget = timeout - min(0.05, timeout * 0.2)  # leave time to serialize and send
        try:
            # asyncio.timeout, not wait_for: no extra task per request on the hot path.
            async with asyncio.timeout(budget):
                return await self.answer(request, agent_wait=budget * COLD_AGENT_WAIT_SHARE)
        except TimeoutError:
            reason = f"no answer within {budget * 1000:.0f} ms"
        except Exception as error:
            reason = f"{type(error).__name__}: {error}"
        logger.warning(
            "client-data for %s (agent %s) got the default answer: %s",
            mask(request.caller_id),
            request.agent_id,
            reason,
        )
        return self.default_answer(request)

    async def answer(
        self, request: ClientDataRequest, *, agent_wait: float = 0.0
    ) -> ClientDataAnswer:
        """The personalized answer, without a deadline (callers add one)."""
        user_id = caller_identity(request.caller_id)
        # One after the other, not gathered: both nearly always answer without leaving the
        # event loop (a profile read on the loop, an agent in this process), where two
        # tasks would cost more than the lookups. An agent never seen before, the one slow
        # case, is waited for at most `agent_wait` after the profile.
        profile = await self._profile_for_call(user_id)
        agent = await self._agent_for_call(request.agent_id, agent_wait)
        return compose_answer(request, user_id, profile, agent, self.settings.greeting_disclosure)

    def default_answer(self, request: ClientDataRequest) -> ClientDataAnswer:
        """What we say knowing nothing about the caller: still every placeholder the agent
        declares, when this process has its profile at hand."""
        agent = self.agents.peek(request.agent_id) if request.agent_id else None
        return compose_answer(
            request, caller_identity(request.caller_id), None, agent, GreetingDisclosure.NONE
        )

    async def caller_profile(self, user_id: str) -> dict[str, Any] | None:
        """The prepared profile: this process, then Redis, then one store lookup (a
        shared store: Redis, then the store's current copy or row)."""
        if self._shared_store:
            # Redis, when set, holds the profile the last replica to prepare it wrote (a
            # store read is never copied there: it could replace a newer one), and answers
            # while PostgreSQL is down; else the store, whose copies are kept current.
            if self.cache.redis_enabled:
                prepared: dict[str, Any] | None = await self.cache.get(
                    caller_key(user_id), local_ttl=0.0
                )
                if prepared:
                    return prepared
            return await self.store.get_caller_profile(user_id)
        key = caller_key(user_id)
        profile = await self.cache.get(key)
        if profile is None:
            profile = await self.store.get_caller_profile(user_id)
            if profile is not None:
                # A store read on the loop is as fast as this process's copy: keeping one
                # would only cost memory (about 8 kB a caller) and freshness. Redis, when
                # set, still gets it for the other workers.
                await self.cache.set(key, profile, local_ttl=0)
                if (
                    self.cache.redis_enabled
                    and await self.store.get_caller_profile(user_id) is None
                ):
                    # Forgotten between the read and the copy: the copy would outlive the
                    # forget in Redis for REDIS_TTL. Copied first, read again after: either
                    # forget clears Redis later, or this second read sees the row gone.
                    await self.cache.invalidate_caller(user_id)
                    return None
        return profile

    async def _profile_for_call(self, user_id: str | None) -> dict[str, Any] | None:
        if user_id is None:
            return None
        try:
            return await self.caller_profile(user_id)
        except Exception as error:
            logger.warning(
                "client-data: profile of %s unavailable (%s); greeting as a new caller",
                mask(user_id),
                error,
            )
            return None

    async def _agent_for_call(self, agent_id: str | None, wait: float) -> AgentProfile | None:
        if not agent_id:
            return None
        try:
            return await self.agents.get(agent_id, wait=wait)
        except Exception as error:
            logger.warning("client-data: agent profile %s unavailable (%s)", agent_id, error)
            return self.agents.peek(agent_id)

    async def close(self) -> None:
        await self.agents.close()
        await self.llm.aclose()


def parse_request(body: bytes) -> ClientDataRequest:
    """The request, or an empty one: a body we cannot read is a caller we do not know."""
    try:
        return ClientDataRequest.model_validate_json(body or b"{}")
    except ValidationError as error:
        # Where and what, never the input: pydantic quotes the values it refused.
        problems = "; ".join(
            f"{'.'.join(str(part) for part in item['loc']) or 'body'}: {item['msg']}"
            for item in error.errors(include_url=False, include_input=False)[:5]
        )
        logger.warning("client-data request not understood (%s): default answer", problems)
        return ClientDataRequest()


def compose_answer(
    request: ClientDataRequest,
    user_id: str | None,
    profile: dict[str, Any] | None,
    agent: AgentProfile | None,
    disclosure: GreetingDisclosure,
) -> ClientDataAnswer:
    """Assemble the answer from prepared parts: no I/O, microseconds. Plain dicts in the
    shape of `ClientDataResponse` (without its None fields), serialized as they are:
    building and dumping the models took longer than the rest of the answer."""
    profile = profile or {}
    call_count = int(profile.get("call_count") or 0)
    last_call_at = profile.get("last_call_at")
    variables: dict[str, Scalar] = {
        "caller_id": user_id or "",
        "called_number": request.called_number or "",
        "call_sid": request.call_sid or "",
        "user_context": profile.get("user_context") or "",
        "caller_name": "" if disclosure is GreetingDisclosure.NONE else profile.get("name") or "",
        "call_count": call_count,
        "last_call_at": _iso(last_call_at) if last_call_at else "",
        "is_returning_caller": call_count > 0,
    }
    if agent is not None:
        # ElevenLabs refuses a call whose prompt uses a variable we did not send.
        for name, default in agent.placeholders.items():
            if variables.get(name) in (None, ""):
                variables[name] = default
    answer: ClientDataAnswer = {"type": CLIENT_DATA_TYPE, "dynamic_variables": variables}
    overrides = _overrides(profile, agent, disclosure)
    if overrides:
        answer["conversation_config_override"] = overrides
    return answer


def _overrides(
    profile: dict[str, Any], agent: AgentProfile | None, disclosure: GreetingDisclosure
) -> dict[str, dict[str, str]] | None:
    """Only what the agent allows and what improves on its own configuration. An agent we
    know nothing about allows nothing: an unallowed override fails the call."""
    if agent is None or not profile:
        return None
    language = profile.get("language")
    override_language = (
        language if agent.allows_language and language and language != agent.language else None
    )
    spoken_language = override_language or agent.language
    first_message = (
        _first_message(profile, agent, disclosure, spoken_language)
        if agent.allows_first_message
        else None
    )
    voice = profile.get("voice_id")
    voice_id = voice if agent.allows_voice_id and voice and voice != agent.voice_id else None
    overrides: dict[str, dict[str, str]] = {}
    if first_message:
        overrides.setdefault("agent", {})["first_message"] = first_message
    if override_language:
        overrides.setdefault("agent", {})["language"] = override_language
    if voice_id:
        overrides["tts"] = {"voice_id": voice_id}
    return overrides or None


def _first_message(
    profile: dict[str, Any],
    agent: AgentProfile,
    disclosure: GreetingDisclosure,
    spoken_language: str,
) -> str | None:
    if profile.get("agent_id") and profile["agent_id"] != agent.agent_id:
        return None  # "welcome back" to a business this caller never called is wrong
    greeting, language = profile.get("greeting") or "", profile.get("greeting_language")
    if profile.get("greeting_disclosure") != disclosure.value:
        # The setting changed since the profile was prepared: honour it now.
        greeting = template_greeting(profile, profile.get("business_name"), disclosure)
        language = TEMPLATE_LANGUAGE
    if not greeting or greeting == agent.first_message:
        return None
    if language and spoken_language and _base(language) != _base(spoken_language):
        return None  # an English greeting read by a Spanish voice helps nobody
    return greeting


def _base(language: str) -> str:
    return language.split("-")[0].split("_")[0].lower()


def _iso(timestamp: int | float) -> str:
    # Checked: a profile prepared before ingestion checked dates may hold any number.
    checked = clamp_timestamp(timestamp)
    if checked is None:
        return ""
    return datetime.fromtimestamp(checked, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def preview_first_message(
    services: Services, caller_id: str, agent_id: str | None = None
) -> ClientDataResponse:
    """What client-data would answer for `caller_id` now (for `elaoms first-message`).

    Without `agent_id`, the agent of the caller's last call. No deadline: an agent not yet
    cached is fetched, so the preview shows what the next call (after a refresh) gets.
    """
    personalization = services.personalization
    if agent_id is None and (user_id := caller_identity(caller_id)):
        profile = await personalization.caller_profile(user_id)
        agent_id = (profile or {}).get("agent_id")
    request = ClientDataRequest(caller_id=caller_id, agent_id=agent_id)
    wait = services.settings.elevenlabs_api_timeout_seconds
    return ClientDataResponse.model_validate(await personalization.answer(request, agent_wait=wait))
