"""The console's list of callers, as the stores that keep it in a table (SQLite, PostgreSQL)
keep it: what a caller's row is found by, and what a search of it matches.

Only the SQL differs between those stores (`instr` against `strpos`), so the words are
made here, once. With encryption at rest the row holds keyed hashes of whole words and
numbers, never the words: an equal word finds it, the column alone reveals nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from elaoms.crypto import KEYED_HASH_PREFIX, keyed_hash
from elaoms.phone import normalize_caller_id

# A word as the directory keeps it: itself, or its keyed hash with encryption on.
WordKey = Callable[[str], str]


def keyed_word(hash_key: bytes, word: str) -> str:
    """A word's keyed hash under the store's hash key (which a rotation of ENCRYPTION_KEY
    leaves as it is, so callers stay found); shortened, as a row holds several."""
    return keyed_hash(hash_key, f"word:{word}")[len(KEYED_HASH_PREFIX) :][:20]


def number_key(user_id: str, word_key: WordKey, *, encrypted: bool) -> str:
    """What a number search matches with encryption on: the whole number and its last
    four digits. In clear nothing: the search reads the caller key itself."""
    if not encrypted:
        return ""
    digits = "".join(ch for ch in user_id if ch.isdigit())
    return f" {word_key(user_id)} {word_key('#' + digits[-4:])} "


def name_key(name: object, word_key: WordKey) -> str:
    """The profile's name, folded; spaces around every word, so that a word search is one
    substring match of ' word '."""
    words = str(name or "").casefold().split()
    return f" {' '.join(word_key(word) for word in words)} " if words else ""


@dataclass(frozen=True, slots=True)
class DirectoryMatch:
    """One condition of a caller search: `term` is a substring of `column`."""

    column: str
    term: str


def directory_matches(
    number: str | None, name: str | None, word_key: WordKey, *, encrypted: bool
) -> list[DirectoryMatch]:
    """The conditions a row must all meet to match `number` (digits the caller id
    contains) and `name` (words of the profile's name, case-insensitively)."""
    matches: list[DirectoryMatch] = []
    digits = "".join(ch for ch in number or "" if ch.isdigit())
    if digits and encrypted:
        # Keyed hashes match a whole number or its last four digits (as names match whole
        # words), not any run of digits.
        whole = normalize_caller_id(number or "") if len(digits) > 4 else None
        matches.append(DirectoryMatch("number_key", f" {word_key(whole or '#' + digits[-4:])} "))
    elif digits:
        matches.append(DirectoryMatch("user_id", digits))
    words = (name or "").casefold().split()
    if words and encrypted:
        matches += [DirectoryMatch("name_key", f" {word_key(word)} ") for word in words]
    elif words:
        matches.append(DirectoryMatch("name_key", " ".join(word_key(word) for word in words)))
    return matches
