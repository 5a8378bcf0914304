"""The FastAPI application factory."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from elaoms import SERVICE_NAME, __version__
from elaoms.admin.router import router as admin_router
from elaoms.config import HMAC_PLACEHOLDER_PREFIX, Settings, get_settings
from elaoms.console.router import install_console
from elaoms.memory import MemoryStore
from elaoms.operations.logs import configure_logging
from elaoms.operations.maintenance import run_maintenance, run_store_upkeep
from elaoms.operations.middleware import (
    BodyLimitMiddleware,
    BodyPolicy,
    OperationsMiddleware,
    parse_networks,
)
from elaoms.operations.router import router as operations_router
from elaoms.personalization.router import router as client_data_router
from elaoms.search.router import router as search_router
from elaoms.services import Services
from elaoms.webhooks.router import router as post_call_router

logger = logging.getLogger("elaoms")


def create_app(settings: Settings | None = None, *, store: MemoryStore | None = None) -> FastAPI:
    """Build the service. `store` replaces the configured backend (tests inject faults)."""
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_format)
    services = Services.build(settings, store=store)
    store = services.store

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _warn_about_configuration(settings)
        try:
            await store.check()
        except Exception as error:  # keep serving: post-call queues until the store is back
            logger.error("memory store %s is not usable yet: %s", store.name, error)
        _tune_garbage_collector()
        background = [
            asyncio.create_task(run_maintenance(services), name="maintenance"),
            asyncio.create_task(run_store_upkeep(services), name="store-upkeep"),
        ]
        logger.info("ELAOMS %s ready (memory backend: %s)", __version__, store.name)
        try:
            yield
        finally:
            for task in background:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await services.close()

    app = FastAPI(
        title=SERVICE_NAME,
        version=__version__,
        description="Memory of every caller for ElevenLabs voice agents.",
        lifespan=lifespan,
    )
    app.state.services = services

    @app.exception_handler(UnicodeDecodeError)
    async def undecodable_body(request: Request, error: UnicodeDecodeError) -> JSONResponse:
        # FastAPI lets this escape as a 500 when a JSON body comes without a JSON content type.
        return JSONResponse(status_code=400, content={"detail": "Body is not valid UTF-8 JSON"})

    @app.get("/", tags=["service"])
    async def root() -> dict[str, str]:
        return {"service": SERVICE_NAME, "version": __version__, "status": "running"}

    @app.get("/health", tags=["service"])
    async def health() -> dict[str, str]:
        return {"status": "healthy"}

    # Added first so it runs inside OperationsMiddleware, which counts its refusals.
    small = BodyPolicy(settings.max_request_body_bytes, settings.request_body_timeout_seconds)
    app.add_middleware(
        BodyLimitMiddleware,
        default=small,
        routes={
            "/webhooks/post-call": BodyPolicy(
                settings.max_webhook_body_bytes, settings.post_call_body_timeout_seconds
            )
        },
        idle_seconds=settings.request_body_idle_timeout_seconds,
    )
    app.add_middleware(
        OperationsMiddleware,
        allowed_networks=parse_networks(settings.allowed_source_ips),
        trusted_proxy_header=settings.trusted_proxy_header,
    )
    # Routes are tried in order: the webhooks a caller waits on come first.
    app.include_router(client_data_router)
    app.include_router(search_router)
    app.include_router(post_call_router)
    app.include_router(operations_router)
    app.include_router(admin_router, include_in_schema=bool(settings.admin_api_key))
    install_console(app, services)  # only with CONSOLE_SECRET or ADMIN_API_KEY
    return app


# Young-generation collections every 50,000 allocations instead of 700: a request
# allocates hundreds of objects, so the default ran one or more collections per request.
GC_THRESHOLDS = (50_000, 20, 100)


def _tune_garbage_collector() -> None:
    """Keep the cyclic garbage collector off the request path.

    Everything alive once the app is up (framework, schemas, phone-number metadata) lives
    as long as the process: frozen, full collections no longer walk it. Under load these
    collections were the client-data tail (p99 56 ms -> 9 ms at 1,000 calls; see
    docs/performance.md). Garbage is still collected, only less often.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _warn_about_configuration(settings: Settings) -> None:
    if not settings.elevenlabs_post_call_hmac_key:
        logger.warning(
            "ELEVENLABS_POST_CALL_HMAC_KEY is not set: every post-call webhook will get 401"
        )
    elif settings.elevenlabs_post_call_hmac_key.startswith(HMAC_PLACEHOLDER_PREFIX):
        logger.warning(
            "ELEVENLABS_POST_CALL_HMAC_KEY is still the placeholder `elaoms setup` wrote: "
            "paste the secret ElevenLabs shows for the post-call webhook, or every delivery "
            "from ElevenLabs will get 401"
        )
    if not settings.elevenlabs_client_data_workspace_secret:
        if settings.allow_unauthenticated_webhooks:
            logger.warning(
                "ALLOW_UNAUTHENTICATED_WEBHOOKS=true: client-data and search-data accept requests "
                "WITHOUT authentication. Never run like this with real callers."
            )
        else:
            logger.warning(
                "ELEVENLABS_CLIENT_DATA_WORKSPACE_SECRET is not set: client-data and search-data "
                "will answer 401 to every request"
            )
