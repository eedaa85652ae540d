"""What a student and a teacher hand to the loss, aligned with a batch's completion columns.

A model gives either its logits, or its last hidden state and LM head (the memory-bounded path applies the head a chunk
of tokens at a time); a teacher server may instead give scores (top-k log-probs). The objective picks its row function
from which of these it receives, and nothing else, so a new kind of teacher only has to return one of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


@dataclass
class TeacherForeign:
    """A teacher of another tokenizer: its output on its own tokenization of the student's completions, and how the
    two tokenizations align (`alignment`): each trained student token's group (B, C_s), each teacher completion
    token's group (B, C_t) and its id, groups numbered across the slice in order; -1 where a token is in no group."""

    output: TeacherLogits | TeacherHidden  # at the teacher's completion positions
    token_ids: torch.Tensor  # (B, C_t)
    teacher_groups: torch.Tensor  # (B, C_t)
    student_groups: torch.Tensor  # (B, C_s)
    num_groups: int
    match: Any  # crosstok.VocabularyMatch: the tokens the two vocabularies share

    @property
    def teacher_side(self):
        """The teacher's grouped tokens, flattened over the slice (`crosstok.AlignedSide`)."""
        from .crosstok import AlignedSide

        kept = self.teacher_groups >= 0
        out = self.output
        return AlignedSide(out.rows[kept], out.weight, out.bias, self.token_ids[kept], self.teacher_groups[kept])

    def student_side(self, student, labels: torch.Tensor):
        """The student's grouped tokens (its actual tokens are the labels), flattened over the slice."""
        from .crosstok import AlignedSide

        kept = self.student_groups >= 0
        return AlignedSide(student.rows[kept], student.weight, student.bias, labels[kept], self.student_groups[kept])


StudentOutput = StudentLogits | StudentHidden
TeacherOutput = TeacherLogits | TeacherHidden | TeacherScores | TeacherForeign
