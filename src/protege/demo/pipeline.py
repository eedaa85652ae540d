"""`protege demo`: on-policy distillation working on a laptop CPU, end to end, in minutes.

1. A teacher learns the task (`task.py`: 6-digit addition worked column by column) by supervised training on
   reference chains, until it gets nearly every held-out problem right. Cached in `output_dir/teacher/`.
2. A smaller student gets a short supervised warm-up on the same kind of data, stopped as soon as it solves 30% of
   a validation set, so it is partly right: it knows the format and most single steps, but one slip in a chain of 6
   columns is enough to get the answer wrong. Cached in `output_dir/student_warmup/` with its optimizer state.
3. The warmed-up student is distilled on-policy with `DistillationTrainer` (lmbda=1): it writes its own chains from
   prompts alone, and the teacher grades every token of them. No reference completion is used from here on, so the
   gain comes from the teacher. The warm-up's optimizer carries on at the same constant learning rate, so the
   training signal is the only thing that changes at step 0 (no fresh-optimizer shock, no learning-rate decay).
4. Student accuracy (greedy decoding, exact match of the final answer on held-out problems) is measured every few
   steps; the KL divergences between teacher and student are measured before and after, on held-out reference chains
   and on the student's own chains.

Results go to `output_dir/results.json` and `output_dir/accuracy.png`, and a table is printed.
"""

from __future__ import annotations

import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data import DistillationCollator, Tokenizer
from ..losses import IGNORE_INDEX, generalized_jsd_loss
from . import task

TASK_VERSION = 2  # bump when the task or its tokenizer changes, so old caches are not reused


@dataclass(frozen=True)
class ModelSpec:
    """A GPT-2 shaped causal LM. GPT-2's learned absolute positions suit this fixed-layout task: a model with
    rotary positions (Qwen2, Llama) needs several times more steps to learn which column to read."""

    layers: int
    hidden: int
    heads: int = 4
    positions: int = 128

    def build(self, tokenizer, seed: int):
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=self.positions,
            n_embd=self.hidden,
            n_layer=self.layers,
            n_head=self.heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        return model


@dataclass(frozen=True)
class SFTSpec:
    """Supervised training on reference chains: AdamW, a linear warm-up, then `schedule` over `steps`.

    With `stop_at_accuracy`, the learning rate stays constant after the warm-up, and training stops as soon as
    greedy accuracy on `validation_problems` (drawn apart from the held-out ones) reaches it, checked every
    `check_every` steps; `steps` is then the most it may take. That is how the student gets its partial accuracy:
    when a small model "gets" the task varies a lot from seed to seed, so a fixed number of steps would leave one
    seed's student at 10% and another's at 80%.
    """

    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int = 30
    adam_beta2: float = 0.999
    stop_at_accuracy: float | None = None
    check_every: int = 10
    validation_problems: int = 64
    schedule: str = "cosine"  # after the warm-up: "cosine" or "linear" decay to zero, or "constant"

    def lr_factor(self, step: int) -> float:
        schedule = "constant" if self.stop_at_accuracy is not None else self.schedule
        return lr_multiplier(schedule, step, self.steps, self.warmup_steps)


@dataclass(frozen=True)
class Settings:
    """Everything that shapes a run; `results.json` records it."""

    digits: int = task.DIGITS
    teacher: ModelSpec = ModelSpec(layers=1, hidden=128, heads=8)
    student: ModelSpec = ModelSpec(layers=1, hidden=64)
    teacher_sft: SFTSpec = SFTSpec(steps=700, batch_size=32, learning_rate=6e-3)
    student_sft: SFTSpec = SFTSpec(steps=600, batch_size=32, learning_rate=3e-3, stop_at_accuracy=0.3)
    distill_steps: int = 200  # at the student's warm-up learning rate, with its optimizer state
    distill_schedule: str = "constant"  # or "linear" / "cosine" decay to zero over distill_steps
    distill_warmup_steps: int = 0  # linear learning-rate warm-up (for a fresh optimizer)
    distill_batch_size: int = 64
    beta: float = 0.5  # generalized JSD between forward and reverse KL
    temperature: float = 1.0
    eval_every: int = 20
    eval_problems: int = 500
    kl_problems: int = 200
    threads: int = 1
    distill_overrides: dict[str, Any] = field(default_factory=dict)  # more DistillationConfig fields

    @classmethod
    def for_run(cls, quick: bool) -> Settings:
        if not quick:
            return cls()
        return cls(
            teacher_sft=SFTSpec(steps=400, batch_size=32, learning_rate=6e-3),
            distill_steps=100,
            eval_every=10,
            eval_problems=200,
            kl_problems=96,
        )


