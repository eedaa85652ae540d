"""The GKD paper's comparison of distillation methods, reproduced on protege's demo tasks on a laptop CPU.

    python -m benchmarks gkd_table --seeds 0 1 2 3 4             # addition: 5 seeds x 9 methods, ~20 min, 2 cores
    python -m benchmarks gkd_table --quick                       # smoke run: 1 seed, 3 methods, tiny budgets
    python -m benchmarks gkd_table --task letters --seeds 0 1 2 3 4 --prepare-only  # the protocol's gates
    python -m benchmarks gkd_table --task letters --seeds 0 1 2 3 4  # the protocol's comparison (docs/benchmarks.md)
    python -m benchmarks gkd_table --task walks --seeds 0 1 2 3 4    # design 2's, the same way
    python -m benchmarks gkd_table hidden --seeds 0 1 2          # a teacher server's hidden format vs top-1: 25 min
    python -m benchmarks gkd_table gradients --seed 0            # each divergence's gradient vs cross-entropy's

`table` (the default): every method (`gkd_runs.METHODS`: SFT on the reference chains, SeqKD on the teacher's samples,
`DistillationTrainer` at lmbda 0, 1 and 0.5 with forward KL, JSD(0.5) and reverse KL) starts from the same warmed-up
student of a seed, trains for the same steps on the same prompts, batch size, optimizer and schedule, and is scored on
the same held-out problems by the task's verifier: greedy decoding, and on letters and walks also one sample per
problem at temperature 1. Optimizer: a fresh AdamW per method at the warm-up's learning rate, warmed up over 10 steps,
then decayed linearly to zero; the warm-up's AdamW state (`--optimizer continue`, what the demo does) remembers the
size of cross-entropy gradients, so a divergence with smaller gradients would take smaller steps for hundreds of
steps. On letters and walks the summary says whether the protocol's criterion holds (`criterion`): the best
on-policy method's mean gain over the warmed-up student at least 1.5x the best supervised-KD method's, and the
difference more than twice the larger of their standard deviations over seeds; sampled validity is the primary metric.

`hidden`: three on-policy runs (lmbda 1, JSD(0.5)) per seed on addition: the full-vocabulary loss through one real
`protege serve-teacher` per seed in the "hidden" format (the trainer applies the teacher's LM head to the states it
receives), the sparse top-1 loss through the same server's default "compact" format, and the full-vocabulary loss with
the local teacher, the reference "hidden" should match (the hidden states travel as `--hidden-dtype`, float32 here:
the same loss up to summation order). Everything else is `table`'s.

`gradients`: on seed `--seed`'s warmed-up student and 64 reference chains, the teacher's probability of the reference
tokens and, for the off-policy loss at beta 0, 0.5 and 1, the cosine and norm ratio of its gradient to the
cross-entropy gradient (trains the seed's models under `--output-dir` when they are not there).

Each seed has its own teacher, warmed-up student, held-out set and prompt stream, cached under `--output-dir` and
scored once. Runs go in fresh worker processes (`python -m benchmarks.gkd_table --worker ...`), `--jobs` at a time, 1
torch thread each; a finished run of the same configuration is reused unless `--fresh`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchmarks import REPO, Column, Report, Server, markdown, module_command, parser, spawn, worker_env
from benchmarks.gkd_runs import (
    ALL_METHODS,
    BUDGETS,
    HIDDEN_METHODS,
    METHODS,
    METRICS,
    QUICK_METHODS,
    RUN_KEYS,
    Metric,
    gradients,
    run_config,
    run_method,
)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def score_columns(settings: dict, prefix: str) -> list[Column]:
    """`table`'s columns for the score whose row keys start with `prefix` (greedy "", sampled "sampled_")."""
    word, steps = "accuracy" if settings["task"] == "addition" else "validity", settings["steps"]

    def spread(row: dict, key: str) -> tuple[float, float]:
        return 100 * row[f"{prefix}{key}_mean"], 100 * row[f"{prefix}{key}_std"]

    return [
        Column("method", "label", text=True),
        Column("lmbda", "lmbda", "{:g}", missing=""),
        Column("beta", "beta", "{:g}", missing=""),
        Column(f"{word} after {steps} steps", lambda r: spread(r, "accuracy"), "{0[0]:.1f} +- {0[1]:.1f}"),
        Column("gain over warm-up", lambda r: spread(r, "gain"), "{0[0]:+.1f} +- {0[1]:.1f}"),
        Column(f"{word} at step {steps // 2}", lambda r: 100 * r[f"half_budget_{prefix}accuracy_mean"], "{:.1f}"),
        Column("per seed", lambda r: " / ".join(f"{100 * a:.1f}" for a in r[f"{prefix}per_seed"]), text=True),
        Column("completion tokens", "completion_tokens_mean", "{:,.0f}"),
        Column("train s", "train_seconds_mean", "{:.0f}"),
    ]


