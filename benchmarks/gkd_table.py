"""The GKD paper's comparison of distillation methods, reproduced on protege's demo tasks on a laptop CPU.

Every method starts from the same warmed-up student of a seed (the demo's: on `--task addition`, a short supervised
warm-up stopped at 30% validation accuracy; on `--task letters` and `--task walks`, SFT to the end of its schedule),
trains for the same number of steps on the same prompts at the same batch size with the same optimizer and
learning-rate schedule, and is scored on the same held-out problems by the task's verifier: greedy decoding (exact
match of the answer on addition), and on letters and walks also one sample per problem at temperature 1:

* supervised fine-tuning on the reference chains (ground truth), continued;
* sequence-level KD: fine-tuning on completions the teacher samples (temperature 1) for the same prompts;
* supervised KD: `DistillationTrainer` with lmbda 0 (dataset completions only), forward KL, JSD(0.5), reverse KL;
* on-policy GKD: lmbda 1 (the student's own samples only), forward KL, JSD(0.5), reverse KL;
* mixed: lmbda 0.5 with JSD(0.5).

Optimizer: a fresh AdamW per method at the warm-up's learning rate, warmed up over 10 steps, then decayed linearly to
zero (`--optimizer`, `--warmup-steps`, `--schedule`), so each final model has settled and its end-point accuracy is
not one noisy sample of a still-bouncing run. A fresh AdamW matters when divergences are compared: its per-parameter
normalisation makes the update independent of the loss's scale, while the warm-up's AdamW state (`--optimizer
continue`, what the demo does) remembers the size of cross-entropy gradients, so a divergence with smaller gradients
(JSD) takes smaller steps and one with larger gradients (reverse KL) larger ones, for hundreds of steps.

Each seed has its own teacher, warmed-up student, held-out set and prompt stream (`protege.demo.pipeline.prepare`,
cached under `--output-dir`), and its teacher and warmed-up student are scored once, when they are prepared. Runs go
in fresh subprocesses of this script, `--jobs` at a time, 1 torch thread each.

    python benchmarks/gkd_table.py --seeds 0 1 2 3 4  # 5 seeds x 9 methods, ~20 minutes on 2 cores
    python benchmarks/gkd_table.py --quick            # smoke run: 1 seed, 3 methods, tiny budgets
    python benchmarks/gkd_table.py --task letters --seeds 0 1 2 3 4 --prepare-only  # the protocol's gates
    python benchmarks/gkd_table.py --task letters --seeds 0 1 2 3 4  # the protocol's comparison (docs/benchmarks.md)
    python benchmarks/gkd_table.py --task walks --seeds 0 1 2 3 4    # design 2's, the same way

On letters and walks the summary also says whether the protocol's success criterion holds (`criterion`): the best
on-policy method's mean gain over the warmed-up student at least 1.5x the best supervised-KD method's, and the
difference more than twice the larger of the two methods' standard deviations over seeds; sampled validity is the
primary metric.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

from protege.demo.tasks import TASK_NAMES  # light: no torch

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Method:
    label: str
    short: str  # for the chart
    kind: str  # "sft", "seqkd" or "distill" (DistillationTrainer)
    lmbda: float | None = None
    beta: float | None = None


METHODS = {
    "sft": Method("Supervised FT (ground truth)", "SFT", "sft"),
    "seqkd": Method("SeqKD (teacher samples)", "SeqKD", "seqkd"),
    "supervised_fkl": Method("Supervised KD, forward KL", "sup. KD\nFKL", "distill", 0.0, 0.0),
    "supervised_jsd": Method("Supervised KD, JSD(0.5)", "sup. KD\nJSD", "distill", 0.0, 0.5),
    "supervised_rkl": Method("Supervised KD, reverse KL", "sup. KD\nRKL", "distill", 0.0, 1.0),
    "onpolicy_fkl": Method("On-policy GKD, forward KL", "on-policy\nFKL", "distill", 1.0, 0.0),
    "onpolicy_jsd": Method("On-policy GKD, JSD(0.5)", "on-policy\nJSD", "distill", 1.0, 0.5),
    "onpolicy_rkl": Method("On-policy GKD, reverse KL", "on-policy\nRKL", "distill", 1.0, 1.0),
    "mixed_jsd": Method("Mixed GKD (lmbda 0.5), JSD(0.5)", "mixed 0.5\nJSD", "distill", 0.5, 0.5),
}
QUICK_METHODS = ["sft", "supervised_fkl", "onpolicy_fkl"]
# Per task: the steps per method and the evaluation interval when --steps and --eval-every are not given.
BUDGETS = {"addition": (60, 10), "letters": (200, 20), "walks": (200, 20)}


class Metric(NamedTuple):
    """Where one score lives in a run's result and in the summary's rows (keyed by its name in the curve points)."""

    final: str  # the method's score at the end of the budget
    start: str  # the warmed-up student's
    teacher: str  # the teacher's
    prefix: str  # of the summary row's keys
    label: str


# "sampled" is there when the task's settings ask for sampled scores (letters).
METRICS = {
    "accuracy": Metric("accuracy", "start_accuracy", "teacher_accuracy", "", "greedy"),
    "sampled": Metric(
        "sampled_accuracy", "start_sampled_accuracy", "teacher_sampled_accuracy", "sampled_", "sampled, T=1"
    ),
}


def settings_for(args):
    from protege.demo.settings import Settings

    task = getattr(args, "task", "addition")
    base = Settings.for_run(False, task)
    if args.quick:  # a smoke run of the plumbing, not of the numbers
        teacher, student = (300, base.student_sft.steps) if task == "addition" else (100, 50)
        base = replace(
            base,
            teacher_sft=replace(base.teacher_sft, steps=teacher),
            student_sft=replace(base.student_sft, steps=student),
        )
    settings = replace(
        base,
        digits=args.digits,
        distill_steps=args.steps,
        distill_batch_size=args.batch_size,
        eval_every=args.eval_every,
        eval_problems=args.eval_problems,
        kl_problems=8,
        distill_schedule=args.schedule,
        distill_warmup_steps=args.warmup_steps,
    )
    if task != "addition":
        return settings
    # Room for longer chains: ~12 tokens per digit (a 9-token line, the prompt and the answer) and the chat markup.
    positions = max(settings.teacher.positions, 12 * args.digits + 40)
    return replace(
        settings,
        teacher=replace(settings.teacher, positions=positions),
        student=replace(settings.student, positions=positions),
    )


# ----- Worker: one (seed, method) run in a fresh process -----


def run_method(args) -> dict:
    import torch
    from rich.progress import Progress
    from transformers.utils import logging as transformers_logging

    from protege.demo import pipeline
    from protege.demo.distill import distill

    torch.set_num_threads(1)
    transformers_logging.set_verbosity_error()
    settings = settings_for(args)
    method = METHODS.get(args.method)
    folder = Path(args.output_dir) / f"seed{args.seed}"
    quiet = Progress(disable=True)
    prepared = pipeline.prepare(folder, settings, args.seed, quiet)
    if args.method == "prepare":
        return {
            "seed": args.seed,
            "teacher": prepared.teacher_info,
            "student": prepared.student_info,
            **scores(prepared, settings, args.seed),
        }
    encoder, teacher, student = prepared.encoder, prepared.teacher, prepared.student
    saved = prepared_scores(folder, args) or scores(prepared, settings, args.seed)
    start = start_point(saved)
    problems = prepared.training_problems(
        settings, args.seed, settings.distill_steps * settings.distill_batch_size, "distill"
    )
    if args.references == "canonical":  # the dataset's completions, not its prompts: SFT, supervised KD, mixed
        problems = [prepared.task.canonical(problem) for problem in problems]
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    if method.kind == "distill":
        run_settings = replace(
            settings,
            beta=method.beta,
            distill_overrides={"lmbda": method.lmbda, "beta": method.beta, "logging_steps": 1},
        )
        distilled = distill(
            teacher,
            student,
            prepared.optimizer_state if args.optimizer == "continue" else None,
            encoder,
            run_settings,
            args.seed,
            problems,
            prepared.eval_problems,
            start,
            folder / args.method,
            quiet,
        )
        curve, tokens, eval_seconds = distilled.curve, distilled.completion_tokens, distilled.eval_seconds
    else:
        curve, tokens, eval_seconds = _supervised(
            method, settings, prepared, problems, start, args.optimizer == "continue", args.seed
        )
    finals = {metric.final: curve[-1][key] for key, metric in METRICS.items() if key in curve[-1]}
    return {
        "seed": args.seed,
        "method": args.method,
        **{key: value for key, value in saved.items() if key.startswith(("teacher_", "start_"))},
        **finals,
        "curve": curve,
        "completion_tokens": tokens,
        "train_seconds": round(time.perf_counter() - started - eval_seconds, 2),
    }


def scores(prepared, settings, seed: int) -> dict[str, float]:
    """The seed's teacher and warmed-up student (every method's start) on the held-out problems: greedy accuracy, and
    sampled accuracy when the task's settings ask for it."""
    from protege.demo.scoring import scores as model_scores

    teacher, student = (
        model_scores(model, prepared.encoder, prepared.eval_problems, settings.sample_eval, seed)
        for model in (prepared.teacher, prepared.student)
    )
    return {METRICS[key].teacher: value for key, value in teacher.items()} | {
        METRICS[key].start: value for key, value in student.items()
    }


