"""The trainer's own FSDP2 path on CPU (gloo, 2 processes): `DistillationTrainer.train()` with accelerate's FSDP2
`prepare`, the teacher sharded like the student, FSDP2 checkpoints and `save_model` (tests/fsdp_train.py runs it).

accelerate enables FSDP only on accelerator devices, so the worker's `CpuFsdp2Trainer` switches the accelerator that
transformers built to the FSDP2 plugin the settings describe (test-only; see its docstring). What this does not cover:
mixed precision (bf16 FSDP2 on CPU is not what a GPU runs), CPU offload, `accelerate launch` reading a config file
(tests build the plugin from `fsdp_config`), FSDP1 and DeepSpeed; scripts/gpu_check.sh runs FSDP2 and ZeRO-3 on a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file

TESTS = Path(__file__).parent
pytestmark = pytest.mark.slow  # torchrun processes: not in the fast tier
SAVES = dict(fsdp=True, lmbda=0.5, max_steps=4, save_strategy="steps", save_steps=2, loss_chunk_size=4)


def torchrun(processes: int, tiny_paths: dict[str, str], out: Path, **settings: object) -> list[dict]:
    """tests/fsdp_train.py on `processes` ranks with `settings`; each rank's report."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)),
        *("--master_addr", "127.0.0.1", "--master_port", str(free_port())),
        *(str(TESTS / "fsdp_train.py"), tiny_paths["student"], tiny_paths["teacher"], str(out), json.dumps(settings)),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


@pytest.mark.parametrize("chunk", [4, None], ids=["chunked", "dense"])
def test_fsdp2_training_equals_one_process(tiny_paths, tmp_path, chunk):
    """2 FSDP2 ranks x 4 micro-batches and 1 plain process x 8 micro-batches of one row, 2 SGD steps, off-policy:
    the same losses and weights (the setting of test_distributed's world-size test, with FSDP2 instead of DDP)."""
    settings = dict(lmbda=0.0, per_device_train_batch_size=1, optim="sgd", learning_rate=2.0, max_steps=2)
    settings |= dict(rows=16, loss_chunk_size=chunk)
    two = torchrun(2, tiny_paths, tmp_path / "two", fsdp=True, gradient_accumulation_steps=4, **settings)
    one = torchrun(1, tiny_paths, tmp_path / "one", gradient_accumulation_steps=8, **settings)
    assert {r["distributed_type"] for r in two} == {"DistributedType.FSDP"}
    assert all(r["sharded"] and r["teacher_sharded"] for r in two), "student and teacher are FSDP2 DTensors"
    assert not one[0]["sharded"]

    start = load_file(Path(tiny_paths["student"], "model.safetensors"))
    two_weights = torch.load(tmp_path / "two" / "weights.pt")
    one_weights = torch.load(tmp_path / "one" / "weights.pt")
    moved = max((two_weights[name] - start[name]).abs().max().item() for name in start)
    assert moved > 1e-3, f"the weights moved at most {moved:.2e}: too little to tell a wrong gradient from noise"
    torch.testing.assert_close(two_weights, one_weights, atol=1e-6, rtol=1e-5)
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-5)
    assert two[1]["loss"] == two[0]["loss"]


def test_fsdp2_checkpoints_resume_exactly_and_save_model_writes_a_hugging_face_folder(tiny_paths, tmp_path):
    """Sharded checkpoints (accelerate's `pytorch_model_fsdp_0`, `optimizer_0`) at steps 2 and 4, with on-policy
    slices generated under FSDP2; resuming both ranks from step 2 ends with the uninterrupted run's weights bit for
    bit; and `save_model`, which transformers skips silently under a sharded state dict, writes a folder that
    `from_pretrained` loads to the trained weights."""
    from transformers import AutoModelForCausalLM

    final = tmp_path / "straight" / "final"
    straight = torchrun(
        2, tiny_paths, tmp_path / "straight", state_dict_type="SHARDED_STATE_DICT", save=str(final), **SAVES
    )
    assert 0 < sum(straight[0]["fractions"]) < 4  # lmbda 0.5: both kinds of slice, so generation ran sharded
    out = tmp_path / "straight" / "out"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-2", "checkpoint-4"]
    for step in (2, 4):
        written = {p.name for p in (out / f"checkpoint-{step}").iterdir()}
        assert {"pytorch_model_fsdp_0", "optimizer_0", "rng_state_0.pth", "rng_state_1.pth"} <= written

    resumed = torchrun(
        2,
        tiny_paths,
        tmp_path / "resumed",
        state_dict_type="SHARDED_STATE_DICT",
        resume=str(out / "checkpoint-2"),
        **SAVES,
    )
    assert [r["fractions"] for r in resumed] == [straight[0]["fractions"]] * 2
    expected = torch.load(tmp_path / "straight" / "weights.pt")
    assert all(
        torch.equal(value, expected[name]) for name, value in torch.load(tmp_path / "resumed" / "weights.pt").items()
    )

    saved = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).state_dict()
    assert saved.keys() == expected.keys()
    assert all(torch.equal(value, expected[name]) for name, value in saved.items())
