"""POST /webhooks/search-data: the agent's in-call memory search (an ElevenLabs server tool)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, HTTPException, Request, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from elaoms.dependencies import get_services
from elaoms.memory.base import StoreUnavailableError
from elaoms.operations.metrics import STORE_ERRORS
from elaoms.payloads import encode
from elaoms.phone import CallerKind, mask
from elaoms.routing import WORKSPACE_SECRET_PARAMETER, PlainRoute
from elaoms.search.schemas import SearchRequest, SearchResponse, search_answer
from elaoms.search.service import NOTHING, CallerConflictError, resolve_caller
from elaoms.security import API_KEY_HEADER, require_workspace_secret

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/webhooks", tags=["webhooks"], route_class=PlainRoute)

CALLER_HEADER = "X-Caller-Id"


@router.post(
    "/search-data",
    response_model=SearchResponse,  # documents the answer; the endpoint sends it as is
    response_model_exclude_none=True,
    responses={
        400: {"description": "No query, no caller, or two different callers"},
        401: {"description": "Missing or wrong X-Api-Key, or no secret configured"},
        422: {"description": "limit outside 1..50, or a malformed body"},
    },
    openapi_extra={
        "parameters": [
            WORKSPACE_SECRET_PARAMETER,
            {
                "name": CALLER_HEADER,
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
                "description": "The caller, filled from {{system__caller_id}}",
            },
        ],
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": SearchRequest.model_json_schema()}},
        },
    },
)
async def search_data(request: Request) -> Response:
    """Verbatim excerpts of the caller's earlier calls that best answer `query`.

    The caller is `user_id`, `caller_id` or the `X-Caller-Id` header, all of which the
    tool configuration must fill from `{{system__caller_id}}`, never from the LLM.

    A `PlainRoute`, like client-data: the agent is mid-sentence while it runs.
    """
    await require_workspace_secret(request, request.headers.get(API_KEY_HEADER))
    body = await request.body()
    try:
        search = SearchRequest.model_validate_json(body) if body.strip() else SearchRequest()
    except ValidationError as error:
        # Without the input: `"limit": 1e400` is inf, which JSON cannot carry (the answer
        # was a 500), and a 4,301-digit limit cannot even be turned into text.
        raise RequestValidationError(
            error.errors(include_url=False, include_input=False), body=None
        ) from None
    query = (search.query or "").strip()
    if not query:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail="Missing query parameter")
    services = get_services(request)
    header = request.headers.get(CALLER_HEADER)
    try:
        identity = resolve_caller(search.user_id, search.caller_id, header)
    except CallerConflictError as error:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, detail=str(error)) from None
    if services.settings.search_caller_header_only and resolve_caller(header) != identity:
        # Body fields may be set to "LLM prompt" in the tool's configuration; a header can
        # only be a constant, a secret or a dynamic variable. Trust the header alone.
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            detail=f"Missing caller: SEARCH_CALLER_HEADER_ONLY needs the {CALLER_HEADER} "
            "header (from {{system__caller_id}})",
        )
    if identity.kind is CallerKind.NONE:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            detail="Missing caller: send user_id or caller_id (from system__caller_id)",
        )
    caller = identity.key
    if caller is None:
        # A withheld number is many strangers: nothing of anyone's is theirs to read. The
        # agent gets an ordinary empty answer and the call goes on.
        return Response(encode(search_answer(NOTHING)), media_type="application/json")
    try:
        answer = search_answer(await services.search.search(caller, query, search.limit))
    except StoreUnavailableError as error:
        # The agent is mid-sentence: an empty answer lets the call go on; operators get
        # the log line and elaoms_store_errors_total.
        STORE_ERRORS.labels("search").inc()
        logger.warning("search for %s answered empty: store unavailable (%s)", mask(caller), error)
        answer = search_answer(NOTHING)
    return Response(encode(answer), media_type="application/json")
