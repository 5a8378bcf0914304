"""A newcomer's first hour: `elaoms demo` against a running service, and a greeting that
says why it is withheld. No ElevenLabs API key anywhere: agent configurations come from
files (AGENT_CONFIG_DIR, or the demo agent bundled with the package)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from elaoms.elevenlabs.agent_profiles import AgentConfigFiles

from conftest import (
    HMAC_KEY,
    REPO_ROOT,
    WORKSPACE_SECRET,
    ServiceProcess,
    base_env,
    load_fixture,
    signed_headers,
    transcription,
    wait_until,
)


def elaoms(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The command as an operator runs it, in their folder, with no API key."""
    environment = {**os.environ, **env, "PYTHONPATH": str(REPO_ROOT)}
    environment.pop("ELEVENLABS_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "elaoms.cli", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_demo_shows_a_personalized_greeting_and_a_search_hit_without_any_api_key(
    tmp_path: Path,
) -> None:
    server = ServiceProcess(tmp_path / "service").start()
    try:
        env = base_env(tmp_path / "service")
        shown = elaoms(tmp_path, env, "demo", "--url", server.url)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert "Hi Maria, welcome back" in shown.stdout
        assert "Sofia" in shown.stdout  # the search tool's excerpt
        answers = json.loads(elaoms(tmp_path, env, "demo", "--url", server.url, "--json").stdout)
    finally:
        server.stop()
    greeting = answers["client_data"]["conversation_config_override"]["agent"]["first_message"]
    assert greeting.startswith("Hi Maria")
    assert answers["search_data"]["memories_found"] >= 1
    assert "+14155550123" not in server.logs()  # masked, as every log line


