"""The container files, checked with what runs here (no container engine in CI): the
image's health check and gunicorn follow PORT, compose names missing secrets instead of
starting a service that refuses every webhook, and gunicorn tells the multiprocess metrics
when a worker dies."""

from __future__ import annotations

import os
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import REPO_ROOT


def test_the_image_health_check_follows_port_and_the_image_carries_the_default_search() -> None:
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    healthcheck = next(line for line in dockerfile.splitlines() if "urlopen" in line)
    assert "os.environ.get('PORT'" in healthcheck
    assert "127.0.0.1:8000" not in healthcheck
    # SEARCH_EMBEDDINGS=auto's model, and the driver MEMORY_BACKEND=postgres needs.
    assert 'pip install ".[embeddings,postgres]"' in dockerfile


def test_compose_needs_no_hand_made_env_file_and_names_what_is_missing() -> None:
    compose = yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())
    service = compose["services"]["elaoms"]
    assert service["env_file"] == [{"path": ".env", "required": False}]
    environment = service["environment"]
    for secret in ("ELEVENLABS_POST_CALL_HMAC_KEY", "ELEVENLABS_CLIENT_DATA_WORKSPACE_SECRET"):
        assert environment[secret].startswith("${" + secret + ":?"), environment[secret]
    assert environment["HOST"] == "0.0.0.0"
    assert "/tmp/prometheus" in service["tmpfs"]


def test_gunicorn_marks_a_dead_worker_for_the_multiprocess_metrics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    metrics = tmp_path / "prometheus"
    metrics.mkdir()
    (metrics / "gauge_livesum_4242.db").write_bytes(b"")
    (metrics / "gauge_livesum_4343.db").write_bytes(b"")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(metrics))
    monkeypatch.setenv("PORT", "8123")
    monkeypatch.chdir(tmp_path)  # no .env here
    config = runpy.run_path(str(REPO_ROOT / "gunicorn.conf.py"))
    assert config["bind"] == "0.0.0.0:8123"
    config["child_exit"](None, SimpleNamespace(pid=4242))
    assert sorted(os.listdir(metrics)) == ["gauge_livesum_4343.db"]
