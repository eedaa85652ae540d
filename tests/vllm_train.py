"""Run by test_vllm inside the vLLM environment (.vllm-env): on-policy training with `use_vllm=True` (colocate), then
write what the test checks.

    .vllm-env/bin/python tests/vllm_train.py STUDENT TEACHER OUT SETTINGS_JSON [RESUME_FROM]

SETTINGS_JSON overrides test_trainer.config's settings. OUT/report.json holds: the number of vLLM generate calls and
optimizer steps, the logged losses, the held-out KL(teacher || student) before and after, a sample check: vLLM's
log-probs of its own samples (at the weights it last received) against the student's at those weights and at the
starting weights, and under on_policy_objective="policy_gradient" the pg/ metrics as logged and the importance weight
rho unrounded ("rho_mean", "rho_max", over every trained token). A list of settings runs one training after another
in this process (one vLLM import for all; each run builds its engine), each in OUT/run-I: OUT/report.json is then
{"runs": [one report per run]}.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
from tiny import config, dataset, held_out_kl
from transformers import AutoModelForCausalLM, AutoTokenizer

from protege import DistillationTrainer


def record_synced_weights(trainer: DistillationTrainer) -> dict:
    """A copy of the student each time the engine receives its weights (to score vLLM's samples against)."""
    record, engine = {}, trainer.vllm
    push = engine._sync_weights

    def recording_push(model, step):
        pushed_before = engine.synced_step
        push(model, step)
        if engine.synced_step != pushed_before:
            record["weights"] = copy.deepcopy(trainer.accelerator.unwrap_model(model)).eval()
            record["pushes"] = record.get("pushes", 0) + 1

    engine._sync_weights = recording_push
    return record


def sample_logprobs(engine, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[float]]]:
    """vLLM's samples for the prompts and its log-prob of each sampled token, without pushing weights."""
    params = [p.clone() for p in engine._sampling(len(prompts), step=10_000)]
    for p in params:
        p.logprobs = 0
    outputs = engine.llm.generate([{"prompt_token_ids": q} for q in prompts], params, use_tqdm=False)
    samples = [list(o.outputs[0].token_ids) for o in outputs]
    logprobs = [[lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, s)] for o, s in zip(outputs, samples)]
    return samples, logprobs


@torch.no_grad()
def student_logprobs(model, prompts, samples) -> list[list[float]]:
    out = []
    for prompt, sample in zip(prompts, samples):
        ids = torch.tensor([prompt + sample])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float(), -1)
        out.append(logp.gather(-1, torch.tensor(sample)[:, None]).squeeze(-1).tolist())
    return out


def max_gap(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


class RecordingPolicyGradient:
    """The trainer's `PolicyGradient`, keeping each slice's figures (the logs round rho to 6 decimals)."""

    def __init__(self, inner):
        self.inner, self.figures = inner, []

    def loss_sum(self, *args, **kwargs):
        loss, figures = self.inner.loss_sum(*args, **kwargs)
        self.figures.append(figures)
        return loss, figures

    def __getattr__(self, name):
        return getattr(self.inner, name)


def policy_gradient_report(trainer: DistillationTrainer, recording: RecordingPolicyGradient | None) -> dict:
    if recording is None:
        return {}
    tokens = sum(f.tokens for f in recording.figures)
    keys = sorted({key for entry in trainer.state.log_history for key in entry if key.startswith("pg/")})
    return {
        "pg": {key: [e[key] for e in trainer.state.log_history if key in e] for key in keys},
        "rho_mean": sum(f.rho_sum for f in recording.figures) / tokens,
        "rho_max": max(f.rho_max for f in recording.figures),
        "pg_tokens": tokens,
    }


def main(student: str, teacher: str, out: str, overrides: str, resume_from: str | None = None) -> None:
    settings = json.loads(overrides)
    if isinstance(settings, list):
        runs = [run(student, teacher, Path(out, f"run-{i}"), one, resume_from) for i, one in enumerate(settings)]
        Path(out, "report.json").write_text(json.dumps({"runs": runs}))
    else:
        Path(out, "report.json").write_text(json.dumps(run(student, teacher, Path(out), settings, resume_from)))


def run(student: str, teacher: str, out: Path, settings: dict, resume_from: str | None) -> dict:
    args = config(out, use_vllm=True, **settings)
    tokenizer = AutoTokenizer.from_pretrained(student)
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher)
    start = AutoModelForCausalLM.from_pretrained(resume_from or student).eval()
    before = held_out_kl(start, teacher_model, tokenizer)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset(64))
    synced = record_synced_weights(trainer)
    recording = None
    if trainer.policy_gradient is not None:
        recording = trainer.policy_gradient = RecordingPolicyGradient(trainer.policy_gradient)
    trainer.train(resume_from_checkpoint=resume_from)
    messages = [[{"role": "user", "content": text}] for text in ("3+4=", "12+7=", "5+5=")]
    prompts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    samples, vllm_logprobs = sample_logprobs(trainer.vllm, prompts)
    report = {
        "generate_calls": trainer.vllm.generate_calls,
        "steps": trainer.state.global_step,
        "synced_step": trainer.vllm.synced_step,
        "loss": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "kl_before": before,
        "kl_after": held_out_kl(trainer.model, teacher_model, tokenizer),
        "sample_tokens": sum(len(s) for s in samples),
        "pushes": synced["pushes"],
        "gap_to_synced_weights": max_gap(vllm_logprobs, student_logprobs(synced["weights"], prompts, samples)),
        "gap_to_start_weights": max_gap(vllm_logprobs, student_logprobs(start, prompts, samples)),
    }
    return report | policy_gradient_report(trainer, recording)


if __name__ == "__main__":
    main(*sys.argv[1:])
