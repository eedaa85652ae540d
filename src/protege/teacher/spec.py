"""A teacher described in one value: where it lives and what it returns to the loss.

`TeacherSpec.from_config` is the one place that decides which view of a teacher a run uses; `factory.make_teacher`
turns a spec into a working teacher. A run with several teachers is a list of specs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..choices import HIDDEN_FORMAT

# What a teacher returns: full logits; its last hidden state and LM head (the loss applies the head, a chunk of tokens
# at a time); or a server's scores (top-k and sampled-token log-probs).
RETURNS = ("logits", "hidden", "scores")


def teacher_returns(args) -> str:
    """What the teacher of a `DistillationConfig` returns, before any model is seen.

    A server returns what its response format carries. A local teacher returns its last hidden state wherever the loss
    applies LM heads itself (the chunked and fused paths); `factory.make_teacher` may still settle on logits for a
    model that transforms them after its head (see `models.head_view`).
    """
    if args.use_teacher_server:
        return "hidden" if args.teacher_server_response_format == HIDDEN_FORMAT else "scores"
    return "hidden" if args.loss_chunk_size is not None or args.use_liger_kernel else "logits"


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher: a model (a built module, or a hub id or local path) or a server URL, and what it returns."""

    model: Any = None
    server_url: str | None = None
    returns: str = "logits"
    name: str = "teacher"  # how messages and logs name it

    def __post_init__(self) -> None:
        if (self.model is None) == (self.server_url is None):
            raise ValueError(f"{self.name}: give a model or a server URL, exactly one of the two")
        if self.returns not in RETURNS:
            raise ValueError(f"{self.name}: returns={self.returns!r} is not one of {RETURNS}")
        if self.returns == "scores" and self.server_url is None:
            raise ValueError(f"{self.name}: scores come from a teacher server; a local model returns logits or hidden")

    @classmethod
    def from_config(cls, args, teacher_model=None) -> TeacherSpec:
        """The teacher a `DistillationConfig` describes: `teacher_model` (a module or a name), else
        `teacher_model_name_or_path`, or the server at `teacher_model_server_url`."""
        if args.use_teacher_server:
            if teacher_model is not None:
                raise ValueError(
                    "use_teacher_server=True scores with the server at teacher_model_server_url; do not "
                    "also pass teacher_model"
                )
            return cls(server_url=args.teacher_model_server_url, returns=teacher_returns(args))
        model = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        if model is None:
            raise ValueError("no teacher: pass teacher_model or set teacher_model_name_or_path")
        return cls(model=model, returns=teacher_returns(args))
