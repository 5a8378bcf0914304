"""A throw-away PostgreSQL server for the tests: Debian's packaged binaries, run from a
temporary directory on a loopback port (`make test` installs them with
scripts/install-test-services.sh).

initdb and postgres refuse to run as root: as root (containers, CI) both run as the
unprivileged `postgres` user the Debian package creates, through `setpriv`, which execs in
place (the process we start is postgres itself, so a signal reaches it and nothing else).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from conftest import WAIT_BOUND, free_port

INSTALL_HINT = (
    "PostgreSQL's server binaries (initdb, postgres) are missing: run "
    "scripts/install-test-services.sh (Debian's postgresql package)"
)
SERVER_USER = "postgres"


def server_binaries() -> Path:
    """The directory holding initdb and postgres: `pg_config --bindir` (the client package
    installs pg_config even where the server is absent, so it is checked), else the newest
    of Debian's versioned directories, else PATH."""
    candidates: list[Path] = []
    if shutil.which("pg_config"):
        found = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=False
        ).stdout.strip()
        if found:
            candidates.append(Path(found))
    candidates += sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
        reverse=True,
    )
    if initdb := shutil.which("initdb"):
        candidates.append(Path(initdb).resolve().parent)
    for directory in candidates:
        if (directory / "initdb").exists() and (directory / "postgres").exists():
            return directory
    raise RuntimeError(INSTALL_HINT)


class PostgresServer:
    """One cluster in a temporary directory; `start` and `stop` may be repeated (the data
    stays until `remove`). `root`: a directory of the caller's instead, kept after `stop`
    and started again by the next `PostgresServer(root)` (the load benchmark keeps its
    seeded databases there)."""

    def __init__(self, root: Path | None = None) -> None:
        self.bin = server_binaries()
        # Under the system's temporary directory, not pytest's (mode 0700, owned by root,
        # which the server's own user could not enter); a short path for the unix socket.
        if root is None:
            root = Path(tempfile.mkdtemp(prefix="elaoms-pg-"))
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.data = self.root / "data"
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / "server.log"
        self._names = itertools.count(1)
        self._as_server_user: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam(SERVER_USER)
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as_server_user = [
                "setpriv",
                f"--reuid={user.pw_uid}",
                f"--regid={user.pw_gid}",
                "--init-groups",
                "--",
            ]
        if not (self.data / "PG_VERSION").exists():
            self._initdb()

    def _initdb(self) -> None:
        # --no-sync: only initdb's own files (a crash during the tests loses the whole
        # cluster anyway); the server itself runs with fsync on.
        subprocess.run(
            [
                *self._as_server_user,
                str(self.bin / "initdb"),
                "--pgdata",
                str(self.data),
                "--username",
                SERVER_USER,
                "--auth",
                "trust",
                "--encoding",
                "UTF8",
                "--no-locale",
                "--no-sync",
                "--no-instructions",
            ],
            check=True,
            capture_output=True,
            env=self._environment(),
        )

    def _environment(self) -> dict[str, str]:
        # HOME: initdb and postgres read nothing there, but a root HOME they cannot enter
        # makes some libraries complain.
        return {**os.environ, "HOME": str(self.root), "LC_ALL": "C"}

    @property
    def admin_url(self) -> str:
        return self.url("postgres")

    def url(self, database: str) -> str:
        return f"postgresql://{SERVER_USER}@127.0.0.1:{self.port}/{database}"

    def start(self) -> PostgresServer:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child process
        self.process = subprocess.Popen(
            [
                *self._as_server_user,
                str(self.bin / "postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={self.root}",
                # Durability is under test: every commit reaches the disk.
                "-c",
                "fsync=on",
                "-c",
                "synchronous_commit=on",
                # Small: many test databases, few rows each; the machine is shared.
                "-c",
                "shared_buffers=16MB",
                "-c",
                "max_connections=200",
                "-c",
                "max_wal_size=256MB",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self._environment(),
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + WAIT_BOUND
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited early:\n{self.logs()}")
            if self.ready():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"postgres did not start on port {self.port}:\n{self.logs()}")

    def ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.admin_url, connect_timeout=2) as connection:
                connection.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            return False

    def create_database(self, prefix: str = "test") -> str:
        """A new empty database; its URL."""
        import psycopg

        name = f"{prefix}_{next(self._names)}"
        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            # PostgreSQL 15's default strategy writes the template to the WAL (~0.1 s);
            # FILE_COPY's checkpoint takes a second or more with fsync on.
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, mode: signal.Signals = signal.SIGINT) -> None:
        """SIGINT: PostgreSQL's fast shutdown (sessions ended, then a checkpoint);
        SIGQUIT: immediate (no checkpoint: recovery from the WAL at the next start);
        SIGKILL: a crash, recovered from the WAL too."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(mode)
            try:
                self.process.wait(WAIT_BOUND)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        if mode is signal.SIGKILL and self.process:
            # The postmaster's children outlive it: they go with the process group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def remove(self, *, wait: bool = False) -> None:
        # SIGQUIT: immediate shutdown. A fast one would first write and fsync a checkpoint
        # of every test database (tens of seconds), all about to be deleted.
        self.stop(signal.SIGQUIT)
        if wait:
            shutil.rmtree(self.root, ignore_errors=True)
            return
        # Each test database is thousands of small files: deleting them takes seconds the
        # test run need not wait for.
        subprocess.Popen(
            ["rm", "-rf", "--", str(self.root)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
