"""How good a model is on the task: greedy exact-match accuracy on held-out problems (the demo's, and `protege eval
--task demo`'s), and a student's per-token KL divergences from its teacher."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..evaluation import summed_token_kl
from . import task
from .encoder import Encoder


@dataclass
class Generations:
    """A model's completions of a list of problems, as token ids (for KL on its own chains) and as text (to score)."""

    problems: list[task.Problem]
    completion_ids: list[list[int]]
    texts: list[str]

    @property
    def accuracy(self) -> float:
        return sum(task.score(t, p) for t, p in zip(self.texts, self.problems)) / len(self.problems)

    def first_wrong_lines(self) -> dict[str, int]:
        """How many wrong answers first left the reference chain at each line (numbered from 1, the ones column)."""
        counts: dict[str, int] = {}
        for text, problem in zip(self.texts, self.problems):
            if not task.score(text, problem):
                line = str(task.first_wrong_line(text, problem))
                counts[line] = counts.get(line, 0) + 1
        return dict(sorted(counts.items()))


@torch.no_grad()
def generate(
    model, encoder: Encoder, problems: Sequence[task.Problem], batch_size: int = 256, sample: bool = False
) -> Generations:
    """Greedy completions (to EOS) for every problem; with `sample`, samples at temperature 1 instead."""
    tokenizer, eos = encoder.tokenizer, encoder.tokenizer.eos_token_id
    max_new = encoder.completion_length(problems[0]) + 8
    was_training = model.training
    model.eval()
    completions = []
    for start in range(0, len(problems), batch_size):
        prompts = encoder.prompts_batch(problems[start : start + batch_size])
        out = model.generate(
            input_ids=prompts["prompt_ids"],
            attention_mask=prompts["prompt_mask"],
            max_new_tokens=max_new,
            do_sample=sample,
            top_k=0,
            top_p=1.0,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row in out[:, prompts["prompt_ids"].shape[1] :].tolist():
            completions.append(row[: row.index(eos) + 1] if eos in row else row)
    model.train(was_training)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return Generations(list(problems), completions, texts)


def _problem_of_row(row: dict[str, Any], index: int) -> task.Problem:
    """The problem a dataset row asks: its `prompt` string, or the first user turn of `prompt` / `messages`."""
    prompt = row.get("prompt", row.get("messages"))
    if isinstance(prompt, list):
        prompt = next((turn.get("content") for turn in prompt if turn.get("role") == "user"), None)
    try:
        return task.parse_problem(prompt if isinstance(prompt, str) else "")
    except ValueError:
        raise ValueError(f"row {index}: not a demo-task prompt (want 'A+B' as the user turn): {prompt!r}") from None


def accuracy_on_rows(model, tokenizer, rows: Iterable[dict[str, Any]]) -> float:
    """Greedy exact-match accuracy on dataset rows holding demo-task prompts (what `protege eval --task demo` shows),
    scored as the demo scores, so the two agree on the demo's own held-out file."""
    problems = [_problem_of_row(row, index) for index, row in enumerate(rows)]
    if not problems:
        raise ValueError("no rows to score")
    return generate(model, Encoder(tokenizer), problems).accuracy


def token_kls(teacher, student, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean per-token KL(teacher || student) and KL(student || teacher) over the completion tokens of one batch: the
    divergence `protege eval` measures, averaged within the batch."""
    sums = summed_token_kl(student, teacher, batch)
    tokens = max(int(sums["completion_tokens"]), 1)
    return {
        "teacher_student": (sums["kl_teacher_student"] / tokens).item(),
        "student_teacher": (sums["kl_student_teacher"] / tokens).item(),
    }


@dataclass
class Snapshot:
    """A student's held-out accuracy and its divergences from the teacher, at one point in time."""

    accuracy: float
    kl_reference: dict[str, float]  # on the held-out reference chains
    kl_own: dict[str, float]  # on the student's own greedy chains
    generations: Generations


def snapshot(
    teacher, student, encoder: Encoder, eval_problems: Sequence[task.Problem], kl_problems: Sequence[task.Problem]
) -> Snapshot:
    """The student's accuracy on `eval_problems`, and its KLs on the first `len(kl_problems)` of them, both on the
    reference chains and on its own: whether distillation moved it towards the teacher where it actually writes."""
    generations = generate(student, encoder, eval_problems)
    count = len(kl_problems)
    own = encoder.completions_batch(generations.problems[:count], generations.completion_ids[:count])
    return Snapshot(
        accuracy=generations.accuracy,
        kl_reference=token_kls(teacher, student, encoder.batch(kl_problems)),
        kl_own=token_kls(teacher, student, own),
        generations=generations,
    )
