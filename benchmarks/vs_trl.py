"""Throughput of protege vs TRL 1.8.0's ``DistillationTrainer`` on CPU, same models, data and settings.

Run it with protege's interpreter; TRL runs in its own environment (``make trl-env`` creates ``.trl-env``):

    python benchmarks/vs_trl.py                  # 20 timed steps after 2 warm-up steps, each system
    python benchmarks/vs_trl.py --quick          # smoke run: 2 timed steps after 1 warm-up step
    python benchmarks/vs_trl.py --repeats 3      # TRL, protege, TRL, ...: the table shows each system's median run

What it does:

1. Builds a byte-level BPE tokenizer (``protege.toy.train_tokenizer``, vocab_size 512) on arithmetic chat data
   (``--rows`` rows of ``messages``: "What is a+b?" / "a+b=c"), a student (2 layers, hidden 64) and a teacher
   (4 layers, hidden 128, LM head scaled up so it is confident and the divergence is worth learning) with
   ``protege.toy.tiny_model``, and saves both models, each with the tokenizer, and the data as jsonl in a temp folder.
2. Runs ``trl_worker.py`` with the TRL interpreter (``--trl-python``) and ``protege_worker.py`` with this one, one
   after the other (never in parallel), each in a fresh process with the same ``torch.set_num_threads`` and
   ``OMP_NUM_THREADS``, and identical settings: lmbda 1 (all on-policy), beta 0.5, loss_top_k 0 (full vocabulary),
   per-device batch 2, gradient accumulation 8, max_completion_length 32, max_length 128, no activation checkpointing,
   float32 (no bf16), ``model.generate`` (no vLLM), the same temperature, top_p, top_k (0), learning rate and seed.
3. Prints a table: trained completion tokens per second over the timed steps, the ratio protege/TRL, and each
   system's per-token loss at the first and last step, to show both optimise the same objective (similar magnitude
   and trend; not identical, because the sampled completions differ).

Threads: ``--threads`` (default 1) for both. These models are too small to gain from a second thread, and on a
2-core machine that other processes share, two OpenMP threads per process made a ``generate`` call 10 to 20 times
slower (each token waits at a barrier for a core another process holds), which would measure the machine's load.

Timing, the same for both: wall time from the ``on_step_end`` of the last warm-up step to the ``on_step_end`` of the
last step, so collation, generation, teacher and student passes, optimizer step and logging are all inside (protege
generates in ``get_batch_samples``, before ``on_step_begin``; TRL in ``training_step``, after it). Tokens: completion
tokens trained on (``labels != -100`` in what ``compute_loss`` receives) over the same steps.

Per-token loss: protege's logged loss is the step's divergence sum over the step's completion tokens. TRL 1.8.0 divides
each slice's divergence sum by the Trainer's ``num_items_in_batch``, counted on the raw dataloader batches: TRL's
loader repeats the whole 16-row generation batch for each of the 8 accumulation slices, and counts the dataset's
completion tokens, not the generated ones. Its logged loss is therefore too small by GA x (dataset completion
length / generated length), 2.5-2.7x in the default run (GA x when the lengths match); ``trl_worker.py`` reports
``per_token_losses`` = logged loss x num_items_in_batch / completion tokens trained, the quantity compared here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from workers import RunSettings, WorkerRun, add_flags, command, from_namespace, spawn

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_flags(p, RunSettings)  # the flags both workers take, with the same defaults
    p.add_argument("--quick", action="store_true", help="smoke run: 2 timed steps after 1 warm-up step, 64 rows")
    p.add_argument(
        "--repeats", type=int, default=1, help="runs of each system, alternating; the table shows the median"
    )
    p.add_argument("--rows", type=int, default=256, help="rows of arithmetic chat data")
    p.add_argument(
        "--trl-python",
        default=None,
        help="interpreter of the TRL 1.8.0 environment (default: .trl-env/bin/python, else /work/trl-env/bin/python)",
    )
    p.add_argument("--python", default=sys.executable, help="interpreter for protege (default: this one)")
    p.add_argument("--workdir", help="keep models, data and results here (default: a temp folder, deleted after)")
    p.add_argument("--json", default=None, help="also write every result to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.rows = 2, 1, 64
    if args.trl_python is None:
        local = REPO / ".trl-env" / "bin" / "python"
        fallback = Path("/work/trl-env/bin/python")
        args.trl_python = str(local if local.exists() or not fallback.exists() else fallback)
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Models, tokenizer and data
# ---------------------------------------------------------------------------------------------------------------------


def build_inputs(folder: Path, rows: int, seed: int) -> dict[str, str]:
    """Save the tokenizer, student, teacher and data under `folder`; return their paths."""
    import torch
    from transformers.utils import logging as hf_logging

    from protege.toy import arithmetic_rows, tiny_model, train_tokenizer

    hf_logging.disable_progress_bar()

    data = arithmetic_rows(rows, seed)
    tokenizer = train_tokenizer([m["content"] for r in data for m in r["messages"]], vocab_size=512)
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id
    paths = {}
    for name, layers, hidden, model_seed in (("student", 2, 64, 1), ("teacher", 4, 128, 2)):
        model = tiny_model(len(tokenizer), layers, hidden, eos_token_id=eos, pad_token_id=pad, seed=model_seed)
        if name == "teacher":  # a confident teacher, so there is a sizeable divergence to learn
            with torch.no_grad():
                model.lm_head.weight.mul_(20.0)
        path = folder / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = str(path)
    data_path = folder / "data.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in data), encoding="utf-8")
    paths["data"] = str(data_path)
    paths["vocab"] = len(tokenizer)
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# Running the workers
# ---------------------------------------------------------------------------------------------------------------------


def run_worker(system: str, python: str, paths: dict, args, trainer_dir: Path) -> dict:
    script = HERE / ("trl_worker.py" if system == "TRL" else "protege_worker.py")
    run = WorkerRun(
        **vars(from_namespace(RunSettings, args)),
        student=paths["student"],
        teacher=paths["teacher"],
        data=paths["data"],
        output_dir=str(trainer_dir),
    )
    env = dict(os.environ)
    threads = str(args.threads)
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)  # each interpreter sees only its own environment
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    done = spawn(command(python, script, run), env=env, cwd=trainer_dir.parent)
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
    problems = []
    if trl.get("top_p") != ours.get("top_p"):
        problems.append(f"top_p differs: TRL {trl.get('top_p')} vs protege {ours.get('top_p')}")
    if trl.get("torch_threads") != ours.get("torch_threads"):
        problems.append(f"torch threads differ: TRL {trl.get('torch_threads')} vs protege {ours.get('torch_threads')}")
    if trl.get("torch_version") != ours.get("torch_version"):
        problems.append(f"torch versions differ: TRL {trl.get('torch_version')} vs protege {ours.get('torch_version')}")
    if ours.get("activation_checkpointing"):
        problems.append("protege ran with activation checkpointing on")
    if trl.get("tokenizers_match") is False:
        problems.append("TRL found the student and teacher tokenizers different")
    return problems


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def _fmt_loss(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def summarise(runs: list[dict]) -> dict:
    """The median run by wall time (of an even number of runs, the slower of the middle two)."""
    ordered = sorted(runs, key=lambda r: r["wall_seconds"])
    chosen = ordered[len(ordered) // 2]
    return chosen | {"all_tokens_per_second": [r["completion_tokens"] / r["wall_seconds"] for r in runs]}


def table(trl: dict, ours: dict) -> str:
    trl_tps = trl["completion_tokens"] / trl["wall_seconds"]
    header = (
        "| system | timed steps | completion tokens | seconds | tokens/s | ratio protege/TRL "
        "| per-token loss, first step | per-token loss, final step |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in (("TRL 1.8.0", trl), ("protege", ours)):
        tps = r["completion_tokens"] / r["wall_seconds"]
        losses = r["per_token_losses"]
        lines.append(
            f"| {name} | {r['steps_timed']} | {r['completion_tokens']} | {r['wall_seconds']:.2f} | {tps:.1f} "
            f"| {tps / trl_tps:.2f} | {_fmt_loss(losses[0])} | {_fmt_loss(losses[-1])} |"
        )
    return "\n".join(lines)


def loss_curves(trl: dict, ours: dict) -> str:
    lines = ["step  TRL per-token loss  protege per-token loss  (TRL logged loss)"]
    for i, (a, b, raw) in enumerate(zip(trl["per_token_losses"], ours["per_token_losses"], trl["losses"]), start=1):
        lines.append(f"{i:4d}  {_fmt_loss(a):>18s}  {_fmt_loss(b):>22s}  ({_fmt_loss(raw)})")
    return "\n".join(lines)


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory = float("nan")
    return f"{model}, {os.cpu_count()} logical CPUs, {memory:.0f} GiB RAM, {platform.system()} {platform.release()}"


def main(argv=None) -> int:
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


def run(args, workdir: Path) -> int:

    print(f"machine: {machine()}")
    print(f"1-min load average at start: {os.getloadavg()[0]:.2f}; torch threads for both: {args.threads}")
    print(f"building models and data in {workdir}", flush=True)
    paths = build_inputs(workdir, args.rows, args.seed)

    runs: dict[str, list[dict]] = {"TRL": [], "protege": []}
    for repeat in range(args.repeats):
        for system, python in (("TRL", args.trl_python), ("protege", args.python)):
            trainer_dir = workdir / f"{system.lower()}_{repeat}_trainer"
            runs[system].append(run_worker(system, python, paths, args, trainer_dir))
    trl, ours = summarise(runs["TRL"]), summarise(runs["protege"])

    problems = check_parity(trl, ours)
    for problem in problems:
        print(f"WARNING: {problem}", file=sys.stderr)

    print()
    print(
        f"versions: TRL {trl.get('trl_version')} (transformers {trl.get('transformers_version')}), "
        f"protege {ours.get('protege_version')} (transformers {ours.get('transformers_version')}), "
        f"torch {ours.get('torch_version')}"
    )
    print(
        f"settings: lmbda {args.lmbda}, beta {args.beta}, loss_top_k {args.loss_top_k}, batch {args.batch} x GA "
        f"{args.grad_accum}, max_completion_length {args.max_completion_length}, max_length {args.max_length}, "
        f"temperature {args.temperature}, top_p {args.top_p}, lr {args.learning_rate}, seed {args.seed}, "
        f"{args.warmup} warm-up + {args.steps} timed steps, {args.repeats} run(s) each"
    )
    print()
    print(table(trl, ours))
    if args.repeats > 1:
        for name, key in (("TRL", "TRL"), ("protege", "protege")):
            values = ", ".join(f"{v:.1f}" for v in (trl if key == "TRL" else ours)["all_tokens_per_second"])
            print(f"{name} tokens/s of every run: {values}")
    print()
    gen = ours.get("mean_generation_s_per_step")
    if gen is not None:
        per_step = ours["wall_seconds"] / max(ours["steps_timed"], 1)
        print(f"protege: {per_step:.3f} s per step, of which generation {gen:.3f} s (its own logs)")
    trl_inside = trl.get("seconds")
    if trl_inside is not None:
        print(
            f"TRL: {trl['wall_seconds'] / max(trl['steps_timed'], 1):.3f} s per step, of which "
            f"{trl_inside / max(trl['steps_timed'], 1):.3f} s between on_step_begin and on_step_end"
        )
    print()
    print(loss_curves(trl, ours))

    if args.json:
        record = {
            "machine": machine(),
            "args": vars(args),
            "paths": paths,
            "runs": runs,
            "problems": problems,
            "ratio": (ours["completion_tokens"] / ours["wall_seconds"])
            / (trl["completion_tokens"] / trl["wall_seconds"]),
            "median_tokens_per_second": {
                "TRL": statistics.median(trl["all_tokens_per_second"]),
                "protege": statistics.median(ours["all_tokens_per_second"]),
            },
        }
        Path(args.json).write_text(json.dumps(record, indent=2), encoding="utf-8")
        print(f"\nresults written to {args.json}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
