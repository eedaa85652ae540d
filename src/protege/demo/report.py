"""What a demo run tells: `results.json`, the accuracy plot `accuracy.png`, and the table printed at the end."""

from __future__ import annotations

import json
import platform
import textwrap
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .distill import Distilled
from .scoring import Generations, Snapshot
from .settings import Settings
from .tasks import get_task

if TYPE_CHECKING:
    from .pipeline import Prepared

RESULTS_FILE = "results.json"
PLOT_FILE = "accuracy.png"
HELD_OUT_FILE = "held_out.jsonl"  # the held-out set as a chat dataset, for `protege eval --task NAME`
TEACHER_FLOOR = 0.5  # a teacher scoring less has not learned its task


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def results_record(
    mode: str,
    seed: int,
    settings: Settings,
    prepared: Prepared,
    teacher_scores: dict[str, float],
    before: Snapshot,
    after: Snapshot,
    distilled: Distilled,
    distill_prompts: int,
    timings: dict[str, float],
) -> dict[str, Any]:
    """Everything `results.json` holds, in the order it is written. The `*_sampled_accuracy` keys (one sample per
    problem at temperature 1) are there when the settings ask for sampled scores."""
    task = prepared.task
    sampled = {}
    if before.sampled_accuracy is not None:
        sampled = {
            "teacher_sampled_accuracy": teacher_scores["sampled"],
            "student_sampled_accuracy_before": before.sampled_accuracy,
            "student_sampled_accuracy_after": after.sampled_accuracy,
        }
    return {
        "mode": mode,
        "seed": seed,
        "task": {
            "name": task.name,
            "description": task.description,
            "metric": task.metric,
            "example": task.conversation(prepared.eval_problems[0]),
            "held_out_problems": len(prepared.eval_problems),
            "kl_problems": len(prepared.kl_problems),
            "distillation_prompts": distill_prompts,
        },
        "models": {
            "teacher": {
                **asdict(settings.teacher),
                "parameters": parameters(prepared.teacher),
                **prepared.teacher_info,
            },
            "student": {
                **asdict(settings.student),
                "parameters": parameters(distilled.student),
                **prepared.student_info,
            },
        },
        "teacher_accuracy": teacher_scores["accuracy"],
        "student_accuracy_before": before.accuracy,
        "student_accuracy_after": after.accuracy,
        **sampled,
        "kl_teacher_student_before": before.kl_reference["teacher_student"],
        "kl_teacher_student_after": after.kl_reference["teacher_student"],
        "kl_student_teacher_before": before.kl_reference["student_teacher"],
        "kl_student_teacher_after": after.kl_reference["student_teacher"],
        "kl_on_own_chains": {"before": before.kl_own, "after": after.kl_own},
        "first_wrong_line": {
            "before": before.generations.first_wrong_lines(),
            "after": after.generations.first_wrong_lines(),
        },
        "accuracy_curve": distilled.curve,
        "distillation_loss": distilled.losses,
        "distillation_step_seconds": distilled.step_seconds,
        "distillation_completion_tokens": distilled.completion_tokens,
        "examples": fixed_examples(before.generations, after.generations),
        "settings": asdict(settings),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "environment": environment(settings.threads),
    }


def environment(threads: int) -> dict[str, Any]:
    """What the numbers depend on besides the seed: a run repeats exactly with the same of all these, while another
    torch, transformers or CPU kernel set (AVX2, AVX-512...) rounds differently and moves them."""
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }


def fixed_examples(before: Generations, after: Generations, count: int = 3) -> list[dict[str, Any]]:
    """Held-out problems the student got wrong before distillation and right after (greedy), earliest slip first."""
    task = before.task
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


def write_results(results: dict[str, Any], output: Path) -> None:
    (output / RESULTS_FILE).write_text(json.dumps(results, indent=2))


def metric(results: dict[str, Any]) -> str:
    """What the run's accuracy measures, in the task's words ("exact-match accuracy", "valid answers")."""
    return results.get("task", {}).get("metric", "exact-match accuracy")


