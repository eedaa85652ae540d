"""Throughput of a real teacher server (`python -m protege serve-teacher`) with and without request batching.

Two servers run as subprocesses on 127.0.0.1 (free ports), one with batching (the default) and one with
`--no-batching`. Both stay up (the idle one takes no CPU), and every setting is measured --rounds times, alternating
which server goes first, so drift in the machine's load does not favour one.

For each number of concurrent clients (--clients), that many threads each own a `TeacherClient` (protocol "protege",
--format, no retries) and call `TeacherClient.score` in a loop: one untimed warm-up request each, then, after a
barrier, a fixed number of timed requests each (--requests split evenly, at least 2 per client). Each request is
--sequences sequences of --prompt + --completion random token ids (the content does not change the cost) at
K = --top-k. The table gives, over the rounds:

* tokens/s = scored (completion) tokens of all timed requests / wall time from the barrier to the last answer
  (median, and min-max);
* latency = time of one `TeacherClient.score` call, request encoding and response decoding + checks included (mean
  of the rounds' means; median of the rounds' p90);
* sequences per backend call, from the server's /info/ counters (`backend_calls`) read before and after the timed
  requests: how much batching merged.

The clients run in this process (one GIL) on the same machine as the server, so on a small machine they take CPU from
it; the numbers compare settings on one machine, they are not the server's capacity.

The model is --model, or by default the trained tiny teacher of benchmarks/payload.py (built and cached on first use,
~7 CPU-minutes; vocabulary 8000, 3 layers, hidden 128).

    python benchmarks/teacher_server.py                      # ~4-5 min on 2 busy cores once the model is cached
    python benchmarks/teacher_server.py --model DIR --clients 1 8 --requests 32 --rounds 1
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from workers import command, free_port


@dataclasses.dataclass(kw_only=True)
class ServeTeacher:
    """The `protege serve-teacher` flags this benchmark sets."""

    model: str
    port: int
    host: str = "127.0.0.1"
    log_level: str = "warning"
    no_batching: bool = False


class Server:
    """`python -m protege serve-teacher` in a subprocess, stopped on exit."""

    def __init__(self, model: str, batching: bool, log_dir: Path, extra: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        flags = ServeTeacher(model=model, port=self.port, no_batching=not batching)
        self.command = command(sys.executable, "protege", "serve-teacher", flags, *extra, module=True)
        self.log_path = log_dir / f"server-{'batching' if batching else 'no-batching'}.log"
        self.process = None

    def __enter__(self) -> Server:
        from protege.teacher.client import TeacherClient

        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in __exit__
        self.process = subprocess.Popen(self.command, stdout=self.log, stderr=subprocess.STDOUT)
        client = TeacherClient(self.url)
        try:
            client.wait_until_ready(timeout=180)
        except Exception:
            self.__exit__(None, None, None)
            raise RuntimeError(f"server did not start; log:\n{self.log_path.read_text()[-2000:]}") from None
        finally:
            client.close()
        return self

    def __exit__(self, *_):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self.log.close()


def server_counters(url: str) -> dict:
    """The server's /info/ counters (requests, backend_calls, ...); empty where it reports none."""
    import httpx

    return httpx.get(f"{url}/info/", timeout=30).json()


def run_clients(url, clients, requests_each, vocab, args, seed) -> dict:
    """`clients` threads, each 1 warm-up + `requests_each` timed TeacherClient.score calls; wall time and latencies."""
    from protege.teacher.client import TeacherClient

    warmed, go = threading.Barrier(clients + 1), threading.Barrier(clients + 1)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def request(rng):
        sequences = [
            [rng.randrange(vocab) for _ in range(args.prompt + args.completion)] for _ in range(args.sequences)
        ]
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
    calls = after.get("backend_calls", 0) - before.get("backend_calls", 0)
    latencies.sort()
    return {
        "clients": clients,
        "requests": clients * requests_each,
        "scored_tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "mean_latency_ms": statistics.mean(latencies) * 1e3,
        "p90_latency_ms": latencies[int(0.9 * (len(latencies) - 1))] * 1e3,
        "backend_calls": calls if "backend_calls" in after else None,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="teacher model dir or hub id (default: benchmarks/payload.py's tiny teacher)")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/protege-bench-models"))
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=48, help="timed requests per (clients, batching, round)")
    parser.add_argument("--rounds", type=int, default=3, help="repeats of every setting, in alternating order")
    parser.add_argument("--sequences", type=int, default=4, help="sequences per request")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--completion", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--format", default="compact", choices=["json", "binary", "compact"])
    parser.add_argument("--request-timeout", type=float, default=120.0)
    parser.add_argument("--server-arg", action="append", default=[], help="extra serve-teacher argument (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    from protege.teacher.client import TeacherClient

    model = args.model
    if model is None:
        from payload import build_models  # a sibling, like workers.py: benchmarks/ is on sys.path

        model = str(build_models(args.cache_dir, 8000, 300, 100)["teacher_dir"])
    print(f"model {model}; load average before: {os.getloadavg()[0]:.2f} (1 min)")
    print(
        f"each request: {args.sequences} x ({args.prompt} prompt + {args.completion} completion) tokens, "
        f"K={args.top_k}, {args.format}; {args.requests} timed requests per setting after 1 warm-up per client"
    )
    runs = []
    with tempfile.TemporaryDirectory(prefix="protege-bench-") as log_dir, contextlib.ExitStack() as stack:
        servers = {
            batching: stack.enter_context(Server(model, batching, Path(log_dir), args.server_arg))
            for batching in (True, False)
        }
        client = TeacherClient(servers[True].url)
        vocab = client.vocab_size()
        client.close()
        for round_index in range(args.rounds):
            # Both servers stay up (the idle one takes no CPU); alternate which goes first so drift in the machine's
            # load does not favour one setting.
            order = (True, False) if round_index % 2 == 0 else (False, True)
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
    results = []
    for clients in args.clients:
        for batching in (True, False):
            group = [r for r in runs if r["clients"] == clients and r["batching"] == batching]
            rates = [r["tokens_per_s"] for r in group]
            results.append(
                {
                    "clients": clients,
                    "batching": batching,
                    "requests": sum(r["requests"] for r in group),
                    "tokens_per_s": statistics.median(rates),
                    "tokens_per_s_min": min(rates),
                    "tokens_per_s_max": max(rates),
                    "mean_latency_ms": statistics.mean(r["mean_latency_ms"] for r in group),
                    "p90_latency_ms": statistics.median(r["p90_latency_ms"] for r in group),
                    "sequences_per_call": (
                        sum(r["requests"] for r in group) * args.sequences / sum(r["backend_calls"] for r in group)
                        if all(r["backend_calls"] for r in group)
                        else None
                    ),
                }
            )
    print(f"\nload average after: {os.getloadavg()[0]:.2f}\n")
    print(
        f"| clients | batching | requests ({args.rounds} rounds) | scored tokens/s, median (min-max) | "
        "mean latency (ms) | p90 latency (ms), median | sequences per backend call |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(
            f"| {r['clients']} | {'on' if r['batching'] else 'off'} | {r['requests']} | {r['tokens_per_s']:.0f} "
            f"({r['tokens_per_s_min']:.0f}-{r['tokens_per_s_max']:.0f}) | {r['mean_latency_ms']:.0f} | "
            f"{r['p90_latency_ms']:.0f} | "
            + (f"{r['sequences_per_call']:.1f} |" if r["sequences_per_call"] else "n/a |")
        )
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args), "runs": runs, "results": results}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
