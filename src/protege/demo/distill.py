"""The distillation run: the warmed-up student trained by protege's `DistillationTrainer` against the teacher, with
its held-out accuracy (greedy, and sampled when the settings ask) measured every few steps."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .encoder import Encoder
from .scoring import scores
from .settings import Settings, lr_multiplier
from .supervised import adamw


@dataclass
class Distilled:
    """The distilled student and what its run recorded."""

    student: Any
    curve: list[dict[str, float]]  # held-out accuracy (and `sampled` accuracy) by step, from the start at step 0
    losses: list[dict[str, float]]  # the trainer's logged loss by step
    step_seconds: dict[str, float]  # mean seconds per logged step in generation, the teacher and the student
    eval_seconds: float  # spent measuring the curve, so callers can leave it out of the training time
    completion_tokens: int
    teacher_completion_tokens: dict[str, int] = field(default_factory=dict)  # by teacher, when there are several


def distill(
    teacher,
    student,
    optimizer_state: dict[str, Any] | None,
    encoder: Encoder,
    settings: Settings,
    seed: int,
    train_problems: list[Any],
    eval_problems: list[Any],
    start: dict[str, float],
    output: Path,
    progress,
) -> Distilled:
    """Distillation with DistillationTrainer, continuing from `optimizer_state` (a fresh AdamW when None).

    With the demo's lmbda = 1 the dataset holds prompts only: the student writes every completion itself and the
    teacher scores each token, so no reference answer is used here (`settings.distill_overrides` may change lmbda
    and beta, as the gkd_table benchmark does). The student's warm-up optimizer carries on (same AdamW state, same
    constant learning rate), so the one thing that changes at step 0 is what the student learns from.
    `start` is the curve's step 0: `scoring.scores` of the student before, computed by the caller once.
    """
    args = _config(encoder.completion_length(train_problems[0]), settings, seed, output)
    # On-policy only (lmbda = 1): prompts alone, so no reference answer can leak in. Otherwise the reference answers
    # are the dataset completions that the off-policy slices train on.
    messages = encoder.task.prompt_messages if args.lmbda == 1.0 else encoder.task.conversation
    rows = [{"messages": messages(p)} for p in train_problems]

    def measure(model) -> dict[str, float]:
        return scores(model, encoder, eval_problems, settings.sample_eval, seed)

    tracker = Tracker(progress, settings, start, measure)
    return run_trainer(teacher, student, optimizer_state, encoder.tokenizer, settings, args, rows, tracker)


def run_trainer(
    teacher,
    student,
    optimizer_state: dict[str, Any] | None,
    tokenizer,
    settings: Settings,
    args,
    rows: list[dict[str, Any]],
    tracker: Tracker,
) -> Distilled:
    """`DistillationTrainer` on `rows` with `args`, the warm-up's optimizer carried on, `tracker` measuring the curve.

    `teacher` is one model, or a mapping of teacher names to models whose rows name theirs in `args.teacher_column`
    (the task mixture): the per-teacher completion tokens are then recorded too.
    """
    from datasets import Dataset
    from transformers import PrinterCallback

    from ..trainer import DistillationTrainer

    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        callbacks=[tracker.callback()],
        optimizers=_optimizers(student, optimizer_state, settings),
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    trainer.model.eval()
    names = sorted(teacher) if isinstance(teacher, dict) else []
    return Distilled(
        student=trainer.model,
        curve=tracker.curve,
        losses=[{"step": e["step"], "loss": e["loss"]} for e in logs],
        step_seconds={
            key.split("/")[1]: round(sum(e[key] for e in logs) / len(logs), 4)
            for key in ("time/generation_s", "time/teacher_s", "time/student_s")
            if logs and all(key in e for e in logs)
        },
        eval_seconds=tracker.eval_seconds,
        completion_tokens=round(sum(e.get("completion_tokens", 0) for e in logs)),
        teacher_completion_tokens={
            name: round(sum(e.get(f"teacher/{name}/completion_tokens", 0) for e in logs)) for name in names
        },
    )


def _config(max_completion: int, settings: Settings, seed: int, output: Path, **fields: Any):
    """The demo's `DistillationConfig` for completions of up to `max_completion` tokens: on-policy GKD over the full
    vocabulary, on the CPU; then `fields` (the task mixture's run folder, batch size and teacher column), then
    `distill_overrides`."""
    from ..config import DistillationConfig

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
    return DistillationConfig(**{**args, **fields, **settings.distill_overrides})


def _optimizers(student, optimizer_state: dict[str, Any] | None, settings: Settings):
    """The warm-up's AdamW carried on (its state loaded when given), with the distillation schedule."""
    optimizer = adamw(student, settings.student_sft)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(
            settings.distill_schedule, step, settings.distill_steps, settings.distill_warmup_steps
        ),
    )
    return optimizer, scheduler


def headline(point: dict[str, float]) -> str:
    """A curve point for the progress display: the sampled score when measured, as the table's headline, since greedy
    validity of a verifier task's student often starts at 100%."""
    return f"sampled {point['sampled']:.1%}" if "sampled" in point else f"acc {point['accuracy']:.1%}"


class Tracker:
    """The held-out score curve, measured by `measure(model)` every `settings.eval_every` steps and at the end, and
    the progress bar; `describe` shows a curve point there (the task mixture's have a score per task)."""

    def __init__(
        self,
        progress,
        settings: Settings,
        start: dict[str, Any],
        measure: Callable[[Any], dict[str, Any]],
        describe: Callable[[dict[str, Any]], str] = headline,
        description: str = "student: distillation",
    ):
        self.progress, self.settings, self.scores, self.describe = progress, settings, measure, describe
        self.curve = [{"step": 0, **start}]
        self.eval_seconds = 0.0
        self.loss: float | None = None  # the trainer's latest logged loss
        self.bar = progress.add_task(description, total=settings.distill_steps, info=self.info())

    def info(self) -> str:
        """The latest loss and score for the progress display."""
        return ("" if self.loss is None else f"loss {self.loss:.4f}  ") + self.describe(self.curve[-1])

    def callback(self):
        from transformers import TrainerCallback

        tracker = self

        class Track(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    tracker.loss = logs["loss"]
                    tracker.progress.update(tracker.bar, info=tracker.info())

            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step % tracker.settings.eval_every == 0 or state.global_step == state.max_steps:
                    tracker.measure(model, state.global_step)
                tracker.progress.update(tracker.bar, completed=state.global_step, info=tracker.info())

        return Track()

    def measure(self, model, step: int) -> None:
        started = time.perf_counter()
        point = self.scores(model)
        self.eval_seconds += time.perf_counter() - started
        self.curve.append({"step": step, **point})
