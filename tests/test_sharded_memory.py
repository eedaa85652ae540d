"""The sharded_memory benchmark's bookkeeping: what a rank holds is counted from each tensor's local shard, and the
share table compares the largest rank of each engine. Fast: no process group, no benchmark run."""

from __future__ import annotations

import pytest
import torch

from benchmarks.sharded_memory import held_bytes, local_bytes, share


class Shard(torch.Tensor):
    """Stands in for a DTensor: a whole tensor whose rank stores only its first row."""

    def to_local(self) -> torch.Tensor:
        return torch.Tensor(self)[:1]


def test_parameters_gradients_and_adamw_states_are_counted_once_each():
    model = torch.nn.Linear(4, 3)  # 15 float32 parameters
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    held = held_bytes(model.parameters(), optimizer.state.values())
    steps = sum(state["step"].numel() * state["step"].element_size() for state in optimizer.state.values())
    assert held["parameters"] == held["gradients"] == 15 * 4
    assert held["optimizer"] == 2 * 15 * 4 + steps  # two moments, and each parameter's step counter
    assert held["state"] == held["parameters"] + held["gradients"] + held["optimizer"]


def test_a_sharded_tensor_counts_its_local_part_and_a_missing_gradient_nothing():
    shard = torch.zeros(4, 8).as_subclass(Shard)
    assert local_bytes(shard) == 8 * 4
    assert local_bytes(torch.zeros(4, 8, dtype=torch.bfloat16)) == 4 * 8 * 2
    assert local_bytes(None) == 0


def test_the_share_is_fsdp2_over_ddp_for_the_largest_rank_and_skips_failed_runs():
    rows = [
        {"engine": "ddp", "state": 400, "peak_rss": 1000, "base": 100},
        {"engine": "ddp", "state": 400, "peak_rss": 1100, "base": 100},
        {"engine": "fsdp2", "state": 200, "peak_rss": 700, "base": 100},
        {"engine": "fsdp2", "state": 100, "peak_rss": 600, "base": 100},
    ]
    figures = {row["figure"]: row for row in share(rows)}
    assert figures["state (parameters + gradients + AdamW)"]["ratio"] == pytest.approx(0.5)
    assert figures["peak RSS"]["ratio"] == pytest.approx(700 / 1100)
    assert figures["peak RSS - base (student side)"]["ratio"] == pytest.approx(600 / 1000)
    assert share([{"engine": "ddp", "error": "killed"}, *rows[2:]]) == []
