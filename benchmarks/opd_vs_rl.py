"""Distillation against RL on the same budget (issue 28): GKD, policy-gradient OPD, OPD + reward, RL only, SFT.

    python -m benchmarks opd_vs_rl --seeds 0 1 2 3 4     # the protocol's run (docs/benchmarks.md), 2 runs at a time
    python -m benchmarks opd_vs_rl --quick               # smoke run: seed 0, 10 steps, scores every 5
    python -m benchmarks opd_vs_rl --seeds 0 --methods gkd rl   # some of the methods

On the walks task with canonical references (`protege demo --task walks`; design 3 of docs/benchmarks.md), every
method starts from the same warmed-up student of a seed and trains the same steps with the same sampled completions
per step (`protege.demo.rl_run.METHODS`): on-policy GKD (reverse KL over the full vocabulary), policy-gradient OPD (the
teacher's log-prob of each sampled token is the only advantage), the same plus the walk-validity reward, RL on that
reward alone (`kl_coef` 0, `num_generations` 4, no teacher) and SFT on the canonical references. Each is scored on the
seed's held-out prompts every `--eval-every` steps: one sample per prompt at temperature 1 (the primary metric) and
greedy.

Tables: `validity` (before, at 25/50/100% of the budget, gain, per seed, teacher bytes a token, the steps each
distillation method needs to reach RL-only's final validity), `curves` (mean sampled validity by step), `logged` (the
trainer's reward and policy-gradient figures, averaged over each run) and `criteria` (issue 28's two, judged as the
protocol fixed them). The seeds' teachers and warmed-up students are copied from `--models-from` (design 3's run) when
there, else trained; each (seed, method) runs in a fresh worker process, `--jobs` at a time, one torch thread each,
and a finished run of the same configuration is reused unless `--fresh`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks import REPO, Column, Report, failure, module_command, parser, spawn, worker_env
from protege.demo.rl_run import METHODS

RUN_KEYS = ("steps", "batch_size", "eval_every", "eval_problems")
SCORES = {"accuracy": "greedy", "sampled": "sampled"}
RATIO_NEEDED = 0.8  # criterion 1: policy-gradient OPD's gain at least 80% of GKD's
STEP_SHARE = 5  # criterion 2: RL-only's final validity reached in at most 1/5 of its steps


def pm(pair: tuple[float, float] | None) -> str | None:
    return None if pair is None else f"{pair[0]:.1f} +- {pair[1]:.1f}"


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and standard deviation over seeds (0 for one seed), in percent."""
    values = [100 * value for value in values]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def reach(row: dict) -> str:
    if row.get("reach_mean") is None and "reach_per_seed" not in row:
        return ""
    mean = "not reached" if row["reach_mean"] is None else str(row["reach_mean"])
    seeds = " / ".join("-" if s is None else str(s) for s in row["reach_per_seed"])
    return f"{mean} ({seeds})"


