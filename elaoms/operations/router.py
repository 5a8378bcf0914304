"""GET /metrics (Prometheus) and GET /ready (readiness: store and disk usable)."""

from __future__ import annotations

import asyncio
import os
import uuid

from fastapi import APIRouter, Response, status

from elaoms.dependencies import ServicesDep
from elaoms.operations.metrics import PENDING_DELIVERIES, render_metrics
from elaoms.services import Services

router = APIRouter(tags=["operations"])

READY_TIMEOUT_SECONDS = 2.0


@router.get("/metrics", response_class=Response)
async def metrics(services: ServicesDep) -> Response:
    # Pending files are shared on disk, so whichever worker is scraped counts them all.
    PENDING_DELIVERIES.set(len(await asyncio.to_thread(services.storage.pending)))
    body, content_type = render_metrics()
    return Response(content=body, media_type=content_type)


@router.get(
    "/ready",
    responses={503: {"description": "The store or the webhook directory is unusable"}},
)
async def ready(services: ServicesDep, response: Response) -> dict[str, object]:
    """Readiness: 200 only while the memory store answers and the webhook disk takes writes.
    `/health` stays a pure liveness check."""
    checks: dict[str, str] = {}
    try:
        await asyncio.wait_for(services.store.check(), timeout=READY_TIMEOUT_SECONDS)
        checks["store"] = "ok"
    except Exception as error:
        checks["store"] = f"unavailable: {error}"
    try:
        await asyncio.to_thread(_probe_disk, services)
        checks["webhook_storage"] = "ok"
    except OSError as error:
        checks["webhook_storage"] = f"unavailable: {error.strerror or error}"
    is_ready = all(value == "ok" for value in checks.values())
    if not is_ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return {"status": "ready" if is_ready else "not ready", "checks": checks}


def _probe_disk(services: Services) -> None:
    probe = services.storage.pending_root / f".ready-{uuid.uuid4().hex}"
    fd = os.open(
        probe, os.O_CREAT | os.O_WRONLY | os.O_EXCL, services.settings.file_permissions_mode
    )
    try:
        os.write(fd, b"ok")
        os.fsync(fd)
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)
