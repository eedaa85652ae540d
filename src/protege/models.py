"""Loading students and teachers from names or paths."""

from __future__ import annotations

import json
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "auto": "auto"}


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


def load_causal_lm(name_or_path: str, init_kwargs: dict[str, Any], trust_remote_code: bool) -> PreTrainedModel:
    kwargs = {"trust_remote_code": trust_remote_code, **init_kwargs}
    kwargs.setdefault("dtype", torch.float32)
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)


def load_tokenizer(name_or_path: str, trust_remote_code: bool, revision: str | None = None):
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, revision=revision)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def output_rows(model: torch.nn.Module) -> int:
    """Rows of the model's output layer: the size of its logits' last dimension."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return head.weight.shape[0]
    return model.config.get_text_config().vocab_size
