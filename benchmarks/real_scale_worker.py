"""One case of ``real_scale.py``: a single distillation optimizer step at real shapes, in a fresh process.

``real_scale.py`` starts it with protege's interpreter for the ``local-*`` and ``server-*`` modes, and with the TRL
1.8.0 environment's (``.trl-env/bin/python``) for ``trl-dense``; its flags are the fields of ``Case``:

    python benchmarks/real_scale_worker.py --mode local-chunked --completion-tokens 1000 \
        --student DIR --teacher DIR --tokenizer DIR --output-dir DIR

Standard library and ``workers.py`` only at import time, so TRL's environment can run it without protege: the trainer
library is imported once the mode is known.

The data: ``--batch`` rows of ``messages``, a user turn of random word tokens and an assistant turn of
``completion_tokens - 1`` of them, rendered by the tokenizer's chat template (``real_scale.py`` writes one that puts
``<|im_start|>`` before and ``<|im_end|>`` after each turn): the prompt is ``prompt_tokens`` ids with the generation
prompt, the completion ``completion_tokens`` ids with its ``<|im_end|>``. The worker checks both lengths with the
tokenizer before training, and counts the completion tokens the loss receives (``workers.counting_trainer``).

Memory, in bytes of resident set: ``rss_imports`` after importing torch, transformers and the trainer library, before
loading anything; ``rss_ready`` with the models loaded, every weight read once (``from_pretrained`` maps the files, so
an unread weight is not resident) and the trainer built; ``peak_rss`` is ``ru_maxrss`` after the step, the process's
high-water mark. Time: ``step_seconds`` is ``on_train_begin`` to the last step's ``on_step_end``, per step
(``workers.step_timer``): collation, teacher scoring, student forward and backward, the AdamW step.
"""

from __future__ import annotations

import dataclasses
import os
import random
import resource
import sys

import workers
from workers import RunSettings, setting

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SERVER = {"teacher_server_timeout": 3600.0, "teacher_server_max_retries": 0}  # a slow answer is a result, not a fault


@dataclasses.dataclass(frozen=True)
class Mode:
    """What a mode trains with: the library, the config settings it changes, whether the teacher is a server."""

    system: str  # "protege" or "trl"
    config: dict
    server: bool = False
    library_defaults: bool = False  # leave loss_top_k (and loss_chunk_size) to the library's defaults


MODES = {
    "local-default": Mode("protege", {}, library_defaults=True),
    "local-dense": Mode("protege", {"loss_top_k": 0, "loss_chunk_size": None}),
    "local-chunked": Mode("protege", {"loss_top_k": 0, "loss_chunk_size": 256}),
    "server-top1": Mode("protege", {"loss_top_k": 1, "use_teacher_server": True, **SERVER}, server=True),
    "server-top20": Mode("protege", {"beta": 0.0, "loss_top_k": 20, "use_teacher_server": True, **SERVER}, server=True),
    "trl-dense": Mode("trl", {"loss_top_k": 0}),
}


@dataclasses.dataclass(kw_only=True)
class Case(RunSettings):
    """One step of one mode at one completion length; the `RunSettings` part is what `workers.trainer_config` reads."""

    steps: int = setting(1, "optimizer steps (all timed)")
    warmup: int = setting(0, "untimed steps first")
    grad_accum: int = setting(1, "gradient_accumulation_steps")
    lmbda: float = setting(0.0, "0: off-policy, dataset completions only")
    learning_rate: float = setting(1e-6)
    threads: int = setting(2, "torch threads (and OMP_NUM_THREADS)")
    max_completion_length: int = setting(0, "0: completion_tokens")
    max_length: int = setting(0, "0: prompt_tokens + completion_tokens + 16")
    mode: str = setting(help=f"one of {', '.join(MODES)}")
    completion_tokens: int = setting(help="completion length of every row, in tokens (its <|im_end|> included)")
    prompt_tokens: int = setting(16, "prompt length in tokens, chat markers and generation prompt included")
    student: str = setting(help="student model folder")
    teacher: str = setting(help="teacher model folder (loaded only by local modes)")
    tokenizer: str = setting(help="tokenizer folder (PreTrainedTokenizerFast)")
    server_url: str | None = setting(None, "teacher server of the server modes")
    output_dir: str | None = setting(None, "Trainer output_dir (nothing is saved)")
    activation_checkpointing: bool = setting(False, "recompute the student's layer activations in backward")

    def __post_init__(self) -> None:
        self.max_completion_length = self.max_completion_length or self.completion_tokens
        self.max_length = self.max_length or self.prompt_tokens + self.completion_tokens + 16


