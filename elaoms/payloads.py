"""Reading ElevenLabs' nested JSON, where any level may be missing or of another type."""

from __future__ import annotations

import json
from typing import Any

import orjson


def dig(source: Any, *path: str) -> Any:
    """`source[path[0]][path[1]]...`, or None as soon as a level is not a dict."""
    for key in path:
        if not isinstance(source, dict):
            return None
        source = source.get(key)
    return source


def decode(data: bytes | bytearray | str) -> Any:
    """Parse JSON with orjson (several times faster on a 12 KB payload); what it refuses
    and the standard library reads (NaN, integers beyond 64 bits) still parses."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def encode(value: Any) -> bytes:
    """Compact UTF-8 JSON, with orjson when it can encode `value` (see `decode`). NaN and
    infinities, which are not JSON and which ElevenLabs never sends, become null."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError: integers beyond 64 bits, non-str keys
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