def test_the_demo_reads_the_service_address_and_secrets_from_the_env_file(
    tmp_path: Path,
) -> None:
    server = ServiceProcess(tmp_path / "service").start()
    try:
        folder = tmp_path / "project"
        folder.mkdir()
        (folder / ".env").write_text(
            f"HOST=127.0.0.1\nPORT={server.port}\nELEVENLABS_POST_CALL_HMAC_KEY={HMAC_KEY}\n"
            f"ELEVENLABS_CLIENT_DATA_WORKSPACE_SECRET={WORKSPACE_SECRET}\n"
        )
        clean = {
            name: value
            for name, value in os.environ.items()
            if not name.startswith(("ELEVENLABS_", "HOST", "PORT"))
        }
        completed = subprocess.run(
            [sys.executable, "-m", "elaoms.cli", "demo"],
            cwd=folder,
            env={**clean, "PYTHONPATH": str(REPO_ROOT)},
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.stop()
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "Hi Maria, welcome back" in completed.stdout


def test_the_demo_without_a_running_service_says_how_to_start_one(tmp_path: Path) -> None:
    env = base_env(tmp_path) | {"PORT": "9", "HOST": "127.0.0.1"}
    completed = elaoms(tmp_path, env, "demo")
    assert completed.returncode == 1
    assert "no service answers at http://127.0.0.1:9" in completed.stderr
    assert "make run" in completed.stderr
    assert "Traceback" not in completed.stderr


def post_call(server: ServiceProcess, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    with server.client() as client:
        response = client.post("/webhooks/post-call", content=body, headers=signed_headers(body))
    assert response.json()["status"] == "received", response.text


def client_data(server: ServiceProcess, caller: str, agent_id: str) -> dict[str, Any]:
    request = load_fixture("client_data_request") | {"caller_id": caller, "agent_id": agent_id}
    with server.client() as client:
        response = client.post(
            "/webhooks/client-data", json=request, headers={"X-Api-Key": WORKSPACE_SECRET}
        )
    answer: dict[str, Any] = response.json()
    return answer


def test_an_agent_configuration_exported_to_a_file_enables_the_greeting_without_the_api(
    tmp_path: Path,
) -> None:
    agent = load_fixture("agent")
    agents = tmp_path / "agents"
    agents.mkdir()
    server = ServiceProcess(tmp_path / "service", env={"AGENT_CONFIG_DIR": str(agents)}).start()
    caller = "+14155550611"
    try:
        post_call(server, transcription("conv_file_agent", caller))
        wait_until(lambda: client_data(server, caller, agent["agent_id"])["dynamic_variables"][
            "call_count"] == 1, timeout=60)  # fmt: skip
        # Without the file: the agent is unknown, no override (one not allowed fails a call).
        before = client_data(server, caller, agent["agent_id"])
        assert "conversation_config_override" not in before
        env = base_env(tmp_path / "service", AGENT_CONFIG_DIR=str(agents))
        withheld = elaoms(tmp_path, env, "first-message", caller)
        assert withheld.returncode == 0, withheld.stderr
        assert "ELEVENLABS_API_KEY is not set" in withheld.stdout
        assert f"has no {agent['agent_id']}.json" in withheld.stdout
        profile = elaoms(tmp_path, env, "profile", caller)
        assert "greeting sent" in profile.stdout and "ELEVENLABS_API_KEY" in profile.stdout

        (agents / f"{agent['agent_id']}.json").write_text(json.dumps(agent))
        after = client_data(server, caller, agent["agent_id"])
        greeting = after["conversation_config_override"]["agent"]["first_message"]
        assert greeting.startswith("Hi Maria, welcome back to Brightside Dental")
        assert "caller_name" in after["dynamic_variables"]  # the agent's placeholders
        shown = elaoms(tmp_path, env, "first-message", caller)
        assert "Hi Maria, welcome back" in shown.stdout
    finally:
        server.stop()
    assert "ELEVENLABS_API_KEY is not set" in server.logs()
    assert "AGENT_CONFIG_DIR" in server.logs()  # the log says how to get a greeting


def test_an_agent_that_does_not_allow_the_override_is_named_as_the_reason(
    tmp_path: Path,
) -> None:
    agent = load_fixture("agent")
    agent["platform_settings"]["overrides"]["conversation_config_override"]["agent"][
        "first_message"
    ] = False
    agents = tmp_path / "agents"
    agents.mkdir()
    (agents / f"{agent['agent_id']}.json").write_text(json.dumps(agent))
    server = ServiceProcess(tmp_path / "service", env={"AGENT_CONFIG_DIR": str(agents)}).start()
    caller = "+14155550612"
    try:
        post_call(server, transcription("conv_no_override", caller))
        env = base_env(tmp_path / "service", AGENT_CONFIG_DIR=str(agents))
        wait_until(lambda: elaoms(tmp_path, env, "profile", caller).returncode == 0, timeout=60)
        shown = elaoms(tmp_path, env, "first-message", caller, "--json")
    finally:
        server.stop()
    assert shown.returncode == 0, shown.stderr
    answer = json.loads(shown.stdout)
    assert "conversation_config_override" not in answer
    assert "does not allow a first-message override" in answer["greeting_withheld"]


def test_bundled_agents_are_read_once_and_other_agents_cost_no_disk_access(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every delivery and client-data request asks for its agent's file: only
    AGENT_CONFIG_DIR is looked at each time (a file added there is used at once)."""
    bundled = AgentConfigFiles(None)
    demo = bundled.get("agent_elaoms_demo")
    assert demo is not None

    def no_disk(self: Path, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"disk access for {self}")

    with monkeypatch.context() as patched:
        patched.setattr(Path, "stat", no_disk)
        patched.setattr(Path, "is_file", no_disk)
        assert bundled.get("agent_elaoms_demo") is demo
        assert bundled.get("agent_7201kb3x9tq8f5sv2m0d4hnp6e") is None

    configured = AgentConfigFiles(tmp_path)
    agent = load_fixture("agent")
    assert configured.get(agent["agent_id"]) is None
    (tmp_path / f"{agent['agent_id']}.json").write_text(json.dumps(agent))
    assert configured.get(agent["agent_id"]) is not None
