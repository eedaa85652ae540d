"""The trainer's own FSDP2 path on CPU (gloo, 2 processes): `DistillationTrainer.train()` with accelerate's FSDP2
`prepare`, the teacher sharded like the student, FSDP2 checkpoints and `save_model`, and two sharded teachers with rows
routed so that a rank can lack one teacher's rows in a slice (tests/fsdp_train.py runs it).

accelerate enables FSDP only on accelerator devices, so the worker's `CpuFsdp2Trainer` switches the accelerator that
transformers built to the FSDP2 plugin the settings describe (test-only; see its docstring). What this does not cover:
mixed precision (bf16 FSDP2 on CPU is not what a GPU runs), CPU offload, `accelerate launch` reading a config file
(tests build the plugin from `fsdp_config`), FSDP1 and DeepSpeed; scripts/gpu_check.sh runs FSDP2 and ZeRO-3 on a GPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from tiny import assert_same_update, ended_well

TESTS = Path(__file__).parent
pytestmark = pytest.mark.slow  # torchrun processes: not in the fast tier
SAVES = dict(fsdp=True, lmbda=0.5, max_steps=4, save_strategy="steps", save_steps=2, loss_chunk_size=4)


def torchrun(
    processes: int,
    tiny_paths: dict[str, str],
    out: Path,
    timeout: float = 600,
    worker: str = "fsdp_train.py",
    **settings: object,
) -> list[dict]:
    """tests/`worker` on `processes` ranks with `settings`; each rank's report; a failure after `timeout` s."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)),
        *("--master_addr", "127.0.0.1", "--master_port", str(free_port())),
        *(str(TESTS / worker), tiny_paths["student"], tiny_paths["teacher"], str(out), json.dumps(settings)),
    ]
    # its own session, so that a run that hangs in a collective is ended whole, workers included
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"torchrun of {processes} ranks did not finish in {timeout} s (a hang in a collective?)")
    reports = [out / f"rank{r}.json" for r in range(processes)]
    assert ended_well(process.returncode, stderr, reports), stderr[-4000:]
    return [json.loads(report.read_text()) for report in reports]


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

    assert_same_update(tiny_paths["student"], tmp_path / "two", tmp_path / "one", "a wrong gradient")
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


@pytest.mark.parametrize("chunk", [4, None], ids=["chunked", "dense"])
def test_fsdp2_two_teachers_with_a_rank_lacking_one_equals_one_process(tiny_paths, tmp_path, chunk):
    """Two local teachers, both sharded by FSDP2, rows alternating between them, one row a slice: in some slice one
    rank has rows of only one teacher and the other rank of only the other. Each sharded teacher's forward gathers
    from every rank, so a rank without rows for it runs a stand-in row (`TeacherRoute.scored=False`); without that
    rule the ranks' collectives differ and the run hangs or fails (the subprocess timeout ends it). The weights equal
    a 1-process run's, so the stand-in rows add nothing to the loss."""
    settings = dict(lmbda=0.0, per_device_train_batch_size=1, optim="sgd", learning_rate=2.0, max_steps=2)
    settings |= dict(rows=16, loss_chunk_size=chunk, specialist=tiny_paths["specialist"])
    two = torchrun(2, tiny_paths, tmp_path / "two", 240, fsdp=True, gradient_accumulation_steps=4, **settings)
    one = torchrun(1, tiny_paths, tmp_path / "one", gradient_accumulation_steps=8, **settings)
    assert all(r["sharded"] for r in two) and not one[0]["sharded"]
    for report in two:  # both teachers FSDP2 modules; only the root group's own parameters whole after a forward
        assert report["teachers_fsdp"] == [True, True]
        assert all(set(whole) <= {"model.norm.weight", "lm_head.weight"} for whole in report["teachers_whole"])
    slices = list(zip(two[0]["routed"], two[1]["routed"]))
    assert len(slices) == 8 and any(a != b for a, b in slices), f"no slice splits the teachers across ranks: {slices}"
    assert sorted(t for pair in slices for rows in pair for t in rows) == [0] * 8 + [1] * 8

    two_weights = torch.load(tmp_path / "two" / "weights.pt")
    torch.testing.assert_close(two_weights, torch.load(tmp_path / "one" / "weights.pt"), atol=1e-6, rtol=1e-5)
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-5)
