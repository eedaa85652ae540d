"""Peak memory and time of the distillation loss: dense logits vs ``chunked_jsd_loss``.

Two ways to get the generalized JSD between a student and a teacher from their last hidden states, forward + backward:

* dense, as a trainer without chunking runs it: ``student_logits = hidden_s @ W_s.T`` (gradients to ``hidden_s`` and
  ``W_s``), ``teacher_logits = hidden_t @ W_t.T`` under ``no_grad``, ``generalized_jsd_loss(...)``, ``backward()``;
* chunked: ``chunked_jsd_loss(hidden_s, W_s, hidden_t, W_t, labels, beta=beta, chunk_size=...)``, ``backward()``.

CPU, float32, ``torch.set_num_threads(--threads)``. Each (path, shape, chunk size) runs in a fresh worker process
(``python -m benchmarks.loss_memory --worker ...``), so one case's allocations never inflate another's peak. In the
worker:

* warm-up: one forward + backward of the same path at a tiny shape (lazy kernel/thread-pool initialisation);
* inputs are built (hidden states N(0, 1), LM heads N(0, 1/hidden), ~10% of labels -100), then ``gc.collect()``;
* peak memory = growth of ``ru_maxrss`` (``resource.getrusage``) from just before the loss call to just after
  ``backward()`` of the first call; it includes everything the call leaves behind (the (V, H) ``W_s.grad``);
* time = ``time.perf_counter()`` around forward + backward, ``--repeats`` further calls (gradients reset to None
  between calls), the table shows the MEDIAN (the min is in ``--json``).

The parent checks the losses agree (max |dense - chunked| over the cases run) and, at a small shape, that the gradients
of ``hidden_s`` and ``W_s`` agree. Dense cases whose estimated peak exceeds ``--mem-budget-gib`` are skipped with the
reason printed (``--no-skip`` runs them anyway, under an address-space limit of the budget, so they fail cleanly).

    python -m benchmarks loss_memory           # full table: vocab 32000/151936 x tokens 2048/8192, beta 0.5
    python -m benchmarks loss_memory --quick   # smoke run, a few seconds
    python -m benchmarks loss_memory --chunk-size 256 512 1024 2048 --vocab 151936 --tokens 2048   # chunk sweep
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable

from benchmarks import (
    Column,
    Report,
    emit_result,
    failure,
    markdown,
    module_command,
    parse,
    parser,
    spawn,
    status_bytes,
)

DEFAULT_CHUNK_SIZE = 128
# Dense peak ~= DENSE_FACTOR (tokens x vocab) float32 tensors + 2 (vocab x hidden) ones: measured with this script at
# beta 0.5, vocab 32000, 2048 tokens (4224 MiB); the interior formula keeps the most intermediates for backward.
DENSE_FACTOR = 16.0
MIB = 1024 * 1024


# ---------------------------------------------------------------------------------------------------------------------
# Worker: one case in a fresh process
# ---------------------------------------------------------------------------------------------------------------------


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports ru_maxrss in KiB


def make_inputs(tokens: int, vocab: int, hidden: int, seed: int, masked: float = 0.1):
    import torch

    gen = torch.Generator().manual_seed(seed)
    hidden_s = torch.randn(tokens, hidden, generator=gen).requires_grad_(True)
    weight_s = torch.randn(vocab, hidden, generator=gen).mul_(hidden**-0.5).requires_grad_(True)
    hidden_t = torch.randn(tokens, hidden, generator=gen)
    weight_t = torch.randn(vocab, hidden, generator=gen).mul_(hidden**-0.5)
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    labels[torch.rand(tokens, generator=gen) < masked] = -100
    return hidden_s, weight_s, hidden_t, weight_t, labels


def dense_step(hidden_s, weight_s, hidden_t, weight_t, labels, beta, chunk_size):
    import torch

    from protege.losses import generalized_jsd_loss

    student_logits = hidden_s @ weight_s.T
    with torch.no_grad():
        teacher_logits = hidden_t @ weight_t.T
    loss = generalized_jsd_loss(student_logits, teacher_logits, labels, beta=beta)
    loss.backward()
    return loss.detach()


def chunked_step(hidden_s, weight_s, hidden_t, weight_t, labels, beta, chunk_size):
    from protege.chunked import chunked_jsd_loss

    loss = chunked_jsd_loss(hidden_s, weight_s, hidden_t, weight_t, labels, beta=beta, chunk_size=chunk_size)
    loss.backward()
    return loss.detach()


STEPS = {"dense": dense_step, "chunked": chunked_step}


@dataclasses.dataclass(kw_only=True)
class Case:
    """One measurement, made in a fresh process (`--worker`): the path, the shape and how to time it."""

    path: str
    vocab: int
    tokens: int
    hidden: int
    beta: float
    chunk_size: int
    repeats: int
    threads: int
    seed: int
    as_limit_bytes: int = 0  # > 0: RLIMIT_AS this far above the inputs, so an over-budget case fails cleanly


def run_worker(case: Case) -> dict:
    """One case, after a warm-up at a tiny shape: its peak growth and its times."""
    import torch

    torch.set_num_threads(case.threads)
    step = STEPS[case.path]
    # Warm-up at a tiny shape: the same code path, so first-call initialisation is outside the measurement.
    small = make_inputs(64, 512, case.hidden, seed=1)
    step(*small, case.beta, 16)
    del small
    gc.collect()

    inputs = make_inputs(case.tokens, case.vocab, case.hidden, case.seed)
    hidden_s, weight_s = inputs[0], inputs[1]
    gc.collect()
    if case.as_limit_bytes:
        # Backstop for over-budget runs: allocations past the budget raise instead of waking the OOM killer.
        limit = status_bytes("VmSize") + case.as_limit_bytes
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    rss_before = status_bytes("VmRSS")
    maxrss_before = maxrss_bytes()
    start = time.perf_counter()
    try:
        loss = step(*inputs, case.beta, case.chunk_size)
    except RuntimeError as exc:  # DefaultCPUAllocator: can't allocate memory
        return {"error": f"OOM: {str(exc).splitlines()[0][:200]}"}
    first_s = time.perf_counter() - start
    maxrss_after = maxrss_bytes()

    times, usage = [], []
    for _ in range(case.repeats):
        hidden_s.grad = None
        weight_s.grad = None
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        step(*inputs, case.beta, case.chunk_size)
        times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        usage.append(
            (after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime, after.ru_minflt - before.ru_minflt)
        )
    return {
        "loss": loss.item(),
        "peak_bytes": maxrss_after - maxrss_before,
        "maxrss_before": maxrss_before,
        "rss_before": rss_before,
        "first_s": first_s,
        "times": times,
        "median_s": statistics.median(times) if times else first_s,
        "min_s": min(times) if times else first_s,
        # Per timed call: CPU seconds in user and kernel mode (page faults of fresh allocations), minor page faults.
        "user_s": [u[0] for u in usage],
        "sys_s": [u[1] for u in usage],
        "minor_faults": [u[2] for u in usage],
    }


# ---------------------------------------------------------------------------------------------------------------------
# Parent: cases, subprocesses, checks, table
# ---------------------------------------------------------------------------------------------------------------------


def dense_estimate_bytes(tokens: int, vocab: int, hidden: int) -> float:
    return DENSE_FACTOR * tokens * vocab * 4 + 2 * vocab * hidden * 4


def measure(args, path: str, vocab: int, tokens: int, beta: float, chunk_size: int, as_limit_bytes: int = 0) -> dict:
    """One case in a fresh worker process: its measurement, or {"error": why}."""
    case = Case(
        path=path,
        vocab=vocab,
        tokens=tokens,
        hidden=args.hidden,
        beta=beta,
        chunk_size=chunk_size,
        repeats=args.repeats,
        threads=args.threads,
        seed=args.seed,
        as_limit_bytes=as_limit_bytes,
    )
    done = spawn(module_command(sys.executable, "benchmarks.loss_memory", "--worker", case))
    return done.result if done.result is not None else {"error": failure(done)}


def check_gradients(hidden: int, chunk_size: int, threads: int) -> tuple[float, float, float]:
    """Max |dense - chunked| of the loss and of the gradients of hidden_s and W_s, at a small shape."""
    import torch

    torch.set_num_threads(threads)
    grads = {}
    for name, step in STEPS.items():
        inputs = make_inputs(300, 2000, hidden, seed=7)
        loss = step(*inputs, 0.5, min(chunk_size, 128))
        grads[name] = (loss, inputs[0].grad, inputs[1].grad)
    return tuple(float((a - b).abs().max()) for a, b in zip(grads["dense"], grads["chunked"], strict=True))


PATHS = ("dense", "chunked")


def ratio(row: dict, key: str) -> float | None:
    """chunked / dense of a measured quantity, where both were measured."""
    dense, chunked = row["dense"].get(key), row["chunked"].get(key)
    return None if dense is None or chunked is None else chunked / dense


def mib(part: str) -> Callable[[dict], float | None]:
    """A row's peak of one path in MiB."""
    return lambda row: None if "peak_bytes" not in row[part] else row[part]["peak_bytes"] / MIB


