"""TeacherClient against faulty servers, and the real teacher server against bad requests, over real HTTP on 127.0.0.1.

Stub servers run in daemon threads on ports the kernel picks: a Starlette app under uvicorn for scripted HTTP answers,
and a raw socket server for connections that are dropped or never answered. Nothing here sleeps to make a timing
assertion: retries are counted by the stubs, backoff delays are recorded, and concurrency is shown by a barrier.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import ThreadedUvicorn, free_port, listening_socket
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

import protege.http_client as client_module
from protege.choices import LOGPROB_FORMATS
from protege.teacher.client import TeacherClient, TeacherServerError
from protege.teacher.codec import BatchScores, SequenceScores, encode
from protege.teacher.head import LMHead, load_head, save_head

VOCAB = 1000
FORMATS = LOGPROB_FORMATS
SEQUENCES = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19]]
PROMPT_LENGTHS = [2, 1, 4]


# ----- Helpers -----


def fake_rows(sequences: list[list[int]], prompt_lengths: list[int], top_k: int) -> list[SequenceScores]:
    """Scores consistent with a request: one row per completion token, finite, top-k sorted descending."""
    rows = []
    for sequence, prompt_length in zip(sequences, prompt_lengths):
        completion = np.asarray(sequence[prompt_length:], dtype=np.int64)
        base = -0.05 - 0.01 * (completion % 7)[:, None]
        top = (base - 0.5 * np.arange(top_k)[None, :]).astype(np.float32)
        ids = (completion[:, None] + np.arange(top_k)[None, :]) % VOCAB
        actual = (base[:, 0] - 0.3).astype(np.float32)
        rows.append(SequenceScores(top, ids.astype(np.int64), actual, completion))
    return rows


def valid_payload(body: dict) -> dict:
    rows = fake_rows(body["sequences"], body["prompt_lengths"], body["top_logprobs"])
    return encode(rows, body["top_logprobs"], body["response_format"], VOCAB)


def expected_batch(sequences, prompt_lengths, top_k) -> BatchScores:
    return BatchScores.pad(fake_rows(sequences, prompt_lengths, top_k), top_k)


def assert_batches_equal(got: BatchScores, want: BatchScores, atol: float = 0.0, rtol: float = 0.0) -> None:
    np.testing.assert_array_equal(got.completion_lengths, want.completion_lengths)
    np.testing.assert_array_equal(got.topk_ids, want.topk_ids)
    np.testing.assert_array_equal(got.actual_ids, want.actual_ids)
    np.testing.assert_allclose(got.topk_logprobs, want.topk_logprobs, rtol=rtol, atol=atol)
    np.testing.assert_allclose(got.actual_logprobs, want.actual_logprobs, rtol=rtol, atol=atol)


class Stub:
    """A scripted /get_sequence_logprobs/: `respond(body, index)` answers request number `index` (from 0)."""

    def __init__(self, respond, barrier: int = 0):
        self.respond, self.barrier = respond, barrier
        self.bodies: list[dict] = []
        self.in_flight = self.peak = 0
        self.reached = asyncio.Event()
        self.app = Starlette(
            routes=[
                Route("/get_sequence_logprobs/", self.endpoint, methods=["POST"]),
                Route("/health/", lambda _: JSONResponse({"status": "ok"})),
            ]
        )

    async def endpoint(self, request: Request) -> Response:
        body = json.loads(await request.body())
        index = len(self.bodies)
        self.bodies.append(body)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            if self.barrier:  # hold each request until `barrier` of them are in flight at once (or 10 s passed)
                if self.in_flight >= self.barrier:
                    self.reached.set()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.reached.wait(), timeout=10)
            answer = self.respond(body, index)
        finally:
            self.in_flight -= 1
        if isinstance(answer, Response):
            return answer
        # json.dumps, not JSONResponse: like a plain Python server, it writes NaN and Infinity as such
        return Response(json.dumps(answer), media_type="application/json")


@pytest.fixture
def stub():
    """Start a Stub with the given responder; yields a factory returning (stub, url)."""
    servers = []

    def start(respond, barrier: int = 0):
        server = Stub(respond, barrier)
        running = ThreadedUvicorn(server.app).__enter__()
        servers.append(running)
        return server, running.url

    yield start
    for running in servers:
        running.__exit__(None, None, None)


class RawServer:
    """A socket server: connection i gets actions[min(i, last)]: 'close' (read the request, answer nothing, close),
    'hang' (accept, never answer) or 'ok' (a valid scored answer, built from the request)."""

    def __init__(self, actions: list[str]):
        self.actions, self.connections, self.held = actions, 0, []
        self.sock = listening_socket()
        self.sock.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            action = self.actions[min(self.connections, len(self.actions) - 1)]
            self.connections += 1
            conn.settimeout(5)
            if action == "hang":
                self.held.append(conn)
                continue
            try:
                self.answer(conn, action)
            except OSError:
                pass
            finally:
                conn.close()

    def answer(self, conn: socket.socket, action: str) -> None:
        """Read the request and act on it (the connection closes after)."""
        body = self.read_request(conn)
        if action == "ok":
            send(conn, json.dumps(valid_payload(body)).encode(), "application/json")

    @staticmethod
    def read_head(conn: socket.socket) -> tuple[bytes, bytes]:
        """The request line and headers, and what came after them."""
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                raise OSError("closed")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        return head, rest

    def read_request(self, conn: socket.socket) -> dict:
        head, body = self.read_head(conn)
        length = next(
            int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            body += conn.recv(65536)
        return json.loads(body)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)
        for conn in self.held:
            conn.close()
        self.sock.close()


def send(conn: socket.socket, content: bytes, content_type: str, status: str = "200 OK", length: int = -1) -> None:
    """An HTTP/1.1 answer that declares `length` bytes (default: all of `content`) and sends `content`."""
    length = len(content) if length < 0 else length
    head = f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    conn.sendall(head.encode() + content)


class HeadServer(RawServer):
    """GET /lm_head/meta/ and /lm_head/ of a real head file: connection i gets actions[min(i, last)], '503' (an
    overloaded server), 'cut' (the headers and half the file, then the connection closes) or 'ok'."""

    def __init__(self, actions: list[str], head_file: Path, meta: dict):
        self.file, self.meta, self.paths = head_file.read_bytes(), meta, []
        super().__init__(actions)

    def answer(self, conn: socket.socket, action: str) -> None:
        path = self.read_head(conn)[0].split(b" ")[1].decode()
        self.paths.append(path)
        if action == "503":
            send(conn, b"overloaded", "text/plain", "503 Service Unavailable")
        elif path == "/lm_head/meta/":
            send(conn, json.dumps(self.meta).encode(), "application/json")
        else:
            cut = len(self.file) // 2 if action == "cut" else len(self.file)
            send(conn, self.file[:cut], "application/octet-stream", length=len(self.file))


@pytest.fixture
def raw_server():
    servers = []

    def start(actions, kind=RawServer, **options):
        servers.append(kind(actions, **options))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def sleeps(monkeypatch):
    """Record the client's backoff delays (and still sleep them)."""
    recorded = []

    def sleep(seconds):
        recorded.append(seconds)
        time.sleep(seconds)

    monkeypatch.setattr(client_module, "time", types.SimpleNamespace(monotonic=time.monotonic, sleep=sleep))
    return recorded


