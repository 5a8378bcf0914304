"""The prepared profile reflects every stored call, however the deliveries race."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

import httpx

from elaoms.payloads import decode

from conftest import WORKSPACE_SECRET, ServiceProcess, signed_headers, transcription, wait_until

CALLERS = 40
CALLS_PER_CALLER = 3
FIRST_START = 1_760_000_000


def deliveries() -> list[dict[str, Any]]:
    payloads = []
    for call in range(CALLS_PER_CALLER):
        for caller in range(CALLERS):
            payload = transcription(
                f"conv_race_{caller:02d}_{call}",
                f"+1415555{7000 + caller:04d}",
                turns=[("user", f"Call number {call} about the crown.")],
            )
            payload["data"]["metadata"]["start_time_unix_secs"] = FIRST_START + call * 3600
            payloads.append(payload)
    return payloads


async def deliver_at_once(url: str, payloads: list[dict[str, Any]]) -> list[int]:
    async with httpx.AsyncClient(
        base_url=url, timeout=60, limits=httpx.Limits(max_connections=len(payloads))
    ) as client:

        async def send(payload: dict[str, Any]) -> int:
            body = json.dumps(payload).encode()
            response = await client.post(
                "/webhooks/post-call", content=body, headers=signed_headers(body)
            )
            return response.status_code

        return await asyncio.gather(*(send(payload) for payload in payloads))


def profiles(database: Path) -> dict[str, dict[str, Any]]:
    with sqlite3.connect(database) as connection:
        rows = connection.execute("SELECT user_id, profile FROM caller_profiles").fetchall()
    return {user_id: decode(bytes(blob)) for user_id, blob in rows}


def test_three_deliveries_of_each_of_40_callers_at_once_leave_profiles_with_every_call(
    tmp_path: Path,
) -> None:
    server = ServiceProcess(
        tmp_path,
        command=[
            sys.executable,
            "-m",
            "gunicorn",
            "main:app",
            "-w",
            "3",
            "-k",
            "uvicorn.workers.UvicornWorker",
            "-b",
            "127.0.0.1:{port}",
        ],
    ).start(timeout=40)
    try:
        statuses = asyncio.run(deliver_at_once(server.url, deliveries()))
        assert set(statuses) == {200}
        pending = tmp_path / "webhooks" / "_pending"
        # Gone from the queue only once every hook (the profile) has run.
        wait_until(lambda: not list(pending.iterdir()), timeout=90)
        prepared = profiles(tmp_path / "memory.sqlite3")
        stale = {
            user_id: (profile["call_count"], profile["last_call_at"])
            for user_id, profile in prepared.items()
            if profile["call_count"] != CALLS_PER_CALLER
            or profile["last_call_at"] != FIRST_START + (CALLS_PER_CALLER - 1) * 3600
        }
        assert len(prepared) == CALLERS
        assert not stale, f"{len(stale)} of {CALLERS} profiles miss a call: {stale}"
        # And client-data answers from it, whichever worker answers: at once with Redis,
        # here within the few seconds a worker keeps its own copy (CALLER_LOCAL_TTL).
        with httpx.Client(base_url=server.url, timeout=30) as client:

            def call_count(caller: int) -> int:
                answer = client.post(
                    "/webhooks/client-data",
                    json={"caller_id": f"+1415555{7000 + caller:04d}"},
                    headers={"X-Api-Key": WORKSPACE_SECRET},
                ).json()
                return int(answer["dynamic_variables"]["call_count"])

            for caller in range(CALLERS):
                wait_until(lambda c=caller: call_count(c) == CALLS_PER_CALLER, timeout=30)
    finally:
        server.stop()
