"""Shared test setup: offline hub, one intra-op thread, and the tiny models every trainer test uses."""

import os

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
