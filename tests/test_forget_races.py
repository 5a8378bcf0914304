"""Forget while the service is still working on the caller: nothing comes back afterwards."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from conftest import ServiceProcess, transcription, wait_until
from standins import LLMStandIn, ask, deliver

CALLER = "+13125550177"
ADMIN_KEY = "admin-key-for-forget-race-tests"


def profiles(data_dir: Path) -> int:
    with sqlite3.connect(data_dir / "memory.sqlite3") as connection:
        (count,) = connection.execute("SELECT COUNT(*) FROM caller_profiles").fetchone()
    return int(count)


def test_a_caller_forgotten_while_their_greeting_is_written_is_not_greeted_by_name_after(
    tmp_path: Path,
) -> None:
    writing, release = threading.Event(), threading.Event()

    def slow_greeting(messages: list[dict[str, Any]]) -> str:
        writing.set()
        release.wait(60)  # held until the caller has been forgotten
        return "Hi Maria, welcome back to Brightside Dental! How can I help today?"

    with LLMStandIn(slow_greeting) as llm:
        env = {
            "LLM_BASE_URL": llm.url,
            "LLM_API_KEY": "sk-test",
            "LLM_MODEL": "stand-in-1",
            "GREETING_DISCLOSURE": "name_and_topic",  # the LLM writes greetings only here
            "ADMIN_API_KEY": ADMIN_KEY,
        }
        server = ServiceProcess(tmp_path, env=env).start()
        try:
            with server.client() as client:
                payload = transcription("conv_forget_race", caller=CALLER)
                delivery = threading.Thread(target=deliver, args=(client, payload))
                delivery.start()
                assert writing.wait(30), "the greeting was never asked for"
                response = client.delete(
                    "/admin/callers/%2B13125550177", headers={"X-Admin-Key": ADMIN_KEY}
                )
                assert response.status_code == 200, response.text
                release.set()
                delivery.join(30)
                # The greeting's writer has finished, one way or the other.
                wait_until(
                    lambda: (
                        "profile of ***0177 prepared" in server.logs()
                        or "profile of ***0177 not kept" in server.logs()
                    )
                )
                answer, _ = ask(client, CALLER, payload["data"]["agent_id"])
                assert answer["dynamic_variables"]["call_count"] == 0
                assert "Maria" not in json.dumps(answer)
                assert profiles(server.data_dir) == 0
        finally:
            release.set()
            server.stop()
