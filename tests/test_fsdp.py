"""FSDP2 on CPU (gloo, 2 processes): protege's loss, metric, evaluation and generation on `fully_shard`-ed student
and teacher give one process's values and update on the same rows (tests/fsdp_step.py runs both sides).

The Trainer's own FSDP2 path (accelerate's `prepare`, the teacher's placement, checkpoints, `save_model`, several
teachers) is tested by tests/test_fsdp_trainer.py, DeepSpeed ZeRO-3 by tests/test_zero3_trainer.py, and FSDP1's refusal
by tests/test_fsdp1.py. What this does not cover: mixed precision.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

TESTS = Path(__file__).parent
pytestmark = pytest.mark.slow  # torchrun processes: not in the fast tier
CASES = ("auto", "chunk3", "chunk3_top1", "dense", "dense_top1")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"),
        *("--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(TESTS / "fsdp_step.py"), str(out)),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("case", CASES)
def test_fsdp2_step_equals_one_process(ranks, case):
    """Chunked ("auto", 3 tokens a chunk) and dense (`loss_chunk_size=None`), full-vocabulary JSD and sparse top-1:
    the summed loss, the reverse-KL metric and both evaluation KLs over the two ranks, the SGD-updated weights and the
    sampled completions equal one process's on all rows; a vLLM engine is sent the whole trained weights."""
    for report in ranks:
        values = report[case]
        assert values["loss_sum"][0] == pytest.approx(values["loss_sum"][1], rel=1e-5)
        assert values["ratio"][0] == pytest.approx(values["ratio"][1], rel=1e-5)
        assert values["kl"][0] == pytest.approx(values["kl"][1], rel=1e-5)
        assert values["moved"] > 1e-3, "the step moved the weights too little to tell a wrong gradient from noise"
        assert values["weight_error"] < 1e-6
        assert values["generated"][0] == values["generated"][1]
        assert values["pushed"] == [pytest.approx(0.0, abs=1e-6), False]  # a vLLM weight push gets whole tensors
