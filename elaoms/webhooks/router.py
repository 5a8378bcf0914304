"""POST /webhooks/post-call: verify the signature, keep the delivery, answer 200."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, HTTPException, Request, status

from elaoms.dependencies import AuthMonitorDep, IngestDep, SettingsDep
from elaoms.operations.anomaly import AuthFailureMonitor
from elaoms.webhooks.schemas import PostCallResponse
from elaoms.webhooks.signature import (
    SIGNATURE_HEADER,
    SignatureError,
    SignatureVerifier,
    check_timestamp,
    parse_signature_header,
)

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


@router.post(
    "/post-call",
    response_model=PostCallResponse,
    response_model_exclude_none=True,
    responses={
        401: {"description": "Missing, malformed, stale or wrong signature"},
        503: {"description": "Our own disk failed; ElevenLabs should retry"},
    },
)
async def post_call(
    request: Request, settings: SettingsDep, ingest: IngestDep, auth_monitor: AuthMonitorDep
) -> dict[str, object]:
    """ElevenLabs' post-call webhook (transcription, audio, initiation failure, any type).

    Signed with `ElevenLabs-Signature: t=...,v0=...`. Every verified delivery is on disk
    before the answer, which is 200 whatever the body holds.
    """
    secret = settings.elevenlabs_post_call_hmac_key
    source = request.client.host if request.client else None
    try:
        if not secret:
            raise SignatureError(
                "Post-call webhook is not configured: ELEVENLABS_POST_CALL_HMAC_KEY is not set"
            )
        header = parse_signature_header(request.headers.get(SIGNATURE_HEADER))
        check_timestamp(
            header.timestamp,
            max_age=settings.signature_max_age_seconds,
            max_future=settings.signature_max_future_seconds,
        )
        verifier = SignatureVerifier(secret, header)
    except SignatureError as error:
        raise _refused(auth_monitor, source, error) from None
    try:
        incoming = ingest.storage.incoming()
    except OSError as error:
        raise _storage_failed(error) from None
    try:
        # The body goes to a temporary file as it arrives (the MAC over the same stream):
        # never more than a chunk of it in memory (a smaller body never reaches the file),
        # and named only once the signature holds.
        try:
            async for chunk in request.stream():
                verifier.update(chunk)
                if incoming.write(chunk):
                    await asyncio.to_thread(incoming.flush)
            verifier.verify()
        except SignatureError as error:
            raise _refused(auth_monitor, source, error) from None
        acknowledgement = await ingest.receive(incoming)
    except OSError as error:
        raise _storage_failed(error) from None
    finally:
        incoming.discard()
    return acknowledgement.as_response()


def _refused(monitor: AuthFailureMonitor, source: str | None, error: Exception) -> HTTPException:
    monitor.record("post_call_signature", source)
    logger.warning("post-call delivery refused from %s: %s", source, error)
    return HTTPException(status.HTTP_401_UNAUTHORIZED, detail=str(error))


def _storage_failed(error: OSError) -> HTTPException:
    logger.error("could not write a post-call delivery to disk: %s", error)
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE, detail=f"storage unavailable: {error.strerror}"
    )
