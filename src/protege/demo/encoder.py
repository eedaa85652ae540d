"""Problems to model inputs, through protege's own row tokenizer and collator, so that the demo's supervised training,
generation and KL measurements see the same batches as `DistillationTrainer`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..data import DistillationCollator, Tokenizer
from .tasks import Task, get_task


class Encoder:
    """Token ids and padded batches of one task's problems, for one tokenizer (the addition task when `task` is
    None)."""

    def __init__(self, tokenizer, task: Task | None = None):
        self.tokenizer = tokenizer
        self.task = task or get_task("addition")
        self.rows = Tokenizer(tokenizer, None, None)
        self.collate = DistillationCollator(tokenizer.pad_token_id)

    def prompt_ids(self, problem: Any) -> list[int]:
        return self.rows({"messages": self.task.prompt_messages(problem)}, 0, False)["prompt_ids"]

    def completion_length(self, problem: Any) -> int:
        """Tokens in the problem's reference completion: a task's completions all have the same layout, so this
        sizes generation."""
        return len(self.rows({"messages": self.task.conversation(problem)}, 0, True)["completion_ids"])

    def batch(self, problems: Sequence[Any]) -> dict[str, torch.Tensor]:
        """The problems with their reference completions (a training row's own valid answer)."""
        rows = [self.rows({"messages": self.task.conversation(p)}, i, True) for i, p in enumerate(problems)]
        return self.collate(rows)

    def completions_batch(self, problems: Sequence[Any], completions: Sequence[list[int]]) -> dict[str, torch.Tensor]:
        """The problems with given completion ids (a model's own chains) in place of the reference ones."""
        rows = [{"prompt_ids": self.prompt_ids(p), "completion_ids": c} for p, c in zip(problems, completions)]
        return self.collate(rows)

    def prompts_batch(self, problems: Sequence[Any]) -> dict[str, torch.Tensor]:
        """The prompts alone; `prompt_ids` and `prompt_mask` are left-padded, ready for `generate`."""
        return self.collate([{"prompt_ids": self.prompt_ids(p), "completion_ids": []} for p in problems])


def next_token_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits predicting each next token: position t scores token t+1, so they line up with `labels[:, 1:]`."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    return model(**inputs).logits[:, :-1].float()
