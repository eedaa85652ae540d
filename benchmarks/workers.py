"""What the benchmarks that start other Python processes share: worker settings, argv, results, data and ports.

Standard library only: ``trl_worker.py`` imports it in the separate TRL environment, which has no protege (each
benchmark runs as a script, so ``benchmarks/`` is on ``sys.path``). A worker's settings are one dataclass:
``add_flags`` makes its fields argparse flags (``--grad-accum`` for ``grad_accum``), ``command`` writes an instance
out as the argv that runs the worker, ``parse`` reads it back in the worker, and ``spawn`` runs the worker to the end
and returns the JSON it printed with ``emit_result``. One definition per flag, so the side that starts a worker and
the worker cannot drift apart.

The trainer helpers at the end take the classes they extend as arguments (TRL's or protege's ``DistillationTrainer``,
transformers' ``TrainerCallback``), so the two ``vs_trl.py`` workers share them without this module importing either.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import types
import typing
import warnings
from collections.abc import Sequence
from typing import Any, TypeVar

RESULT_PREFIX = "RESULT "
Settings = TypeVar("Settings")


def setting(default: Any = dataclasses.MISSING, help: str | None = None) -> Any:
    """A dataclass field with argparse help; no default makes the flag required."""
    return dataclasses.field(default=default, metadata={"help": help})


# ---------------------------------------------------------------------------------------------------------------------
# Settings <-> argv
# ---------------------------------------------------------------------------------------------------------------------


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _converter(kind: Any) -> Any:
    """The type argparse converts a value with: `int` for `int`, `float` for `float | None`."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        (kind,) = [k for k in typing.get_args(kind) if k is not type(None)]
    return kind


