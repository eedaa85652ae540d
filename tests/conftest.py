"""Shared test setup: offline hub, one intra-op thread, the tiny models every trainer test uses, and free ports."""

import os
import socket

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
