"""What every command shares: settings, services, output, and errors as one clear line.

Commands stay thin: they parse arguments, call `run(...)` with a plain async function over
`Services`, and print. Known failures (a missing or invalid setting, a store or API that
does not answer, a disk that refuses writes) never reach the user as a traceback.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import httpx
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from elaoms.config import Settings
from elaoms.phone import WithheldCallerError, normalize_caller_id, operator_caller

T = TypeVar("T")

# Exit codes, documented in `elaoms --help` and docs/cli.md.
EXIT_OK = 0
EXIT_FAILURE = 1  # a setting, the store, the ElevenLabs API or the disk failed
EXIT_USAGE = 2  # wrong arguments (click's own code)
EXIT_NOT_FOUND = 3  # the caller or conversation is not in the store
EXIT_INCOMPLETE = 4  # backfill stopped early; run it again to resume

EXIT_CODES_HELP = (
    "Exit codes: 0 ok, 1 failure (setting, store, API or disk), 2 usage error, "
    "3 caller or conversation not found, 4 backfill incomplete (run it again to resume)."
)

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


class CliError(Exception):
    """A failure to report as one line with an exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def describe_error(error: BaseException) -> str | None:
    """One line for a failure we expect in the field; None for a genuine bug."""
    from elaoms.crypto import EncryptionConfigError
    from elaoms.elevenlabs.client import ElevenLabsError
    from elaoms.memory.base import StoreUnavailableError

    if isinstance(error, CliError):
        return str(error)
    if isinstance(error, ElevenLabsError):
        return f"ElevenLabs API: {error}"
    if isinstance(error, ValidationError):
        problem = error.errors()[0]
        name = ".".join(str(part) for part in problem["loc"]).upper() or "settings"
        return f"invalid setting {name}: {problem['msg']}"
    if isinstance(error, StoreUnavailableError):
        return f"memory store unavailable: {error}"
    if isinstance(error, EncryptionConfigError):
        return f"encryption: {error}"
    if isinstance(error, httpx.HTTPError):
        return f"network error: {error or type(error).__name__}"
    if isinstance(error, ImportError):
        return f"a part of ELAOMS is missing: {error}"
    if isinstance(error, OSError):
        target = f" {error.filename}" if error.filename else ""
        return f"disk error{target}: {error.strerror or error}"
    return None


class ElaomsGroup(TyperGroup):
    """Turns expected failures of any subcommand into one red line and an exit code."""

    # `Any`: typer (0.29+) types the context with its private copy of click.
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, typer.TyperException):  # typer's own: usage, exits
            raise
        except BrokenPipeError:
            # The reader went away (`elaoms calls --json | head`): nothing to report, and
            # nowhere to report it. Further writes go nowhere; exit 1 silently, as click
            # and rich do when they meet a closed pipe themselves.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(EXIT_FAILURE) from None
        except KeyboardInterrupt:
            err_console.print("[red]interrupted[/]")
            raise typer.Exit(130) from None
        except Exception as error:
            message = describe_error(error)
            if message is None:
                raise
            err_console.print(f"[red]error:[/] {escape(message)}")
            raise typer.Exit(getattr(error, "exit_code", EXIT_FAILURE)) from None


def load_settings() -> Settings:
    """The service's settings: environment first, then `.env` in the working directory.
    Numbers the operator types are read in the deployment's region from here on."""
    from elaoms.phone import use_default_region

    settings = Settings()
    use_default_region(settings.phone_default_region)
    return settings


def store_description(settings: Settings | None = None) -> str:
    """Which store the commands opened, and how to open another: run from another folder,
    a command finds no `.env` and opens an empty store of its own."""
    from elaoms.config import MemoryBackend

    settings = settings or load_settings()
    if settings.memory_backend is MemoryBackend.OPENMEMORY:
        where = f"the OpenMemory store at {settings.openmemory_url}"
    elif settings.memory_backend is MemoryBackend.POSTGRES:
        from elaoms.memory.postgres import redacted

        where = f"the PostgreSQL store at {redacted(settings.database_url)}"
    else:
        where = f"the SQLite store {settings.sqlite_path.resolve()}"
    env_file = Path.cwd() / ".env"
    hint = (
        f"settings from {env_file}"
        if env_file.is_file()
        else f"no .env in {Path.cwd()}: run from the service's folder, or set SQLITE_PATH "
        "(or MEMORY_BACKEND and OPENMEMORY_URL)"
    )
    return f"{where} ({hint})"