def rss_bytes() -> int:
    """The resident set of this process now (VmRSS)."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def conversations(case: Case, tokenizer) -> list[dict]:
    """`case.batch` rows of random word tokens, their rendered prompt and completion lengths checked."""
    words = sorted(w for w in tokenizer.get_vocab() if w[1:].isdigit())
    rng = random.Random(case.seed)
    rows = []
    for _ in range(case.batch):
        prompt, completion = (
            " ".join(rng.choice(words) for _ in range(n)) for n in (case.prompt_tokens - 3, case.completion_tokens - 1)
        )
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]})
    for row in rows:
        prompt_text = tokenizer.apply_chat_template(row["messages"][:1], tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        prompt_ids, full_ids = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (prompt_text, full_text))
        lengths = (len(prompt_ids), len(full_ids) - len(prompt_ids))
        if lengths != (case.prompt_tokens, case.completion_tokens) or full_ids[: len(prompt_ids)] != prompt_ids:
            raise SystemExit(f"rendered prompt/completion are {lengths} tokens, not the case's")
    return rows


def main(argv=None) -> int:
    case = workers.parse(Case, argv, __doc__.split("\n\n")[0])
    mode = MODES[case.mode]

    import datasets
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from transformers.utils import logging as hf_logging

    if mode.system == "trl":
        import trl as library
        from trl.experimental.distillation import DistillationConfig, DistillationTrainer
    else:
        import protege as library
        from protege import DistillationConfig, DistillationTrainer

    torch.set_num_threads(case.threads)
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    rss_imports = rss_bytes()

    # AutoTokenizer on a folder whose config.json is Qwen2 would rebuild Qwen2's BPE: load the word-level one as is.
    tokenizer = PreTrainedTokenizerFast.from_pretrained(case.tokenizer)
    train_dataset = datasets.Dataset.from_list(conversations(case, tokenizer))
    student = AutoModelForCausalLM.from_pretrained(case.student, dtype=torch.float32)
    teacher = None
    if not mode.server:
        teacher = AutoModelForCausalLM.from_pretrained(case.teacher, dtype=torch.float32)
        # TRL checks the teacher's tokenizer, loaded with AutoTokenizer from _name_or_path: point it where that works.
        teacher.config._name_or_path = case.tokenizer
    # from_pretrained maps the safetensors files, and a weight is resident only once read: one step reads 2 x ~1000
    # of the teacher's 151,936 input-embedding rows. Read every weight now, as a long run will have, so that the
    # resident set holds all weights and can be compared with the floor.
    with torch.no_grad():
        for model in [m for m in (student, teacher) if m is not None]:
            for tensor in model.state_dict().values():
                tensor.sum()

    def configure(**shared):
        """`workers.trainer_config`'s settings, then the mode's."""
        if mode.library_defaults:
            shared.pop("loss_top_k")
        if mode.server:
            shared["teacher_model_server_url"] = case.server_url
        shared["activation_checkpointing"] = case.activation_checkpointing
        return DistillationConfig(**{**shared, **mode.config})

    trainer, timer, init_warnings = workers.build_trainer(
        case,
        case.mode,
        configure,
        DistillationTrainer,
        TrainerCallback,
        model=student,
        teacher_model=teacher,
        train_dataset=train_dataset,
        processing_class=tokenizer,
    )
    report = {
        "mode": case.mode,
        "system": mode.system,
        "library_version": library.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "student_params": sum(p.numel() for p in student.parameters()),  # tied weights counted once
        "teacher_params": 0 if teacher is None else sum(p.numel() for p in teacher.parameters()),
        "rss_imports": rss_imports,
        "rss_ready": rss_bytes(),
        "loss_top_k": trainer.args.loss_top_k,
        "loss_chunk_size": getattr(trainer.args, "loss_chunk_size", None),
        "beta": trainer.args.beta,
        "objective": repr(getattr(trainer, "objective", None)),
        "init_warnings": init_warnings,
        "config": dataclasses.asdict(case),
        "finished": False,
    }
    workers.emit_result(report)  # what the parent reports if the step is killed

    train_seconds, logs = workers.train(trainer)
    log = logs.get(case.steps, {})
    report.update(
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
        step_seconds=(timer.end[case.steps] - timer.end[0]) / case.steps,
        train_seconds=train_seconds,
        completion_tokens_trained=sum(trainer.step_tokens.values()),
        loss=log.get("loss"),
        log=log,
        finished=True,
    )
    workers.emit_result(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
