"""Caller identities: E.164 normalization and masking of phone numbers."""

from __future__ import annotations

import re
from functools import lru_cache

import phonenumbers

# Numbers written without a country code are read as North American, the region the
# seed's deployments used; a leading "+" or a full international number always wins.
DEFAULT_REGION = "US"

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
        return text
    digits = re.sub(r"\D", "", text)
    candidates = [text] if text.startswith("+") else ["+" + digits, text]
    for candidate in candidates:
        try:
            number = phonenumbers.parse(
                candidate, None if candidate.startswith("+") else DEFAULT_REGION
            )
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(number):
            return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    try:
        number = phonenumbers.parse(text, DEFAULT_REGION)
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


# Runs of 7+ digits, optionally with a leading + and common separators: what a phone
# number looks like anywhere in a log line.
_PHONE_IN_TEXT = re.compile(r"(?<![\w+])\+?\d[\d\s().\-]{5,}\d(?!\w)")


def mask_phone_numbers(text: str) -> str:
    """Mask every phone-number-looking run inside free text."""

    def _replace(match: re.Match[str]) -> str:
        digits = re.sub(r"\D", "", match.group(0))
        if len(digits) < 7:
            return match.group(0)
        return mask(match.group(0))

    return _PHONE_IN_TEXT.sub(_replace, text)
