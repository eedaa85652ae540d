"""FSDP1 (`FullyShardedDataParallel`) is refused with a line that names FSDP2: by the trainer at setup
(`sharding.check_engine`) and by `sharding.whole_head` for the chunked loss, whose LM head FSDP1 holds as 1-D slices of
a flat parameter outside the forward. On 2 gloo CPU processes (tests/fsdp1_step.py), protege's dense loss under raw
FSDP1 gives one process's loss and update; the chunked loss stops with that line on both ranks, before any backward.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import free_port

from protege.sharding import FSDP1_REFUSAL, check_engine

TESTS = Path(__file__).parent


def accelerator(fsdp_version: int) -> SimpleNamespace:
    plugin = SimpleNamespace(fsdp_version=fsdp_version)
    state = SimpleNamespace(distributed_type=SimpleNamespace(value="FSDP"), fsdp_plugin=plugin)
    return SimpleNamespace(device=torch.device("cuda"), num_processes=2, state=state)


def test_the_trainer_refuses_fsdp1_and_names_fsdp2(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    args = SimpleNamespace(fsdp_plugin_args={"fsdp_version": 1}, deepspeed=None, deepspeed_plugin=None)
    with pytest.raises(
        RuntimeError, match=r"^FSDP1 \(fsdp_version 1\) is not supported: .* use FSDP2 \(fsdp_version: 2\)$"
    ):
        check_engine(args, accelerator(1), fsdp_enabled=True, deepspeed_enabled=False)
    check_engine(args, accelerator(2), fsdp_enabled=True, deepspeed_enabled=False)


@pytest.mark.slow  # torchrun processes: not in the fast tier
def test_fsdp1_dense_step_equals_one_process_and_the_chunked_loss_is_refused(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"),
        *("--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(TESTS / "fsdp1_step.py"), str(tmp_path)),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    for report in (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)):
        dense = report["dense"]
        assert dense["loss_sum"][0] == pytest.approx(dense["loss_sum"][1], rel=1e-5)
        assert dense["moved"] > 1e-3, "the step moved the weights too little to tell a wrong gradient from noise"
        assert dense["weight_error"] < 1e-6
        assert report["chunked"] == FSDP1_REFUSAL
