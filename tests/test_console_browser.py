"""The operator console in a real browser: Debian's headless Chromium driven by Playwright.

`scripts/install-test-services.sh` (run by `make test`) installs Chromium; Playwright's
own browser download is never used. A failing test leaves a screenshot in
test-artifacts/. With ELAOMS_UPDATE_SCREENSHOTS=1 the caller page's screenshot is also
written to docs/images/ for the README (a fictitious caller: 555-01xx numbers).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from conftest import (
    REPO_ROOT,
    WAIT_BOUND,
    ServiceProcess,
    free_port,
    signed_headers,
    transcription,
    wait_until,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
]
ARTIFACTS = REPO_ROOT / "test-artifacts"
SECRET = "browser-console-secret-0123456789"
MARIA = "+14155550123"
JAMES = "+14155550188"


def deliver(server: ServiceProcess, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    with server.client() as client:
        response = client.post("/webhooks/post-call", content=body, headers=signed_headers(body))
    assert response.json()["status"] == "received", response.text


def named_call(conversation_id: str, caller: str, name: str) -> dict[str, Any]:
    payload = transcription(conversation_id, caller=caller)
    payload["data"]["analysis"]["data_collection_results"]["caller_name"]["value"] = name
    return payload


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    service = ServiceProcess(
        tmp_path_factory.mktemp("console-browser"), env={"CONSOLE_SECRET": SECRET}
    ).start()
    now = int(time.time())
    for number, days_ago in enumerate((23, 9, 2), start=1):  # for the calls-per-day chart
        payload = named_call(f"conv_maria_{number}", MARIA, "Maria Lopez")
        payload["data"]["metadata"]["start_time_unix_secs"] = now - days_ago * 86_400
        deliver(service, payload)
    deliver(service, named_call("conv_james_1", JAMES, "James Okafor"))
    with service.client() as client:
        # Both profiles prepared (after the webhook answered): both callers are listed.
        wait_until(lambda: _callers_listed(client) == 2)
    yield service
    service.stop()


def _callers_listed(client: httpx.Client) -> int:
    client.post("/console/login", data={"secret": SECRET}, headers={"Origin": str(client.base_url)})
    match = re.search(r"(\d+) caller\(s\)", client.get("/console/callers").text)
    return int(match.group(1)) if match else 0


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert Path(CHROMIUM).exists(), "run scripts/install-test-services.sh (installs chromium)"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1100, "height": 1400})
    # Bounds that only report a hang: a loaded host's browser and service take their time.
    context.set_default_timeout(WAIT_BOUND * 1000)
    expect.set_options(timeout=WAIT_BOUND * 1000)
    tab = context.new_page()
    yield tab
    context.close()


@contextmanager
def screenshot_on_failure(page: Page, name: str) -> Iterator[None]:
    try:
        yield
    except BaseException:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
        raise


def sign_in(page: Page, server: ServiceProcess, secret: str = SECRET) -> None:
    page.goto(f"{server.url}/console")
    expect(page).to_have_url(f"{server.url}/console/login")
    page.get_by_label("Console secret").fill(secret)
    page.get_by_role("button", name="Sign in").click()


def test_an_operator_finds_a_caller_reads_a_call_searches_and_forgets_them(
    page: Page, server: ServiceProcess
) -> None:
    with screenshot_on_failure(page, "console-flow"):
        sign_in(page, server)
        expect(page.get_by_role("heading", name="Callers")).to_be_visible()

        page.get_by_label("Number or name").fill("(415) 555-0123")
        page.get_by_role("button", name="Search").click()
        expect(page.get_by_text("1 caller(s) matching")).to_be_visible()
        assert "0123" not in page.url  # the number went in the body
        page.get_by_role("link", name="•••0123").click()

        expect(page.get_by_role("heading", name="Maria Lopez")).to_be_visible()
        expect(page.locator("#greeting")).to_contain_text("Would not be sent")
        expect(page.locator("#user-context")).to_contain_text("Name: Maria Lopez")
        assert "0123" not in page.url and "+1" not in page.url
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "console-caller.png"), full_page=True)
        if os.environ.get("ELAOMS_UPDATE_SCREENSHOTS"):
            page.screenshot(path=str(REPO_ROOT / "docs" / "images" / "console-caller.png"))

        page.locator("#search").get_by_role("searchbox").fill("daughter sore tooth")
        page.locator("#search").get_by_role("button", name="Search").click()
        expect(page.locator("#search-context")).to_contain_text("Sofia")

        page.locator("#timeline a").first.click()
        expect(page.get_by_text("daughter Sofia").first).to_be_visible()
        page.get_by_role("link", name="← Caller •••0123").click()

        page.get_by_label(re.compile("Type forget to confirm")).fill("forget")
        page.get_by_role("button", name="Forget caller").click()
        expect(page.get_by_role("status")).to_have_text("The caller was forgotten.")
        expect(page.get_by_role("link", name="•••0123")).to_have_count(0)
        expect(page.get_by_role("link", name="•••0188")).to_be_visible()


def test_a_wrong_secret_is_refused(page: Page, server: ServiceProcess) -> None:
    with screenshot_on_failure(page, "console-wrong-secret"):
        sign_in(page, server, "not-the-secret")
        expect(page.get_by_role("alert")).to_have_text("Wrong secret.")
        assert not [c for c in page.context.cookies() if c["name"] == "elaoms_console"]
        page.goto(f"{server.url}/console/callers")
        expect(page).to_have_url(f"{server.url}/console/login")


@contextmanager
def other_site(html: str) -> Iterator[str]:
    """Another origin (another port) serving one page."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        thread.join(5)


def test_a_form_posted_from_another_site_is_refused(page: Page, server: ServiceProcess) -> None:
    with screenshot_on_failure(page, "console-cross-site"):
        sign_in(page, server)
        link = page.get_by_role("link", name="•••0188")
        target = f"{server.url}{link.get_attribute('href')}/forget"
        # Signed in, the operator opens a page elsewhere that posts the forget form (even
        # guessing the caller's address; only the CSRF token is out of its reach).
        attack = (
            f'<form method="post" action="{target}"><input name="confirm" value="forget">'
            '<button type="submit">See the offer</button></form>'
        )
        with other_site(attack) as url:
            page.goto(url)
            page.get_by_role("button", name="See the offer").click()
            expect(page.locator("body")).to_contain_text("Cross-site request refused")

        page.goto(f"{server.url}/console/callers")
        expect(page.get_by_role("link", name="•••0188")).to_be_visible()
