"""The service's parts, wired once from settings; shared by the web app and the CLI."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from elaoms.config import Settings
from elaoms.crypto import PayloadCipher
from elaoms.elevenlabs.agent_profiles import AgentProfiles
from elaoms.elevenlabs.client import ElevenLabsClient
from elaoms.memory import MemoryStore, create_store
from elaoms.operations.alerts import AlertSink
from elaoms.operations.anomaly import AuthFailureMonitor
from elaoms.operations.cache import TwoLevelCache, use_caller_key_secret
from elaoms.personalization.greeting import LLMGreetingWriter
from elaoms.personalization.service import PersonalizationService
from elaoms.phone import use_default_region
from elaoms.search import embeddings
from elaoms.search.indexes import CallerIndexes
from elaoms.search.service import SearchService
from elaoms.webhooks.service import IngestService
from elaoms.webhooks.storage import WebhookStorage

logger = logging.getLogger(__name__)


@dataclass
class Services:
    settings: Settings
    cipher: PayloadCipher
    storage: WebhookStorage
    store: MemoryStore
    indexes: CallerIndexes
    ingest: IngestService
    auth_monitor: AuthFailureMonitor
    alerts: AlertSink
    cache: TwoLevelCache
    elevenlabs: ElevenLabsClient
    agents: AgentProfiles
    personalization: PersonalizationService
    search: SearchService

    @classmethod
    def build(
        cls, settings: Settings, *, store: MemoryStore | None = None, serving: bool = True
    ) -> Services:
        """Wire every part. `store` replaces the configured backend (tests inject faults);
        `serving` is False for a one-shot command (see `create_store`)."""
        # Files other libraries create for us (SQLite's -wal and -shm, temp files) must be
        # as private as ours: the umask makes FILE_PERMISSIONS_MODE the process default.
        os.umask(0o777 & ~settings.directory_permissions_mode)
        use_default_region(settings.phone_default_region)
        cipher = PayloadCipher(settings.encryption_key, enabled=settings.enable_encryption_at_rest)
        storage = WebhookStorage(settings, cipher)
        storage.prepare()
        store = store or create_store(settings, cipher, serving=serving)
        alerts = AlertSink(
            settings.alert_webhook_url, min_interval_seconds=settings.anomaly_window_seconds
        )
        # Any secret all replicas share keys the caller hashes in Redis (a rotation only
        # costs cache misses).
        use_caller_key_secret(
            settings.elevenlabs_client_data_workspace_secret
            or settings.elevenlabs_post_call_hmac_key
            or settings.encryption_key
        )
        cache = TwoLevelCache(
            settings.redis_url,
            redis_ttl=settings.redis_ttl,
            operation_timeout=settings.redis_timeout_ms / 1000,
        )
        # Callers' search indexes: one cache per process, whichever backend holds them.
        vectors = embeddings.vector_cache(settings)
        indexes = CallerIndexes(store, vectors=vectors)
        ingest = IngestService(
            settings, store, storage, alerts=alerts, receipts=cache, indexes=indexes
        )
        auth_monitor = AuthFailureMonitor(
            enabled=settings.anomaly_detection_enabled,
            threshold=settings.anomaly_failure_threshold,
            window_seconds=settings.anomaly_window_seconds,
            alerts=alerts,
            counter=cache,
            store=store,
        )
        elevenlabs = ElevenLabsClient.from_settings(settings)
        agents = AgentProfiles(
            elevenlabs,
            store,
            cache,
            ttl=settings.agent_profile_ttl,
            unknown_ttl=settings.unknown_agent_ttl_seconds,
            lookups_per_minute=settings.agent_lookups_per_minute,
            config_dir=settings.agent_config_dir,
        )
        personalization = PersonalizationService(
            settings, store, cache, agents, LLMGreetingWriter.from_settings(settings)
        )
        ingest.hooks.append(personalization.on_call_stored)
        ingest.history_read = personalization.history_to_read
        if vectors is not None:
            ingest.hooks.append(embeddings.warm_after_call(vectors))
        search = SearchService(
            indexes,
            context_max_chars=settings.search_context_max_chars,
            timeout_ms=settings.search_timeout_ms,
        )
        return cls(
            settings=settings,
            cipher=cipher,
            storage=storage,
            store=store,
            indexes=indexes,
            ingest=ingest,
            auth_monitor=auth_monitor,
            alerts=alerts,
            cache=cache,
            elevenlabs=elevenlabs,
            agents=agents,
            personalization=personalization,
            search=search,
        )

    async def upkeep(self) -> None:
        """The store's own upkeep, then the search indexes the last calls left behind."""
        await self.store.maintain()
        await self.indexes.maintain()

    async def close(self) -> None:
        await self.ingest.drain()
        try:  # the upkeep the last calls left (their indexes): a restart finds it done
            await self.upkeep()
        except Exception as error:
            logger.warning("store upkeep on close failed: %s", error)
        await self.personalization.close()
        await self.elevenlabs.aclose()
        await self.cache.close()
        await self.store.close()
