"""The periodic background work of a running service.

Pending deliveries are retried, and forgets made on other replicas applied to this one's
files, at start-up and every PENDING_SWEEP_INTERVAL_SECONDS;
unclaimed audio and expired webhook files are purged on their own, slower clocks. The
store's own upkeep and the saving of callers' search indexes run every second.
"""

from __future__ import annotations

import asyncio
import logging
import time

from elaoms.operations.metrics import PENDING_DELIVERIES
from elaoms.operations.privacy import apply_shared_forgets
from elaoms.operations.retention import purge_expired
from elaoms.services import Services

logger = logging.getLogger(__name__)

RETENTION_INTERVAL_SECONDS = 3600.0
# Soon enough that a caller's next call finds their index saved; late enough that a burst
# of calls is indexed once per caller, not once per call.
STORE_UPKEEP_INTERVAL_SECONDS = 1.0


async def run_maintenance(services: Services) -> None:
    settings = services.settings
    last_purge = float("-inf")
    while True:
        try:
            # Forgets made on other replicas (a store they share) first: this disk's files
            # of a forgotten caller must not be swept into the store again.
            try:
                await apply_shared_forgets(services)
            except Exception as error:  # the store down: the rest of the pass still runs
                logger.warning("forgets made on other replicas not applied yet: %s", error)
            await services.ingest.sweep()
            PENDING_DELIVERIES.set(len(services.storage.pending()))
            # Claimed first: audio that came after its stored transcription is the call's.
            claims_began = time.time()
            undecided = await services.ingest.claim_stored_audio()
            services.storage.drop_unclaimed_audio(
                settings.audio_cache_ttl, keep=undecided, now=claims_began
            )
            if time.monotonic() - last_purge >= RETENTION_INTERVAL_SECONDS:
                last_purge = time.monotonic()
                await asyncio.to_thread(
                    purge_expired,
                    services.storage,
                    settings.webhook_retention_days,
                    settings.audio_cache_ttl,
                )
        except Exception:
            logger.exception("maintenance pass failed; trying again next interval")
        await asyncio.sleep(settings.pending_sweep_interval_seconds)


async def run_store_upkeep(services: Services) -> None:
    while True:
        await asyncio.sleep(STORE_UPKEEP_INTERVAL_SECONDS)
        try:
            await services.upkeep()
        except Exception:
            logger.exception("store upkeep failed; trying again next interval")
