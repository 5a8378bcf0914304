"""Hostile and large request bodies against a real uvicorn worker: memory and time.

For each case a fresh worker is started (`python -m uvicorn main:app` on loopback, on the
embedded store, in a temporary directory) and its peak resident memory (VmHWM in
/proc/<pid>/status) is read after start-up and warm-up and again after the request; the
difference is what the request cost the worker at its peak. Then slow senders: how long a
stalled body, and 30 connections trickling one byte every 3 s, are held. Run by hand:

    .venv/bin/python bench/bodies.py                    # every case
    .venv/bin/python bench/bodies.py --only memory      # the memory cases
    .venv/bin/python bench/bodies.py --app-dir OTHER    # another checkout (a before figure)

Numbers from this machine are in docs/security.md ("Figures").
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from elaoms.webhooks.signature import sign  # noqa: E402

HMAC_KEY = "bench-hmac-key-0123456789abcdef"
SECRET = "bench-workspace-secret-0123456789"
MB = 1000 * 1000


class Worker:
    def __init__(self, app_dir: Path, env: dict[str, str]) -> None:
        self.data = Path(tempfile.mkdtemp(prefix="elaoms-bench-bodies-"))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {
            **os.environ,
            "ELEVENLABS_POST_CALL_HMAC_KEY": HMAC_KEY,
            "ELEVENLABS_CLIENT_DATA_WORKSPACE_SECRET": SECRET,
            "SQLITE_PATH": str(self.data / "memory.sqlite3"),
            "WEBHOOK_STORAGE_PATH": str(self.data / "webhooks"),
            "WEBHOOK_QUARANTINE_PATH": str(self.data / "webhooks" / "quarantine"),
            "ELEVENLABS_API_BASE_URL": "http://127.0.0.1:9",
            "SEARCH_EMBEDDINGS": "off",
            "LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(app_dir),
            **env,
        }
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "uvicorn", "main:app", "--host", "127.0.0.1"),
                *("--port", str(self.port), "--app-dir", str(app_dir)),
            ],
            cwd=self.data,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise RuntimeError("the worker did not start")
        # Warm-up: one small signed delivery, so start-up allocations are in the baseline.
        body = json.dumps({"type": "warm_up", "data": {}}).encode()
        httpx.post(
            f"{self.url}/webhooks/post-call",
            content=body,
            headers={"ElevenLabs-Signature": sign(HMAC_KEY, body)},
        )

    def peak_kb(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise RuntimeError("no VmHWM")

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait(30)


def chunks_of(size: int, piece: bytes = b"x" * 65536) -> Iterator[bytes]:
    sent = 0
    while sent < size:
        part = piece[: min(len(piece), size - sent)]
        sent += len(part)
        yield part


def audio_body(audio_bytes: int) -> bytes:
    audio = os.urandom(audio_bytes)
    return json.dumps(
        {
            "type": "post_call_audio",
            "event_timestamp": int(time.time()),
            "data": {
                "agent_id": "agent_bench",
                "conversation_id": "conv_bench_audio",
                "full_audio": base64.b64encode(audio).decode(),
            },
        }
    ).encode()


def measure(app_dir: Path, name: str, send: object, env: dict[str, str] | None = None) -> None:
    worker = Worker(app_dir, env or {})
    try:
        before = worker.peak_kb()
        started = time.perf_counter()
        status = send(worker)  # type: ignore[operator]
        elapsed = time.perf_counter() - started
        after = worker.peak_kb()
    finally:
        worker.stop()
    print(
        f"{name:58s} -> {status}  peak RSS {before / 1024:6.1f} MB -> {after / 1024:6.1f} MB "
        f"(+{(after - before) / 1024:.1f} MB)  {elapsed:.1f} s",
        flush=True,
    )


def memory_cases(app_dir: Path) -> None:
    def unsigned_declared(worker: Worker) -> int:
        response = httpx.post(
            f"{worker.url}/webhooks/post-call",
            content=chunks_of(300 * MB),
            headers={"Content-Length": str(300 * MB)},
            timeout=300,
        )
        return response.status_code

    def unsigned_chunked(worker: Worker) -> int:
        return httpx.post(
            f"{worker.url}/webhooks/post-call", content=chunks_of(300 * MB), timeout=300
        ).status_code

    def wrong_signature_declared(worker: Worker) -> int:
        headers = {
            "ElevenLabs-Signature": sign("not-the-key", b"x"),
            "Content-Length": str(300 * MB),
        }
        return httpx.post(
            f"{worker.url}/webhooks/post-call",
            content=chunks_of(300 * MB),
            headers=headers,
            timeout=300,
        ).status_code

    def wrong_signature(worker: Worker) -> int:
        headers = {"ElevenLabs-Signature": sign("not-the-key", b"x")}
        return httpx.post(
            f"{worker.url}/webhooks/post-call",
            content=chunks_of(200 * MB),
            headers=headers,
            timeout=300,
        ).status_code

    body = audio_body(45 * MB)  # base64: a 60 MB body

    def signed_audio(worker: Worker) -> str:
        response = httpx.post(
            f"{worker.url}/webhooks/post-call",
            content=body,
            headers={"ElevenLabs-Signature": sign(HMAC_KEY, body)},
            timeout=300,
        )
        return f"{response.status_code} {response.json().get('status')}"

    def small_endpoint(worker: Worker) -> int:
        return httpx.post(
            f"{worker.url}/webhooks/client-data",
            content=chunks_of(300 * MB),
            headers={"X-Api-Key": SECRET},
            timeout=300,
        ).status_code

    measure(app_dir, "post-call, 300 MB unsigned, Content-Length declared", unsigned_declared)
    measure(app_dir, "post-call, 300 MB unsigned, chunked", unsigned_chunked)
    measure(
        app_dir,
        "post-call, 300 MB wrong signature, Content-Length declared",
        wrong_signature_declared,
    )
    measure(app_dir, "post-call, 200 MB with a wrong signature, chunked", wrong_signature)
    measure(app_dir, "client-data, 300 MB authenticated, chunked", small_endpoint)
    measure(app_dir, f"post-call, signed audio ({len(body) / MB:.0f} MB body)", signed_audio)
    key = base64.urlsafe_b64encode(os.urandom(32)).decode()
    measure(
        app_dir,
        f"post-call, signed audio ({len(body) / MB:.0f} MB body), encrypted",
        signed_audio,
        {"ENABLE_ENCRYPTION_AT_REST": "true", "ENCRYPTION_KEY": key},
    )


def raw_request(port: int, path: str, headers: dict[str, str]) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    lines = [f"POST {path} HTTP/1.1", "Host: bench"] + [f"{k}: {v}" for k, v in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def closed(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def time_cases(app_dir: Path, only_path: str = "") -> None:
    worker = Worker(app_dir, {})
    try:
        for path, length in (("/webhooks/post-call", 100_000), ("/webhooks/client-data", 1000)):
            headers = {
                "ElevenLabs-Signature": sign(HMAC_KEY, b"{}"),
                "X-Api-Key": SECRET,
                "Content-Length": str(length),  # within each endpoint's size limit
            }
            if only_path not in path:
                continue
            # Stalled: headers, a few bytes, then nothing.
            sock = raw_request(worker.port, path, headers)
            sock.sendall(b'{"type": ')
            started = time.monotonic()
            while not closed(sock) and time.monotonic() - started < 600:
                time.sleep(0.05)
            print(
                f"{path}: stalled body dropped after {time.monotonic() - started:.1f} s",
                flush=True,
            )
            sock.close()
            # Trickling: 30 connections, one byte every 3 s each.
            socks = [raw_request(worker.port, path, headers) for _ in range(30)]
            started = time.monotonic()
            open_ones = list(socks)
            last_closed = 0.0
            while open_ones and time.monotonic() - started < 600:
                for sock in list(open_ones):
                    if closed(sock):
                        open_ones.remove(sock)
                        last_closed = time.monotonic() - started
                        continue
                    try:
                        sock.setblocking(True)
                        sock.sendall(b" ")
                    except OSError:
                        open_ones.remove(sock)
                        last_closed = time.monotonic() - started
                time.sleep(3)
            print(
                f"{path}: 30 connections trickling 1 byte / 3 s: "
                f"{len(open_ones)} still open, the last closed after {last_closed:.1f} s",
                flush=True,
            )
            for sock in socks:
                sock.close()
    finally:
        worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["memory", "time"])
    parser.add_argument("--paths", default="", help="time cases: only paths containing this")
    parser.add_argument("--app-dir", type=Path, default=REPO_ROOT)
    args = parser.parse_args()
    print(f"app: {args.app_dir}")
    if args.only in (None, "memory"):
        memory_cases(args.app_dir)
    if args.only in (None, "time"):
        time_cases(args.app_dir, args.paths)


if __name__ == "__main__":
    main()
