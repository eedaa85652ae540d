"""What the teacher server's "hidden" format buys in training: exact full-vocabulary JSD against the sparse top-1 JSD
that the log-prob formats allow, in on-policy distillation on protege's demo task.

A teacher server that sends log-probs ("compact", the default) gives the trainer the teacher's top-k only, so for
beta > 0 the JSD is the sparse `loss_top_k=1` approximation (teacher's top-1 token, the sampled token, a tail
bucket). The "hidden" format sends the teacher's final hidden states instead, and the trainer applies the teacher's
LM head (fetched once from the server's /lm_head/), so the loss is the full-vocabulary one a local teacher gives.
Three on-policy runs (lmbda 1, JSD beta 0.5) per seed:

* hidden: full vocabulary (`loss_top_k=0`) through the server, `teacher_server_response_format="hidden"`;
* top1: sparse top-1 (`loss_top_k=1`) through the same server, the default "compact" format;
* local: full vocabulary with the local teacher model, no server: the reference that "hidden" should match (it is
  benchmarks/gkd_table.py's `onpolicy_jsd`).

Everything else is benchmarks/gkd_table.py's, by calling its functions: the seed's teacher and warmed-up student
(`protege.demo.pipeline.prepare`, cached under `--output-dir` and scored once by gkd_table's prepare worker), the
prompt stream, batch size, steps, a fresh AdamW at the warm-up's learning rate with a 10-step warm-up and linear
decay, and greedy exact-match accuracy on the held-out problems every `--eval-every` steps. The server is one real
`python -m protege serve-teacher` on 127.0.0.1 per seed, on the teacher's cache folder (its `save_pretrained`
weights and tokenizer; float32), started by benchmarks/teacher_server.py's `Server`. The wire dtype of the hidden
states is `--hidden-dtype`: float32 (default here) makes "hidden" and "local" the same loss up to summation order,
float16 (the library's default) rounds the teacher's states by 2^-11. Each run is a fresh subprocess of this script,
`--jobs` at a time, 1 torch thread each (the servers too); finished runs are reused unless `--fresh`.

Output: a markdown table (held-out accuracy at half and at the whole budget, per seed and the mean) on stdout, and
every run (curves, per-step losses, seconds per step in generation / teacher / student) in `--json`.

    python benchmarks/hidden_vs_top1.py --seeds 0 1 2   # 3 seeds x 3 runs of 60 steps: 25 min on 2 busy cores
    python benchmarks/hidden_vs_top1.py --quick         # smoke run: seed 0, 4 steps, 32 held-out problems; 3 min
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import gkd_table  # siblings: benchmarks/ is on sys.path when this runs as a script
from teacher_server import Server
from workers import emit_result, spawn

REPO = Path(__file__).resolve().parent.parent
BETA = 0.5


@dataclass(frozen=True)
class Method:
    label: str
    server: bool  # score with the seed's teacher server (else the local teacher model)
    response_format: str | None
    loss_top_k: int


METHODS = {
    "hidden": Method("JSD(0.5) full vocabulary, server 'hidden'", True, "hidden", 0),
    "top1": Method("JSD(0.5) sparse top-1, server 'compact'", True, "compact", 1),
    "local": Method("JSD(0.5) full vocabulary, local teacher", False, None, 0),
}


# ----- Worker: one (seed, method) run in a fresh process -----


def run_method(args: argparse.Namespace) -> dict:
    """Distil the seed's warmed-up student on-policy with the method's teacher; its accuracy curve and logs."""
    import torch
    from rich.progress import Progress
    from transformers.utils import logging as transformers_logging

    from protege.demo import pipeline
    from protege.demo.distill import distill

    torch.set_num_threads(1)
    transformers_logging.set_verbosity_error()
    settings = gkd_table.settings_for(args)
    method = METHODS[args.method]
    folder = Path(args.output_dir) / f"seed{args.seed}"
    quiet = Progress(disable=True)
    prepared = pipeline.prepare(folder, settings, args.seed, quiet)
    saved = gkd_table.prepared_scores(folder, args) or gkd_table.scores(prepared, settings, args.seed)
    problems = prepared.training_problems(
        settings, args.seed, settings.distill_steps * settings.distill_batch_size, "distill"
    )
    overrides = {"lmbda": 1.0, "beta": BETA, "loss_top_k": method.loss_top_k, "logging_steps": 1}
    if method.server:
        overrides |= {
            "use_teacher_server": True,
            "teacher_model_server_url": args.url,
            "teacher_server_response_format": method.response_format,
            "teacher_server_hidden_dtype": args.hidden_dtype,
        }
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    distilled = distill(
        None if method.server else prepared.teacher,  # with a server the trainer must not get a teacher model
        prepared.student,
        prepared.optimizer_state if args.optimizer == "continue" else None,
        prepared.encoder,
        replace(settings, beta=BETA, distill_overrides=overrides),
        args.seed,
        problems,
        prepared.eval_problems,
        gkd_table.start_point(saved),
        folder / "hidden_vs_top1" / args.method,
        quiet,
    )
    return {
        "seed": args.seed,
        "method": args.method,
        "teacher_accuracy": saved["teacher_accuracy"],
        "start_accuracy": saved["start_accuracy"],
        "accuracy": distilled.curve[-1]["accuracy"],
        "curve": distilled.curve,
        "losses": distilled.losses,
        "step_seconds": distilled.step_seconds,
        "completion_tokens": distilled.completion_tokens,
        "train_seconds": round(time.perf_counter() - started - distilled.eval_seconds, 2),
    }


# ----- Parent: prepare the seeds, serve their teachers, run, tabulate -----


def run_config(args: argparse.Namespace) -> dict:
    """What a finished run's result depends on: gkd_table's run settings and the hidden states' wire dtype."""
    return {**gkd_table.run_config(args), "hidden_dtype": args.hidden_dtype}


