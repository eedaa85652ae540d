"""The command line's servers: the teacher server's throughput with and without request batching, the memory of one
scoring call, and how soon the `protege` commands answer.

    python -m benchmarks teacher_server                       # throughput: ~4-5 min on 2 busy cores, model cached
    python -m benchmarks teacher_server --model DIR --clients 1 8 --requests 32 --rounds 1
    python -m benchmarks teacher_server memory --model /tmp/protege_real_scale/real/teacher [--glibc-default]
    python -m benchmarks teacher_server startup [--repeats 5]  # seconds until a command answers: ~1 min

`throughput` (the default): two real servers (`python -m protege serve-teacher`) run as subprocesses on 127.0.0.1, one
with batching (the default) and one with `--no-batching`. Both stay up (the idle one takes no CPU), and every setting
is measured `--rounds` times, alternating which server goes first, so drift in the machine's load favours neither. For
each number of concurrent clients (`--clients`), that many threads each own a `TeacherClient` (`--format`, no retries)
and call `score` in a loop: one untimed warm-up request each, then, after a barrier, `--requests` timed requests split
evenly (at least 2 per client), each `--sequences` sequences of `--prompt` + `--completion` random token ids at K =
`--top-k`. Over the rounds: tokens/s = scored (completion) tokens / wall time from the barrier to the last answer
(median, min-max); latency = one `score` call, encoding, decoding and checks included (mean of the rounds' means;
median of their p90); sequences per backend call from the server's /info/ counters: how much batching merged. The
clients share the machine (and one GIL) with the server: the numbers compare settings, they are not its capacity.
The model is `--model`, or by default the trained tiny teacher of `payload` (`workers.trained_models`, vocabulary
8000, 3 layers, hidden 128; built and cached on first use, ~7 CPU-minutes).

`memory`: one case per process (glibc's setting is process-wide), on a model folder such as the real-shape teacher
that `real_scale` builds. It reads every weight first (they are memory-mapped), then scores 2 random sequences of
`--tokens` tokens (16 prompt tokens each, top-1, temperature 1) in one `TransformersBackend.score` call, with and
without (`--glibc-default`) the fixed glibc mmap threshold that `protege serve-teacher` sets, and reports the growth
of `ru_maxrss`.

`startup`: wall seconds of whole commands, each `--repeats` times (median, min-max), with this interpreter's `protege`:
`protege train --help` with nothing kept yet (a fresh PROTEGE_CACHE_DIR each time: the full parse, torch and
transformers imported) and with what the first run keeps (`protege.commands.train_quick`), a mistyped flag, and
`protege serve-teacher --help`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import Column, Report, Server, parser

TABLES = {
    "throughput": lambda settings: [
        Column("clients", "clients"),
        Column("batching", lambda r: "on" if r["batching"] else "off", text=True),
        Column(f"requests ({settings['rounds']} rounds)", "requests"),
        Column(
            "scored tokens/s, median (min-max)",
            lambda r: f"{r['tokens_per_s']:.0f} ({r['tokens_per_s_min']:.0f}-{r['tokens_per_s_max']:.0f})",
        ),
        Column("mean latency (ms)", "mean_latency_ms", "{:.0f}"),
        Column("p90 latency (ms), median", "p90_latency_ms", "{:.0f}"),
        Column("sequences per backend call", "sequences_per_call", "{:.1f}", missing="n/a"),
    ],
    "startup": [
        Column("command", "command", text=True),
        Column("seconds, median (min-max)", lambda r: f"{r['median_s']:.2f} ({r['min_s']:.2f}-{r['max_s']:.2f})"),
    ],
    "memory": [
        Column("tokens", lambda r: f"2 x {r['tokens']}", text=True),
        Column("vocabulary", "vocab_size"),
        Column("fixed mmap threshold", "fixed_threshold", text=True),
        Column("ru_maxrss growth MiB", "growth_mib"),
    ],
}


def server_counters(url: str) -> dict:
    """The server's /info/ counters (requests, backend_calls, ...); empty where it reports none."""
    import httpx

    return httpx.get(f"{url}/info/", timeout=30).json()