def hidden_columns(settings: dict) -> list[Column]:
    """The hidden mode's columns: held-out accuracy (%) at half / the whole budget per seed, the mean, the timing."""

    def pair(index: int) -> Callable[[dict], tuple[float, float]]:
        return lambda r: (100 * r["half_budget_accuracy"][index], 100 * r["accuracy"][index])

    cells = [Column(f"seed {seed}", pair(i), "{0[0]:.1f} / {0[1]:.1f}") for i, seed in enumerate(settings["seeds"])]
    return [
        Column("method", "label", text=True),
        *cells,
        Column("mean", lambda r: f"{100 * r['half_budget_accuracy_mean']:.1f} / **{100 * r['accuracy_mean']:.1f}**"),
        Column("std (final)", lambda r: 100 * r["accuracy_std"], "{:.1f}"),
        Column("teacher s/step", lambda r: r["step_seconds_mean"].get("teacher_s"), "{:.3f}", missing=""),
        Column("train s", "train_seconds_mean", "{:.0f}"),
    ]


TABLES = {
    **{key: lambda settings, prefix=metric.prefix: score_columns(settings, prefix) for key, metric in METRICS.items()},
    "hidden": hidden_columns,
    "gradients": [
        Column("beta", "beta"),
        Column("cosine to the cross-entropy gradient", "cosine", "{:.4f}"),
        Column("norm ratio", "norm_ratio", "{:.3f}"),
    ],
}

# ---------------------------------------------------------------------------------------------------------------------
# Running: one (seed, method) run in a fresh worker process, or its saved result
# ---------------------------------------------------------------------------------------------------------------------


def spawn_run(args: argparse.Namespace, seed: int, method: str, url: str = "") -> dict:
    """One run in a fresh process, or its saved result when the same configuration already finished (resuming)."""
    folder = Path(args.output_dir) / f"seed{seed}"
    out = (folder / "hidden_vs_top1" if method in HIDDEN_METHODS else folder) / f"{method}.json"
    if out.exists() and not args.fresh:
        saved = json.loads(out.read_text())
        if saved.get("config") == run_config(args, method):
            return saved
    flags = ["--worker", "--seed", seed, "--method", method, "--out", out, "--output-dir", args.output_dir]
    for key in RUN_KEYS:
        flags += [f"--{key.replace('_', '-')}", getattr(args, key)]
    flags += ["--hidden-dtype", args.hidden_dtype, *(["--url", url] if url else []), *(["--quick"] * args.quick)]
    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env["PROTEGE_CACHE_DIR"] = str(Path(args.output_dir) / "protege_cache")  # a server's LM heads stay with the runs
    started = time.perf_counter()
    done = spawn(module_command(sys.executable, "benchmarks.gkd_table", args.mode, *flags), env=worker_env(**env))
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


