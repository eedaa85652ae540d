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


# Liger's beta against protege's. protege (losses.generalized_jsd_loss, divergence_rows): M = (1 - beta) S + beta T and
# beta KL(T || M) + (1 - beta) KL(S || M), with KL(T || S) at beta 0 and KL(S || T) at beta 1 (S student, T teacher).
# liger_kernel.chunked_loss.LigerFusedLinearJSDLoss, read in every release from 0.6.5 to 0.8.5, writes the same: its
# mixture is (1 - beta) * student + beta * teacher, its beta 0 branch is kl_div(student, teacher) = KL(T || S), its
# beta 1 branch KL(S || T), and the token sum is masked by ignore_index and divided by the unmasked tokens. So a
# protege beta is handed to Liger unchanged. Earlier releases differ: 0.5.3 to 0.5.5 mix beta S + (1 - beta) T but
# weight the KLs as above, so Liger's 1 - beta gives protege's loss at beta 0, 0.5 and 1 and at no other beta; and every
# release before 0.6.5 sums the masked tokens too and divides by all tokens. pyproject's `liger` extra pins the
# checked line.
LIGER_CHECKED = ("0.6.5", "0.9")  # [from, below)
LIGER_BETAS = (0.0, 0.5, 1.0)


def liger_beta(beta: float) -> float:
    """The beta to give LigerFusedLinearJSDLoss for protege's `beta` (the identity on the checked line, see above)."""
    return beta


def liger_version_checked(version: str) -> bool:
    from packaging.version import Version

    return Version(LIGER_CHECKED[0]) <= Version(version) < Version(LIGER_CHECKED[1])


def liger_gap(beta: float, device: str, compiled: bool = True, temperature: float = 2.0) -> float:
    """Largest relative gap between Liger's fused linear JSD and protege's generalized_jsd_loss on the same random
    hidden states and LM heads (a third of the tokens masked): in the value and in the gradients of the student's
    hidden states and LM head."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    from protege.losses import generalized_jsd_loss

    g = torch.Generator().manual_seed(0)
    tokens, vocab = 48, 300
    student = [torch.randn(tokens, 32, generator=g), 0.5 * torch.randn(vocab, 32, generator=g)]
    teacher = [torch.randn(tokens, 64, generator=g).to(device), torch.randn(vocab, 64, generator=g).to(device)]
    labels = torch.randint(vocab, (tokens,), generator=g)
    labels[torch.rand(tokens, generator=g) < 1 / 3] = -100
    labels = labels.to(device)
    fused = LigerFusedLinearJSDLoss(
        beta=liger_beta(beta), temperature=temperature, weight_hard_loss=0.0, weight_soft_loss=1.0, compiled=compiled
    )
    results = []
    for loss_fn in (
        lambda h, w: fused(h, w, *teacher, labels),
        lambda h, w: generalized_jsd_loss(
            h @ w.T, teacher[0] @ teacher[1].T, labels, beta=beta, temperature=temperature
        ),  # a per-token mean over the unmasked tokens, as Liger's
    ):
        leaves = [t.to(device).requires_grad_(True) for t in student]
        loss = loss_fn(*leaves)
        results.append([loss.detach(), *torch.autograd.grad(loss, leaves)])
    assert results[1][0] > 0, "a zero loss compares nothing"
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(*results, strict=True))


def check_liger(paths: dict, folder: Path) -> str:
    """Liger's fused linear JSD gives protege's loss at beta 0, 0.5 and 1: its value and gradients on random inputs,
    and the first training loss with use_liger_kernel against the chunked loss's."""
    from importlib.metadata import version

    liger = version("liger-kernel")
    assert liger_version_checked(liger), f"liger-kernel {liger} is outside the checked line {LIGER_CHECKED}"
    direct = {beta: liger_gap(beta, "cuda") for beta in LIGER_BETAS}
    trained = {}
    for beta in LIGER_BETAS:
        values = {}
        for name, overrides in (("chunked", {}), ("liger", {"use_liger_kernel": True})):
            trainer = DistillationTrainer(
                model=paths["student"],
                teacher_model=paths["teacher"],
                args=config(folder / f"{name}-{beta}", lmbda=0.0, beta=beta, max_steps=1, **overrides),
                train_dataset=dataset(16),
            )
            trainer.train()
            values[name] = [e["loss"] for e in trainer.state.log_history if "loss" in e][0]
        trained[beta] = abs(values["liger"] / values["chunked"] - 1)
    assert max(direct.values()) < 1e-4 and max(trained.values()) < 1e-3, (direct, trained)
    gaps = ", ".join(f"beta {b}: {direct[b]:.1e} / {trained[b]:.1e}" for b in LIGER_BETAS)
    return f"liger-kernel {liger}, relative gaps (random inputs / first training loss) {gaps}"


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