def score(url, response_format="compact", top_k=3, **kwargs) -> BatchScores:
    client = TeacherClient(url, response_format=response_format, **kwargs)
    try:
        return client.score(SEQUENCES, PROMPT_LENGTHS, top_k=top_k)
    finally:
        client.close()


def tolerance(response_format: str) -> float:
    return 2e-3 if response_format == "compact" else 0.0


# ----- Retries -----


@pytest.mark.parametrize("response_format", FORMATS)
def test_5xx_twice_then_success_is_retried_with_exponential_backoff(stub, sleeps, response_format):
    server, url = stub(lambda body, i: Response("overloaded", status_code=503) if i < 2 else valid_payload(body))
    batch = score(url, response_format, top_k=3, backoff=0.01, max_retries=4)
    assert len(server.bodies) == 3
    assert sleeps == [0.01, 0.02]
    assert all(body == server.bodies[0] for body in server.bodies)
    assert server.bodies[0]["response_format"] == response_format and server.bodies[0]["top_logprobs"] == 3
    assert_batches_equal(batch, expected_batch(SEQUENCES, PROMPT_LENGTHS, 3), tolerance(response_format))


def test_dropped_connections_are_retried_with_exponential_backoff(raw_server, sleeps):
    server = raw_server(["close", "close", "ok"])
    batch = score(server.url, "binary", top_k=2, backoff=0.01, max_retries=3)
    assert server.connections == 3
    assert sleeps == [0.01, 0.02]
    assert_batches_equal(batch, expected_batch(SEQUENCES, PROMPT_LENGTHS, 2))


