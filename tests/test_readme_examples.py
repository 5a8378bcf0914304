"""The README's curl examples work when pasted (they once answered 401: the secret was not
in the shell). Run as written, against a real service, with only the port changed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import HMAC_KEY, REPO_ROOT, WORKSPACE_SECRET, ServiceProcess, wait_until

pytestmark = pytest.mark.skipif(
    not (shutil.which("curl") and shutil.which("openssl")), reason="needs curl and openssl"
)


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.DOTALL)


def block_with(text: str) -> str:
    return next(block for block in bash_blocks() if text in block)


def run_pasted(block: str, folder: Path, port: int) -> str:
    script = block.replace("localhost:8000", f"127.0.0.1:{port}")
    completed = subprocess.run(
        ["bash", "-c", script], cwd=folder, capture_output=True, text=True, timeout=60
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def test_the_readme_curl_examples_work_when_pasted(tmp_path: Path) -> None:
    server = ServiceProcess(tmp_path / "service").start()
    folder = tmp_path / "checkout"  # what a user has: the repository and the .env setup wrote
    folder.mkdir()
    (folder / "elaoms").symlink_to(REPO_ROOT / "elaoms")
    (folder / ".env").write_text(
        f"ELEVENLABS_POST_CALL_HMAC_KEY={HMAC_KEY}\n"
        f"ELEVENLABS_CLIENT_DATA_WORKSPACE_SECRET={WORKSPACE_SECRET}\n"
    )
    try:
        posted = json.loads(run_pasted(block_with("webhooks/post-call"), folder, server.port))
        assert posted["status"] in ("received", "queued"), posted

        def found() -> dict | None:
            out = run_pasted(block_with("webhooks/search-data"), folder, server.port)
            answer = json.loads(out)
            return answer if answer["memories_found"] else None

        answer = wait_until(found)
    finally:
        server.stop()
    assert "Sofia" in answer["context"]
