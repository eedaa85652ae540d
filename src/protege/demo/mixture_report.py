"""What `protege demo --task mixture` tells: `results.json`, the plot `accuracy.png` (each task's headline score along
each run) and the table printed at the end, where each task's gain under the mixture stands next to its gain when
its teacher is distilled from alone."""

from __future__ import annotations

import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .distill import Distilled
from .mixture import MIXTURE, Mixture
from .report import PLOT_FILE, RESULTS_FILE, environment, parameters
from .scoring import Snapshot
from .settings import MixtureSettings, Settings

if TYPE_CHECKING:
    from .mixture_run import Part
    from .pipeline import Trained

SCORE_NAMES = {"accuracy": "greedy", "sampled": "sampled T=1"}


def snapshot_record(snap: Snapshot) -> dict[str, Any]:
    """A student's scores on one task and its per-token KLs from that task's teacher (on the reference answers)."""
    record = {"accuracy": snap.accuracy}
    if snap.sampled_accuracy is not None:
        record["sampled"] = snap.sampled_accuracy
    return {
        **record,
        "kl_teacher_student": snap.kl_reference["teacher_student"],
        "kl_student_teacher": snap.kl_reference["student_teacher"],
    }


def run_record(
    run: str,
    batch: int,
    settings: Settings,
    distilled: Distilled,
    after: dict[str, Snapshot],
    prompts: dict[str, int] | None,
) -> dict[str, Any]:
    """One distillation run: its budget (steps, prompts by task, given for the mixture, sampled completion tokens by
    teacher), its student's scores on every task after it, its curve and loss."""
    per_task = prompts or {run: settings.distill_steps * batch}
    return {
        "teachers": list(per_task),
        "steps": settings.distill_steps,
        "batch_size": batch,
        "prompts": per_task,
        "completion_tokens": distilled.completion_tokens,
        "teacher_completion_tokens": distilled.teacher_completion_tokens or {run: distilled.completion_tokens},
        "after": {name: snapshot_record(snap) for name, snap in after.items()},
        "curve": distilled.curve,
        "loss": distilled.losses,
        "step_seconds": distilled.step_seconds,
    }


def results_record(
    mode: str,
    seed: int,
    settings: MixtureSettings,
    parts: dict[str, Part],
    student: Trained,
    teachers: dict[str, dict[str, float]],
    before: dict[str, Snapshot],
    runs: dict[str, dict[str, Any]],
    timings: dict[str, float],
) -> dict[str, Any]:
    """Everything results.json holds. `gains`: each task's headline score after each run minus before;
    `mixture_gain_ratio`: the mixture's gain on a task over that task's own run's (None when the latter is not
    positive)."""
    start = {name: snapshot_record(snap) for name, snap in before.items()}
    gains = {
        name: {run: record["after"][name][part.headline] - start[name][part.headline] for run, record in runs.items()}
        for name, part in parts.items()
    }
    ratios = {name: gain[MIXTURE] / gain[name] if gain[name] > 0 else None for name, gain in gains.items()}
    return {
        "mode": mode,
        "seed": seed,
        "task": {
            "name": MIXTURE,
            "description": Mixture(parts).description,
            "parts": {
                name: {
                    "description": part.task.description,
                    "metric": part.task.metric,
                    "headline": part.headline,
                    "held_out_problems": len(part.eval_problems),
                    "example": part.task.conversation(part.eval_problems[0]),
                }
                for name, part in parts.items()
            },
        },
        "models": {
            "teachers": {
                name: {
                    **asdict(part.settings.teacher),
                    "parameters": parameters(part.teacher.model),
                    **part.teacher.info,
                }
                for name, part in parts.items()
            },
            "student": {**asdict(settings.student.student), "parameters": parameters(student.model), **student.info},
        },
        "teachers": teachers,
        "before": start,
        "runs": runs,
        "gains": gains,
        "mixture_gain_ratio": ratios,
        "settings": asdict(settings),
        "timings_s": {key: round(value, 2) for key, value in timings.items()},
        "environment": environment(settings.student.threads),
    }


def run_label(run: str) -> str:
    return "mixture (both teachers)" if run == MIXTURE else f"{run} teacher alone"