def draw_plot(console, results: dict[str, Any], output: Path) -> None:
    """Write `accuracy_figure` to accuracy.png; matplotlib is optional, so only a notice without it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        console.print("[yellow]matplotlib is not installed, so there is no accuracy.png: pip install 'protege[plot]'")
        return
    accuracy_figure(results).savefig(output / PLOT_FILE)


def accuracy_figure(results: dict[str, Any]):
    """The student's accuracy curve (greedy, and sampled at temperature 1 when measured) against the teacher and the
    warm-up."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.2), dpi=120)
    FigureCanvasAgg(figure)  # the Agg backend for this figure only; pyplot's global state is left alone
    axes = figure.subplots()
    curve = results["accuracy_curve"]
    steps = [point["step"] for point in curve]
    # (curve key, label suffix, teacher's key, warm-up's key, line style, student marker, student colour): greedy and
    # sampled differ in marker and colour as well as dashes, which a legend's short handles barely show.
    lines = [("accuracy", "", "teacher_accuracy", "student_accuracy_before", "-", "o", "tab:blue")]
    if "sampled" in curve[0]:
        lines[0] = ("accuracy", ", greedy", *lines[0][2:])
        lines.append(
            ("sampled", ", sampled T=1", "teacher_sampled_accuracy", "student_sampled_accuracy_before")
            + ("--", "s", "tab:orange")
        )
    for key, label, teacher, start, style, marker, colour in lines:
        values = [100 * point[key] for point in curve]
        axes.plot(
            steps,
            values,
            style,
            marker=marker,
            markersize=4,
            color=colour,
            label=f"student (on-policy distillation){label}",
        )
        axes.axhline(100 * results[teacher], color="tab:green", linestyle=style, alpha=0.7, label=f"teacher{label}")
        axes.axhline(
            100 * results[start], color="tab:gray", linestyle=style, alpha=0.7, label=f"student after warm-up{label}"
        )
    axes.set_xlabel("distillation step")
    axes.set_ylabel(f"held-out {metric(results)} (%)")
    axes.set_ylim(-2, 102)  # points at 0% whole, not cut by the axis
    # Wrapped, since a task's description is wider than the figure (the walks task's was cut at both ends).
    axes.set_title(textwrap.fill(f"protege demo: {results['task']['description']}", width=90), fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(loc="best" if len(lines) > 1 else "lower right", fontsize=7, handlelength=3)
    figure.tight_layout()
    return figure


def print_examples(console, results: dict[str, Any]) -> None:
    """The first problem distillation fixed, before and after; its line number counts as results.json does."""
    from rich.table import Table

    if not results["examples"]:
        return
    example = results["examples"][0]
    line = example["first_wrong_line_before"]
    line_one = get_task(results.get("task", {}).get("name", "addition")).line_one
    console.print(
        f"\nheld-out problem {example['prompt']}: before distillation the student went wrong at line {line} "
        f"(lines count from 1, {line_one}, as in results.json)"
    )
    table = Table(show_header=True, box=None, padding=(0, 4))
    table.add_column("before", style="red")
    table.add_column("after", style="green")
    table.add_row(example["before"], example["after"])
    console.print(table)


def print_teacher_caveat(console, results: dict[str, Any]) -> None:
    """Say so when the teacher fails its task (the letters task's does, at any budget tried), so that a table of
    zeros is not read as distillation failing: there was nothing to distil."""
    if results["teacher_accuracy"] >= TEACHER_FLOOR:
        return
    name = results.get("task", {}).get("name", "addition")
    where = " (docs/benchmarks.md, design 1: no letters teacher learned it)" if name == "letters" else ""
    console.print(
        f"[yellow]the teacher scores {results['teacher_accuracy']:.1%} ({metric(results)}): it has not learned the "
        f"task{where}, so it has nothing to pass on and this run cannot show a gain"
    )


def print_table(console, results: dict[str, Any], output: Path) -> None:
    """Accuracy (greedy, and sampled when measured) and KLs before and after, the models' sizes, where the time went,
    one fixed example, and how to score the models again."""
    from rich.table import Table

    models = results["models"]
    table = Table(title=f"protege demo: on-policy distillation ({results['mode']} run, seed {results['seed']})")
    table.add_column("held-out problems")
    table.add_column("student before", justify="right")
    table.add_column("student after", justify="right")
    table.add_column("teacher", justify="right")
    sampled = "student_sampled_accuracy_before" in results
    rows = [("", "accuracy")] + ([(", sampled T=1", "sampled_accuracy")] if sampled else [])
    for suffix, key in rows:
        table.add_row(
            metric(results) + (", greedy" if sampled and not suffix else suffix),
            f"{results[f'student_{key}_before']:.1%}",
            f"[bold]{results[f'student_{key}_after']:.1%}[/bold]",
            f"{results[f'teacher_{key}']:.1%}",
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
    print_teacher_caveat(console, results)
    print_examples(console, results)
    console.print(f"\nwrote {output / RESULTS_FILE} and {output / PLOT_FILE}; score any model again with")
    console.print(
        f"  protege eval --model {output / 'student_distilled'} --teacher {output / 'teacher'} "
        f"--dataset_name {output / HELD_OUT_FILE} --task {results.get('task', {}).get('name', 'demo')}",
        soft_wrap=True,
    )
