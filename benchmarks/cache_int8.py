"""An 8-bit hidden teacher cache against the bfloat16 one at real shapes: the first step's loss from each cache and from
the live float32 teacher, and the per-token KL between the teacher distributions they give.

    python -m benchmarks cache_int8 --threads 1     # real shapes (vocabulary 151,936, teacher hidden 1,536)
    python -m benchmarks cache_int8 --quick         # smoke run: vocabulary 8000, hidden 64 / 128, 64 tokens

The models are real_scale's (`workers.random_models`, built once into `--cache-dir`, shared with real_scale and
teacher_cache): a Qwen2 student of hidden 896 and a teacher of hidden 1536, 4 layers each, vocabulary 151,936, random
weights. The rows: `--rows` rows of `--prompt-tokens` and exactly `--tokens` completion tokens, made as teacher_cache
makes its rows; 2 rows are a step's batch there, so the loss here is a first step's.

`protege cache-teacher --format hidden` writes the rows' cache twice, `--dtype bfloat16` (exact: 2H bytes a token)
and `--dtype int8` (H + 4). Then, in this process, float32 and `--threads` torch threads: trainers at lmbda 0 with
the live teacher and with each cache (no teacher; the start-up checks as always) give the teacher's hidden states for
the rows, and the loss (full vocabulary, protege's default chunking) is evaluated at beta 0, 0.5 and 1 with the same
student output and LM head: the relative error of the int8 cache's loss against the bfloat16 cache's and the live
teacher's. KL(p || q) per completion token over the whole vocabulary, between the live teacher (float32), the
bfloat16 cache and the int8 cache: mean and max.

Random weights have no outlier dimensions, which per-token absmax quantization handles worst (one large element
coarsens every other element's step): a trained teacher's error can be larger. A stress case measures it on the same
teacher: its states with one dimension `--outlier` times larger and the head's column for it as many times smaller
(the same distribution) are quantized as the cache would, and compared with the live teacher. The manifest's
`quantization` (the hidden states' relative error, measured at build time) says how a given teacher fares.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from benchmarks import Column, parser
from benchmarks.real_scale import QUICK, REAL
from benchmarks.teacher_cache import cache_run
from benchmarks.workers import trainer_config

if TYPE_CHECKING:
    import torch

DTYPES = ("bfloat16", "int8")
BETAS = (0.0, 0.5, 1.0)
SOURCES = ("live float32", "bfloat16 cache", "int8 cache")

TABLES = {
    "cache": [
        Column("stored", "dtype", text=True),
        Column("completion tokens", "tokens", "{:,}"),
        Column("bytes a token (tensors)", "bytes_per_token", "{:,.1f}"),
        Column("bytes a token (shard files)", "file_bytes_per_token", "{:,.1f}"),
        Column("hidden rel. error mean", lambda r: r.get("relative_error_mean"), "{:.3%}"),
        Column("hidden rel. error max", lambda r: r.get("relative_error_max"), "{:.3%}"),
        Column("build s", "seconds", "{:.1f}"),
    ],
    "loss": [
        Column("beta", "beta", "{:g}"),
        Column("live float32", "live float32", "{:.6f}"),
        Column("bfloat16 cache", "bfloat16 cache", "{:.6f}"),
        Column("int8 cache", "int8 cache", "{:.6f}"),
        Column("bf16 vs live", "bfloat16_vs_live", "{:.2e}"),
        Column("int8 vs bf16", "int8_vs_bfloat16", "{:.2e}"),
        Column("int8 vs live", "int8_vs_live", "{:.2e}"),
    ],
    "kl": [
        Column("KL(p, q) per token", "pair", text=True),
        Column("tokens", "tokens", "{:,}"),
        Column("mean nats", "mean", "{:.3e}"),
        Column("max nats", "max", "{:.3e}"),
        Column("q's hidden rel. error mean", "relative_error_mean", "{:.3%}"),
    ],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    options = parser("cache_int8", __doc__, quick="vocabulary 8000, hidden 64 / 128, 64 tokens")
    options.add_argument("--tokens", type=int, default=None, help="completion tokens a row (default 1000; quick 64)")
    options.add_argument("--rows", type=int, default=2, help="rows measured (2: teacher_cache's first step)")
    options.add_argument("--prompt-tokens", type=int, default=16)
    options.add_argument("--threads", type=int, default=1, help="torch threads here and in the cache builds")
    options.add_argument("--cache-dir", type=Path, default=Path("/tmp/protege_real_scale"), help="models and runs")
    options.add_argument(
        "--outlier", type=float, default=20.0, help="the stress case's factor on one hidden dimension (see above)"
    )
    args = options.parse_args(argv)
    args.shapes = QUICK if args.quick else REAL
    args.tokens = args.tokens or (64 if args.quick else 1000)
    args.max_length = args.prompt_tokens + args.tokens + 16
    return args


def build(dtype: str, args: argparse.Namespace, built: dict, data: Path, folder: Path, env: dict) -> dict:
    """`protege cache-teacher --format hidden --dtype DTYPE` from scratch; its bytes a token and measured error."""
    import shutil

    shutil.rmtree(folder, ignore_errors=True)
    command = [sys.executable, "-m", "protege", "cache-teacher", "--teacher", built["teacher"], "--tokenizer"]
    command += [built["tokenizer"], "--dataset_name", str(data), "--max_length", str(args.max_length)]
    command += ["--max_completion_length", str(args.tokens), "--batch_size", "2", "--output", str(folder)]
    command += ["--format", "hidden", "--dtype", dtype]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"cache-teacher --dtype {dtype} failed: {done.stderr.strip().splitlines()[-1:]}")
    seconds = time.perf_counter() - started
    from safetensors import safe_open

    manifest = json.loads((folder / "manifest.json").read_text())
    tensor_bytes = 0
    for name in manifest["shards"]:
        with safe_open(str(folder / name), framework="pt") as shard:
            names = set(shard.keys())
            tensor_bytes += sum(shard.get_tensor(key).nbytes for key in ("hidden", "hidden_scale") if key in names)
    files = sum((folder / name).stat().st_size for name in manifest["shards"])
    return {
        "dtype": dtype,
        "tokens": manifest["tokens"],
        "bytes_per_token": tensor_bytes / manifest["tokens"],
        "file_bytes_per_token": files / manifest["tokens"],
        **{key: value for key, value in (manifest.get("quantization") or {}).items() if key != "method"},
        "seconds": seconds,
    }


def teacher_hidden(args: argparse.Namespace, built: dict, data: Path, runs: Path) -> tuple[dict, object, object]:
    """The rows' teacher hidden states from each source (float32, (B, C, H)), the live trainer (its batch, objective,
    student and LM head) and the batch; each cache's LM head is checked equal to the live teacher's."""
    import datasets
    import torch
    from transformers import AutoModelForCausalLM

    from protege import DistillationConfig, DistillationTrainer
    from protege.models import load_tokenizer

    tokenizer = load_tokenizer(built["tokenizer"], trust_remote_code=False)
    student = AutoModelForCausalLM.from_pretrained(built["student"], dtype=torch.float32)
    rows = datasets.Dataset.from_json(str(data))
    run = SimpleNamespace(batch=args.rows, grad_accum=1, warmup=0, steps=1, learning_rate=1e-6, lmbda=0.0, beta=0.5)
    run.__dict__.update(max_length=args.max_length, max_completion_length=args.tokens, loss_top_k=0)
    run.__dict__.update(temperature=1.0, top_p=1.0, seed=0)

    def trainer(cache: Path | None, teacher=None):
        settings = trainer_config(run, str(runs / "trainer")) | {"teacher_cache": None if cache is None else str(cache)}
        config = DistillationConfig(**settings)
        inputs = dict(model=student, teacher_model=teacher, train_dataset=rows, processing_class=tokenizer)
        return DistillationTrainer(args=config, **inputs)

    live = trainer(None, AutoModelForCausalLM.from_pretrained(built["teacher"], dtype=torch.float32))
    batch = live.data_collator([live.train_dataset[i] for i in range(len(live.train_dataset))])
    hidden = {}
    with torch.no_grad():
        answer = live.teacher(batch)
        hidden[SOURCES[0]] = answer.hidden.float()
        for dtype, source in zip(DTYPES, SOURCES[1:]):
            cached = trainer(runs / f"cache-{dtype}")
            from_cache = cached.teacher(batch)
            if not torch.equal(from_cache.weight, answer.weight):
                raise SystemExit(f"the {dtype} cache's LM head differs from the live teacher's")
            hidden[source] = from_cache.hidden.float()
            del cached, from_cache
            gc.collect()
    return hidden, live, (batch, answer)


def losses(hidden: dict, live, batch: dict, answer) -> list[dict]:
    """The loss per completion token at each beta from each source's hidden states, the student output and LM head
    shared, and the relative errors between them."""
    import dataclasses

    import torch

    from protege.objective import student_output
    from protege.outputs import TeacherHidden

    labels = batch["labels"][:, int(batch["prompt_width"]) :]
    tokens = labels.ne(-100).sum()
    table = []
    with torch.no_grad():
        out = student_output(live.model, batch, live.objective.student_view, live.vocab_size)
        for beta in BETAS:
            objective = dataclasses.replace(live.objective, beta=beta)
            row = {"beta": beta}
            for source in SOURCES:
                teacher = TeacherHidden(hidden[source], answer.weight, answer.bias)
                row[source] = float(objective.loss_sum(out, teacher, labels) / tokens)
            live_loss, bf16, int8 = (row[source] for source in SOURCES)
            row |= {"bfloat16_vs_live": abs(bf16 - live_loss) / abs(live_loss)}
            row |= {
                "int8_vs_bfloat16": abs(int8 - bf16) / abs(bf16),
                "int8_vs_live": abs(int8 - live_loss) / abs(live_loss),
            }
            print(f"  beta {beta}: {row}", flush=True)
            table.append(row)
    return table


def outlier_case(live: torch.Tensor, factor: float) -> torch.Tensor:
    """The live teacher's states as int8 would store them if one dimension were `factor` times larger and the head's
    column for it `factor` times smaller (the same teacher, its distribution unchanged): quantized in float32 as the
    cache quantizes, dequantized, and the dimension scaled back."""
    from protege.teacher.quantized import dequantize, quantize

    stretched = live.clone()
    stretched[..., 0] *= factor
    restored = dequantize(*quantize(stretched))
    restored[..., 0] /= factor
    return restored


def kls(hidden: dict, labels, answer, chunk: int = 64) -> list[dict]:
    """KL(p || q) per completion token between the sources' full-vocabulary distributions (mean and max), and q's
    hidden states' mean relative error against p's."""
    import torch

    mask = labels.ne(-100)
    rows = {source: states[mask] for source, states in hidden.items()}
    pairs = [(SOURCES[0], SOURCES[1]), (SOURCES[1], SOURCES[2]), (SOURCES[0], SOURCES[2])]
    pairs += [(SOURCES[0], source) for source in hidden if source not in SOURCES]  # the outlier stress case
    values = {pair: [] for pair in pairs}
    with torch.no_grad():
        for start in range(0, int(mask.sum()), chunk):
            logprobs = {}
            for source, states in rows.items():
                logits = states[start : start + chunk] @ answer.weight.T
                logprobs[source] = torch.log_softmax(logits if answer.bias is None else logits + answer.bias, -1)
            for p, q in pairs:
                values[(p, q)].append((logprobs[p].exp() * (logprobs[p] - logprobs[q])).sum(-1))
    table = []
    for (p, q), parts in values.items():
        per_token = torch.cat(parts).double()
        error = (rows[p] - rows[q]).norm(dim=-1) / rows[p].norm(dim=-1)
        table.append(
            {
                "pair": f"p: {p}, q: {q}",
                "tokens": len(per_token),
                "mean": float(per_token.mean()),
                "max": float(per_token.max()),
                "relative_error_mean": float(error.mean()),
            }
        )
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false")
    import torch

    torch.set_num_threads(args.threads)
    env, built, report, runs, data = cache_run("cache_int8", args)
    caches = []
    for dtype in DTYPES:
        caches.append(build(dtype, args, built, data, runs / f"cache-{dtype}", env))
        print(f"  built the {dtype} cache: {caches[-1]}", flush=True)
    started = time.perf_counter()
    hidden, live, (batch, answer) = teacher_hidden(args, built, data, runs)
    stress = f"int8, one dimension x{args.outlier:g} (stress case)"
    loss_rows = losses(hidden, live, batch, answer)
    hidden[stress] = outlier_case(hidden[SOURCES[0]], args.outlier)
    kl_rows = kls(hidden, batch["labels"][:, int(batch["prompt_width"]) :], answer)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("\n" + report.table("cache", caches, TABLES))
    print("\n" + report.table("loss", loss_rows, TABLES))
    print("\n" + report.table("kl", kl_rows, TABLES))
    print(f"\nmeasured in {time.perf_counter() - started:.0f} s, peak RSS {peak:.1f} GiB, {args.threads} torch threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