def test_4xx_is_not_retried(stub, sleeps):
    detail = "sequence 1 holds token id 99999, outside the vocabulary [0, 1000)"
    server, url = stub(lambda body, i: JSONResponse({"detail": detail}, status_code=400))
    with pytest.raises(TeacherServerError) as error:
        score(url, backoff=0.01, max_retries=4)
    message = str(error.value)
    assert f"{url}/get_sequence_logprobs/" in message and "HTTP 400" in message and detail in message
    assert len(server.bodies) == 1 and sleeps == []


def test_persistent_5xx_fails_after_all_attempts(stub, sleeps):
    server, url = stub(lambda body, i: Response("backend on fire", status_code=500))
    with pytest.raises(TeacherServerError) as error:
        score(url, backoff=0.01, max_retries=3)
    message = str(error.value)
    assert f"teacher server at {url}/get_sequence_logprobs/ failed after 4 attempts" in message
    assert "HTTP 500" in message and "backend on fire" in message
    assert len(server.bodies) == 4
    assert sleeps == [0.01, 0.02, 0.04]


def test_connection_refused():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(TeacherServerError) as error:
        score(url, backoff=0.01, max_retries=2)
    message = str(error.value)
    assert f"teacher server at {url}/get_sequence_logprobs/ failed after 3 attempts" in message
    assert "ConnectError" in message

    client = TeacherClient(url, backoff=0.01)
    with pytest.raises(TeacherServerError, match=rf"teacher server at {url}/health/ was not ready after 1 s"):
        client.wait_until_ready(timeout=1, interval=0.1)
    client.close()


def test_server_that_never_answers_times_out(raw_server):
    server = raw_server(["hang"])
    outcome = {}

    def call():
        try:
            score(server.url, timeout=0.5, max_retries=1, backoff=0.01)
        except Exception as error:  # noqa: BLE001 - checked below
            outcome["error"] = error

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout=20)  # two 0.5 s attempts; a hang would stop here, not block the run
    assert not thread.is_alive(), "the client hung on a server that never answers"
    error = outcome.get("error")
    assert isinstance(error, TeacherServerError), error
    message = str(error)
    assert f"teacher server at {server.url}/get_sequence_logprobs/ failed after 2 attempts" in message
    assert "no answer within the 0.5 s timeout" in message
    assert server.connections == 2


@pytest.fixture
def served_head(tmp_path) -> tuple[Path, dict]:
    """A small LM head saved as the teacher server saves it, and its /lm_head/meta/ answer."""
    head = LMHead(torch.randn(40, 8, generator=torch.Generator().manual_seed(0)))
    path = tmp_path / "served" / "lm_head.safetensors"
    path.parent.mkdir()
    sha256 = save_head(head, path)
    return path, {**head.metadata(), "sha256": sha256, "bytes": path.stat().st_size}


def test_lm_head_meta_is_retried_after_a_5xx(raw_server, sleeps, served_head):
    server = raw_server(["503", "ok"], HeadServer, head_file=served_head[0], meta=served_head[1])
    client = TeacherClient(server.url, backoff=0.01, max_retries=2)
    assert client.lm_head_meta(required=True) == served_head[1]
    client.close()
    assert server.paths == ["/lm_head/meta/"] * 2 and sleeps == [0.01]


def test_lm_head_download_cut_mid_way_is_retried_from_the_start(raw_server, sleeps, served_head, tmp_path):
    head_file, meta = served_head
    server = raw_server(["ok", "cut", "ok"], HeadServer, head_file=head_file, meta=meta)
    client = TeacherClient(server.url, backoff=0.01, max_retries=2)
    head = client.lm_head(tmp_path / "cache")
    client.close()
    torch.testing.assert_close(head.weight, load_head(head_file).weight, rtol=0, atol=0)
    assert server.paths == ["/lm_head/meta/", "/lm_head/", "/lm_head/"] and sleeps == [0.01]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"{meta['sha256']}.safetensors"]  # no partial file


