"""Peak memory and time of ONE distillation optimizer step at real shapes: protege's loss modes and TRL 1.8.0's.

Run it with protege's interpreter; ``trl-dense`` runs in the TRL environment (``make trl-env`` creates ``.trl-env``):

    python benchmarks/real_scale.py --quick                       # smoke run: tiny models, 64 tokens, every mode
    python benchmarks/real_scale.py                               # real shapes, 1000 completion tokens, every mode
    python benchmarks/real_scale.py --lengths 1000 4000 --modes local-default server-top1
    python benchmarks/real_scale.py --lengths 16000 --modes local-chunked server-top1 --mem-budget-gib 21

Models, built once into ``--cache-dir`` (random init, float32, saved with ``save_pretrained``):

* student: Qwen2, hidden 896, 4 layers, 14 heads (2 key-value), intermediate 4864, tied embeddings;
* teacher: Qwen2, hidden 1536, 4 layers, 12 heads (2 key-value), intermediate 8960, untied;
* tokenizer: word level, exactly the models' 151,936 entries (``<pad>``, ``<unk>``, ``<|im_start|>``,
  ``<|im_end|>``, then ``t0``, ``t1``, ...), with a chat template that wraps each turn in ``<|im_start|>`` and
  ``<|im_end|>``. It lives in its own folder: transformers 5's ``AutoTokenizer`` on a folder whose config.json is
  Qwen2 rebuilds Qwen2's BPE, so the workers load it with ``PreTrainedTokenizerFast`` and pass it to the trainer.

``--quick`` builds a vocabulary of 8000, a student of hidden 64 and 2 layers and a teacher of hidden 128 and 2 layers,
and runs 64-token completions.

Every case (mode x completion length) is one off-policy step (lmbda 0) on 2 rows of ~16 prompt and exactly N
completion tokens (batch 2, gradient accumulation 1), float32, AdamW (``adamw_torch``), learning rate 1e-6, no
activation checkpointing (unless ``--activation-checkpointing``), no saving, in a fresh process of
``real_scale_worker.py`` (whose docstring says what it measures). The modes (``real_scale_worker.MODES``), all at
beta 0.5 unless said:

* ``local-default``: protege with no loss setting: its default ``loss_top_k`` and ``loss_chunk_size``;
* ``local-dense``: protege, full vocabulary (``loss_top_k=0``), full logits (``loss_chunk_size=None``);
* ``local-chunked``: protege, full vocabulary, 256 tokens at a time (``loss_chunk_size=256``);
* ``server-top1``: protege with ``use_teacher_server=True``, ``loss_top_k=1``;
* ``server-top20``: protege with the teacher server, forward KL (beta 0), ``loss_top_k=20``;
* ``trl-dense``: TRL 1.8.0's ``DistillationTrainer``, full vocabulary (``loss_top_k=0``), its only local loss.

The server modes start ``python -m protege serve-teacher --model TEACHER`` on 127.0.0.1 (a fresh one per case, with
``--max-model-len`` and ``--max-batch-tokens`` large enough for the whole batch in one call); the teacher lives there.

Memory: the parent samples the resident set of the worker and the server every 0.2 s and kills the worker when the
two together pass ``--mem-budget-gib`` or the machine has less than 0.5 GiB available; such a case is reported as
killed, with the largest resident set seen. A finished case reports the worker's ``ru_maxrss`` (its high-water mark)
as peak RSS, and the server's ``VmHWM`` separately.

``from_pretrained`` maps the weight files, so a weight is resident only once read. The worker reads every weight
before the step (RSS ready: imports, weights, trainer built); the server does not, so its peak leaves out the
teacher's input-embedding rows that no sequence used (most of the 0.87 GiB of them at the real shapes).

The floor is what one step cannot do without: the worker's resident set after its imports (Python, torch,
transformers, the trainer library), plus the student's weights, gradients and two AdamW moments (4 x 4 bytes a
parameter), plus the teacher's weights (4 bytes a parameter; 0 for the server modes). Overhead = peak - floor: what
the step's activations, logits and loss kept. s/step is from the start of training to the end of the step
(``workers.step_timer``).

Output: a markdown table on stdout; every case, with the date, the machine and its load, appended to ``--json``
(default: ``CACHE_DIR/results.json``, a list with one entry per invocation).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import workers
from real_scale_worker import MODES, Case
from teacher_server import Server
from vs_trl import machine

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKER = HERE / "real_scale_worker.py"
GIB = 2**30
POLL_SECONDS = 0.2
MACHINE_RESERVE = 0.5 * GIB  # kill the worker when the machine has less than this available
SPECIALS = ("<pad>", "<unk>", "<|im_start|>", "<|im_end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The vocabulary and the `Qwen2Config` settings of both models."""

    name: str
    vocab: int
    student: dict
    teacher: dict


def qwen2(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, tied: bool) -> dict:
    return dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        tie_word_embeddings=tied,
    )


