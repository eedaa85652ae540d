"""Distillation against RL on the walks task (issue 28, `python -m benchmarks opd_vs_rl`): the validity reward, the
methods compared, and one method's run from a seed's warmed-up student.

The reward (`walk_validity_reward`) is the walks verifier as a reward function with TRL GRPOTrainer's signature: 1.0
for a sampled walk the verifier accepts, 0.0 otherwise, scored on the completion's tokens cut at the first end of
turn and decoded without special tokens, as `scoring.generate` decodes the held-out completions. Binary, not the
fraction of valid steps: it is the metric measured and the outcome reward of RL with a verifier
(docs/benchmarks.md, "Distillation against RL (issue 28)", has the protocol).

The methods (`METHODS`) are `DistillationConfig` fields on top of the demo's (`distill._config`): on-policy GKD
(reverse KL over the full vocabulary), policy-gradient OPD with the teacher's sampled-token log-prob as the only
advantage, the same plus the validity reward, RL on the reward alone (no teacher, a group of 4 samples per prompt), and
SFT on the references (trained by the caller: `kind` "sft").
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .walks import Walks

REWARD_NAME = "walk_validity"
# The trainer's logged figures that a run's record averages over its steps (those present).
LOGGED = (
    f"reward/{REWARD_NAME}/mean",
    f"reward/{REWARD_NAME}/std",
    "reward/mean",
    "pg/teacher_advantage_mean",
    "pg/rho_mean",
    "pg/rho_max",
    "pg/rho_truncated_fraction",
    "on_policy_reverse_kl_estimate",
)


@dataclass(frozen=True)
class Method:
    """One method of the comparison: its label, how it is trained, and what its teacher sends a token."""

    label: str
    kind: str  # "trainer" (DistillationTrainer with `fields`) or "sft" (cross-entropy on the references)
    fields: dict[str, Any] = field(default_factory=dict)  # DistillationConfig fields over the demo's
    reward: bool = False  # the validity reward in `reward_funcs`
    teacher: bool = True  # whether the run loads the teacher
    teacher_bytes: str = "0"  # per sampled token, for the loss (docs/benchmarks.md: how they are counted)

    @property
    def generations(self) -> int:
        return int(self.fields.get("num_generations", 1))

    @property
    def distillation(self) -> bool:
        """A method that learns from the teacher (criterion 2 is about these)."""
        return self.kind == "trainer" and self.teacher


PG = {"on_policy_objective": "policy_gradient", "kl_discount_factor": 0.0, "importance_sampling_cap": 2.0}
METHODS = {
    "gkd": Method(
        "On-policy GKD, reverse KL (beta 1)",
        "trainer",
        {"lmbda": 1.0, "beta": 1.0, "on_policy_objective": "divergence"},
        teacher_bytes="1,108 (V x 4) or 128 (hidden, 2H)",
    ),
    "pg_opd": Method(
        "Policy-gradient OPD (teacher log-prob)", "trainer", {"lmbda": 1.0, **PG, "kl_coef": 1.0}, teacher_bytes="4"
    ),
    "pg_opd_reward": Method(
        "PG OPD + validity reward",
        "trainer",
        {"lmbda": 1.0, **PG, "kl_coef": 1.0, "scale_rewards": False},
        reward=True,
        teacher_bytes="4",
    ),
    "rl": Method(
        "RL only (validity reward, group of 4)",
        "trainer",
        {"lmbda": 1.0, **PG, "kl_coef": 0.0, "scale_rewards": False, "num_generations": 4},
        reward=True,
        teacher=False,
    ),
    "sft": Method("SFT on the references", "sft", teacher=False),
}


def prompt_text(prompt: Any) -> str:
    """A prompt as the trainer passes it to a reward (a string, or chat messages): its walk, the last user turn."""
    if isinstance(prompt, str):
        return prompt
    turns = [turn.get("content", "") for turn in prompt if turn.get("role") == "user"]
    if not turns:
        raise ValueError(f"no user turn in prompt {prompt!r}")
    return turns[-1]


def completion_text(completion: Any) -> str:
    """A completion as the trainer passes it (a string, or [{"role": "assistant", "content": ...}])."""
    if isinstance(completion, str):
        return completion
    return "".join(turn.get("content", "") for turn in completion)


def walk_validity_reward(tokenizer=None):
    """The reward function: 1.0 for each valid walk, 0.0 otherwise. With `tokenizer`, the completion's ids are decoded
    here (cut at the first end of turn, without special tokens, as the held-out scores are); without it, the decoded
    completions are scored, cut at the end-of-turn marker if they hold one."""
    task = Walks()
    eos = None if tokenizer is None else tokenizer.eos_token_id

    def walk_validity(prompts, completions, completion_ids=None, **columns) -> list[float]:
        if tokenizer is not None and completion_ids is not None:
            cut = [list(ids)[: list(ids).index(eos) + 1] if eos in ids else list(ids) for ids in completion_ids]
            texts = tokenizer.batch_decode(cut, skip_special_tokens=True)
        else:
            texts = [completion_text(c).split("<|im_end|>")[0] for c in completions]
        return [task.score(text, task.parse_problem(prompt_text(p))) for p, text in zip(prompts, texts)]

    return walk_validity


def summarise_logs(logs: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The mean of each `LOGGED` figure over the logged steps that carry it (pg/rho_max: the largest)."""
    found: dict[str, float] = {}
    for key in LOGGED:
        values = [float(entry[key]) for entry in logs if key in entry]
        if values:
            found[key] = max(values) if key == "pg/rho_max" else statistics.fmean(values)
    return found


