"""Shared test setup: offline hub, one intra-op thread, the tiny models every trainer test uses, and free ports."""

import os
import socket
import subprocess
import sys
import tempfile

import pytest
import torch

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


@pytest.fixture(scope="module")
def teacher_url(tiny_paths):
    """A teacher server on the tiny teacher, one per test module."""
    port = free_port()
    process = start_server(tiny_paths["teacher"], port)
    yield f"http://127.0.0.1:{port}"
    stop_server(process)
