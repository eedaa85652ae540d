"""Shared test setup: offline hub, one intra-op thread, the tiny models every trainer test uses, and free ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch
import uvicorn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["PROTEGE_CACHE_DIR"] = tempfile.mkdtemp(prefix="protege-test-cache-")  # downloaded LM heads, per run

# The tests use tiny tensors: one intra-op thread avoids OpenMP start-up and spin-wait costs, which on a busy machine
# made each small op take milliseconds instead of microseconds.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    from tiny import build

    return build(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
    """32 arithmetic conversations as a JSON-lines file, the dataset `protege train` tests pass by path."""
    import json

    from tiny import arithmetic_rows

    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in arithmetic_rows(32, seed=1)))
    return str(path)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now: for a server a test starts next (`from conftest import ...`)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, port: int, *flags: str) -> subprocess.Popen:
    """`protege serve-teacher --model MODEL` on 127.0.0.1:PORT, once its health check answers."""
    process = subprocess.Popen(
        [sys.executable, "-m", "protege", "serve-teacher", "--model", model, "--port", str(port)]
        + ["--log-level", "warning", *flags],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    from protege.teacher.client import TeacherClient, TeacherServerError

    try:
        TeacherClient(f"http://127.0.0.1:{port}").wait_until_ready(timeout=120)
    except TeacherServerError:
        process.kill()
        raise AssertionError(f"the teacher server did not start: {process.communicate()[1][-2000:]}") from None
    return process


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    return sock


class ThreadedUvicorn:
    """An ASGI app served by uvicorn in a daemon thread, on a socket bound beforehand (no port race)."""

    def __init__(self, app, limits=None, **ssl):
        """`limits` (a ServerLimits): serve with protege's own uvicorn settings (guards, timeouts, TLS from `ssl`)."""
        from protege.server.guard import uvicorn_config

        self.sock = listening_socket()
        scheme = "https" if ssl else "http"
        self.url = f"{scheme}://127.0.0.1:{self.sock.getsockname()[1]}"
        if limits is None:
            config = uvicorn.Config(app, log_level="error", lifespan="auto")
        else:
            guards = {"header_timeout_s": limits.header_timeout_s, "max_connections": limits.max_connections}
            config = uvicorn_config(app, "127.0.0.1", 0, **guards, log_level="error", **ssl)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ThreadedUvicorn:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the stub server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    """A TransformersBackend on a 300-token teacher, for servers run in this process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: a thread pool only adds latency, a lot of it on a loaded machine

    from protege.server.backends import TransformersBackend
    from protege.toy import tiny_model, train_tokenizer

    texts = [f"What is {a}+{b}? {a}+{b}={a + b}" for a in range(30) for b in range(30)]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    model = tiny_model(len(tokenizer), layers=2, hidden=32, heads=4, seed=0)
    with torch.no_grad():  # spread the logits, so that top-k ranks are not near-ties
        model.lm_head.weight.mul_(30.0)
    path = tmp_path_factory.mktemp("teacher") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    yield TransformersBackend(str(path), device="cpu")
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher_url(tiny_paths):
    """A teacher server on the tiny teacher, one per test module."""
    port = free_port()
    process = start_server(tiny_paths["teacher"], port)
    yield f"http://127.0.0.1:{port}"
    stop_server(process)
