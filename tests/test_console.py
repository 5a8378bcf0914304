"""The operator console through a real server on loopback: who gets in, what pages show
(the same answers as the webhooks), and what its actions do. Browser tests are in
test_console_browser.py."""

# Fixtures shared with other modules are imported by name, which ruff reads as shadowing.
# ruff: noqa: F811

from __future__ import annotations

import asyncio
import html
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from elaoms.config import Settings
from elaoms.console.auth import COOKIE_NAME
from elaoms.crypto import generate_key
from elaoms.webhooks.storage import caller_dir_name

from conftest import (
    WORKSPACE_SECRET,
    InThreadServer,
    clear_of_window_edge,
    load_fixture,
    signed_headers,
    transcription,
    wait_until,
)
from openmemory_standin import StandIn, fresh_standin, standin  # noqa: F401 - fixtures by name

SECRET = "console-test-secret-0123456789"
MARIA = "+14155550123"
JAMES = "+14155550188"
# Every way a number of theirs could be written in a URL or a log line.
NUMBER_SPELLINGS = ("4155550123", "415-555-0123", "4155550188", "415***0123", "+1415")


def named_call(conversation_id: str, caller: str, name: str, **analysis: Any) -> dict[str, Any]:
    payload = transcription(conversation_id, caller=caller, **analysis)
    payload["data"]["analysis"]["data_collection_results"]["caller_name"]["value"] = name
    return payload


def deliver(client: httpx.Client, payload: dict[str, Any]) -> dict[str, Any]:
    body = json.dumps(payload).encode()
    response = client.post("/webhooks/post-call", content=body, headers=signed_headers(body))
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


class Console:
    """A signed-in operator: the session cookie, and forms posted as the pages post them."""

    def __init__(self, server: InThreadServer) -> None:
        self.server = server
        self.http = server.client(follow_redirects=False)
        self.origin = {"Origin": server.url}

    def sign_in(self, secret: str = SECRET) -> httpx.Response:
        return self.http.post("/console/login", data={"secret": secret}, headers=self.origin)

    def get(self, path: str) -> httpx.Response:
        return self.http.get(path)

    def csrf(self) -> str:
        page = self.get("/console/callers").text
        match = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page)
        assert match, page
        return match.group(1)

    def post(self, path: str, **fields: str) -> httpx.Response:
        return self.http.post(path, data={"csrf_token": self.csrf(), **fields}, headers=self.origin)

    def caller_ids(self, query: str = "") -> list[str]:
        page = (
            self.post("/console/callers", q=query).text
            if query
            else self.get("/console/callers").text
        )
        return re.findall(r'href="/console/callers/([A-Za-z0-9_-]{20,})"', page)


@pytest.fixture
def console_server(settings_factory: Callable[..., Settings]) -> Iterator[InThreadServer]:
    with InThreadServer(settings_factory(console_secret=SECRET)) as server:
        yield server


@pytest.fixture
def console(console_server: InThreadServer) -> Iterator[Console]:
    operator = Console(console_server)
    assert operator.sign_in().status_code == 303
    yield operator
    operator.http.close()


@contextmanager
def maria_delivered(server: InThreadServer) -> Iterator[None]:
    with server.client() as client:
        deliver(client, named_call("conv_maria_1", MARIA, "Maria Lopez"))
    yield


def wait_for_callers(console: Console, count: int) -> list[str]:
    return wait_until(lambda: len(ids := console.caller_ids()) == count and ids)  # type: ignore[no-any-return]


# Who gets in ---------------------------------------------------------------------------
def test_without_a_console_secret_or_admin_key_there_is_no_console(
    settings_factory: Callable[..., Settings],
) -> None:
    with InThreadServer(settings_factory()) as server, server.client() as client:
        for path in ("/console", "/console/login", "/console/callers"):
            assert client.get(path).status_code == 404
        assert client.post("/console/login", data={"secret": "x"}).status_code == 404


