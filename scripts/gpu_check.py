"""The checks that need a GPU, end to end on tiny models, one line each: bf16 training, the Liger fused loss, and vLLM
colocate generation with sleep mode. Run by scripts/gpu_check.sh on a machine with CUDA, vLLM and liger-kernel; each
check prints `PASS name: figures` or `FAIL name: reason`, and the exit status is the number of failures.

    python scripts/gpu_check.py [--only bf16 liger vllm]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from tiny import build, config, dataset, held_out_kl  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from protege import DistillationTrainer  # noqa: E402


def check_bf16(paths: dict, folder: Path) -> str:
    """bf16 mixed precision on the GPU: the student learns (held-out KL falls) and the loss stays finite."""
    tokenizer = AutoTokenizer.from_pretrained(paths["student"])
    teacher = AutoModelForCausalLM.from_pretrained(paths["teacher"]).cuda()
    before = held_out_kl(AutoModelForCausalLM.from_pretrained(paths["student"]).cuda(), teacher, tokenizer)
    trainer = DistillationTrainer(
        model=paths["student"],
        teacher_model=paths["teacher"],
        args=config(folder, bf16=True, max_steps=30, per_device_train_batch_size=4),
        train_dataset=dataset(64),
    )
    started = time.perf_counter()
    trainer.train()
    after = held_out_kl(trainer.model, teacher, tokenizer)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert all(loss == loss for loss in losses), "a NaN loss"
    assert after < 0.8 * before, f"held-out KL {before:.3f} -> {after:.3f}"
    return f"held-out KL {before:.3f} -> {after:.3f} in {time.perf_counter() - started:.1f} s"


def check_liger(paths: dict, folder: Path) -> str:
    """Liger's fused linear JSD gives the chunked loss's value (full vocabulary, beta 0.5)."""
    values = {}
    for name, overrides in (("chunked", {}), ("liger", {"use_liger_kernel": True})):
        trainer = DistillationTrainer(
            model=paths["student"],
            teacher_model=paths["teacher"],
            args=config(folder / name, lmbda=0.0, max_steps=1, **overrides),
            train_dataset=dataset(16),
        )
        trainer.train()
        values[name] = [e["loss"] for e in trainer.state.log_history if "loss" in e][0]
    gap = abs(values["liger"] / values["chunked"] - 1)
    assert gap < 1e-3, values
    return f"first loss liger {values['liger']:.6f} vs chunked {values['chunked']:.6f} (relative gap {gap:.1e})"


def check_vllm(paths: dict, folder: Path) -> str:
    """vLLM colocate with sleep mode: one generate call per step, samples from the current weights."""
    trainer = DistillationTrainer(
        model=paths["vllm_student"],
        teacher_model=paths["teacher"],
        args=config(
            folder, use_vllm=True, vllm_enable_sleep_mode=True, vllm_gpu_memory_utilization=0.2, max_steps=5,
            gradient_accumulation_steps=4, bf16=True,
        ),
        train_dataset=dataset(64),
    )  # fmt: skip
    started = time.perf_counter()
    trainer.train()
    engine = trainer.vllm
    assert engine.generate_calls == trainer.state.global_step == 5, (engine.generate_calls, trainer.state.global_step)
    free, total = torch.cuda.mem_get_info()
    return (
        f"{engine.generate_calls} generate calls for 5 steps in {time.perf_counter() - started:.1f} s; "
        f"GPU memory free after training (engine asleep): {free / 2**30:.1f} of {total / 2**30:.1f} GiB"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=["bf16", "liger", "vllm"], default=["bf16", "liger", "vllm"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("FAIL cuda: no CUDA device")
        return 1
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    folder = Path(tempfile.mkdtemp(prefix="protege-gpu-check-"))
    paths = build(folder / "models")
    from protege.toy import tiny_model

    vllm_student = tiny_model(len(AutoTokenizer.from_pretrained(paths["student"])), 2, 64, 2, seed=1)
    vllm_student.save_pretrained(folder / "models" / "vllm_student")
    AutoTokenizer.from_pretrained(paths["student"]).save_pretrained(folder / "models" / "vllm_student")
    paths["vllm_student"] = str(folder / "models" / "vllm_student")
    failures = 0
    for name in args.only:
        check = {"bf16": check_bf16, "liger": check_liger, "vllm": check_vllm}[name]
        try:
            print(f"PASS {name}: {check(paths, folder / name)}", flush=True)
        except Exception as error:  # one line per check, whatever went wrong
            failures += 1
            where = traceback.extract_tb(error.__traceback__)[-1]
            print(f"FAIL {name}: {type(error).__name__}: {error} ({Path(where.filename).name}:{where.lineno})")
    return failures


if __name__ == "__main__":
    sys.exit(main())