def start_point(saved: dict[str, float]) -> dict[str, float]:
    """Every method's curve at step 0, from the seed's saved scores of the warmed-up student."""
    return {key: saved[metric.start] for key, metric in METRICS.items() if metric.start in saved}


def prepared_scores(folder: Path, args) -> dict[str, float] | None:
    """The scores the seed's prepare run saved for this configuration, if it saved them (older runs did not)."""
    path = folder / "prepare.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    if saved.get("config") != run_config(args) or "start_accuracy" not in saved:
        return None
    return saved


def _supervised(
    method: Method, settings, prepared, problems, start: dict[str, float], continue_optimizer: bool, seed: int
):
    """Cross-entropy on reference chains (sft) or on the teacher's samples (seqkd), with the same optimizer, learning
    rate schedule, budget, prompts and evaluation points as the trainer runs. Returns the accuracy curve, the
    completion tokens trained on and the seconds spent on evaluation."""
    from protege.demo.scoring import generate, scores
    from protege.demo.settings import SFTSpec
    from protege.demo.supervised import adamw, supervised_training

    warmup = settings.student_sft
    spec = SFTSpec(
        steps=settings.distill_steps,
        batch_size=settings.distill_batch_size,
        learning_rate=warmup.learning_rate,
        adam_beta2=warmup.adam_beta2,
        schedule=settings.distill_schedule,
        warmup_steps=settings.distill_warmup_steps,
    )
    encoder, student = prepared.encoder, prepared.student
    optimizer = adamw(student, spec)
    if continue_optimizer:
        optimizer.load_state_dict(prepared.optimizer_state)
    curve, tokens, timer, losses = [{"step": 0, **start}], [0], {"eval": 0.0}, []

    def make_batch(batch_problems):
        if method.kind == "seqkd":
            samples = generate(prepared.teacher, encoder, batch_problems, sample=True)
            batch = encoder.completions_batch(batch_problems, samples.completion_ids)
        else:
            batch = encoder.batch(batch_problems)
        tokens[0] += int(batch["labels"].ne(-100).sum())
        return batch

    def on_step(loss: float) -> None:
        step = len(losses) + 1
        losses.append(loss)
        if step % settings.eval_every == 0 or step == settings.distill_steps:
            clock = time.perf_counter()
            point = scores(student, encoder, prepared.eval_problems, settings.sample_eval, seed)
            curve.append({"step": step, **point})
            timer["eval"] += time.perf_counter() - clock

    supervised_training(student, encoder, problems, spec, on_step, optimizer=optimizer, make_batch=make_batch)
    return curve, tokens[0], timer["eval"]


