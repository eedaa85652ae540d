"""`protege demo`: on-policy distillation working on a laptop CPU, end to end, in minutes. This file runs the stages in
order; each stage's work is in its own module, and the task's in its own (`tasks.py`: `addition`, the default,
described below, or `letters` and `walks`, whose differences `Settings.letters` and `Settings.walks` give).

1. A teacher learns the task (`task.py`: 6-digit addition worked column by column) by supervised training on
   reference chains (`supervised.py`), until it gets nearly every held-out problem right. Cached in
   `output_dir/teacher/` (`cache.py`).
2. A smaller student gets a short supervised warm-up on the same kind of data, stopped as soon as it solves 30% of
   a validation set, so it is partly right: it knows the format and most single steps, but one slip in a chain of 6
   columns is enough to get the answer wrong. Cached in `output_dir/student_warmup/` with its optimizer state.
3. The warmed-up student is distilled on-policy with `DistillationTrainer` (`distill.py`, lmbda=1): it writes its own
   chains from prompts alone, and the teacher grades every token of them. No reference completion is used from here
   on, so the gain comes from the teacher. The warm-up's optimizer carries on at the same constant learning rate, so
   the training signal is the only thing that changes at step 0 (no fresh-optimizer shock, no learning-rate decay).
4. Student accuracy (greedy decoding, exact match of the final answer on held-out problems; with
   `settings.sample_eval`, also one sample per problem at temperature 1) is measured every few steps; the KL
   divergences between teacher and student are measured before and after, on held-out reference chains and on the
   student's own chains (`scoring.py`).

Results go to `output_dir/results.json` and `output_dir/accuracy.png`, and a table is printed (`report.py`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import report
from .cache import keeps_optimizer, load_cached, model_fingerprint, save_cached
from .distill import distill
from .encoder import Encoder
from .mixture import MIXTURE
from .progress import make_console, progress_bars
from .scoring import generate, scores, snapshot
from .settings import MixtureSettings, ModelSpec, Settings, SFTSpec
from .supervised import supervised_training
from .task import load_tokenizer
from .tasks import Task, get_task


@dataclass
class Prepared:
    """The task's problem sets and the two trained models of one seed: where every method of the demo starts."""

    task: Task
    encoder: Encoder
    eval_problems: list[Any]
    kl_problems: list[Any]
    teacher: Any
    teacher_info: dict[str, Any]
    student: Any
    student_info: dict[str, Any]
    optimizer_state: dict[str, Any] | None  # the student warm-up's AdamW, which training continues
    timings: dict[str, float]

    def training_problems(self, settings: Settings, seed: int, count: int, stream: str) -> list[Any]:
        return self.task.training_problems(count, seed, exclude=self.eval_problems, stream=stream)


@dataclass
class Trained:
    """A model from `trained_model`, what its training recorded, and the seconds it took now (loading, if cached)."""

    model: Any
    info: dict[str, Any]
    optimizer_state: dict[str, Any] | None  # kept only for training that stops at an accuracy: the student's
    seconds: float


def run_demo(
    output_dir: str,
    quick: bool = False,
    seed: int = 0,
    settings: Settings | MixtureSettings | None = None,
    task: str = "addition",
) -> dict:
    """Run the demo (teacher, student warm-up, on-policy distillation, evaluation) on `task`, or on the task of
    `settings` when given; return what results.json holds. The task mixture (`MixtureSettings`) runs its own stages
    (`mixture_run.py`)."""
    if task == MIXTURE or isinstance(settings, MixtureSettings):
        from .mixture_run import run_mixture

        return run_mixture(output_dir, quick, seed, settings if isinstance(settings, MixtureSettings) else None)
    settings = settings or Settings.for_run(quick, task)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    console = make_console()
    started = time.perf_counter()
    with quiet_libraries(settings.threads):
        results = _run(output, quick, seed, settings, console)
        report.draw_plot(console, results, output)
    results["timings_s"]["total"] = round(time.perf_counter() - started, 2)
    report.write_results(results, output)
    report.print_table(console, results, output)
    return results


