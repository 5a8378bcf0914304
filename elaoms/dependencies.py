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
    services: Services = request.app.state.services
    return services


def get_app_settings(request: Request) -> Settings:
    return get_services(request).settings


def get_store(request: Request) -> MemoryStore:
    return get_services(request).store


def get_ingest(request: Request) -> IngestService:
    return get_services(request).ingest


def get_auth_monitor(request: Request) -> AuthFailureMonitor:
    return get_services(request).auth_monitor


# FastAPI runs a plain `def` dependency in its thread pool: a thread hop per dependency
# per request (a third of client-data's time under load). The ones below are `async def`.
async def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def _settings(request: Request) -> Settings:
    return get_services(request).settings


async def _store(request: Request) -> MemoryStore:
    return get_services(request).store


async def _ingest(request: Request) -> IngestService:
    return get_services(request).ingest


async def _auth_monitor(request: Request) -> AuthFailureMonitor:
    return get_services(request).auth_monitor


ServicesDep = Annotated[Services, Depends(_services)]
SettingsDep = Annotated[Settings, Depends(_settings)]
StoreDep = Annotated[MemoryStore, Depends(_store)]
IngestDep = Annotated[IngestService, Depends(_ingest)]
AuthMonitorDep = Annotated[AuthFailureMonitor, Depends(_auth_monitor)]
