"""Logging set-up: text or JSON lines, with phone numbers masked in every record.

Masking happens in one place, the log record factory: every record made in the process
(ours, uvicorn's access and error logs, gunicorn's, a library's) has its message and
traceback masked before any handler or formatter sees it. `gunicorn.conf.py` installs it
in gunicorn's master too, so its workers inherit it from the first line they log.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

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
# Shapes that are not phone numbers, left readable: dates, IPv4 addresses, decimals.
_NOT_A_PHONE = re.compile(r"\d{4}-\d{2}-\d{2}(?:[ T]\d{2})?|\d{1,3}(?:\.\d{1,3}){3}|\d+\.\d+")
SHOWN_DIGITS = 4


def mask_phone_numbers(text: str) -> str:
    """`text` with every phone-number-looking run replaced by its last four digits."""

    def replace(match: re.Match[str]) -> str:
        found = match.group(0)
        if match.group("prefix") is None and _NOT_A_PHONE.fullmatch(found):
            return found
        digits = re.sub(r"\D", "", found[len(match.group("prefix") or "") :])
        return f"{match.group('prefix') or ''}***{digits[-SHOWN_DIGITS:]}"

    return PHONE_RUN.sub(replace, text)


def _masking_record_factory(
    base: Callable[..., logging.LogRecord],
) -> Callable[..., logging.LogRecord]:
    """Mask phone numbers when a record is made, so every handler (ours, a test's, a
    library's) only ever sees the masked text. A safety net under explicit `mask()` calls."""

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed format string: leave it to the handler to report
            return record
        record.msg, record.args = mask_phone_numbers(message), None
        if record.exc_info:
            record.exc_text = mask_phone_numbers(
                logging.Formatter().formatException(record.exc_info)
            )
        if record.stack_info:
            record.stack_info = mask_phone_numbers(record.stack_info)
        return record

    factory._elaoms_masking = True  # type: ignore[attr-defined]
    return factory


class JsonLineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


def install_masking() -> None:
    """Mask phone numbers in every log record made from now on, in this process and in
    processes forked from it (idempotent)."""
    current_factory = logging.getLogRecordFactory()
    if not getattr(current_factory, "_elaoms_masking", False):
        logging.setLogRecordFactory(_masking_record_factory(current_factory))


def configure_logging(level: str = "INFO", log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonLineFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    install_masking()
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, "_elaoms", False):
            root.removeHandler(existing)
    handler._elaoms = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Uvicorn's access log prints query strings and paths; route it through our filter too,
    # at LOG_LEVEL: gunicorn's worker sets these loggers to its own level (INFO), which
    # wrote an access line per request even with LOG_LEVEL=WARNING.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "gunicorn.error", "gunicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
