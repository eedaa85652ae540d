"""A local teacher: loaded, frozen, checked against the student's vocabulary, placed like the student, and run.

`LocalTeacher` is a model beside the student: it returns full logits at completion positions for the dense loss, or
its last hidden state and LM head for the chunked and fused losses (never every layer's hidden states).
"""

from __future__ import annotations

import copy
import os

import torch
from torch import nn

from ..models import (
    completion_hidden,
    completion_logits,
    head_view,
    lm_head,
    load_causal_lm,
    load_tokenizer,
    output_rows,
    parse_init_kwargs,
)
from ..outputs import TeacherHidden, TeacherLogits
from . import Placement
from .spec import TeacherSpec
from .vocabulary import TOKENIZER_FILES, announce_extra_tokens, has_tokenizer_files, shared_rows, teacher_extra_tokens


def shared_vocab_size(student, teacher, tokenizer, teacher_tokenizer=None) -> int:
    """The logit width both models are compared on, or a ValueError that says what differs.

    Output layers padded past the tokenizer (Qwen2.5's 152064 rows against 151936 tokens) are fine: logits are
    sliced to the narrower layer. A teacher tokenizer that extends the student's is compared on the student's ids (see
    `vocabulary`); any other difference, or an output layer smaller than the tokenizer, is a real mismatch.
    """
    extra = (
        [] if teacher_tokenizer is None else teacher_extra_tokens(tokenizer.get_vocab(), teacher_tokenizer.get_vocab())
    )
    width = shared_rows(len(tokenizer), output_rows(student), output_rows(teacher), len(extra))
    announce_extra_tokens(extra, len(tokenizer))
    return width


def load_teacher(teacher_model: nn.Module | str, args) -> tuple[nn.Module, object | None]:
    """The frozen teacher (a built model, or a name to load with the config's teacher options) and its tokenizer, if
    any."""
    teacher_kwargs = parse_init_kwargs(args.teacher_model_init_kwargs, "teacher_model_init_kwargs")
    if isinstance(teacher_model, str):
        if args.teacher_model_revision is not None:
            teacher_kwargs.setdefault("revision", args.teacher_model_revision)
        name = teacher_model
        teacher_model = load_causal_lm(teacher_model, teacher_kwargs, args.trust_remote_code, role="teacher")
    else:
        if teacher_kwargs:
            raise ValueError(
                "teacher_model_init_kwargs were given but the teacher is already built; pass the "
                "teacher as a path to load it with them, or drop teacher_model_init_kwargs"
            )
        name = teacher_model.config._name_or_path
    teacher_tokenizer = published_tokenizer(name, args.trust_remote_code, args.teacher_model_revision)
    teacher_model.eval()
    teacher_model.requires_grad_(False)
    return teacher_model, teacher_tokenizer


def published_tokenizer(name: str | None, trust_remote_code: bool = False, revision: str | None = None):
    """The tokenizer published with the teacher `name`, or None where it has none: a built model without a name, a
    folder without tokenizer files, a hub repository without them (then only the sizes of the two vocabularies can be
    checked against each other). A tokenizer that is there but does not load is an error naming the teacher."""
    if not name or (os.path.isdir(name) and not has_tokenizer_files(name)):
        return None
    if not os.path.isdir(name) and not _hub_has_tokenizer(name, revision):
        return None
    try:
        return load_tokenizer(name, trust_remote_code, revision)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"the teacher's tokenizer at {name!r} could not be loaded ({type(error).__name__}: {error}); it is needed "
            "to check that the teacher's token ids are the student's"
        ) from error


def _hub_has_tokenizer(name: str, revision: str | None) -> bool:
    """Whether a hub id (or the local hub cache) has any tokenizer file; False where the hub cannot be asked."""
    from transformers.utils import cached_file

    for filename in TOKENIZER_FILES:
        try:
            found = cached_file(
                name,
                filename,
                revision=revision,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
        except OSError:
            return False
        if found is not None:
            return True
    return False


def place_teacher(teacher: nn.Module, placement: Placement) -> nn.Module:
    """Place the teacher like the student: sharded under DeepSpeed ZeRO-3 and FSDP, replicated otherwise."""
    accelerator = placement.accelerator
    if placement.deepspeed:
        import deepspeed

        config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        stage = config.get("zero_optimization", {}).get("stage", 0)
        config["zero_optimization"] = {"stage": 3} if stage == 3 else {"stage": 0}
        config.pop("optimizer", None)
        config.pop("scheduler", None)
        teacher, *_ = deepspeed.initialize(model=teacher, config=config)
    elif placement.fsdp and accelerator.is_fsdp2:
        teacher = fsdp2_shard(teacher, accelerator)
    elif placement.fsdp:
        teacher = accelerator.prepare_model(teacher)
    else:
        teacher = accelerator.prepare_model(teacher, evaluation_mode=True)
    teacher.eval()
    return teacher


def fsdp2_shard(teacher: nn.Module, accelerator) -> nn.Module:
    """The teacher sharded as accelerate shards the student under FSDP2 (same wrap policy, mixed precision, offload),
    without an optimizer: `Accelerator.prepare_model` refuses FSDP2 without one. The plugin's wrap policy is put back
    afterwards, since accelerate resolves it in place for the model it sees first."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = accelerator.state.fsdp_plugin
    policy, names = plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap
    try:
        return fsdp2_prepare_model(accelerator, teacher)
    finally:
        plugin.auto_wrap_policy, plugin.transformer_cls_names_to_wrap = policy, names


def load_local_teacher(spec: TeacherSpec, args, student: nn.Module, tokenizer, objective) -> LocalTeacher:
    """The teacher of `spec`, loaded and frozen, its tokenizer checked against the student's, and returning its last
    hidden state where the objective applies LM heads itself and its head allows it (`models.head_view`)."""
    model, teacher_tokenizer = load_teacher(spec.model, args)
    vocab_size = shared_vocab_size(student, model, tokenizer, teacher_tokenizer)
    returns = "logits"
    if spec.returns == "hidden":
        returns = head_view(model, spec.name, objective.chunk_size, objective.fused)
    return LocalTeacher(model, vocab_size, returns, spec.name)


class LocalTeacher:
    """A model beside the student, returning "logits" or "hidden" (see the module docstring)."""

    max_model_len = None  # a model has no hard limit: its max_position_embeddings counts only with max_length=None

    def __init__(self, model: nn.Module, vocab_size: int, returns: str, name: str = "teacher"):
        if returns not in ("logits", "hidden"):
            raise ValueError(f"a local teacher returns 'logits' or 'hidden', not {returns!r}")
        self.model, self.vocab_size, self.returns, self.name = model, vocab_size, returns, name

    def place(self, placement: Placement) -> None:
        self.model = place_teacher(self.model, placement)

    def prepare(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """Nothing to fetch ahead: a local teacher runs slice by slice."""

    @torch.no_grad()
    def __call__(self, batch: dict[str, torch.Tensor]) -> TeacherLogits | TeacherHidden:
        if self.returns == "logits":
            return TeacherLogits(completion_logits(self.model, batch, self.vocab_size))
        return TeacherHidden(completion_hidden(self.model, batch), *lm_head(self.model, self.vocab_size))

    def close(self) -> None:
        """Nothing to release."""
