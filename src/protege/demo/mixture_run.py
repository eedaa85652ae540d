"""`protege demo --task mixture`: one student distilled from two specialist teachers in one run, with each row routed
to the teacher of its task, next to the same student distilled from each teacher alone at the same budget.

1. Each task (`mixture.PARTS`: addition and walks) gets its teacher exactly as its own demo trains it (same settings,
   data streams and cache fingerprint; cached in `output_dir/teacher_NAME/`), and its held-out set.
2. One student (the addition demo's shape, which both tasks fit in) is warmed up by SFT on rows of both tasks
   (`mixture.WARMUP_SHARES`), stopped as soon as it reaches `stop_at_accuracy` on every task's headline score
   (greedy accuracy on addition, sampled validity on walks), so it is partly right on both. Cached in
   `output_dir/student_warmup/` with its optimizer state.
3. Three on-policy runs start from that same student and optimizer state, with the same number of steps:
   - `mixture`: the two tasks' prompts interleaved, each row naming its teacher in the `teacher` column, both
     teachers in one `DistillationTrainer` (`teacher_model={"addition": ..., "walks": ...}`);
   - `addition` and `walks`: one teacher and its task's prompts alone, with the batch size that makes the run sample
     about as many completion tokens as the mixture's (a walk is 21 tokens, an addition chain 64), so each run costs
     about the same.
4. Every run's student is scored on both tasks after it, as before it (`Part.snapshot`); the table sets the
   mixture's gain on each task next to that task's own run's (`mixture_report.py`).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import mixture_report, report
from .distill import Distilled, Tracker, _config, run_trainer
from .encoder import Encoder
from .mixture import MIXTURE, WARMUP_SHARES, Mixture, Tagged
from .pipeline import Trained, quiet_libraries, trained_model
from .progress import make_console, progress_bars
from .scoring import Snapshot, generate, scores, snapshot
from .settings import MixtureSettings, Settings
from .task import load_tokenizer
from .tasks import Task, get_task

TEACHER_COLUMN = "teacher"
SCORE_WORDS = {"accuracy": "acc", "sampled": "sampled"}


@dataclass
class Part:
    """One task of the mixture: its problems, its trained teacher, and how it is scored."""

    name: str
    settings: Settings
    task: Task
    encoder: Encoder
    eval_problems: list[Any]
    validation: list[Any]
    teacher: Trained

    @property
    def headline(self) -> str:
        """The score the table leads with: sampled validity where measured (walks: greedy walks are all valid before
        any distillation), else greedy accuracy."""
        return "sampled" if self.settings.sample_eval else "accuracy"

    @property
    def completion_length(self) -> int:
        return self.encoder.completion_length(self.eval_problems[0])

    def scores(self, model, seed: int) -> dict[str, float]:
        return scores(model, self.encoder, self.eval_problems, self.settings.sample_eval, seed)

    def validate(self, model, seed: int) -> float:
        """The headline score on the validation problems: what the student's warm-up stops on."""
        sample = self.settings.sample_eval
        return generate(model, self.encoder, self.validation, sample=sample, seed=seed if sample else None).accuracy

    def describe(self, snap: Snapshot) -> str:
        """The headline score of a snapshot, for the progress display."""
        score = snap.sampled_accuracy if self.headline == "sampled" else snap.accuracy
        return f"{self.name} {SCORE_WORDS[self.headline]} {score:.1%}"

    def snapshot(self, model, seed: int) -> Snapshot:
        kl_problems = self.eval_problems[: self.settings.kl_problems]
        return snapshot(
            self.teacher.model, model, self.encoder, self.eval_problems, kl_problems, self.settings.sample_eval, seed
        )


def run_mixture(output_dir: str, quick: bool = False, seed: int = 0, settings: MixtureSettings | None = None) -> dict:
    """Run the mixture demo; return what results.json holds."""
    settings = settings or MixtureSettings.for_run(quick)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    console = make_console()
    started = time.perf_counter()
    with quiet_libraries(settings.student.threads):
        results = _stages(output, quick, seed, settings, console)
        mixture_report.draw_plot(console, results, output)
    results["timings_s"]["total"] = round(time.perf_counter() - started, 2)
    report.write_results(results, output)
    mixture_report.print_table(console, results, output)
    return results