REAL = Shapes("real", 151_936, qwen2(896, 4, 14, 2, 4864, tied=True), qwen2(1536, 4, 12, 2, 8960, tied=False))
QUICK = Shapes("quick", 8000, qwen2(64, 2, 4, 2, 256, tied=True), qwen2(128, 2, 4, 2, 512, tied=False))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", help="completion tokens per row (default: 1000; --quick: 64)")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES), help="default: all, in this order")
    p.add_argument("--quick", action="store_true", help="smoke run: vocabulary 8000, hidden 64, 2 layers, 64 tokens")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/protege_real_scale"), help="models and runs")
    p.add_argument("--mem-budget-gib", type=float, default=21.0, help="kill a case whose worker + server pass this")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the worker and the server")
    p.add_argument(
        "--activation-checkpointing", action="store_true", help="recompute the student's activations (long completions)"
    )
    p.add_argument("--python", default=sys.executable, help="interpreter for protege (default: this one)")
    p.add_argument("--trl-python", default=str(REPO / ".trl-env" / "bin" / "python"), help="TRL 1.8.0's interpreter")
    p.add_argument("--json", type=Path, help="append the results here (default: CACHE_DIR/results.json)")
    args = p.parse_args(argv)
    args.shapes = QUICK if args.quick else REAL
    args.lengths = args.lengths or ([64] if args.quick else [1000])
    args.json = args.json or args.cache_dir / "results.json"
    return args


# ---------------------------------------------------------------------------------------------------------------------
# Models and tokenizer, built once
# ---------------------------------------------------------------------------------------------------------------------


def build_models(folder: Path, shapes: Shapes) -> dict:
    """The tokenizer, student and teacher folders under `folder` (built on first use) and the parameter counts."""
    manifest = folder / "built.json"
    if manifest.exists():
        return json.loads(manifest.read_text())
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    print(f"building the {shapes.name} models in {folder}", flush=True)
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update((f"t{i}", len(SPECIALS) + i) for i in range(shapes.vocab - len(SPECIALS)))
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
    )
    if len(tokenizer) != shapes.vocab:
        raise RuntimeError(f"the tokenizer has {len(tokenizer)} entries, not {shapes.vocab}")
    built = {"shapes": dataclasses.asdict(shapes), "tokenizer": str(folder / "tokenizer")}
    tokenizer.save_pretrained(built["tokenizer"])
    special_ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    for seed, name in enumerate(("student", "teacher")):
        torch.manual_seed(seed)
        settings = getattr(shapes, name)
        config = Qwen2Config(vocab_size=shapes.vocab, max_position_embeddings=32768, **special_ids, **settings)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        built[name] = str(folder / name)
        built[f"{name}_params"] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(built[name])  # no tokenizer files: the server takes its vocabulary from the LM head
        del model
    manifest.write_text(json.dumps(built, indent=1))
    return built


# ---------------------------------------------------------------------------------------------------------------------
# One case: the worker (and the teacher server) under a memory watch
# ---------------------------------------------------------------------------------------------------------------------