def test_lm_head_download_cut_every_time_fails_naming_the_url_and_leaves_no_file(
    raw_server, sleeps, served_head, tmp_path
):
    server = raw_server(["ok", "cut"], HeadServer, head_file=served_head[0], meta=served_head[1])
    client = TeacherClient(server.url, backoff=0.01, max_retries=1)
    with pytest.raises(TeacherServerError) as error:
        client.lm_head(tmp_path / "cache")
    client.close()
    message = str(error.value)
    assert f"teacher server at {server.url}/lm_head/ failed after 2 attempts" in message
    assert "peer closed connection without sending complete message body" in message, message
    assert list((tmp_path / "cache").iterdir()) == []


# ----- Bad payloads -----


def mutate(name):
    """Payload mutations by name: (formats it applies to, function(payload, body) -> payload or a Response)."""

    def truncate_b64(cut):
        def apply(p, body):
            key = "logprobs_b64" if body["response_format"] == "binary" else "logprobs_f16_b64"
            p[key] = p[key][:-cut]
            return p

        return apply

    def wrong_shape(p, body):
        p["shape"][1] += 1
        return p

    def wrong_lengths(p, body):
        p["completion_lengths"][0] += 1
        return p

    def wrong_actual_ids(p, body):
        if body["response_format"] == "json":
            p["actual_token_ids"][1][0] += 1
        else:
            rows = fake_rows(body["sequences"], body["prompt_lengths"], body["top_logprobs"])
            rows[1].actual_ids[0] += 1
            p = encode(rows, body["top_logprobs"], "binary", VOCAB)
        return p

    def non_finite_actual(value):
        def apply(p, body):
            rows = fake_rows(body["sequences"], body["prompt_lengths"], body["top_logprobs"])
            rows[2].actual_logprobs[1] = value
            return encode(rows, body["top_logprobs"], body["response_format"], VOCAB)

        return apply

    def unsorted_topk(p, body):
        rows = fake_rows(body["sequences"], body["prompt_lengths"], body["top_logprobs"])
        rows[0].topk_logprobs[1] = rows[0].topk_logprobs[1, ::-1].copy()
        return encode(rows, body["top_logprobs"], body["response_format"], VOCAB)

    def missing_key(p, body):
        del p[{"json": "logprobs", "binary": "token_ids_b64", "compact": "logprobs_f16_b64"}[body["response_format"]]]
        return p

    table = {
        "truncated base64 (invalid)": (
            ("binary", "compact"),
            truncate_b64(3),
            r"'logprobs(_f16)?_b64' is not valid base64",
        ),
        "truncated base64 (short)": (("binary", "compact"), truncate_b64(8), r"'logprobs(_f16)?_b64' holds \d+ bytes"),
        "wrong shape": (("binary",), wrong_shape, r"shape \[3, 4, 3\] does not match the request's \[3, 3, 3\]"),
        "wrong completion_lengths": (FORMATS, wrong_lengths, r"completion_lengths \[4, 2, 3\] do not match"),
        "wrong actual_token_ids": (("json", "binary"), wrong_actual_ids, r"sequence 1: actual_token_ids differ"),
        "-inf actual log-prob": (FORMATS, non_finite_actual(-np.inf), r"sequence 2: the log-prob of an actual token"),
        "NaN actual log-prob": (FORMATS, non_finite_actual(np.nan), r"sequence 2: the log-prob of an actual token"),
        "unsorted top-k": (FORMATS, unsorted_topk, r"sequence 0: top-k log-probs are not sorted"),
        "invalid JSON": (
            FORMATS,
            lambda p, body: Response(b'{"completion_lengths": [3, 2', media_type="application/json"),
            r"answered invalid JSON \(\d+ bytes\)",
        ),
        "a JSON list": (FORMATS, lambda p, body: [p], r"the response is a list, not a JSON object"),
        "missing key": (FORMATS, missing_key, r"the response has no '(logprobs|token_ids_b64|logprobs_f16_b64)'"),
    }
    return table[name]


BAD_PAYLOADS = [
    pytest.param(name, response_format, id=f"{name}-{response_format}")
    for name in [
        "truncated base64 (invalid)",
        "truncated base64 (short)",
        "wrong shape",
        "wrong completion_lengths",
        "wrong actual_token_ids",
        "-inf actual log-prob",
        "NaN actual log-prob",
        "unsorted top-k",
        "invalid JSON",
        "a JSON list",
        "missing key",
    ]
    for response_format in mutate(name)[0]
]


