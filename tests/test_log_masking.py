"""Phone numbers never reach a log line whole: every spelling, every logger, real servers."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from elaoms.config import Settings
from elaoms.crypto import PayloadCipher
from elaoms.operations.logs import configure_logging, mask_phone_numbers
from elaoms.webhooks.storage import WebhookStorage

from conftest import ServiceProcess, wait_until

NUMBER = "+13125550142"
# What must never show: the number, or any run of it longer than the last four digits.
LEAKS = (
    "13125550142",
    "3125550142",
    "312555",
    "5550142",
    "555-0142",
    "555.0142",
    "555 0142",
    "(312)",
    "%28312",
    "312-555",
    "312.555",
    "312%29",
    "555%200142",
)

SPELLINGS = [
    "+13125550142",
    "%2B13125550142",
    "%2b13125550142",
    "(312) 555-0142",
    "+1 (312) 555-0142",
    "+1 312-555-0142",
    "312-555-0142",
    "312.555.0142",
    "%28312%29%20555-0142",
    "%28312%29+555-0142",
    "1%20312%20555%200142",
]


def assert_masked(text: str) -> None:
    for leak in LEAKS:
        assert leak not in text, f"{leak!r} leaked in {text!r}"


@pytest.mark.parametrize("spelling", SPELLINGS)
@pytest.mark.parametrize(
    "template", ["DELETE /admin/callers/{} HTTP/1.1", "GET /x?caller={}&a=1", "id={}", "c{}x"]
)
def test_every_spelling_in_a_path_or_query_string_shows_at_most_the_last_four_digits(
    spelling: str, template: str
) -> None:
    masked = mask_phone_numbers(template.format(spelling))
    assert_masked(masked)
    assert "0142" in masked


def test_dates_addresses_and_durations_stay_readable() -> None:
    line = '2026-11-30 07:09:57 127.0.0.1:54321 - "GET /health HTTP/1.1" 200 took 0.0012345 s'
    assert mask_phone_numbers(line) == line


def test_a_quarantined_file_name_stays_readable_beside_a_masked_number(tmp_path: Path) -> None:
    root = tmp_path / "webhooks"
    settings = Settings(
        _env_file=None, webhook_storage_path=root, webhook_quarantine_path=root / "quarantine"
    )
    storage = WebhookStorage(settings, PayloadCipher())
    name = storage.quarantine(b"{}", "not a call").name
    # Its stamp is a date and a time; its hash may hold a long run of digits.
    names = [
        name,
        "20261130T081701-0123456789abcdef.body",
        "20261130T081701-e9bb31f49dcb6252.body",
        "20261130T081701Z",
    ]
    for shown in names:
        line = f"post-call delivery quarantined ({shown}): caller {NUMBER}"
        masked = mask_phone_numbers(line)
        assert masked == f"post-call delivery quarantined ({shown}): caller +***0142"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("INFO", "text")
    handler = logging.StreamHandler(stream)
    logging.getLogger().addHandler(handler)
    try:
        yield stream
    finally:
        logging.getLogger().removeHandler(handler)


def test_our_logs_uvicorn_access_records_and_tracebacks_are_masked(captured: io.StringIO) -> None:
    logging.getLogger("elaoms.test").info("forgetting %s and %s", NUMBER, "(312) 555-0142")
    # uvicorn's access logger formats its arguments into the message itself.
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d',
        "127.0.0.1:5",
        "DELETE",
        "/admin/callers/%2B13125550142",
        "1.1",
        200,
    )
    try:
        raise ValueError(f"no caller {NUMBER} at callers/13125550142")
    except ValueError:
        logging.getLogger("elaoms.test").exception("failed for id=13125550142")
    text = captured.getvalue()
    assert_masked(text)
    assert "ValueError: no caller +***0142 at callers/***0142" in text
    assert "/admin/callers/%2B***0142" in text


def test_json_log_lines_are_masked() -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json")
    handler = logging.StreamHandler(stream)
    elaoms_handler = next(h for h in logging.getLogger().handlers if getattr(h, "_elaoms", False))
    handler.setFormatter(elaoms_handler.formatter)
    logging.getLogger().addHandler(handler)
    try:
        try:
            raise RuntimeError(f"store refused {NUMBER}")
        except RuntimeError:
            logging.getLogger("elaoms.test").exception("caller %s", "%2B13125550142")
    finally:
        logging.getLogger().removeHandler(handler)
        configure_logging("INFO", "text")
    entry = json.loads(stream.getvalue().splitlines()[-1])
    assert entry["message"] == "caller %2B***0142"
    assert "RuntimeError: store refused +***0142" in entry["exception"]
    assert_masked(stream.getvalue())


ADMIN_KEY = "admin-key-for-log-masking-tests"


def _requests(server: ServiceProcess) -> None:
    with server.client(headers={"X-Admin-Key": ADMIN_KEY}) as client:
        for method, path in (
            ("DELETE", "/admin/callers/%2B13125550142"),
            ("GET", "/admin/callers/13125550142/export?caller=%2B13125550142"),
            ("GET", "/admin/callers/%28312%29%20555-0142/export?id=312.555.0142"),
        ):
            client.request(method, path)


def test_a_real_uvicorn_access_log_masks_numbers_in_paths_and_query_strings(
    tmp_path: Path,
) -> None:
    server = ServiceProcess(tmp_path, env={"ADMIN_API_KEY": ADMIN_KEY}).start()
    try:
        _requests(server)
        wait_until(lambda: server.logs().count("/admin/callers/") >= 3)
    finally:
        server.stop()
    logs = server.logs()
    assert '"DELETE /admin/callers/%2B***0142 HTTP/1.1"' in logs
    assert "/export?id=***0142" in logs
    assert_masked(logs)


def test_a_real_gunicorn_server_masks_numbers_in_every_log_line(tmp_path: Path) -> None:
    pytest.importorskip("gunicorn")
    repo = Path(__file__).resolve().parents[1]
    server = ServiceProcess(
        tmp_path,
        env={"ADMIN_API_KEY": ADMIN_KEY, "HOST": "127.0.0.1", "PORT": "{port}"},
        command=[
            sys.executable,
            "-m",
            "gunicorn",
            "main:app",
            "-c",
            str(repo / "gunicorn.conf.py"),
            "-w",
            "1",
            "--chdir",
            str(repo),
            "--access-logfile",
            "-",
        ],
    )
    server.env["PORT"] = str(server.port)
    server.start(timeout=40)
    try:
        _requests(server)
        wait_until(lambda: server.logs().count("/admin/callers/") >= 3)
    finally:
        server.stop()
    logs = server.logs()
    assert "Booting worker" in logs  # gunicorn's own lines are in the capture
    assert "/admin/callers/%2B***0142" in logs
    assert_masked(logs)


# Spellings the caller-id parser takes as a caller (Unicode spaces are whitespace to it) or
# that a copy from a web page or a word processor carries: no-break, thin and narrow
# no-break spaces, en dashes, the minus sign, invisible zero-width marks; raw and URL-encoded.
UNICODE_SPELLINGS = [
    "+1\u00a0312\u00a0555\u00a00142",
    "+1\u2009312\u2009555\u20090142",
    "+1\u202f312\u202f555\u202f0142",
    "312\u2013555\u20130142",
    "+1\u2212312\u2212555\u22120142",
    "+1312\u200b5550142",
    "+1\u3000312\u3000555\u30000142",
    "%2B1%C2%A0312%C2%A0555%C2%A00142",
    "%2B1%E2%80%AF312%E2%80%AF555%E2%80%AF0142",
    "312%E2%80%93555%E2%80%930142",
]


@pytest.mark.parametrize("spelling", UNICODE_SPELLINGS)
def test_numbers_spelled_with_unicode_spaces_or_dashes_are_masked_too(spelling: str) -> None:
    masked = mask_phone_numbers(f"GET /admin/callers/{spelling}/export caller={spelling}")
    assert [part for part in masked.split("***") if "312" in part or "555" in part] == []
    assert masked.count("***0142") == 2


def test_a_real_uvicorn_access_log_masks_a_number_with_no_break_spaces(tmp_path: Path) -> None:
    server = ServiceProcess(tmp_path, env={"ADMIN_API_KEY": ADMIN_KEY}).start()
    try:
        with server.client(headers={"X-Admin-Key": ADMIN_KEY}) as client:
            # What an operator pastes from a web page; the admin API reads it as the caller.
            client.get("/admin/callers/%2B1%C2%A0312%C2%A0555%C2%A00142/export")
        wait_until(lambda: "/export" in server.logs())
    finally:
        server.stop()
    logs = server.logs()
    assert "/admin/callers/%2B***0142/export" in logs
    assert "%C2%A0555" not in logs and "312%C2%A0" not in logs