# ----- Data -----


class Encoder:
    """Problems to token ids with protege's own row tokenizer, so the demo's SFT sees what the trainer sees."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.rows = Tokenizer(tokenizer, None, None)
        self.collate = DistillationCollator(tokenizer.pad_token_id)

    def prompt_ids(self, problem: task.Problem) -> list[int]:
        return self.rows({"messages": task.prompt_messages(problem)}, 0, False)["prompt_ids"]

    def batch(self, problems: Sequence[task.Problem]) -> dict[str, torch.Tensor]:
        rows = [self.rows({"messages": task.conversation(p)}, i, True) for i, p in enumerate(problems)]
        return self.collate(rows)

    def completions_batch(self, problems: Sequence[task.Problem], completions: Sequence[list[int]]):
        rows = [{"prompt_ids": self.prompt_ids(p), "completion_ids": c} for p, c in zip(problems, completions)]
        return self.collate(rows)


def _forward(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits predicting each next token: position t scores token t+1."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    return model(**inputs).logits[:, :-1].float()


# ----- Supervised training (teacher, student warm-up) -----


def lr_multiplier(schedule: str, step: int, total: int, warmup_steps: int = 0) -> float:
    """Learning-rate multiplier at `step` of `total`: a linear warm-up over `warmup_steps`, then "constant", or
    "cosine" / "linear" decay to zero."""
    warm = min(1.0, (step + 1) / max(warmup_steps, 1))
    if schedule == "constant":
        return warm
    if schedule == "cosine":
        return warm * 0.5 * (1.0 + math.cos(math.pi * step / total))
    if schedule == "linear":
        return warm * (1.0 - step / total)
    raise ValueError(f"schedule={schedule!r} is not allowed: use 'constant', 'cosine' or 'linear'")


def adamw(model, spec: SFTSpec) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=spec.learning_rate, betas=(0.9, spec.adam_beta2), weight_decay=0.0)


def supervised_training(
    model,
    encoder: Encoder,
    problems: Sequence[task.Problem],
    spec: SFTSpec,
    on_step: Callable[[float], None],
    stop: Callable[[], bool] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    make_batch: Callable[[Sequence[task.Problem]], dict[str, torch.Tensor]] | None = None,
) -> tuple[list[float], torch.optim.Optimizer]:
    """Cross-entropy on the completion tokens only. Returns the losses and the optimizer.

    The completions are the reference chains unless `make_batch` builds the batch of a list of problems otherwise
    (sequence-level KD: the teacher's samples). `optimizer` continues an earlier run's (a fresh AdamW when None).
    `stop`, called every `spec.check_every` steps when `spec.stop_at_accuracy` is set, ends training when it says so.
    """
    optimizer = optimizer or adamw(model, spec)
    make_batch = make_batch or encoder.batch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, spec.lr_factor)
    model.train()
    losses = []
    for step in range(spec.steps):
        batch = make_batch(problems[step * spec.batch_size : (step + 1) * spec.batch_size])
        logits = _forward(model, batch)
        loss = F.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        on_step(losses[-1])
        if spec.stop_at_accuracy is not None and stop is not None and (step + 1) % spec.check_every == 0 and stop():
            break
    model.eval()
    return losses, optimizer


# ----- Evaluation -----


@dataclass
class Generations:
    problems: list[task.Problem]
    completion_ids: list[list[int]]
    texts: list[str]

    @property
    def accuracy(self) -> float:
        return sum(task.score(t, p) for t, p in zip(self.texts, self.problems)) / len(self.problems)

    def first_wrong_lines(self) -> dict[str, int]:
        """How many wrong answers first left the reference chain at each line (0 is the ones column)."""
        counts: dict[str, int] = {}
        for text, problem in zip(self.texts, self.problems):
            if not task.score(text, problem):
                line = str(task.first_wrong_line(text, problem))
                counts[line] = counts.get(line, 0) + 1
        return dict(sorted(counts.items()))


@torch.no_grad()
def generate(
    model, encoder: Encoder, problems: Sequence[task.Problem], batch_size: int = 256, sample: bool = False
) -> Generations:
    """Greedy completions (to EOS) for every problem; with `sample`, samples at temperature 1 instead."""
    tokenizer, eos = encoder.tokenizer, encoder.tokenizer.eos_token_id
    max_new = len(encoder.rows({"messages": task.conversation(problems[0])}, 0, True)["completion_ids"]) + 8
    was_training = model.training
    model.eval()
    completions = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        prompts = [encoder.prompt_ids(p) for p in chunk]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            do_sample=sample,
            top_k=0,
            top_p=1.0,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row in out[:, width:].tolist():
            completions.append(row[: row.index(eos) + 1] if eos in row else row)
    model.train(was_training)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    return Generations(list(problems), completions, texts)


def _problem_of_row(row: dict[str, Any], index: int) -> task.Problem:
    """The problem a dataset row asks: its `prompt` string, or the first user turn of `prompt` / `messages`."""
    prompt = row.get("prompt", row.get("messages"))
    if isinstance(prompt, list):
        prompt = next((turn.get("content") for turn in prompt if turn.get("role") == "user"), None)
    try:
        return task.parse_problem(prompt if isinstance(prompt, str) else "")
    except ValueError:
        raise ValueError(f"row {index}: not a demo-task prompt (want 'A+B' as the user turn): {prompt!r}") from None


def accuracy_on_rows(model, tokenizer, rows) -> float:
    """Greedy exact-match accuracy on dataset rows holding demo-task prompts (what `protege eval --task demo` shows)."""
    problems = [_problem_of_row(row, index) for index, row in enumerate(rows)]
    if not problems:
        raise ValueError("no rows to score")
    return generate(model, Encoder(tokenizer), problems).accuracy


@torch.no_grad()
def mean_token_kls(teacher, student, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean per-token KL(teacher || student) and KL(student || teacher) over the completion tokens of a batch."""
    labels = batch["labels"][:, 1:]
    teacher_logits, student_logits = _forward(teacher, batch), _forward(student, batch)
    return {
        name: generalized_jsd_loss(student_logits, teacher_logits, labels, beta).item()
        for name, beta in (("teacher_student", 0.0), ("student_teacher", 1.0))
    }


@dataclass
class Snapshot:
    """A student's held-out accuracy and its divergences from the teacher, at one point in time."""

    accuracy: float
    kl_reference: dict[str, float]  # on the held-out reference chains
    kl_own: dict[str, float]  # on the student's own greedy chains
    generations: Generations


def snapshot(teacher, student, encoder, eval_problems, kl_problems) -> Snapshot:
    generations = generate(student, encoder, eval_problems)
    reference = mean_token_kls(teacher, student, encoder.batch(kl_problems))
    own = generations.completion_ids[: len(kl_problems)]
    own_batch = encoder.completions_batch(generations.problems[: len(kl_problems)], own)
    return Snapshot(generations.accuracy, reference, mean_token_kls(teacher, student, own_batch), generations)


# ----- Caching -----


def _fingerprint(role: str, spec: ModelSpec, sft: SFTSpec, settings: Settings, seed: int) -> dict[str, Any]:
    return {
        "role": role,
        "task_version": TASK_VERSION,
        "digits": settings.digits,
        "model": asdict(spec),
        "sft": asdict(sft),
        "seed": seed,
    }


OPTIMIZER_FILE = "optimizer.pt"
HELD_OUT_FILE = "held_out.jsonl"


def _load_cached(folder: Path, fingerprint: dict[str, Any]):
    """(model, saved info, optimizer state or None) from a cache folder made with the same fingerprint, else Nones."""
    from transformers import GPT2LMHeadModel

    meta = folder / "demo.json"
    if not meta.exists():
        return None, None, None
    try:
        saved = json.loads(meta.read_text())
        if saved.get("fingerprint") != fingerprint:
            return None, None, None
        model = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32)
        state = torch.load(folder / OPTIMIZER_FILE) if (folder / OPTIMIZER_FILE).exists() else None
    except (OSError, ValueError, RuntimeError):
        return None, None, None
    model.eval()
    return model, saved, state


