"""The student server's weight push: chunks that safetensors accepts, tied weights included, on the sync cadence."""

from __future__ import annotations

import types

import torch
from safetensors.torch import load, save

from protege.vllm_colocate import weights_due
from protege.vllm_server import VLLMServer, weight_chunks


def test_tied_weights_are_pushed_under_both_names():
    embedding = torch.nn.Embedding(10, 4)
    head = torch.nn.Linear(4, 10, bias=False)
    head.weight = embedding.weight  # tied, as in Qwen2's small models
    weights = [("model.embed_tokens.weight", embedding.weight), ("norm.weight", torch.ones(4))]
    weights.append(("lm_head.weight", head.weight))
    chunks = list(weight_chunks(weights, max_bytes=10 * 4 * 4 + 16))
    assert [sorted(c) for c in chunks] == [["model.embed_tokens.weight", "norm.weight"], ["lm_head.weight"]]
    loaded = {name: tensor for chunk in chunks for name, tensor in load(save(chunk)).items()}
    assert torch.equal(loaded["lm_head.weight"], embedding.weight.detach())
    assert torch.equal(loaded["model.embed_tokens.weight"], embedding.weight.detach())

    one_chunk = list(weight_chunks(weights, max_bytes=2**20))
    assert len(one_chunk) == 1
    assert set(load(save(one_chunk[0]))) == {"model.embed_tokens.weight", "norm.weight", "lm_head.weight"}


def test_weights_are_pushed_on_the_sync_cadence_through_the_public_post():
    """Both engines share `weights_due`; the server engine pushes at steps 0, 2, 4 with vllm_sync_frequency=2."""
    assert weights_due(None, 7, 3) and weights_due(4, 7, 3) and not weights_due(5, 7, 3)

    class Recorder:
        def __init__(self):
            self.paths: list[str] = []

        def post(self, path: str, headers: dict | None = None, **content) -> None:
            assert headers == {"Content-Type": "application/octet-stream"} and set(content) == {"content"}
            self.paths.append(path)

    engine = object.__new__(VLLMServer)  # no server to wait for: only the push is under test
    engine.client, engine.synced_step, engine.pushed_bytes = Recorder(), None, 0
    engine.args = types.SimpleNamespace(vllm_sync_frequency=2, vllm_server_chunk_mb=1.0)
    model = torch.nn.Linear(4, 3)
    for step in range(5):
        engine._sync_weights(model, step)
    assert engine.client.paths == [f"/weights/?chunk=0&chunks=1&version={step}" for step in (0, 2, 4)]
    assert engine.synced_step == 4 and engine.pushed_bytes > 0
