"""Retention: raw webhook files older than WEBHOOK_RETENTION_DAYS are purged.

Memories stay: retention is about the raw files. A delivery still waiting for the store
(its file has a second link in _pending/) is never purged, however old.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from elaoms.webhooks.storage import WebhookStorage

logger = logging.getLogger(__name__)


@dataclass
class PurgeReport:
    files: int = 0
    bytes: int = 0
    unclaimed_audio: int = 0


def purge_expired(
    storage: WebhookStorage, retention_days: float, audio_ttl_seconds: float
) -> PurgeReport:
    report = PurgeReport()
    cutoff = time.time() - retention_days * 86400
    for directory in _kept_directories(storage):
        for path in directory.iterdir():
            if not path.is_file():
                continue
            info = path.stat()
            if info.st_mtime >= cutoff or info.st_nlink > 1:
                continue
            path.unlink(missing_ok=True)
            report.files += 1
            report.bytes += info.st_size
        if directory.name.startswith("c_") and not any(directory.iterdir()):
            directory.rmdir()
    report.unclaimed_audio = storage.drop_unclaimed_audio(audio_ttl_seconds)
    if report.files or report.unclaimed_audio:
        # Counts only: file names would tie a purge to a caller.
        logger.info(
            "retention purge: %d webhook files (%d bytes) older than %s days, "
            "%d unclaimed audio files",
            report.files,
            report.bytes,
            retention_days,
            report.unclaimed_audio,
        )
    return report


def _kept_directories(storage: WebhookStorage) -> list[Path]:
    directories = [storage.quarantine_root]
    if storage.root.exists():
        directories += [
            path
            for path in storage.root.iterdir()
            if path.is_dir() and (path.name.startswith("c_") or path.name == "_other")
        ]
    return [directory for directory in directories if directory.exists()]
