"""How good a model is on a demo task: the share of held-out problems its verifier accepts, greedy (the demo's, and
`protege eval --task NAME`'s) and sampled at temperature 1, and a student's per-token KL divergences from its
teacher."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..evaluation import summed_token_kl
from .encoder import Encoder
from .tasks import Task, get_task


@dataclass
class Generations:
    """A model's completions of a list of problems, as token ids (for KL on its own chains) and as text (to score)."""

    problems: list[Any]
    completion_ids: list[list[int]]
    texts: list[str]
    task: Task

    @property
    def accuracy(self) -> float:
        """The share of completions the task's verifier accepts."""
        return sum(self.task.score(t, p) for t, p in zip(self.texts, self.problems)) / len(self.problems)

    def first_wrong_lines(self) -> dict[str, int]:
        """How many wrong answers first went wrong at each line (numbered from 1: `task.line_one`)."""
        counts: dict[str, int] = {}
        for text, problem in zip(self.texts, self.problems):
            if not self.task.score(text, problem):
                line = str(self.task.first_wrong_line(text, problem))
                counts[line] = counts.get(line, 0) + 1
        return dict(sorted(counts.items()))


@torch.no_grad()
def generate(
    model,
    encoder: Encoder,
    problems: Sequence[Any],
    batch_size: int = 256,
    sample: bool = False,
    seed: int | None = None,
) -> Generations:
    """Greedy completions (to EOS) for every problem; with `sample`, samples at temperature 1 instead, drawn from
    torch's global generator, or with `seed` from one seeded for this call alone (so a model's sampled score does not
    depend on what ran before, and leaves the global generator as it was)."""
    tokenizer = encoder.tokenizer
    max_new = encoder.completion_length(problems[0]) + 8
    was_training = model.training
    model.eval()
    completions = []
    seeded = sample and seed is not None
    with torch.random.fork_rng(devices=[]) if seeded else contextlib.nullcontext():
        if seeded:
            torch.manual_seed(seed)
        for start in range(0, len(problems), batch_size):
            completions.extend(_complete(model, encoder, problems[start : start + batch_size], max_new, sample))
    model.train(was_training)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return Generations(list(problems), completions, texts, encoder.task)


def _complete(model, encoder: Encoder, problems: Sequence[Any], max_new: int, sample: bool) -> list[list[int]]:
    """One batch's completion ids, each cut after its first EOS."""
    tokenizer, eos = encoder.tokenizer, encoder.tokenizer.eos_token_id
    prompts = encoder.prompts_batch(problems)
    out = model.generate(
        input_ids=prompts["prompt_ids"],
        attention_mask=prompts["prompt_mask"],
        max_new_tokens=max_new,
        do_sample=sample,
        # The full distribution when sampling; greedy takes no such flags (transformers warns that they are ignored).
        **({"top_k": 0, "top_p": 1.0} if sample else {}),
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    rows = out[:, prompts["prompt_ids"].shape[1] :].tolist()
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


def scores(model, encoder: Encoder, problems: Sequence[Any], sampled: bool, seed: int) -> dict[str, float]:
    """`accuracy`: the share of greedy completions the verifier accepts; with `sampled`, also `sampled`: the share of
    one sample per problem at temperature 1 (seeded by `seed`), which exposes a student that spreads its mass over
    wrong continuations while its most likely one is right. One point of a curve."""
    point = {"accuracy": generate(model, encoder, problems).accuracy}
    if sampled:
        point["sampled"] = generate(model, encoder, problems, sample=True, seed=seed).accuracy
    return point


def _problem_of_row(row: dict[str, Any], index: int, task: Task) -> Any:
    """The problem a dataset row asks: its `prompt` string, or the first user turn of `prompt` / `messages`."""
    prompt = row.get("prompt", row.get("messages"))
    if isinstance(prompt, list):
        prompt = next((turn.get("content") for turn in prompt if turn.get("role") == "user"), None)
    try:
        return task.parse_problem(prompt if isinstance(prompt, str) else "")
    except ValueError:
        raise ValueError(
            f"row {index}: not a demo-task prompt (want {task.prompt_format} as the user turn): {prompt!r}"
        ) from None


def accuracy_on_rows(model, tokenizer, rows: Iterable[dict[str, Any]], task: str = "addition") -> float:
    """Greedy accuracy on dataset rows holding prompts of the demo task `task` (what `protege eval --task NAME`
    shows), scored as the demo scores, so the two agree on the demo's own held-out file."""
    demo_task = get_task(task)
    problems = [_problem_of_row(row, index, demo_task) for index, row in enumerate(rows)]
    if not problems:
        raise ValueError("no rows to score")
    return generate(model, Encoder(tokenizer, demo_task), problems).accuracy


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

    accuracy: float  # greedy
    sampled_accuracy: float | None  # one sample per problem at temperature 1, when the settings ask for it
    kl_reference: dict[str, float]  # on the held-out reference completions
    kl_own: dict[str, float]  # on the student's own greedy completions
    generations: Generations  # the greedy ones


def snapshot(
    teacher,
    student,
    encoder: Encoder,
    eval_problems: Sequence[Any],
    kl_problems: Sequence[Any],
    sampled: bool = False,
    seed: int = 0,
) -> Snapshot:
    """The student's accuracy on `eval_problems` (greedy, and with `sampled` at temperature 1 too), and its KLs on the
    first `len(kl_problems)` of them, both on the reference completions and on its own: whether distillation moved it
    towards the teacher where it actually writes."""
    generations = generate(student, encoder, eval_problems)
    sampled_accuracy = generate(student, encoder, eval_problems, sample=True, seed=seed).accuracy if sampled else None
    count = len(kl_problems)
    own = encoder.completions_batch(generations.problems[:count], generations.completion_ids[:count])
    return Snapshot(
        accuracy=generations.accuracy,
        sampled_accuracy=sampled_accuracy,
        kl_reference=token_kls(teacher, student, encoder.batch(kl_problems)),
        kl_own=token_kls(teacher, student, own),
        generations=generations,
    )
