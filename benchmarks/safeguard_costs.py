"""What two safeguards cost at real shapes: the figures of docs/architecture.md.

    python benchmarks/safeguard_costs.py                     # vocabulary 151,936, batch 64, a 2 GiB checkpoint
    python benchmarks/safeguard_costs.py --checkpoint-gib 0  # the generation figures only

1. Generation with a padded student and an extending teacher suppresses the rows past the student's tokenizer
   (`DistillationTrainer.suppressed_ids`, transformers' `suppress_tokens`). Per generated token, transformers'
   `SuppressTokensLogitsProcessor` on (batch, vocabulary) float32 scores with Qwen2.5's 271 padding rows, against the
   student's LM head on the same batch (hidden 896, Qwen2.5-0.5B's), the one matmul every token pays anyway.
2. `checkpoints.publish` fsyncs a checkpoint before renaming it. One file of `--checkpoint-gib` random bytes is
   written (to the page cache) and then published; both are timed, so the fsync's share of a save shows.

Each timing is the median of `--repeats` calls after one warm-up call. Prints a markdown table, the machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers.generation.logits_process import SuppressTokensLogitsProcessor

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from protege.checkpoints import publish  # noqa: E402


def median_ms(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)


def generation_rows(vocab: int, tokens: int, batch: int, hidden: int, repeats: int) -> list[tuple[str, str]]:
    processor = SuppressTokensLogitsProcessor(list(range(tokens, vocab)), device="cpu")
    scores, ids = torch.randn(batch, vocab), torch.zeros(batch, 8, dtype=torch.long)
    states, head = torch.randn(batch, hidden), torch.randn(vocab, hidden)
    suppress = median_ms(lambda: processor(ids, scores), repeats)
    matmul = median_ms(lambda: states @ head.T, repeats)
    return [
        (f"suppress {vocab - tokens} rows of {batch} x {vocab:,} scores, per token", f"{suppress:.1f} ms"),
        (f"LM head {batch} x {hidden} x {vocab:,}, per token", f"{matmul:.1f} ms"),
    ]


def checkpoint_rows(gib: float, folder: str) -> list[tuple[str, str]]:
    root = tempfile.mkdtemp(dir=folder)
    staged = os.path.join(root, "tmp-checkpoint-1", "checkpoint-1")
    os.makedirs(staged)
    block = os.urandom(64 * 2**20)
    started = time.perf_counter()
    with open(os.path.join(staged, "model.safetensors"), "wb") as handle:
        for _ in range(round(gib * 16)):
            handle.write(block)
    written = time.perf_counter() - started
    started = time.perf_counter()
    publish(staged, os.path.join(root, "checkpoint-1"))
    published = time.perf_counter() - started
    os.remove(os.path.join(root, "checkpoint-1", "model.safetensors"))
    os.rmdir(os.path.join(root, "checkpoint-1"))
    os.rmdir(root)
    return [
        (f"write a {gib:g} GiB file (to the page cache)", f"{written:.1f} s"),
        ("publish it (fsync of file and folders, rename)", f"{published:.1f} s"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151_936, help="Output rows (Qwen2.5's).")
    parser.add_argument("--tokens", type=int, default=151_665, help="Tokenizer size (Qwen2.5's); rows past it pad.")
    parser.add_argument("--batch", type=int, default=64, help="Sequences generated together.")
    parser.add_argument("--hidden", type=int, default=896, help="Student hidden size (Qwen2.5-0.5B's).")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--checkpoint-gib", type=float, default=2.0, help="0 skips the checkpoint case.")
    parser.add_argument("--folder", default=".", help="Where the checkpoint is written (the disk to measure).")
    args = parser.parse_args()
    rows = generation_rows(args.vocab, args.tokens, args.batch, args.hidden, args.repeats)
    if args.checkpoint_gib > 0:
        rows += checkpoint_rows(args.checkpoint_gib, args.folder)
    print("| case | time |\n| --- | ---: |")
    for case, value in rows:
        print(f"| {case} | {value} |")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {now}")


if __name__ == "__main__":
    main()
