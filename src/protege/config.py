"""`DistillationConfig`: TRL's field names and defaults, checked early.

A TRL user switches by changing the import, so every field TRL 1.1 to 1.8 has keeps its name, type, default and
meaning. Two inherited defaults differ from TRL on purpose, because TRL's choice fails or slows on a CPU:

* `bf16` defaults to `None`, meaning "on where the GPU supports it": True on a bf16-capable CUDA device, False
  elsewhere (TRL forces True, which raises on a CPU).
* `gradient_checkpointing` keeps the transformers default (off). TRL turns it on, which costs about a third more
  compute per step; turn it on yourself when memory, not time, is what you are short of.

Every rule that can be checked without a model is checked in `__post_init__`, so a bad setting fails before any
weights are loaded, with a message that names the field, the value and what is allowed. This module declares the
fields and fills the derived values (`DistillationConfig._derive`, the one place a setting is changed);
`settings_checks` holds the checks, which only read.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments
from transformers.utils import logging

from . import settings_checks
from .choices import (
    HIDDEN_DTYPES,
    PROMPT_TRUNCATIONS,
    REVERSE_KL_TOP_1_MODES,
    TEACHER_PROTOCOLS,
    VLLM_MODES,
)
from .config_crosstok import CrossTokenizerFields
from .config_policy import PolicyGradientFields
from .teacher.spec import MAPPING_FIELDS

logger = logging.get_logger(__name__)


@dataclass
class DistillationConfig(TrainingArguments, CrossTokenizerFields, PolicyGradientFields):
    """Configuration for `DistillationTrainer`, a `TrainingArguments` subclass usable with `HfArgumentParser`."""

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs", "teacher_model_init_kwargs"]

    # ----- Inherited fields whose defaults follow TRL (or differ from it on purpose, see the module docstring) -----
    learning_rate: float = field(
        default=1e-6,
        metadata={"help": "Initial learning rate for AdamW. TRL's default for distillation, 1e-6, kept for parity."},
    )
    logging_steps: float = field(
        default=10,
        metadata={"help": "Log every N optimizer steps (a float below 1 is a fraction of the total steps)."},
    )
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "Train in bf16 mixed precision. None (default) turns it on where a CUDA device supports bf16 and "
            "off elsewhere, so the same config runs on a laptop CPU and on a GPU."
        },
    )

    # ----- The output folder (a transformers 4 field, which `protege train` reads) -----
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Let `protege train` write into an output_dir that already holds a model or checkpoints; without "
            "it (or --resume_from_checkpoint) the command refuses, so two runs do not mix there silently. The trainer "
            "does not read it, like the field of this name that transformers 4 had and transformers 5 removed."
        },
    )

    # ----- Models -----
    model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for `AutoModelForCausalLM.from_pretrained` when the student is given as a "
            "string. A JSON string is accepted on the command line; `dtype` may be a string such as 'bfloat16'."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Allow custom modelling code from the hub for the student, the teacher and the tokenizer."},
    )
    teacher_model_name_or_path: dict[str, str] | str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local path of the teacher. The trainer loads it when `teacher_model` is not given; "
            "`protege train` passes it as the teacher. Several teachers: a mapping of names to paths (JSON text "
            "accepted; `protege train --teacher NAME=PATH`), each row routed by `teacher_column`."
        },
    )
    teacher_cache: dict[str, str] | str | None = field(
        default=None,
        metadata={
            "help": "A folder written by `protege cache-teacher`: off-policy slices read the teacher's output from it "
            "(checked against this run at start); on-policy slices still need a live teacher, so with lmbda=0 none "
            "is loaded. Several teachers: a mapping of names to folders (JSON text accepted); a teacher without one "
            "stays live."
        },
    )
    teacher_column: str = field(
        default="teacher",
        metadata={
            "help": "With several teachers, the dataset column naming each row's teacher (one of the names given in "
            "`teacher_model`, `teacher_model_name_or_path` or `teacher_model_server_url`)."
        },
    )
    default_teacher: str | None = field(
        default=None,
        metadata={"help": "With several teachers, the teacher of rows whose `teacher_column` is missing or None."},
    )
    teacher_model_revision: str | None = field(
        default=None, metadata={"help": "Revision (branch, tag or commit) of the teacher model and tokenizer."}
    )
    teacher_model_init_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments for the teacher's `from_pretrained` when it is given as a string (JSON string "
            "accepted). Giving them together with an already built teacher model is an error."
        },
    )
    disable_dropout: bool = field(
        default=True, metadata={"help": "Turn dropout off in the student, so the teacher's targets are not noisy."}
    )

    # ----- Lengths -----
    max_length: int | None = field(
        default=1024,
        metadata={
            "help": "Maximum tokens of prompt plus completion. A dataset completion longer than what its prompt leaves "
            "is cut at the end and loses its EOS, so it trains as unfinished text (one warning counts such rows). "
            "None cuts nothing: a row that cannot fit a limit known at start (the teacher server's max_model_len, "
            "or the student's or local teacher's max_position_embeddings; for on-policy rows, the prompt plus "
            "max_completion_length) is then refused before training, naming the row."
        },
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "Maximum prompt tokens; a longer prompt is cut as prompt_truncation says. Defaults to "
            "max_length - max_completion_length; must be smaller than max_length, to leave room for a completion."
        },
    )
    prompt_truncation: str = field(
        default="middle",
        metadata={
            "help": "How a prompt over max_prompt_length is cut: 'middle' (default) keeps its first and last halves "
            "of the budget, so the chat template's start (BOS, system prompt, first turn's header) and its end (the "
            "last question and the assistant header generation starts from) both survive; 'left' keeps only its "
            "last tokens (TRL with truncation_side='left'); 'error' refuses the row, naming it. One warning counts "
            "the rows cut when the dataset is tokenized; each tokenized row records prompt_tokens_cut and "
            "completion_tokens_cut.",
            "choices": list(PROMPT_TRUNCATIONS),
        },
    )
    max_completion_length: int = field(
        default=512, metadata={"help": "Maximum tokens the student generates per on-policy completion."}
    )

    # ----- Objective -----
    temperature: float = field(
        default=1.0,
        metadata={
            "help": "Sampling temperature for student generations; both models' logits are divided by it in "
            "the loss too."
        },
    )
    lmbda: float = field(
        default=1.0,
        metadata={
            "help": "Probability that a gradient-accumulation slice is on-policy (student generations) rather than "
            "off-policy (dataset completions). 1.0 is pure on-policy GKD, 0.0 is supervised KD."
        },
    )
    beta: float = field(
        default=1.0,
        metadata={
            "help": "Divergence: 0.0 is forward KL(teacher || student), 1.0 is reverse KL(student || teacher), and "
            "values between are the generalized Jensen-Shannon divergence with mixture (1-beta)*S + beta*T."
        },
    )
    loss_top_k: int = field(
        default=1,
        metadata={
            "help": "Size of the sparse support of the divergence; 0 uses the full vocabulary. The support is the "
            "teacher's top-k (beta=0), the student's top-k (beta=1) or their union. With beta>0 and 1, the support "
            "is the teacher's top-1 token and the reverse token chosen by reverse_kl_top_1_mode."
        },
    )
    loss_add_tail: bool = field(
        default=True,
        metadata={
            "help": "With a sparse support, add one bucket holding the probability mass outside it (True), or "
            "renormalise both distributions over the support (False). No effect when loss_top_k=0."
        },
    )
    reverse_kl_top_1_mode: str = field(
        default="sampled",
        metadata={
            "help": "With beta>0 and loss_top_k=1, the student-side token of the support: 'sampled' (the completion "
            "token) or 'argmax' (the student's most likely token; local teacher only).",
            "choices": list(REVERSE_KL_TOP_1_MODES),
        },
    )
    loss_chunk_size: int | str | None = field(
        default="auto",
        metadata={
            "help": "The loss is computed from hidden states and LM heads this many completion tokens at a time, "
            "never holding full-vocabulary logits for the whole batch (same value and gradient as full logits, "
            "memory bounded by the chunk, in every mode, local teacher or server). 'auto' (default) sizes the "
            "chunk to the vocabulary, about 256 MiB of per-chunk tensors (44 tokens at 151,936, 22,000 at 300); an "
            "integer fixes it. LM heads are applied to at least 128 tokens at once (a logits buffer of 128 x "
            "vocabulary for the student and one for a teacher given by hidden states), the divergence a chunk at a "
            "time inside them; None (or 'none' on the command line) computes full logits at once, the dense path "
            "of earlier releases and of TRL. Models that transform logits after the LM head (soft-capping) use "
            "the dense path under 'auto'."
        },
    )

    # ----- Teacher server -----
    use_teacher_server: bool = field(
        default=False,
        metadata={"help": "Score sequences with a remote teacher server instead of a local teacher model."},
    )
    teacher_model_server_url: dict[str, str] | str | None = field(
        default=None,
        metadata={
            "help": "Base URL of the teacher server, e.g. http://127.0.0.1:8000. Several teachers: a mapping of "
            "names to URLs (JSON text accepted; `protege train --teacher NAME=URL`); those teachers are servers "
            "whatever `use_teacher_server` says, and may be mixed with local ones."
        },
    )
    teacher_server_protocol: str = field(
        default="protege",
        metadata={
            "help": "'protege' speaks /get_sequence_logprobs/ (protege serve-teacher, or TRL's vllm-serve); 'openai' "
            "uses prompt log-probs from /v1/completions of a stock vLLM or SGLang server.",
            "choices": list(TEACHER_PROTOCOLS),
        },
    )
    teacher_server_response_format: dict[str, str] | str | None = field(
        default="compact",
        metadata={
            "help": "Payload format asked of a 'protege' server: 'compact' (float16, ragged; smallest), 'binary' "
            "(TRL's float32 base64 arrays; use it with trl vllm-serve) or 'json': the teacher's top-k log-probs. "
            "'hidden': the teacher's final hidden states (2H bytes a token in 16 bits) and its LM head, fetched once; "
            "the loss is then exact for every beta, loss_top_k and temperature, as with a local teacher. Several "
            "teacher servers: one format for all, or a mapping of teacher names to formats (others take 'compact').",
        },
    )
    teacher_server_hidden_dtype: str = field(
        default="float16",
        metadata={
            "help": "Wire dtype of the 'hidden' format: 'float16' (default; exact for a bfloat16 or float16 teacher, "
            "2^-11 relative rounding for a float32 one), 'bfloat16', or 'float32' (exact, twice the bytes).",
            "choices": list(HIDDEN_DTYPES),
        },
    )
    teacher_lm_head_path: str | None = field(
        default=None,
        metadata={
            "help": "With the 'hidden' format, read the teacher's LM head from this checkpoint (local folder or hub "
            "id; only the head's tensors are read, located through the safetensors index) instead of downloading "
            "it from the server's /lm_head/ (cached by SHA-256 in $PROTEGE_CACHE_DIR or ~/.cache/protege)."
        },
    )
    teacher_server_model: str | None = field(
        default=None, metadata={"help": "Model name sent to an 'openai' server (its --served-model-name or path)."}
    )
    teacher_server_timeout: float = field(
        default=120.0, metadata={"help": "Seconds to wait for each teacher-server answer before retrying."}
    )
    teacher_server_max_retries: int = field(
        default=4,
        metadata={"help": "Retries, with exponential backoff, after connection errors, timeouts and 5xx answers."},
    )
    teacher_server_deadline: float | None = field(
        default=300.0,
        metadata={
            "help": "Seconds one teacher-server call may take with all its retries and waits, after which training "
            "stops with an error naming the server (the last checkpoint stays resumable). None: no total limit."
        },
    )
    teacher_server_api_key: str | None = field(
        default=None,
        metadata={
            "help": "API key sent as 'Authorization: Bearer KEY' to a teacher server started with --api-key "
            "(default: $PROTEGE_TEACHER_API_KEY, which keeps it out of training_args.bin too). Redacted in logged "
            "arguments."
        },
    )
    teacher_server_startup_timeout: float = field(
        default=60.0, metadata={"help": "Seconds to wait for the teacher server's health check at start-up."}
    )

    # ----- Generation -----
    num_generations: int = field(default=1, metadata={"help": "Completions generated per prompt."})
    generation_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Accepted for TRL compatibility: unique prompts per device per optimizer step. protege always "
            "generates for every prompt of the step in one call, so it is only checked: when set, times "
            "num_generations it must equal per_device_train_batch_size * gradient_accumulation_steps."
        },
    )
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling threshold for student generations."})
    top_k: int = field(
        default=0, metadata={"help": "Top-k sampling for student generations (0 turns it off); not loss_top_k."}
    )
    min_p: float | None = field(
        default=None,
        metadata={"help": "Min-p sampling for student generations: drop tokens below min_p x the top probability."},
    )
    repetition_penalty: float = field(
        default=1.0, metadata={"help": "Repetition penalty of student generations (1.0: none)."}
    )
    generation_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Extra sampling options for student generations, as a dict or JSON: transformers GenerationConfig "
            "fields with model.generate, vLLM SamplingParams fields with use_vllm. They override the fields above."
        },
    )

    # ----- vLLM (student generation) -----
    use_vllm: bool = field(
        default=False,
        metadata={
            "help": "Generate the student's on-policy completions with vLLM (vllm_mode='colocate': an engine in this "
            "process that receives the student's weights when they change). Needs vLLM installed (on a CPU: train "
            "inside `make vllm-env`'s environment)."
        },
    )
    vllm_mode: str = field(
        default="colocate",
        metadata={
            "help": "'colocate' runs vLLM in the training process; 'server' asks a separate `protege serve-student` "
            "server, pushing the student's weights to it over HTTP when they change.",
            "choices": list(VLLM_MODES),
        },
    )
    vllm_server_base_url: str | None = field(
        default=None, metadata={"help": "Base URL of the student vLLM server; overrides host and port."}
    )
    vllm_server_host: str = field(default="0.0.0.0", metadata={"help": "Host of the student vLLM server."})
    vllm_server_port: int = field(default=8001, metadata={"help": "Port of the student vLLM server."})
    vllm_server_timeout: float = field(
        default=240.0,
        metadata={"help": "Seconds to wait for the student vLLM server to come up, and for each of its answers."},
    )
    vllm_server_max_retries: int = field(
        default=4,
        metadata={"help": "Retries, with exponential backoff, after connection errors, timeouts and 5xx answers."},
    )
    vllm_server_api_key: str | None = field(
        default=None,
        metadata={
            "help": "API key sent as 'Authorization: Bearer KEY' to a `protege serve-student` server started with "
            "--api-key (default: $PROTEGE_STUDENT_API_KEY, which keeps it out of training_args.bin too). Redacted in "
            "logged arguments."
        },
    )
    vllm_server_chunk_mb: float = field(
        default=256.0,
        metadata={"help": "Largest chunk of the student's weights in one POST /weights/ to `protege serve-student`."},
    )
    vllm_group_port: int = field(
        default=51216,
        metadata={
            "help": "Not used by protege; accepted so that a TRL config loads. In TRL it is the port of the NCCL "
            "weight-sync group of trl vllm-serve; protege pushes the student's weights to its server over HTTP, so "
            "any other value only warns that it has no effect."
        },
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "Fraction of GPU memory vLLM may take (colocate mode)."}
    )
    vllm_tensor_parallel_size: int = field(default=1, metadata={"help": "Tensor parallel size (colocate mode)."})
    vllm_max_model_length: int | None = field(
        default=None, metadata={"help": "Maximum model length for vLLM (colocate mode)."}
    )
    vllm_model_impl: str = field(default="vllm", metadata={"help": "'vllm' or 'transformers' model implementation."})
    vllm_structured_outputs_regex: str | None = field(
        default=None, metadata={"help": "Regex that constrains vLLM's generations."}
    )
    vllm_sync_frequency: int = field(
        default=1, metadata={"help": "Push the student's weights to vLLM every N optimizer steps."}
    )
    vllm_enable_sleep_mode: bool = field(
        default=False, metadata={"help": "Let colocated vLLM free its memory between generations."}
    )

    # ----- Logging -----
    log_completions: bool = field(
        default=False, metadata={"help": "Print a table of sample prompts and on-policy completions."}
    )
    log_completions_steps: int = field(
        default=100, metadata={"help": "Print the completions table every N optimizer steps."}
    )
    num_completions_to_print: int | None = field(
        default=None, metadata={"help": "How many completions the table shows (None shows all of the step's)."}
    )

    def to_dict(self) -> dict:
        """TrainingArguments' dict (what logs and trackers get), without the servers' API keys."""
        values = super().to_dict()
        for name in ("teacher_server_api_key", "vllm_server_api_key"):
            if values.get(name):
                values[name] = f"<{name.upper()}>"
        if values.get("reward_funcs"):
            values["reward_funcs"] = _reward_paths(values["reward_funcs"])
        return values

    def __getstate__(self) -> dict:
        """The pickled config (transformers saves it with every checkpoint): reward functions by import path, since a
        lambda or a closure does not pickle."""
        state = dict(self.__dict__)
        if state.get("reward_funcs"):
            state["reward_funcs"] = _reward_paths(state["reward_funcs"])
        return state

    def __post_init__(self) -> None:
        """Fill the derived values, check what transformers' set-up needs, let it run, then check everything else."""
        self._derive()
        settings_checks.check_precision(self)
        super().__post_init__()
        settings_checks.check_settings(self)
        settings_checks.check_environment(self)
        settings_checks.warn_ineffective(self)

    def _derive(self) -> None:
        """The one place a setting is filled in or converted; the checks after it only read. It sets:

        * use_cpu: on (logged once) under a multi-process launch (WORLD_SIZE > 1) on a machine without CUDA.
        * bf16: None becomes True where a CUDA device supports bf16 and fp16 is off, False elsewhere.
        * max_prompt_length: None becomes max_length - max_completion_length (stays None without max_length).
        * loss_chunk_size: the command line's text becomes 'auto', None ('none', 'dense') or an integer.
        * generation_kwargs: JSON text becomes what it encodes.
        * reward_funcs: one function (or import path) becomes a list of one.
        * teacher_model_name_or_path, teacher_model_server_url, teacher_server_response_format: JSON text of a
          mapping (several teachers) becomes the mapping.
        * use_teacher_server: on where teacher_model_server_url maps names to URLs (those teachers are servers).

        A value it cannot convert is left as given, for the checks to name.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if not self.use_cpu and world_size > 1 and not torch.cuda.is_available():
            self.use_cpu = True
            logger.warning_once(
                f"use_cpu=True: WORLD_SIZE={world_size} and no CUDA device, so the processes train together on CPUs "
                "(left off, transformers would look for one GPU per process and, finding none, train each rank alone)."
            )
        if self.bf16 is None:
            self.bf16 = settings_checks.bf16_supported() and not self.fp16
        if self.max_prompt_length is None and self.max_length is not None:
            self.max_prompt_length = self.max_length - self.max_completion_length
        self.loss_chunk_size = _chunk_size_value(self.loss_chunk_size)
        if isinstance(self.reward_funcs, str) or callable(self.reward_funcs):
            self.reward_funcs = [self.reward_funcs]
        if isinstance(self.generation_kwargs, str):
            with contextlib.suppress(json.JSONDecodeError):  # left as text: settings_checks.check_sampling names it
                self.generation_kwargs = json.loads(self.generation_kwargs)
        for name in MAPPING_FIELDS:  # several teachers' mappings, given as JSON text on the command line
            value = getattr(self, name)
            if isinstance(value, str) and value.lstrip().startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):  # left as text: settings_checks names it
                    setattr(self, name, json.loads(value))
        if isinstance(self.teacher_model_server_url, dict) and self.teacher_model_server_url:
            self.use_teacher_server = True


def _reward_paths(funcs: list) -> list[str]:
    """Reward functions as 'module:function' text (callables by their module and qualified name)."""
    return [
        func if isinstance(func, str) else f"{getattr(func, '__module__', '?')}:{getattr(func, '__qualname__', func)}"
        for func in funcs
    ]


def _chunk_size_value(value: Any) -> Any:
    """loss_chunk_size as the loss reads it: 'auto', None or an integer from the command line's text."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower()
    if text == "auto":
        return "auto"
    if text in ("none", "dense"):
        return None
    return int(text) if text.isdecimal() else value