@contextmanager
def quiet_libraries(threads: int) -> Iterator[None]:
    """Quiet the libraries' bars and notices (protege's trainer's too) while the demo's stages run, on `threads` torch
    threads (one, whatever the machine: the results then depend on the seed, not on the core count); everything is
    put back afterwards."""
    import logging

    import datasets
    from transformers.utils import logging as transformers_logging

    previous_threads = torch.get_num_threads()
    verbosity = transformers_logging.get_verbosity()
    protege_logger = logging.getLogger("protege")
    protege_level = protege_logger.level
    protege_logger.setLevel(logging.WARNING)
    bars = transformers_logging.is_progress_bar_enabled(), datasets.is_progress_bar_enabled()
    torch.set_num_threads(threads)
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        protege_logger.setLevel(protege_level)
        transformers_logging.set_verbosity(verbosity)
        if bars[0]:
            transformers_logging.enable_progress_bar()
        if bars[1]:
            datasets.enable_progress_bars()


def prepare(output: Path, settings: Settings, seed: int, progress) -> Prepared:
    """Train (or load from `output`) the teacher and the warmed-up student of `seed`; write the held-out set."""
    torch.manual_seed(seed)
    task = get_task(settings.task, settings.digits)
    encoder = Encoder(load_tokenizer(), task)
    eval_problems = task.held_out_problems(settings.eval_problems, seed)
    output.mkdir(parents=True, exist_ok=True)
    with open(output / report.HELD_OUT_FILE, "w") as handle:
        handle.writelines(json.dumps({"messages": task.conversation(p)}) + "\n" for p in eval_problems)

    def train_set(count: int, stream: str) -> list[Any]:
        return task.training_problems(count, seed, exclude=eval_problems, stream=stream)

    validation = train_set(settings.student_sft.validation_problems, "validation")

    def trained(role: str, folder: str, spec: ModelSpec, sft: SFTSpec, description: str) -> Trained:
        problems = train_set(sft.steps * sft.batch_size, role)
        return trained_model(
            role, output / folder, spec, sft, settings, seed, encoder, problems, validation, progress, description
        )

    teacher = trained("teacher", "teacher", settings.teacher, settings.teacher_sft, "teacher: supervised")
    student = trained("student", "student_warmup", settings.student, settings.student_sft, "student: warm-up")
    return Prepared(
        task=task,
        encoder=encoder,
        eval_problems=eval_problems,
        kl_problems=eval_problems[: settings.kl_problems],
        teacher=teacher.model,
        teacher_info=teacher.info,
        student=student.model,
        student_info=student.info,
        optimizer_state=student.optimizer_state,
        timings={"teacher_training": teacher.seconds, "student_warmup": student.seconds},
    )


def trained_model(
    role: str,
    folder: Path,
    spec: ModelSpec,
    sft: SFTSpec,
    settings: Settings,
    seed: int,
    encoder: Encoder,
    problems: list[Any],
    validation: list[Any],
    progress,
    description: str,
    validate: Callable[[Any], float] | None = None,
) -> Trained:
    """Load the model from its cache folder, or train it with SFT and cache it.

    The optimizer state is kept only for a model trained to `stop_at_accuracy` (the student), whose training the
    distillation continues. `validate(model)` is the score that stop compares with it: by default greedy accuracy on
    `validation` (the task mixture's student passes its own, one score over the tasks).
    """
    started = time.perf_counter()
    fingerprint = model_fingerprint(role, spec, sft, settings, seed)
    cached = load_cached(folder, fingerprint)
    if cached is not None:
        progress.add_task(description, total=1, completed=1, info=f"cached ({folder.name}/)")
        info = {key: cached.info.get(key) for key in ("train_seconds", "steps", "validation_accuracy", "final_loss")}
        return Trained(cached.model, {**info, "cached": True}, cached.optimizer_state, time.perf_counter() - started)
    model = spec.build(encoder.tokenizer, seed=seed + (1 if role == "teacher" else 2))
    bar = progress.add_task(description, total=sft.steps, info="")
    checks: list[float] = []

    def on_step(loss: float) -> None:
        progress.update(bar, advance=1, info=f"loss {loss:.4f}" + (f"  val acc {checks[-1]:.0%}" if checks else ""))

    def stop() -> bool:
        checks.append(validate(model) if validate else generate(model, encoder, validation).accuracy)
        progress.update(bar, info=f"val acc {checks[-1]:.0%}")
        return checks[-1] >= sft.stop_at_accuracy

    losses, optimizer = supervised_training(model, encoder, problems, sft, on_step, stop)
    progress.update(bar, total=len(losses), completed=len(losses))
    state = optimizer.state_dict() if keeps_optimizer(fingerprint) else None
    seconds = time.perf_counter() - started
    info = {
        "cached": False,
        "train_seconds": round(seconds, 2),
        "steps": len(losses),
        "validation_accuracy": checks[-1] if checks else None,
        "final_loss": losses[-1],
    }
    save_cached(folder, model, encoder.tokenizer, fingerprint, info, state)
    return Trained(model, info, state, seconds)


