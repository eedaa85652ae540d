"""The teacher server against hostile clients, over real HTTP on 127.0.0.1: huge requests, hung-up clients, a full
queue, idle and slow connections, API keys and TLS, and logs that cannot flood. Malformed bodies are
test_server_fuzz.py's; the client against impossible answers and a frozen server is test_client_faults.py's.

Servers run with protege's own uvicorn settings (`ThreadedUvicorn(app, limits)`), or as `protege serve-teacher`
processes. Waiting for a server-side event polls /info/ with a deadline; no assertion rests on elapsed time.
"""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import threading
import time
import types

import httpx
import pytest
from conftest import ThreadedUvicorn, free_port, start_server, stop_server
from fault_servers import GOOD, ROUTE

from protege.server.app import ServerLimits, create_app
from protege.teacher.client import TeacherClient, TeacherServerError


class GatedBackend:
    """The real backend, whose calls wait for `gate`: requests sent meanwhile stay queued. Counts the sequences it
    scored, so a test can tell which requests reached the model."""

    def __init__(self, inner):
        self.inner, self.vocab_size, self.model_name = inner, inner.vocab_size, inner.model_name
        self.gate, self.scored = threading.Event(), []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)  # the rest of the Backend protocol is the real backend's

    def score(self, sequences, *args):
        self.gate.wait(timeout=60)
        self.scored.extend(sequences)
        return self.inner.score(sequences, *args)


def wait_for(url: str, key: str, value: int, timeout: float = 30.0, headers: dict | None = None) -> dict:
    """Poll /info/ until `key` reaches `value`."""
    deadline = time.monotonic() + timeout
    while True:
        info = httpx.get(f"{url}/info/", headers=headers).json()
        if info[key] >= value:
            return info
        assert time.monotonic() < deadline, f"/info/ {key} stayed at {info[key]}, expected {value}"
        time.sleep(0.01)


def raw_request(url: str, body: bytes, content_type: str = "application/json") -> socket.socket:
    """A POST written on a fresh socket, left open (the caller reads or hangs up)."""
    host, port = url.rsplit("/", 1)[-1].split(":")
    sock = socket.create_connection((host, int(port)))
    head = f"POST {ROUTE} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body)
    return sock


# ----- Limits: request size, queue, hung-up clients -----


def test_request_over_the_token_limit_gets_413_naming_both_counts(backend):
    limits = ServerLimits(max_model_len=64, max_batch_tokens=100)
    with ThreadedUvicorn(create_app(backend, limits), limits) as running:
        info = httpx.get(f"{running.url}/info/").json()
        assert info["max_request_tokens"] == 100
        answer = httpx.post(f"{running.url}{ROUTE}", json={"sequences": [[3] * 60, [4] * 50], "prompt_lengths": [1, 1]})
        assert answer.status_code == 413
        assert answer.json()["detail"].startswith("the request holds 110 tokens, over the limit of 100 a request")
        assert httpx.post(f"{running.url}{ROUTE}", json=GOOD).status_code == 200


def test_default_body_limit_refuses_a_2m_token_body_before_parsing_it(backend):
    limits = ServerLimits()  # 16,384 tokens a request: a body limit of 1 MiB
    assert limits.max_body_bytes == 2**20
    body = b'{"sequences": [[' + b"12345," * 2**21 + b'1]], "prompt_lengths": [1]}'
    with ThreadedUvicorn(create_app(backend, limits), limits) as running:
        answer = httpx.post(f"{running.url}{ROUTE}", content=body, headers={"Content-Type": "application/json"})
        assert answer.status_code == 413
        assert answer.json() == {"detail": f"request body of {len(body)} bytes is over the limit of {2**20}"}
        assert httpx.post(f"{running.url}{ROUTE}", json=GOOD).status_code == 200