def print_table(console, results: dict[str, Any], output: Path) -> None:
    """Each task's scores before, after each run and of its teacher; the share of each task's gain the mixture keeps;
    the runs' budgets; where the time went; how to score the models again."""
    from rich.table import Table

    runs, parts = results["runs"], results["task"]["parts"]
    table = Table(
        title=f"protege demo --task mixture: one student, two teachers ({results['mode']} run, seed {results['seed']})"
    )
    table.add_column("held-out problems")
    table.add_column("student before", justify="right")
    for run in runs:
        table.add_column(run_label(run), justify="right")
    table.add_column("teacher", justify="right")
    for name, part in parts.items():
        keys = ["sampled", "accuracy"] if part["headline"] == "sampled" else ["accuracy"]
        for key in keys:
            cells = [f"{record['after'][name][key]:.1%}" for record in runs.values()]
            cells = [f"[bold]{cell}[/bold]" if run in (MIXTURE, name) else cell for run, cell in zip(runs, cells)]
            label = f"{name}, {SCORE_NAMES[key]}"
            table.add_row(label, f"{results['before'][name][key]:.1%}", *cells, f"{results['teachers'][name][key]:.1%}")
    console.print(table)
    console.print("scores: " + "; ".join(f"{name}: {part['metric']}" for name, part in parts.items()))
    for line in summary_lines(results):
        console.print(line, soft_wrap=True)
    console.print(f"\nwrote {output / RESULTS_FILE} and {output / PLOT_FILE}; score a student again with")
    name = next(iter(parts))
    console.print(
        f"  protege eval --model {output / 'student_mixture'} --teacher {output / f'teacher_{name}'} "
        f"--dataset_name {output / f'held_out_{name}.jsonl'} --task {name}",
        soft_wrap=True,
    )


def summary_lines(results: dict[str, Any]) -> list[str]:
    """The gains kept by the mixture, the runs' budgets and the time, one line each."""
    runs, parts, gains = results["runs"], results["task"]["parts"], results["gains"]
    kept = []
    for name, part in parts.items():
        ratio = results["mixture_gain_ratio"][name]
        share = "n/a: its own run did not gain" if ratio is None else f"{ratio:.0%}"
        kept.append(
            f"{name} ({SCORE_NAMES[part['headline']]}) {100 * gains[name][MIXTURE]:+.1f} points against "
            f"{100 * gains[name][name]:+.1f} alone ({share})"
        )
    budget = [
        f"{run} {record['batch_size']} prompts/step ({record['completion_tokens']:,} completion tokens)"
        for run, record in runs.items()
    ]
    first = next(iter(runs.values()))
    student = results["models"]["student"]
    warmup = f"warmed up for {student['steps']} steps" if student.get("steps") else "warm-up cached"
    return [
        "gain kept by the mixture: " + "; ".join(kept),
        f"each run {first['steps']} steps from the same student ({student['parameters']:,} parameters, {warmup}): "
        + ", ".join(budget),
        "time: " + ", ".join(f"{key.replace('_', ' ')} {value:.0f}s" for key, value in results["timings_s"].items()),
    ]


def draw_plot(console, results: dict[str, Any], output: Path) -> None:
    """accuracy.png: each task's headline score along each run; matplotlib is optional, so only a notice without."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        console.print("[yellow]matplotlib is not installed, so there is no accuracy.png: pip install 'protege[plot]'")
        return
    figure_of(results).savefig(output / PLOT_FILE)


def figure_of(results: dict[str, Any]):
    """One panel per task: the headline score of the student of each run by step, the teacher's as a line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    parts = results["task"]["parts"]
    figure = Figure(figsize=(5 * len(parts), 4), dpi=110)
    FigureCanvasAgg(figure)  # the Agg backend for this figure only; pyplot's global state is left alone
    for axes, (name, part) in zip(figure.subplots(1, len(parts), squeeze=False)[0], parts.items()):
        key = part["headline"]
        for run, record in results["runs"].items():
            steps = [point["step"] for point in record["curve"]]
            values = [100 * point[name][key] for point in record["curve"]]
            axes.plot(steps, values, "-" if run == MIXTURE else "--", marker="o", markersize=4, label=run_label(run))
        axes.axhline(100 * results["teachers"][name][key], color="black", linestyle=":", alpha=0.7, label="teacher")
        axes.set_title(textwrap.fill(f"{name}: {part['metric']}, {SCORE_NAMES[key]}", width=60), fontsize=9)
        axes.set_xlabel("distillation step")
        axes.set_ylabel("held-out score (%)")
        axes.set_ylim(-2, 102)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    figure.tight_layout()
    return figure
