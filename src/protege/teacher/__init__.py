"""Teachers, as the loss sees them: one spec to describe one, one factory to make it, one small interface.

* `spec.TeacherSpec`: where a teacher lives (a model, or a server URL) and what it returns ("logits", "hidden": its
  last hidden state and LM head, or "scores": a server's top-k log-probs); `spec.teacher_specs` decides which;
* `factory.make_teacher`: a finished `Teacher` from a spec: loaded or connected, checked against the student's
  tokenizer, with its LM head where needed; the trainer then places it (`Teacher.place`) once the engine is known;
* `local.LocalTeacher`: a model beside the student; `remote.RemoteTeacher` and `remote.RemoteHiddenTeacher`: a
  teacher server, through `client.TeacherClient`, whose payloads `codec` encodes and decodes.

A teacher is called once per optimizer step with `prepare(batches)` (a server scores the whole step at once) and then
per slice, `teacher(batch)`, returning one of the outputs of `protege.outputs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class Placement:
    """Where the student trains, so that a teacher is placed like it: the accelerator and its sharding engine."""

    accelerator: Any
    deepspeed: bool = False
    fsdp: bool = False

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


class Teacher(Protocol):
    name: str
    returns: str  # "logits", "hidden" or "scores": what `__call__` gives (see `protege.outputs`)
    vocab_size: int  # the width compared with the student (`teacher.vocabulary`)
    max_model_len: int | None  # a length the teacher refuses to score past (a server's), None where there is none
    model: torch.nn.Module | None  # the local model (TRL's `trainer.teacher_model`), None for a server

    def place(self, placement: Placement) -> None: ...

    def prepare(self, batches: list[dict[str, torch.Tensor]]) -> None: ...

    def __call__(self, batch: dict[str, torch.Tensor]): ...

    def close(self) -> None: ...


def prompt_tokenizers(teachers: list[Teacher]) -> tuple | None:
    """Each teacher's own tokenizer for the prompts, by position, where any teacher reads its own tokens (a teacher of
    another tokenizer has `prompt_tokenizer`); None where every teacher reads the student's."""
    tokenizers = tuple(getattr(teacher, "prompt_tokenizer", None) for teacher in teachers)
    return tokenizers if any(tokenizer is not None for tokenizer in tokenizers) else None
