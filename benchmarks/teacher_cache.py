"""The offline teacher cache at real shapes: a step from the cache against a step with the live local teacher, the
cache's bytes a token per format, and the time to build it against one epoch with the live teacher.

    python -m benchmarks teacher_cache                 # real shapes, 4 rows of 16 + 1,000 tokens: 2 steps of 2 rows
    python -m benchmarks teacher_cache --quick         # smoke run: vocabulary 8000, hidden 64 / 128, 64 tokens
    python -m benchmarks teacher_cache --student-layers 24 --teacher-layers 28 --optim sgd --pairs 2 --skip-topk
    python -m benchmarks teacher_cache --student-layers 24 --teacher-layers 28 --optim sgd --pairs 2 \
        --epochs-format topk --skip-hidden        # the top-20 cache at beta 0 against the live teacher at beta 0

The models are real_scale's (`workers.random_models`, built once into `--cache-dir`, shared with real_scale): a Qwen2
student of hidden 896, 4 layers, tied embeddings, a teacher of hidden 1536, 4 layers, untied, vocabulary 151,936 (the
layer counts are cut from 24 and 28 to fit a 2-core machine). `--student-layers` / `--teacher-layers` build the same
models at other depths (24 and 28 are Qwen2.5-0.5B's and 1.5B's) into their own folder, `real-SxT-layers`, never
real_scale's. The data: `--rows` rows of `--prompt-tokens` and
exactly `--tokens` completion tokens (real_scale's rows), one epoch = rows / 2 steps of 2 rows, lmbda 0, beta 0.5, the
full vocabulary (`loss_top_k=0`, protege's default `loss_chunk_size`), float32, AdamW (`--optim sgd`: plain SGD, no
optimizer state, where AdamW's moments do not fit beside the teacher; the forward and backward passes, which is what
the cache saves, are the same), `--threads` torch threads.

In order, each in a fresh process: `protege cache-teacher --format hidden` (bfloat16) and `--format topk
--loss_top_k 20` over the rows (their wall time: start, model load and the teacher's identity digest included), then
one epoch with the live local teacher and one from the hidden cache with no teacher (`worker` below). s/step is the
mean over the epoch's steps, from the start of training; the first step is in it. CPU s: the worker's CPU time
(user and system, all its threads) over training, which other jobs on a shared machine disturb less than wall time.
`--pairs N` runs the live and the cached epoch N times, alternating which goes first (live, cached, cached, live,
...), so that each ratio compares two epochs run close in time on a shared machine.

`--server` also builds both caches from `protege serve-teacher` on the same teacher (started once, before the timed
commands), and reports how far each server-built cache is from the local build's: the largest difference of a stored
hidden state, and for top-k whether the ids agree and the largest log-prob difference. `--skip-epochs` leaves out the
epochs, `--skip-topk` / `--skip-hidden` that format's builds, `--skip-builds` every build (the epochs train from the
cache an earlier run left in the same folder; its manifest is checked against the rows as always).

`--epochs-format topk` trains from the top-20 cache instead, at the objective it serves: beta 0 (forward KL) over the
teacher's top-20 log-probs and the tail (`loss_top_k=20`), against the live local teacher at the same settings (which
applies its whole head and takes its top 20 every step).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import Column, Report, describe, emit_result, failure, module_command, parse, parser, setting, spawn
from benchmarks.real_scale import QUICK, REAL, conversations_file
from benchmarks.workers import FolderRun, Shapes, build_trainer, random_models, train

TOP_K = 20


@dataclasses.dataclass(kw_only=True)
class Epoch(FolderRun):
    """One epoch in a worker: the live teacher (no `cache`) or the cache (no teacher loaded)."""

    steps: int = setting(2, "optimizer steps: the epoch")
    warmup: int = setting(0)
    grad_accum: int = setting(1)
    lmbda: float = setting(0.0)
    learning_rate: float = setting(1e-6)
    threads: int = setting(2)
    data: str = setting(help="the rows, JSON lines")
    cache: str | None = setting(None, "a teacher cache folder: train from it, no teacher")
    optim: str | None = setting(None, "the Trainer's optim (default its own: AdamW)")


TABLES = {
    "cache": [
        Column("format", "format", text=True),
        Column("stored", "stored", text=True),
        Column("completion tokens", "tokens", "{:,}"),
        Column("bytes a token (shards)", "bytes_per_token", "{:,.1f}"),
        Column("one-off (LM head) MB", lambda r: r["head_bytes"] / 1e6, "{:,.0f}"),
        Column("build s (whole command)", "seconds", "{:.1f}"),
        Column("against the local build", lambda r: r.get("against_local", "-"), text=True),
    ],
    "epoch": [
        Column("pair", lambda r: r.get("pair", 1)),
        Column("teacher", "case", text=True),
        Column("steps", "steps"),
        Column("s/step", "step_seconds", "{:.1f}"),
        Column("each step s", lambda r: ", ".join(f"{s:.1f}" for s in r["step_times"]), text=True),
        Column("epoch s (training)", "train_seconds", "{:.1f}"),
        Column("epoch CPU s (training)", lambda r: r.get("train_cpu_seconds"), "{:.1f}"),
        Column("1-min load before", lambda r: r.get("load_before"), "{:.1f}"),
        Column("epoch s (whole process)", "process_seconds", "{:.1f}"),
        Column("peak RSS GiB", lambda r: r.get("peak_rss_gib"), "{:.1f}"),
        Column("losses", lambda r: ", ".join(f"{loss:.5g}" for loss in r["losses"]), text=True),
    ],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    options = parser("teacher_cache", __doc__, quick="vocabulary 8000, hidden 64 / 128, 64 tokens")
    options.add_argument("--tokens", type=int, default=None, help="completion tokens a row (default 1000; quick 64)")
    options.add_argument("--rows", type=int, default=4, help="rows of the epoch (2 a step)")
    options.add_argument("--prompt-tokens", type=int, default=16)
    options.add_argument("--threads", type=int, default=2, help="torch threads of every process")
    options.add_argument("--cache-dir", type=Path, default=Path("/tmp/protege_real_scale"), help="models and runs")
    options.add_argument("--server", action="store_true", help="also build both caches from a teacher server")
    options.add_argument("--skip-epochs", action="store_true", help="builds only, no training epochs")
    options.add_argument("--skip-topk", action="store_true", help="no top-k cache builds")
    options.add_argument("--skip-hidden", action="store_true", help="no hidden cache builds")
    options.add_argument("--skip-builds", action="store_true", help="train from the cache a run built before")
    options.add_argument("--student-layers", type=int, default=None, help="student depth (default: the shapes')")
    options.add_argument("--teacher-layers", type=int, default=None, help="teacher depth (default: the shapes')")
    options.add_argument("--optim", choices=("adamw_torch", "sgd"), default=None, help="default: the Trainer's AdamW")
    options.add_argument("--pairs", type=int, default=1, help="live and cached epochs, N times, alternating order")
    options.add_argument(
        "--epochs-format",
        choices=("hidden", "topk"),
        default="hidden",
        help="the cache the epochs train from: hidden (beta 0.5, full vocabulary) or topk (beta 0, loss_top_k 20, the "
        "live teacher on the same objective)",
    )
    args = options.parse_args(argv)
    args.shapes = deepened(QUICK if args.quick else REAL, args.student_layers, args.teacher_layers)
    args.tokens = args.tokens or (64 if args.quick else 1000)
    return args


def deepened(shapes: Shapes, student_layers: int | None, teacher_layers: int | None) -> Shapes:
    """`shapes` at other layer counts, named (and so stored) apart from them; `shapes` itself when neither is given."""
    if student_layers is None and teacher_layers is None:
        return shapes
    student = shapes.student | {"num_hidden_layers": student_layers or shapes.student["num_hidden_layers"]}
    teacher = shapes.teacher | {"num_hidden_layers": teacher_layers or shapes.teacher["num_hidden_layers"]}
    name = f"{shapes.name}-{student['num_hidden_layers']}x{teacher['num_hidden_layers']}-layers"
    return dataclasses.replace(shapes, name=name, student=student, teacher=teacher)


def shard_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("shard-*.safetensors"))


def build(
    fmt: str, args: argparse.Namespace, built: dict, data: Path, folder: Path, env: dict, teacher: str | None = None
) -> dict:
    """`protege cache-teacher` from scratch (from `teacher`, default the local model), timed whole; its sizes."""
    shutil.rmtree(folder, ignore_errors=True)
    max_length = args.prompt_tokens + args.tokens + 16
    command = [
        sys.executable,
        "-m",
        "protege",
        "cache-teacher",
        "--teacher",
        teacher or built["teacher"],
        "--tokenizer",
    ]
    command += [built["tokenizer"], "--dataset_name", str(data), "--max_length", str(max_length)]
    command += ["--max_completion_length", str(args.tokens), "--batch_size", "2", "--output", str(folder)]
    command += ["--format", fmt] + (["--loss_top_k", str(TOP_K)] if fmt == "topk" else [])
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"cache-teacher --format {fmt} failed: {done.stderr.strip().splitlines()[-1:]}")
    manifest = json.loads((folder / "manifest.json").read_text())
    head = folder / "lm_head.safetensors"
    return {
        "format": (fmt if fmt == "hidden" else f"top-{TOP_K}") + (" (from a server)" if teacher else ""),
        "stored": f"{manifest['dtype']}" + (f", H={manifest['hidden_size']}" if fmt == "hidden" else ""),
        "tokens": manifest["tokens"],
        "bytes_per_token": shard_bytes(folder) / manifest["tokens"],
        "head_bytes": head.stat().st_size if head.exists() else 0,
        "seconds": seconds,
    }


def against_local(fmt: str, local: Path, served: Path) -> str:
    """How far a server-built cache is from the local build's, shard by shard (the same rows in the same order)."""
    from safetensors.torch import load_file

    names = sorted(path.name for path in local.glob("shard-*.safetensors"))
    pairs = [(load_file(str(local / name)), load_file(str(served / name))) for name in names]
    if fmt == "hidden":
        worst = max(float((a["hidden"].float() - b["hidden"].float()).abs().max()) for a, b in pairs)
        largest = max(float(a["hidden"].float().abs().max()) for a, _ in pairs)
        same = all((local / n).read_bytes() == (served / n).read_bytes() for n in names)
        return f"max abs diff {worst:.3g} (values up to {largest:.3g}); shards byte-equal: {same}"
    ids = sum(int((a["topk_ids"] != b["topk_ids"]).sum()) for a, b in pairs)
    worst = max(float((a["topk_logprobs"].float() - b["topk_logprobs"].float()).abs().max()) for a, b in pairs)
    actual = max(float((a["token_logprobs"] - b["token_logprobs"]).abs().max()) for a, b in pairs)
    return f"{ids} ids differ; max abs diff top-k {worst:.3g}, sampled token {actual:.3g}"