def test_a_refused_body_still_being_sent_gets_its_whole_413(backend):
    """The 413 goes out once the declared length is read, while the client is still sending. The server then reads
    and discards the rest instead of closing at once: a close with unread data resets the connection, and the reset
    can destroy the answer (a CI run saw "peer closed connection ... received 0 bytes, expected 73"). Here the client
    reads the 413's head first, then sends 8 MiB more body, then reads the rest: without the lingering close the
    send fails with a reset."""
    limits = ServerLimits()
    declared = 64 * 2**20
    with ThreadedUvicorn(create_app(backend, limits), limits) as running:
        host, port = running.url.rsplit("/", 1)[-1].split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            head = f"POST {ROUTE} HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n\r\n"
            sock.sendall(head.encode() + b"[" * 65536)
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 413 ")
            sock.sendall(b"1" * 8 * 2**20)  # the client has not noticed yet, and keeps sending
            while not answer.endswith(b"}"):
                chunk = sock.recv(65536)
                assert chunk, f"the connection closed before the whole answer: {answer!r}"
                answer += chunk
            body = answer.split(b"\r\n\r\n", 1)[1]
            assert json.loads(body) == {"detail": f"request body of {declared} bytes is over the limit of {2**20}"}
            assert b"connection: close" in answer.lower()
            assert sock.recv(65536) == b""  # then the server's FIN: nothing more comes
        assert httpx.post(f"{running.url}{ROUTE}", json=GOOD).status_code == 200


def test_limits_that_cannot_hold_one_sequence_are_refused():
    with pytest.raises(ValueError, match="max_request_tokens=100 must be >= max_model_len=4096"):
        ServerLimits(max_request_tokens=100)
    with pytest.raises(ValueError, match="max_queued_tokens=10 must be >= max_request_tokens=16384"):
        ServerLimits(max_queued_tokens=10)


def test_request_of_a_client_that_hung_up_is_never_scored(backend):
    gated = GatedBackend(backend)
    limits = ServerLimits(max_model_len=64)
    with ThreadedUvicorn(create_app(gated, limits), limits) as running:
        first = threading.Thread(target=httpx.post, args=(f"{running.url}{ROUTE}",), kwargs={"json": GOOD})
        first.start()  # occupies the backend (gated)
        wait_for(running.url, "backend_calls", 1)
        abandoned = {"sequences": [[5, 6, 7, 8, 9, 10]], "prompt_lengths": [2], "top_logprobs": 2}
        sock = raw_request(running.url, httpx.Request("POST", "/", json=abandoned).read())
        assert wait_for(running.url, "queued_tokens", 6)["queued_tokens"] == 6  # parsed and queued
        sock.close()  # the client hangs up while its request waits
        info = wait_for(running.url, "cancelled", 1)
        assert info["queued_tokens"] == 0
        gated.gate.set()
        first.join(timeout=60)
        assert httpx.post(f"{running.url}{ROUTE}", json=GOOD).status_code == 200
        assert [5, 6, 7, 8, 9, 10] not in gated.scored
        assert gated.scored == GOOD["sequences"] * 2


def test_full_queue_answers_503_with_retry_after_and_the_client_waits_it(backend, monkeypatch):
    gated = GatedBackend(backend)
    limits = ServerLimits(max_model_len=8, max_batch_tokens=8, max_queued_tokens=8, batching=False)
    with ThreadedUvicorn(create_app(gated, limits), limits) as running:
        url = f"{running.url}{ROUTE}"
        one = {"sequences": [[3, 4, 5, 6, 7, 8, 9]], "prompt_lengths": [1], "top_logprobs": 1}  # 7 tokens
        busy = threading.Thread(target=httpx.post, args=(url,), kwargs={"json": one, "timeout": 60})
        busy.start()
        wait_for(running.url, "backend_calls", 1)  # scoring (gated): the queue is empty again
        queued = threading.Thread(target=httpx.post, args=(url,), kwargs={"json": one, "timeout": 60})
        queued.start()
        assert wait_for(running.url, "queued_tokens", 7)["queued_tokens"] == 7  # parsed and queued
        refused = httpx.post(url, json={"sequences": [[3, 4]], "prompt_lengths": [1]})
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["detail"] == "the server is busy: 7 tokens are queued, the limit is 8"

        import protege.http_client as http_client

        waits = []

        def sleep(seconds):  # the client's waits, recorded; the gate opens during the first
            waits.append(seconds)
            gated.gate.set()
            time.sleep(0.01)

        monkeypatch.setattr(http_client, "time", types.SimpleNamespace(monotonic=time.monotonic, sleep=sleep))
        client = TeacherClient(running.url, response_format="binary", backoff=0.01, max_retries=3)
        client.score([[3, 4, 5]], [1], top_k=1)
        client.close()
        assert waits[0] == 1.0  # Retry-After, not the 0.01 s backoff
        busy.join(timeout=60)
        queued.join(timeout=60)


