"""One student from two teachers against each teacher alone: `protege demo --task mixture` over several seeds.

    python -m benchmarks mixture --seeds 0 1 2          # 3 seeds, 2 at a time: ~20 min on a loaded 2-core machine
    python -m benchmarks mixture --seeds 0 1 2 --control   # then each teacher alone on the mixture's share
    python -m benchmarks mixture --quick                # smoke run: seed 0, `protege demo --task mixture --quick`

Each seed is one `protege demo --task mixture --seed N` in its own process (`--jobs` at a time, one torch thread
each; its folder under `--output-dir` keeps the teachers and the warmed-up student, so a rerun only distils and
scores again). A seed trains an addition teacher and a walks teacher, warms up one student on both tasks, then
distils that student three times with the same steps and about the same sampled completion tokens: from both
teachers in one run (each row routed to its task's teacher), and from each teacher alone.

`gains`: for each task's headline score (addition: greedy exact match; walks: validity of one sample per prompt at
temperature 1), the student's score before and after each run, mean +- standard deviation over seeds, and the
mixture's gain as a share of the single-teacher run's gain (the ratio of the mean gains, and per seed). `runs`: each
run's budget (steps, prompts per step, sampled completion tokens by teacher) and the seconds its training took.

`control` (with `--control`): where the mixture's gain falls short, is it the tokens it gives a task or the sharing?
Each task's teacher alone again, from the seed's same warmed-up student, on that task's share of the mixture's
prompts only (its rows per step in the mixture, the same steps: the first prompts of the same stream), in a worker
process per seed that loads the seed's cached models. A finished seed's results.json is reused unless `--fresh`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks import REPO, Column, Report, emit_result, failure, parser, spawn, worker_env

MIXTURE = "mixture"
SCORE_NAMES = {"accuracy": "greedy", "sampled": "sampled T=1"}


def spread(values: list[float]) -> tuple[float, float]:
    """Mean and standard deviation over seeds (0 for one seed), in percent."""
    values = [100 * value for value in values]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def pm(pair: tuple[float, float]) -> str:
    return f"{pair[0]:.1f} +- {pair[1]:.1f}"


TABLES = {
    "gains": [
        Column("task, score", "label", text=True),
        Column("teacher", lambda r: pm(r["teacher"])),
        Column("student before", lambda r: pm(r["before"])),
        Column("after mixture (both teachers)", lambda r: pm(r["mixture"])),
        Column("after its teacher alone", lambda r: pm(r["alone"])),
        Column("after the other teacher alone", lambda r: pm(r["other"])),
        Column("gain, mixture", lambda r: pm(r["gain_mixture"]), "{}"),
        Column("gain, alone", lambda r: pm(r["gain_alone"]), "{}"),
        Column("mixture / alone", "ratio", "{:.0%}"),
        Column("per seed", lambda r: " / ".join(f"{x:.0%}" for x in r["ratios"]), text=True),
    ],
    "control": [
        Column("task, score", "label", text=True),
        Column("student before", lambda r: pm(r["before"])),
        Column("after mixture", lambda r: pm(r["mixture"])),
        Column("after alone, the mixture's share", lambda r: pm(r["share"])),
        Column("after alone, full budget", lambda r: pm(r["alone"])),
        Column("prompts per step (share / full)", "batches", text=True),
        Column("completion tokens (share)", "tokens", "{:,.0f}"),
    ],
    "runs": [
        Column("run", "run", text=True),
        Column("steps", "steps"),
        Column("prompts per step", "batch_size"),
        Column("completion tokens", "tokens", "{:,.0f}"),
        Column("by teacher", lambda r: ", ".join(f"{k} {v:,.0f}" for k, v in r["by_teacher"].items()), text=True),
        Column("train s", "train_seconds", "{:.0f}"),
    ],
}


def run_seed(seed: int, output: Path, quick: bool, fresh: bool) -> dict[str, Any]:
    """`protege demo --task mixture` for one seed in a fresh process (or its results.json from an earlier run)."""
    folder = output / f"seed{seed}"
    if (folder / "results.json").exists() and not fresh:
        return json.loads((folder / "results.json").read_text())
    command = [sys.executable, "-m", "protege", "demo", "--task", MIXTURE, "--seed", str(seed)]
    command += ["--output-dir", str(folder), *(["--quick"] if quick else [])]
    done = spawn(command, env=worker_env())
    if done.returncode != 0:
        raise RuntimeError(f"seed {seed}: {failure(done)}")
    (folder / "console.log").write_text(done.stdout + done.stderr)
    return json.loads((folder / "results.json").read_text())


def run_control(seed: int, output: Path, quick: bool) -> dict[str, Any]:
    """`control_worker` for one seed in a fresh process; its result."""
    command = [sys.executable, "-m", "benchmarks.mixture", "--worker", "--seeds", str(seed)]
    command += ["--output-dir", str(output), *(["--quick"] if quick else [])]
    done = spawn(command, env=worker_env())
    if done.returncode != 0 or done.result is None:
        raise RuntimeError(f"control, seed {seed}: {failure(done)}")
    return done.result


def control_worker(seed: int, output: Path, quick: bool) -> None:
    """Each task's teacher alone on its share of the mixture's prompts, from the seed's cached teachers and warmed-up
    student (the demo's own stages, which load them); prints each task's scores before and after."""
    import torch

    from protege.demo.mixture_run import distill_run, distillation_mixture, prepare_part, warm_up
    from protege.demo.pipeline import quiet_libraries
    from protege.demo.progress import PlainProgress
    from protege.demo.settings import MixtureSettings
    from protege.demo.task import load_tokenizer

    settings, folder = MixtureSettings.for_run(quick), output / f"seed{seed}"
    tokenizer, progress = load_tokenizer(), PlainProgress(_Silent())
    result: dict[str, Any] = {}
    with quiet_libraries(settings.student.threads):
        torch.manual_seed(seed)
        parts = {
            name: prepare_part(folder, name, own, seed, tokenizer, progress) for name, own in settings.parts.items()
        }
        student = warm_up(folder, settings, seed, tokenizer, parts, progress)
        if not all(part.teacher.info["cached"] for part in parts.values()) or not student.info["cached"]:
            raise SystemExit(f"seed {seed}: run the seed's demo first (its models were not cached in {folder})")
        before = {name: part.snapshot(student.model, seed) for name, part in parts.items()}
        steps = settings.student.distill_steps
        counts = distillation_mixture(parts, settings.student).counts(steps * settings.student.distill_batch_size)
        for name, part in parts.items():
            batch = round(counts[name] / steps)
            run = distill_run(
                name, batch, parts, student, before, tokenizer, settings.student, seed, folder / "control", progress
            )
            after = part.snapshot(run.student, seed)
            result[name] = {"batch": batch, "tokens": run.completion_tokens, "after": _scores(after)}
    emit_result(result)


class _Silent:
    """A console that prints nothing: the worker's progress lines are not wanted."""

    def print(self, *args: Any, **kwargs: Any) -> None:
        return None


def _scores(snap: Any) -> dict[str, float]:
    return {
        "accuracy": snap.accuracy,
        **({"sampled": snap.sampled_accuracy} if snap.sampled_accuracy is not None else {}),
    }


def control_rows(results: list[dict[str, Any]], controls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each task's headline score: before, after the mixture, after its teacher alone on the mixture's share of its
    prompts, and after its teacher alone at the full budget."""
    rows = []
    for name, part in results[0]["task"]["parts"].items():
        key = part["headline"]
        rows.append(
            {
                "label": f"{name}, {SCORE_NAMES[key]}",
                "before": spread([r["before"][name][key] for r in results]),
                "mixture": spread([r["runs"][MIXTURE]["after"][name][key] for r in results]),
                "share": spread([c[name]["after"][key] for c in controls]),
                "alone": spread([r["runs"][name]["after"][name][key] for r in results]),
                "batches": f"{controls[0][name]['batch']} / {results[0]['runs'][name]['batch_size']}",
                "tokens": statistics.fmean(c[name]["tokens"] for c in controls),
            }
        )
    return rows


def gain_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per task and score: before, after each run, the gains and the mixture's share of its own run's."""
    rows = []
    for name, part in results[0]["task"]["parts"].items():
        other = next(run for run in results[0]["runs"] if run not in (MIXTURE, name))
        keys = [part["headline"]] + [
            key for key in SCORE_NAMES if key != part["headline"] and key in results[0]["before"][name]
        ]
        for key in keys:
            before = [r["before"][name][key] for r in results]
            after = {run: [r["runs"][run]["after"][name][key] for r in results] for run in (MIXTURE, name, other)}
            gains = {run: [a - b for a, b in zip(values, before)] for run, values in after.items()}
            alone_mean = statistics.fmean(gains[name])
            rows.append(
                {
                    "label": f"{name}, {SCORE_NAMES[key]}" + (" (headline)" if key == part["headline"] else ""),
                    "teacher": spread([r["teachers"][name][key] for r in results]),
                    "before": spread(before),
                    "mixture": spread(after[MIXTURE]),
                    "alone": spread(after[name]),
                    "other": spread(after[other]),
                    "gain_mixture": spread(gains[MIXTURE]),
                    "gain_alone": spread(gains[name]),
                    "ratio": statistics.fmean(gains[MIXTURE]) / alone_mean if alone_mean > 0 else None,
                    "ratios": [m / a if a > 0 else float("nan") for m, a in zip(gains[MIXTURE], gains[name])],
                }
            )
    return rows


def run_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run's budget, averaged over seeds."""
    rows = []
    for run, first in results[0]["runs"].items():
        records = [r["runs"][run] for r in results]
        rows.append(
            {
                "run": "mixture (both teachers)" if run == MIXTURE else f"{run} teacher alone",
                "steps": first["steps"],
                "batch_size": first["batch_size"],
                "tokens": statistics.fmean(r["completion_tokens"] for r in records),
                "by_teacher": {
                    name: statistics.fmean(r["teacher_completion_tokens"][name] for r in records)
                    for name in first["teacher_completion_tokens"]
                },
                "train_seconds": statistics.fmean(r["timings_s"][f"distillation_{run}"] for r in results),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    options = parser("mixture", __doc__, quick="seed 0, the demo's --quick settings")
    options.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    options.add_argument("--jobs", type=int, default=2, help="seeds at once (1 torch thread each)")
    options.add_argument("--output-dir", type=Path, default=REPO / "runs" / "mixture", help="one folder per seed")
    options.add_argument("--control", action="store_true", help="then each teacher alone on the mixture's share")
    options.add_argument("--fresh", action="store_true", help="rerun seeds whose results.json is already there")
    options.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = options.parse_args(argv)
    if args.worker:
        control_worker(args.seeds[0], args.output_dir, args.quick)
        return 0
    if args.quick:
        args.seeds = args.seeds[:1]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(lambda seed: run_seed(seed, args.output_dir, args.quick, args.fresh), args.seeds))
        controls = list(
            pool.map(lambda seed: run_control(seed, args.output_dir, args.quick), args.seeds * args.control)
        )
    for seed, result in zip(args.seeds, results):
        steps, seconds = result["models"]["student"]["steps"], result["timings_s"]["total"]
        print(f"seed {seed}: warm-up {steps} steps, total {seconds:.0f} s")
    report = Report("mixture", args)
    print(report.table("gains", gain_rows(results), TABLES))
    print()
    print(report.table("runs", run_rows(results), TABLES))
    if controls:
        print()
        print(report.table("control", control_rows(results, controls), TABLES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
