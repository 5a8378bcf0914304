"""POST /webhooks/client-data: ElevenLabs asks, while an inbound call rings, what to say."""

from __future__ import annotations

from fastapi import APIRouter, Request

from elaoms.dependencies import ServicesDep
from elaoms.personalization.schemas import ClientDataRequest, ClientDataResponse
from elaoms.personalization.service import parse_request
from elaoms.security import WorkspaceAuth

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


@router.post(
    "/client-data",
    response_model=ClientDataResponse,
    response_model_exclude_none=True,
    dependencies=[WorkspaceAuth],
    responses={401: {"description": "Missing or wrong X-Api-Key"}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ClientDataRequest.model_json_schema()}},
        }
    },
)
async def client_data(request: Request, services: ServicesDep) -> ClientDataResponse:
    """ElevenLabs' conversation-initiation client-data webhook (inbound Twilio and SIP).

    Always 200 with a `conversation_initiation_client_data` answer within
    CLIENT_DATA_TIMEOUT_MS: personalized from the caller's prepared profile, or the default
    one (every placeholder the agent declares, no overrides) when anything fails. The body
    is read by hand so that even an unreadable one gets a valid answer, not a 422.
    """
    request_data = parse_request(await request.body())
    return await services.personalization.client_data(request_data)
