"""Sharding engines: an engine asked for but not built stops the run in one line (no silent DDP)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny import config, dataset

from protege import DistillationTrainer
from protege.sharding import check_engine, engines_asked


def fake_accelerator(device: str, processes: int, kind: str = "MULTI_CPU") -> SimpleNamespace:
    state = SimpleNamespace(distributed_type=SimpleNamespace(value=kind))
    return SimpleNamespace(device=torch.device(device), num_processes=processes, state=state)


def test_fsdp_from_the_launcher_on_cpu_stops_the_trainer(tiny_paths, tmp_path, monkeypatch):
    """What `accelerate launch --use_fsdp` sets, on CPU: accelerate would not shard, and the trainer says so."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(RuntimeError, match=r"^FSDP was asked for .* this run is on CPU: the run would train with one"):
        DistillationTrainer(
            model=tiny_paths["student"],
            teacher_model=tiny_paths["teacher"],
            args=config(tmp_path),
            train_dataset=dataset(8),
        )


def test_check_engine_names_the_engine_the_reason_and_the_fallback(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    fsdp = SimpleNamespace(fsdp_plugin_args={"fsdp_version": 2}, deepspeed=None, deepspeed_plugin=None)
    zero3 = SimpleNamespace(fsdp_plugin_args=None, deepspeed="zero3.json", deepspeed_plugin=None)
    plain = SimpleNamespace(fsdp_plugin_args=None, deepspeed=None, deepspeed_plugin=None)
    assert engines_asked(fsdp) == ["FSDP"] and engines_asked(zero3) == ["DeepSpeed"] and engines_asked(plain) == []

    with pytest.raises(RuntimeError, match=r"^FSDP was asked .* this run is on CPU: the run would train with DDP\."):
        check_engine(fsdp, fake_accelerator("cpu", 2), fsdp_enabled=False, deepspeed_enabled=False)
    with pytest.raises(RuntimeError, match=r"^DeepSpeed was asked .* started by torchrun or accelerate launch: .* one"):
        check_engine(zero3, fake_accelerator("cuda", 1, "NO"), fsdp_enabled=False, deepspeed_enabled=False)
    with pytest.raises(RuntimeError, match=r"accelerate set up MULTI_GPU instead: the run would train with DDP"):
        check_engine(fsdp, fake_accelerator("cuda", 2, "MULTI_GPU"), fsdp_enabled=False, deepspeed_enabled=False)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert engines_asked(plain) == ["FSDP"]

    # The engine asked for is the one built, or none was asked for: nothing to say.
    check_engine(fsdp, fake_accelerator("cuda", 2, "FSDP"), fsdp_enabled=True, deepspeed_enabled=False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    check_engine(plain, fake_accelerator("cpu", 2), fsdp_enabled=False, deepspeed_enabled=False)
