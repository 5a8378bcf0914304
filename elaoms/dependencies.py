"""FastAPI dependencies: the per-app services, typed for the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from elaoms.config import Settings
from elaoms.memory.base import MemoryStore
from elaoms.operations.anomaly import AuthFailureMonitor
from elaoms.webhooks.service import IngestService


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> MemoryStore:
    return request.app.state.store


def get_ingest(request: Request) -> IngestService:
    return request.app.state.ingest


def get_auth_monitor(request: Request) -> AuthFailureMonitor:
    return request.app.state.auth_monitor


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
StoreDep = Annotated[MemoryStore, Depends(get_store)]
IngestDep = Annotated[IngestService, Depends(get_ingest)]
AuthMonitorDep = Annotated[AuthFailureMonitor, Depends(get_auth_monitor)]
