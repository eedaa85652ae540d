"""The GKD paper's comparison of distillation methods, reproduced on protege's demo task on a laptop CPU.

Every method starts from the same warmed-up student of a seed (the demo's: a short supervised warm-up stopped at 30%
validation accuracy), trains for the same number of steps on the same prompts at the same batch size with the same
optimizer and learning-rate schedule, and is scored by greedy exact-match accuracy on the same held-out problems:

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


def settings_for(args):
    from protege.demo.settings import Settings, SFTSpec

    settings = Settings(
        digits=args.digits,
        distill_steps=args.steps,
        distill_batch_size=args.batch_size,
        eval_every=args.eval_every,
        eval_problems=args.eval_problems,
        kl_problems=8,
        distill_schedule=args.schedule,
        distill_warmup_steps=args.warmup_steps,
    )
    if args.quick:
        settings = replace(settings, teacher_sft=SFTSpec(steps=300, batch_size=32, learning_rate=6e-3))
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
            **scores(prepared),
        }
    encoder, teacher, student = prepared.encoder, prepared.teacher, prepared.student
    saved = prepared_scores(folder, args) or scores(prepared)
    start, teacher_accuracy = saved["start_accuracy"], saved["teacher_accuracy"]
    problems = prepared.training_problems(
        settings, args.seed, settings.distill_steps * settings.distill_batch_size, "distill"
    )
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
            method, settings, prepared, problems, start, args.optimizer == "continue"
        )
    return {
        "seed": args.seed,
        "method": args.method,
        "teacher_accuracy": teacher_accuracy,
        "start_accuracy": start,
        "accuracy": curve[-1]["accuracy"],
        "curve": curve,
        "completion_tokens": tokens,
        "train_seconds": round(time.perf_counter() - started - eval_seconds, 2),
    }


def scores(prepared) -> dict[str, float]:
    """The seed's teacher and warmed-up student (every method's start) on the held-out problems."""
    from protege.demo.scoring import generate

    return {
        "teacher_accuracy": generate(prepared.teacher, prepared.encoder, prepared.eval_problems).accuracy,
        "start_accuracy": generate(prepared.student, prepared.encoder, prepared.eval_problems).accuracy,
    }


def prepared_scores(folder: Path, args) -> dict[str, float] | None:
    """The scores the seed's prepare run saved for this configuration, if it saved them (older runs did not)."""
    path = folder / "prepare.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    if saved.get("config") != run_config(args) or "start_accuracy" not in saved:
        return None
    return saved


def _supervised(method: Method, settings, prepared, problems, start: float, continue_optimizer: bool):
    """Cross-entropy on reference chains (sft) or on the teacher's samples (seqkd), with the same optimizer, learning
    rate schedule, budget, prompts and evaluation points as the trainer runs. Returns the accuracy curve, the
    completion tokens trained on and the seconds spent on evaluation."""
    from protege.demo.scoring import generate
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
    curve, tokens, timer, losses = [{"step": 0, "accuracy": start}], [0], {"eval": 0.0}, []

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
            accuracy = generate(student, encoder, prepared.eval_problems).accuracy
            curve.append({"step": step, "accuracy": accuracy})
            timer["eval"] += time.perf_counter() - clock

    supervised_training(student, encoder, problems, spec, on_step, optimizer=optimizer, make_batch=make_batch)
    return curve, tokens[0], timer["eval"]


# ----- Parent: schedule the runs, aggregate, write the table and the chart -----