def server_builds(args: argparse.Namespace, built: dict, data: Path, runs: Path, env: dict) -> list[dict]:
    """Both caches built from a teacher server on the same model, each compared with the local build."""
    from benchmarks import Server

    max_length = args.prompt_tokens + args.tokens + 16
    limits = ["--max-model-len", max_length, "--max-batch-tokens", 2 * max_length]
    rows = []
    with Server(built["teacher"], True, runs, limits) as server:
        for fmt in ("hidden", "topk"):
            row = build(fmt, args, built, data, runs / f"served-{fmt}", env, teacher=server.url)
            row["against_local"] = against_local(fmt, runs / f"cache-{fmt}", runs / f"served-{fmt}")
            rows.append(row)
            print(f"  built the {fmt} cache from the server: {row}", flush=True)
    return rows


def epoch(case: str, args: argparse.Namespace, built: dict, data: Path, cache: Path | None, env: dict) -> dict:
    """One epoch in a worker process, timed whole and by step."""
    run = Epoch(
        steps=args.rows // 2,
        threads=args.threads,
        max_completion_length=args.tokens,
        max_length=args.prompt_tokens + args.tokens + 16,
        beta=0.0 if args.epochs_format == "topk" else 0.5,
        loss_top_k=TOP_K if args.epochs_format == "topk" else 0,
        student=built["student"],
        teacher=built["teacher"],
        tokenizer=built["tokenizer"],
        data=str(data),
        cache=None if cache is None else str(cache),
        optim=args.optim,
        output_dir=str(data.parent / f"trainer-{case}"),
    )
    started = time.perf_counter()
    done = spawn(module_command(sys.executable, "benchmarks.teacher_cache", "worker", run), env=env)
    if done.result is None or not done.result.get("finished"):
        raise SystemExit(f"{case}: {failure(done)}")
    return {"case": case, **done.result, "process_seconds": time.perf_counter() - started}


