"""Scripted servers for the client-fault tests, over real HTTP on 127.0.0.1, and the requests and answers they share.

Stub servers run in daemon threads on ports the kernel picks: a Starlette app under uvicorn for scripted HTTP answers
(`Stub`), and raw socket servers for connections that are dropped or never answered (`RawServer`) and for LM-head
downloads cut mid-way (`HeadServer`). Their fixtures are tests/fault_fixtures.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from pathlib import Path

import numpy as np
from conftest import listening_socket
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from protege.choices import LOGPROB_FORMATS
from protege.teacher.client import TeacherClient
from protege.teacher.codec import BatchScores, SequenceScores, encode

ROUTE = "/get_sequence_logprobs/"
GOOD = {"sequences": [[3, 40, 41, 42], [7, 8, 9]], "prompt_lengths": [1, 2], "top_logprobs": 2}  # a valid request
VOCAB = 1000
FORMATS = LOGPROB_FORMATS
SEQUENCES = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19]]
PROMPT_LENGTHS = [2, 1, 4]


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


def score(url, response_format="compact", top_k=3, **kwargs) -> BatchScores:
    client = TeacherClient(url, response_format=response_format, **kwargs)
    try:
        return client.score(SEQUENCES, PROMPT_LENGTHS, top_k=top_k)
    finally:
        client.close()


def tolerance(response_format: str) -> float:
    return 2e-3 if response_format == "compact" else 0.0