def test_the_admin_key_signs_in_when_no_console_secret_is_set(
    settings_factory: Callable[..., Settings],
) -> None:
    with InThreadServer(settings_factory(admin_api_key="admin-key-0123456789")) as server:
        operator = Console(server)
        assert operator.sign_in("wrong").status_code == 401
        answer = operator.sign_in("admin-key-0123456789")
        assert answer.status_code == 303
        assert operator.get("/console/callers").status_code == 200


def test_signing_in_sets_a_strict_http_only_session_cookie_for_the_console_only(
    console_server: InThreadServer,
) -> None:
    answer = Console(console_server).sign_in()

    assert answer.status_code == 303
    assert answer.headers["location"] == "/console/callers"
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE_NAME}=")
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie
    assert "Path=/console" in cookie
    assert "Secure" not in cookie  # plain HTTP on loopback (an SSH tunnel)


def test_behind_an_https_proxy_the_session_cookie_is_secure(
    console_server: InThreadServer,
) -> None:
    with console_server.client() as client:
        answer = client.post(
            "/console/login",
            data={"secret": SECRET},
            headers={"Origin": console_server.url, "X-Forwarded-Proto": "https"},
        )
    assert "Secure" in answer.headers["set-cookie"]


def test_pages_without_a_session_or_with_a_forged_cookie_lead_to_sign_in(
    console_server: InThreadServer,
) -> None:
    operator = Console(console_server)
    for path in ("/console/callers", "/console/agents", "/console/health"):
        answer = operator.get(path)
        assert (answer.status_code, answer.headers["location"]) == (303, "/console/login")
    operator.sign_in()
    session_id, expires, mac = operator.http.cookies[COOKIE_NAME].split(".")
    for forged in (
        f"{session_id}.{int(expires) + 10**6}.{mac}",  # a longer session
        f"{session_id}x.{expires}.{mac}",
        f"{session_id}.{expires}.{'0' * len(mac)}",
    ):
        operator.http.cookies.clear()
        operator.http.cookies.set(COOKIE_NAME, forged)
        assert operator.get("/console/callers").status_code == 303