def cache_run(name: str, args: argparse.Namespace) -> tuple[dict, dict, Report, Path, Path]:
    """What a cache benchmark starts from: its commands' environment (`args.threads` threads, offline), the models
    (`random_models` of `args.shapes`), its report (head printed), its runs folder and the rows file written there."""
    threads = str(args.threads)
    env = os.environ | dict(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    env |= dict(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    folder = args.cache_dir / args.shapes.name
    built = random_models(folder, args.shapes)
    report = Report(name, args)
    print(describe(report.head), flush=True)
    runs = folder / name
    runs.mkdir(parents=True, exist_ok=True)
    data = conversations_file(runs / "rows.jsonl", args.rows, args.prompt_tokens, args.tokens, built["tokenizer"])
    return env, built, report, runs, data


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        return worker(argv[1:])
    args = parse_args(argv)
    env, built, report, runs, data = cache_run("teacher_cache", args)
    caches = []
    skipped = {"hidden": args.skip_hidden or args.skip_builds, "topk": args.skip_topk or args.skip_builds}
    for fmt in (fmt for fmt in ("hidden", "topk") if not skipped[fmt]):
        caches.append(build(fmt, args, built, data, runs / f"cache-{fmt}", env))
        print(f"  built the {fmt} cache: {caches[-1]}", flush=True)
    if args.server:
        caches += server_builds(args, built, data, runs, env)
    if args.skip_epochs:
        print("\n" + report.table("cache", caches, TABLES))
        return 0
    epochs = pairs(args, built, data, runs, env)
    if caches:
        print("\n" + report.table("cache", caches, TABLES))
    print("\n" + report.table("epoch", epochs, TABLES))
    for pair in range(1, args.pairs + 1):
        live, cached = (e["step_seconds"] for e in sorted(epochs, key=lambda e: e["cache"]) if e["pair"] == pair)
        print(f"pair {pair}: cached step {live / cached:.2f}x faster")
    for cache in caches:
        print(f"{cache['format']} cache: {cache['bytes_per_token']:.1f} bytes a token")
    return 0


def pairs(args: argparse.Namespace, built: dict, data: Path, runs: Path, env: dict) -> list[dict]:
    """`args.pairs` times a live and a cached epoch, the order alternating (live first in the odd pairs)."""
    fmt = args.epochs_format
    name = "hidden cache" if fmt == "hidden" else f"top-{TOP_K} cache"
    cases = [("live local teacher", None), (f"{name}, no teacher", runs / f"cache-{fmt}")]
    epochs = []
    for pair in range(1, args.pairs + 1):
        for case, cache in cases if pair % 2 else cases[::-1]:
            load = os.getloadavg()[0]
            epochs.append({"pair": pair, **epoch(case, args, built, data, cache, env), "cache": cache is not None})
            epochs[-1]["load_before"] = load
            print(
                f"  pair {pair}, {case}: {epochs[-1]['step_seconds']:.1f} s/step {epochs[-1]['step_times']}, "
                f"losses {epochs[-1]['losses']}, 1-min load before {load:.2f}",
                flush=True,
            )
    return epochs


def worker(argv: list[str]) -> int:
    """One epoch (`Epoch`); its step times, losses and wall seconds as one JSON line."""
    for key, value in (("HF_HUB_DISABLE_TELEMETRY", "1"), ("HF_HUB_OFFLINE", "1"), ("TOKENIZERS_PARALLELISM", "false")):
        os.environ.setdefault(key, value)
    run = parse(Epoch, argv, "one epoch of benchmarks/teacher_cache.py")

    import datasets
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback
    from transformers.utils import logging as hf_logging

    from protege import DistillationConfig, DistillationTrainer
    from protege.models import load_tokenizer

    torch.set_num_threads(run.threads)
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    tokenizer = load_tokenizer(run.tokenizer, trust_remote_code=False)  # as cache-teacher and `protege train` load it
    models = [AutoModelForCausalLM.from_pretrained(run.student, dtype=torch.float32)]
    if run.cache is None:
        models.append(AutoModelForCausalLM.from_pretrained(run.teacher, dtype=torch.float32))
    with torch.no_grad():  # every weight read now (they are mapped), not during the first step
        for tensor in (t for model in models for t in model.state_dict().values()):
            tensor.sum()

    def configure(**settings):
        return DistillationConfig(**settings, teacher_cache=run.cache, **({"optim": run.optim} if run.optim else {}))

    inputs = dict(
        model=models[0],
        teacher_model=models[1] if len(models) > 1 else None,
        train_dataset=datasets.Dataset.from_json(run.data),
        processing_class=tokenizer,
    )
    trainer, timer, _ = build_trainer(run, "teacher_cache", configure, DistillationTrainer, TrainerCallback, **inputs)
    cpu = time.process_time()
    seconds, logs = train(trainer)
    cpu = time.process_time() - cpu
    steps = sorted(step for step in timer.end if step > 0)
    emit_result(
        {
            "steps": len(steps),
            "step_seconds": (timer.end[steps[-1]] - timer.end[0]) / len(steps),
            "step_times": [timer.end[step] - timer.end[step - 1] for step in steps],
            "train_seconds": seconds,
            "train_cpu_seconds": cpu,
            "losses": [logs[step]["loss"] for step in sorted(logs)],
            "tokens": sum(trainer.step_tokens.values()),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "finished": True,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
