"""The student server's weight push: chunks that safetensors accepts, tied weights included."""

from __future__ import annotations

import torch
from safetensors.torch import load, save

from protege.vllm_server import weight_chunks


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