@pytest.mark.parametrize(("name", "response_format"), BAD_PAYLOADS)
def test_bad_payload_is_a_clear_error(stub, name, response_format):
    _, change, problem = mutate(name)
    server, url = stub(lambda body, i: change(valid_payload(body), body))
    with pytest.raises(TeacherServerError) as error:
        score(url, response_format, top_k=3, backoff=0.01, max_retries=2)
    message = str(error.value)
    assert f"teacher server at {url}/get_sequence_logprobs/ answered" in message
    assert re.search(problem, message), message
    assert len(server.bodies) == 1  # a wrong answer is not asked again


# ----- Splitting -----


def test_large_batch_is_split_into_concurrent_requests_and_merged_in_order(stub):
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, VOCAB, size=int(n)).tolist() for n in rng.integers(3, 30, size=24)]
    prompt_lengths = [int(rng.integers(1, len(s))) for s in sequences]
    server, url = stub(lambda body, i: valid_payload(body))

    whole = TeacherClient(url, response_format="binary", max_tokens_per_request=10**6)
    unsplit = whole.score(sequences, prompt_lengths, top_k=4)
    whole.close()
    assert len(server.bodies) == 1
    server.bodies.clear()
    server.peak, server.barrier = 0, 3

    limit = 60
    split = TeacherClient(url, response_format="binary", max_tokens_per_request=limit, max_concurrency=3)
    merged = split.score(sequences, prompt_lengths, top_k=4)
    split.close()

    sizes = [sum(len(s) for s in body["sequences"]) for body in server.bodies]
    assert len(sizes) >= 6 and all(size <= limit for size in sizes), sizes
    assert server.peak == 3  # the barrier let requests through only once three were in flight together
    received = sorted(
        (tuple(s), p) for body in server.bodies for s, p in zip(body["sequences"], body["prompt_lengths"])
    )
    assert received == sorted((tuple(s), p) for s, p in zip(sequences, prompt_lengths))
    assert_batches_equal(merged, unsplit)
    assert_batches_equal(merged, expected_batch(sequences, prompt_lengths, 4))


# ----- The real server -----


LIMITS = dict(max_model_len=64, max_top_logprobs=8, max_body_bytes=16384)


@pytest.fixture(scope="module")
def real_server(backend):
    from protege.server.app import ServerLimits, create_app

    with ThreadedUvicorn(create_app(backend, ServerLimits(**LIMITS))) as running:
        yield running.url


GOOD = dict(sequences=[[3, 40, 41, 42, 43], [7, 8, 9]], prompt_lengths=[2, 1], top_k=3)


@pytest.fixture(scope="module")
def good_answer(real_server):
    client = TeacherClient(real_server, response_format="binary", max_retries=0)
    answer = client.score(GOOD["sequences"], GOOD["prompt_lengths"], top_k=GOOD["top_k"])
    client.close()
    return answer


def body(**overrides) -> dict:
    request = {"sequences": [[3, 40, 41, 42], [7, 8, 9]], "prompt_lengths": [1, 2], "top_logprobs": 2}
    request.update(overrides)
    return request


def refusals(vocab: int):
    """(id, JSON body or raw bytes, expected status, a substring of the answer)."""
    return [
        ("token id = vocab", body(sequences=[[3, 4, 5], [7, vocab, 9]]), 400, f"token id {vocab}, outside the vocab"),
        ("negative token id", body(sequences=[[3, -1, 5], [7, 8, 9]]), 400, "token id -1, outside the vocabulary"),
        ("no sequences", body(sequences=[], prompt_lengths=[]), 400, "'sequences' is empty"),
        ("an empty sequence", body(sequences=[[3, 4], []], prompt_lengths=[1, 1]), 400, "sequence 1 is empty"),
        ("prompt_length 0", body(prompt_lengths=[0, 1]), 400, "prompt_lengths[0]=0 is outside [1, 4)"),
        ("prompt_length = len", body(prompt_lengths=[1, 3]), 400, "prompt_lengths[1]=3 is outside [1, 3)"),
        ("over max_model_len", body(sequences=[[3] * 65, [7, 8]]), 400, "65 tokens, over max_model_len=64"),
        ("top_logprobs over limit", body(top_logprobs=9), 400, "top_logprobs=9 is outside [1, 8]"),
        ("top_logprobs 0", body(top_logprobs=0), 400, "top_logprobs=0 is outside [1, 8]"),
        ("body too large", body(sequences=[[3] * 60] * 200, prompt_lengths=[1] * 200), 413, "over the limit of 16384"),
        ("sequences a string", body(sequences="3 4 5"), 422, "sequences"),
        ("token ids as strings", body(sequences=[["3", "4"], [7, 8]]), 422, "sequences"),
        ("token ids as floats", body(sequences=[[3.0, 4.5], [7, 8]]), 422, "sequences"),
        ("top_logprobs a string", body(top_logprobs="2"), 422, "top_logprobs"),
        ("unknown response_format", body(response_format="xml"), 422, "response_format"),
        ("malformed JSON", b'{"sequences": [[3, 4]', 422, "JSON"),
        ("mismatched lengths", body(prompt_lengths=[1]), 400, "'prompt_lengths' has 1 entries for 2 sequences"),
        ("temperature 0", body(temperature=0), 400, "temperature=0 must be a finite number > 0"),
        ("temperature < 0", body(temperature=-0.5), 400, "temperature=-0.5 must be a finite number > 0"),
        (
            "temperature NaN",
            b'{"sequences": [[3, 4]], "prompt_lengths": [1], "temperature": NaN}',
            422,
            "finite number",
        ),
        ("unknown field", body(top_k=2), 422, "top_k"),
    ]


