"""A route class for the hot webhooks, which answer while a call waits on them."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from elaoms.security import API_KEY_HEADER

# Documents the X-Api-Key header of a PlainRoute endpoint, which has no dependency to
# declare it.
WORKSPACE_SECRET_PARAMETER = {
    "name": API_KEY_HEADER,
    "in": "header",
    "required": False,
    "schema": {"type": "string"},
    "description": "The workspace secret (ELEVENLABS_CLIENT_DATA_WORKSPACE_SECRET)",
}


class PlainRoute(APIRoute):
    """A route whose endpoint takes the request and returns the response itself.

    FastAPI still reads the declaration (response model, parameters in `openapi_extra`)
    for the OpenAPI document, but at run time the endpoint is called as it is: no
    dependency resolution, no response validation (half of client-data's time went
    there). `dependencies=` would be ignored.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        return self.endpoint