def trainer_rows(method: Method, task: Walks, problems: Sequence[Any], steps: int, batch_size: int) -> list[dict]:
    """The prompts a trainer method trains on: `steps` x (batch / generations) rows from the start of `problems`,
    prompts only (lmbda 1: the student writes every completion)."""
    count = steps * (batch_size // method.generations)
    if len(problems) < count:
        raise ValueError(f"{method.label}: {count} prompts needed, {len(problems)} given")
    return [{"messages": task.prompt_messages(p)} for p in problems[:count]]


def run_trainer_method(
    name: str,
    prepared: Any,
    settings: Any,
    seed: int,
    problems: Sequence[Any],
    start: dict[str, float],
    output: Path,
    progress: Any,
) -> dict[str, Any]:
    """Train `METHODS[name]` (a trainer method) from a copy of the seed's warmed-up student with a fresh AdamW, scoring
    it on the held-out problems every `settings.eval_every` steps. Returns the curve, the budget used, the mean
    logged figures and the timings."""
    import copy

    import torch

    from .distill import Tracker, _config, run_trainer
    from .scoring import scores

    method = METHODS[name]
    encoder = prepared.encoder
    fields: dict[str, Any] = {**method.fields, "logging_steps": 1}
    if method.reward:
        fields |= {"reward_funcs": [walk_validity_reward(encoder.tokenizer)], "reward_weights": [1.0]}
    args = _config(encoder.completion_length(problems[0]), settings, seed, output / name, **fields)
    rows = trainer_rows(method, encoder.task, problems, settings.distill_steps, settings.distill_batch_size)

    def measure(model) -> dict[str, float]:
        return scores(model, encoder, prepared.eval_problems, settings.sample_eval, seed)

    tracker = logging_tracker(Tracker)(progress, settings, start, measure, description=name)
    torch.manual_seed(seed)
    teacher = prepared.teacher if method.teacher else None
    student = copy.deepcopy(prepared.student)
    distilled = run_trainer(teacher, student, None, encoder.tokenizer, settings, args, rows, tracker)
    return {
        "curve": distilled.curve,
        "completion_tokens": distilled.completion_tokens,
        "eval_seconds": distilled.eval_seconds,
        "step_seconds": distilled.step_seconds,
        "logged": summarise_logs(tracker.logs),
        "prompts": len(rows),
    }


def logging_tracker(tracker_class: type) -> type:
    """The demo's `Tracker` (passed in, so that importing this module stays light), also keeping every log the trainer
    writes: its reward and policy-gradient figures."""

    class LoggingTracker(tracker_class):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.logs: list[dict[str, Any]] = []

        def callback(self):
            inner = super().callback()
            tracker = self

            class Logs(type(inner)):
                def on_log(self, args, state, control, logs=None, **kwargs):
                    if logs:
                        tracker.logs.append(dict(logs))
                    return super().on_log(args, state, control, logs=logs, **kwargs)

            return Logs()

    return LoggingTracker