REFUSAL_IDS = [case[0] for case in refusals(0)]


@pytest.mark.parametrize("case", REFUSAL_IDS)
def test_real_server_refuses_bad_requests_then_serves_the_next(real_server, backend, good_answer, case):
    _, request, status, detail = next(c for c in refusals(backend.vocab_size) if c[0] == case)
    url = f"{real_server}/get_sequence_logprobs/"
    if isinstance(request, bytes):
        answer = httpx.post(url, content=request, headers={"Content-Type": "application/json"}, timeout=30)
    else:
        answer = httpx.post(url, json=request, timeout=30)
    assert answer.status_code == status, answer.text
    assert detail in answer.text, answer.text
    assert "detail" in answer.json()

    client = TeacherClient(real_server, response_format="binary", max_retries=0)
    after = client.score(GOOD["sequences"], GOOD["prompt_lengths"], top_k=GOOD["top_k"])
    client.close()
    assert_batches_equal(after, good_answer, atol=1e-6)


def test_real_server_refusal_reaches_the_client_unretried(real_server, backend, sleeps):
    before = httpx.get(f"{real_server}/info/").json()
    client = TeacherClient(real_server, backoff=0.01, max_retries=3)
    with pytest.raises(TeacherServerError) as error:
        client.score([[3, 4, backend.vocab_size + 5]], [1])
    client.close()
    message = str(error.value)
    assert f"{real_server}/get_sequence_logprobs/ refused the request (HTTP 400)" in message
    assert f"token id {backend.vocab_size + 5}, outside the vocabulary" in message
    after = httpx.get(f"{real_server}/info/").json()
    assert (after["requests"] - before["requests"], after["refused"] - before["refused"]) == (1, 1)
    assert sleeps == []


@pytest.mark.parametrize("response_format", FORMATS)
def test_real_server_formats_agree(real_server, good_answer, response_format):
    client = TeacherClient(real_server, response_format=response_format, max_retries=0)
    batch = client.score(GOOD["sequences"], GOOD["prompt_lengths"], top_k=GOOD["top_k"])
    client.close()
    # float16 keeps a relative error under 2**-11
    assert_batches_equal(batch, good_answer, atol=1e-6, rtol=1e-3 if response_format == "compact" else 0.0)


class GatedBackend:
    """The real backend, whose first call waits for `gate`: requests sent meanwhile queue up and get batched."""

    def __init__(self, inner):
        self.inner, self.vocab_size, self.model_name = inner, inner.vocab_size, inner.model_name
        self.gate, self.calls = threading.Event(), 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)  # the rest of the Backend protocol is the real backend's

    def score(self, *args):
        self.calls += 1
        if self.calls == 1:
            self.gate.wait(timeout=30)
        return self.inner.score(*args)


