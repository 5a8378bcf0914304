"""The container files, checked with what runs here (no container engine in CI): the
image's health check and gunicorn follow PORT, compose names missing secrets instead of
starting a service that refuses every webhook, runs two replicas on one PostgreSQL each
with its own data folder, and gunicorn tells the multiprocess metrics when a worker dies."""

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
    # PostgreSQL's password too, named where it is missing (the server and every replica).
    database = compose["services"]["postgres"]
    assert database["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")
    assert "${POSTGRES_PASSWORD:?" in environment["DATABASE_URL"]


def test_compose_runs_two_replicas_on_one_postgresql_each_with_its_own_data_folder() -> None:
    compose = yaml.safe_load((REPO_ROOT / "compose.yaml").read_text())
    services = compose["services"]
    replicas = [services["elaoms"], services["elaoms-2"]]
    database = services["postgres"]
    user, name = database["environment"]["POSTGRES_USER"], database["environment"]["POSTGRES_DB"]
    for replica in replicas:
        environment = replica["environment"]
        assert environment["MEMORY_BACKEND"] == "postgres"
        url = environment["DATABASE_URL"]
        assert url.startswith(f"postgresql://{user}:") and url.endswith(f"@postgres:5432/{name}")
        assert environment["REDIS_URL"] == "redis://redis:6379/0"  # one Redis for both
        # Started once PostgreSQL answers, not merely once its container runs.
        assert replica["depends_on"]["postgres"] == {"condition": "service_healthy"}
        assert "redis" in replica["depends_on"]
        for secret in ("ELEVENLABS_POST_CALL_HMAC_KEY", "ELEVENLABS_CLIENT_DATA_WORKSPACE_SECRET"):
            assert environment[secret].startswith("${" + secret + ":?")
    # One memory: the same database for both.
    assert replicas[0]["environment"] == replicas[1]["environment"]
    # Each replica's own data folder (its pending deliveries), on a volume of its own.
    data = [
        next(v.split(":")[0] for v in replica["volumes"] if v.endswith(":/app/data"))
        for replica in replicas
    ]
    assert len(set(data)) == 2 and set(data) <= set(compose["volumes"])
    assert "postgres-data" in compose["volumes"]
    assert any(v.startswith("postgres-data:") for v in database["volumes"])
    assert "pg_isready" in database["healthcheck"]["test"]
    # Published on two host ports, both on loopback (behind the HTTPS proxy).
    published = [replica["ports"][0].rsplit(":", 1)[0] for replica in replicas]
    assert len(set(published)) == 2
    assert all(port.startswith("127.0.0.1:") for port in published)


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
