"""Caller identities: who a call is about, E.164 normalization, and masking of numbers.

The one place that decides whether a value names a caller. Identities from different
sources live in different namespaces (`CallerIdentity.kind`): a phone caller comes only
from what the telephony side reports, an app-supplied user id stays a user id, and a
withheld number is nobody in particular.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache
from urllib.parse import unquote

import phonenumbers

# Numbers written without a country code are read in the region of the deployment's phone
# lines (PHONE_DEFAULT_REGION, North America unless set); a leading "+" always wins, and
# digits valid only as a full international number (no "+") are read as that number.
DEFAULT_REGION = "US"
_region = DEFAULT_REGION


def use_default_region(region: str) -> None:
    """Read numbers without a country code as numbers of `region` (ISO 3166 alpha-2).

    Process-wide on purpose: the region belongs to the deployment's phone lines, and every
    part that names a caller (ingestion, client-data, search, the CLI) must read the same
    digits as the same caller. Set once at start-up from the settings.
    """
    global _region
    region = region.upper()
    if region not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(f"{region!r} is not a region phone numbers are known for")
    if region != _region:
        _region = region
        normalize_caller_id.cache_clear()
        _phone_caller.cache_clear()


def default_region() -> str:
    return _region


# Characters that change nothing a caller dialled: zero-width joiners and marks, a byte
# order mark (Unicode category Cf). Full-width digits and "+" (from East Asian input
# methods) are read as ASCII through NFKC.
def _plain(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    if text.isascii():
        return text
    return "".join(character for character in text if unicodedata.category(character) != "Cf")


_PHONE_LIKE = re.compile(r"^\+?[\d\s().\-]{7,}$")


@lru_cache(maxsize=16384)  # pure, and parsed on every client-data and search request
def normalize_caller_id(raw: str | None) -> str | None:
    """Return the E.164 form of a phone number, or the trimmed identifier if it is not one.

    "+1 (415) 555-0123", "14155550123" and "4155550123" are all "+14155550123". A value that
    is not a phone number (a conversation id, an account id) is kept as it is.
    """
    if raw is None:
        return None
    text = str(raw).strip()
    if not text:
        return None
    if not _PHONE_LIKE.match(text):
        plain = _plain(text).strip()
        if plain == text or not _PHONE_LIKE.match(plain):
            return text
        text = plain
    digits = re.sub(r"\D", "", text)
    # Without a "+", a number valid in the default region is read there first: reading
    # its digits as international first made one US caller in ten someone abroad
    # ("4798570523", Arkansas, became +47 98570523, a Norwegian mobile): two people, one
    # memory. Digits valid only as an international number ("442071838750") still are.
    # "00" is the international prefix almost everywhere (the region's own, such as "011"
    # in North America, is read by parsing in the region): "0044 20 7946 0958" is +44.
    candidates = [text] if text.startswith("+") else [text, "+" + digits]
    if digits.startswith("00") and not text.startswith("+"):
        candidates.append("+" + digits[2:])
    for candidate in candidates:
        try:
            number = phonenumbers.parse(candidate, None if candidate.startswith("+") else _region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number):
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    try:
        number = phonenumbers.parse(text, _region)
    except phonenumbers.NumberParseException:
        return "+" + digits if text.startswith("+") else text
    if phonenumbers.is_possible_number(number):
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return "+" + digits if text.startswith("+") else text


def mask(identifier: str | None) -> str:
    """A caller identifier fit for logs: at most its last four characters show
    ("+14155550123" becomes "***0123")."""
    if not identifier:
        return "<none>"
    text = str(identifier)
    if len(text) <= 6:
        return "***"
    return f"***{text[-4:]}" if len(text) > 9 else f"***{text[-2:]}"


# A phone number in any spelling a log line may hold: E.164 (+13125550142), URL-encoded
# by a client or by uvicorn's access log (%2B13125550142, %28312%29%20555-0142), national
# ((312) 555-0142, 312-555-0142, 312.555.0142), or a bare run of digits right after a
# letter or a path (callers/13125550142, id=13125550142, ...%2B1312...). 7 to 15 digits,
# the lengths E.164 allows, with up to three separators between any two of them.
# Unicode spaces, dashes and invisible marks separate digits too: the caller-id parser takes
# "+1\u00a0415\u00a0555\u00a00123" (no-break spaces, as copied from a web page) as a caller,
# and the access log URL-encodes it as %C2%A0.
_UNICODE_SEPARATORS = "\u00a0\u2000-\u200d\u2010-\u2015\u2060\u202f\u205f\u2212\u3000\ufeff"
_SEPARATOR = (
    rf"(?:[ \t().+\-{_UNICODE_SEPARATORS}]|%2[0589dDeE]|%[cC]2%[aA]0|%[eE]2%80%(?:[89][0-9a-fA-F]|[aA][fF])"
    r"|%[eE]2%88%92|%[eE]3%80%80)"
)
PHONE_RUN = re.compile(
    rf"(?<!\d:)(?:(?<=%[0-9A-Fa-f]{{2}})|(?<![\d%]))(?P<prefix>\+|%2[bB])?(?:\(|%28)?\d(?:{_SEPARATOR}{{0,3}}\d){{6,14}}(?!\d)"
)
# A UTC stamp in ISO 8601's basic form (20261130T081701), with the 16 hex digits that
# follow it in a quarantined file's name: its digits are a date and a time, not a number.
# With the opening bracket a phone run may start with.
_STAMP = re.compile(r"(?:\(|%28)?\d{8}T\d{6}Z?(?:-[0-9a-f]{16}(?![0-9a-f]))?")
# Shapes that are not phone numbers, left readable: dates, IPv4 addresses, decimals.
_NOT_A_PHONE = re.compile(r"\d{4}-\d{2}-\d{2}(?:[ T]\d{2})?|\d{1,3}(?:\.\d{1,3}){3}|\d+\.\d+")
SHOWN_DIGITS = 4


def mask_phone_numbers(text: str) -> str:
    """`text` with every phone-number-looking run replaced by its last four digits."""

    def replace(match: re.Match[str]) -> str:
        found = match.group(0)
        prefix = match.group("prefix")
        if prefix is None and (_NOT_A_PHONE.fullmatch(found) or _in_stamp(match)):
            return found
        digits = re.sub(r"\D", "", found[len(prefix or "") :])
        return f"{prefix or ''}***{digits[-SHOWN_DIGITS:]}"

    return PHONE_RUN.sub(replace, text)


def _in_stamp(match: re.Match[str]) -> bool:
    """Whether a run is a stamp's date (it starts there), its time (the stamp starts 9
    characters before: 8 digits and a T) or the digits its hash starts with (16 before).
    Looked at only for runs found: masking runs on every log record."""
    text, start, end = match.string, match.start(), match.end()
    for stamp_start in (start, start - 9, start - 16):
        stamp = _STAMP.match(text, stamp_start) if stamp_start >= 0 else None
        if stamp and stamp.end() >= end:
            return True
    return False


# Withheld numbers ------------------------------------------------------------------------
# A caller who hides their number still reaches the agent; what stands in its place is
# shared by every such caller, so it must never become anyone's memory. Carriers and SIP
# trunks send these words (any case):
WITHHELD_WORDS = frozenset(
    {
        "anonymous",
        "restricted",
        "unknown",
        "private",
        "unavailable",
        "blocked",
        "withheld",
        "not available",
        "unavailable caller id",
        "no caller id",
        "caller id unknown",
    }
)
_KEYPAD = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "22233344455566677778889999")
# Twilio spells the words on a phone keypad instead: +266696687 is ANONYMOUS, +7378742833
# RESTRICTED, +86282452253 UNAVAILABLE, +8656696 UNKNOWN, +2562533 BLOCKED (and PRIVATE
# would be +7748283). Derived, not typed: each is exactly its word on the keypad.
WITHHELD_NUMBERS = frozenset(
    "+" + word.upper().translate(_KEYPAD)
    for word in ("anonymous", "restricted", "unavailable", "unknown", "blocked", "private")
)
# "sip:anonymous@anonymous.invalid" (RFC 3323), "sip:anonymous@example.com",
# "Anonymous <sip:anonymous@host>", "client:Anonymous" (Twilio Client) and the like.
_SIP_URI = re.compile(r"(?:^|<)\s*(sips?|tel):([^@;>\s]*)(?:@([^;>\s]*))?", re.IGNORECASE)
_TWILIO_CLIENT = re.compile(r"^client:", re.IGNORECASE)
# ElevenLabs sends the template itself when a dynamic variable is not set.
_UNFILLED = re.compile(r"^\s*\{\{.*\}\}\s*$")

# A key the store files app-supplied user ids under: never a phone number's form.
APP_USER_PREFIX = "user:"


class CallerKind(StrEnum):
    PHONE = "phone"  # a number (or SIP address) the telephony side reported
    APP_USER = "app_user"  # the id a web/SDK application chose: proves no phone number
    WITHHELD = "withheld"  # a hidden number, or a value that is no number: many strangers
    NONE = "none"  # nothing at all


@dataclass(frozen=True, slots=True)
class CallerIdentity:
    """Who a call or a request is about, and from which namespace.

    `key` is what the store files the caller's memories under: the E.164 number for a
    phone caller, "user:<id>" for an app user, None for a withheld or missing number
    (such a call is kept on its own, under its conversation id, and merged into no one).
    """

    kind: CallerKind
    key: str | None = None

    @property
    def is_caller(self) -> bool:
        """Whether calls of this identity may be merged into one memory, profile, greeting."""
        return self.key is not None


NO_CALLER = CallerIdentity(CallerKind.NONE)
WITHHELD = CallerIdentity(CallerKind.WITHHELD)


# Longer than any caller ID (E.164 has at most 15 digits; SIP addresses stay far below):
# such a value is nobody, and is neither parsed nor kept in the cache below (16384 values of
# a megabyte each, sent by whoever fills a search tool field, would be gigabytes).
MAX_CALLER_ID_CHARS = 256
E164_MAX_DIGITS = 15


def phone_caller(raw: str | None) -> CallerIdentity:
    """The caller a telephony value names (`system__caller_id`, `external_number`, a
    client-data `caller_id`, a Twilio `From`).

    A number is normalized to E.164; a withheld marker, or anything that is not a number
    or a SIP address (a word, a conversation id, "user:..."), is no caller: guessing whom
    such a value means is how strangers end up sharing a memory.
    """
    if raw is not None and len(str(raw)) > MAX_CALLER_ID_CHARS:
        return WITHHELD
    return _phone_caller(raw)


@lru_cache(maxsize=16384)  # pure, and asked on every client-data and search request
def _phone_caller(raw: str | None) -> CallerIdentity:
    if raw is None:
        return NO_CALLER
    text = str(raw).strip()
    if not text or _UNFILLED.match(text):
        return NO_CALLER
    lowered = " ".join(text.lower().split())
    if lowered in WITHHELD_WORDS or _TWILIO_CLIENT.match(lowered):
        return WITHHELD
    if not _PHONE_LIKE.match(text) and _PHONE_LIKE.match(plain := _plain(text).strip()):
        text = plain  # full-width digits and plus, or digits with invisible marks between them
    if uri := _SIP_URI.search(text):
        return _sip_caller(uri.group(1).lower(), uri.group(2), uri.group(3))
    if not _PHONE_LIKE.match(text):
        return WITHHELD
    number = normalize_caller_id(text)
    if not number or not number.startswith("+") or number in WITHHELD_NUMBERS:
        return WITHHELD
    if "+" + re.sub(r"\D", "", text) in WITHHELD_NUMBERS:
        return WITHHELD  # "266696687" without its "+" reads as another number
    if _all_zeros(number):
        return WITHHELD  # "0000000000", "+1 000-000-0000": what some trunks send for none
    if len(number) - 1 > E164_MAX_DIGITS:
        return WITHHELD  # no number has that many digits
    return CallerIdentity(CallerKind.PHONE, number)


def _all_zeros(number: str) -> bool:
    try:
        return phonenumbers.parse(number).national_number == 0
    except phonenumbers.NumberParseException:
        return False


def _sip_caller(scheme: str, user: str, host: str | None) -> CallerIdentity:
    user = user.strip()
    host = (host or "").strip().lower()
    # A SIP user part may escape any character (RFC 3261): "sip:%2B14155550123@host" is the
    # number (filed apart from it, forgetting the number left its calls behind), and
    # "sip:anonym%6Fus@host" is a withheld caller, not one memory shared by every stranger.
    decoded = unquote(user).strip()
    if not decoded or not decoded.isprintable() or decoded.lower() in WITHHELD_WORDS:
        return WITHHELD
    if host.endswith("anonymous.invalid"):
        return WITHHELD
    if _PHONE_LIKE.match(decoded):
        number = phone_caller(decoded)
        if number.kind is CallerKind.PHONE or scheme == "tel":
            return number
    if scheme == "tel" or not host:
        return WITHHELD
    # A named SIP address (alice@pbx.example.com): an address, as trustworthy as a number.
    return CallerIdentity(CallerKind.PHONE, f"sip:{user}@{host}")


def app_user(raw: str | int | None) -> CallerIdentity:
    """The identity of an id a web/SDK application chose: kept verbatim in its own
    namespace. "4155550123" stays a user id; it is never read as a phone number."""
    if raw is None or isinstance(raw, bool):
        return NO_CALLER
    text = str(raw).strip()
    if not text or _UNFILLED.match(text):
        return NO_CALLER
    return CallerIdentity(CallerKind.APP_USER, APP_USER_PREFIX + text)


class WithheldCallerError(ValueError):
    """An operator named a withheld marker as if it were a caller."""


def operator_caller(raw: str | None) -> str | None:
    """The store key an operator means (CLI, admin API): a phone number in any format,
    "user:<id>" for an app user, or a conversation id for a call kept on its own.

    Raises WithheldCallerError for a withheld marker: it names many strangers, not one.
    """
    if raw is None or not str(raw).strip():
        return None
    text = str(raw).strip()
    if text.lower().startswith(APP_USER_PREFIX):
        return app_user(text[len(APP_USER_PREFIX) :]).key
    identity = phone_caller(text)
    if identity.kind is CallerKind.PHONE:
        return identity.key
    if identity.kind is CallerKind.WITHHELD and (
        _PHONE_LIKE.match(text)
        or " ".join(text.lower().split()) in WITHHELD_WORDS
        or _SIP_URI.search(text)
        or _TWILIO_CLIENT.match(text)
    ):
        raise WithheldCallerError(
            f"{text!r} is a withheld caller ID: many different people call with it, so it "
            "is no caller. Calls from withheld numbers are kept one by one under their "
            "conversation id: find one with `elaoms calls`, then use its conversation id."
        )
    return normalize_caller_id(text)  # a conversation id or an id stored before namespaces


def stored_identity(key: str) -> CallerIdentity:
    """The identity behind a store key: phone caller, app user, or none (a call kept on its
    own under its conversation id, or a withheld marker pooled by an older version)."""
    if key.startswith(APP_USER_PREFIX):
        return CallerIdentity(CallerKind.APP_USER, key)
    if key.startswith(("+", "sip:")):
        identity = phone_caller(key)
        return identity if identity.key == key else WITHHELD
    return NO_CALLER
