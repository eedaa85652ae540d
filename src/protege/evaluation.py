"""How far a student is from its teacher: mean per-token KL both ways on a dataset's completions."""

from __future__ import annotations

import dataclasses

import torch

from . import models
from .data import DistillationCollator, Tokenizer, tokenize_dataset
from .losses import IGNORE_INDEX
from .objective import Objective, student_output
from .teacher.local import LocalTeacher, shared_vocab_size


@torch.no_grad()
def mean_token_kl(
    student,
    teacher,
    tokenizer,
    dataset,
    max_length: int = 1024,
    max_prompt_length: int | None = None,
    batch_size: int = 8,
    teacher_tokenizer=None,
) -> dict[str, float]:
    """KL(teacher || student) and KL(student || teacher) per completion token, at temperature 1. `teacher_tokenizer`:
    checked against the student's as the trainer checks it (the same, or extending it), so that a teacher with other
    token ids is refused instead of scored on the wrong rows."""
    vocab = shared_vocab_size(student, teacher, tokenizer, teacher_tokenizer)
    rows = tokenize_dataset(dataset, Tokenizer(tokenizer, max_prompt_length, max_length), needs_completion=True)
    collate = DistillationCollator(tokenizer.pad_token_id)
    totals = {"kl_teacher_student": 0.0, "kl_student_teacher": 0.0, "completion_tokens": 0}
    for start in range(0, len(rows), batch_size):
        batch = collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        for key, value in summed_token_kl(student, teacher, batch, vocab).items():
            totals[key] += value.item()
    tokens = max(totals["completion_tokens"], 1)
    return {
        "kl_teacher_student": totals["kl_teacher_student"] / tokens,
        "kl_student_teacher": totals["kl_student_teacher"] / tokens,
        "completion_tokens": totals["completion_tokens"],
    }


@torch.no_grad()
def summed_token_kl(
    student, teacher, batch: dict[str, torch.Tensor], vocab: int | None = None
) -> dict[str, torch.Tensor]:
    """KL(teacher || student) and KL(student || teacher) summed over the completion tokens of one collated batch, and
    the number of those tokens. Sums, as 0-dim tensors, so that callers can average over any batching: over many
    batches (`mean_token_kl`) or within one (the demo, whose numbers are the loss's own float32 mean).

    Computed like the trainer's loss, from last hidden states and LM heads a chunk of tokens at a time, so memory does
    not grow with tokens x vocabulary (full logits for models that transform them after the LM head)."""
    device = next(student.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    vocab = vocab if vocab is not None else min(models.output_rows(student), models.output_rows(teacher))
    objective = Objective(beta=0.0, chunk_size="auto").for_student(student)
    labels = batch["labels"][:, int(batch["prompt_width"]) :]
    student_side = student_output(student, batch, objective.student_view, vocab)
    teacher_side = LocalTeacher(teacher, vocab, models.head_view(teacher, "teacher", objective.chunk_size))(batch)
    return {
        f"kl_{name}": dataclasses.replace(objective, beta=beta).loss_sum(student_side, teacher_side, labels)
        for name, beta in (("teacher_student", 0.0), ("student_teacher", 1.0))
    } | {"completion_tokens": labels.ne(IGNORE_INDEX).sum()}