def run_clients(url: str, clients: int, requests_each: int, vocab: int, args: argparse.Namespace, seed: int) -> dict:
    """`clients` threads, each 1 warm-up + `requests_each` timed TeacherClient.score calls; wall time and latencies."""
    from protege.teacher.client import TeacherClient

    warmed, go = threading.Barrier(clients + 1), threading.Barrier(clients + 1)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def request(rng):
        length = args.prompt + args.completion
        sequences = [[rng.randrange(vocab) for _ in range(length)] for _ in range(args.sequences)]
        return sequences, [args.prompt] * args.sequences

    def work(index):
        rng = random.Random(seed * 1000 + index)
        client = TeacherClient(url, response_format=args.format, max_retries=0, timeout=args.request_timeout)
        try:
            client.score(*request(rng), top_k=args.top_k)  # warm-up
            bodies = [request(rng) for _ in range(requests_each)]
            warmed.wait(timeout=args.request_timeout)
            go.wait(timeout=args.request_timeout)
            for sequences, prompt_lengths in bodies:
                t0 = time.perf_counter()
                client.score(sequences, prompt_lengths, top_k=args.top_k)
                with lock:
                    latencies.append(time.perf_counter() - t0)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(f"client {index}: {type(error).__name__}: {error}")
            warmed.abort()
            go.abort()
        finally:
            client.close()

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    warmed.wait(timeout=args.request_timeout)
    before = server_counters(url)
    go.wait(timeout=args.request_timeout)
    start = time.perf_counter()
    for t in threads:
        t.join(timeout=args.request_timeout * (requests_each + 1))
    wall = time.perf_counter() - start
    if errors or len(latencies) != clients * requests_each:
        raise RuntimeError(f"{len(latencies)}/{clients * requests_each} requests answered; {errors[:3]}")
    tokens = clients * requests_each * args.sequences * args.completion
    after = server_counters(url)
    latencies.sort()
    return {
        "clients": clients,
        "requests": clients * requests_each,
        "scored_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "mean_latency_ms": statistics.mean(latencies) * 1e3,
        "p90_latency_ms": latencies[int(0.9 * (len(latencies) - 1))] * 1e3,
        "backend_calls": after["backend_calls"] - before.get("backend_calls", 0) if "backend_calls" in after else None,
    }


def summarise(runs: list[dict], args: argparse.Namespace) -> list[dict]:
    """One row per (clients, batching) over the rounds."""
    rows = []
    for clients in args.clients:
        for batching in (True, False):
            group = [r for r in runs if r["clients"] == clients and r["batching"] == batching]
            rates = [r["tokens_per_s"] for r in group]
            calls = [r["backend_calls"] for r in group]
            requests = sum(r["requests"] for r in group)
            rows.append(
                {
                    "clients": clients,
                    "batching": batching,
                    "requests": requests,
                    "tokens_per_s": statistics.median(rates),
                    "tokens_per_s_min": min(rates),
                    "tokens_per_s_max": max(rates),
                    "mean_latency_ms": statistics.mean(r["mean_latency_ms"] for r in group),
                    "p90_latency_ms": statistics.median(r["p90_latency_ms"] for r in group),
                    "sequences_per_call": requests * args.sequences / sum(calls) if all(calls) else None,
                    "rounds": group,
                }
            )
    return rows


