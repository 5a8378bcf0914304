"""FastAPI dependencies: the per-app services, typed for the routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from elaoms.config import Settings
from elaoms.memory.base import MemoryStore
from elaoms.operations.anomaly import AuthFailureMonitor
from elaoms.services import Services
from elaoms.webhooks.service import IngestService


def get_services(request: Request) -> Services:
    return request.app.state.services


def get_app_settings(request: Request) -> Settings:
    return get_services(request).settings


def get_store(request: Request) -> MemoryStore:
    return get_services(request).store


def get_ingest(request: Request) -> IngestService:
    return get_services(request).ingest


def get_auth_monitor(request: Request) -> AuthFailureMonitor:
    return get_services(request).auth_monitor


ServicesDep = Annotated[Services, Depends(get_services)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
StoreDep = Annotated[MemoryStore, Depends(get_store)]
IngestDep = Annotated[IngestService, Depends(get_ingest)]
AuthMonitorDep = Annotated[AuthFailureMonitor, Depends(get_auth_monitor)]
