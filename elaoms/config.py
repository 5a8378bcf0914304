"""Every setting of the service, read from the environment and `.env`.

One `Settings` object is built per process (`get_settings`). Tests and the CLI build their
own with overrides instead of mutating the environment.
"""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# What `elaoms setup` writes until the operator pastes the secret ElevenLabs shows.
HMAC_PLACEHOLDER_PREFIX = "replace-me-with-the-elevenlabs-webhook-secret-"


class MemoryBackend(StrEnum):
    SQLITE = "sqlite"
    OPENMEMORY = "openmemory"


class GreetingDisclosure(StrEnum):
    """How much a greeting may reveal: a caller ID can be spoofed."""

    NONE = "none"
    NAME = "name"
    NAME_AND_TOPIC = "name_and_topic"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # Service
    host: str = "0.0.0.0"
    port: int = 8000
    log_level: str = "INFO"
    log_format: str = Field(default="text", pattern="^(text|json)$")

    # Memory store
    memory_backend: MemoryBackend = MemoryBackend.SQLITE
    sqlite_path: Path = Path("data/memory.sqlite3")
    openmemory_url: str = "http://localhost:8080"
    openmemory_api_key: str = ""
    openmemory_timeout_seconds: float = 5.0
    openmemory_retry_base_delay_seconds: float = 0.2
    # Whole payloads, the call index and caller profiles stay local with OpenMemory too.
    openmemory_ledger_path: Path = Path("data/openmemory-ledger.sqlite3")

    # ElevenLabs
    elevenlabs_api_key: str = ""
    elevenlabs_api_base_url: str = "https://api.elevenlabs.io"
    elevenlabs_post_call_hmac_key: str = ""
    elevenlabs_client_data_workspace_secret: str = ""
    allow_unauthenticated_webhooks: bool = False
    signature_max_age_seconds: int = 30 * 60
    signature_max_future_seconds: int = 5 * 60

    # Webhook storage and delivery
    webhook_storage_path: Path = Path("data/webhooks")
    webhook_quarantine_path: Path = Path("data/webhooks/quarantine")
    audio_cache_ttl: int = 3600
    webhook_retention_days: int = 30
    max_retries: int = 3
    retry_base_delay_seconds: float = 1.0
    pending_sweep_interval_seconds: float = 30.0
    post_call_store_timeout_ms: int = 2000
    max_webhook_body_bytes: int = 64 * 1024 * 1024

    # Operations
    anomaly_detection_enabled: bool = True
    anomaly_failure_threshold: int = 5
    anomaly_window_seconds: int = 300
    alert_on_quarantine_failures: bool = True
    alert_webhook_url: str = ""
    redis_url: str = ""
    redis_ttl: int = 3600
    file_permissions_mode: int = 0o600
    enable_encryption_at_rest: bool = False
    encryption_key: str = ""
    admin_api_key: str = ""
    allowed_source_ips: str = ""
    trusted_proxy_header: str = ""

    # Search tool
    search_context_max_chars: int = 3000
    search_timeout_ms: int = 800
    # auto: fuse sentence embeddings with BM25 when the `embeddings` extra is installed
    search_embeddings: Literal["auto", "off"] = "auto"
    search_embeddings_cache_size: int = 50_000  # turn vectors kept per process

    # Client data / personalization
    client_data_timeout_ms: int = 500
    user_context_max_chars: int = 1000
    greeting_data_collection_id: str = "next_call_greeting"
    greeting_disclosure: GreetingDisclosure = GreetingDisclosure.NAME_AND_TOPIC
    agent_profile_ttl: int = 3600
    agent_config_dir: Path | None = Field(
        default=None,
        description="folder of agent configurations as files, `<agent_id>.json` as exported "
        "by `GET /v1/convai/agents/{id}`: used instead of the API (no ELEVENLABS_API_KEY needed)",
    )
    elevenlabs_api_timeout_seconds: float = 2.0
    llm_base_url: str = ""
    llm_api_key: str = ""
    llm_model: str = ""
    llm_timeout_seconds: float = 20.0

    @field_validator("agent_config_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `AGENT_CONFIG_DIR=` in .env means no folder, not the working directory.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("file_permissions_mode", mode="before")
    @classmethod
    def _parse_mode(cls, value: object) -> object:
        # Accept "384", "0o600" and "600"-style octal strings from .env files.
        if isinstance(value, str):
            text = value.strip().lower()
            if text.startswith("0o"):
                return int(text, 8)
            if text.startswith("0") and len(text) > 1:
                return int(text, 8)
            return int(text)
        return value

    @property
    def directory_permissions_mode(self) -> int:
        """Directories get the file mode plus the matching execute bits (0o600 -> 0o700)."""
        mode = self.file_permissions_mode
        return mode | ((mode & 0o444) >> 2)

    @property
    def audio_storage_path(self) -> Path:
        return self.webhook_storage_path / "_audio"

    @property
    def pending_path(self) -> Path:
        return self.webhook_storage_path / "_pending"

    @property
    def webhooks_authenticated(self) -> bool:
        return bool(self.elevenlabs_client_data_workspace_secret)


@lru_cache
def get_settings() -> Settings:
    return Settings()
