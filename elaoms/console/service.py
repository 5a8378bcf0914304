"""What the console's pages show and do, from the service's own parts.

Nothing here has its own logic for what the agent gets: the greeting verdict is the
client-data preview (`preview_first_message`), search is the search tool's service,
export and forget are `operations/privacy.py`, requeue is the webhook's own ingestion.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from elaoms.console.auth import ConsoleKeys
from elaoms.console.charts import DAY, calls_per_day_svg
from elaoms.console.schemas import (
    AgentLine,
    AlertLine,
    CallerList,
    CallerPage,
    CallerRow,
    CallPage,
    GreetingVerdict,
    HealthPage,
    QueueLine,
    SearchAnswer,
    TimelineCall,
    Turn,
)
from elaoms.elevenlabs.agent_profiles import AgentProfile
from elaoms.memory.records import TRANSCRIPTION, CallRecord
from elaoms.operations.privacy import ForgetReport, export_caller, forget_caller
from elaoms.personalization.service import preview_first_message
from elaoms.phone import mask, mask_phone_numbers
from elaoms.search.schemas import search_answer

if TYPE_CHECKING:
    from elaoms.services import Services

PAGE_SIZE = 50
CHART_DAYS = 8 * 7
TIMELINE_CALLS = 100
SERVICE_CHART_TTL = 60.0
SEARCH_LIMIT = 5  # the limit the README tells operators to give the agent's tool
QUEUE_LINES = 200


def masked_number(user_id: str) -> str:
    """At most the last four digits of a phone number; other ids masked as in the logs."""
    digits = re.sub(r"\D", "", user_id)
    if user_id.startswith("+") and len(digits) >= 7:
        return f"•••{digits[-4:]}"
    return mask(user_id)


def _date(timestamp: float | None) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d") if timestamp else ""


def _datetime(timestamp: float | None) -> str:
    if not timestamp:
        return ""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * DAY:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / DAY:.0f} days"


def _in_call(seconds: int | float | None) -> str:
    total = int(seconds or 0)
    return f"{total // 60}:{total % 60:02d}"


class ConsoleService:
    def __init__(self, services: Services, keys: ConsoleKeys) -> None:
        self.services = services
        self.keys = keys
        self._service_chart: tuple[float, str] | None = None

    # Callers -----------------------------------------------------------------------------
    async def callers(self, query: str = "", page: int = 1) -> CallerList:
        """A page of callers; `query` is digits of a number (three or more) or a name."""
        query = query.strip()[:100]
        digits = re.sub(r"\D", "", query)
        number = digits if len(digits) >= 3 else None
        name = None if number or not query else query
        page = max(1, page)
        result = await self.services.store.list_callers(
            number=number, name=name, limit=PAGE_SIZE, offset=(page - 1) * PAGE_SIZE
        )
        rows = [
            CallerRow(
                opaque_id=self.keys.opaque_id(caller.user_id),
                masked_number=masked_number(caller.user_id),
                name=caller.name,
                call_count=caller.call_count,
                last_call=_date(caller.last_started_at),
            )
            for caller in result.callers
        ]
        pages = max(1, -(-result.total // PAGE_SIZE))
        return CallerList(rows=rows, total=result.total, page=page, pages=pages, query=query)

    async def service_chart(self) -> str:
        """Every caller's calls per day, redrawn at most once a minute per worker: counting
        100,000 calls in eight weeks is the one part of a page that grows with traffic."""
        now = time.monotonic()
        if self._service_chart is None or now - self._service_chart[0] > SERVICE_CHART_TTL:
            self._service_chart = (now, await self._chart(None, "Calls per day, every caller"))
        return self._service_chart[1]

    async def _chart(self, user_id: str | None, title: str) -> str:
        today = int(time.time()) // DAY
        first = today - CHART_DAYS + 1
        counts = await self.services.store.calls_per_day(user_id, since=first * DAY)
        return calls_per_day_svg(counts, first, CHART_DAYS, title)

    async def caller(self, user_id: str) -> CallerPage | None:
        store = self.services.store
        profile = await store.get_caller_profile(user_id)
        digests = await store.list_call_digests(user_id, limit=TIMELINE_CALLS)
        if profile is None and not digests:
            return None
        profile = profile or {}
        answer = await preview_first_message(self.services, user_id)
        verdict = await self._verdict(profile, answer.first_message)
        timeline = [
            TimelineCall(
                conversation_id=digest.conversation_id,
                started=_datetime(digest.started_at),
                title=digest.facts.get("title"),
                summary=digest.facts.get("summary"),
                collected=dict(digest.facts.get("collected") or {}),
                has_audio=self._audio_path(user_id, digest.conversation_id).exists(),
            )
            for digest in digests
        ]
        return CallerPage(
            opaque_id=self.keys.opaque_id(user_id),
            masked_number=masked_number(user_id),
            name=profile.get("name"),
            call_count=int(profile.get("call_count") or len(digests)),
            first_call=_date(profile.get("first_call_at")),
            last_call=_date(profile.get("last_call_at")),
            topics=list(profile.get("topics") or []),
            open_follow_ups=list(profile.get("open_follow_ups") or []),
            greeting=verdict,
            user_context=str(answer.dynamic_variables.get("user_context") or ""),
            dynamic_variables={
                name: value
                for name, value in answer.dynamic_variables.items()
                # The number itself is what the page must not show.
                if name not in ("caller_id", "user_context")
            },
            timeline=timeline,
            chart_svg=await self._chart(user_id, "Calls per day, this caller"),
            has_profile=bool(profile),
        )

    async def _verdict(self, profile: dict[str, Any], first_message: str | None) -> GreetingVerdict:
        """Why the prepared greeting is or is not what client-data sends, mirroring the
        checks of `personalization.service._overrides` in the order they apply."""
        greeting = str(profile.get("greeting") or "")
        agent_id = profile.get("agent_id")
        if first_message:
            reason = "Sent: the agent allows overriding its first message."
            return GreetingVerdict(greeting, True, first_message, reason, agent_id)
        agent = await self._agent(agent_id)
        disclosure = self.services.settings.greeting_disclosure.value
        if not profile:
            reason = "No prepared profile yet: the agent greets with its own first message."
        elif not agent_id:
            reason = "The caller's last call names no agent."
        elif agent is None:
            reason = (
                f"Agent {agent_id}'s configuration is not cached (is ELEVENLABS_API_KEY set?):"
                " no override is sent, since one the agent does not allow fails the call."
            )
        elif not agent.allows_first_message:
            reason = (
                f"Agent {agent_id} does not allow overriding the first message"
                " (Security → Overrides → First message)."
            )
        elif not greeting and disclosure == "none":
            reason = "GREETING_DISCLOSURE=none: greetings say nothing personal."
        elif not greeting:
            reason = "No greeting was prepared after the last call."
        elif greeting == agent.first_message:
            reason = "The greeting is the agent's own first message: nothing to override."
        else:
            reason = (
                "The greeting's language differs from the language the agent speaks, or the"
                f" disclosure setting ({disclosure}) leaves nothing to say."
            )
        return GreetingVerdict(greeting, False, None, reason, agent_id)

    async def _agent(self, agent_id: str | None) -> AgentProfile | None:
        if not agent_id:
            return None
        try:
            return await self.services.agents.get(agent_id)
        except Exception:  # the verdict says "not cached"; the page still answers
            return self.services.agents.peek(agent_id)

    def _audio_path(self, user_id: str, conversation_id: str) -> Path:
        return self.services.storage.claimed_audio_path(user_id, conversation_id)

    async def call(self, user_id: str, conversation_id: str) -> CallPage | None:
        stored = await self.services.store.get_call(conversation_id, TRANSCRIPTION)
        if stored is None or stored.user_id != user_id:
            return None  # another caller's call is not found from this caller's page
        # The raw payload is kept as sent: read through its checked record, as storing did.
        record = CallRecord.from_payload(stored.payload)
        return CallPage(
            opaque_id=self.keys.opaque_id(user_id),
            masked_number=masked_number(user_id),
            conversation_id=conversation_id,
            agent_id=stored.agent_id,
            started=_datetime(stored.started_at),
            duration=_in_call(record.duration_secs),
            title=record.title,
            summary=record.summary,
            collected=[(item, str(value)) for item, value in record.collected.items()],
            transcript=[
                Turn(
                    role=turn.role or "", message=turn.message, at=_in_call(turn.time_in_call_secs)
                )
                for turn in record.turns
            ],
            has_audio=self._audio_path(user_id, conversation_id).exists(),
        )

    async def audio(self, user_id: str, conversation_id: str) -> bytes | None:
        if await self.call(user_id, conversation_id) is None:
            return None
        path = self._audio_path(user_id, conversation_id)
        try:
            return await asyncio.to_thread(self.services.storage.read, path)
        except FileNotFoundError:
            return None

    async def search(self, user_id: str, query: str) -> SearchAnswer:
        query = query.strip()[:500]
        result = await self.services.search.search(user_id, query, SEARCH_LIMIT)
        answer = search_answer(result)
        return SearchAnswer(
            query=query,
            memories_found=int(answer["memories_found"]),
            context=str(answer["context"]),
            timed_out=bool(answer.get("timed_out")),
        )

    # Actions -----------------------------------------------------------------------------
    async def export(self, user_id: str) -> bytes:
        document = await export_caller(self.services, user_id)
        return json.dumps(document, ensure_ascii=False, indent=2).encode()

    async def forget(self, user_id: str) -> ForgetReport:
        return await forget_caller(self.services, user_id)

    async def requeue(self, name: str) -> str:
        """Hand a quarantined body to ingestion again (after a fix); say what became of it."""
        storage = self.services.storage
        try:
            acknowledgement = await self.services.ingest.requeue(storage.quarantined(name))
        except FileNotFoundError:  # requeued or forgotten meanwhile
            raise LookupError(name) from None
        if acknowledgement.status == "quarantined":
            return f"Still refused: {mask_phone_numbers(acknowledgement.detail or '')}"
        return f"Accepted: {acknowledgement.status}"

    # Agents and health -------------------------------------------------------------------
    async def agents(self) -> list[AgentLine]:
        lines = []
        for agent_id in await self.services.store.list_agent_ids():
            agent = await self._agent(agent_id)
            lines.append(
                AgentLine(
                    agent_id=agent_id,
                    name=agent.name if agent else "",
                    cached=agent is not None,
                    fetched=_datetime(agent.fetched_at) if agent else "",
                    first_message=agent.first_message if agent else "",
                    language=agent.language if agent else "",
                    placeholders=dict(agent.placeholders) if agent else {},
                    allows_first_message=bool(agent and agent.allows_first_message),
                    allows_language=bool(agent and agent.allows_language),
                    allows_voice_id=bool(agent and agent.allows_voice_id),
                )
            )
        return lines

    async def health(self) -> HealthPage:
        services = self.services
        try:
            await asyncio.wait_for(services.store.check(), timeout=2.0)
            store_status = "ok"
        except Exception as error:
            store_status = f"unavailable: {error}"
        pending, quarantined, disk = await asyncio.to_thread(self._files)
        alerts = [
            AlertLine(_datetime(alert.raised_at), alert.kind, mask_phone_numbers(alert.message))
            for alert in reversed(services.alerts.recent)
        ]
        return HealthPage(
            store_name=services.store.name,
            store_status=store_status,
            disk_status=disk[0],
            disk_free=disk[1],
            pending=pending,
            quarantined=quarantined,
            alerts=alerts,
            chart_svg=await self.service_chart(),
        )

    def _files(self) -> tuple[list[QueueLine], list[QueueLine], tuple[str, str]]:
        storage = self.services.storage
        now = time.time()
        pending = []
        for entry in storage.pending()[:QUEUE_LINES]:
            try:
                age = now - entry.path.stat().st_mtime
            except FileNotFoundError:
                continue  # stored meanwhile
            # Pending names are `c_<hash>__<type>__<conversation>.json`: no number in them.
            pending.append(QueueLine(name=entry.name, age=_age(age)))
        quarantined = []
        root = storage.quarantine_root
        reasons = sorted(root.glob("*.reason.json"), reverse=True) if root.exists() else []
        for path in reasons[:QUEUE_LINES]:
            try:
                reason = json.loads(storage.read(path))
            except (OSError, ValueError):
                reason = {}
            quarantined.append(
                QueueLine(
                    name=path.name.removesuffix(".reason.json"),
                    age=_age(now - float(reason.get("received_at") or path.stat().st_mtime)),
                    reason=mask_phone_numbers(str(reason.get("reason") or "unknown")),
                    size=int(reason.get("bytes") or 0),
                )
            )
        try:
            usage = shutil.disk_usage(storage.root)
            free = usage.free / usage.total if usage.total else 0.0
            disk = (
                "ok" if free > 0.05 else "almost full",
                f"{usage.free / 2**30:.1f} GiB free of {usage.total / 2**30:.1f} GiB",
            )
        except OSError as error:
            disk = (f"unavailable: {error.strerror or error}", "")
        return pending, quarantined, disk