def throughput(args: argparse.Namespace) -> None:
    """Both servers up at once; every setting `--rounds` times, the order alternating."""
    from protege.teacher.client import TeacherClient

    model = args.model
    if model is None:
        from benchmarks.workers import trained_models

        model = str(trained_models(args.cache_dir, 8000, 300, 100)["teacher_dir"])
    print(f"model {model}; load average before: {os.getloadavg()[0]:.2f} (1 min)")
    print(
        f"each request: {args.sequences} x ({args.prompt} prompt + {args.completion} completion) tokens, "
        f"K={args.top_k}, {args.format}; {args.requests} timed requests per setting after 1 warm-up per client"
    )
    runs = []
    with tempfile.TemporaryDirectory(prefix="protege-bench-") as log_dir, contextlib.ExitStack() as stack:
        servers = {b: stack.enter_context(Server(model, b, Path(log_dir), args.server_arg)) for b in (True, False)}
        client = TeacherClient(servers[True].url)
        vocab = client.vocab_size()
        client.close()
        for round_index in range(args.rounds):
            order = (True, False) if round_index % 2 == 0 else (False, True)  # drift in the load favours neither
            for clients in args.clients:
                for batching in order:
                    load = os.getloadavg()[0]
                    each = max(2, args.requests // clients)
                    r = run_clients(servers[batching].url, clients, each, vocab, args, seed=round_index * 100 + clients)
                    r.update(batching=batching, load_before=load, round=round_index)
                    runs.append(r)
                    print(
                        f"  round {round_index}  clients {clients:>2}  batching {'on ' if batching else 'off'}  "
                        f"requests {r['requests']:>3}  {r['tokens_per_s']:>8.0f} tokens/s  mean latency "
                        f"{r['mean_latency_ms']:>7.1f} ms  (p90 {r['p90_latency_ms']:.1f} ms, load {load:.2f}, "
                        f"backend calls {r['backend_calls']})",
                        flush=True,
                    )
    print(f"\nload average after: {os.getloadavg()[0]:.2f}\n")
    print(Report("teacher_server", args).table("throughput", summarise(runs, args), TABLES))


def memory(args: argparse.Namespace) -> None:
    """One scoring call's growth of the process's high-water mark, weights already read."""
    import torch

    from protege.server.backends import TransformersBackend, return_large_blocks_to_the_os

    if args.model is None:
        raise SystemExit("memory needs --model (a teacher folder, such as real_scale's)")
    torch.set_num_threads(args.threads)
    fixed = False if args.glibc_default else return_large_blocks_to_the_os()
    backend = TransformersBackend(args.model)
    with torch.inference_mode():
        for tensor in backend.model.state_dict().values():
            tensor.sum()
    rng = random.Random(0)
    sequences = [[rng.randrange(5, backend.vocab_size) for _ in range(args.tokens)] for _ in range(2)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    backend.score(sequences, [16, 16], 1, 1.0)
    growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
    row = {"tokens": args.tokens, "vocab_size": backend.vocab_size, "fixed_threshold": fixed, "growth_mib": growth_mib}
    print(Report("teacher_server", args).table("memory", [row], TABLES))


def startup(args: argparse.Namespace) -> None:
    """Seconds until each command has answered, as a person at a prompt waits for it."""
    import subprocess

    cases = (
        ("protege train --help (first run)", ["train", "--help"], True),
        ("protege train --help", ["train", "--help"], False),
        ("protege train --lmbad 0.5 (mistyped flag)", ["train", "--lmbad", "0.5"], False),
        ("protege serve-teacher --help", ["serve-teacher", "--help"], False),
    )
    kept = tempfile.mkdtemp(prefix="protege-startup-")
    subprocess.run(
        [sys.executable, "-m", "protege", "train", "--help"],
        env={**os.environ, "PROTEGE_CACHE_DIR": kept},
        capture_output=True,
        check=True,
    )  # what a first run keeps, for the cases that use it
    rows = []
    for name, command, fresh in cases:
        seconds = []
        for _ in range(args.repeats):
            cache = tempfile.mkdtemp(prefix="protege-startup-") if fresh else kept
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "protege", *command],
                env={**os.environ, "PROTEGE_CACHE_DIR": cache},
                capture_output=True,
            )
            seconds.append(time.perf_counter() - started)
        rows.append(
            {"command": name, "median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds)}
        )
    print(f"load average after: {os.getloadavg()[0]:.2f} (1 min)")
    print(Report("teacher_server", args).table("startup", rows, TABLES))


def main(argv: list[str] | None = None) -> int:
    options = parser("teacher_server", __doc__, quick="throughput with 1 and 4 clients, 8 requests, 1 round")
    options.add_argument("mode", nargs="?", choices=["throughput", "memory", "startup"], default="throughput")
    options.add_argument("--model", help="teacher model folder or hub id (throughput default: payload's tiny teacher)")
    options.add_argument("--cache-dir", type=Path, default=Path("/tmp/protege-bench-models"), help="payload's models")
    options.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    options.add_argument("--requests", type=int, default=48, help="timed requests per (clients, batching, round)")
    options.add_argument("--rounds", type=int, default=3, help="repeats of every setting, in alternating order")
    options.add_argument("--sequences", type=int, default=4, help="sequences per request")
    options.add_argument("--prompt", type=int, default=32)
    options.add_argument("--completion", type=int, default=128)
    options.add_argument("--top-k", type=int, default=1)
    options.add_argument("--format", default="compact", choices=["json", "binary", "compact"])
    options.add_argument("--request-timeout", type=float, default=120.0)
    options.add_argument("--server-arg", action="append", default=[], help="extra serve-teacher argument (repeatable)")
    options.add_argument("--tokens", type=int, default=2000, help="memory: tokens per sequence (2 sequences)")
    options.add_argument("--glibc-default", action="store_true", help="memory: leave glibc's mmap threshold alone")
    options.add_argument("--threads", type=int, default=2, help="memory: torch threads")
    options.add_argument("--repeats", type=int, default=5, help="startup: runs of each command")
    args = options.parse_args(argv)
    if args.quick:
        args.clients, args.requests, args.rounds = [1, 4], 8, 1
    if args.mode == "memory":
        memory(args)
    elif args.mode == "startup":
        startup(args)
    else:
        throughput(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
