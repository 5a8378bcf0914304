"""Header authentication for the client-data webhook and the search tool.

ElevenLabs sends `X-Api-Key` with the workspace secret the owner configured (no HMAC on
these two hooks). Without a configured secret every request is refused, unless
ALLOW_UNAUTHENTICATED_WEBHOOKS=true opens them for local experiments.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, HTTPException, Request, status

from elaoms.dependencies import get_app_settings, get_auth_monitor

API_KEY_HEADER = "X-Api-Key"


def secret_matches(given: str | None, expected: str) -> bool:
    if not given or not expected:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


async def require_workspace_secret(
    request: Request,
    x_api_key: Annotated[str | None, Header(alias=API_KEY_HEADER)] = None,
) -> None:
    settings = get_app_settings(request)  # not a Depends: a sync one runs in a thread
    expected = settings.elevenlabs_client_data_workspace_secret
    if not expected and settings.allow_unauthenticated_webhooks:
        return
    if secret_matches(x_api_key, expected):
        return
    source = request.client.host if request.client else None
    get_auth_monitor(request).record(f"api_key:{request.url.path}", source)
    if not expected:
        detail = (
            "Webhook authentication is not configured: set ELEVENLABS_CLIENT_DATA_WORKSPACE_SECRET"
        )
    elif not x_api_key:
        detail = f"Missing {API_KEY_HEADER} header"
    else:
        detail = f"Invalid {API_KEY_HEADER}"
    raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail=detail)


WorkspaceAuth = Depends(require_workspace_secret)