def _stages(output: Path, quick: bool, seed: int, settings: MixtureSettings, console) -> dict[str, Any]:
    """Teachers, warm-up, scores before, the three runs with their scores after; the results, not yet written."""
    import torch

    console.print(
        f"[bold]protege demo --task mixture[/bold]: one student, {len(settings.parts)} teachers "
        f"({', '.join(settings.parts)}) ({'quick' if quick else 'full'} run, seed {seed}, output in {output})"
    )
    torch.manual_seed(seed)
    tokenizer = load_tokenizer()
    timings: dict[str, float] = {}
    with progress_bars(console) as progress:
        parts = {
            name: prepare_part(output, name, part, seed, tokenizer, progress) for name, part in settings.parts.items()
        }
        timings["teacher_training"] = sum(part.teacher.seconds for part in parts.values())
        student = warm_up(output, settings, seed, tokenizer, parts, progress)
        timings["student_warmup"] = student.seconds
        clock = time.perf_counter()
        evaluation = progress.add_task("scoring before", total=len(parts), info="")
        teachers, before = {}, {}
        for name, part in parts.items():
            teachers[name] = part.scores(part.teacher.model, seed)
            before[name] = part.snapshot(student.model, seed)
            progress.update(evaluation, advance=1, info=part.describe(before[name]))
        timings["evaluation"] = time.perf_counter() - clock
        mixture = distillation_mixture(parts, settings.student)
        batches = batch_sizes(mixture, parts, settings.student)
        runs = {}
        for run, batch in batches.items():
            clock = time.perf_counter()
            distilled = distill_run(
                run, batch, parts, student, before, tokenizer, settings.student, seed, output, progress
            )
            timings[f"distillation_{run}"] = time.perf_counter() - clock - distilled.eval_seconds
            clock = time.perf_counter()
            evaluation = progress.add_task(f"scoring after {run}", total=len(parts), info="")
            after = {}
            for name, part in parts.items():
                after[name] = part.snapshot(distilled.student, seed)
                progress.update(evaluation, advance=1, info=part.describe(after[name]))
            timings["evaluation"] += time.perf_counter() - clock + distilled.eval_seconds
            distilled.student.save_pretrained(output / f"student_{run}")
            tokenizer.save_pretrained(output / f"student_{run}")
            prompts = mixture.counts(settings.student.distill_steps * batch) if run == MIXTURE else None
            runs[run] = mixture_report.run_record(run, batch, settings.student, distilled, after, prompts)
    return mixture_report.results_record(
        "quick" if quick else "full", seed, settings, parts, student, teachers, before, runs, timings
    )


def prepare_part(output: Path, name: str, settings: Settings, seed: int, tokenizer, progress) -> Part:
    """The task's held-out set (written for `protege eval --task NAME`) and its teacher, trained on the same streams
    as the task's own demo (`pipeline.prepare`), so a seed's teacher is the same model in both."""
    task = get_task(name, settings.digits)
    encoder = Encoder(tokenizer, task)
    eval_problems = task.held_out_problems(settings.eval_problems, seed)
    with open(output / f"held_out_{name}.jsonl", "w") as handle:
        handle.writelines(json.dumps({"messages": task.conversation(p)}) + "\n" for p in eval_problems)
    validation = task.training_problems(settings.student_sft.validation_problems, seed, eval_problems, "validation")
    sft = settings.teacher_sft
    problems = task.training_problems(sft.steps * sft.batch_size, seed, eval_problems, "teacher")
    teacher = trained_model(
        "teacher",
        output / f"teacher_{name}",
        settings.teacher,
        sft,
        settings,
        seed,
        encoder,
        problems,
        validation,
        progress,
        f"teacher: {name}",
    )
    return Part(name, settings, task, encoder, eval_problems, validation, teacher)


def warm_up(output: Path, settings: MixtureSettings, seed: int, tokenizer, parts: dict[str, Part], progress) -> Trained:
    """The one student's SFT on both tasks' rows, stopped when its worst task's headline score on validation problems
    reaches `stop_at_accuracy`: partly right on every task, as the addition demo's student is on addition."""
    student = settings.student
    mixture = Mixture(parts, student.digits, shares=WARMUP_SHARES)
    held_out = [Tagged(name, p) for name, part in parts.items() for p in part.eval_problems]
    sft = student.student_sft
    problems = mixture.training_problems(sft.steps * sft.batch_size, seed, held_out, "student")

    def validate(model) -> float:
        return min(part.validate(model, seed) for part in parts.values())

    return trained_model(
        "student",
        output / "student_warmup",
        student.student,
        sft,
        student,
        seed,
        Encoder(tokenizer, mixture),
        problems,
        [],
        progress,
        "student: warm-up",
        validate=validate,
    )


