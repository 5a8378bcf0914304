"""Which failed HTTP answers are worth asking again: one rule for every client we run."""

from __future__ import annotations


def retryable_status(status_code: int) -> bool:
    """Timeouts, rate limits and server errors pass; a refusal (other 4xx) stays a refusal."""
    return status_code in (408, 429) or status_code >= 500
