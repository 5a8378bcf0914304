"""POST /webhooks/search-data: the agent's in-call memory search (an ElevenLabs server tool)."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Body, Header, HTTPException, status

from elaoms.dependencies import ServicesDep
from elaoms.memory.base import StoreUnavailableError
from elaoms.operations.metrics import STORE_ERRORS
from elaoms.phone import mask
from elaoms.search.schemas import SearchRequest, SearchResponse, search_response
from elaoms.search.service import CallerConflictError, resolve_caller
from elaoms.security import WorkspaceAuth

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


@router.post(
    "/search-data",
    response_model=SearchResponse,
    response_model_exclude_none=True,
    dependencies=[WorkspaceAuth],
    responses={
        400: {"description": "No query, no caller, or two different callers"},
        401: {"description": "Missing or wrong X-Api-Key, or no secret configured"},
        422: {"description": "limit outside 1..50, or a malformed body"},
    },
)
async def search_data(
    services: ServicesDep,
    body: Annotated[SearchRequest | None, Body()] = None,
    x_caller_id: Annotated[str | None, Header(alias="X-Caller-Id")] = None,
) -> SearchResponse:
    """Verbatim excerpts of the caller's earlier calls that best answer `query`.

    The caller is `user_id`, `caller_id` or the `X-Caller-Id` header, all of which the
    tool configuration must fill from `{{system__caller_id}}`, never from the LLM.
    """
    body = body or SearchRequest()
    query = (body.query or "").strip()
    if not query:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail="Missing query parameter")
    try:
        caller = resolve_caller(body.user_id, body.caller_id, x_caller_id)
    except CallerConflictError as error:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=str(error)) from None
    if caller is None:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            detail="Missing caller: send user_id or caller_id (from system__caller_id)",
        )
    try:
        result = await services.search.search(caller, query, body.limit)
    except StoreUnavailableError as error:
        # The agent is mid-sentence: an empty answer lets the call go on; operators get
        # the log line and elaoms_store_errors_total.
        STORE_ERRORS.labels("search").inc()
        logger.warning("search for %s answered empty: store unavailable (%s)", mask(caller), error)
        return SearchResponse(memories_found=0, context="", memories=[])
    return search_response(result)
