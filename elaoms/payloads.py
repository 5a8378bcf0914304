"""Reading ElevenLabs' nested JSON, where any level may be missing or of another type."""

from __future__ import annotations

from typing import Any


def dig(source: Any, *path: str) -> Any:
    """`source[path[0]][path[1]]...`, or None as soon as a level is not a dict."""
    for key in path:
        if not isinstance(source, dict):
            return None
        source = source.get(key)
    return source
