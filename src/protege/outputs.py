"""What a student and a teacher hand to the loss, aligned with a batch's completion columns.

A model gives either its logits, or its last hidden state and LM head (the memory-bounded path applies the head a chunk
of tokens at a time); a teacher server may instead give scores (top-k log-probs). The objective picks its row function
from which of these it receives, and nothing else, so a new kind of teacher only has to return one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StudentLogits:
    logits: torch.Tensor  # (B, C, V)

    weight = bias = None  # rows are logits already: no head to apply

    @property
    def rows(self) -> torch.Tensor:
        return self.logits


@dataclass
class StudentHidden:
    hidden: torch.Tensor  # (B, C, H), the decoder's final (post-norm) output
    weight: torch.Tensor  # (V, H), the LM head sliced to the shared vocabulary
    bias: torch.Tensor | None

    @property
    def rows(self) -> torch.Tensor:
        return self.hidden


@dataclass
class TeacherLogits:
    logits: torch.Tensor  # (B, C, V)

    weight = bias = None

    @property
    def rows(self) -> torch.Tensor:
        return self.logits


@dataclass
class TeacherHidden:
    hidden: torch.Tensor  # (B, C, H)
    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None

    @property
    def rows(self) -> torch.Tensor:
        return self.hidden


@dataclass
class TeacherScores:
    """A server's answer: top-k ids and log-probs (B, C, K) padded with -inf, and the actual token's log-prob."""

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    token_logprobs: torch.Tensor  # (B, C)


StudentOutput = StudentLogits | StudentHidden
TeacherOutput = TeacherLogits | TeacherHidden | TeacherScores
