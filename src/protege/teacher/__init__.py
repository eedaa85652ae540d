"""Teachers, as the loss sees them: one small interface, three views.

* `local.LocalTeacher`: a model beside the student, giving logits or its last hidden state and LM head;
* `remote.RemoteTeacher`: a teacher server, through `client.TeacherClient`, whose payloads `codec` encodes and
  decodes.

A view is called once per optimizer step with `prepare(batches)` (a server scores the whole step at once) and then
per slice, `view(batch)`, returning one of the teacher outputs of `protege.objective`.
"""

from __future__ import annotations

from typing import Protocol

import torch


class TeacherView(Protocol):
    def prepare(self, batches: list[dict[str, torch.Tensor]]) -> None: ...

    def __call__(self, batch: dict[str, torch.Tensor]): ...

    def close(self) -> None: ...