def _save_cached(folder: Path, model, tokenizer, fingerprint: dict[str, Any], info: dict[str, Any], state) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if state is not None:
        torch.save(state, folder / OPTIMIZER_FILE)
    (folder / "demo.json").write_text(json.dumps({"fingerprint": fingerprint, **info}, indent=2))


# ----- The run -----


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
    )


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def trained_model(
    role: str,
    folder: Path,
    spec: ModelSpec,
    sft: SFTSpec,
    settings: Settings,
    seed: int,
    encoder: Encoder,
    problems: list[task.Problem],
    validation: list[task.Problem],
    progress,
    description: str,
):
    """Load the model from its cache folder, or train it with SFT and cache it.

    Returns (model, info, optimizer state, seconds spent now). The optimizer state is kept only for a model trained
    to `stop_at_accuracy` (the student), whose training the distillation continues.
    """
    started = time.perf_counter()
    fingerprint = _fingerprint(role, spec, sft, settings, seed)
    model, saved, state = _load_cached(folder, fingerprint)
    if model is not None:
        progress.add_task(description, total=1, completed=1, info=f"cached in {folder}")
        info = {key: saved.get(key) for key in ("train_seconds", "steps", "validation_accuracy", "final_loss")}
        return model, {**info, "cached": True}, state, time.perf_counter() - started
    model = spec.build(encoder.tokenizer, seed=seed + (1 if role == "teacher" else 2))
    bar = progress.add_task(description, total=sft.steps, info="")
    checks: list[float] = []

    def on_step(loss: float) -> None:
        progress.update(bar, advance=1, info=f"loss {loss:.4f}" + (f"  val acc {checks[-1]:.0%}" if checks else ""))

    def stop() -> bool:
        checks.append(generate(model, encoder, validation).accuracy)
        progress.update(bar, info=f"val acc {checks[-1]:.0%}")
        return checks[-1] >= sft.stop_at_accuracy

    losses, optimizer = supervised_training(model, encoder, problems, sft, on_step, stop)
    progress.update(bar, total=len(losses), completed=len(losses))
    state = optimizer.state_dict() if sft.stop_at_accuracy is not None else None
    seconds = time.perf_counter() - started
    info = {
        "cached": False,
        "train_seconds": round(seconds, 2),
        "steps": len(losses),
        "validation_accuracy": checks[-1] if checks else None,
        "final_loss": losses[-1],
    }
    _save_cached(folder, model, encoder.tokenizer, fingerprint, info, state)
    return model, info, state, seconds


