"""What a student and a teacher hand to the loss, aligned with a batch's completion columns.

A model gives either its logits, or its last hidden state and LM head (the memory-bounded path applies the head a chunk
of tokens at a time); a teacher server may instead give scores (top-k log-probs). The objective picks its row function
from which of these it receives, and nothing else, so a new kind of teacher only has to return one of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Logits:
    """Logits at completion positions: rows the loss reads as they are."""

    logits: torch.Tensor  # (B, C, V)

    weight = bias = None  # no head to apply

    @property
    def rows(self) -> torch.Tensor:
        return self.logits

    def select(self, rows: torch.Tensor | None):
        """These outputs for the batch rows `rows` only (all of them for None)."""
        return self if rows is None else type(self)(self.logits[rows])


@dataclass
class Hidden:
    """The decoder's final (post-norm) output at completion positions, and the LM head that turns it into logits."""

    hidden: torch.Tensor  # (B, C, H)
    weight: torch.Tensor  # (V, H), the LM head sliced to the shared vocabulary
    bias: torch.Tensor | None

    @property
    def rows(self) -> torch.Tensor:
        return self.hidden

    def select(self, rows: torch.Tensor | None):
        """These outputs for the batch rows `rows` only (all of them for None); the head is shared."""
        return self if rows is None else type(self)(self.hidden[rows], self.weight, self.bias)


class StudentLogits(Logits):
    """The student's logits (the dense path)."""


class StudentHidden(Hidden):
    """The student's last hidden state and LM head (the chunked and fused paths); gradients flow through both."""


class TeacherLogits(Logits):
    """A teacher's logits."""


class TeacherHidden(Hidden):
    """A teacher's last hidden state and LM head, local or sent by a server in the hidden format."""


@dataclass
class TeacherScores:
    """A server's answer: top-k ids and log-probs (B, C, K) padded with -inf, and the actual token's log-prob."""

    topk_ids: torch.Tensor
    topk_logprobs: torch.Tensor
    token_logprobs: torch.Tensor  # (B, C)


StudentOutput = StudentLogits | StudentHidden
TeacherOutput = TeacherLogits | TeacherHidden | TeacherScores
