"""Tiny student, teacher, tokenizer and arithmetic chat data, built offline for the trainer tests, and the trainer
settings they share (no pytest import: scripts run in other environments use them too)."""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset

from protege import DistillationConfig
from protege.evaluation import mean_token_kl
from protege.toy import arithmetic_rows, tiny_model, train_tokenizer


def build(folder: Path) -> dict[str, str]:
    """Save a tokenizer, a 2-layer student, a sharper 3-layer teacher and a second teacher of other weights (the
    "specialist", for runs with several teachers); return their paths."""
    rows = arithmetic_rows(200, seed=0)
    tokenizer = train_tokenizer([m["content"] for r in rows for m in r["messages"]], vocab_size=300)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    paths = {}
    for name, layers, hidden, seed in (("student", 2, 32, 1), ("teacher", 3, 64, 2), ("specialist", 2, 48, 3)):
        model = tiny_model(
            len(tokenizer), layers, hidden, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, seed=seed
        )
        if name != "student":  # a confident teacher, so there is a large, learnable divergence
            with torch.no_grad():
                model.lm_head.weight.mul_(30.0)
        path = folder / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = str(path)
    return paths


def dataset(count: int = 64, seed: int = 0) -> Dataset:
    return Dataset.from_list(arithmetic_rows(count, seed))


def config(tmp_path, **overrides) -> DistillationConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=4,
        logging_steps=1,
        report_to="none",
        learning_rate=1e-2,
        max_completion_length=12,
        max_length=48,
        save_strategy="no",
        lmbda=1.0,
        beta=0.5,
        loss_top_k=0,
        seed=0,
        disable_tqdm=True,
    )
    values.update(overrides)
    return DistillationConfig(**values)


def length_reward(prompts, completions, completion_ids, **_):
    """A task reward the tiny student can move (shorter completions score more), importable as 'tiny:length_reward'."""
    return [1.0 - len(ids) / 12 for ids in completion_ids]


def held_out_kl(student, teacher, tokenizer) -> float:
    """Mean per-token KL(teacher || student) on the completions of held-out rows."""
    return mean_token_kl(student, teacher, tokenizer, dataset(32, seed=99), 48, 36)["kl_teacher_student"]


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def run_example(name: str, out: Path) -> str:
    """Run examples/NAME with OUT as its output folder, as a user would; its standard output."""
    import subprocess
    import sys

    example = Path(__file__).parents[1] / "examples" / name
    result = subprocess.run([sys.executable, str(example), str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def assert_same_update(student: str, two: Path, one: Path, what: str) -> None:
    """The weights two runs saved (OUT/weights.pt) are equal, and far enough from the student's start that `what`
    (a wrong gradient, a 2x loss scale) would show."""
    from safetensors.torch import load_file

    start = load_file(Path(student, "model.safetensors"))
    two_weights, one_weights = torch.load(two / "weights.pt"), torch.load(one / "weights.pt")
    moved = max((two_weights[name] - start[name]).abs().max().item() for name in start)
    assert moved > 1e-3, f"the weights moved at most {moved:.2e}: too little to tell {what} from noise"
    torch.testing.assert_close(two_weights, one_weights, atol=1e-6, rtol=1e-5)


def ended_well(returncode: int, stderr: str, reports: list[Path]) -> bool:
    """Whether a torchrun did its work: exit code 0, or gloo's abort of a process at exit (SIGABRT, "terminate called
    without an active exception", about 1 run in 20 here even after a barrier and destroy_process_group) once every
    rank had written its report, which each worker writes last."""
    aborted_at_exit = "terminate called without an active exception" in stderr or "SIGABRT" in stderr
    return returncode == 0 or (aborted_at_exit and all(report.exists() for report in reports))
