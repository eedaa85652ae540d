"""The trainer's own DeepSpeed ZeRO-3 path on CPU (gloo, 2 processes): `DistillationTrainer.train()` with the student
and the local teacher partitioned by ZeRO-3 from the moment they load, DeepSpeed's backward and step, and the chunked
loss's LM head gathered outside the forward (`sharding.whole_head`) with its gradient reaching the partitioned weight.

accelerate enables DeepSpeed only when not use_cpu, so the worker's `CpuZero3Trainer` switches the accelerator that
transformers built to the DeepSpeed plugin (test-only; see tests/zero3_train.py). Checkpoints are DeepSpeed's own
(`global_stepN`, one partition per rank) and resume exactly; `save_model` writes a Hugging Face folder. What this
does not cover: DeepSpeed's own optimizers (they need compiled ops; the trainer's torch optimizers run as client
optimizers), mixed precision, offload, several teachers, `accelerate launch` with examples/accelerate/zero3.yaml;
scripts/gpu_check.sh runs ZeRO-3 on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_fsdp_trainer import torchrun

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (make's .venv installs it)")
pytestmark = pytest.mark.slow  # torchrun processes: not in the fast tier


@pytest.mark.parametrize(("chunk", "tied"), [(4, False), (None, False), (4, True)], ids=["chunked", "dense", "tied"])
def test_zero3_training_equals_one_process(tiny_paths, tmp_path, chunk, tied):
    """2 ZeRO-3 ranks x 4 micro-batches and 1 plain process x 8 micro-batches of one row, 2 SGD steps, off-policy:
    the same losses and weights, the LM head's included (chunked: it is applied outside the forward; tied: the head
    gathered is the embedding, whose gradient then comes from both uses)."""
    settings = dict(lmbda=0.0, per_device_train_batch_size=1, optim="sgd", learning_rate=2.0, max_steps=2)
    settings |= dict(rows=16, loss_chunk_size=chunk, tied=tied)
    two = torchrun(
        2, tiny_paths, tmp_path / "two", 300, "zero3_train.py", zero3=True, gradient_accumulation_steps=4, **settings
    )
    one = torchrun(1, tiny_paths, tmp_path / "one", 300, "zero3_train.py", gradient_accumulation_steps=8, **settings)
    assert {r["distributed_type"] for r in two} == {"DistributedType.DEEPSPEED"}
    assert all(r["partitioned"] and r["teacher_partitioned"] for r in two), "student and teacher are ZeRO-3's"
    assert not one[0]["partitioned"]

    start = load_file(Path(tiny_paths["student"], "model.safetensors"))
    if tied:  # the tied copy's head is the student's embedding
        start["lm_head.weight"] = start["model.embed_tokens.weight"]
    two_weights = torch.load(tmp_path / "two" / "weights.pt")
    moved = (two_weights["lm_head.weight"] - start["lm_head.weight"]).abs().max().item()
    assert moved > 1e-3, f"the LM head moved at most {moved:.2e}: its gradient did not reach it"
    torch.testing.assert_close(two_weights, torch.load(tmp_path / "one" / "weights.pt"), atol=1e-6, rtol=1e-5)
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-5)
    assert two[1]["loss"] == two[0]["loss"]


def test_zero3_checkpoints_resume_exactly_and_save_model_writes_a_hugging_face_folder(tiny_paths, tmp_path):
    """DeepSpeed checkpoints (each rank's partition of the weights and of AdamW's state) at steps 2 and 4; resuming
    both ranks from step 2 runs 2 steps and ends with the uninterrupted run's weights bit for bit; and `save_model`,
    for which transformers writes only DeepSpeed's partitions unless `stage3_gather_16bit_weights_on_model_save` is
    set, writes a folder that `from_pretrained` loads to the trained weights."""
    from transformers import AutoModelForCausalLM

    settings = dict(zero3=True, lmbda=0.0, max_steps=4, save_strategy="steps", save_steps=2, loss_chunk_size=4)
    final = tmp_path / "straight" / "final"
    straight = torchrun(2, tiny_paths, tmp_path / "straight", 300, "zero3_train.py", save=str(final), **settings)
    assert [r["steps_run"] for r in straight] == [4, 4]
    out = tmp_path / "straight" / "out"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-2", "checkpoint-4"]
    for step in (2, 4):
        written = {p.name for p in (out / f"checkpoint-{step}").iterdir()}
        assert {f"global_step{step}", "rng_state_0.pth", "rng_state_1.pth", "trainer_state.json"} <= written
        partitions = {p.name for p in (out / f"checkpoint-{step}" / f"global_step{step}").iterdir()}
        assert {f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")} <= (
            partitions
        )

    resume = str(out / "checkpoint-2")
    resumed = torchrun(2, tiny_paths, tmp_path / "resumed", 300, "zero3_train.py", resume=resume, **settings)
    assert [r["steps_run"] for r in resumed] == [2, 2]
    expected = torch.load(tmp_path / "straight" / "weights.pt")
    start = load_file(Path(tiny_paths["student"], "model.safetensors"))
    assert max((expected[name] - start[name]).abs().max().item() for name in start) > 1e-3
    weights = torch.load(tmp_path / "resumed" / "weights.pt")
    assert weights.keys() == expected.keys() and all(torch.equal(value, expected[n]) for n, value in weights.items())

    saved = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).state_dict()
    assert saved.keys() == expected.keys()
    assert all(torch.equal(value, expected[name]) for name, value in saved.items())


def test_zero3_on_policy_training_equals_ddp_and_ranks_stopping_early_keep_generating(tiny_paths, tmp_path):
    """lmbda 0.5 (3 of the first step's 4 slices on-policy): HF `generate` on the ZeRO-3 student inside the trainer,
    2 ZeRO-3 ranks against 2 DDP ranks of the same seeds: the same losses and weights (so the same completions).
    Not against 1 process: each rank samples from its own seed, so the completions depend on the world size.
    After training, rank r samples 2 + 4 r tokens: with `synced_gpus` (`sharding.sharded_across_ranks` sees ZeRO-3's
    `ds_id` parameters) rank 0 keeps joining rank 1's gathers, and both sample what a plain copy of the weights
    samples; without it rank 1 waits for rank 0 forever (the subprocess timeout ends the test)."""
    settings = dict(lmbda=0.5, per_device_train_batch_size=1, optim="sgd", learning_rate=2.0, max_steps=2)
    settings |= dict(rows=16, loss_chunk_size=4, gradient_accumulation_steps=4)
    zero3 = torchrun(2, tiny_paths, tmp_path / "zero3", 240, "zero3_train.py", zero3=True, **settings)
    ddp = torchrun(2, tiny_paths, tmp_path / "ddp", 240, "zero3_train.py", **settings)
    assert {r["distributed_type"] for r in zero3} == {"DistributedType.DEEPSPEED"}
    assert {r["distributed_type"] for r in ddp} == {"DistributedType.MULTI_CPU"}
    assert all(r["partitioned"] for r in zero3) and not any(r["partitioned"] for r in ddp)
    assert [r["fractions"] for r in zero3 + ddp] == [[0.75, 0.0]] * 4
    for report in zero3 + ddp:
        assert report["loss"] == pytest.approx(ddp[0]["loss"], rel=1e-5)
    weights = torch.load(tmp_path / "zero3" / "weights.pt")
    torch.testing.assert_close(weights, torch.load(tmp_path / "ddp" / "weights.pt"), atol=1e-6, rtol=1e-5)

    for report in zero3:
        assert report["pushed"] == [0.0, True]  # a vLLM weight push gets every weight whole, on every rank
        sharded, plain = report["generated"]
        assert [len(row) for row in sharded] == [2 + 4 * report["rank"]] * 2
        assert sharded == plain