def curve_steps(settings: dict) -> list[int]:
    """The steps the curves table shows: the first five scores, then 25/50/75/100% of the budget."""
    steps, every = settings["steps"], settings["eval_every"]
    wanted = {every * k for k in range(6)} | {steps // 4, steps // 2, 3 * steps // 4, steps}
    return sorted(s for s in wanted if s <= steps and (s % every == 0 or s == steps))


def validity_columns(settings: dict) -> list[Column]:
    quarter, half, steps = (point_step(settings, share) for share in (0.25, 0.5, 1.0))
    return [
        Column("method", "label", text=True),
        Column("teacher bytes a token", "teacher_bytes", text=True),
        Column("sampled before", lambda r: pm(r["before"])),
        Column(f"step {quarter} (25%)", lambda r: pm(r["quarter"])),
        Column(f"step {half} (50%)", lambda r: pm(r["half"])),
        Column(f"step {steps} (100%)", lambda r: f"**{pm(r['final'])}**"),
        Column("gain", lambda r: pm(r["gain"])),
        Column("per seed", lambda r: " / ".join(f"{100 * v:.1f}" for v in r["per_seed"]), text=True),
        Column("greedy after", lambda r: pm(r["greedy"])),
        Column("steps to RL-only's final (mean curve; per seed)", reach, text=True),
        Column("completion tokens", "tokens", "{:,.0f}"),
        Column("train s", "train_seconds", "{:.0f}"),
    ]


def curve_columns(settings: dict) -> list[Column]:
    cells = [Column(f"{s}", lambda r, s=s: r["curve"].get(str(s)), "{:.1f}") for s in curve_steps(settings)]
    return [Column("method (mean sampled validity, %, by step)", "label", text=True), *cells]


TABLES = {
    "validity": validity_columns,
    "curves": curve_columns,
    "logged": [
        Column("method", "label", text=True),
        Column("reward mean", "reward/mean", "{:.3f}"),
        Column("pg/teacher_advantage_mean", "pg/teacher_advantage_mean", "{:.4f}"),
        Column("pg/rho_mean", "pg/rho_mean", "{:.4f}"),
        Column("pg/rho_max", "pg/rho_max", "{:.3f}"),
        Column("pg/rho_truncated_fraction", "pg/rho_truncated_fraction", "{:.4f}"),
        Column("on_policy_reverse_kl_estimate", "on_policy_reverse_kl_estimate", "{:.4f}"),
    ],
    "criteria": [
        Column("criterion (issue 28)", "criterion", text=True),
        Column("found", "found", text=True),
        Column("needed", "needed", text=True),
        Column("met", lambda r: "**met**" if r["met"] else "**not met**", text=True),
    ],
}


def point_step(settings: dict, share: float) -> int:
    """The first scored step at or after `share` of the budget."""
    target, every = share * settings["steps"], settings["eval_every"]
    return min(settings["steps"], every * -int(-target // every))


# ---------------------------------------------------------------------------------------------------------------------
# One run in a worker process
# ---------------------------------------------------------------------------------------------------------------------


def settings_for(args: argparse.Namespace) -> Any:
    """The walks demo's settings (design 3's models) with the comparison's budget and scoring."""
    from protege.demo.settings import Settings

    base = Settings.for_run(False, "walks")
    return replace(
        base,
        distill_steps=args.steps,
        distill_batch_size=args.batch_size,
        eval_every=args.eval_every,
        eval_problems=args.eval_problems,
        kl_problems=8,
        distill_schedule="linear",
        distill_warmup_steps=10,
    )


def run_config(args: argparse.Namespace) -> dict:
    """What a saved run depends on: it is reused only when all of this is equal."""
    return {key: getattr(args, key) for key in RUN_KEYS} | {"settings": repr(settings_for(args))}


def copy_models(source: Path, folder: Path) -> None:
    """The seed's cached teacher and warmed-up student from an earlier run's folder, when this one has none (the
    demo's cache checks their fingerprints when it loads them)."""
    for name in ("teacher", "student_warmup"):
        if (source / name / "demo.json").exists() and not (folder / name / "demo.json").exists():
            shutil.copytree(source / name, folder / name, dirs_exist_ok=True)


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One (seed, method) run, or with method "prepare" the seed's models and their scores before any method."""
    import torch
    from rich.progress import Progress
    from transformers.utils import logging as transformers_logging

    from protege.demo import pipeline
    from protege.demo.rl_run import run_trainer_method
    from protege.demo.scoring import scores

    torch.set_num_threads(1)
    transformers_logging.set_verbosity_error()
    settings, folder, quiet = settings_for(args), Path(args.output_dir) / f"seed{args.seed}", Progress(disable=True)
    if args.method == "prepare":
        copy_models(Path(args.models_from) / f"seed{args.seed}", folder)
    prepared = pipeline.prepare(folder, settings, args.seed, quiet)
    if args.method == "prepare":
        found = {
            role: scores(model, prepared.encoder, prepared.eval_problems, True, args.seed)
            for role, model in (("teacher", prepared.teacher), ("student", prepared.student))
        }
        return {"seed": args.seed, "method": "prepare", **found, "cached": prepared.student_info.get("cached")}
    start = json.loads((folder / "prepare.json").read_text())["student"]
    count = settings.distill_steps * settings.distill_batch_size
    problems = prepared.training_problems(settings, args.seed, count, "distill")
    started = time.perf_counter()
    if METHODS[args.method].kind == "sft":
        from benchmarks.gkd_runs import METHODS as GKD_METHODS
        from benchmarks.gkd_runs import supervised

        canonical = [prepared.task.canonical(problem) for problem in problems]
        torch.manual_seed(args.seed)
        options = argparse.Namespace(optimizer="fresh", seed=args.seed)
        curve, tokens, eval_seconds = supervised(GKD_METHODS["sft"], settings, prepared, canonical, start, options)
        run = {"curve": curve, "completion_tokens": tokens, "eval_seconds": eval_seconds, "logged": {}}
    else:
        run = run_trainer_method(args.method, prepared, settings, args.seed, problems, start, folder, quiet)
    seconds = time.perf_counter() - started - run["eval_seconds"]
    return {"seed": args.seed, "method": args.method, "start": start, **run, "train_seconds": round(seconds, 2)}


def spawn_run(args: argparse.Namespace, seed: int, method: str) -> dict:
    """One run in a fresh process, or its saved result when the same configuration already finished."""
    out = Path(args.output_dir) / f"seed{seed}" / f"{method}.json"
    if out.exists() and not args.fresh:
        saved = json.loads(out.read_text())
        if saved.get("config") == run_config(args):
            return saved
    flags = ["--worker", "--seeds", seed, "--method", method, "--output-dir", args.output_dir]
    flags += ["--models-from", args.models_from]
    for key in RUN_KEYS:
        flags += [f"--{key.replace('_', '-')}", getattr(args, key)]
    env = worker_env(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    started = time.perf_counter()
    done = spawn(module_command(sys.executable, "benchmarks.opd_vs_rl", *flags), env=env)
    if done.returncode != 0 or done.result is None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".log").write_text(done.stdout + done.stderr)
        raise RuntimeError(f"seed {seed} {method}: {failure(done)} (log: {out.with_suffix('.log')})")
    result = {**done.result, "config": run_config(args)}
    out.write_text(json.dumps(result, indent=2))
    shown = result["student"] if method == "prepare" else result["curve"][-1]
    words = "  ".join(f"{SCORES[key]} {value:.3f}" for key, value in shown.items() if key in SCORES)
    print(f"  seed {seed} {method:14s} {time.perf_counter() - started:6.1f}s  {words}", flush=True)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Over seeds: rows, criteria, tables, the chart
# ---------------------------------------------------------------------------------------------------------------------


def at_step(run: dict, step: int, key: str = "sampled") -> float:
    """The run's score at the first scored step at or after `step`."""
    return next(point[key] for point in run["curve"] if point["step"] >= step)


def first_reaching(curve: list[tuple[int, float]], level: float) -> int | None:
    """The first step of `curve` ((step, value) pairs) whose value is at least `level`."""
    return next((step for step, value in curve if value >= level), None)


def mean_curve(runs: list[dict]) -> list[tuple[int, float]]:
    steps = [point["step"] for point in runs[0]["curve"]]
    return [(step, statistics.fmean(at_step(run, step) for run in runs)) for step in steps]


def aggregate(results: list[dict], methods: list[str], settings: dict) -> list[dict]:
    """One row per method, its scores over seeds; with `rl` in the run, each distillation method's steps to RL-only's
    final validity (on the mean curve, and per seed against that seed's RL-only run)."""
    by_method = {m: sorted((r for r in results if r["method"] == m), key=lambda r: r["seed"]) for m in methods}
    rl = by_method.get("rl")
    rows = []
    for name, runs in by_method.items():
        method, before = METHODS[name], [r["start"]["sampled"] for r in runs]
        final = [r["curve"][-1]["sampled"] for r in runs]
        row: dict[str, Any] = {"method": name, "label": method.label, "teacher_bytes": method.teacher_bytes}
        row |= {"seeds": [r["seed"] for r in runs], "before": spread(before), "final": spread(final)}
        row |= {"quarter": spread([at_step(r, point_step(settings, 0.25)) for r in runs])}
        row |= {"half": spread([at_step(r, point_step(settings, 0.5)) for r in runs])}
        row |= {"gain": spread([f - b for f, b in zip(final, before)]), "per_seed": final}
        row |= {"greedy": spread([r["curve"][-1]["accuracy"] for r in runs])}
        row |= {"curve": {str(step): 100 * value for step, value in mean_curve(runs)}}
        row |= {"tokens": statistics.fmean(r["completion_tokens"] for r in runs)}
        row |= {"train_seconds": statistics.fmean(r["train_seconds"] for r in runs)}
        logged = [r["logged"] for r in runs]
        row |= {key: statistics.fmean(x[key] for x in logged) for key in logged[0] if all(key in x for x in logged)}
        if rl and method.distillation:
            level = statistics.fmean(r["curve"][-1]["sampled"] for r in rl)
            row["reach_mean"] = first_reaching(mean_curve(runs), level)
            finals = {r["seed"]: r["curve"][-1]["sampled"] for r in rl}
            row["reach_per_seed"] = [
                first_reaching([(p["step"], p["sampled"]) for p in r["curve"]], finals[r["seed"]])
                if r["seed"] in finals
                else None
                for r in runs
            ]
        rows.append(row)
    return rows


def criteria(rows: list[dict], settings: dict) -> list[dict]:
    """Issue 28's two criteria as the protocol judges them (docs/benchmarks.md), where the run has their methods."""
    found = {row["method"]: row for row in rows}
    verdicts = []
    if {"gkd", "pg_opd"} <= set(found):
        gkd, pg = found["gkd"]["gain"][0], found["pg_opd"]["gain"][0]
        ratio = pg / gkd if gkd > 0 else None
        extra = ""
        if "pg_opd_reward" in found and gkd > 0:
            extra = f"; with the reward (not counted): {found['pg_opd_reward']['gain'][0] / gkd:.0%}"
        verdicts.append(
            {
                "criterion": "1. policy-gradient OPD reaches at least 80% of GKD's gain, the teacher sending at most 4 "
                "bytes a token",
                "found": f"gain {pg:+.1f} against GKD's {gkd:+.1f} points: "
                + ("n/a" if ratio is None else f"{ratio:.0%}")
                + f", 4 bytes a token{extra}",
                "needed": f">= {RATIO_NEEDED:.0%}, <= 4 bytes",
                "met": ratio is not None and ratio >= RATIO_NEEDED,
                "ratio": ratio,
            }
        )
    reaching = [row for row in rows if "reach_mean" in row]
    if "rl" in found and reaching:
        limit = settings["steps"] // STEP_SHARE
        shown = ", ".join(
            f"{row['method']} {'not reached' if row['reach_mean'] is None else row['reach_mean']}" for row in reaching
        )
        if found["rl"]["final"][0] <= found["rl"]["before"][0]:
            shown += " (RL-only ended at or below its start, so step 0 reaches it)"
        best = [row["reach_mean"] for row in reaching if row["reach_mean"] is not None]
        verdicts.append(
            {
                "criterion": "2. a distillation method reaches RL-only's final validity in at most 1/5 of RL-only's "
                "steps",
                "found": f"RL-only's final {found['rl']['final'][0]:.1f}% at step {settings['steps']}; steps to reach "
                f"it: {shown}",
                "needed": f"<= {limit} steps",
                "met": bool(best) and min(best) <= limit,
            }
        )
    return verdicts


def draw(rows: list[dict], settings: dict, path: Path) -> None:
    """Each method's mean sampled validity by step; RL-only's final level and 1/5 of the budget as guides."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for row in rows:
        steps = [int(step) for step in row["curve"]]
        axes.plot(steps, list(row["curve"].values()), marker=".", label=row["label"])
    rl = next((row for row in rows if row["method"] == "rl"), None)
    if rl is not None:
        axes.axhline(rl["final"][0], color="gray", linestyle=":", label="RL-only's final")
        axes.axvline(settings["steps"] / STEP_SHARE, color="gray", linestyle="--", label="1/5 of the steps")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("held-out valid walks, one sample at T=1 (%)")
    axes.set_ylim(0, 100)
    axes.set_title(f"walks, canonical references: mean over seeds {rows[0]['seeds']}", fontsize=9)
    axes.legend(fontsize=8, loc="lower right")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


def report(args: argparse.Namespace, results: list[dict], methods: list[str]) -> str:
    settings = {key: getattr(args, key) for key in RUN_KEYS}
    rows = aggregate(results, methods, settings)
    out = Report("opd_vs_rl", args)
    parts = [out.table(name, rows, TABLES) for name in ("validity", "curves")]
    trained = [row for row in rows if any(key.startswith(("reward/", "pg/", "on_policy_")) for key in row)]
    if trained:
        parts.append(out.table("logged", trained, TABLES))
    verdicts = criteria(rows, settings)
    if verdicts:
        parts.append(out.table("criteria", verdicts, TABLES))
    reference = next((row["tokens"] for row in rows if row["method"] == "gkd"), None)
    off = [r for r in rows if reference and abs(r["tokens"] / reference - 1) > 0.05]
    if off:
        parts.append("Completion tokens more than 5% off GKD's: " + ", ".join(r["label"] for r in off) + ".")
    summary = {"args": vars(args), "rows": rows, "criteria": verdicts, "runs": results}
    (Path(args.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    draw(rows, settings, Path(args.plot))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    options = parser("opd_vs_rl", __doc__, quick="seed 0, 10 steps, scores every 5")
    options.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    options.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    options.add_argument("--steps", type=int, default=200, help="optimizer steps per method")
    options.add_argument("--batch-size", type=int, default=64, help="completions per step (rl: 16 prompts x 4)")
    options.add_argument("--eval-every", type=int, default=10, help="steps between scores")
    options.add_argument("--eval-problems", type=int, default=500, help="held-out prompts per seed")
    options.add_argument("--jobs", type=int, default=2, help="runs at once (1 torch thread each)")
    options.add_argument("--output-dir", default=str(REPO / "runs" / "opd_vs_rl"))
    options.add_argument("--models-from", default=str(REPO / "runs" / "gkd_table_walks_canonical"))
    options.add_argument("--plot", default=None, help="default: docs/opd_vs_rl.png (--quick: in --output-dir)")
    options.add_argument("--fresh", action="store_true", help="rerun runs whose results are already saved")
    options.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    options.add_argument("--method", default=None, help=argparse.SUPPRESS)
    args = options.parse_args(argv)
    if args.worker:  # its parent passes every setting
        from benchmarks import emit_result

        args.seed = args.seeds[0]
        emit_result(run_worker(args))
        return 0
    if args.quick:
        args.seeds, args.steps, args.eval_every = args.seeds[:1], 10, 5
        args.output_dir = str(Path(args.output_dir).with_name(Path(args.output_dir).name + "_quick"))
    args.plot = args.plot or str(
        Path(args.output_dir) / "curves.png" if args.quick else REPO / "docs" / "opd_vs_rl.png"
    )
    started = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda seed: spawn_run(args, seed, "prepare"), args.seeds))
        runs = [(seed, method) for seed in args.seeds for method in args.methods]
        print(f"{len(runs)} runs, {args.jobs} at a time", flush=True)
        results = list(pool.map(lambda run: spawn_run(args, *run), runs))
    print(report(args, results, args.methods))
    print(f"\n{time.perf_counter() - started:.0f} s; rows in {args.output}, runs in {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