def run(work: Callable[[Any], Awaitable[T]], *, settings: Settings | None = None) -> T:
    """Build the service's parts from settings, check the store answers, run `work`.

    Ctrl-C (SIGINT) during `work` cancels it, and cancels it again every half second until
    it ends: asyncio's own handler cancels once, and a cancellation that lands as a timeout
    fires (httpx's timeouts are cancel scopes) can be taken for that timeout and retried,
    leaving the command waiting on the API for ever. The parts are closed either way, then
    KeyboardInterrupt reaches the CLI (exit 130).
    """
    from elaoms.operations.logs import configure_logging
    from elaoms.services import Services

    settings = settings or load_settings()
    # Library warnings still reach stderr (masked); INFO chatter would drown the output.
    configure_logging("WARNING", settings.log_format)
    interrupted = asyncio.Event()

    async def main() -> T:
        services = Services.build(settings, serving=False)
        loop = asyncio.get_running_loop()
        try:
            await services.store.check()
            working = asyncio.ensure_future(work(services))
            loop.add_signal_handler(signal.SIGINT, _interrupt, loop, working, interrupted)
            try:
                result = await working
            finally:
                loop.remove_signal_handler(signal.SIGINT)
            # Calls stored by the command prepare their callers' profiles in the background:
            # all of it is done before the command returns, however busy the machine (the
            # service's shutdown waits a bounded time; an operator's command must not).
            await services.ingest.drain(timeout=None)
            return result
        finally:
            await services.close()

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        if interrupted.is_set():
            raise KeyboardInterrupt from None
        raise


def _interrupt(
    loop: asyncio.AbstractEventLoop, working: asyncio.Future[Any], interrupted: asyncio.Event
) -> None:
    interrupted.set()
    if not working.done():
        working.cancel()
        loop.call_later(0.5, _interrupt, loop, working, interrupted)


def caller_id(raw: str, *, allow_withheld: bool = False) -> str:
    """A caller as the service keys it: E.164 for a phone number, "user:<id>" for an app
    user, a conversation id for a call kept on its own. A withheld marker ("anonymous",
    +266696687) names many strangers and is refused, unless `allow_withheld` (listing
    what an older version pooled under it)."""
    try:
        normalized = operator_caller(raw)
    except WithheldCallerError as error:
        if not allow_withheld:
            raise typer.BadParameter(str(error)) from None
        normalized = normalize_caller_id(raw)
    if not normalized:
        raise typer.BadParameter("the caller is empty")
    return normalized


def parse_when(value: str | None, *, end_of_day: bool = False) -> int | None:
    """A date (2025-11-21), a datetime (2025-11-21T10:00, UTC unless it says otherwise) or
    unix seconds, as unix seconds."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return int(text)
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return int(moment.timestamp()) + (86_399 if end_of_day else 0)
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not a date (YYYY-MM-DD), a datetime or unix seconds"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


def format_time(unix: float | int | None) -> str:
    if not unix:
        return "-"
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M UTC")


def print_json(value: Any) -> None:
    """Machine output: plain JSON on stdout, no colors or wrapping."""
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False, default=str) + "\n")
    sys.stdout.flush()


def write_private(path: Path, data: bytes, *, replace: bool = True) -> None:
    """Write a file only its owner can read (secrets, exports). The directory is the
    user's choice and keeps its mode; without `replace`, an existing file is an error."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if replace else os.O_EXCL)
    fd = os.open(path, flags, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode does not apply to an existing file
        with os.fdopen(fd, "wb") as handle:
            fd = -1
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    finally:
        if fd != -1:
            os.close(fd)


def not_found(message: str) -> NoReturn:
    raise CliError(message, EXIT_NOT_FOUND)