def run_worker(args: argparse.Namespace) -> None:
    """A worker: one run, its result and configuration written to `--out`."""
    result = {**run_method(args), "config": run_config(args, args.method)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


# ---------------------------------------------------------------------------------------------------------------------
# table: aggregate over seeds, the criterion, the tables and the chart
# ---------------------------------------------------------------------------------------------------------------------


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


def summary_text(rows: list[dict], results: list[dict], args: argparse.Namespace, table) -> str:
    """Each recorded score's table (`table(name, rows)` writes it), then the criterion's verdict on each."""
    word = "accuracy" if args.task == "addition" else "validity"
    first = [r for r in results if r["method"] == rows[0]["method"]]
    metrics = present_metrics(rows)
    lines = []
    for key, (_, start_key, teacher_key, _, label) in metrics:
        start, teacher = (mean_std([r[k] for r in first]) for k in (start_key, teacher_key))
        if len(metrics) > 1:
            lines += [f"**{word.capitalize()}, {label}** (%, on each seed's {args.eval_problems} held-out prompts)", ""]
        lines.append(
            f"Warmed-up student (every method's start): {100 * start[0]:.1f} +- {100 * start[1]:.1f}%; "
            f"teacher: {100 * teacher[0]:.1f} +- {100 * teacher[1]:.1f}%."
        )
        lines += ["", table(key, rows), ""]
    for _, metric in metrics:
        verdict = criterion(rows, metric.prefix)
        if verdict is not None:
            lines.append(criterion_line(verdict, metric.label))
    sft = next((row["completion_tokens_mean"] for row in rows if row["method"] == "sft"), None)
    unequal = [r for r in rows if sft and abs(r["completion_tokens_mean"] / sft - 1) > 0.05]
    if unequal:  # the budget is equal in steps and prompts; say where it was not in tokens
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


def bar_chart(rows: list[dict], results: list[dict], args: argparse.Namespace, path: Path) -> None:
    """Mean score per method at half and at the whole budget, with the spread over seeds and each seed's dot; one
    panel per recorded score (greedy, and sampled at temperature 1)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = present_metrics(rows)
    figure = Figure(figsize=(9, 4.2 * len(metrics)), dpi=120)
    FigureCanvasAgg(figure)  # the Agg backend for this figure only
    panels = figure.subplots(len(metrics), 1, squeeze=False)[:, 0]
    colours = {"sft": "tab:gray", "seqkd": "tab:brown"}
    for axes, (_, (_, start_key, _, prefix, label)) in zip(panels, metrics):
        for index, row in enumerate(rows):
            lmbda = METHODS[row["method"]].lmbda
            colour = colours.get(row["method"]) or {0.0: "tab:orange", 1.0: "tab:blue", 0.5: "tab:purple"}[lmbda]
            axes.bar(index - 0.2, 100 * row[f"half_budget_{prefix}accuracy_mean"], width=0.4, color=colour, alpha=0.4)
            mean, std = 100 * row[f"{prefix}accuracy_mean"], 100 * row[f"{prefix}accuracy_std"]
            axes.bar(index + 0.2, mean, yerr=std, width=0.4, color=colour)
            seeds = [100 * a for a in row[f"{prefix}per_seed"]]
            axes.scatter([index + 0.2] * len(seeds), seeds, color="black", s=6, zorder=3)
        start = statistics.fmean(r[start_key] for r in results if r["method"] == rows[0]["method"])
        axes.axhline(100 * start, color="tab:red", linestyle=":", label="warmed-up student (every method's start)")
        axes.set_xticks(range(len(rows)), [METHODS[row["method"]].short for row in rows], fontsize=8)
        if args.task == "addition":
            axes.set_ylabel("held-out exact-match accuracy (%)")
            what = f"{args.digits}-digit addition chains"
        else:
            axes.set_ylabel(f"held-out valid answers, {label} (%)")
            what = f"{args.task} task, {label}"
        what += ", canonical references" if getattr(args, "references", "sampled") == "canonical" else ""
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


# ---------------------------------------------------------------------------------------------------------------------
# The modes
# ---------------------------------------------------------------------------------------------------------------------


def prepare_seeds(args: argparse.Namespace, pool: ThreadPoolExecutor) -> list[dict]:
    print(f"preparing teachers and warmed-up students for seeds {args.seeds}", flush=True)
    return list(pool.map(lambda seed: spawn_run(args, seed, "prepare"), args.seeds))


def table_mode(args: argparse.Namespace, methods: list[str]) -> None:
    started = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        prepared = prepare_seeds(args, pool)
        if args.prepare_only:
            print(json.dumps([{k: v for k, v in p.items() if k != "config"} for p in prepared], indent=2))
            return
        runs = [(seed, method) for seed in args.seeds for method in methods]
        print(f"{len(runs)} runs, {args.jobs} at a time", flush=True)
        results = list(pool.map(lambda run: spawn_run(args, *run), runs))
    rows = aggregate(results, methods)
    report = Report("gkd_table", args)
    text = summary_text(rows, results, args, lambda name, rows: report.table(name, rows, TABLES))
    print(text)
    verdicts = {key: criterion(rows, metric.prefix) for key, metric in present_metrics(rows)}
    seconds = round(time.perf_counter() - started)
    summary = {"args": vars(args), "rows": rows, "criterion": verdicts, "runs": results, "seconds": seconds}
    (Path(args.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (Path(args.output_dir) / "table.md").write_text(text + "\n")
    bar_chart(rows, results, args, Path(args.plot))
    print(f"wrote {args.output_dir}/summary.json, table.md and {args.plot} in {seconds}s")


def replot(args: argparse.Namespace) -> None:
    """Only redraw the table and the chart from summary.json (nothing is written to --output)."""
    summary = json.loads((Path(args.output_dir) / "summary.json").read_text())
    saved = argparse.Namespace(**{**summary["args"], "plot": args.plot})
    columns = {key: TABLES[key](vars(saved)) for key in METRICS}
    print(summary_text(summary["rows"], summary["runs"], saved, lambda name, rows: markdown(rows, columns[name])))
    bar_chart(summary["rows"], summary["runs"], saved, Path(args.plot))


def hidden_rows(results: list[dict], methods: list[str]) -> list[dict]:
    """Per method: accuracy at half and the whole budget per seed and their means, the first step's loss, timing."""
    rows = []
    for name in methods:
        runs = sorted((r for r in results if r["method"] == name), key=lambda r: r["seed"])
        half = [next(p for p in r["curve"] if p["step"] >= r["curve"][-1]["step"] // 2) for r in runs]
        final = [r["accuracy"] for r in runs]
        seconds = {key: statistics.fmean(r["step_seconds"][key] for r in runs) for key in runs[0]["step_seconds"]}
        row = {"method": name, "label": HIDDEN_METHODS[name].label, "seeds": [r["seed"] for r in runs]}
        row |= {"half_step": half[0]["step"], "half_budget_accuracy": [p["accuracy"] for p in half], "accuracy": final}
        row |= {
            "half_budget_accuracy_mean": statistics.fmean(p["accuracy"] for p in half),
            "accuracy_mean": statistics.fmean(final),
            "accuracy_std": mean_std(final)[1],
            "first_step_loss": [r["losses"][0]["loss"] if r["losses"] else None for r in runs],
            "step_seconds_mean": seconds,
            "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in runs),
        }
        rows.append(row)
    return rows


def hidden_mode(args: argparse.Namespace, methods: list[str]) -> None:
    """The teacher server's hidden format against top-1 and the local teacher, one server per seed."""
    os.environ["OMP_NUM_THREADS"] = "1"  # the servers inherit it: one torch thread each
    with ThreadPoolExecutor(args.jobs) as pool:
        prepare_seeds(args, pool)
    with contextlib.ExitStack() as stack:
        urls = {}
        for seed in args.seeds if any(HIDDEN_METHODS[m].response_format for m in methods) else []:
            folder = Path(args.output_dir) / f"seed{seed}"
            urls[seed] = stack.enter_context(Server(str(folder / "teacher"), True, folder)).url
            print(f"  seed {seed}: teacher server at {urls[seed]}", flush=True)
        runs = [(seed, method) for seed in args.seeds for method in methods]
        print(f"{len(runs)} runs, {args.jobs} at a time", flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda run: spawn_run(args, *run, urls.get(run[0], "")), runs))
    rows = hidden_rows(results, methods)
    first = [r for r in results if r["method"] == methods[0]]
    start, teacher = (statistics.fmean(r[key] for r in first) for key in ("start_accuracy", "teacher_accuracy"))
    print(
        f"{args.steps} steps x {args.batch_size} prompts, on-policy (lmbda 1), JSD beta 0.5, hidden states sent as "
        f"{args.hidden_dtype}. Start (warmed-up student): {100 * start:.1f}%; teacher: {100 * teacher:.1f}% (means).\n"
        f"Cells: held-out accuracy (%) at step {rows[0]['half_step']} / step {args.steps}.\n"
    )
    print(Report("gkd_table", args).table("hidden", rows, TABLES))
    losses = {row["method"]: row["first_step_loss"] for row in rows}
    if {"hidden", "local"} <= set(losses):
        pairs = [f"{h:.6f} vs {c:.6f}" for h, c in zip(losses["hidden"], losses["local"]) if h and c]
        print("\nStep-1 loss (same student, same samples), hidden vs local, per seed: " + "; ".join(pairs))


def gradients_mode(args: argparse.Namespace) -> None:
    reference, rows = gradients(Path(args.output_dir) / f"seed{args.seed}", args.seed)
    report = Report("gkd_table", args)
    print(
        f"teacher probability of the reference tokens: mean {reference['mean']:.5f}, lowest {reference['lowest']:.4f}"
    )
    print(report.table("gradients", [{**row, "reference": reference} for row in rows], TABLES))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from protege.demo.tasks import TASK_NAMES  # light: no torch

    options = parser("gkd_table", __doc__, quick="seed 0, 3 methods (hidden: all 3), 4 steps, 32 held-out problems")
    options.add_argument("mode", nargs="?", choices=["table", "hidden", "gradients"], default="table")
    options.add_argument("--task", choices=TASK_NAMES, default="addition", help="the demo task (protege demo --task)")
    options.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    options.add_argument("--methods", nargs="+", choices=sorted(ALL_METHODS), default=None, help="default: the mode's")
    options.add_argument("--digits", type=int, default=6, help="addition: digits per number, one chain line each")
    options.add_argument("--steps", type=int, default=None, help="steps per method (60 addition, else 200)")
    options.add_argument("--batch-size", type=int, default=64, help="prompts per step")
    options.add_argument("--eval-every", type=int, default=None, help="steps between scores (10 addition, else 20)")
    options.add_argument("--schedule", default="linear", choices=["constant", "linear", "cosine"], help="learning rate")
    options.add_argument("--eval-problems", type=int, default=500, help="held-out problems per seed")
    options.add_argument("--warmup-steps", type=int, default=10, help="linear learning-rate warm-up, every method")
    options.add_argument(
        "--optimizer", default="fresh", choices=["fresh", "continue"], help="continue: the warm-up's AdamW state"
    )
    options.add_argument(
        "--references",
        default="sampled",
        choices=["sampled", "canonical"],
        help="the dataset's completions (SFT, supervised KD, mixed): the task's own samples (default; diverse on "
        "letters and walks), or canonical, the task's one house-style answer per prompt (Task.canonical)",
    )
    options.add_argument("--hidden-dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="hidden")
    options.add_argument("--jobs", type=int, default=2, help="runs at once (1 torch thread each)")
    options.add_argument("--output-dir", default=None, help="default: runs/gkd_table[_TASK][_canonical], runs/MODE")
    options.add_argument("--plot", default=None, help="default: docs/gkd_table[_TASK][_canonical].png")
    options.add_argument("--fresh", action="store_true", help="rerun methods whose results are already saved")
    options.add_argument("--replot", action="store_true", help="only redraw the table and chart from summary.json")
    options.add_argument("--prepare-only", action="store_true", help="only each seed's teacher and warmed-up student")
    options.add_argument("--seed", type=int, default=0, help="gradients: the seed (also a worker's)")
    options.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    options.add_argument("--method", default=None, help=argparse.SUPPRESS)
    options.add_argument("--out", default=None, help=argparse.SUPPRESS)
    options.add_argument("--url", default=None, help=argparse.SUPPRESS)
    return options.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    suffix = ("" if args.task == "addition" else f"_{args.task}") + ("_canonical" * (args.references == "canonical"))
    folders = {"table": f"gkd_table{suffix}", "hidden": "hidden_vs_top1", "gradients": "gkd_table_fresh"}
    args.output_dir = args.output_dir or str(REPO / "runs" / folders[args.mode])
    args.plot = args.plot or str(REPO / "docs" / f"gkd_table{suffix}.png")
    args.steps = args.steps or BUDGETS[args.task][0]
    args.eval_every = args.eval_every or BUDGETS[args.task][1]
    if args.quick:  # its prepare worker applies them too, so the prepared seeds agree
        args.seeds, args.steps, args.eval_every, args.eval_problems = args.seeds[:1], 4, 2, 32
    methods = args.methods or (list(HIDDEN_METHODS) if args.mode == "hidden" else QUICK_METHODS if args.quick else [])
    methods = methods or list(METHODS)
    if args.worker:
        run_worker(args)
        return 0
    if wrong := [m for m in methods if (m in HIDDEN_METHODS) != (args.mode == "hidden")]:
        raise SystemExit(f"methods {wrong} are not the {args.mode} mode's")
    if args.mode == "gradients":
        gradients_mode(args)
    elif args.replot:
        replot(args)
    elif args.mode == "hidden":
        hidden_mode(args, methods)
    else:
        table_mode(args, methods)
    return 0


if __name__ == "__main__":
    sys.exit(main())