def add_flags(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """One flag per field of the dataclass `cls`: a bool is a switch (default False), the rest take one value."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        options: dict[str, Any] = {"help": field.metadata.get("help"), "dest": field.name}
        if hints[field.name] is bool:
            if field.default is not False:
                raise TypeError(f"{cls.__name__}.{field.name}: a switch must default to False")
            options["action"] = "store_true"
        elif field.default is dataclasses.MISSING:
            options.update(type=_converter(hints[field.name]), required=True)
        else:
            options.update(type=_converter(hints[field.name]), default=field.default)
        parser.add_argument(_flag(field.name), **options)
    return parser


def to_argv(settings: Any) -> list[str]:
    """`settings` as the flags `add_flags` defines: `--name value`, a true bool as `--name`; None and False left out."""
    argv: list[str] = []
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if value is True:
            argv.append(_flag(field.name))
        elif value is not None and value is not False:
            argv += [_flag(field.name), str(value)]  # str() of a float reads back as the same float
    return argv


def from_namespace(cls: type[Settings], namespace: argparse.Namespace) -> Settings:
    """The `cls` fields of a namespace parsed with more flags than `cls` has."""
    return cls(**{field.name: getattr(namespace, field.name) for field in dataclasses.fields(cls)})


def parse(cls: type[Settings], argv: Sequence[str] | None = None, description: str | None = None) -> Settings:
    """A worker's settings from its command line, as `command` wrote them."""
    parser = add_flags(argparse.ArgumentParser(description=description), cls)
    return from_namespace(cls, parser.parse_args(argv))


# ---------------------------------------------------------------------------------------------------------------------
# Starting workers and reading their results
# ---------------------------------------------------------------------------------------------------------------------


def command(python: str, program: str | os.PathLike[str], *parts: Any, module: bool = False) -> list[str]:
    """The argv that runs `program` in the interpreter `python`: a script path, or with `module` a `-m` module.

    Each of `parts` is a string (a subcommand, a flag of its own) or a settings dataclass, written out by `to_argv`.
    """
    argv = [python, "-m", str(program)] if module else [python, os.fspath(program)]
    for part in parts:
        argv += to_argv(part) if dataclasses.is_dataclass(part) else [str(part)]
    return argv


@dataclasses.dataclass
class Finished:
    """A worker that ran to its end: exit status, output, and its `emit_result` JSON (None when it printed none)."""

    command: list[str]
    returncode: int
    stdout: str
    stderr: str
    result: dict[str, Any] | None


def emit_result(result: dict[str, Any]) -> None:
    """Print the worker's result as the one line `spawn` looks for (other output around it does not matter)."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def read_result(stdout: str) -> dict[str, Any] | None:
    """The last `emit_result` line of a worker's output, parsed."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    return None


def spawn(argv: list[str], *, env: dict[str, str] | None = None, cwd: str | os.PathLike[str] | None = None) -> Finished:
    """Run a worker in a fresh process, its output captured, and parse its result."""
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    return Finished(argv, done.returncode, done.stdout, done.stderr, read_result(done.stdout))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now, for a server started next (another process could still take it first)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def read_jsonl(path: str | os.PathLike[str], columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The rows of a jsonl file (blank lines skipped), keeping only `columns` when given."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows.append(row if columns is None else {name: row[name] for name in columns})
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# The vs_trl.py workers: one job, two trainers
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class RunSettings:
    """The training job `vs_trl.py` gives TRL and protege alike, so both run the same settings."""

    steps: int = setting(20, "optimizer steps timed, after the warm-up")
    warmup: int = setting(2, "optimizer steps run first and not timed")
    batch: int = setting(2, "per_device_train_batch_size")
    grad_accum: int = setting(8, "gradient_accumulation_steps")
    max_completion_length: int = setting(32)
    max_length: int = setting(128)
    lmbda: float = setting(1.0, "fraction of on-policy slices")
    beta: float = setting(0.5, "generalized JSD interpolation")
    loss_top_k: int = setting(0, "0: the full vocabulary")
    temperature: float = setting(1.0)
    top_p: float = setting(0.95, "generation top_p")
    learning_rate: float = setting(1e-3)
    seed: int = setting(0)
    threads: int = setting(1, "torch threads (and OMP_NUM_THREADS); vs_trl.py's docstring says why 1")


@dataclasses.dataclass(kw_only=True)
class WorkerRun(RunSettings):
    """One worker process: the shared settings, the inputs `vs_trl.py` built, and where the Trainer may write."""

    student: str = setting(help="student model folder (also holds the tokenizer)")
    teacher: str = setting(help="teacher model folder")
    data: str = setting(help="jsonl file with a 'messages' column")
    output_dir: str | None = setting(None, "Trainer output_dir (nothing is saved; default: a temp folder)")


def trainer_config(run: WorkerRun, output_dir: str) -> dict[str, Any]:
    """`DistillationConfig` keyword arguments, the same for TRL and protege: CPU, float32, no activation checkpointing,
    `model.generate` (no vLLM), no eval, no saving, a log line every step."""
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=run.batch,
        gradient_accumulation_steps=run.grad_accum,
        max_steps=run.warmup + run.steps,
        learning_rate=run.learning_rate,
        max_length=run.max_length,
        max_completion_length=run.max_completion_length,
        lmbda=run.lmbda,
        beta=run.beta,
        loss_top_k=run.loss_top_k,
        temperature=run.temperature,
        top_p=run.top_p,
        seed=run.seed,
        use_cpu=True,
        bf16=False,
        fp16=False,
        activation_checkpointing=False,  # transformers 5.x name of gradient_checkpointing
        use_vllm=False,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def load_inputs(run: WorkerRun, torch: Any, datasets: Any, transformers: Any) -> tuple[Any, Any, Any, Any]:
    """Tokenizer, float32 student and teacher, and the `messages` of the data, loaded alike on both sides.

    The worker passes its own `torch`, `datasets` and `transformers` modules, so this file imports none of them. Sets
    the torch thread count first and turns off the datasets progress bars.
    """
    torch.set_num_threads(run.threads)
    datasets.disable_progress_bars()
    tokenizer = transformers.AutoTokenizer.from_pretrained(run.student)
    student = transformers.AutoModelForCausalLM.from_pretrained(run.student, dtype=torch.float32)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(run.teacher, dtype=torch.float32)
    return tokenizer, student, teacher, datasets.Dataset.from_list(read_jsonl(run.data, ["messages"]))


def counting_trainer(base: type) -> type:
    """`base` (a DistillationTrainer) that also counts, per optimizer step, the completion tokens it trains on.

    Counted in what `compute_loss` receives (`labels != -100`), so on-policy completions count at their generated
    length; `step_items` keeps the Trainer's `num_items_in_batch`. The loss itself is `base`'s.
    """

    class CountingTrainer(base):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.step_tokens: dict[int, int] = {}
            self.step_items: dict[int, float] = {}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                step = self.state.global_step + 1
                count = int((inputs["labels"] != -100).sum().item())
                self.step_tokens[step] = self.step_tokens.get(step, 0) + count
                if num_items_in_batch is not None:
                    self.step_items[step] = float(num_items_in_batch)
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

    return CountingTrainer


def step_timer(base: type) -> Any:
    """A `base` (TrainerCallback) recording `perf_counter` when each optimizer step begins and ends.

    `begin[k]` and `end[k]` are step k's (1-based); `end[0]` is the start of training, when the loop starts fetching
    step 1, so `end[k] - end[k - 1]` is the whole of step k, batch collation and generation included.
    """

    class StepTimer(base):
        def __init__(self) -> None:
            self.begin: dict[int, float] = {}
            self.end: dict[int, float] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.end[0] = time.perf_counter()

        def on_step_begin(self, args, state, control, **kwargs):
            self.begin[state.global_step + 1] = time.perf_counter()  # global_step counts the finished steps

        def on_step_end(self, args, state, control, **kwargs):
            self.end[state.global_step] = time.perf_counter()

    return StepTimer()


def build_trainer(
    run: WorkerRun, name: str, config_class: type, trainer_base: type, callback_base: type, **inputs: Any
) -> tuple[Any, Any, list[str]]:
    """A `counting_trainer(trainer_base)` set up by `trainer_config(run)`, with a `step_timer(callback_base)`.

    Returns the trainer, the timer and the warnings raised while building them: each is printed to stderr (prefixed
    with `name`) and goes into the result, so a setting one library ignores or changes shows up next to the numbers.
    """
    output_dir = run.output_dir or tempfile.mkdtemp(prefix=f"{name}_")
    timer = step_timer(callback_base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = config_class(**trainer_config(run, output_dir))
        trainer = counting_trainer(trainer_base)(args=config, callbacks=[timer], **inputs)
    messages = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    for message in messages:
        print(f"[{name}] setup warning: {message}", file=sys.stderr)
    return trainer, timer, messages


def train(trainer: Any) -> tuple[float, dict[int, dict[str, Any]]]:
    """Train; the wall seconds it took and, by step, the log entry of every step that logged a loss."""
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return seconds, {int(e["step"]): e for e in trainer.state.log_history if "loss" in e and "step" in e}


def result(
    run: WorkerRun, trainer: Any, logs: dict[int, dict[str, Any]], timed: list[int], seconds: float, torch: Any, **extra
) -> dict[str, Any]:
    """The result keys both workers report, then `extra`, each side's own (versions, timings, its loss scale).

    `logs` are `train`'s; `timed` are the timed steps and `seconds` their time, each side measuring as its docstring
    says; tokens are the completion tokens `counting_trainer` counted in those steps.
    """
    steps = range(1, run.warmup + run.steps + 1)
    logged = {step: float(entry["loss"]) for step, entry in logs.items()}
    tokens = sum(trainer.step_tokens.get(s, 0) for s in timed)
    return {
        "steps_timed": len(timed),
        "seconds": seconds,
        "completion_tokens": tokens,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "final_loss": logged.get(steps[-1]),
        "losses": [logged.get(s) for s in steps],
        "warmup_steps": run.warmup,
        "step_completion_tokens": [trainer.step_tokens.get(s) for s in steps],
        "num_items_in_batch": [trainer.step_items.get(s) for s in steps],
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "config": dataclasses.asdict(run),
        **extra,
    }