def _run(output: Path, quick: bool, seed: int, settings: Settings, console) -> dict:
    """Prepare, score, distil and score again; the results are returned, not yet written."""
    console.print(
        f"[bold]protege demo[/bold]: {get_task(settings.task, settings.digits).description} "
        f"({'quick' if quick else 'full'} run, seed {seed}, output in {output})"
    )
    with progress_bars(console) as progress:
        prepared = prepare(output, settings, seed, progress)
        encoder, eval_problems, kl_problems = prepared.encoder, prepared.eval_problems, prepared.kl_problems
        teacher, timings = prepared.teacher, prepared.timings
        evaluation = progress.add_task("scoring before", total=2, info="")
        clock = time.perf_counter()
        teacher_scores = scores(teacher, encoder, eval_problems, settings.sample_eval, seed)
        teacher_accuracy = teacher_scores["accuracy"]
        progress.update(evaluation, advance=1)
        before = snapshot(teacher, prepared.student, encoder, eval_problems, kl_problems, settings.sample_eval, seed)
        progress.update(evaluation, advance=1, info=f"teacher {teacher_accuracy:.1%}, student {before.accuracy:.1%}")
        timings["evaluation"] = time.perf_counter() - clock

        clock = time.perf_counter()
        distill_problems = prepared.training_problems(
            settings, seed, settings.distill_steps * settings.distill_batch_size, "distill"
        )
        distilled = distill(
            teacher,
            prepared.student,
            prepared.optimizer_state,
            encoder,
            settings,
            seed,
            distill_problems,
            eval_problems,
            start_point(before),
            output,
            progress,
        )
        timings["distillation"] = time.perf_counter() - clock - distilled.eval_seconds
        timings["evaluation"] += distilled.eval_seconds

        clock = time.perf_counter()
        evaluation = progress.add_task("scoring after", total=1, info="")
        after = snapshot(teacher, distilled.student, encoder, eval_problems, kl_problems, settings.sample_eval, seed)
        progress.update(evaluation, advance=1, info=f"student {after.accuracy:.1%}")
        timings["evaluation"] += time.perf_counter() - clock
    distilled.student.save_pretrained(output / "student_distilled")
    encoder.tokenizer.save_pretrained(output / "student_distilled")
    return report.results_record(
        mode="quick" if quick else "full",
        seed=seed,
        settings=settings,
        prepared=prepared,
        teacher_scores=teacher_scores,
        before=before,
        after=after,
        distilled=distilled,
        distill_prompts=len(distill_problems),
        timings=timings,
    )


def start_point(before) -> dict[str, float]:
    """The accuracy curve's step 0 from the student's snapshot before distillation."""
    point = {"accuracy": before.accuracy}
    if before.sampled_accuracy is not None:
        point["sampled"] = before.sampled_accuracy
    return point
