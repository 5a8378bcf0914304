"""Every setting of the service, read from the environment and `.env`.

One `Settings` object is built per process (`get_settings`). Tests and the CLI build their
own with overrides instead of mutating the environment.
"""

from __future__ import annotations

from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# What `elaoms setup` writes until the operator pastes the secret ElevenLabs shows.
HMAC_PLACEHOLDER_PREFIX = "replace-me-with-the-elevenlabs-webhook-secret-"


class MemoryBackend(StrEnum):
    SQLITE = "sqlite"
    OPENMEMORY = "openmemory"
    POSTGRES = "postgres"


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
    database_url: str = Field(
        default="",
        description="PostgreSQL to keep the memory in (MEMORY_BACKEND=postgres): "
        "postgresql://user:password@host:5432/database (libpq's URL; ?sslmode=... and the "
        "like pass through). Holds a password: never logged whole.",
    )
    database_pool_min_size: int = Field(
        default=1, ge=0, description="PostgreSQL connections each worker keeps open"
    )
    database_pool_max_size: int = Field(
        default=10, ge=1, description="Most PostgreSQL connections each worker opens at once"
    )
    database_caller_copies: int = Field(
        default=16_384,
        ge=0,
        description="Callers whose prepared profile each worker keeps a copy of, filled with "
        "the callers who called last as it starts (about 3.5 kB each: under 60 MB at the default): "
        "their client-data answer reads nothing from PostgreSQL",
    )
    database_timeout_seconds: float = Field(
        default=5.0,
        gt=0,
        description="How long a PostgreSQL request waits for a connection (then the store "
        "counts as unavailable: deliveries wait on disk and are retried)",
    )

    # ElevenLabs
    elevenlabs_api_key: str = ""
    elevenlabs_api_base_url: str = "https://api.elevenlabs.io"
    elevenlabs_post_call_hmac_key: str = ""
    elevenlabs_client_data_workspace_secret: str = ""
    allow_unauthenticated_webhooks: bool = False
    phone_default_region: str = Field(
        default="US",
        description="Where the phone lines are (ISO 3166 code: US, GB, FR, DE...): caller"
        " numbers sent without a country code are read as numbers of this region. Changing"
        " it changes the caller key of numbers stored in national form.",
    )
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
    max_delivery_attempts: int = Field(
        default=8,
        ge=1,
        description="Failed tries (retries and sweeps) after which a pending delivery that"
        " fails for another reason than the store being down moves to quarantine, with an"
        " alert. A payload that makes storing fail (a bug, not an outage) goes at once.",
    )
    pending_max_age_seconds: float = Field(
        default=2 * 86400,
        gt=0,
        description="How long a delivery may wait for a store that is down before it moves to"
        " quarantine with the last error and an alert (it can be requeued from there).",
    )
    # Audio deliveries are base64 MP3s: a one-hour call is ~75 MB. Bodies stream to disk,
    # so the limit bounds disk use per delivery, not memory.
    max_webhook_body_bytes: int = Field(
        default=256 * 1024 * 1024,
        gt=0,
        description="Largest post-call body accepted (bytes); larger ones get 413",
    )
    max_request_body_bytes: int = Field(
        default=64 * 1024,
        gt=0,
        description="Largest body of every other endpoint (client-data, search-data, admin)",
    )
    request_body_idle_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="A request whose body sends nothing for this long is dropped (408)",
    )
    request_body_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="Whole-body deadline of every endpoint but post-call (408 past it)",
    )
    post_call_body_timeout_seconds: float = Field(
        default=120.0,
        gt=0,
        description="Whole-body deadline of a post-call delivery (408 past it)",
    )

    # Operations
    anomaly_detection_enabled: bool = True
    anomaly_failure_threshold: int = 5
    anomaly_window_seconds: int = 300
    alert_on_quarantine_failures: bool = True
    alert_webhook_url: str = ""
    redis_url: str = ""
    redis_ttl: int = 3600
    redis_timeout_ms: int = Field(
        default=50,
        gt=0,
        description="How long one Redis operation may take before this process caches on"
        " its own for a few seconds: Redis is a shortcut on the call path, never a wait.",
    )
    file_permissions_mode: int = Field(
        default=0o600,
        description="Mode of every file the service writes, in octal (600, 0600 or 0o600).",
    )
    # Kept under another attribute name: `directory_permissions_mode` is the property that
    # falls back to the file mode plus execute bits when this is unset.
    directory_permissions_mode_setting: int | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "directory_permissions_mode", "directory_permissions_mode_setting"
        ),
        description="Mode of every directory the service creates, in octal (700, 0700 or "
        "0o700); default: FILE_PERMISSIONS_MODE plus the matching execute bits.",
    )
    enable_encryption_at_rest: bool = False
    encryption_key: str = ""
    admin_api_key: str = ""
    allowed_source_ips: str = ""
    trusted_proxy_header: str = ""

    # Operator console (/console)
    console_secret: str = Field(
        default="",
        description="Sign-in secret of the web console at /console; empty = ADMIN_API_KEY. "
        "With neither set there is no console (404).",
    )
    console_session_minutes: int = Field(
        default=480, ge=1, description="How long a console sign-in lasts."
    )

    # Search tool
    search_context_max_chars: int = 3000
    search_timeout_ms: int = 800
    search_caller_header_only: bool = Field(
        default=False,
        description=(
            "Take the search tool's caller from the X-Caller-Id header alone (body user_id "
            "and caller_id must then agree with it or be absent): a header cannot be filled "
            "by the agent's LLM, a body field can if the tool is misconfigured"
        ),
    )
    # auto: fuse sentence embeddings with BM25 when the `embeddings` extra is installed
    search_embeddings: Literal["auto", "off"] = "auto"
    search_embeddings_cache_size: int = 50_000  # turn vectors kept per process

    # Client data / personalization
    client_data_timeout_ms: int = 500
    user_context_max_chars: int = 1000
    greeting_data_collection_id: str = "next_call_greeting"
    greeting_disclosure: GreetingDisclosure = Field(
        default=GreetingDisclosure.NAME,
        description=(
            "What a first message may say to whoever presents a caller's number (caller ID "
            "can be spoofed): none, name (default), or name_and_topic (the last call's "
            "topic and follow-up, read aloud before anyone is verified)"
        ),
    )
    agent_profile_ttl: int = 3600
    agent_lookups_per_minute: float = Field(
        default=30.0,
        gt=0,
        description="Most ElevenLabs lookups of agents never seen before, per minute and process",
    )
    unknown_agent_ttl_seconds: float = Field(
        default=600.0,
        ge=0,
        description="How long an agent id the API does not know is not asked about again",
    )
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

    @field_validator("phone_default_region")
    @classmethod
    def _check_region(cls, region: str) -> str:
        import phonenumbers

        region = region.strip().upper()
        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"{region!r} is not an ISO 3166 region code phone numbers know")
        return region

    @field_validator("agent_config_dir", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `AGENT_CONFIG_DIR=` in .env means no folder, not the working directory.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("file_permissions_mode", "directory_permissions_mode_setting", mode="before")
    @classmethod
    def _parse_mode(cls, value: object) -> object:
        # A mode written as text is always octal, as chmod reads it: "600", "0600" and
        # "0o600" are all rw-------. Read as decimal, "600" became 0o1130 (owner locked
        # out, group may write). Only a Python int (0o600 in code) is taken as a number.
        if isinstance(value, str):
            return parse_octal_mode(value)
        return value

    # Refused at start-up, before any file is written. A valid file mode also makes a valid
    # derived directory mode (execute bits are added only where reading is allowed).
    @field_validator("file_permissions_mode")
    @classmethod
    def _check_file_mode(cls, mode: int) -> int:
        check_mode("FILE_PERMISSIONS_MODE", mode, owner=0o600)
        return mode

    @field_validator("directory_permissions_mode_setting")
    @classmethod
    def _check_directory_mode(cls, mode: int | None) -> int | None:
        if mode is not None:
            check_mode("DIRECTORY_PERMISSIONS_MODE", mode, owner=0o700)
        return mode

    @property
    def directory_permissions_mode(self) -> int:
        """DIRECTORY_PERMISSIONS_MODE, else the file mode plus the matching execute bits
        (0o600 -> 0o700)."""
        if self.directory_permissions_mode_setting is not None:
            return self.directory_permissions_mode_setting
        mode = self.file_permissions_mode
        return mode | ((mode & 0o444) >> 2)

    @property
    def audio_storage_path(self) -> Path:
        return self.webhook_storage_path / "_audio"

    @property
    def pending_path(self) -> Path:
        return self.webhook_storage_path / "_pending"

    @property
    def console_sign_in_secret(self) -> str:
        return self.console_secret or self.admin_api_key

    @property
    def webhooks_authenticated(self) -> bool:
        return bool(self.elevenlabs_client_data_workspace_secret)


def parse_octal_mode(text: str) -> int:
    """ "600", "0600", "0o600" -> 0o600; anything else that is not octal is refused."""
    cleaned = text.strip().lower()
    digits = cleaned[2:] if cleaned.startswith("0o") else cleaned
    if not digits or any(char not in "01234567" for char in digits):
        hint = ""
        if digits.isdigit():  # the decimal spelling older examples used ("384" = 0o600)
            hint = f"; as a decimal number it would be {int(digits):o}, so write that"
        raise ValueError(
            f"{text!r} is not an octal file mode (write it like 600, 0600 or 0o600{hint})"
        )
    mode = int(digits, 8)
    if mode > 0o7777:
        raise ValueError(f"{text!r} is not a file mode (at most four octal digits)")
    return mode


def check_mode(name: str, mode: int, *, owner: int) -> None:
    """Refuse a mode that locks the service out of its own files or opens them to others:
    the owner needs `owner` (rw for files, rwx for directories); the group may read, never
    write; others get nothing (transcripts and phone numbers are personal data)."""
    problems = []
    if mode & owner != owner:
        problems.append(f"the owner needs {_symbolic(owner)}")
    if mode & 0o020:
        problems.append("the group must not write")
    if mode & 0o007:
        problems.append("others must get no access")
    if mode & ~0o777:
        problems.append("no setuid, setgid or sticky bit")
    if problems:
        raise ValueError(
            f"{name}={mode:04o} ({_symbolic(mode)}) is refused: {'; '.join(problems)}"
            f" (e.g. {owner:o} or {owner | (owner & 0o500) >> 3:o})"
        )


def _symbolic(mode: int) -> str:
    return "".join(
        letter if mode & bit else "-"
        for bit, letter in zip(
            (0o400, 0o200, 0o100, 0o040, 0o020, 0o010, 0o004, 0o002, 0o001),
            "rwxrwxrwx",
            strict=True,
        )
    )


@lru_cache
def get_settings() -> Settings:
    return Settings()
