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
    device = next(student.parameters()).device
    totals = {"forward": 0.0, "reverse": 0.0, "tokens": 0}
    for start in range(0, len(rows), batch_size):
        batch = collate([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "position_ids")}
        labels = batch["labels"][:, 1:].to(device)
        student_logits = student(**inputs).logits[:, :-1, :vocab]
        teacher_logits = teacher(**inputs).logits[:, :-1, :vocab]
        totals["forward"] += generalized_jsd_loss(student_logits, teacher_logits, labels, 0.0, reduction="sum").item()
        totals["reverse"] += generalized_jsd_loss(student_logits, teacher_logits, labels, 1.0, reduction="sum").item()
        totals["tokens"] += int(labels.ne(IGNORE_INDEX).sum())
    tokens = max(totals["tokens"], 1)
    return {
        "kl_teacher_student": totals["forward"] / tokens,
        "kl_student_teacher": totals["reverse"] / tokens,
        "completion_tokens": totals["tokens"],
    }