def run_config(args) -> dict:
    keys = ("digits", "steps", "batch_size", "eval_every", "eval_problems", "schedule", "warmup_steps", "optimizer")
    keys += ("quick",)
    return {key: getattr(args, key) for key in keys}


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
        "--digits",
        str(args.digits),
        "--schedule",
        args.schedule,
        "--warmup-steps",
        str(args.warmup_steps),
        "--optimizer",
        args.optimizer,
    ]
    command += ["--quick"] if args.quick else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"seed {seed} {method} failed:\n{done.stderr[-4000:]}")
    result = json.loads(out.read_text())
    print(f"  seed {seed} {method:15s} {time.perf_counter() - started:6.1f}s  {result.get('accuracy', '')}", flush=True)
    return result


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(results: list[dict], methods: list[str]) -> list[dict]:
    rows = []
    for name in methods:
        runs = sorted((r for r in results if r["method"] == name), key=lambda r: r["seed"])
        accuracy = mean_std([r["accuracy"] for r in runs])
        gain = mean_std([r["accuracy"] - r["start_accuracy"] for r in runs])
        middle = [next(p["accuracy"] for p in r["curve"] if p["step"] >= r["curve"][-1]["step"] // 2) for r in runs]
        rows.append(
            {
                "method": name,
                "label": METHODS[name].label,
                "lmbda": METHODS[name].lmbda,
                "beta": METHODS[name].beta,
                "accuracy_mean": accuracy[0],
                "accuracy_std": accuracy[1],
                "gain_mean": gain[0],
                "gain_std": gain[1],
                "half_budget_accuracy_mean": statistics.fmean(middle),
                "per_seed": [r["accuracy"] for r in runs],
                "completion_tokens_mean": statistics.fmean(r["completion_tokens"] for r in runs),
                "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in runs),
            }
        )
    return rows


def markdown(rows: list[dict], results: list[dict], args) -> str:
    start = mean_std([r["start_accuracy"] for r in results if r["method"] == rows[0]["method"]])
    teacher = mean_std([r["teacher_accuracy"] for r in results if r["method"] == rows[0]["method"]])
    half = args.steps // 2
    lines = [
        f"Warmed-up student (every method's start): {100 * start[0]:.1f} +- {100 * start[1]:.1f}%; "
        f"teacher: {100 * teacher[0]:.1f} +- {100 * teacher[1]:.1f}%.",
        "",
        f"| method | lmbda | beta | accuracy after {args.steps} steps | gain over warm-up | accuracy at step {half} "
        "| per seed | completion tokens | train s |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for row in rows:
        lmbda = "" if row["lmbda"] is None else f"{row['lmbda']:g}"
        beta = "" if row["beta"] is None else f"{row['beta']:g}"
        seeds = " / ".join(f"{100 * a:.1f}" for a in row["per_seed"])
        lines.append(
            f"| {row['label']} | {lmbda} | {beta} | {100 * row['accuracy_mean']:.1f} +- {100 * row['accuracy_std']:.1f}"
            f" | {100 * row['gain_mean']:+.1f} +- {100 * row['gain_std']:.1f}"
            f" | {100 * row['half_budget_accuracy_mean']:.1f} | {seeds} | {row['completion_tokens_mean']:,.0f}"
            f" | {row['train_seconds_mean']:.0f} |"
        )
    return "\n".join(lines)


def bar_chart(rows: list[dict], results: list[dict], args, path: Path) -> None:
    """Mean accuracy per method at half and at the whole budget, with the spread over seeds and each seed's dot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 4.2), dpi=120)
    FigureCanvasAgg(figure)  # the Agg backend for this figure only
    axes = figure.subplots()
    colours = {"sft": "tab:gray", "seqkd": "tab:brown"}
    for index, row in enumerate(rows):
        method = METHODS[row["method"]]
        colour = colours.get(row["method"]) or {0.0: "tab:orange", 1.0: "tab:blue", 0.5: "tab:purple"}[method.lmbda]
        axes.bar(index - 0.2, 100 * row["half_budget_accuracy_mean"], width=0.4, color=colour, alpha=0.4)
        axes.bar(index + 0.2, 100 * row["accuracy_mean"], yerr=100 * row["accuracy_std"], width=0.4, color=colour)
        seeds = [100 * a for a in row["per_seed"]]
        axes.scatter([index + 0.2] * len(seeds), seeds, color="black", s=6, zorder=3)
    start = statistics.fmean(r["start_accuracy"] for r in results if r["method"] == rows[0]["method"])
    axes.axhline(100 * start, color="tab:red", linestyle=":", label="warmed-up student (every method's start)")
    axes.set_xticks(range(len(rows)), [METHODS[row["method"]].short for row in rows], fontsize=8)
    axes.set_ylabel("held-out exact-match accuracy (%)")
    axes.set_ylim(0, 102)
    axes.set_title(
        f"{args.digits}-digit addition chains, {len(args.seeds)} seeds: light bars after {args.steps // 2} steps, "
        f"dark after {args.steps} (mean, std, seeds)",
        fontsize=9,
    )
    axes.legend(loc="lower right", fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=None, help="default: all")
    parser.add_argument("--digits", type=int, default=6, help="digits per number: the chain has one line per digit")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per method")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per step")
    parser.add_argument("--eval-every", type=int, default=10)
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
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (1 torch thread each)")
    parser.add_argument("--output-dir", default=str(REPO / "runs" / "gkd_table"))
    parser.add_argument("--plot", default=str(REPO / "docs" / "gkd_table.png"))
    parser.add_argument("--fresh", action="store_true", help="rerun methods whose results are already saved")
    parser.add_argument("--replot", action="store_true", help="only redraw the table and chart from summary.json")
    parser.add_argument("--quick", action="store_true", help="smoke run: seed 0, 3 methods, 4 steps")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
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
        list(pool.map(lambda seed: spawn(args, seed, "prepare"), args.seeds))
        runs = [(seed, method) for seed in args.seeds for method in methods]
        print(f"{len(runs)} runs, {args.jobs} at a time", flush=True)
        results = list(pool.map(lambda run: spawn(args, *run), runs))
    rows = aggregate(results, methods)
    table = markdown(rows, results, args)
    print(table)
    summary = {"args": vars(args), "rows": rows, "runs": results, "seconds": round(time.perf_counter() - started)}
    (Path(args.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
    (Path(args.output_dir) / "table.md").write_text(table + "\n")
    bar_chart(rows, results, args, Path(args.plot))
    print(f"wrote {args.output_dir}/summary.json, table.md and {args.plot} in {summary['seconds']}s")


if __name__ == "__main__":
    main()
