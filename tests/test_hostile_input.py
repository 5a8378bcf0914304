"""Hostile and odd input: bodies bounded in size and time, odd headers and numbers, agent
ids that are not agent ids, and every delivery in its own (encrypted) file.

Real servers on loopback; slow senders are raw sockets."""

from __future__ import annotations

import base64
import copy
import io
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography.fernet import Fernet
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from elaoms.crypto import CHUNK_SIZE, MAGIC, VERBATIM, EncryptionConfigError, PayloadCipher
from elaoms.webhooks import streaming
from elaoms.webhooks.signature import sign
from elaoms.webhooks.storage import WebhookStorage

from conftest import (
    HMAC_KEY,
    WORKSPACE_SECRET,
    ServiceProcess,
    load_fixture,
    make_settings,
    signed_headers,
    transcription,
    wait_until,
)
from standins import ElevenLabsStandIn

CALLER = "+14155550123"


class RecordingElevenLabs(ElevenLabsStandIn):
    """The stand-in, also recording requests to paths it does not serve (`/v1/user`)."""

    def __init__(self) -> None:
        super().__init__()
        app = self.server.config.app
        app.router.routes.append(Route("/{path:path}", self._anything, methods=["GET", "POST"]))

    async def _anything(self, request: Request) -> Response:
        self._record(request)
        return JSONResponse({"detail": "not found"}, status_code=404)


@pytest.fixture(scope="module")
def elevenlabs() -> Iterator[RecordingElevenLabs]:
    with RecordingElevenLabs() as api:
        yield api


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, elevenlabs: RecordingElevenLabs
) -> Iterator[ServiceProcess]:
    service = ServiceProcess(
        tmp_path_factory.mktemp("hostile"),
        env={
            "ELEVENLABS_API_KEY": elevenlabs.api_key,
            "ELEVENLABS_API_BASE_URL": elevenlabs.url,
            "REQUEST_BODY_IDLE_TIMEOUT_SECONDS": "1.5",
            "REQUEST_BODY_TIMEOUT_SECONDS": "3",
            "POST_CALL_BODY_TIMEOUT_SECONDS": "3",
        },
    ).start()
    yield service
    service.stop()


