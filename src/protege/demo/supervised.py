"""Supervised training by cross-entropy on completions: the teacher's training, the student's warm-up, and the
benchmark's SFT and sequence-level KD baselines."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..losses import IGNORE_INDEX
from .encoder import Encoder, next_token_logits
from .settings import SFTSpec


def adamw(model, spec: SFTSpec) -> torch.optim.AdamW:
    """The one optimizer the demo uses, so a distillation run can load the warm-up's state into it."""
    return torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, betas=(0.9, spec.adam_beta2), weight_decay=0.0)


def supervised_training(
    model,
    encoder: Encoder,
    problems: Sequence[Any],
    spec: SFTSpec,
    on_step: Callable[[float], None],
    stop: Callable[[], bool] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    make_batch: Callable[[Sequence[Any]], dict[str, torch.Tensor]] | None = None,
) -> tuple[list[float], torch.optim.Optimizer]:
    """Cross-entropy on the completion tokens only. Returns the losses and the optimizer.

    The completions are the reference completions unless `make_batch` builds the batch of a list of problems otherwise
    (sequence-level KD: the teacher's samples). `optimizer` continues an earlier run's (a fresh AdamW when None).
    `stop`, called every `spec.check_every` steps when `spec.stop_at_accuracy` is set, ends training when it says so.
    """
    optimizer = optimizer or adamw(model, spec)
    make_batch = make_batch or encoder.batch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, spec.lr_factor)
    model.train()
    losses = []
    for step in range(spec.steps):
        batch = make_batch(problems[step * spec.batch_size : (step + 1) * spec.batch_size])
        logits = next_token_logits(model, batch)
        loss = F.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        on_step(losses[-1])
        if spec.stop_at_accuracy is not None and stop is not None and (step + 1) % spec.check_every == 0 and stop():
            break
    model.eval()
    return losses, optimizer
