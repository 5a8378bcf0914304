"""Durable, private files: atomic writes with fsync, modes from FILE_PERMISSIONS_MODE."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def ensure_private_dir(path: Path, dir_mode: int) -> Path:
    """Create `path` (and parents we create) with `dir_mode`, tightening an existing one."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=dir_mode)
        os.chmod(directory, dir_mode)
    if path.stat().st_mode & 0o777 != dir_mode:
        os.chmod(path, dir_mode)
    return path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, file_mode: int, dir_mode: int) -> Path:
    """Write `data` to `path` so that a reader or a crash sees all of it or none of it.

    Temp file in the same directory, fsync, rename over the target, fsync the directory.
    """
    ensure_private_dir(path.parent, dir_mode)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        os.fchmod(fd, file_mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path