def high_water_mark(pid: int) -> int | None:
    """A live process's peak resident set (VmHWM), in bytes."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def watch(argv: list[str], env: dict, folder: Path, budget: float, server_pid: int | None) -> tuple:
    """Run the worker to its end, or kill it when it and the server pass `budget` bytes; its output goes to files.

    Returns the `workers.Finished` run, the largest resident sets sampled (worker, server) and why it was killed.
    """
    import psutil

    out, err = folder / "worker.out", folder / "worker.err"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        worker = subprocess.Popen(argv, stdout=stdout, stderr=stderr, env=env, cwd=folder)
        processes = [psutil.Process(worker.pid)] + ([psutil.Process(server_pid)] if server_pid else [])
        peaks, killed = [0] * len(processes), None
        while worker.poll() is None:
            now = []
            for process in processes:
                try:
                    now.append(process.memory_info().rss)
                except psutil.Error:  # the worker just exited
                    now.append(0)
            peaks = [max(a, b) for a, b in zip(peaks, now)]
            if sum(now) > budget:
                killed = f"over budget: {sum(now) / GIB:.1f} GiB > {budget / GIB:.1f} GiB"
            elif psutil.virtual_memory().available < MACHINE_RESERVE:
                killed = f"machine memory low ({psutil.virtual_memory().available / GIB:.2f} GiB available)"
            if killed:
                worker.kill()
                worker.wait()
                break
            time.sleep(POLL_SECONDS)
    text = out.read_text()
    finished = workers.Finished(argv, worker.returncode, text, err.read_text(), workers.read_result(text))
    return finished, peaks + [None] * (2 - len(peaks)), killed


def run_case(case: Case, args: argparse.Namespace, built: dict, folder: Path) -> dict:
    """One mode at one length in a fresh worker (and server); the record that goes into the table and the JSON."""
    mode = MODES[case.mode]
    python = args.trl_python if mode.system == "trl" else args.python
    env = dict(os.environ)
    if mode.system == "trl":
        env.pop("PYTHONPATH", None)  # the TRL interpreter sees only its own environment
    record = {"length": case.completion_tokens, "mode": case.mode, "load_before": os.getloadavg()[0]}
    with contextlib.ExitStack() as stack:
        server = None
        if mode.server:
            limits = ["--max-model-len", case.max_length, "--max-batch-tokens", case.batch * case.max_length]
            server = stack.enter_context(Server(built["teacher"], True, folder, [str(v) for v in limits]))
            case.server_url = server.url
            record["server_rss_ready"] = high_water_mark(server.process.pid)
        started = time.perf_counter()
        done, (worker_peak, server_peak), killed = watch(
            workers.command(python, WORKER, case),
            env,
            folder,
            args.mem_budget_gib * GIB,
            server.process.pid if server else None,
        )
        record["process_seconds"] = time.perf_counter() - started
        if server:
            record["server_peak_rss"] = high_water_mark(server.process.pid) or server_peak
    result = done.result or {}
    record.update(result, load_after=os.getloadavg()[0], sampled_peak_rss=worker_peak, sampled_server_rss=server_peak)
    if "rss_imports" in result:
        record["floor"] = result["rss_imports"] + 16 * result["student_params"] + 4 * result["teacher_params"]
    if killed:
        record.update(status=f"killed: {killed}", peak_rss=worker_peak)
    elif done.returncode != 0 or not result.get("finished"):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
        cause = "SIGKILL (OOM killer?)" if done.returncode == -9 else f"exit {done.returncode}: {tail}"
        record.update(status=f"failed: {cause}", peak_rss=worker_peak)
    elif result["completion_tokens_trained"] != case.batch * case.completion_tokens:
        trained = result["completion_tokens_trained"]
        record["status"] = f"trained {trained} tokens, not {case.batch} x {case.completion_tokens}"
    else:
        record["status"] = "ok"
    if record.get("floor") and record.get("peak_rss"):
        record["overhead"] = record["peak_rss"] - record["floor"]
    return record


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def gib(value) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def table(records: list[dict]) -> str:
    lines = [
        "| completion tokens | mode | loss | RSS ready GiB | peak RSS GiB | floor GiB | overhead GiB | s/step "
        "| loss value | server peak GiB | status |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        loss = f"top_k {r.get('loss_top_k', '?')}, chunk {r.get('loss_chunk_size')}, beta {r.get('beta', '?')}"
        seconds = "-" if r.get("step_seconds") is None else f"{r['step_seconds']:.1f}"
        value = "-" if r.get("loss") is None else f"{r['loss']:.4g}"
        lines.append(
            f"| {r['length']} | {r['mode']} | {loss} | {gib(r.get('rss_ready'))} | {gib(r.get('peak_rss'))} "
            f"| {gib(r.get('floor'))} "
            f"| {gib(r.get('overhead'))} | {seconds} | {value} | {gib(r.get('server_peak_rss'))} | {r['status']} |"
        )
    return "\n".join(lines)


def append_json(path: Path, entry: dict) -> None:
    entries = json.loads(path.read_text()) if path.exists() else []
    entries.append(entry)
    path.write_text(json.dumps(entries, indent=1, default=str))


def source_state() -> str:
    """The commit of this checkout, and whether src/ has changes on top of it: protege's code that the run measured."""
    git = ["git", "-C", str(REPO)]
    try:
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "src"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return f"{commit or 'unknown'}{' + uncommitted changes in src/' if dirty else ''}"


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = str(args.threads)
    os.environ.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false")
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    if "trl-dense" in args.modes and not Path(args.trl_python).exists():
        raise SystemExit(f"no TRL interpreter at {args.trl_python}: run `make trl-env` or pass --trl-python")
    folder = args.cache_dir / args.shapes.name
    built = build_models(folder, args.shapes)
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    source = source_state()
    print(f"{started}; protege {source}; machine: {machine()}; 1-min load {os.getloadavg()[0]:.2f}", flush=True)
    print(
        f"{args.shapes.name} shapes: vocabulary {args.shapes.vocab}, student {built['student_params']:,} parameters, "
        f"teacher {built['teacher_params']:,}; memory budget {args.mem_budget_gib} GiB; {args.threads} threads",
        flush=True,
    )
    records = []
    for length in args.lengths:
        for mode in args.modes:
            case_dir = folder / "runs" / f"{length}-{mode}"
            case_dir.mkdir(parents=True, exist_ok=True)
            case = Case(
                mode=mode,
                completion_tokens=length,
                student=built["student"],
                teacher=built["teacher"],
                tokenizer=built["tokenizer"],
                output_dir=str(case_dir / "trainer"),
                threads=args.threads,
                activation_checkpointing=args.activation_checkpointing,
            )
            record = run_case(case, args, built, case_dir)
            records.append(record)
            print(
                f"  {length:>6} {mode:<14} {record['status']}: peak {gib(record.get('peak_rss'))} GiB, "
                f"{record.get('step_seconds') or 0:.1f} s/step, load {record['load_before']:.2f} -> "
                f"{record['load_after']:.2f} ({case_dir})",
                flush=True,
            )
    print()
    print(table(records))
    append_json(
        args.json,
        {
            "started": started,
            "source": source,
            "machine": machine(),
            "args": vars(args),
            "built": built,
            "records": records,
        },
    )
    print(f"\nresults appended to {args.json}")
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