TABLES = {
    "loss": [
        Column("beta", "beta"),
        Column("vocab", "vocab"),
        Column("tokens", "tokens"),
        Column("hidden", "hidden"),
        Column("chunk", "chunk_size"),
        Column("dense MiB", mib("dense"), "{:.0f}", missing="skip/OOM"),
        Column("chunked MiB", mib("chunked"), "{:.0f}"),
        Column("mem ratio", lambda r: ratio(r, "peak_bytes"), "{:.3f}"),
        Column("dense s", lambda r: r["dense"].get("median_s"), "{:.2f}"),
        Column("chunked s", lambda r: r["chunked"].get("median_s"), "{:.2f}"),
        Column("time ratio", lambda r: ratio(r, "median_s"), "{:.2f}"),
    ]
}


def dense_case(args, vocab: int, tokens: int, beta: float) -> dict:
    """The dense path's measurement at one shape, or why it was not run."""
    budget = args.mem_budget_gib * 1024**3
    estimate = dense_estimate_bytes(tokens, vocab, args.hidden)
    if estimate > budget and not args.no_skip:
        return {
            "error": f"skipped: estimated dense peak {estimate / 1024**3:.1f} GiB > budget "
            f"{args.mem_budget_gib} GiB (--mem-budget-gib / --no-skip)"
        }
    if args.skip_dense:
        return {"error": "skipped: --skip-dense"}
    return measure(args, "dense", vocab, tokens, beta, 0, int(budget) if args.no_skip else 0)


