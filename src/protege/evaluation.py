"""How far a student is from its teacher: mean per-token KL both ways on a dataset's completions."""

from __future__ import annotations

import torch

from .data import DistillationCollator, Tokenizer, tokenize_dataset
from .losses import IGNORE_INDEX, generalized_jsd_loss
from .teacher.local import shared_vocab_size


@torch.no_grad()
def mean_token_kl(
    student,
    teacher,
    tokenizer,
    dataset,
    max_length: int = 1024,
    max_prompt_length: int | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """KL(teacher || student) and KL(student || teacher) per completion token, at temperature 1."""
    vocab = shared_vocab_size(student, teacher, tokenizer)
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
    batches (`mean_token_kl`) or within one (the demo, whose numbers are the loss's own float32 mean)."""
    device = next(student.parameters()).device
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids")}
    labels = batch["labels"][:, 1:].to(device)
    student_logits = student(**inputs).logits[:, :-1, :vocab]
    teacher_logits = teacher(**inputs).logits[:, :-1, :vocab]
    return {
        "kl_teacher_student": generalized_jsd_loss(student_logits, teacher_logits, labels, beta=0.0, reduction="sum"),
        "kl_student_teacher": generalized_jsd_loss(student_logits, teacher_logits, labels, beta=1.0, reduction="sum"),
        "completion_tokens": labels.ne(IGNORE_INDEX).sum(),
    }
