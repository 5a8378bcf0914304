"""Greetings for returning callers: the deterministic template, the optional LLM writer,
and the check that a greeting says nothing the caller's calls do not.

Every greeting is built or checked against stored facts only. A caller ID can be spoofed,
so GREETING_DISCLOSURE caps what a greeting may reveal.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Set
from typing import Any

import httpx

from elaoms.config import GreetingDisclosure, Settings
from elaoms.memory.digest import vocabulary, words
from elaoms.personalization.profile import truncate

logger = logging.getLogger(__name__)

GREETING_MAX_CHARS = 400
FOLLOW_UP_MAX_CHARS = 160
CLOSING = "How can I help today?"

# "Thanks for calling Brightside Dental, ..." -> "Brightside Dental". Only capitalized
# words directly after a phrase that introduces the business; anything else is no name.
_BUSINESS = re.compile(
    r"\b(?:[Cc]alling|[Ww]elcome to|[Yy]ou've reached|[Yy]ou have reached)\s+(?:the\s+)?"
    r"([A-Z][\w'&.-]*(?:\s+(?:[A-Z][\w'&.-]*|&|of|and))*)"
)

# Words a greeting may use without a stored fact behind them (they carry no fact).
_GREETING_WORDS = frozenset(
    """a about after again all also an and any anything are as at back be before but by call
    calling can could dear did do does else evening everything following for from glad going
    good great had happy have hello help here hey hi hope how i i'm in is it it's its just
    last let let's looking may me morning afternoon my nice noted now of ok okay on or our
    please ready regarding see so still sure talk talked thank thanks that the then there
    this time to today up us want was we we're welcome were what when with would you you're
    your yours follow follow-up""".split()  # noqa: SIM905 - a word list reads best as text
)
# Lowercase words that still state facts: a made-up "tomorrow" or "ten" is as wrong as a
# made-up "Tuesday".
_FACT_WORDS = frozenset(
    """one two three four five six seven eight nine ten eleven twelve twenty thirty forty
    fifty hundred first second third monday tuesday wednesday thursday friday saturday sunday
    january february march april june july august september october november december
    tomorrow yesterday tonight week weekend month noon midnight""".split()  # noqa: SIM905
)


# "System:", "Agent:", "[Call on ...]", "{{...}}", "<tag>": nothing a greeting says.
_STAGED = re.compile(
    r"(?i)\b(?:system|assistant|agent|user|caller|developer|instructions?|note)\s*:|[\[\]{}<>]"
)


def unsupported_terms(greeting: str, facts: str | Set[str]) -> list[str]:
    """Names, numbers, days and other fact-bearing words of `greeting` absent from the facts.

    Capitalized words and numbers are where invented facts show (a name, a date, a doctor,
    a time); each must appear in `facts` (a text, or the lowercase words known to be in
    it). Ordinary greeting words are allowed.
    """
    known = facts if isinstance(facts, Set) else vocabulary(facts)
    unsupported = []
    for word in words(greeting):
        lower = word.lower()
        bears_fact = word[0].isdigit() or word[0].isupper() or lower in _FACT_WORDS
        if bears_fact and lower not in known and lower not in _GREETING_WORDS:
            unsupported.append(word)
    return unsupported


def business_name(*first_messages: str | None) -> str | None:
    """The business an agent introduces in its own first message, if it clearly does."""
    for message in first_messages:
        if match := _BUSINESS.search(message or ""):
            name = re.sub(r"(?:\s+(?:&|of|and))+$", "", match.group(1)).rstrip(".")
            if name:
                return name
    return None


def first_name(name: str | None) -> str | None:
    return name.split()[0].strip(",.") if name and name.split() else None


def template_greeting(
    facts: dict[str, Any], business: str | None, disclosure: GreetingDisclosure
) -> str:
    """The deterministic greeting, or "" when there is nothing to say (new caller, or
    disclosure `none`). Uses the stored name, last call title and follow-up verbatim."""
    if not facts.get("call_count") or disclosure is GreetingDisclosure.NONE:
        return ""
    name = first_name(facts.get("name"))
    opening = f"Hi {name}, welcome back" if name else "Welcome back"
    parts = [f"{opening} to {business}." if business else f"{opening}."]
    if disclosure is GreetingDisclosure.NAME_AND_TOPIC:
        # Both are the caller's words as the analysis took them down: one that stages a
        # speaker or markup is left out rather than made the agent's first turn.
        title = facts.get("last_call_title")
        if title and not _STAGED.search(title):
            parts.append(f"Last time we talked about: {title.rstrip('.')}.")
        follow_up = (facts.get("open_follow_ups") or [None])[0]
        if follow_up and not _STAGED.search(follow_up):
            text = truncate(follow_up, FOLLOW_UP_MAX_CHARS).rstrip(".")
            parts.append(f"We noted a follow-up: {text}.")
    parts.append(CLOSING)
    return truncate(" ".join(parts), GREETING_MAX_CHARS)


def _cleaned(greeting: str | None) -> str:
    return " ".join((greeting or "").split()).strip().strip("\"'\u201c\u201d")


def fact_terms(greeting: str | None) -> set[str]:
    """The words of `greeting` (lowercase) that `acceptable` needs to find in the facts."""
    return {word.lower() for word in unsupported_terms(_cleaned(greeting), frozenset())}


def acceptable(greeting: str | None, facts: str | Set[str], origin: str) -> str | None:
    """`greeting` cleaned up, or None (logged) when it is empty, too long or unsupported
    by `facts` (as for `unsupported_terms`)."""
    text = _cleaned(greeting)
    if not text:
        return None
    if len(text) > GREETING_MAX_CHARS:
        logger.info("%s greeting refused: %d characters", origin, len(text))
        return None
    if _STAGED.search(text):
        # The first message becomes the agent's own first turn: a speaker label or a
        # bracketed note in it is text from a call posing as instructions to the agent.
        logger.warning("%s greeting refused: it carries a speaker label or markup", origin)
        return None
    if unsupported := unsupported_terms(text, facts):
        # How many, not which: the terms are names, places and health words written about
        # the caller, and logs are kept longer and read by more people than the store.
        logger.warning(
            "%s greeting refused: %d terms absent from the caller's calls",
            origin,
            len(set(unsupported)),
        )
        return None
    return text


_SYSTEM_PROMPT = (
    "You write the first thing a phone agent says when a returning caller calls back. "
    "Use ONLY the facts in the user's JSON. Never add a date, day, time, number, name, "
    "place, price or promise that is not written there. Greet the caller by first name when "
    "one is given, welcome them back (to the business, if one is given), refer briefly to "
    "the last call or an open follow-up, and end by asking how you can help. At most two "
    "short sentences plus the question, under 45 words, in the language given. Reply with "
    "the greeting text only."
)


class LLMGreetingWriter:
    """Writes a greeting through an OpenAI-compatible `/chat/completions` endpoint."""

    def __init__(self, base_url: str, api_key: str, model: str, timeout: float = 20.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.model = model
        self.timeout = timeout
        self._http: httpx.AsyncClient | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> LLMGreetingWriter:
        return cls(
            settings.llm_base_url,
            settings.llm_api_key,
            settings.llm_model,
            settings.llm_timeout_seconds,
        )

    @property
    def configured(self) -> bool:
        return bool(self.base_url and self.api_key and self.model)

    async def write(self, facts: dict[str, Any]) -> str | None:
        """The model's greeting for `facts`, unchecked; None when the endpoint fails."""
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout))
        body = {
            "model": self.model,
            "temperature": 0,
            "max_tokens": 120,
            "messages": [
                {"role": "system", "content": _SYSTEM_PROMPT},
                {"role": "user", "content": json.dumps(facts, ensure_ascii=False)},
            ],
        }
        try:
            response = await self._http.post(
                f"{self.base_url}/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {self.api_key}"},
            )
            response.raise_for_status()
            content = response.json()["choices"][0]["message"]["content"]
        except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError) as error:
            logger.warning("LLM greeting not written (%s): using the template", error)
            return None
        return content if isinstance(content, str) else None

    async def aclose(self) -> None:
        if self._http is not None:
            client, self._http = self._http, None
            await client.aclose()