def run_parent(args) -> None:
    """Every (beta, vocab, tokens, chunk) case in its own process, after a gradient check at a small shape."""
    import torch

    print(
        f"torch {torch.__version__}, {args.threads} threads, hidden {args.hidden}, repeats {args.repeats} "
        f"(median shown), dense budget {args.mem_budget_gib} GiB, load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    loss_diff, grad_h_diff, grad_w_diff = check_gradients(args.hidden, args.chunk_size[0], args.threads)
    print(
        f"gradient check (300 tokens x vocab 2000, beta 0.5): max |diff| loss {loss_diff:.2e}, "
        f"d hidden_s {grad_h_diff:.2e}, d W_s {grad_w_diff:.2e}",
        flush=True,
    )
    rows, notes = [], []
    for beta in args.beta:
        for vocab in args.vocab:
            for tokens in args.tokens:
                dense = dense_case(args, vocab, tokens, beta)
                for chunk_size in args.chunk_size:
                    chunked = measure(args, "chunked", vocab, tokens, beta, chunk_size)
                    shape = {"beta": beta, "vocab": vocab, "tokens": tokens, "hidden": args.hidden}
                    rows.append({**shape, "chunk_size": chunk_size, "dense": dense, "chunked": chunked})
                    print(f"  {markdown(rows[-1:], TABLES['loss']).splitlines()[-1]}", flush=True)
                    notes += [
                        f"{path} {shape}: {rows[-1][path]['error']}" for path in PATHS if "error" in rows[-1][path]
                    ]
    both = [r for r in rows if "loss" in r["dense"] and "loss" in r["chunked"]]
    largest = max((abs(r["dense"]["loss"] - r["chunked"]["loss"]) for r in both), default=0.0)
    print("\n" + Report("loss_memory", args).table("loss", rows, TABLES))
    print(f"max |dense loss - chunked loss| over the cases run: {largest:.2e}")
    for note in dict.fromkeys(notes):
        print(f"note: {note}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser("loss_memory", __doc__, quick="vocab 4096, 512 tokens, hidden 256, 1 repeat")
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 151936])
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--beta", type=float, nargs="+", default=[0.5])
    p.add_argument("--chunk-size", type=int, nargs="+", default=[DEFAULT_CHUNK_SIZE], help="several values: a sweep")
    p.add_argument("--repeats", type=int, default=3, help="timed calls after the measured first one; median shown")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mem-budget-gib", type=float, default=18.0, help="skip dense cases estimated above this")
    p.add_argument("--no-skip", action="store_true", help="run over-budget dense cases (under an RLIMIT_AS guard)")
    p.add_argument("--skip-dense", action="store_true", help="chunked only (e.g. a chunk-size sweep)")
    args = p.parse_args(argv)
    if args.quick:
        args.vocab, args.tokens, args.hidden, args.repeats = [4096], [512], 256, 1
        args.chunk_size = [min(args.chunk_size[0], 128)]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:  # one case, as measure() wrote it
        emit_result(run_worker(parse(Case, argv[1:])))
    else:
        run_parent(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
