"""Loading students and teachers from names or paths, and running them on the trainer's batches."""

from __future__ import annotations

import json
import warnings
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .choices import DTYPE_NAMES
from .model_source import check_model_source
from .sharding import whole_head
from .teacher.head import logit_transform

DTYPES = {name: "auto" if name == "auto" else getattr(torch, name) for name in DTYPE_NAMES}


def parse_init_kwargs(kwargs: dict[str, Any] | str | None, field_name: str) -> dict[str, Any]:
    """Init kwargs as a dict, with a string dtype turned into a torch dtype."""
    if kwargs is None:
        return {}
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError as error:
            raise ValueError(f"{field_name} is not valid JSON: {error}") from None
    kwargs = dict(kwargs)
    for key in ("dtype", "torch_dtype"):
        value = kwargs.pop(key, None)
        if isinstance(value, str):
            if value not in DTYPES:
                raise ValueError(f"{field_name}['{key}']={value!r} is not one of {sorted(DTYPES)}")
            value = DTYPES[value]
        if value is not None:
            kwargs["dtype"] = value
    return kwargs


def load_causal_lm(
    name_or_path: str, init_kwargs: dict[str, Any], trust_remote_code: bool, role: str = "student"
) -> PreTrainedModel:
    """The model at `name_or_path`. A name that points at nothing is a `ModelSourceError` (a ValueError) naming
    `role` and the name, at once, instead of transformers' hub-id error or a minute of retries."""
    check_model_source(name_or_path, role, init_kwargs)
    kwargs = {"trust_remote_code": trust_remote_code, **init_kwargs}
    kwargs.setdefault("dtype", torch.float32)
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)


def load_tokenizer(name_or_path: str, trust_remote_code: bool, revision: str | None = None):
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def output_rows(model: torch.nn.Module) -> int:
    """Rows of the model's output layer: the size of its logits' last dimension (DeepSpeed ZeRO-3's whole shape,
    `ds_shape`, where the weight is a partitioned placeholder of 0 elements)."""
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None) if head is not None else None
    if weight is not None:
        return weight.ds_shape[0] if hasattr(weight, "ds_shape") else weight.shape[0]
    return model.config.get_text_config().vocab_size


# ----- Running a model on the trainer's batch layout (prompt columns, then completion columns) -----


def forward_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model inputs of a batch: ids, attention mask and positions, no KV cache."""
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")} | {"use_cache": False}


def completion_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor], vocab_size: int) -> torch.Tensor:
    """Logits (B, C, vocab_size) predicting each completion column; the LM head sees completion positions only."""
    completion_width = batch["input_ids"].shape[1] - int(batch["prompt_width"])
    logits = model(**forward_inputs(batch), logits_to_keep=completion_width + 1).logits
    return logits[:, :-1, :vocab_size]


def last_hidden_state(model: torch.nn.Module, **inputs) -> torch.Tensor:
    """The decoder body's final (post-norm) output (B, T, H).

    A forward hook on the body takes its output while the model runs through its own (DDP, FSDP, DeepSpeed, PEFT)
    wrappers, so no layer's hidden states but the last are kept, and the LM head computes one position only.
    """
    body = extract_model_from_parallel(model).get_decoder()
    captured: list[torch.Tensor] = []
    handle = body.register_forward_hook(lambda _module, _args, output: captured.append(output[0]))
    try:
        model(**inputs, logits_to_keep=1)
    finally:
        handle.remove()
    return captured[0]


def completion_hidden(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The last hidden state (B, C, H) at the positions predicting each completion column."""
    return last_hidden_state(model, **forward_inputs(batch))[:, int(batch["prompt_width"]) - 1 : -1]


def lm_head(model: torch.nn.Module, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output layer's weight (vocab_size, H) and bias, sliced to the shared vocabulary: whole where a sharding
    engine holds it in pieces (`sharding.whole_head`), since the loss applies it outside the model's forward."""
    unwrapped = extract_model_from_parallel(model)
    head = whole_head(unwrapped, unwrapped.get_output_embeddings())
    bias = None if head.bias is None else head.bias[:vocab_size]
    return head.weight[:vocab_size], bias


def has_plain_head(model: torch.nn.Module) -> bool:
    """Whether the logits are exactly hidden @ head.T (+ bias): no soft-capping or scaling after the LM head."""
    return logit_transform(model.config) == (1.0, None)


def head_view(model: torch.nn.Module, role: str, chunk_size: int | str | None, fused: bool = False) -> str:
    """What `model` hands to the loss: "hidden" (its last hidden state and LM head, for the chunked and fused paths)
    or "logits". The one rule for it: the head is applied outside the model only where the logits are exactly
    hidden @ head.T (+ bias); under chunk size "auto" a model that transforms them gives full logits instead (said
    once), while an explicit chunk size or Liger's fused loss refuses it, naming `role`."""
    if chunk_size is None and not fused:
        return "logits"
    if has_plain_head(model):
        return "hidden"
    if chunk_size == "auto" and not fused:
        warnings.warn(
            f"the {role} transforms its logits after the LM head (soft-capping or scaling), so it gives full logits "
            "(more memory): the chunked path (loss_chunk_size='auto') cannot reproduce the transform",
            UserWarning,
            stacklevel=3,
        )
        return "logits"
    raise ValueError(
        f"loss_chunk_size: the {role} transforms its logits after the LM head (softcapping or scaling), which the "
        "chunked loss does not reproduce"
    )


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off in every layer and in the config (what a reloaded model reads), so the student's targets and its
    own forward are not noisy."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for name in ("attention_dropout", "hidden_dropout", "dropout"):
        if config is not None and isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)
