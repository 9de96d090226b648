"""Transport limits on a real uvicorn server (fluxserve's app without its engine, loopback only,
short limits so each case takes about a second)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from server.app import build_app
from server.child_process import free_port
from server.cli import parse_args
from server.config import ServerSettings
from server.transport import LimitedHttpToolsProtocol, TransportLimits

LIMITS = TransportLimits(max_request_body_bytes=1000, header_timeout_s=1.0,
                         keep_alive_timeout_s=1, max_connections=4, max_header_bytes=64 << 10,
                         max_header_count=20)


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    app = build_app(parse_args(["serve", "--model", "/nonexistent"]),
                    ServerSettings(transport=LIMITS))
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_level="warning",
                            http=LimitedHttpToolsProtocol,
                            timeout_keep_alive=LIMITS.keep_alive_timeout_s)
    config.transport_limits = LIMITS
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def _connect(base_url: str) -> socket.socket:
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    return sock


def _read_all(sock: socket.socket, timeout_s: float = 5.0) -> bytes:
    """Read until the server closes the connection (fails if it does not within timeout_s)."""
    sock.settimeout(timeout_s)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def _assert_openai_error(raw: bytes, status: int) -> None:
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), raw[:200]
    assert b'"error"' in body and f'"code":{status}'.encode() in body.replace(b" ", b"")


def test_body_over_the_limit_by_content_length_is_413(base_url):
    resp = httpx.post(f"{base_url}/v1/completions", content=b"x" * 5000,
                      headers={"content-type": "application/json"})
    assert resp.status_code == 413
    error = resp.json()["error"]
    assert error["code"] == 413 and "--max-request-body-bytes" in error["message"]


def test_chunked_body_over_the_limit_is_413(base_url):
    def chunks():
        for _ in range(50):
            yield b'{"pad": "' + b"x" * 100 + b'"}'
    resp = httpx.post(f"{base_url}/v1/completions", content=chunks(),
                      headers={"content-type": "application/json"})
    assert resp.status_code == 413 and resp.json()["error"]["code"] == 413


def test_a_content_length_that_understates_the_body_does_not_get_past_the_limit(base_url):
    sock = _connect(base_url)
    # Content-Length 20 (under the limit), then 100 kB: the server reads 20 bytes as the body
    # and the rest as an (unparseable) next request, never as one body.
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
                 b"content-length: 20\r\n\r\n" + b"x" * 100_000)
    # The server closes with bytes of ours still unread, so TCP may reset the connection, which
    # can drop its answer before we read it: then too nothing got through.
    chunks, reset = [], False
    sock.settimeout(5.0)
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:
        reset = True
    raw = b"".join(chunks)
    assert b"HTTP/1.1 200" not in raw
    statuses = [int(line.split()[1]) for line in raw.split(b"\r\n") if line.startswith(b"HTTP/1.1")]
    assert (statuses or reset) and all(400 <= s < 500 for s in statuses), raw[:500]
    assert raw.count(b'"error"') == len(statuses)  # every answer in the OpenAI shape


def test_body_under_the_limit_reaches_the_route(base_url):
    resp = httpx.post(f"{base_url}/v1/completions", json={"model": "m", "prompt": "x"})
    assert resp.status_code == 503  # no engine in this app: past the body limit, at the route


def test_slow_headers_are_cut_with_408(base_url):
    sock = _connect(base_url)
    started = time.monotonic()
    sock.sendall(b"GET /health HTTP/1.1\r\n")
    with pytest.raises(OSError):  # the server closes the connection mid-trickle
        for _ in range(40):
            sock.sendall(b"x-slow: 1\r\n")
            time.sleep(0.1)
        raise AssertionError("headers trickled for 4 s without a timeout")
    raw = _read_all(sock)
    _assert_openai_error(raw, 408)
    assert time.monotonic() - started < LIMITS.header_timeout_s + 1.5


def test_a_request_head_over_the_size_limit_gets_431(base_url):
    sock = _connect(base_url)
    sock.sendall(b"GET /health HTTP/1.1\r\nhost: t\r\nx-big: ")
    with contextlib.suppress(OSError):  # the server may close while we still send
        for _ in range(64):  # 4 MiB, far past the 64 KiB limit
            sock.sendall(b"a" * (64 << 10))
    _assert_openai_error(_read_all(sock), 431)


def test_too_many_headers_get_431(base_url):
    sock = _connect(base_url)
    headers = b"".join(b"x-h%d: 1\r\n" % i for i in range(LIMITS.max_header_count + 5))
    sock.sendall(b"GET /health HTTP/1.1\r\nhost: t\r\n" + headers + b"\r\n")
    raw = _read_all(sock)
    _assert_openai_error(raw, 431)
    assert b"--h11-max-header-count" in raw


def test_a_silent_connection_is_closed_after_the_header_timeout(base_url):
    sock = _connect(base_url)
    started = time.monotonic()
    raw = _read_all(sock)
    assert time.monotonic() - started < LIMITS.header_timeout_s + 1.5
    _assert_openai_error(raw, 408)


def test_idle_keep_alive_connections_are_closed(base_url):
    sock = _connect(base_url)
    sock.sendall(b"GET /health HTTP/1.1\r\nhost: t\r\n\r\n")
    started = time.monotonic()
    raw = _read_all(sock)  # the response, then the close after the keep-alive timeout
    assert raw.startswith(b"HTTP/1.1 200")
    assert time.monotonic() - started < LIMITS.keep_alive_timeout_s + 1.5


def test_connections_beyond_the_limit_get_503_and_are_closed(base_url):
    held = [_connect(base_url) for _ in range(LIMITS.max_connections)]
    try:
        time.sleep(0.2)  # all accepted
        extra = _connect(base_url)
        raw = _read_all(extra, timeout_s=2)
        _assert_openai_error(raw, 503)
        assert b"--max-connections" in raw
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    assert httpx.get(f"{base_url}/health").status_code == 200  # slots come back
