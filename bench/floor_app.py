"""The floor for bench/load.py: the same framework answering a constant JSON, nothing else.

Started by the benchmark with the same gunicorn command as the service
(`gunicorn floor_app:app -w 1 -k uvicorn.workers.UvicornWorker`), so the difference
between the two is the cost of ELAOMS, not of FastAPI, uvicorn, gunicorn or the client.
"""

from __future__ import annotations

from fastapi import FastAPI

ANSWER = {
    "type": "conversation_initiation_client_data",
    "dynamic_variables": {"caller_id": "", "call_count": 0, "is_returning_caller": False},
}

app = FastAPI()


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "healthy"}


@app.post("/floor")
async def floor() -> dict[str, object]:
    return ANSWER
