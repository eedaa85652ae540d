"""Throughput of protege vs TRL 1.8.0's `DistillationTrainer` on CPU: same models, data and settings.

Run it with protege's interpreter; TRL runs in its own environment (`make trl-env` creates `.trl-env`):

    python -m benchmarks vs_trl                  # 20 timed steps after 2 warm-up steps, each system
    python -m benchmarks vs_trl --quick          # smoke run: 2 timed steps after 1 warm-up step
    python -m benchmarks vs_trl --repeats 3      # TRL, protege, TRL, ...: the table shows each system's median run

It builds `workers.arithmetic_models` (a BPE of 512 tokens, a 2-layer student, a confident 4-layer teacher, `--rows`
arithmetic chat rows), then runs each system's worker (`python -m benchmarks.vs_trl worker trl|protege ...`, TRL's
with `--trl-python`, which has no protege), one after the other, each in a fresh process with the same settings
(`workers.RunSettings`: lmbda 1, beta 0.5, full vocabulary, batch 2 x grad accum 8, 32 new tokens, float32,
`model.generate`). The table: trained completion tokens per second over the timed steps, the ratio protege/TRL, and
each system's per-token loss at the first and last step (similar, not identical: the samples differ).

Threads: `--threads` (default 1) for both. These models gain nothing from a second thread, and on a 2-core machine that
other processes share two OpenMP threads per process made a `generate` call 10 to 20 times slower.

Timing, the same for both: wall time from the `on_step_end` of the last warm-up step to the `on_step_end` of the last
step, so collation, generation, teacher and student passes, the optimizer step and logging are inside (protege
generates in `get_batch_samples`, before `on_step_begin`; TRL in `training_step`, after it). Tokens: completion tokens
trained on (`labels != -100` in what `compute_loss` receives, `workers.counting_trainer`) over the same steps.

Per-token loss: protege logs the step's divergence sum over its completion tokens. TRL 1.8.0 divides each slice's sum
by the Trainer's `num_items_in_batch`, counted on the raw dataloader batches (the whole generation batch repeated for
each accumulation slice, with the dataset's completion lengths), so its logged loss is too small by about GA x
(dataset completion length / generated length); the TRL side reports `per_token_losses` = logged loss x
num_items_in_batch / completion tokens trained, the quantity compared here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import (
    REPO,
    Column,
    Report,
    add_flags,
    describe,
    emit_result,
    from_namespace,
    module_command,
    parse,
    parser,
    setting,
    spawn,
    worker_env,
)
from benchmarks.workers import RunSettings, arithmetic_models, build_trainer, load_inputs, train


@dataclasses.dataclass(kw_only=True)
class WorkerRun(RunSettings):
    """One worker process: the shared settings, the inputs the parent built, and where the Trainer may write."""

    student: str = setting(help="student model folder (also holds the tokenizer)")
    teacher: str = setting(help="teacher model folder")
    data: str = setting(help="jsonl file with a 'messages' column")
    output_dir: str | None = setting(None, "Trainer output_dir (nothing is saved; default: a temp folder)")


def loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def columns(settings: dict) -> list[Column]:
    last = settings["warmup"] + settings["steps"]
    return [
        Column("system", "system", text=True),
        Column("timed steps", "steps_timed"),
        Column("completion tokens", "completion_tokens"),
        Column("seconds", "wall_seconds", "{:.2f}"),
        Column("tokens/s", "wall_tokens_per_second", "{:.1f}"),
        Column("ratio protege/TRL", "ratio", "{:.2f}"),
        Column("per-token loss, step 1", lambda r: loss(r["per_token_losses"][0])),
        Column(f"per-token loss, step {last}", lambda r: loss(r["per_token_losses"][-1])),
    ]


TABLES = {"throughput": columns}

# ---------------------------------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    options = parser("vs_trl", __doc__, quick="2 timed steps after 1 warm-up step, 64 rows")
    add_flags(options, RunSettings)  # the flags both workers take, with the same defaults
    options.add_argument("--repeats", type=int, default=1, help="runs of each system, alternating; median shown")
    options.add_argument("--rows", type=int, default=256, help="rows of arithmetic chat data")
    options.add_argument(
        "--trl-python",
        default=None,
        help="interpreter of the TRL 1.8.0 environment (default: .trl-env/bin/python, else /work/trl-env/bin/python)",
    )
    options.add_argument("--python", default=sys.executable, help="interpreter for protege (default: this one)")
    options.add_argument("--workdir", help="keep models, data and results here (default: a temp folder, deleted)")
    args = options.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.rows = 2, 1, 64
    if args.trl_python is None:
        local, fallback = REPO / ".trl-env" / "bin" / "python", Path("/work/trl-env/bin/python")
        args.trl_python = str(local if local.exists() or not fallback.exists() else fallback)
    return args


def run_worker(system: str, python: str, paths: dict, args: argparse.Namespace, trainer_dir: Path) -> dict:
    """One system's run in a fresh process of its own interpreter; its result with the load around it."""
    run = WorkerRun(
        **vars(from_namespace(RunSettings, args)),
        student=paths["student"],
        teacher=paths["teacher"],
        data=paths["data"],
        output_dir=str(trainer_dir),
    )
    threads = str(args.threads)
    env = worker_env(True, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    argv = module_command(python, "benchmarks.vs_trl", "worker", system.lower(), run)
    done = spawn(argv, env=env, cwd=trainer_dir.parent)
    elapsed = time.perf_counter() - started
    if done.returncode != 0 or done.result is None:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
        raise SystemExit(f"{system} worker failed with exit status {done.returncode}: {' '.join(done.command)}")
    result = done.result
    result.update(system=system, process_seconds=elapsed, load_before=load_before, load_after=os.getloadavg()[0])
    print(
        f"  {system:7s} {result['completion_tokens']:6d} tokens in {result['wall_seconds']:7.2f} s "
        f"(process {elapsed:.1f} s, 1-min load {load_before:.2f} -> {result['load_after']:.2f})",
        flush=True,
    )
    return result


def check_parity(trl: dict, ours: dict) -> list[str]:
    """Settings each worker reports about itself that must agree."""
    problems = [
        f"{label} differ: TRL {trl.get(key)} vs protege {ours.get(key)}"
        for key, label in (("top_p", "top_p"), ("torch_threads", "torch threads"), ("torch_version", "torch versions"))
        if trl.get(key) != ours.get(key)
    ]
    if ours.get("activation_checkpointing"):
        problems.append("protege ran with activation checkpointing on")
    if trl.get("tokenizers_match") is False:
        problems.append("TRL found the student and teacher tokenizers different")
    return problems


def median_run(runs: list[dict]) -> dict:
    """The median run by wall time (of an even number of runs, the slower of the middle two)."""
    chosen = sorted(runs, key=lambda r: r["wall_seconds"])[len(runs) // 2]
    return chosen | {"all_tokens_per_second": [r["completion_tokens"] / r["wall_seconds"] for r in runs]}


def summary(trl: dict, ours: dict, args: argparse.Namespace) -> list[str]:
    """What the table leaves out: versions, settings, every run's speed, where the time went, the loss curves."""
    lines = [
        f"versions: TRL {trl.get('trl_version')} (transformers {trl.get('transformers_version')}), protege "
        f"{ours.get('protege_version')} (transformers {ours.get('transformers_version')}), "
        f"torch {ours['torch_version']}",
        f"settings: lmbda {args.lmbda}, beta {args.beta}, loss_top_k {args.loss_top_k}, batch {args.batch} x GA "
        f"{args.grad_accum}, max_completion_length {args.max_completion_length}, max_length {args.max_length}, "
        f"temperature {args.temperature}, top_p {args.top_p}, lr {args.learning_rate}, seed {args.seed}, "
        f"{args.warmup} warm-up + {args.steps} timed steps, {args.repeats} run(s) each",
    ]
    for name, r in (("TRL", trl), ("protege", ours)):
        lines.append(f"{name} tokens/s of every run: {', '.join(f'{v:.1f}' for v in r['all_tokens_per_second'])}")
    steps = max(ours["steps_timed"], 1)
    if ours.get("mean_generation_s_per_step") is not None:
        lines.append(
            f"protege: {ours['wall_seconds'] / steps:.3f} s per step, of which generation "
            f"{ours['mean_generation_s_per_step']:.3f} s (its own logs)"
        )
    lines.append(
        f"TRL: {trl['wall_seconds'] / max(trl['steps_timed'], 1):.3f} s per step, of which "
        f"{trl['seconds'] / max(trl['steps_timed'], 1):.3f} s between on_step_begin and on_step_end"
    )
    lines.append("step  TRL per-token loss  protege per-token loss  (TRL logged loss)")
    pairs = zip(trl["per_token_losses"], ours["per_token_losses"], trl["losses"])
    lines += [f"{i:4d}  {loss(a):>18s}  {loss(b):>22s}  ({loss(raw)})" for i, (a, b, raw) in enumerate(pairs, 1)]
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return worker(argv[1:])
    args = parse_args(argv)
    if not Path(args.trl_python).exists():
        raise SystemExit(f"no TRL interpreter at {args.trl_python}: run `make trl-env` or pass --trl-python")
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="protege_vs_trl_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        return run(args, workdir)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace, workdir: Path) -> int:
    """Build the inputs, run the systems in turn, and report each one's median run."""
    report = Report("vs_trl", args)
    print(f"{describe(report.head)}; torch threads for both: {args.threads}")
    print(f"building models and data in {workdir}", flush=True)
    paths = arithmetic_models(workdir, args.rows, args.seed)
    runs: dict[str, list[dict]] = {"TRL": [], "protege": []}
    for repeat in range(args.repeats):
        for system, python in (("TRL", args.trl_python), ("protege", args.python)):
            runs[system].append(run_worker(system, python, paths, args, workdir / f"{system.lower()}_{repeat}_trainer"))
    trl, ours = median_run(runs["TRL"]), median_run(runs["protege"])
    problems = check_parity(trl, ours)
    for problem in problems:
        print(f"WARNING: {problem}", file=sys.stderr)
    rows = []
    for name, chosen in (("TRL 1.8.0", trl), ("protege", ours)):
        speed = chosen["completion_tokens"] / chosen["wall_seconds"]
        rows.append({**chosen, "system": name, "wall_tokens_per_second": speed, "problems": problems})
    for row in rows:
        row["ratio"] = row["wall_tokens_per_second"] / rows[0]["wall_tokens_per_second"]
    print("\n" + report.table("throughput", rows, TABLES) + "\n")
    print("\n".join(summary(trl, ours, args)))
    return 1 if problems else 0


# ---------------------------------------------------------------------------------------------------------------------
# Workers: `python -m benchmarks.vs_trl worker trl|protege FLAGS` (the TRL one in TRL's environment, without protege)
# ---------------------------------------------------------------------------------------------------------------------


def worker(argv: list[str]) -> int:
    """One side's run in its own interpreter; the TRL side imports nothing of protege."""
    os.environ.update(HF_HUB_DISABLE_TELEMETRY="1", TRL_EXPERIMENTAL_SILENCE="1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    side, flags = argv[0], argv[1:]
    run = parse(WorkerRun, flags, f"the {side} side of benchmarks/vs_trl.py")
    emit_result(trl_side(run) if side == "trl" else protege_side(run))
    return 0


def result(run: WorkerRun, trainer: Any, logs: dict, timed: list[int], seconds: float, torch: Any, **extra) -> dict:
    """The result keys both sides report, then `extra`, each side's own (versions, timings, its loss scale).

    `timed` are the timed steps and `seconds` their time; tokens are those `counting_trainer` counted in them.
    """
    steps = range(1, run.warmup + run.steps + 1)
    logged = {step: float(entry["loss"]) for step, entry in logs.items()}
    tokens = sum(trainer.step_tokens.get(s, 0) for s in timed)
    return {
        "steps_timed": len(timed),
        "seconds": seconds,
        "completion_tokens": tokens,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "final_loss": logged.get(steps[-1]),
        "losses": [logged.get(s) for s in steps],
        "warmup_steps": run.warmup,
        "step_completion_tokens": [trainer.step_tokens.get(s) for s in steps],
        "num_items_in_batch": [trainer.step_items.get(s) for s in steps],
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "config": dataclasses.asdict(run),
        **extra,
    }


def protege_side(run: WorkerRun) -> dict:
    """protege's `DistillationTrainer`. It generates a step's completions in `get_batch_samples`, before
    `on_step_begin`, so `seconds` is the wall time between the `on_step_end`s (`inside_step_seconds` leaves
    generation out, for reference)."""
    import datasets
    import torch
    import transformers
    from transformers import TrainerCallback

    import protege
    from protege import DistillationConfig, DistillationTrainer

    tokenizer, student, teacher, train_dataset = load_inputs(run, torch, datasets, transformers)
    inputs = dict(model=student, teacher_model=teacher, train_dataset=train_dataset, processing_class=tokenizer)
    trainer, timer, init_warnings = build_trainer(
        run, "protege_worker", DistillationConfig, DistillationTrainer, TrainerCallback, **inputs
    )
    total_seconds, logs = train(trainer)
    total_steps = run.warmup + run.steps
    timed = [s for s in range(run.warmup + 1, total_steps + 1) if s in timer.end and s - 1 in timer.end]
    seconds = sum(timer.end[s] - timer.end[s - 1] for s in timed)

    def mean_logged(key: str) -> float | None:
        values = [logs[s][key] for s in timed if s in logs and key in logs[s]]
        return sum(values) / len(values) if values else None

    report = result(
        run,
        trainer,
        logs,
        timed,
        seconds,
        torch,
        protege_version=protege.__version__,
        transformers_version=transformers.__version__,
        wall_seconds=seconds,
        inside_step_seconds=sum(timer.end[s] - timer.begin[s] for s in timed if s in timer.begin),
        train_seconds_total=total_seconds,
        step_seconds=[
            timer.end[s] - timer.end[s - 1] if s in timer.end and s - 1 in timer.end else None
            for s in range(1, total_steps + 1)
        ],
        logged_completion_tokens_per_second=mean_logged("completion_tokens_per_second"),
        mean_generation_s_per_step=mean_logged("time/generation_s"),
        mean_teacher_s_per_step=mean_logged("time/teacher_s"),
        mean_student_s_per_step=mean_logged("time/student_s"),
        top_p=trainer.generation_config.top_p,
        activation_checkpointing=bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
        init_warnings=init_warnings,
    )
    # protege divides each step's divergence sum by the step's completion tokens: the logged loss is per token.
    report["per_token_losses"] = report["losses"]
    return report


def trl_side(run: WorkerRun) -> dict:
    """TRL 1.8.0's `trl.experimental.distillation.DistillationTrainer`, in TRL's environment. `seconds` sums
    `on_step_begin`..`on_step_end` (the Trainer collates before `on_step_begin`); `wall_seconds` is measured as
    protege's `seconds`."""
    import datasets
    import torch
    import transformers
    import trl
    from transformers import TrainerCallback
    from trl.experimental.distillation import DistillationConfig, DistillationTrainer

    tokenizer, student, teacher, train_dataset = load_inputs(run, torch, datasets, transformers)
    if tokenizer.pad_token is None:
        raise SystemExit(f"tokenizer in {run.student} has no pad token")
    # TRL loads the teacher's tokenizer from teacher.config._name_or_path to check that the vocabularies match: a
    # teacher folder without tokenizer files would make that load fail, so point it at the student's.
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any(os.path.exists(os.path.join(run.teacher, name)) for name in names):
        teacher.config._name_or_path = run.student
    rows_before = teacher.get_input_embeddings().weight.shape[0]
    inputs = dict(model=student, teacher_model=teacher, train_dataset=train_dataset, processing_class=tokenizer)
    trainer, timer, init_warnings = build_trainer(
        run, "trl_worker", DistillationConfig, DistillationTrainer, TrainerCallback, **inputs
    )
    rows_after = trainer.teacher_model.get_input_embeddings().weight.shape[0]
    total_seconds, logs = train(trainer)
    total_steps = run.warmup + run.steps
    timed = [s for s in range(run.warmup + 1, total_steps + 1) if s in timer.begin and s in timer.end]
    wall_start = timer.end.get(run.warmup)  # end[0] is the start of training
    steps = range(1, total_steps + 1)
    per_token_losses = []
    for s in steps:
        items, tokens = trainer.step_items.get(s), trainer.step_tokens.get(s)
        per_token_losses.append(logs[s]["loss"] * items / tokens if s in logs and items and tokens else None)
    return result(
        run,
        trainer,
        logs,
        timed,
        sum(timer.end[s] - timer.begin[s] for s in timed),
        torch,
        trl_version=trl.__version__,
        transformers_version=transformers.__version__,
        wall_seconds=(timer.end[timed[-1]] - wall_start) if timed and wall_start is not None else None,
        train_seconds_total=total_seconds,
        step_seconds=[timer.end[s] - timer.begin[s] if s in timer.begin and s in timer.end else None for s in steps],
        per_token_losses=per_token_losses,
        teacher_vocab_rows=[rows_before, rows_after],
        tokenizers_match=bool(trainer._local_teacher_tokenizer_matches_student),
        top_p=trainer.top_p,
        init_warnings=init_warnings,
    )


if __name__ == "__main__":
    sys.exit(main())