def spawn_run(args: argparse.Namespace, seed: int, method: str, url: str) -> dict:
    """One run in a fresh process, or its saved result when the same configuration already finished (resuming)."""
    out = Path(args.output_dir) / f"seed{seed}" / "hidden_vs_top1" / f"{method}.json"
    if out.exists() and not args.fresh:
        saved = json.loads(out.read_text())
        if saved.get("config") == run_config(args):
            return saved
    argv = [sys.executable, __file__, "--worker", "--seed", str(seed), "--method", method, "--url", url]
    argv += ["--output-dir", args.output_dir, "--hidden-dtype", args.hidden_dtype]
    for key, value in gkd_table.run_config(args).items():
        if key != "quick":
            argv += [f"--{key.replace('_', '-')}", str(value)]
    argv += ["--quick"] if args.quick else []
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "PROTEGE_CACHE_DIR": str(Path(args.output_dir) / "protege_cache"),  # the fetched LM heads stay with the runs
    }
    started = time.perf_counter()
    done = spawn(argv, env=env)
    if done.returncode != 0 or done.result is None:
        raise SystemExit(f"seed {seed} {method} failed:\n{done.stderr[-4000:]}")
    result = {**done.result, "config": run_config(args)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"  seed {seed} {method:6s} {time.perf_counter() - started:6.1f}s  {result['accuracy']:.3f}", flush=True)
    return result