def distillation_mixture(parts: dict[str, Part], settings: Settings) -> Mixture:
    """The mixture run's stream: each task's rows in inverse proportion to its completions' length (21 addition rows
    to 64 walks), so that each teacher grades about half of every step's sampled tokens. With as many rows of each,
    the addition teacher graded 3/4 of them, and the walks score gained 58% of what its own run gained (seed 0)."""
    lengths = {name: part.completion_length for name, part in parts.items()}
    product = math.prod(lengths.values())
    return Mixture(parts, settings.digits, shares={name: product // length for name, length in lengths.items()})


def batch_sizes(mixture: Mixture, parts: dict[str, Part], settings: Settings) -> dict[str, int]:
    """Each run's rows per step: the mixture's `distill_batch_size`, and for a task alone the batch whose reference
    completions hold as many tokens as the mixture's rows (its share of each task at their lengths), so that every
    run samples about the same number of tokens in the same number of steps (`mixture` holds the shares)."""
    counts = mixture.counts(settings.distill_steps * settings.distill_batch_size)
    tokens = sum(counts[name] * part.completion_length for name, part in parts.items())
    single = {name: round(tokens / (settings.distill_steps * part.completion_length)) for name, part in parts.items()}
    return {MIXTURE: settings.distill_batch_size, **single}


def mixture_rows(mixture: Mixture, parts: dict[str, Part], count: int, seed: int) -> list[Tagged]:
    """The mixture run's prompts: each task's share of its distillation stream, interleaved. Each task's share is the
    start of the stream its own run draws from, so the runs differ in how many prompts of a task they see, not in
    which."""
    held_out = [Tagged(name, p) for name, part in parts.items() for p in part.eval_problems]
    return mixture.training_problems(count, seed, held_out, "distill")


def distill_run(
    run: str,
    batch: int,
    parts: dict[str, Part],
    student: Trained,
    before: dict[str, Snapshot],
    tokenizer,
    settings: Settings,
    seed: int,
    output: Path,
    progress,
) -> Distilled:
    """One on-policy run from a copy of the warmed-up student and its optimizer state: `run` is `MIXTURE` (every
    task's prompts, each row routed to its task's teacher) or one task's name (its prompts and its teacher alone)."""
    count = settings.distill_steps * batch
    fields: dict[str, Any] = {"per_device_train_batch_size": batch}
    if run == MIXTURE:
        mixture = distillation_mixture(parts, settings)
        problems: list[Any] = mixture_rows(mixture, parts, count, seed)
        task: Task = mixture
        teacher: Any = {name: part.teacher.model for name, part in parts.items()}
        fields["teacher_column"] = TEACHER_COLUMN
        longest = max(part.completion_length for part in parts.values())
    else:
        part = parts[run]
        problems, task, teacher = (
            part.task.training_problems(count, seed, part.eval_problems, "distill"),
            part.task,
            part.teacher.model,
        )
        longest = part.completion_length
    args = _config(longest, settings, seed, output, output_dir=str(output / f"distillation_{run}"), **fields)
    messages = task.prompt_messages if args.lmbda == 1.0 else task.conversation
    rows = [{"messages": messages(p), **({TEACHER_COLUMN: p.task} if run == MIXTURE else {})} for p in problems]

    def measure(model) -> dict[str, Any]:
        return {name: part.scores(model, seed) for name, part in parts.items()}

    start = {name: _point(snap) for name, snap in before.items()}
    tracker = Tracker(progress, settings, start, measure, _describe(parts), f"distil: {run}")
    state = copy.deepcopy(student.optimizer_state)
    return run_trainer(teacher, copy.deepcopy(student.model), state, tokenizer, settings, args, rows, tracker)


def _point(snap: Snapshot) -> dict[str, float]:
    """A snapshot's scores as a curve point."""
    point = {"accuracy": snap.accuracy}
    if snap.sampled_accuracy is not None:
        point["sampled"] = snap.sampled_accuracy
    return point


def _describe(parts: dict[str, Part]):
    """The progress display of a curve point: each task's headline score."""

    def describe(point: dict[str, Any]) -> str:
        return " ".join(f"{name[:5]} {point[name][part.headline]:.0%}" for name, part in parts.items())

    return describe
