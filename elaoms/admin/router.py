"""Admin endpoints for data-protection requests: forget a caller, export a caller.

They exist only when ADMIN_API_KEY is set: without it every admin path answers 404, as if
there were no such endpoints. With it, `X-Admin-Key` must equal the key (compared in
constant time), else 401. The work is the same as `elaoms forget` and `elaoms export`.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Request, status

from elaoms.config import Settings
from elaoms.dependencies import ServicesDep, get_app_settings, get_auth_monitor
from elaoms.operations.privacy import export_caller, forget_caller
from elaoms.phone import WithheldCallerError, mask, operator_caller
from elaoms.security import secret_matches

logger = logging.getLogger(__name__)

ADMIN_KEY_HEADER = "X-Admin-Key"


# async: the failure monitor schedules its shared count on the running loop.
async def require_admin_key(
    request: Request,
    settings: Annotated[Settings, Depends(get_app_settings)],
    x_admin_key: Annotated[str | None, Header(alias=ADMIN_KEY_HEADER)] = None,
) -> None:
    if not settings.admin_api_key:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="Not Found")
    if secret_matches(x_admin_key, settings.admin_api_key):
        return
    source = request.client.host if request.client else None
    get_auth_monitor(request).record("admin_key", source)
    detail = (
        f"Missing {ADMIN_KEY_HEADER} header" if not x_admin_key else f"Invalid {ADMIN_KEY_HEADER}"
    )
    raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail)


router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin_key)])

_AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"description": "Missing or wrong X-Admin-Key"},
    404: {"description": "ADMIN_API_KEY is not set (no admin endpoints), or nothing is held"},
}


def _caller(caller_id: str) -> str:
    try:
        user_id = operator_caller(caller_id)
    except WithheldCallerError as error:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=str(error)) from None
    if not user_id:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail="Empty caller id")
    return user_id


@router.delete("/callers/{caller_id}", responses=_AUTH_RESPONSES)
async def forget(caller_id: str, services: ServicesDep) -> dict[str, Any]:
    """Delete everything about a caller in every store in use; says what was deleted.
    Idempotent: forgetting an unknown caller answers 200 with `found_anything: false`."""
    user_id = _caller(caller_id)
    report = await forget_caller(services, user_id)
    logger.warning("admin: caller %s forgotten", mask(user_id))
    return report.as_dict()


@router.get("/callers/{caller_id}/export", responses=_AUTH_RESPONSES)
async def export(
    caller_id: str, services: ServicesDep, include_audio: bool = False
) -> dict[str, Any]:
    """Everything held about a caller as one JSON document."""
    user_id = _caller(caller_id)
    document = await export_caller(services, user_id, include_audio=include_audio)
    if not (document["calls"] or document["memories"] or document["profile"] or document["files"]):
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="Nothing is held about this caller")
    logger.info("admin: caller %s exported", mask(user_id))
    return document