def distill(
    teacher,
    student,
    optimizer_state,
    encoder,
    settings,
    seed,
    train_problems,
    eval_problems,
    start_accuracy,
    output,
    progress,
):
    """Distillation with DistillationTrainer.

    Returns (student, accuracy curve, losses, seconds per step by phase, evaluation seconds, completion tokens).

    With the demo's lmbda = 1 the dataset holds prompts only: the student writes every completion itself and the
    teacher scores each token, so no reference answer is used here (`settings.distill_overrides` may change lmbda
    and beta, as benchmarks/gkd_table.py does). The student's warm-up optimizer carries on (same AdamW state, same
    constant learning rate), so the one thing that changes at step 0 is what the student learns from.
    """
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback

    from ..config import DistillationConfig
    from ..trainer import DistillationTrainer

    max_completion = len(encoder.rows({"messages": task.conversation(train_problems[0])}, 0, True)["completion_ids"])
    args = dict(
        output_dir=str(output / "distillation"),
        max_steps=settings.distill_steps,
        per_device_train_batch_size=settings.distill_batch_size,
        gradient_accumulation_steps=1,
        learning_rate=settings.student_sft.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        lmbda=1.0,
        beta=settings.beta,
        loss_top_k=0,
        temperature=settings.temperature,
        top_p=1.0,
        max_completion_length=max_completion + 8,
        max_length=max_completion + 8 + 32,
        logging_steps=5,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=seed,
        use_cpu=True,
        bf16=False,
        dataloader_num_workers=0,
    )
    args = DistillationConfig(**{**args, **settings.distill_overrides})
    # On-policy only (lmbda = 1): prompts alone, so no reference answer can leak in. Otherwise the reference chains
    # are the dataset completions that the off-policy slices train on.
    messages = task.prompt_messages if args.lmbda == 1.0 else task.conversation
    rows = Dataset.from_list([{"messages": messages(p)} for p in train_problems])
    curve = [{"step": 0, "accuracy": start_accuracy}]
    timer = {"eval_seconds": 0.0}
    bar = progress.add_task("student: on-policy distillation", total=settings.distill_steps, info="")

    class Track(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                progress.update(bar, info=f"loss {logs['loss']:.4f}  acc {curve[-1]['accuracy']:.1%}")

        def on_step_end(self, args, state, control, model=None, **kwargs):
            progress.update(bar, completed=state.global_step)
            if state.global_step % settings.eval_every == 0 or state.global_step == state.max_steps:
                started = time.perf_counter()
                accuracy = generate(model, encoder, eval_problems).accuracy
                timer["eval_seconds"] += time.perf_counter() - started
                curve.append({"step": state.global_step, "accuracy": accuracy})

    optimizer = adamw(student, settings.student_sft)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(
            settings.distill_schedule, step, settings.distill_steps, settings.distill_warmup_steps
        ),
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=rows,
        processing_class=encoder.tokenizer,
        callbacks=[Track()],
        optimizers=(optimizer, scheduler),
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    losses = [{"step": e["step"], "loss": e["loss"]} for e in logs]
    step_times = {
        key.split("/")[1]: round(sum(e[key] for e in logs) / len(logs), 4)
        for key in ("time/generation_s", "time/teacher_s", "time/student_s")
        if logs and all(key in e for e in logs)
    }
    tokens = sum(e.get("completion_tokens", 0) for e in logs)
    trainer.model.eval()
    return trainer.model, curve, losses, step_times, timer["eval_seconds"], round(tokens)


def run_demo(output_dir: str, quick: bool = False, seed: int = 0, settings: Settings | None = None) -> dict:
    """Run the demo (teacher, student warm-up, on-policy distillation, evaluation); return what results.json holds."""
    import datasets
    from rich.console import Console
    from transformers.utils import logging as transformers_logging

    settings = settings or Settings.for_run(quick)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    console = Console()
    # Quiet the libraries' own bars and notices while ours run; put everything back afterwards.
    threads = torch.get_num_threads()
    verbosity = transformers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    torch.set_num_threads(settings.threads)
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    started = time.perf_counter()
    try:
        results = _run(output, quick, seed, settings, console)
    finally:
        torch.set_num_threads(threads)
        transformers_logging.set_verbosity(verbosity)
        if bars[0]:
            transformers_logging.enable_progress_bar()
        if bars[1]:
            datasets.enable_progress_bars()
    results["timings_s"]["total"] = round(time.perf_counter() - started, 2)
    (output / "results.json").write_text(json.dumps(results, indent=2))
    _print_table(console, results, output)
    return results


@dataclass
class Prepared:
    """The task's problem sets and the two trained models of one seed: where every method of the demo starts."""

    encoder: Encoder
    eval_problems: list[task.Problem]
    kl_problems: list[task.Problem]
    teacher: Any
    teacher_info: dict[str, Any]
    student: Any
    student_info: dict[str, Any]
    optimizer_state: dict[str, Any] | None  # the student warm-up's AdamW, which training continues
    timings: dict[str, float]

    def training_problems(self, settings: Settings, seed: int, count: int, stream: str) -> list[task.Problem]:
        return task.training_problems(count, seed, exclude=self.eval_problems, digits=settings.digits, stream=stream)


def prepare(output: Path, settings: Settings, seed: int, progress) -> Prepared:
    """Train (or load from `output`) the teacher and the warmed-up student of `seed`; write the held-out set."""
    torch.manual_seed(seed)
    encoder = Encoder(task.load_tokenizer())
    eval_problems = task.held_out_problems(settings.eval_problems, seed, settings.digits)
    # The held-out set as a chat dataset, so `protege eval --task demo` can score any model on it.
    output.mkdir(parents=True, exist_ok=True)
    with open(output / HELD_OUT_FILE, "w") as handle:
        handle.writelines(json.dumps({"messages": task.conversation(p)}) + "\n" for p in eval_problems)
    prepared = Prepared(encoder, eval_problems, eval_problems[: settings.kl_problems], *[None] * 5, timings={})

    def train_set(count: int, stream: str) -> list[task.Problem]:
        return prepared.training_problems(settings, seed, count, stream)

    validation = train_set(settings.student_sft.validation_problems, "validation")
    for role, spec, sft, description in (
        ("teacher", settings.teacher, settings.teacher_sft, "teacher: supervised training"),
        ("student", settings.student, settings.student_sft, "student: short supervised warm-up"),
    ):
        folder = output / ("teacher" if role == "teacher" else "student_warmup")
        problems = train_set(sft.steps * sft.batch_size, role)
        model, info, state, seconds = trained_model(
            role, folder, spec, sft, settings, seed, encoder, problems, validation, progress, description
        )
        if role == "teacher":
            prepared.teacher, prepared.teacher_info = model, info
            prepared.timings["teacher_training"] = seconds
        else:
            prepared.student, prepared.student_info, prepared.optimizer_state = model, info, state
            prepared.timings["student_warmup"] = seconds
    return prepared


def _run(output: Path, quick: bool, seed: int, settings: Settings, console) -> dict:
    console.print(
        f"[bold]protege demo[/bold]: {settings.digits}-digit addition worked column by column "
        f"({'quick' if quick else 'full'} run, seed {seed}, output in {output})"
    )
    with _progress() as progress:
        prepared = prepare(output, settings, seed, progress)
        encoder, eval_problems, kl_problems = prepared.encoder, prepared.eval_problems, prepared.kl_problems
        teacher, student, timings = prepared.teacher, prepared.student, prepared.timings
        tokenizer = encoder.tokenizer
        evaluation = progress.add_task("evaluating teacher and student", total=2, info="")
        clock = time.perf_counter()
        teacher_accuracy = generate(teacher, encoder, eval_problems).accuracy
        progress.update(evaluation, advance=1)
        before = snapshot(teacher, student, encoder, eval_problems, kl_problems)
        progress.update(evaluation, advance=1, info=f"teacher {teacher_accuracy:.1%}, student {before.accuracy:.1%}")
        timings["evaluation"] = time.perf_counter() - clock

        clock = time.perf_counter()
        distill_problems = prepared.training_problems(
            settings, seed, settings.distill_steps * settings.distill_batch_size, "distill"
        )
        student, curve, losses, step_times, curve_seconds, tokens = distill(
            teacher,
            student,
            prepared.optimizer_state,
            encoder,
            settings,
            seed,
            distill_problems,
            eval_problems,
            before.accuracy,
            output,
            progress,
        )
        timings["distillation"] = time.perf_counter() - clock - curve_seconds
        timings["evaluation"] += curve_seconds

        clock = time.perf_counter()
        after = snapshot(teacher, student, encoder, eval_problems, kl_problems)
        timings["evaluation"] += time.perf_counter() - clock
    student.save_pretrained(output / "student_distilled")
    tokenizer.save_pretrained(output / "student_distilled")

    results = {
        "mode": "quick" if quick else "full",
        "seed": seed,
        "task": {
            "description": f"{settings.digits}-digit addition worked column by column, then the answer",
            "example": task.conversation(eval_problems[0]),
            "held_out_problems": len(eval_problems),
            "kl_problems": len(kl_problems),
            "distillation_prompts": len(distill_problems),
        },
        "models": {
            "teacher": {**asdict(settings.teacher), "parameters": _params(teacher), **prepared.teacher_info},
            "student": {**asdict(settings.student), "parameters": _params(student), **prepared.student_info},
        },
        "teacher_accuracy": teacher_accuracy,
        "student_accuracy_before": before.accuracy,
        "student_accuracy_after": after.accuracy,
        "kl_teacher_student_before": before.kl_reference["teacher_student"],
        "kl_teacher_student_after": after.kl_reference["teacher_student"],
        "kl_student_teacher_before": before.kl_reference["student_teacher"],
        "kl_student_teacher_after": after.kl_reference["student_teacher"],
        "kl_on_own_chains": {"before": before.kl_own, "after": after.kl_own},
        "first_wrong_line": {
            "before": before.generations.first_wrong_lines(),
            "after": after.generations.first_wrong_lines(),
        },
        "accuracy_curve": curve,
        "distillation_loss": losses,
        "distillation_step_seconds": step_times,
        "distillation_completion_tokens": tokens,
        "examples": _examples(before.generations, after.generations),
        "settings": asdict(settings),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "environment": {
            "torch": torch.__version__,
            "threads": settings.threads,
            "python": platform.python_version(),
        },
    }
    try:
        _plot(results, output / "accuracy.png")
    except ImportError:
        console.print("[yellow]matplotlib is not installed, so there is no accuracy.png: pip install 'protege[plot]'")
    return results


def _examples(before: Generations, after: Generations, count: int = 3) -> list[dict[str, Any]]:
    """Held-out problems the student got wrong before distillation and right after, earliest slip first."""
    fixed = [
        {
            "prompt": task.prompt_messages(problem)[0]["content"],
            "before": old,
            "after": new,
            "first_wrong_line_before": task.first_wrong_line(old, problem),
        }
        for problem, old, new in zip(before.problems, before.texts, after.texts)
        if task.score(old, problem) == 0 and task.score(new, problem) == 1
    ]
    return sorted(fixed, key=lambda example: example["first_wrong_line_before"])[:count]


def _plot(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.2), dpi=120)
    FigureCanvasAgg(figure)  # the Agg backend for this figure only; pyplot's global state is left alone
    axes = figure.subplots()
    steps = [point["step"] for point in results["accuracy_curve"]]
    accuracy = [100 * point["accuracy"] for point in results["accuracy_curve"]]
    axes.plot(steps, accuracy, marker="o", color="tab:blue", label="student (on-policy distillation)")
    axes.axhline(100 * results["teacher_accuracy"], color="tab:green", linestyle="--", label="teacher")
    axes.axhline(
        100 * results["student_accuracy_before"], color="tab:gray", linestyle=":", label="student after warm-up"
    )
    axes.set_xlabel("distillation step")
    axes.set_ylabel("held-out exact-match accuracy (%)")
    axes.set_ylim(0, 102)
    axes.set_title(f"protege demo: {results['task']['description']}", fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def _print_table(console, results: dict, output: Path) -> None:
    from rich.table import Table

    models = results["models"]
    table = Table(title=f"protege demo: on-policy distillation ({results['mode']} run, seed {results['seed']})")
    table.add_column("held-out problems")
    table.add_column("student before", justify="right")
    table.add_column("student after", justify="right")
    table.add_column("teacher", justify="right")
    table.add_row(
        "exact-match accuracy",
        f"{results['student_accuracy_before']:.1%}",
        f"[bold]{results['student_accuracy_after']:.1%}[/bold]",
        f"{results['teacher_accuracy']:.1%}",
    )
    for key, label in (("teacher_student", "KL(teacher || student)"), ("student_teacher", "KL(student || teacher)")):
        table.add_row(
            f"{label} per token",
            f"{results[f'kl_{key}_before']:.4f}",
            f"{results[f'kl_{key}_after']:.4f}",
            "",
        )
    console.print(table)
    student = models["student"]
    warmup = f"{student['steps']} steps" if student.get("steps") else "cached"
    console.print(
        f"teacher: {models['teacher']['parameters']:,} parameters; student: {student['parameters']:,} parameters, "
        f"warmed up for {warmup}, then distilled for {results['settings']['distill_steps']} steps on "
        f"{results['task']['distillation_prompts']:,} prompts (no reference answers)"
    )
    cached = [name for name in ("teacher", "student") if models[name]["cached"]]
    console.print(
        "time: "
        + ", ".join(f"{k.replace('_', ' ')} {v:.0f}s" for k, v in results["timings_s"].items())
        + (f" ({' and '.join(cached)} from the cache)" if cached else "")
    )
    if results["examples"]:
        example = results["examples"][0]
        line = example["first_wrong_line_before"]
        console.print(
            f"\nheld-out problem {example['prompt']}: before distillation the student went wrong at line {line + 1}"
        )
        table = Table(show_header=True, box=None, padding=(0, 4))
        table.add_column("before", style="red")
        table.add_column("after", style="green")
        table.add_row(example["before"], example["after"])
        console.print(table)
    console.print(f"\nwrote {output / 'results.json'} and {output / 'accuracy.png'}; score any model again with")
    console.print(
        f"  protege eval --model {output / 'student_distilled'} --teacher {output / 'teacher'} "
        f"--dataset_name {output / HELD_OUT_FILE} --task demo",
        soft_wrap=True,
    )


__all__ = ["ModelSpec", "SFTSpec", "Settings", "accuracy_on_rows", "run_demo"]
