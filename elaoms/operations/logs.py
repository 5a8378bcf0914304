"""Logging set-up: text or JSON lines, with phone numbers masked in every record."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from elaoms.phone import mask_phone_numbers


class PhoneMaskingFilter(logging.Filter):
    """Rewrites each record's message so that no whole phone number reaches a handler.

    A safety net under the explicit `mask()` calls: a number that slips into an
    exception message or a third-party log line is masked too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_phone_numbers(message)
        if masked != message or record.args:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = mask_phone_numbers(
                logging.Formatter().formatException(record.exc_info)
            )
        elif record.exc_text:
            record.exc_text = mask_phone_numbers(record.exc_text)
        return True


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


def configure_logging(level: str = "INFO", log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonLineFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(PhoneMaskingFilter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, "_elaoms", False):
            root.removeHandler(existing)
    handler._elaoms = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Uvicorn's access log prints query strings and paths; route it through our filter too.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "gunicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = []
        logger.propagate = True
