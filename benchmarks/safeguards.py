"""protege's safeguards under attack and under crashes, and what two of them cost.

    python -m benchmarks safeguards hostile         # about 2 minutes on 2 cores
    python -m benchmarks safeguards crash_resume    # 1 to 2 minutes on 2 cores
    python -m benchmarks safeguards costs --folder /work

`hostile`: `python -m protege serve-teacher` on a tiny random teacher (vocabulary 300) on 127.0.0.1, default limits
but `--header-timeout`, and: (1) `--requests` hostile requests from a seeded generator on keep-alive connections
(random bytes, random JSON, near-valid requests with NaN, Infinity, 2^64, 1e-38, negative or huge ids and lengths,
unknown fields and formats, bodies of 100,000 bad elements, bodies over the size limit), counting answers by status,
the 5xx among them, the largest error body, and checking `/health/` after every 50; (2) the server's VmRSS and VmHWM
around one 2,097,152-token request; (3) `/health/` latency on fresh connections every 20 ms for `--slow-seconds`
while `--slow-clients` connections trickle headers a byte every 0.5 s; (4) `--idle` idle connections: how many the
connection cap closes at once, `/health/` while they are open and after the header timeout, and the "Too many open
files" lines in the server's log.

`crash_resume`: part 1 trains a tiny student (tests/tiny.py) for 8 steps, saving every 2 and keeping 2, and kills it
(SIGKILL, tests/crash_train.py) at 8 points of the save at step 6, from entering the save to its end; each killed run
is resumed in a fresh process with `resume_from_checkpoint=True` and counts as resumed when it finishes with exactly
the weights of a run never killed (lmbda 0.5). The baseline does the same with transformers' in-place save and resume
(no rename, so 7 points). Part 2 trains 8 steps straight and, from that run's checkpoint-4, 4 steps after a resume, at
lmbda 0, 0.5 and 1, and compares every weight. The tests folder is on the worker's PYTHONPATH.

`costs`: (1) generation with a padded student and an extending teacher suppresses the rows past the student's
tokenizer (transformers' `SuppressTokensLogitsProcessor`): its time per token on (batch, vocabulary) float32 scores
with Qwen2.5's 271 padding rows, against the student's LM head on the same batch (hidden 896), the one matmul every
token pays anyway, medians of `--repeats` after one warm-up; (2) `checkpoints.publish` fsyncs a checkpoint before
renaming it: one file of `--checkpoint-gib` random bytes is written (to the page cache) and then published, both timed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks import REPO, Column, Report, Server, emit_result, median_ms, module_command, parser, spawn, worker_env
from benchmarks import status_bytes as status

TESTS = REPO / "tests"
ROUTE = "/get_sequence_logprobs/"
EXTREMES = [float("nan"), float("inf"), -float("inf"), 2**64, -(2**63), 1e-38, 1e308, 0, -1, 0.5, 1e300, "", None, []]
TABLES = {
    "hostile": [Column("check", "check", text=True), Column("result", "result", text=True)],
    "crashes": [
        Column("kill point (save at step 6)", "point", text=True),
        Column("left on disk (protege)", "left", text=True),
        Column("protege", "protege", text=True),
        Column("transformers in place", "transformers", text=True),
    ],
    "exactness": [
        Column("lmbda", "lmbda"),
        Column("max abs weight difference, 8 straight vs 4 + resume + 4", "gap", "{:.3g}"),
        Column("bit-exact", lambda r: "yes" if r["exact"] else "no", text=True),
    ],
    "costs": [Column("case", "case", text=True), Column("time", "time")],
}

# ---------------------------------------------------------------------------------------------------------------------
# hostile: the teacher server under hostile clients
# ---------------------------------------------------------------------------------------------------------------------


def hostile_bodies(rng: random.Random, count: int, vocab: int):
    """(kind, body bytes) pairs, seeded."""

    def random_json(depth: int = 0):
        choice = rng.randrange(7 if depth < 3 else 4)
        if choice == 0:
            return rng.choice(EXTREMES)
        if choice == 1:
            return rng.randint(-(2**70), 2**70)
        if choice == 2:
            return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(8)))
        if choice == 3:
            return rng.random() * 10 ** rng.randint(-40, 40)
        if choice in (4, 5):
            return [random_json(depth + 1) for _ in range(rng.randrange(6))]
        return {
            rng.choice(["sequences", "prompt_lengths", "x"]): random_json(depth + 1) for _ in range(rng.randrange(4))
        }

    for _ in range(count):
        kind = rng.choice(["bytes", "json", "near-valid", "near-valid", "near-valid", "huge-errors", "oversize"])
        if kind == "bytes":
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
        elif kind == "json":
            body = json.dumps(random_json()).encode()
        elif kind == "near-valid":
            sequences = [[rng.randrange(-3, vocab + 3) for _ in range(rng.randrange(0, 40))] for _ in range(3)]
            request = {"sequences": sequences, "prompt_lengths": [rng.randrange(-1, 40) for _ in range(3)]}
            for key in rng.sample(["top_logprobs", "temperature", "response_format", "hidden_dtype", "extra"], 2):
                if rng.random() < 0.5:  # a plausible value, so that more requests reach the later checks
                    request[key] = {"top_logprobs": 2, "temperature": 0.7, "response_format": "compact"}.get(key, 1)
                else:
                    request[key] = rng.choice([*EXTREMES, "json", "binary", "hidden", "xml", "bfloat16", 1, 1000])
            if rng.random() < 0.5:  # valid lengths
                request["prompt_lengths"] = [max(1, len(s) - 1) for s in sequences]
            if rng.random() < 0.2:
                request["sequences"][0].insert(1, rng.choice(EXTREMES))
            body = json.dumps(request).encode()
        elif kind == "huge-errors":
            body = json.dumps({"sequences": [["x"] * 100_000], "prompt_lengths": [1]}).encode()  # ~0.5 MiB
        else:
            body = b'{"sequences": [[' + b"7," * (1_200_000 // 2) + b'7]], "prompt_lengths": [1]}'
        yield kind, body


def run_hostile(url: str, count: int, vocab: int) -> dict:
    import httpx

    rng = random.Random(0)
    statuses: dict[int, int] = {}
    kinds: dict[str, int] = {}
    largest_error, fivexx, health_failures = 0, [], 0
    with httpx.Client(timeout=60) as client:
        for i, (kind, body) in enumerate(hostile_bodies(rng, count, vocab)):
            kinds[kind] = kinds.get(kind, 0) + 1
            try:
                answer = client.post(f"{url}{ROUTE}", content=body, headers={"Content-Type": "application/json"})
            except httpx.HTTPError as error:  # the server closed the connection (e.g. after a 413): count, go on
                statuses[-1] = statuses.get(-1, 0) + 1
                fivexx.append((kind, f"{type(error).__name__}", body[:120]))
                continue
            statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1
            if answer.status_code >= 500:
                fivexx.append((kind, answer.status_code, body[:120]))
            elif answer.status_code >= 400:
                largest_error = max(largest_error, len(answer.content))
            if i % 50 == 49 and client.get(f"{url}/health/", timeout=5).status_code != 200:
                health_failures += 1
    return {
        "requests": count,
        "kinds": kinds,
        "statuses": dict(sorted(statuses.items())),
        "5xx_or_dropped": len(fivexx),
        "examples_of_5xx": [repr(x) for x in fivexx[:5]],
        "largest_error_body_bytes": largest_error,
        "health_failures": health_failures,
    }


def run_huge(url: str, pid: int) -> dict:
    import httpx

    before = {field: status(field, pid) // 2**20 for field in ("VmRSS", "VmHWM")}
    body = b'{"sequences": [[' + b"1234," * (2**21 - 1) + b'1234]], "prompt_lengths": [1]}'
    started = time.perf_counter()
    answer = httpx.post(f"{url}{ROUTE}", content=body, headers={"Content-Type": "application/json"}, timeout=120)
    seconds = time.perf_counter() - started
    after = {field: status(field, pid) // 2**20 for field in ("VmRSS", "VmHWM")}
    return {
        "body_mib": round(len(body) / 2**20, 1),
        "status": answer.status_code,
        "answer": answer.text[:160],
        "seconds": round(seconds, 3),
        "rss_before_mib": before["VmRSS"],
        "rss_after_mib": after["VmRSS"],
        "hwm_growth_mib": after["VmHWM"] - before["VmHWM"],
    }


def health_ms(host: str, port: int) -> float | None:
    """One GET /health/ on a fresh connection, connect to last byte, in ms (a raw socket: an HTTP client's own set-up,
    such as building a TLS context, would dwarf the server's part); None when it fails."""
    started = time.perf_counter()
    try:
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.sendall(b"GET /health/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = b"".join(iter(lambda: sock.recv(4096), b""))
    except OSError:
        return None
    return (time.perf_counter() - started) * 1000 if answer.startswith(b"HTTP/1.1 200") else None


def run_slow(host: str, port: int, clients: int, seconds: float) -> dict:
    stop = threading.Event()

    def trickle(sock: socket.socket) -> None:
        for byte in b"POST /get_sequence_logprobs/ HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000:
            if stop.is_set():
                break
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            stop.wait(0.5)
        sock.close()

    threads = [threading.Thread(target=trickle, args=(socket.create_connection((host, port)),)) for _ in range(clients)]
    for thread in threads:
        thread.daemon = True
        thread.start()
    latencies, failures = [], 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        milliseconds = health_ms(host, port)
        latencies.append(milliseconds if milliseconds is not None else 5000.0)
        failures += milliseconds is None
        time.sleep(0.02)
    stop.set()
    for thread in threads:
        thread.join(timeout=5)
    latencies.sort()
    return {
        "slow_clients": clients,
        "health_requests": len(latencies),
        "health_failures": failures,
        "p50_ms": round(latencies[len(latencies) // 2], 1),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)], 1),
        "max_ms": round(latencies[-1], 1),
    }


def health_status(url: str, timeout: float) -> int | str:
    import httpx

    try:
        return httpx.get(f"{url}/health/", timeout=timeout).status_code
    except httpx.HTTPError as error:
        return type(error).__name__


def run_idle(url: str, host: str, port: int, count: int, header_timeout: float, log: Path) -> dict:
    sockets = []
    for _ in range(count):
        try:
            sockets.append(socket.create_connection((host, port), timeout=5))
        except OSError:
            break
    time.sleep(0.5)
    closed_at_once = 0
    for sock in sockets:
        sock.setblocking(False)
        try:
            closed_at_once += sock.recv(1) == b""
        except BlockingIOError:
            pass
        except OSError:
            closed_at_once += 1
    during = health_status(url, 2)
    time.sleep(header_timeout + 1)
    after = health_status(url, 5)
    for sock in sockets:
        sock.close()
    return {
        "opened": len(sockets),
        "closed_at_once_by_the_cap": closed_at_once,
        "health_while_open": during,
        "health_after_header_timeout": after,
        "too_many_open_files_lines": log.read_text().count("Too many open files"),
    }


def hostile_rows(r: dict) -> list[dict]:
    """The markdown table's rows of the hostile run's results `r`, each with its details."""
    hostile, huge, slow, idle = (r[k] for k in ("hostile", "huge_request", "slow_clients", "idle_connections"))
    checks = [
        (
            f"{hostile['requests']} hostile requests",
            hostile,
            f"{hostile['5xx_or_dropped']} 5xx or dropped; statuses "
            f"{hostile['statuses']}; largest error body {hostile['largest_error_body_bytes']} B; /health/ failures "
            f"{hostile['health_failures']}",
        ),
        (
            f"one 2M-token request ({huge['body_mib']} MiB)",
            huge,
            f"{huge['status']} in {huge['seconds']} s; RSS "
            f"{huge['rss_before_mib']} -> {huge['rss_after_mib']} MiB, high-water +{huge['hwm_growth_mib']} MiB",
        ),
        (
            f"/health/ with {slow['slow_clients']} slow clients",
            slow,
            f"p50 {slow['p50_ms']} ms, p99 {slow['p99_ms']} "
            f"ms, max {slow['max_ms']} ms, {slow['health_failures']} failures of {slow['health_requests']}",
        ),
        (
            f"{idle['opened']} idle connections",
            idle,
            f"{idle['closed_at_once_by_the_cap']} closed at once by the cap; "
            f"/health/ while open: {idle['health_while_open']}, after the header timeout: "
            f"{idle['health_after_header_timeout']}; 'Too many open files' lines: {idle['too_many_open_files_lines']}",
        ),
        ("server alive at the end", {}, f"{r['server_alive']}, RSS {r['server_rss_end_mib']} MiB"),
    ]
    return [{"check": check, "result": result, "details": details} for check, details, result in checks]


def hostile(args: argparse.Namespace) -> str:
    from protege.server.guard import raise_open_file_limit
    from protege.toy import tiny_model, train_tokenizer

    raise_open_file_limit()  # this process holds the --idle connections itself
    folder = Path(tempfile.mkdtemp(prefix="protege-hostile-"))
    tokenizer = train_tokenizer([f"What is {a}+{b}? {a}+{b}={a + b}" for a in range(30) for b in range(30)], 300)
    tiny_model(len(tokenizer), layers=2, hidden=32, heads=4, seed=0).save_pretrained(folder / "teacher")
    tokenizer.save_pretrained(folder / "teacher")
    with Server(str(folder / "teacher"), True, folder, ["--header-timeout", args.header_timeout]) as server:
        host, port = "127.0.0.1", server.port
        results = {
            "hostile": run_hostile(server.url, args.requests, 300),
            "huge_request": run_huge(server.url, server.process.pid),
            "slow_clients": run_slow(host, port, args.slow_clients, args.slow_seconds),
            "idle_connections": run_idle(server.url, host, port, args.idle, args.header_timeout, server.log_path),
            "server_alive": server.process.poll() is None,
            "server_rss_end_mib": status("VmRSS", server.process.pid) // 2**20,
        }
    return Report("safeguards", args).table("hostile", hostile_rows(results), TABLES)


# ---------------------------------------------------------------------------------------------------------------------
# crash_resume: kills during a checkpoint save, and whether a resumed run is bit-exact
# ---------------------------------------------------------------------------------------------------------------------


def outcome(run: dict, straight: dict) -> str:
    if "error" in run:  # the exception's last line, paths cut to their last two parts
        line = re.sub(r"/\S*/([^/\s]+/[^/\s]+)", r"\1", run["error"].strip().splitlines()[-1])
        return "failed: " + line[:100].replace("|", "/")
    if not run["killed"]:
        return "not killed"
    how = f"from checkpoint-{run['resumed_from']}" if run["resumed_from"] else "from scratch"
    return f"resumed {how}, {'same weights' if resumed(run, straight) else 'DIFFERENT weights'}"


def resumed(run: dict, straight: dict) -> bool:
    return "error" not in run and run["killed"] and run["digest"] == straight["digest"] and run["global_step"] == 8


def crash_runs(paths: dict[str, str], workdir: Path, points: tuple[str, ...], in_place: bool) -> dict:
    """tests/crash_train.py's report for `points`, with protege's staged saves or transformers' in-place ones."""
    env = worker_env(PYTHONPATH=str(TESTS), OMP_NUM_THREADS="1")
    settings = json.dumps({"in_place": True} if in_place else {})
    command = [sys.executable, str(TESTS / "crash_train.py"), paths["student"], paths["teacher"], str(workdir)]
    result = subprocess.run([*command, settings, *points], env=env, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        raise SystemExit(f"crash_train.py failed:\n{result.stderr[-4000:]}")
    return json.loads((workdir / "report.json").read_text())


def crash_worker(workdir: Path, baseline: bool) -> dict:
    """Both parts, in a process with tests/ on its path (`python -m benchmarks.safeguards crash-worker ...`)."""
    import torch
    from crash_train import POINTS
    from tiny import build, config, dataset

    from protege import DistillationTrainer

    torch.set_num_threads(1)
    paths = build(workdir / "tiny")
    staged = crash_runs(paths, workdir / "staged", POINTS, in_place=False)
    points = tuple(p for p in POINTS if p != "renamed")
    plain = crash_runs(paths, workdir / "in-place", points, in_place=True) if baseline else {"points": {}}
    crashes = [
        {
            "point": point,
            "left": ", ".join(staged["points"][point]["left"]),
            "protege": outcome(staged["points"][point], staged["straight"]),
            "transformers": outcome(plain["points"][point], plain["straight"]) if point in plain["points"] else "-",
        }
        for point in POINTS
    ]
    counts = [sum(resumed(run, report["straight"]) for run in report["points"].values()) for report in (staged, plain)]
    exactness = []
    for lmbda in (0.0, 0.5, 1.0):
        runs = {}
        for name, resume in (("straight", None), ("resumed", workdir / f"straight{lmbda}" / "out" / "checkpoint-4")):
            args = config(workdir / f"{name}{lmbda}", lmbda=lmbda, max_steps=8, save_strategy="steps", save_steps=4)
            trainer = DistillationTrainer(
                model=paths["student"], teacher_model=paths["teacher"], args=args, train_dataset=dataset(32)
            )
            with contextlib.redirect_stdout(io.StringIO()):  # the trainer prints its logs; stdout is the result
                trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
            runs[name] = trainer.model.state_dict()
        gap = max((runs["resumed"][k] - v).abs().max().item() for k, v in runs["straight"].items())
        exact = all(torch.equal(runs["resumed"][k], v) for k, v in runs["straight"].items())
        exactness.append({"lmbda": lmbda, "gap": gap, "exact": exact})
    summary = f"protege: {counts[0]} of {len(POINTS)} resumed and finished with the uninterrupted run's weights"
    summary += f"; transformers in place: {counts[1]} of {len(points)}" if baseline else ""
    return {"crashes": crashes, "exactness": exactness, "summary": summary + "."}


def crash_resume(args: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory(prefix="protege-crash-") as temporary:
        workdir = args.workdir or Path(temporary)
        flags = [workdir, "no-baseline" if args.no_baseline else "baseline"]
        argv = module_command(sys.executable, "benchmarks.safeguards", "crash-worker", *flags)
        done = spawn(argv, env=worker_env(PYTHONPATH=str(TESTS), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
    if done.result is None:
        raise SystemExit(f"the crash worker failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    report = Report("safeguards", args)
    crashes = report.table("crashes", done.result["crashes"], TABLES)
    return f"{crashes}\n\n{done.result['summary']}\n\n{report.table('exactness', done.result['exactness'], TABLES)}"


# ---------------------------------------------------------------------------------------------------------------------
# costs: suppressing padded rows in generate, and the fsync before a checkpoint's rename
# ---------------------------------------------------------------------------------------------------------------------


def costs(args: argparse.Namespace) -> str:
    import torch
    from transformers.generation.logits_process import SuppressTokensLogitsProcessor

    from protege.checkpoints import publish

    vocab, batch, hidden = args.vocab, args.batch, args.hidden
    processor = SuppressTokensLogitsProcessor(list(range(args.tokens, vocab)), device="cpu")
    scores, ids = torch.randn(batch, vocab), torch.zeros(batch, 8, dtype=torch.long)
    states, head = torch.randn(batch, hidden), torch.randn(vocab, hidden)
    suppress = median_ms(lambda: processor(ids, scores), args.repeats, warmup=1)[0]
    matmul = median_ms(lambda: states @ head.T, args.repeats, warmup=1)[0]
    rows = [
        {
            "case": f"suppress {vocab - args.tokens} rows of {batch} x {vocab:,} scores, per token",
            "time": f"{suppress:.1f} ms",
        },
        {"case": f"LM head {batch} x {hidden} x {vocab:,}, per token", "time": f"{matmul:.1f} ms"},
    ]
    if args.checkpoint_gib > 0:
        root = Path(tempfile.mkdtemp(dir=args.folder))
        staged = root / "tmp-checkpoint-1" / "checkpoint-1"
        staged.mkdir(parents=True)
        block = os.urandom(64 * 2**20)
        started = time.perf_counter()
        with open(staged / "model.safetensors", "wb") as handle:
            for _ in range(round(args.checkpoint_gib * 16)):
                handle.write(block)
        written = time.perf_counter() - started
        started = time.perf_counter()
        publish(str(staged), str(root / "checkpoint-1"))
        published = time.perf_counter() - started
        (root / "checkpoint-1" / "model.safetensors").unlink()
        (root / "checkpoint-1").rmdir()
        root.rmdir()
        rows.append(
            {"case": f"write a {args.checkpoint_gib:g} GiB file (to the page cache)", "time": f"{written:.1f} s"}
        )
        rows.append({"case": "publish it (fsync of file and folders, rename)", "time": f"{published:.1f} s"})
    return Report("safeguards", args).table("costs", rows, TABLES)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["crash-worker"]:
        emit_result(crash_worker(Path(argv[1]), argv[2] == "baseline"))
        return 0
    options = parser("safeguards", __doc__, quick="hostile: 200 requests, 20 slow clients for 2 s, 100 idle")
    options.add_argument("mode", choices=["hostile", "crash_resume", "costs"])
    options.add_argument("--requests", type=int, default=2000, help="hostile: hostile requests")
    options.add_argument("--slow-clients", type=int, default=300, help="hostile")
    options.add_argument("--slow-seconds", type=float, default=8.0, help="hostile")
    options.add_argument("--idle", type=int, default=1100, help="hostile: idle connections")
    options.add_argument("--header-timeout", type=float, default=10.0, help="hostile: the server's (its default)")
    options.add_argument("--workdir", type=Path, default=None, help="crash_resume: where runs stay (default: deleted)")
    options.add_argument("--no-baseline", action="store_true", help="crash_resume: skip transformers' in-place runs")
    options.add_argument("--vocab", type=int, default=151_936, help="costs: output rows (Qwen2.5's)")
    options.add_argument("--tokens", type=int, default=151_665, help="costs: tokenizer size; rows past it pad")
    options.add_argument("--batch", type=int, default=64, help="costs: sequences generated together")
    options.add_argument("--hidden", type=int, default=896, help="costs: student hidden size (Qwen2.5-0.5B's)")
    options.add_argument("--repeats", type=int, default=20, help="costs: timed calls after one warm-up")
    options.add_argument("--checkpoint-gib", type=float, default=2.0, help="costs: 0 skips the checkpoint case")
    options.add_argument("--folder", default=".", help="costs: where the checkpoint is written (the disk to measure)")
    args = options.parse_args(argv)
    if args.quick:
        args.requests, args.slow_clients, args.slow_seconds, args.idle = 200, 20, 2.0, 100
        args.repeats, args.checkpoint_gib = 3, 0.0625
    started = time.perf_counter()
    print({"hostile": hostile, "crash_resume": crash_resume, "costs": costs}[args.mode](args))
    print(f"\n{time.perf_counter() - started:.0f} s in all; rows appended to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
