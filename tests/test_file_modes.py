"""FILE_PERMISSIONS_MODE / DIRECTORY_PERMISSIONS_MODE: octal spellings, refusals at start-up."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from elaoms.config import Settings

from conftest import REPO_ROOT, base_env, make_settings


@pytest.mark.parametrize("spelling", ["600", "0600", "0o600", " 0O600 "])
def test_every_octal_spelling_of_600_means_owner_read_and_write(
    spelling: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FILE_PERMISSIONS_MODE", spelling)
    settings = Settings(_env_file=None)
    assert settings.file_permissions_mode == 0o600
    assert settings.directory_permissions_mode == 0o700


@pytest.mark.parametrize("spelling", ["750", "0750", "0o750"])
def test_directory_mode_is_read_as_octal_in_every_spelling(
    spelling: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DIRECTORY_PERMISSIONS_MODE", spelling)
    assert Settings(_env_file=None).directory_permissions_mode == 0o750


def test_a_group_readable_file_mode_gives_group_readable_directories() -> None:
    settings = Settings(_env_file=None, file_permissions_mode="640")
    assert (settings.file_permissions_mode, settings.directory_permissions_mode) == (0o640, 0o750)


@pytest.mark.parametrize(
    ("variable", "spelling", "problem"),
    [
        ("FILE_PERMISSIONS_MODE", "400", "the owner needs rw-------"),
        ("FILE_PERMISSIONS_MODE", "0200", "the owner needs rw-------"),
        ("FILE_PERMISSIONS_MODE", "620", "the group must not write"),
        ("FILE_PERMISSIONS_MODE", "604", "others must get no access"),
        ("FILE_PERMISSIONS_MODE", "0o666", "others must get no access"),
        ("FILE_PERMISSIONS_MODE", "4600", "no setuid"),
        ("FILE_PERMISSIONS_MODE", "384", "as a decimal number it would be 600"),
        ("FILE_PERMISSIONS_MODE", "rw-------", "is not an octal file mode"),
        ("DIRECTORY_PERMISSIONS_MODE", "600", "the owner needs rwx------"),
        ("DIRECTORY_PERMISSIONS_MODE", "770", "the group must not write"),
        ("DIRECTORY_PERMISSIONS_MODE", "0o701", "others must get no access"),
    ],
)
def test_a_mode_that_locks_the_owner_out_or_opens_files_is_refused(
    variable: str, spelling: str, problem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, spelling)
    with pytest.raises(ValidationError) as raised:
        Settings(_env_file=None)
    assert problem in str(raised.value)


def test_files_and_directories_get_the_octal_mode_written_as_600(tmp_path: Path) -> None:
    from elaoms.crypto import PayloadCipher
    from elaoms.webhooks.storage import WebhookStorage

    settings = make_settings(tmp_path, file_permissions_mode="600")
    storage = WebhookStorage(settings, PayloadCipher())
    path = storage.delivery_path("+13125550142", "post_call_transcription", "conv_modes")
    storage.keep(path, b"{}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


@pytest.mark.parametrize(
    ("variable", "spelling", "message"),
    [
        (
            "FILE_PERMISSIONS_MODE",
            "644",
            "invalid setting FILE_PERMISSIONS_MODE: Value error, FILE_PERMISSIONS_MODE=0644"
            " (rw-r--r--) is refused: others must get no access",
        ),
        (
            "DIRECTORY_PERMISSIONS_MODE",
            "777",
            "DIRECTORY_PERMISSIONS_MODE=0777 (rwxrwxrwx) is refused: the group must not write",
        ),
    ],
)
def test_elaoms_serve_refuses_to_start_with_an_unsafe_mode_and_says_why(
    variable: str, spelling: str, message: str, tmp_path: Path
) -> None:
    env = {**os.environ, **base_env(tmp_path), variable: spelling, "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "elaoms.cli", "serve", "--port", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "webhooks").exists()  # refused before anything was written


def test_the_app_refuses_to_start_with_an_unsafe_mode(tmp_path: Path) -> None:
    env = {
        **os.environ,
        **base_env(tmp_path),
        "FILE_PERMISSIONS_MODE": "0o660",
        "PYTHONPATH": str(REPO_ROOT),
    }
    result = subprocess.run(
        [sys.executable, "-c", "import main"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "FILE_PERMISSIONS_MODE=0660 (rw-rw----) is refused: the group must not write" in (
        result.stderr
    )
