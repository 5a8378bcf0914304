"""What callers said, and what was written about them, stays out of log lines."""

from __future__ import annotations

import logging

import pytest

from elaoms.personalization.greeting import acceptable
from elaoms.personalization.service import parse_request

CALL_WORDS = {"maria", "cleaning", "tuesday"}


def test_a_refused_greeting_is_logged_without_the_words_it_made_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    greeting = "Hi Maria! Your root canal with Dr. Hennessey in Kalamazoo is on Friday."
    with caplog.at_level(logging.INFO):
        assert acceptable(greeting, CALL_WORDS, "llm") is None
    assert "greeting refused" in caplog.text
    for word in ("Hennessey", "Kalamazoo", "root canal", "canal", "Friday"):
        assert word not in caplog.text


@pytest.mark.parametrize(
    "body",
    [
        b'{"caller_id": {"name": "Maria Lopez", "note": "Sofia sore tooth"}}',
        b'{"caller_id": "Maria Lopez", "agent_id": ["Sofia sore tooth"]}',
        b'{"caller_id": "Maria Lopez, Sofia sore tooth',
    ],
)
def test_a_client_data_body_not_understood_is_logged_without_its_values(
    body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        assert parse_request(body).caller_id is None
    assert "not understood" in caplog.text
    for word in ("Maria", "Lopez", "Sofia", "tooth"):
        assert word not in caplog.text