# Raw HTTP --------------------------------------------------------------------------------
def open_request(
    server: ServiceProcess, path: str, headers: dict[str, str] | None = None, body: bytes = b""
) -> socket.socket:
    """A connection with the request line and headers sent (and `body`, if any)."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    lines = [f"POST {path} HTTP/1.1", "Host: test"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    return sock


def read_answer(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def is_closed(sock: socket.socket) -> bool:
    """True once the server has closed (EOF or reset); reads and drops what it sent."""
    sock.setblocking(False)
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return True
    except BlockingIOError:
        return False
    except ConnectionError:
        return True
    finally:
        sock.setblocking(True)


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def metric(client: httpx.Client, line_start: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def files_under(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file())


# Size ------------------------------------------------------------------------------------
def test_a_declared_body_over_the_limit_is_refused_before_a_byte_of_it_is_read(
    server: ServiceProcess,
) -> None:
    body = transcription("conv_declared_huge")
    signature = sign(HMAC_KEY, json.dumps(body).encode())
    sock = open_request(
        server,
        "/webhooks/post-call",
        {"ElevenLabs-Signature": signature, "Content-Length": str(300_000_000)},
    )
    with sock:
        answer = read_answer(sock)  # no body sent: an answer at all means it was not awaited
    assert status_of(answer) == 413
    assert b"at most 268435456 bytes" in answer


@pytest.mark.parametrize("path", ["/webhooks/client-data", "/webhooks/search-data"])
def test_client_data_and_search_data_refuse_bodies_past_a_few_kilobytes(
    server: ServiceProcess, path: str
) -> None:
    padding = "x" * 200_000
    body = json.dumps({"caller_id": CALLER, "query": "tooth", "padding": padding}).encode()
    with server.client() as client:
        declared = client.post(path, content=body, headers={"X-Api-Key": WORKSPACE_SECRET})

        def chunks() -> Iterator[bytes]:  # no Content-Length: the size shows as it streams
            for start in range(0, len(body), 4096):
                yield body[start : start + 4096]

        streamed = client.post(path, content=chunks(), headers={"X-Api-Key": WORKSPACE_SECRET})
    assert declared.status_code == 413
    assert streamed.status_code == 413
    assert "at most 65536 bytes" in streamed.json()["detail"]


def test_a_lying_or_malformed_content_length_is_a_4xx_not_a_500(server: ServiceProcess) -> None:
    for headers in (
        {"Content-Length": "12abc"},
        {"Content-Length": "10", "Transfer-Encoding": "chunked"},
    ):
        with open_request(
            server,
            "/webhooks/search-data",
            {"X-Api-Key": WORKSPACE_SECRET, **headers},
            b"0\r\n\r\n",
        ) as sock:
            answer = read_answer(sock)
        assert 400 <= status_of(answer) < 500, answer[:200]


def test_huge_headers_are_refused_and_the_service_keeps_answering(server: ServiceProcess) -> None:
    many = {f"X-Header-{index}": "v" for index in range(5000)}
    for path, headers in (
        ("/webhooks/search-data", {"X-Api-Key": "k" * 200_000}),
        ("/webhooks/search-data?" + "q=" + "x" * 200_000, {}),
        ("/webhooks/search-data", many),
    ):
        with open_request(server, path, headers) as sock:
            answer = read_answer(sock)
        assert answer == b"" or 400 <= status_of(answer) < 500, answer[:200]
    with server.client() as client:
        assert client.get("/health").status_code == 200


# Time ------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/webhooks/post-call", "/webhooks/search-data"])
def test_bodies_that_trickle_in_are_dropped_within_the_deadline(
    server: ServiceProcess, path: str
) -> None:
    headers = {
        "X-Api-Key": WORKSPACE_SECRET,
        "ElevenLabs-Signature": sign(HMAC_KEY, b"{}"),
        "Content-Length": "100000",
    }
    senders = [open_request(server, path, headers) for _ in range(10)]
    started = time.monotonic()
    try:
        open_ones = list(senders)
        # One byte every half second each: never idle long, never done either.
        while open_ones and time.monotonic() - started < 60:
            for sock in list(open_ones):
                if is_closed(sock):
                    open_ones.remove(sock)
                    continue
                try:
                    sock.sendall(b" ")
                except OSError:
                    open_ones.remove(sock)
            time.sleep(0.5)
        assert not open_ones, f"{len(open_ones)} connections still open after 60 s"
    finally:
        for sock in senders:
            sock.close()


def test_a_body_that_stalls_gets_408_and_the_connection_is_closed(server: ServiceProcess) -> None:
    headers = {"ElevenLabs-Signature": sign(HMAC_KEY, b"{}"), "Content-Length": "1000"}
    with open_request(server, "/webhooks/post-call", headers, b'{"type": ') as sock:
        answer = read_answer(sock)  # returns once the server closes
    assert status_of(answer) == 408
    incoming = server.data_dir / "webhooks" / "_incoming"
    assert not any(incoming.iterdir())  # the partial body is not kept


# Odd headers, numbers and ids ------------------------------------------------------------
def test_a_non_ascii_signature_is_a_401_counted_as_an_auth_failure(
    server: ServiceProcess,
) -> None:
    body = json.dumps(transcription("conv_non_ascii")).encode()
    t = int(time.time())
    with server.client() as client:
        before = metric(client, 'elaoms_auth_failures_total{kind="post_call_signature"}')
        for value in (f"t={t},v0=\xe9\xff{'a' * 62}", f"t={t},v0=zz", "t=1_7,v0=ab", f"t=\xb2{t}"):
            sock = open_request(
                server,
                "/webhooks/post-call",
                {"ElevenLabs-Signature": value, "Content-Length": str(len(body))},
                body,
            )
            with sock:
                sock.shutdown(socket.SHUT_WR)
                answer = read_answer(sock)
            assert status_of(answer) == 401, answer[:300]
        after = metric(client, 'elaoms_auth_failures_total{kind="post_call_signature"}')
    assert after - before == 4


@pytest.mark.parametrize("limit", ["1e400", "-1", "-1e400", "1" + "0" * 5000, "NaN"])
def test_a_search_limit_out_of_range_is_a_422_with_the_reason(
    server: ServiceProcess, limit: str
) -> None:
    body = f'{{"query": "tooth", "user_id": "{CALLER}", "limit": {limit}}}'
    with server.client() as client:
        response = client.post(
            "/webhooks/search-data",
            content=body,
            headers={"X-Api-Key": WORKSPACE_SECRET, "Content-Type": "application/json"},
        )
    assert response.status_code == 422, response.text[:300]
    detail = response.json()["detail"]
    assert detail[0]["loc"][-1:] == ["limit"] or "out of range" in detail[0]["msg"]
    assert detail[0]["msg"]


def test_deeply_nested_or_odd_json_bodies_are_4xx_or_default_answers(
    server: ServiceProcess,
) -> None:
    bomb = b'{"query": "x", "user_id": "' + CALLER.encode() + b'", "z": ' + b"[" * 100_00
    odd = [bomb, b"\xff\xfe{}", b'{"query": "a", "query": "b", "user_id": 5}', b"[]"]
    with server.client() as client:
        for body in odd:
            search = client.post(
                "/webhooks/search-data", content=body, headers={"X-Api-Key": WORKSPACE_SECRET}
            )
            assert 400 <= search.status_code < 500, (body[:40], search.text[:200])
            answer = client.post(
                "/webhooks/client-data", content=body, headers={"X-Api-Key": WORKSPACE_SECRET}
            )
            assert answer.status_code == 200
            assert answer.json()["type"] == "conversation_initiation_client_data"


def ask_for_agent(client: httpx.Client, agent_id: str) -> None:
    response = client.post(
        "/webhooks/client-data",
        json={"caller_id": CALLER, "agent_id": agent_id},
        headers={"X-Api-Key": WORKSPACE_SECRET},
    )
    assert response.status_code == 200


def test_an_agent_id_that_is_not_an_agent_id_never_reaches_the_api(
    server: ServiceProcess, elevenlabs: RecordingElevenLabs
) -> None:
    hostile = ["../../../v1/user", "agent_x/../../../v1/user", "agent_%2e%2e", "agent_x?y=1"]
    with server.client() as client:
        for agent_id in hostile:
            ask_for_agent(client, agent_id)
        # Fetches run in the background: once this later one has arrived, any earlier
        # one would have too.
        ask_for_agent(client, "agent_probe_after_hostile")
        wait_until(lambda: elevenlabs.agent_fetches("agent_probe_after_hostile") == 1)
    paths = [path for _, path, _ in elevenlabs.requests]
    assert not any(path.startswith("/v1/user") for path in paths), paths
    assert not any("%" in path or ".." in path or "?" in path for path in paths), paths


def test_lookups_of_agents_never_seen_are_bounded(
    tmp_path: Path, elevenlabs: RecordingElevenLabs
) -> None:
    service = ServiceProcess(
        tmp_path,
        env={
            "ELEVENLABS_API_KEY": elevenlabs.api_key,
            "ELEVENLABS_API_BASE_URL": elevenlabs.url,
            "AGENT_LOOKUPS_PER_MINUTE": "6",
        },
    ).start()
    before = len(elevenlabs.requests)
    try:
        with service.client() as client:
            ask_for_agent(client, "agent_madeup0000")
            # Its 404 is in (the lookup may outlast the call's budget on a loaded host).
            wait_until(lambda: "agent profile agent_madeup0000 not fetched" in service.logs())
            for index in range(1, 60):
                ask_for_agent(client, f"agent_madeup{index:04d}")
            # The same unknown agent again: remembered as unknown, not asked for again.
            for _ in range(5):
                ask_for_agent(client, "agent_madeup0000")
    finally:
        service.stop()
    made_up = [p for _, p, _ in elevenlabs.requests[before:] if "agent_madeup" in p]
    # 6 a minute, in bursts of one: the first, and one more every ten seconds.
    assert 1 <= len(made_up) <= 8, len(made_up)
    assert made_up.count("/v1/convai/agents/agent_madeup0000") == 1


def test_a_client_that_leaves_mid_body_is_counted_as_499_not_500(server: ServiceProcess) -> None:
    label = 'elaoms_requests_total{endpoint="/webhooks/search-data",status='
    with server.client() as client:
        before_499 = metric(client, label + '"499"}')
        before_500 = metric(client, label + '"500"}')
        sock = open_request(
            server,
            "/webhooks/search-data",
            {"X-Api-Key": WORKSPACE_SECRET, "Content-Length": "500"},
            b'{"query": ',
        )
        sock.close()
        wait_until(lambda: metric(client, label + '"499"}') == before_499 + 1, timeout=20)
        assert metric(client, label + '"500"}') == before_500


# Deliveries on disk ----------------------------------------------------------------------
def post(client: httpx.Client, body: bytes) -> httpx.Response:
    return client.post("/webhooks/post-call", content=body, headers=signed_headers(body))


def test_unknown_type_deliveries_without_an_id_each_keep_their_own_file(
    server: ServiceProcess,
) -> None:
    first = json.dumps({"type": "x_future", "event_timestamp": 1763760000, "data": {"a": 1}})
    second = json.dumps({"type": "x_future", "event_timestamp": 1763760000, "data": {"a": 2}})
    no_time = [json.dumps({"type": "x_future", "data": {"b": n}}) for n in (1, 2)]
    other = server.data_dir / "webhooks" / "_other"
    with server.client() as client:
        for body in (first, second, *no_time, first):  # the first one is also delivered twice
            assert post(client, body.encode()).status_code == 200
    kept = sorted(path.read_text() for path in other.glob("x_future__*.json"))
    assert kept == sorted([first, second, *no_time])


def test_an_unsigned_body_never_reaches_a_file(server: ServiceProcess) -> None:
    before = files_under(server.data_dir / "webhooks")
    body = json.dumps(transcription("conv_unsigned_body")).encode()
    wrong = {"ElevenLabs-Signature": sign("not-the-key", body)}
    with server.client() as client:
        assert client.post("/webhooks/post-call", content=body, headers=wrong).status_code == 401
    assert files_under(server.data_dir / "webhooks") == before


def audio_delivery(conversation_id: str, audio: bytes) -> bytes:
    payload = copy.deepcopy(load_fixture("post_call_audio"))
    payload["data"]["conversation_id"] = conversation_id
    payload["data"]["full_audio"] = base64.b64encode(audio).decode()
    return json.dumps(payload).encode()


@pytest.fixture(scope="module")
def encrypted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, str]]:
    key = Fernet.generate_key().decode()
    service = ServiceProcess(
        tmp_path_factory.mktemp("encrypted"),
        env={"ENABLE_ENCRYPTION_AT_REST": "true", "ENCRYPTION_KEY": key},
    ).start()
    yield service, key
    service.stop()


def test_streamed_audio_is_kept_encrypted_and_reads_back_whole(
    encrypted: tuple[ServiceProcess, str],
) -> None:
    server, key = encrypted
    audio = os.urandom(3 * 1024 * 1024 + 17)  # several chunks of the on-disk format
    with server.client() as client:
        response = post(client, audio_delivery("conv_streamed_audio", audio))
    assert response.status_code == 200
    assert response.json()["detail"] == "audio kept as conv_streamed_audio.mp3"
    kept = server.data_dir / "webhooks" / "_audio" / "conv_streamed_audio.mp3"
    raw = kept.read_bytes()
    assert raw.startswith(MAGIC) and audio[:64] not in raw
    assert PayloadCipher(key, enabled=True).decrypt(raw) == audio


def test_signed_deliveries_and_quarantined_bodies_are_encrypted_on_disk(
    encrypted: tuple[ServiceProcess, str],
) -> None:
    server, key = encrypted
    cipher = PayloadCipher(key, enabled=True)
    call = json.dumps(transcription("conv_encrypted_file", caller="+14155550777")).encode()
    bad_audio = audio_delivery("conv_bad_audio", b"x").replace(b'"eA=="', b'"e!A=="')
    with server.client() as client:
        assert post(client, call).status_code == 200
        quarantined = post(client, bad_audio)
    assert quarantined.json()["status"] == "quarantined"
    assert "not valid base64" in quarantined.json()["detail"]
    root = server.data_dir / "webhooks"
    kept = next(root.glob("c_*/post_call_transcription__conv_encrypted_file.json"))
    assert b"+14155550777" not in kept.read_bytes()
    assert json.loads(cipher.decrypt(kept.read_bytes()))["data"]["conversation_id"] == (
        "conv_encrypted_file"
    )
    bodies = list((root / "quarantine").glob("*.body"))
    assert [cipher.decrypt(path.read_bytes()) for path in bodies] == [bad_audio]
    assert all(b"conv_bad_audio" not in path.read_bytes() for path in bodies)


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_body_under_a_chunk_never_reaches_a_file_and_a_larger_one_streams_to_one(
    tmp_path: Path, encrypted: bool
) -> None:
    cipher = PayloadCipher(Fernet.generate_key().decode(), enabled=True) if encrypted else None
    storage = WebhookStorage(make_settings(tmp_path), cipher or PayloadCipher())
    storage.prepare()
    incoming = tmp_path / "webhooks" / "_incoming"

    small = storage.incoming()
    assert not small.write(b'{"type": "post_call_transcription"}')
    assert small.held() == b'{"type": "post_call_transcription"}'
    assert not any(incoming.iterdir())  # nothing on disk: handed over from memory
    small.discard()

    large = storage.incoming()
    body = os.urandom(CHUNK_SIZE + 10)
    if large.write(body):
        large.flush()
    assert large.held() is None  # one chunk is in the file already
    large.finish()
    assert large.read_all() == body and len(large) == len(body)
    large.discard()
    assert not any(incoming.iterdir())

    empty = storage.incoming()
    empty.finish()  # a finished body always has its file (audio of no bytes is kept)
    assert empty.held() is None and empty.read_all() == b""
    empty.discard()


# The on-disk format ----------------------------------------------------------------------
def test_chunked_files_read_back_and_old_forms_still_read() -> None:
    key = Fernet.generate_key().decode()
    cipher = PayloadCipher(key, enabled=True)
    data = os.urandom(2 * 1024 * 1024 + 5)
    handle = io.BytesIO()
    writer = cipher.writer(handle)
    for start in range(0, len(data), 100_000):
        writer.write(data[start : start + 100_000])
    writer.close()
    assert cipher.decrypt(handle.getvalue()) == data
    assert cipher.reader(io.BytesIO(handle.getvalue())).read() == data
    old_token = Fernet(key.encode()).encrypt(b'{"old": true}')
    assert cipher.reader(io.BytesIO(old_token)).read() == b'{"old": true}'
    assert cipher.reader(io.BytesIO(b'{"plain": 1}')).read() == b'{"plain": 1}'


def test_a_truncated_or_reordered_chunked_file_is_refused() -> None:
    cipher = PayloadCipher(Fernet.generate_key().decode(), enabled=True)
    handle = io.BytesIO()
    writer = cipher.writer(handle)
    writer.write(os.urandom(3 * 1024 * 1024))
    writer.close()
    raw = handle.getvalue()
    records = []
    offset = len(MAGIC)
    while offset < len(raw):
        length = int.from_bytes(raw[offset : offset + 4], "big")
        records.append(raw[offset : offset + 4 + length])
        offset += 4 + length
    truncated = MAGIC + b"".join(records[:-1])
    swapped = MAGIC + records[1] + records[0] + b"".join(records[2:])
    for damaged in (truncated, swapped, raw + records[-1]):
        with pytest.raises(EncryptionConfigError):
            cipher.decrypt(damaged)


@pytest.mark.parametrize("prefix", [MAGIC, VERBATIM, b"gAAAAAB", b"\x00", b"\x00ELAOMS-"])
def test_a_signed_body_that_looks_like_an_encrypted_file_is_kept_as_it_is(
    server: ServiceProcess, prefix: bytes
) -> None:
    body = prefix + b"not json"
    with server.client() as client:
        response = post(client, body)
    assert response.status_code == 200
    assert response.json()["status"] == "quarantined"
    quarantine = server.data_dir / "webhooks" / "quarantine"
    kept = [PayloadCipher().decrypt(path.read_bytes()) for path in quarantine.glob("*.body")]
    assert body in kept


@pytest.mark.parametrize("read_size", [1, 3, 7, 4096])
def test_audio_is_decoded_the_same_whatever_the_pieces_it_arrives_in(
    monkeypatch: pytest.MonkeyPatch, read_size: int
) -> None:
    monkeypatch.setattr(streaming, "READ_SIZE", read_size)
    audio = os.urandom(2000)
    envelope = {
        "type": "post_call_audio",
        "data": {
            "conversation_id": "conv_pieces",
            "note": 'the caller said "full_audio" \\ here',
            "full_audio": base64.b64encode(audio).decode(),
        },
    }
    body = json.dumps(envelope).replace("/", "\\/").encode()  # JSON may escape "/"
    sink = io.BytesIO()
    split = streaming.split_audio(io.BytesIO(body), sink, max_remainder=1_000_000)
    assert split.audio_error is None
    assert sink.getvalue() == audio
    envelope["data"]["full_audio"] = streaming.AUDIO_MARKER
    assert json.loads(split.remainder) == envelope


@pytest.mark.parametrize("value", ['"QQ="', '"Q!==', '"QQ==QQ=="', '"QQ\\nQQ=="', "null"])
def test_audio_that_is_not_strict_base64_is_reported(value: str) -> None:
    body = b'{"type": "post_call_audio", "data": {"full_audio": ' + value.encode() + b"}}"
    split = streaming.split_audio(io.BytesIO(body), io.BytesIO(), max_remainder=1_000_000)
    assert split.audio_error or split.audio_values == 0


def test_an_empty_audio_delivery_is_kept_as_an_empty_file(server: ServiceProcess) -> None:
    with server.client() as client:
        response = post(client, audio_delivery("conv_empty_audio", b""))
    assert response.json() == {"status": "received", "detail": "audio kept as conv_empty_audio.mp3"}
    assert (server.data_dir / "webhooks" / "_audio" / "conv_empty_audio.mp3").read_bytes() == b""
    assert not list((server.data_dir / "webhooks" / "_audio").glob(".tmp-*"))
