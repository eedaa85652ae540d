"""No teacher: reinforcement learning on task rewards alone (`on_policy_objective="policy_gradient"`, `kl_coef=0`,
`lmbda=1`), where nothing is asked of a teacher, so none is loaded. It answers every slice with None, which the
policy-gradient loss reads as a zero teacher term."""

from __future__ import annotations

import torch

from ..models import output_rows
from . import Placement


class NoTeacher:
    name = "none"
    returns = "none"
    max_model_len = None
    model = None

    def __init__(self, student: torch.nn.Module) -> None:
        self.vocab_size = output_rows(student)  # the student's whole output layer: nothing narrows it

    def place(self, placement: Placement) -> None:
        pass

    def prepare(self, batches: list[dict[str, torch.Tensor]]) -> None:
        pass

    def __call__(self, batch: dict[str, torch.Tensor]) -> None:
        return None

    def close(self) -> None:
        pass