# ----- Parent: schedule the runs, aggregate, write the table and the chart -----


def run_config(args) -> dict:
    """What a saved result depends on: a saved run or prepare.json is reused only when all of it is equal, the demo
    settings (models, SFT steps) included."""
    keys = ("task", "digits", "steps", "batch_size", "eval_every", "eval_problems", "schedule", "warmup_steps")
    keys += ("optimizer", "quick", "references")
    return {**{key: getattr(args, key) for key in keys}, "settings": repr(settings_for(args))}


def spawn(args, seed: int, method: str) -> dict:
    out = Path(args.output_dir) / f"seed{seed}" / f"{method}.json"
    if out.exists() and not args.fresh:  # a finished run of the same configuration is reused (resuming)
        saved = json.loads(out.read_text())
        if saved.get("config") == run_config(args):
            return saved
    command = [sys.executable, __file__, "--worker", "--seed", str(seed), "--method", method, "--out", str(out)]
    command += ["--output-dir", args.output_dir, "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
    command += ["--eval-every", str(args.eval_every), "--eval-problems", str(args.eval_problems)]
    command += [
        "--task",
        args.task,
        "--digits",
        str(args.digits),
        "--schedule",
        args.schedule,
        "--warmup-steps",
        str(args.warmup_steps),
        "--optimizer",
        args.optimizer,
        "--references",
        args.references,
    ]
    command += ["--quick"] if args.quick else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"seed {seed} {method} failed:\n{done.stderr[-4000:]}")
    result = json.loads(out.read_text())
    shown = "  ".join(f"{m.label} {result[m.final]:.3f}" for m in METRICS.values() if m.final in result)
    if method == "prepare":
        shown = "  ".join(
            f"{role} {m.label} {result[key]:.3f}"
            for m in METRICS.values()
            for role, key in (("teacher", m.teacher), ("student", m.start))
            if key in result
        )
    print(f"  seed {seed} {method:15s} {time.perf_counter() - started:6.1f}s  {shown}", flush=True)
    return result


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(results: list[dict], methods: list[str]) -> list[dict]:
    """One row per method: mean and spread over seeds of each recorded score, its gain over the warmed-up student,
    its value at half the budget, and the budget actually used."""
    rows = []
    for name in methods:
        runs = sorted((r for r in results if r["method"] == name), key=lambda r: r["seed"])
        row = {"method": name, "label": METHODS[name].label, "lmbda": METHODS[name].lmbda, "beta": METHODS[name].beta}
        for key, (final, start, _, prefix, _) in METRICS.items():
            if not all(final in r for r in runs):
                continue
            accuracy = mean_std([r[final] for r in runs])
            gains = [r[final] - r[start] for r in runs]
            gain = mean_std(gains)
            middle = [next(p[key] for p in r["curve"] if p["step"] >= r["curve"][-1]["step"] // 2) for r in runs]
            row |= {
                f"{prefix}accuracy_mean": accuracy[0],
                f"{prefix}accuracy_std": accuracy[1],
                f"{prefix}gain_mean": gain[0],
                f"{prefix}gain_std": gain[1],
                f"half_budget_{prefix}accuracy_mean": statistics.fmean(middle),
                f"{prefix}per_seed": [r[final] for r in runs],
                f"{prefix}gain_per_seed": gains,
            }
        row |= {
            "seeds": [r["seed"] for r in runs],
            "completion_tokens_mean": statistics.fmean(r["completion_tokens"] for r in runs),
            "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in runs),
        }
        rows.append(row)
    return rows


def criterion(rows: list[dict], prefix: str) -> dict | None:
    """Issue 15's test, fixed before the letters comparison was run (docs/benchmarks.md, "A task where the student's
    own mistakes matter: protocol"), on the score whose row keys start with `prefix`.

    The on-policy method (lmbda 1) and the supervised-KD method (lmbda 0) with the highest mean gain are compared: the
    criterion is met when the on-policy gain is at least 1.5 times the supervised one (when that is not positive: when
    the on-policy gain is positive) and exceeds it by more than twice the larger of the two methods' standard
    deviations of gain over seeds. None when a family is missing from the run."""

    def best(lmbda: float) -> dict | None:
        family = [r for r in rows if r["lmbda"] == lmbda and f"{prefix}gain_mean" in r]
        return max(family, key=lambda r: r[f"{prefix}gain_mean"]) if family else None

    onpolicy, supervised = best(1.0), best(0.0)
    if onpolicy is None or supervised is None:
        return None
    on, sup = onpolicy[f"{prefix}gain_mean"], supervised[f"{prefix}gain_mean"]
    two_std = 2 * max(onpolicy[f"{prefix}gain_std"], supervised[f"{prefix}gain_std"])
    ratio_met = on >= 1.5 * sup if sup > 0 else on > 0
    found = {
        "onpolicy": onpolicy["method"],
        "supervised": supervised["method"],
        "onpolicy_gain": on,
        "supervised_gain": sup,
        "ratio": on / sup if sup > 0 else None,
        "difference": on - sup,
        "two_std": two_std,
        "ratio_met": ratio_met,
        "margin_met": on - sup > two_std,
        "met": ratio_met and on - sup > two_std,
    }
    key = f"{prefix}gain_per_seed"
    if key in onpolicy and onpolicy.get("seeds") == supervised.get("seeds"):  # per seed: the same warmed-up student
        paired = mean_std([a - b for a, b in zip(onpolicy[key], supervised[key])])
        found |= {"paired_difference_mean": paired[0], "paired_difference_std": paired[1]}
    return found


def present_metrics(rows: list[dict]) -> list[tuple[str, Metric]]:
    """The METRICS entries this summary has numbers for."""
    return [(key, metric) for key, metric in METRICS.items() if f"{metric.prefix}accuracy_mean" in rows[0]]


def markdown(rows: list[dict], results: list[dict], args) -> str:
    """The table of each recorded score, then the criterion's verdict on each."""
    half = args.steps // 2
    task = getattr(args, "task", "addition")
    word = "accuracy" if task == "addition" else "validity"
    first = [r for r in results if r["method"] == rows[0]["method"]]
    metrics = present_metrics(rows)
    lines = []
    for _, (_, start_key, teacher_key, prefix, label) in metrics:
        start = mean_std([r[start_key] for r in first])
        teacher = mean_std([r[teacher_key] for r in first])
        if len(metrics) > 1:
            lines += [f"**{word.capitalize()}, {label}** (%, on each seed's {args.eval_problems} held-out prompts)", ""]
        lines += [
            f"Warmed-up student (every method's start): {100 * start[0]:.1f} +- {100 * start[1]:.1f}%; "
            f"teacher: {100 * teacher[0]:.1f} +- {100 * teacher[1]:.1f}%.",
            "",
            f"| method | lmbda | beta | {word} after {args.steps} steps | gain over warm-up | {word} at step {half} "
            "| per seed | completion tokens | train s |",
            "|---|---:|---:|---:|---:|---:|---|---:|---:|",
        ]
        for row in rows:
            lmbda = "" if row["lmbda"] is None else f"{row['lmbda']:g}"
            beta = "" if row["beta"] is None else f"{row['beta']:g}"
            seeds = " / ".join(f"{100 * a:.1f}" for a in row[f"{prefix}per_seed"])
            lines.append(
                f"| {row['label']} | {lmbda} | {beta} | {100 * row[f'{prefix}accuracy_mean']:.1f} +- "
                f"{100 * row[f'{prefix}accuracy_std']:.1f} | {100 * row[f'{prefix}gain_mean']:+.1f} +- "
                f"{100 * row[f'{prefix}gain_std']:.1f} | {100 * row[f'half_budget_{prefix}accuracy_mean']:.1f} "
                f"| {seeds} | {row['completion_tokens_mean']:,.0f} | {row['train_seconds_mean']:.0f} |"
            )
        lines.append("")
    for _, (_, _, _, prefix, label) in metrics:
        verdict = criterion(rows, prefix)
        if verdict is not None:
            lines.append(criterion_line(verdict, label))
    sft = next((row["completion_tokens_mean"] for row in rows if row["method"] == "sft"), None)
    if sft:  # the budget is equal in steps and prompts; say where it was not in tokens
        unequal = [r for r in rows if abs(r["completion_tokens_mean"] / sft - 1) > 0.05]
        if unequal:
            listed = ", ".join(f"{r['label']} {r['completion_tokens_mean'] / sft - 1:+.1%}" for r in unequal)
            lines.append(f"Completion tokens more than 5% away from SFT's: {listed}.")
    return "\n".join(lines).rstrip()


def criterion_line(verdict: dict, label: str) -> str:
    """The criterion's numbers in one sentence, gains in points."""
    ratio = "n/a (supervised gain not positive)" if verdict["ratio"] is None else f"{verdict['ratio']:.2f}"
    paired = ""
    if "paired_difference_mean" in verdict:
        paired = (
            f"; per seed, on-policy minus supervised {100 * verdict['paired_difference_mean']:+.1f} +- "
            f"{100 * verdict['paired_difference_std']:.1f}"
        )
    return (
        f"Criterion, {label}: best on-policy ({METHODS[verdict['onpolicy']].label}) gain "
        f"{100 * verdict['onpolicy_gain']:+.1f} against best supervised KD ({METHODS[verdict['supervised']].label}) "
        f"{100 * verdict['supervised_gain']:+.1f}: ratio {ratio} (needs 1.5), difference "
        f"{100 * verdict['difference']:.1f} against 2 std {100 * verdict['two_std']:.1f}{paired}: "
        f"**{'met' if verdict['met'] else 'not met'}**."
    )


def bar_chart(rows: list[dict], results: list[dict], args, path: Path) -> None:
    """Mean score per method at half and at the whole budget, with the spread over seeds and each seed's dot; one
    panel per recorded score (greedy, and sampled at temperature 1)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = present_metrics(rows)
    figure = Figure(figsize=(9, 4.2 * len(metrics)), dpi=120)
    FigureCanvasAgg(figure)  # the Agg backend for this figure only
    panels = figure.subplots(len(metrics), 1, squeeze=False)[:, 0]
    colours = {"sft": "tab:gray", "seqkd": "tab:brown"}
    task = getattr(args, "task", "addition")
    for axes, (_, (_, start_key, _, prefix, label)) in zip(panels, metrics):
        for index, row in enumerate(rows):
            method = METHODS[row["method"]]
            colour = colours.get(row["method"]) or {0.0: "tab:orange", 1.0: "tab:blue", 0.5: "tab:purple"}[method.lmbda]
            half = 100 * row[f"half_budget_{prefix}accuracy_mean"]
            axes.bar(index - 0.2, half, width=0.4, color=colour, alpha=0.4)
            mean, std = 100 * row[f"{prefix}accuracy_mean"], 100 * row[f"{prefix}accuracy_std"]
            axes.bar(index + 0.2, mean, yerr=std, width=0.4, color=colour)
            seeds = [100 * a for a in row[f"{prefix}per_seed"]]
            axes.scatter([index + 0.2] * len(seeds), seeds, color="black", s=6, zorder=3)
        start = statistics.fmean(r[start_key] for r in results if r["method"] == rows[0]["method"])
        axes.axhline(100 * start, color="tab:red", linestyle=":", label="warmed-up student (every method's start)")
        axes.set_xticks(range(len(rows)), [METHODS[row["method"]].short for row in rows], fontsize=8)
        if task == "addition":
            axes.set_ylabel("held-out exact-match accuracy (%)")
            what = f"{args.digits}-digit addition chains"
        else:
            axes.set_ylabel(f"held-out valid answers, {label} (%)")
            what = f"{task} task, {label}"
        if getattr(args, "references", "sampled") == "canonical":
            what += ", canonical references"
        axes.set_ylim(0, 102)
        axes.set_title(
            f"{what}, {len(args.seeds)} seeds: light bars after {args.steps // 2} steps, dark after {args.steps} "
            "(mean, std, seeds)",
            fontsize=9,
        )
        axes.legend(loc="lower right", fontsize=8)
        axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=TASK_NAMES, default="addition", help="the demo task (protege demo --task)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=None, help="default: all")
    parser.add_argument("--digits", type=int, default=6, help="addition: digits per number, one chain line each")
    parser.add_argument("--steps", type=int, default=None, help="steps per method (60 addition, else 200)")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per step")
    parser.add_argument("--eval-every", type=int, default=None, help="steps between scores (10 addition, else 20)")
    parser.add_argument(
        "--schedule",
        default="linear",
        choices=["constant", "linear", "cosine"],
        help="learning rate from the warm-up's value over the budget, the same for every method",
    )
    parser.add_argument("--eval-problems", type=int, default=500, help="held-out problems per seed")
    parser.add_argument("--warmup-steps", type=int, default=10, help="linear learning-rate warm-up, every method")
    parser.add_argument(
        "--optimizer",
        default="fresh",
        choices=["fresh", "continue"],
        help="fresh: a new AdamW per method (default); continue: the warm-up's AdamW state, as the demo does",
    )
    parser.add_argument(
        "--references",
        default="sampled",
        choices=["sampled", "canonical"],
        help="the dataset's completions (SFT, supervised KD, mixed): sampled, the task's own (default; diverse on "
        "letters and walks); canonical, the task's one house-style answer per prompt (Task.canonical)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (1 torch thread each)")
    parser.add_argument(
        "--output-dir", default=None, help="default: runs/gkd_table, runs/gkd_table_TASK, runs/gkd_table_TASK_canonical"
    )
    parser.add_argument("--plot", default=None, help="default: docs/gkd_table.png, docs/gkd_table_TASK[_canonical].png")
    parser.add_argument("--fresh", action="store_true", help="rerun methods whose results are already saved")
    parser.add_argument("--replot", action="store_true", help="only redraw the table and chart from summary.json")
    parser.add_argument("--quick", action="store_true", help="smoke run: seed 0, 3 methods, 4 steps")
    parser.add_argument(
        "--prepare-only",
        action="store_true",
        help="train (or load) each seed's teacher and warmed-up student and print their scores, running no method: "
        "the protocol's gates (letters, walks)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    suffix = "" if args.task == "addition" else f"_{args.task}"
    suffix += "_canonical" if args.references == "canonical" else ""  # never over the sampled references' results
    args.output_dir = args.output_dir or str(REPO / "runs" / f"gkd_table{suffix}")
    args.plot = args.plot or str(REPO / "docs" / f"gkd_table{suffix}.png")
    args.steps = args.steps or BUDGETS[args.task][0]
    args.eval_every = args.eval_every or BUDGETS[args.task][1]
    if args.quick:
        args.seeds, args.steps, args.eval_every, args.eval_problems = args.seeds[:1], 4, 2, 32
        args.methods = args.methods or QUICK_METHODS
    if args.worker:
        result = {**run_method(args), "config": run_config(args)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        return
    if args.replot:
        summary = json.loads((Path(args.output_dir) / "summary.json").read_text())
        saved = argparse.Namespace(**{**summary["args"], "plot": args.plot})
        print(markdown(summary["rows"], summary["runs"], saved))
        bar_chart(summary["rows"], summary["runs"], saved, Path(args.plot))
        return
    methods = args.methods or list(METHODS)
    started = time.perf_counter()
    print(f"preparing teachers and warmed-up students for seeds {args.seeds}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        prepared = list(pool.map(lambda seed: spawn(args, seed, "prepare"), args.seeds))
        if args.prepare_only:
            print(json.dumps([{k: v for k, v in p.items() if k != "config"} for p in prepared], indent=2))
            return
        runs = [(seed, method) for seed in args.seeds for method in methods]
        print(f"{len(runs)} runs, {args.jobs} at a time", flush=True)
        results = list(pool.map(lambda run: spawn(args, *run), runs))
    rows = aggregate(results, methods)
    table = markdown(rows, results, args)
    print(table)
    verdicts = {key: criterion(rows, metric.prefix) for key, metric in present_metrics(rows)}
    summary = {
        "args": vars(args),
        "rows": rows,
        "criterion": verdicts,
        "runs": results,
        "seconds": round(time.perf_counter() - started),
    }
    (Path(args.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    (Path(args.output_dir) / "table.md").write_text(table + "\n")
    bar_chart(rows, results, args, Path(args.plot))
    print(f"wrote {args.output_dir}/summary.json, table.md and {args.plot} in {summary['seconds']}s")


if __name__ == "__main__":
    main()