def half_budget(run: dict) -> dict:
    """The first point of the curve at or past half the run's steps (gkd_table's half-budget point)."""
    last = run["curve"][-1]["step"]
    return next(p for p in run["curve"] if p["step"] >= last // 2)


def summarise(results: list[dict], methods: list[str]) -> list[dict]:
    rows = []
    for name in methods:
        runs = sorted((r for r in results if r["method"] == name), key=lambda r: r["seed"])
        final = [r["accuracy"] for r in runs]
        half = [half_budget(r)["accuracy"] for r in runs]
        rows.append(
            {
                "method": name,
                "label": METHODS[name].label,
                "seeds": [r["seed"] for r in runs],
                "half_step": half_budget(runs[0])["step"],
                "half_budget_accuracy": half,
                "accuracy": final,
                "half_budget_accuracy_mean": statistics.fmean(half),
                "accuracy_mean": statistics.fmean(final),
                "accuracy_std": statistics.stdev(final) if len(final) > 1 else 0.0,
                "first_step_loss": [r["losses"][0]["loss"] if r["losses"] else None for r in runs],
                "step_seconds_mean": {
                    key: statistics.fmean(r["step_seconds"][key] for r in runs) for key in runs[0]["step_seconds"]
                },
                "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in runs),
            }
        )
    return rows


def markdown(rows: list[dict], results: list[dict], args: argparse.Namespace) -> str:
    """Accuracy (%) at half / the whole budget per method and seed, the mean, and each method's timing."""
    first = [r for r in results if r["method"] == rows[0]["method"]]
    start = statistics.fmean(r["start_accuracy"] for r in first)
    teacher = statistics.fmean(r["teacher_accuracy"] for r in first)
    seeds = rows[0]["seeds"]
    lines = [
        f"{args.steps} steps x {args.batch_size} prompts, on-policy (lmbda 1), JSD beta {BETA}, hidden states sent as "
        f"{args.hidden_dtype}. Start (warmed-up student): {100 * start:.1f}%; teacher: {100 * teacher:.1f}% (means).",
        f"Cells: held-out accuracy (%) at step {rows[0]['half_step']} / step {args.steps}.",
        "",
        "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | std (final) | teacher s/step | train s |",
        "|---|" + "---:|" * (len(seeds) + 4),
    ]
    for row in rows:
        cells = [f"{100 * h:.1f} / {100 * a:.1f}" for h, a in zip(row["half_budget_accuracy"], row["accuracy"])]
        mean = f"{100 * row['half_budget_accuracy_mean']:.1f} / **{100 * row['accuracy_mean']:.1f}**"
        teacher_s = row["step_seconds_mean"].get("teacher_s")
        lines.append(
            f"| {row['label']} | " + " | ".join(cells) + f" | {mean} | {100 * row['accuracy_std']:.1f} | "
            f"{'' if teacher_s is None else f'{teacher_s:.3f}'} | {row['train_seconds_mean']:.0f} |"
        )
    if {"hidden", "local"} <= {row["method"] for row in rows}:
        by_method = {row["method"]: row["first_step_loss"] for row in rows}
        pairs = [f"{h:.6f} vs {c:.6f}" for h, c in zip(by_method["hidden"], by_method["local"]) if h and c]
        lines += ["", "Step-1 loss (same student, same samples), hidden vs local, per seed: " + "; ".join(pairs)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--task", choices=["addition"], default="addition", help="the demo task (gkd_table.py's)")
    parser.add_argument("--digits", type=int, default=6, help="digits per number: the chain has one line per digit")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per step")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--eval-problems", type=int, default=500, help="held-out problems per seed")
    parser.add_argument("--schedule", default="linear", choices=["constant", "linear", "cosine"])
    parser.add_argument("--warmup-steps", type=int, default=10, help="linear learning-rate warm-up")
    parser.add_argument("--optimizer", default="fresh", choices=["fresh", "continue"], help="as in gkd_table.py")
    parser.add_argument(
        "--hidden-dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="wire dtype of the hidden states (float32: the exact comparison with the local teacher)",
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (1 torch thread each)")
    parser.add_argument("--output-dir", default=str(REPO / "runs" / "hidden_vs_top1"), help="prepared seeds, runs")
    parser.add_argument("--json", default="/tmp/hidden_vs_top1.json", help="everything, written at the end")
    parser.add_argument("--fresh", action="store_true", help="rerun runs whose results are already saved")
    parser.add_argument("--quick", action="store_true", help="smoke run: seed 0, 4 steps, 32 held-out problems")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--url", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:  # gkd_table's quick values: its prepare worker applies them too, so the prepared seeds agree
        args.seeds, args.steps, args.eval_every, args.eval_problems = args.seeds[:1], 4, 2, 32
    if args.worker:
        emit_result(run_method(args))
        return
    os.environ["OMP_NUM_THREADS"] = "1"  # the servers inherit it: one torch thread each
    started = time.perf_counter()
    print(f"preparing teachers and warmed-up students for seeds {args.seeds}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda seed: gkd_table.spawn(args, seed, "prepare"), args.seeds))
    with contextlib.ExitStack() as stack:
        urls = {}
        if any(METHODS[m].server for m in args.methods):
            for seed in args.seeds:
                folder = Path(args.output_dir) / f"seed{seed}"
                urls[seed] = stack.enter_context(Server(str(folder / "teacher"), True, folder, [])).url
                print(f"  seed {seed}: teacher server at {urls[seed]}", flush=True)
        runs = [(seed, method) for seed in args.seeds for method in args.methods]
        print(f"{len(runs)} runs, {args.jobs} at a time", flush=True)
        with ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda run: spawn_run(args, *run, urls.get(run[0], "")), runs))
    rows = summarise(results, args.methods)
    table = markdown(rows, results, args)
    print(table)
    seconds = round(time.perf_counter() - started)
    summary = {"args": vars(args), "rows": rows, "runs": results, "table": table, "seconds": seconds}
    Path(args.json).write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.json} in {seconds}s")


if __name__ == "__main__":
    main()
