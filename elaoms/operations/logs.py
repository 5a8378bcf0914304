"""Logging set-up: text or JSON lines, with phone numbers masked in every record.

Masking happens in one place, the log record factory: every record made in the process
(ours, uvicorn's access and error logs, gunicorn's, a library's) has its message and
traceback masked before any handler or formatter sees it. `gunicorn.conf.py` installs it
in gunicorn's master too, so its workers inherit it from the first line they log.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from elaoms.phone import mask_phone_numbers


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