# ----- Connections: idle, slow, too many -----


def test_idle_and_slow_connections_are_closed_and_health_answers_meanwhile(backend):
    limits = ServerLimits(max_model_len=64, header_timeout_s=0.5, body_timeout_s=0.5)
    with ThreadedUvicorn(create_app(backend, limits), limits) as running:
        host, port = running.url.rsplit("/", 1)[-1].split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(20)]
        slow_headers = socket.create_connection((host, int(port)))
        slow_headers.sendall(b"GET /health/ HTTP/1.1\r\nHost: x\r\n")  # never finishes its headers
        slow_body = raw_request(running.url, b"")  # announces 0 bytes: complete; now one that stalls:
        slow_body.close()
        stalled = socket.create_connection((host, int(port)))
        stalled.sendall(f"POST {ROUTE} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{".encode())
        assert httpx.get(f"{running.url}/health/", timeout=5).json() == {"status": "ok"}
        for sock in [*idle, slow_headers]:
            sock.settimeout(10)
            assert sock.recv(1024) == b""  # closed by the server, without an answer
        stalled.settimeout(10)
        answer = b"".join(iter(lambda: stalled.recv(4096), b""))  # until the server closes it
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert b"the request body stalled for 0.5 s" in answer
        for sock in [*idle, slow_headers, stalled]:
            sock.close()


def test_past_the_connection_cap_the_longest_idle_goes_or_the_new_one_when_all_are_busy(backend):
    gated = GatedBackend(backend)
    limits = ServerLimits(max_model_len=64, max_connections=3, batching=False)
    with ThreadedUvicorn(create_app(gated, limits), limits) as running:
        host, port = running.url.rsplit("/", 1)[-1].split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(3)]
        deadline = time.monotonic() + 30
        while len(running.server.server_state.connections) < 3:  # the server has taken all three
            assert time.monotonic() < deadline, "the idle connections did not reach the server"
            time.sleep(0.01)
        # a fourth client gets in: the oldest idle connection is closed to make room
        assert httpx.get(f"{running.url}/health/", timeout=5).json() == {"status": "ok"}
        idle[0].settimeout(10)
        assert idle[0].recv(1024) == b""
        for sock in idle:
            sock.close()

        body = httpx.Request("POST", "/", json=GOOD).read()
        busy = [raw_request(running.url, body) for _ in range(3)]  # three requests held by the gated backend
        deadline = time.monotonic() + 30
        while sum(not c._waiting_for_headers() for c in list(running.server.server_state.connections)) < 3:
            assert time.monotonic() < deadline, "the three requests did not all reach the server"
            time.sleep(0.01)  # (no /info/ poll here: its connection would be a fourth)
        extra = socket.create_connection((host, int(port)))
        extra.settimeout(10)
        assert extra.recv(1024) == b""  # every open connection is busy: the new one is refused
        extra.close()
        gated.gate.set()
        for sock in busy:
            sock.settimeout(30)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
            sock.close()


# ----- Access: API key, docs, model name, TLS -----