def test_a_wrong_secret_is_refused_counted_and_after_a_few_the_address_is_held_off(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory(console_secret=SECRET, anomaly_failure_threshold=3)
    with InThreadServer(settings) as server, server.client() as client:
        operator = Console(server)
        before = _auth_failures(client, "console_sign_in")
        for _ in range(3):
            answer = operator.sign_in("not-the-secret")
            assert answer.status_code == 401
            assert "Wrong secret" in answer.text
        held_off = operator.sign_in(SECRET)  # even the right secret, for the window

        assert held_off.status_code == 429
        assert COOKIE_NAME not in held_off.headers.get("set-cookie", "")
        # The attempt held off counts too: a guesser does not stop at 429.
        assert wait_until(lambda: _auth_failures(client, "console_sign_in") - before == 4)


def _auth_failures(client: httpx.Client, kind: str) -> float:
    match = re.search(
        rf'^elaoms_auth_failures_total{{kind="{kind}"}} (\S+)$',
        client.get("/metrics").text,
        re.MULTILINE,
    )
    return float(match.group(1)) if match else 0.0


def test_a_sign_in_posted_from_another_site_is_refused(console_server: InThreadServer) -> None:
    with console_server.client() as client:
        for headers in ({"Origin": "http://evil.example"}, {}, {"Origin": "null"}):
            answer = client.post("/console/login", data={"secret": SECRET}, headers=headers)
            assert answer.status_code == 403
            assert "set-cookie" not in answer.headers


def test_a_form_without_its_csrf_token_or_from_another_origin_changes_nothing(
    console: Console,
) -> None:
    with maria_delivered(console.server):
        (maria,) = wait_for_callers(console, 1)
    path = f"/console/callers/{maria}/forget"
    token = console.csrf()

    no_token = console.http.post(path, data={"confirm": "forget"}, headers=console.origin)
    wrong_token = console.http.post(
        path, data={"confirm": "forget", "csrf_token": "0" * 64}, headers=console.origin
    )
    other_origin = console.http.post(
        path,
        data={"confirm": "forget", "csrf_token": token},
        headers={"Origin": "http://127.0.0.1:1"},
    )
    no_origin = console.http.post(path, data={"confirm": "forget", "csrf_token": token})

    for answer in (no_token, wrong_token, other_origin, no_origin):
        assert answer.status_code == 403
    assert console.caller_ids() == [maria]


def test_console_pages_send_strict_security_headers(console: Console) -> None:
    for path in ("/console/callers", "/console/login", "/console/health", "/console/x"):
        headers = console.get(path).headers
        policy = headers["content-security-policy"]
        assert "default-src 'none'" in policy
        assert "script-src" not in policy  # so no script runs at all
        assert "frame-ancestors 'none'" in policy
        assert headers["x-frame-options"] == "DENY"
        assert headers["cache-control"] == "no-store"
        assert headers["x-content-type-options"] == "nosniff"
    assert "content-security-policy" not in console.get("/health").headers


# What pages show -----------------------------------------------------------------------
def test_no_phone_number_appears_in_a_console_url_or_log_line(
    console: Console, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with maria_delivered(console.server):
        (maria,) = wait_for_callers(console, 1)
    pages = [
        console.get("/console/callers").text,
        console.post("/console/callers", q="555-0123").text,
        console.get(f"/console/callers/{maria}").text,
        console.get(f"/console/callers/{maria}/calls/conv_maria_1").text,
        console.post(f"/console/callers/{maria}/search", query="tooth").text,
    ]
    console.post(f"/console/callers/{maria}/export")
    console.post(f"/console/callers/{maria}/forget", confirm="forget")

    urls = [url for page in pages for url in re.findall(r'(?:href|action|src)="([^"]+)"', page)]
    assert any(maria in url for url in urls)
    for text in urls + [
        record.getMessage() for record in caplog.records if "console" in record.getMessage()
    ]:
        for spelling in NUMBER_SPELLINGS:
            assert spelling not in text, text
    # Pages show at most the last four digits.
    assert "•••0123" in pages[0]
    assert not any("4155550123" in page or "+1415" in page for page in pages)


def test_callers_are_listed_newest_first_and_found_by_digits_or_name_in_a_post_body(
    console: Console,
) -> None:
    with console.server.client() as client:
        maria_call = named_call("conv_maria_1", MARIA, "Maria Lopez")
        maria_call["data"]["metadata"]["start_time_unix_secs"] = 1_763_000_000
        james_call = named_call("conv_james_1", JAMES, "James Okafor")
        james_call["data"]["metadata"]["start_time_unix_secs"] = 1_764_000_000
        deliver(client, maria_call)
        deliver(client, james_call)
    james, maria = wait_for_callers(console, 2)

    listing = console.get("/console/callers").text
    by_digits = console.caller_ids("0123")
    by_formatted = console.caller_ids("(415) 555-0188")
    by_name = console.caller_ids("okafor")

    assert listing.index("James Okafor") < listing.index("Maria Lopez")
    assert "2 caller(s)" in listing
    assert by_digits == [maria]
    assert by_formatted == [james]
    assert by_name == [james]
    assert console.caller_ids("nobody-by-that-name") == []
    assert console.get("/console/callers?page=0").status_code == 422
    assert console.get("/console/callers/not-an-id-we-issued-xxxxxxxx").status_code == 404


def test_the_caller_page_shows_exactly_what_client_data_and_the_search_tool_answer(
    console: Console,
) -> None:
    with maria_delivered(console.server):
        (maria,) = wait_for_callers(console, 1)
    keys = {"X-Api-Key": WORKSPACE_SECRET}
    with console.server.client() as client:
        variables = client.post(
            "/webhooks/client-data", json={"caller_id": MARIA}, headers=keys
        ).json()["dynamic_variables"]
        tool = client.post(
            "/webhooks/search-data",
            json={"query": "daughter sore tooth", "user_id": MARIA, "limit": 5},
            headers=keys,
        ).json()

    page = console.get(f"/console/callers/{maria}").text
    searched = console.post(f"/console/callers/{maria}/search", query="daughter sore tooth").text

    assert variables["user_context"]
    assert _section(page, "user-context") == variables["user_context"]
    assert tool["memories_found"] >= 1
    assert _section(searched, "search-context") == tool["context"]
    assert f"{tool['memories_found']} excerpt(s)" in searched
    assert "Maria Lopez" in page


def _section(page: str, element_id: str) -> str:
    match = re.search(rf'id="{element_id}">\s*(?:<h2>.*?</h2>\s*<pre>)?(.*?)</pre>', page, re.S)
    assert match, page
    return html.unescape(match.group(1))


def test_the_greeting_verdict_says_why_it_is_not_sent_when_the_agent_is_not_cached(
    console: Console,
) -> None:
    with maria_delivered(console.server):
        (maria,) = wait_for_callers(console, 1)

    greeting = _between(
        console.get(f"/console/callers/{maria}").text, 'id="greeting"', "</section>"
    )

    assert "Would not be sent" in greeting
    assert "configuration is not cached" in greeting
    assert "ELEVENLABS_API_KEY" in greeting
    assert "<blockquote>" in greeting  # the prepared greeting is still shown


def _between(text: str, start: str, end: str) -> str:
    head = text.index(start)
    return text[head : text.index(end, head)]


def test_a_call_page_shows_the_summary_data_collection_and_transcript_of_that_caller_only(
    console: Console,
) -> None:
    with console.server.client() as client:
        deliver(client, named_call("conv_maria_1", MARIA, "Maria Lopez"))
        deliver(client, named_call("conv_james_1", JAMES, "James Okafor"))
    _james, maria = wait_for_callers(console, 2)

    page = console.get(f"/console/callers/{maria}/calls/conv_maria_1")
    foreign = console.get(f"/console/callers/{maria}/calls/conv_james_1")

    assert page.status_code == 200
    assert "daughter Sofia" in page.text  # the transcript
    assert "caller_name" in page.text and "Maria Lopez" in page.text  # data collection
    assert 'id="summary"' in page.text
    assert foreign.status_code == 404


def test_a_call_page_shows_a_stored_call_with_odd_values_instead_of_failing(
    console: Console,
) -> None:
    payload = named_call("conv_maria_1", MARIA, "Maria Lopez")
    data = payload["data"]
    data["transcript"].insert(1, ["not", "a", "turn"])
    data["transcript"][0]["time_in_call_secs"] = "12"
    data["metadata"]["call_duration_secs"] = 10**30
    # A signed call whose parts are of the wrong type is still stored (CallRecord drops
    # them with a note); the raw payload kept with it holds them as sent.
    data["analysis"] = [data["analysis"]]
    with console.server.client() as client:
        deliver(client, payload)
    (maria,) = wait_for_callers(console, 1)

    page = console.get(f"/console/callers/{maria}/calls/conv_maria_1")

    assert page.status_code == 200
    assert "daughter Sofia" in page.text


def test_the_chart_counts_the_calls_of_the_last_weeks(console: Console) -> None:
    with console.server.client() as client:
        for number in range(3):
            payload = named_call(f"conv_maria_{number}", MARIA, "Maria Lopez")
            payload["data"]["metadata"]["start_time_unix_secs"] = int(time.time()) - number * 60
            deliver(client, payload)
    (maria,) = wait_for_callers(console, 1)

    label = r"<svg[^>]*aria-label=\"Calls per day, this caller: 3 call\(s\)"
    page = wait_until(
        lambda: (
            (text := console.get(f"/console/callers/{maria}").text)
            and re.search(label, text)
            and text
        )
    )

    assert "script" not in page.lower()


# Actions -------------------------------------------------------------------------------
def test_export_downloads_everything_held_about_the_caller(console: Console) -> None:
    with maria_delivered(console.server):
        (maria,) = wait_for_callers(console, 1)

    answer = console.post(f"/console/callers/{maria}/export")

    assert answer.status_code == 200
    assert answer.headers["content-disposition"].startswith("attachment;")
    assert "0123" not in answer.headers["content-disposition"]
    document = answer.json()
    assert document["user_id"] == MARIA
    assert [call["conversation_id"] for call in document["calls"]] == ["conv_maria_1"]


def test_forget_needs_the_typed_word_then_removes_the_caller_everywhere(
    console: Console, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    settings = console.server.app.state.services.settings
    with console.server.client() as client:
        deliver(client, named_call("conv_maria_1", MARIA, "Maria Lopez"))
        deliver(client, named_call("conv_james_1", JAMES, "James Okafor"))
    james, maria = wait_for_callers(console, 2)

    refused = console.post(f"/console/callers/{maria}/forget", confirm="yes")
    assert refused.status_code == 400
    assert "Nothing was deleted" in refused.text
    assert console.caller_ids() == [james, maria]

    done = console.post(f"/console/callers/{maria}/forget", confirm="Forget")

    assert (done.status_code, done.headers["location"]) == (303, "/console/callers?forgotten=1")
    assert console.caller_ids() == [james]
    assert console.get(f"/console/callers/{maria}").status_code == 404
    assert not (settings.webhook_storage_path / caller_dir_name(MARIA)).exists()
    audit = [r.getMessage() for r in caplog.records if "forgotten by session" in r.getMessage()]
    assert audit == [audit[0]] and maria in audit[0]


def test_a_quarantined_delivery_is_requeued_after_a_fix_and_leaves_the_quarantine(
    console: Console,
) -> None:
    services = console.server.app.state.services
    good = json.dumps(named_call("conv_maria_1", MARIA, "Maria Lopez")).encode()
    # As an earlier version, or a store bug since fixed, would have left it.
    services.storage.quarantine(good, "invalid payload: fixed since")
    bad = b'{"type": "post_call_transcription", "data": {}}'
    services.storage.quarantine(bad, "invalid payload: data.conversation_id: Field required")
    health = console.get("/console/health").text
    names = re.findall(r"/console/health/quarantine/([\w-]+)/requeue", health)
    assert len(names) == 2
    assert "fixed since" in health

    outcomes = {
        name: console.post(f"/console/health/quarantine/{name}/requeue").text for name in names
    }

    accepted = [name for name, page in outcomes.items() if "Accepted: received" in page]
    refused = [name for name, page in outcomes.items() if "Still refused" in page]
    assert len(accepted) == len(refused) == 1
    assert wait_for_callers(console, 1)
    after = console.get("/console/health").text
    assert len(re.findall(r"/requeue\"", after)) == 1  # the bad one, once
    assert "conversation_id: Field required" in after
    assert console.post("/console/health/quarantine/../requeue").status_code == 404
    assert (
        console.post(
            "/console/health/quarantine/20260101T000000-0000000000000000/requeue"
        ).status_code
        == 404
    )


def test_a_quarantine_reason_naming_a_url_encoded_number_is_shown_masked(
    console: Console,
) -> None:
    services = console.server.app.state.services
    # As a reason file from an earlier version (ingestion masks what it writes now).
    services.storage.quarantine(b"{}", "GET /x?caller=%2B14155550123 refused")

    health = console.get("/console/health").text

    assert "refused" in health
    assert "4155550123" not in health and "%2B***0123" in health


def test_the_agents_page_lists_the_agents_calls_name(console: Console) -> None:
    with maria_delivered(console.server):
        wait_for_callers(console, 1)
    agent_id = transcription()["data"]["agent_id"]

    page = console.get("/console/agents").text

    assert agent_id in page
    assert "Not cached" in page  # no ElevenLabs API in tests


def test_the_health_page_shows_store_disk_and_recent_alerts(
    settings_factory: Callable[..., Settings],
) -> None:
    # Failures are counted per fixed window: a day, the two kept clear of its edge.
    window = 86400
    settings = settings_factory(
        console_secret=SECRET, anomaly_failure_threshold=1, anomaly_window_seconds=window
    )
    with InThreadServer(settings) as server:
        operator, guesser = Console(server), Console(server)
        operator.sign_in()
        clear_of_window_edge(window)
        guesser.sign_in("wrong")
        guesser.sign_in("wrong again")
        page = wait_until(
            lambda: (
                (text := operator.get("/console/health").text) and "auth_failures" in text and text
            )
        )
    assert 'sqlite: <strong class="ok">ok</strong>' in page
    assert "GiB free" in page


def test_the_console_works_with_encryption_at_rest(
    settings_factory: Callable[..., Settings],
) -> None:
    settings = settings_factory(
        console_secret=SECRET, enable_encryption_at_rest=True, encryption_key=generate_key()
    )
    with InThreadServer(settings) as server:
        operator = Console(server)
        operator.sign_in()
        with maria_delivered(server):
            (maria,) = wait_for_callers(operator, 1)
        assert operator.caller_ids("lopez") == [maria]
        assert operator.caller_ids("lop") == []  # whole words only: names are keyed hashes
        assert "Maria Lopez" in operator.get(f"/console/callers/{maria}").text
        assert "daughter Sofia" in operator.get(f"/console/callers/{maria}/calls/conv_maria_1").text
        operator.http.close()


def test_the_console_works_on_the_openmemory_backend(
    settings_factory: Callable[..., Settings], tmp_path: Path, fresh_standin: StandIn
) -> None:
    settings = settings_factory(
        console_secret=SECRET,
        memory_backend="openmemory",
        openmemory_url=fresh_standin.url,
        openmemory_api_key=fresh_standin.api_key,
        openmemory_ledger_path=tmp_path / "openmemory-ledger.sqlite3",
        openmemory_retry_base_delay_seconds=0.05,
    )
    with InThreadServer(settings) as server:
        operator = Console(server)
        operator.sign_in()
        with maria_delivered(server):
            (maria,) = wait_for_callers(operator, 1)
        assert operator.caller_ids("lopez") == [maria]
        searched = operator.post(f"/console/callers/{maria}/search", query="daughter sore tooth")
        assert "Sofia" in _section(searched.text, "search-context")
        assert (
            operator.post(f"/console/callers/{maria}/forget", confirm="forget").status_code == 303
        )
        assert operator.caller_ids() == []
        operator.http.close()


def test_behind_a_proxy_that_rewrites_host_forms_from_the_public_origin_are_accepted(
    console_server: InThreadServer,
) -> None:
    public = {"Origin": "https://console.example.com", "X-Forwarded-Host": "console.example.com"}
    with console_server.client() as client:
        assert (
            client.post("/console/login", data={"secret": SECRET}, headers=public).status_code
            == 303
        )
        spoofed = {"Origin": "https://evil.example", "X-Forwarded-Host": "console.example.com"}
        assert (
            client.post("/console/login", data={"secret": SECRET}, headers=spoofed).status_code
            == 403
        )


def test_signing_out_deletes_the_session_cookie(console: Console) -> None:
    answer = console.post("/console/logout")

    assert (answer.status_code, answer.headers["location"]) == (303, "/console/login")
    assert f'{COOKIE_NAME}=""' in answer.headers["set-cookie"]
    assert console.get("/console/callers").status_code == 303


def test_with_the_agent_cached_the_greeting_is_sent_and_the_agent_s_overrides_are_shown(
    console: Console,
) -> None:
    agent = load_fixture("agent")
    store = console.server.app.state.services.store
    asyncio.run(store.put_agent_profile(agent["agent_id"], agent, time.time()))
    with maria_delivered(console.server):
        (maria,) = wait_for_callers(console, 1)
    with console.server.client() as client:
        sent = client.post(
            "/webhooks/client-data",
            json={"caller_id": MARIA, "agent_id": agent["agent_id"]},
            headers={"X-Api-Key": WORKSPACE_SECRET},
        ).json()["conversation_config_override"]["agent"]["first_message"]

    greeting = _between(
        console.get(f"/console/callers/{maria}").text, 'id="greeting"', "</section>"
    )
    agents = console.get("/console/agents").text

    assert "Would be sent" in greeting
    assert html.escape(sent, quote=False) in greeting
    assert "Ava - Brightside Dental front desk" in agents
    assert "first message: yes" in agents
    assert "<code>caller_name</code> = “there”" in agents
