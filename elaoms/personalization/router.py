"""POST /webhooks/client-data: ElevenLabs asks, while an inbound call rings, what to say."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request, Response

from elaoms.dependencies import get_services
from elaoms.personalization.schemas import ClientDataRequest, ClientDataResponse
from elaoms.personalization.service import parse_request
from elaoms.routing import WORKSPACE_SECRET_PARAMETER, PlainRoute
from elaoms.security import API_KEY_HEADER, require_workspace_secret

router = APIRouter(prefix="/webhooks", tags=["webhooks"], route_class=PlainRoute)


@router.post(
    "/client-data",
    response_model=ClientDataResponse,  # documents the answer; the endpoint sends it as is
    response_model_exclude_none=True,
    responses={401: {"description": "Missing or wrong X-Api-Key"}},
    openapi_extra={
        "parameters": [WORKSPACE_SECRET_PARAMETER],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ClientDataRequest.model_json_schema()}},
        },
    },
)
async def client_data(request: Request) -> Response:
    """ElevenLabs' conversation-initiation client-data webhook (inbound Twilio and SIP).

    Always 200 with a `conversation_initiation_client_data` answer within
    CLIENT_DATA_TIMEOUT_MS: personalized from the caller's prepared profile, or the default
    one (every placeholder the agent declares, no overrides) when anything fails. The body
    is read by hand so that even an unreadable one gets a valid answer, not a 422.

    A `PlainRoute`: FastAPI's dependency resolution and response model took half of the
    endpoint's time (the answer is built as the JSON it is sent as). The secret is checked
    by the same function the other webhooks depend on.
    """
    await require_workspace_secret(request, request.headers.get(API_KEY_HEADER))
    personalization = get_services(request).personalization
    answer = await personalization.client_data(parse_request(await request.body()))
    return Response(orjson.dumps(answer), media_type="application/json")