def test_api_key_is_required_everywhere_but_health(backend):
    limits = ServerLimits(max_model_len=64)
    with ThreadedUvicorn(create_app(backend, limits, api_key="s3cret"), limits) as running:
        url = running.url
        assert httpx.get(f"{url}/health/").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            answer = httpx.post(f"{url}{ROUTE}", json=GOOD, headers=headers)
            assert answer.status_code == 401
            assert answer.headers["www-authenticate"] == "Bearer"
            assert httpx.get(f"{url}/info/", headers=headers).status_code == 401
        answer = httpx.post(f"{url}{ROUTE}", json=GOOD, headers={"Authorization": "Bearer s3cret"})
        assert answer.status_code == 200

        with pytest.raises(TeacherServerError, match=r"refused the request \(HTTP 401\).*API key"):
            TeacherClient(url, max_retries=0).score([[3, 4, 5]], [1])
        client = TeacherClient(url, max_retries=0, api_key="s3cret")
        assert client.score([[3, 4, 5]], [1]).completion_lengths.tolist() == [2]
        client.close()


def test_without_a_key_the_server_is_open_and_docs_are_off_by_default(backend):
    limits = ServerLimits(max_model_len=64)
    with ThreadedUvicorn(create_app(backend, limits), limits) as running:
        assert httpx.post(f"{running.url}{ROUTE}", json=GOOD).status_code == 200
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert httpx.get(f"{running.url}{path}").status_code == 404
        info = httpx.get(f"{running.url}/info/").json()
        assert info["model"] == "model"  # the folder's name, not backend.model_name's absolute path
        assert backend.model_name.endswith("/model") and backend.model_name.startswith("/")
    with ThreadedUvicorn(create_app(backend, limits, docs=True), limits) as running:
        schema = httpx.get(f"{running.url}/openapi.json").json()
        assert "sequences" in str(schema["paths"][ROUTE]["post"]["requestBody"])


@pytest.mark.slow
def test_serve_teacher_reads_the_api_key_from_the_environment(tiny_paths, monkeypatch):
    monkeypatch.setenv("PROTEGE_TEACHER_API_KEY", "from-env")
    port = free_port()
    process = start_server(tiny_paths["teacher"], port)
    try:
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/info/").status_code == 401
        assert httpx.get(f"{url}/info/", headers={"Authorization": "Bearer from-env"}).status_code == 200
    finally:
        stop_server(process)


def test_tls_with_uvicorns_certificate_options(backend, tmp_path, monkeypatch):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    limits = ServerLimits(max_model_len=64)
    app = create_app(backend, limits)
    with ThreadedUvicorn(app, limits, ssl_certfile=str(cert), ssl_keyfile=str(key)) as running:
        assert running.url.startswith("https://")
        with pytest.raises(httpx.ConnectError):  # an unknown certificate is refused by default
            httpx.get(f"{running.url}/health/")
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # httpx trusts it from the environment
        client = TeacherClient(running.url, max_retries=0)
        assert client.score([[3, 4, 5]], [1]).completion_lengths.tolist() == [2]
        client.close()


@pytest.mark.slow
def test_binding_a_public_address_without_a_key_warns(tiny_paths):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "protege", "serve-teacher", "--model", tiny_paths["teacher"], "--host", "0.0.0.0"]
        + ["--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        TeacherClient(f"http://127.0.0.1:{port}").wait_until_ready(timeout=120)
    finally:
        stop_server(process)
    assert "serving on 0.0.0.0 without an API key: anyone who reaches port" in process.stderr.read()


def test_repeated_log_lines_pass_once_per_interval_with_a_count():
    from protege.server.guard import RateLimitFilter

    now = [100.0]
    limiter = RateLimitFilter(interval_s=10.0, clock=lambda: now[0])

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None, None)

    first = record("socket.accept() out of system resource")
    assert limiter.filter(first) and first.getMessage() == "socket.accept() out of system resource"
    passed = [limiter.filter(record("socket.accept() out of system resource")) for _ in range(1000)]
    assert not any(passed)
    assert limiter.filter(record("another message"))  # distinct messages are limited separately
    now[0] += 10.5
    after = record("socket.accept() out of system resource")
    assert limiter.filter(after)
    assert after.getMessage() == "socket.accept() out of system resource [1000 more like it in the last 10 s]"
