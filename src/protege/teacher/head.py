"""A teacher's LM head apart from its model: served once by a teacher server, read alone from a checkpoint, cached.

With the "hidden" response format the server sends final hidden states and the trainer applies the teacher's head
itself, so the head must reach the trainer exactly once: from the server's `/lm_head/` (a safetensors file whose
SHA-256 names it in the client's disk cache) or from the teacher's checkpoint files, where only the head's tensors
are read (located through the safetensors index), never the whole model.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

HEAD_WEIGHT_SUFFIXES = ("lm_head.weight",)
TIED_WEIGHT_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def logit_transform(config) -> tuple[float, float | None]:
    """What a model does to `hidden @ head.T + bias`: a multiplier (Cohere's `logit_scale`, Granite's division by
    `logits_scaling`) and a final soft-capping (Gemma 2 and 3), as (multiplier, cap or None)."""
    text_config = config.get_text_config()
    multiplier = float(getattr(text_config, "logit_scale", None) or 1.0)
    multiplier /= float(getattr(text_config, "logits_scaling", None) or 1.0)
    return multiplier, getattr(text_config, "final_logit_softcapping", None) or None


def vocabulary_sha256(tokenizer) -> str:
    """A fingerprint of a tokenizer's token-to-id map: equal for tokenizers that give every token the same id."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()


@dataclass
class LMHead:
    """logits = (hidden @ weight.T + bias) * logit_multiplier, then soft-capped when `final_logit_softcapping`."""

    weight: torch.Tensor  # (V, H)
    bias: torch.Tensor | None = None
    logit_multiplier: float = 1.0
    final_logit_softcapping: float | None = None

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    def tensors_sha256(self) -> str:
        """A digest of the head's values (weight, bias, logit transform), the same in every process, unlike the file's:
        safetensors writes a header's metadata in any order. A teacher's identity in a cache made from a server."""
        digest = hashlib.sha256(json.dumps(self.metadata(), sort_keys=True).encode())
        for tensor in (self.weight, self.bias):
            if tensor is not None:
                digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def metadata(self) -> dict[str, str]:
        """What safetensors keeps beside the tensors (strings only)."""
        return {
            "vocab_size": str(self.vocab_size),
            "hidden_size": str(self.hidden_size),
            "dtype": str(self.weight.dtype).removeprefix("torch."),
            "logit_multiplier": repr(float(self.logit_multiplier)),
            "final_logit_softcapping": "none"
            if not self.final_logit_softcapping
            else repr(self.final_logit_softcapping),
        }

    def for_loss(self, vocab_size: int, device, dtype, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight and bias as the chunked loss uses them: the shared vocabulary's rows, the logit multiplier folded in,
        on the student's device in its compute dtype; or a ValueError naming `where` the head came from when its
        logits are soft-capped (a transform the loss does not reproduce)."""
        if self.final_logit_softcapping:
            raise ValueError(
                f"the teacher's LM head from {where} soft-caps its logits (final_logit_softcapping="
                f"{self.final_logit_softcapping}); the hidden-state loss does not reproduce that transform, so use a "
                "log-prob response format (compact, binary, json) for this teacher"
            )
        if vocab_size > self.vocab_size:
            raise ValueError(f"the teacher's LM head from {where} has {self.vocab_size} rows, fewer than {vocab_size}")
        weight, bias = self.weight[:vocab_size], None if self.bias is None else self.bias[:vocab_size]
        if self.logit_multiplier != 1.0:
            weight = weight.float() * self.logit_multiplier
            bias = None if bias is None else bias.float() * self.logit_multiplier
        weight = weight.to(device=device, dtype=dtype)
        return weight, None if bias is None else bias.to(device=device, dtype=dtype)


def config_sha256(config) -> str:
    """A digest of a model's config without its path (`_name_or_path`), so a moved folder is the same teacher, and a
    server can report it without saying how its host is laid out."""
    values = {key: value for key, value in config.to_dict().items() if key != "_name_or_path"}
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()


def head_of_model(model: torch.nn.Module) -> LMHead:
    """The head of a loaded model, with its config's logit transform."""
    head = model.get_output_embeddings()
    multiplier, softcapping = logit_transform(model.config)
    return LMHead(head.weight.detach(), None if head.bias is None else head.bias.detach(), multiplier, softcapping)


def _pick(names: list[str], suffixes: tuple[str, ...]) -> str | None:
    found = sorted((n for n in names if n.endswith(suffixes)), key=len)
    return found[0] if found else None


def head_from_checkpoint(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False) -> LMHead:
    """Only the head's tensors of a safetensors checkpoint (a local folder or a hub id): `lm_head.weight`, or the
    input embedding when the model ties them, and `lm_head.bias` when there is one."""
    from safetensors import safe_open
    from transformers import AutoConfig
    from transformers.utils import cached_file

    config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    common = {"revision": revision, "_raise_exceptions_for_missing_entries": False}
    index = cached_file(name_or_path, "model.safetensors.index.json", **common)
    if index is not None:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
    else:
        single = cached_file(name_or_path, "model.safetensors", **common)
        if single is None:
            raise ValueError(
                f"teacher_lm_head_path={name_or_path!r} has no model.safetensors or model.safetensors.index.json; "
                "the LM head is read from safetensors checkpoints only"
            )
        with safe_open(single, framework="pt") as f:
            weight_map = {name: "model.safetensors" for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    names = list(weight_map)
    weight_name = _pick(names, HEAD_WEIGHT_SUFFIXES)
    if weight_name is None and getattr(config.get_text_config(), "tie_word_embeddings", False):
        weight_name = _pick(names, TIED_WEIGHT_SUFFIXES)
    if weight_name is None:
        raise ValueError(f"teacher_lm_head_path={name_or_path!r}: no LM head tensor among its {len(names)} tensors")
    bias_name = weight_name.removesuffix("weight") + "bias"

    def read(tensor_name: str) -> torch.Tensor:
        path = cached_file(name_or_path, weight_map[tensor_name], revision=revision)
        with safe_open(path, framework="pt") as f:
            return f.get_tensor(tensor_name)

    multiplier, softcapping = logit_transform(config)
    bias = read(bias_name) if bias_name in weight_map else None
    return LMHead(read(weight_name), bias, multiplier, softcapping)


# ----- The head as one file: what /lm_head/ serves and the client caches -----


def save_head(head: LMHead, path: Path) -> str:
    """Write the head as a safetensors file; returns its SHA-256."""
    from safetensors.torch import save_file

    tensors = {"weight": head.weight.contiguous()}
    if head.bias is not None:
        tensors["bias"] = head.bias.contiguous()
    save_file(tensors, str(path), metadata=head.metadata())
    return file_sha256(path)


def load_head(path: Path) -> LMHead:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        names = set(f.keys())
        weight = f.get_tensor("weight")
        bias = f.get_tensor("bias") if "bias" in names else None
    softcapping = metadata.get("final_logit_softcapping", "none")
    return LMHead(
        weight,
        bias,
        float(metadata.get("logit_multiplier", "1.0")),
        None if softcapping == "none" else float(softcapping),
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(2**22):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where downloaded heads are kept, by SHA-256: $PROTEGE_CACHE_DIR, else ~/.cache/protege."""
    return Path(os.environ.get("PROTEGE_CACHE_DIR") or Path.home() / ".cache" / "protege") / "lm_heads"