def test_real_server_batches_concurrent_requests_like_sequential_ones(backend, real_server):
    from protege.server.app import ServerLimits, create_app

    rng = np.random.default_rng(1)
    requests = []
    for _ in range(8):
        sequences = [rng.integers(0, backend.vocab_size, size=int(n)).tolist() for n in rng.integers(3, 20, size=3)]
        requests.append((sequences, [int(rng.integers(1, len(s))) for s in sequences]))

    sequential_client = TeacherClient(real_server, response_format="binary", max_retries=0)
    sequential = [sequential_client.score(s, p, top_k=4) for s, p in requests]
    sequential_client.close()

    gated = GatedBackend(backend)
    with ThreadedUvicorn(create_app(gated, ServerLimits(**LIMITS, batching=True))) as running:
        client = TeacherClient(running.url, response_format="binary", max_retries=0, timeout=60)
        with ThreadPoolExecutor(max_workers=8) as pool:
            futures = [pool.submit(client.score, s, p, 4) for s, p in requests]
            deadline = time.monotonic() + 30
            while httpx.get(f"{running.url}/info/").json()["requests"] < len(requests):
                assert time.monotonic() < deadline, "the requests did not all reach the server"
                time.sleep(0.01)
            gated.gate.set()
            concurrent = [future.result(timeout=60) for future in futures]
        client.close()
        info = httpx.get(f"{running.url}/info/").json()

    for got, want in zip(concurrent, sequential):
        assert_batches_equal(got, want, atol=1e-5)
    assert info["requests"] == 8 and info["refused"] == 0
    assert info["backend_calls"] < info["requests"]
    assert info["backend_calls"] == gated.calls <= 2  # the first call, then every request queued behind it
    assert info["scored_tokens"] == sum(len(s) - p for ss, pp in requests for s, p in zip(ss, pp))


# ----- More bad answers and requests: top-k columns, payload types, gzip bodies, server limits -----


def json_fewer_columns(columns):
    def apply(p, body):
        p["logprobs"] = [[row[:columns] for row in sequence] for sequence in p["logprobs"]]
        p["logprob_token_ids"] = [[row[:columns] for row in sequence] for sequence in p["logprob_token_ids"]]
        return p

    return apply


def json_minus_infinity_actual(p, body):
    p["actual_logprobs"][2][1] = float("-inf")  # json.dumps writes -Infinity; httpx's json.loads reads it back
    return p


def binary_shape_not_a_list(p, body):
    p["shape"] = 3
    return p


def json_logprobs_an_object(p, body):
    p["logprobs"] = {"0": p["logprobs"][0]}
    return p


@pytest.mark.parametrize(
    ("response_format", "change"),
    [
        # (N, 1) top-k lists for K=3 must not be broadcast into all K columns (top-1 repeated K times)
        pytest.param("json", json_fewer_columns(1), id="json-1-of-3-topk-columns"),
        pytest.param("json", json_fewer_columns(2), id="json-2-of-3-topk-columns"),
        # -Infinity must not pass as a finite log-prob (np.nan_to_num(nan=-inf) would make it -3.4e38)
        pytest.param("json", json_minus_infinity_actual, id="json-minus-Infinity-actual-logprob"),
        pytest.param("binary", binary_shape_not_a_list, id="binary-shape-an-int"),
        pytest.param("json", json_logprobs_an_object, id="json-logprobs-an-object"),
    ],
)
def test_malformed_payload_shapes_and_types_are_clear_errors(stub, response_format, change):
    _, url = stub(lambda body, i: change(valid_payload(body), body))
    with pytest.raises(TeacherServerError, match=rf"teacher server at {url}/get_sequence_logprobs/ answered"):
        score(url, response_format, top_k=3, max_retries=0)


def test_undecodable_gzip_body_is_a_clear_error(stub):
    _, url = stub(lambda body, i: Response(b"not gzip", headers={"Content-Encoding": "gzip"}))
    with pytest.raises(TeacherServerError, match=rf"teacher server at {url}/get_sequence_logprobs/"):
        score(url, max_retries=0)


def test_server_refuses_top_logprobs_over_vocab_size(backend):
    from protege.server.app import ServerLimits, create_app

    with ThreadedUvicorn(create_app(backend, ServerLimits(max_top_logprobs=10 * backend.vocab_size))) as running:
        answer = httpx.post(f"{running.url}/get_sequence_logprobs/", json=body(top_logprobs=backend.vocab_size + 1))
    assert answer.status_code == 400, answer.text


def test_server_refuses_chunked_body_over_the_limit(real_server):
    content = json.dumps(body(sequences=[[3] * 60] * 200, prompt_lengths=[1] * 200)).encode()
    assert len(content) > LIMITS["max_body_bytes"]
    answer = httpx.post(
        f"{real_server}/get_sequence_logprobs/",
        content=iter([content]),  # no Content-Length: Transfer-Encoding: chunked
        headers={"Content-Type": "application/json"},
    )
    assert answer.status_code == 413, answer.status_code
