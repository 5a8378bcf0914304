"""Memory stores: one interface (`MemoryStore`), one file per backend."""

from __future__ import annotations

from elaoms.config import MemoryBackend, Settings
from elaoms.crypto import PayloadCipher
from elaoms.memory.base import (
    CallReceipt,
    IndexState,
    Memory,
    MemoryStore,
    MemoryVersion,
    SavedIndex,
    StoredCall,
    StoreUnavailableError,
)

__all__ = [
    "CallReceipt",
    "IndexState",
    "Memory",
    "MemoryStore",
    "MemoryVersion",
    "SavedIndex",
    "StoreUnavailableError",
    "StoredCall",
    "create_store",
]


def create_store(
    settings: Settings, cipher: PayloadCipher | None = None, *, serving: bool = True
) -> MemoryStore:
    """The store `MEMORY_BACKEND` names, configured from `settings`. `serving`: for the
    service, which keeps copies of what it reads (a one-shot command reads each time)."""
    if settings.memory_backend is MemoryBackend.OPENMEMORY:
        from elaoms.memory.openmemory import OpenMemoryStore

        return OpenMemoryStore.from_settings(settings, cipher)
    if settings.memory_backend is MemoryBackend.POSTGRES:
        from elaoms.memory.postgres import PostgresStore

        return PostgresStore.from_settings(settings, cipher, listen=serving)
    from elaoms.memory.sqlite import SQLiteStore

    return SQLiteStore(
        settings.sqlite_path,
        file_mode=settings.file_permissions_mode,
        dir_mode=settings.directory_permissions_mode,
        cipher=cipher,
    )
