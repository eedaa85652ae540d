"""The teacher server under hostile clients: the figures of docs/benchmarks.md's "Hostile clients" section.

    python benchmarks/hostile.py                # about 2 minutes on 2 cores
    python benchmarks/hostile.py --requests 5000

Starts `python -m protege serve-teacher` on a tiny random teacher (vocabulary 300) on 127.0.0.1, with default limits
except `--header-timeout` (default 10 s, as the server's), and measures:

1. `--requests` hostile requests from a seeded generator, on keep-alive connections: random bytes, random JSON,
   near-valid requests with extreme values (NaN, Infinity, 2^64, 1e-38, negative or huge ids and lengths, unknown
   fields and formats), bodies of 300,000 bad elements, and bodies over the size limit. Counts answers by status,
   the 5xx among them, the largest error body, and checks `/health/` after every 50.
2. The server's resident set (VmRSS, VmHWM from /proc) before and after one 2,097,152-token request (9 MiB body).
3. `/health/` latency (a fresh connection each time, every 20 ms for `--slow-seconds`) while `--slow-clients`
   connections trickle request headers one byte every 0.5 s.
4. 1,100 idle connections: how many the connection cap closes at once, whether /health/ answers while they are
   open and after the header timeout, and the count of "Too many open files" lines in the server's log.

Prints a markdown table, and the machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROUTE = "/get_sequence_logprobs/"


def build_teacher(folder: Path) -> str:
    from protege.toy import tiny_model, train_tokenizer

    texts = [f"What is {a}+{b}? {a}+{b}={a + b}" for a in range(30) for b in range(30)]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    model = tiny_model(len(tokenizer), layers=2, hidden=32, heads=4, seed=0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def start(model: str, port: int, log: Path, *flags: str) -> subprocess.Popen:
    with open(log, "w") as stderr:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "protege", "serve-teacher", "--model", model, "--port", str(port), *flags],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit(f"the server did not start: {log.read_text()[-2000:]}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


# ----- 1. Hostile requests -----

EXTREMES = [float("nan"), float("inf"), -float("inf"), 2**64, -(2**63), 1e-38, 1e308, 0, -1, 0.5, 1e300, "", None, []]


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


# ----- 2. One 2M-token request -----


def run_huge(url: str, pid: int) -> dict:
    before = memory_kib(pid)
    body = b'{"sequences": [[' + b"1234," * (2**21 - 1) + b'1234]], "prompt_lengths": [1]}'
    started = time.perf_counter()
    answer = httpx.post(f"{url}{ROUTE}", content=body, headers={"Content-Type": "application/json"}, timeout=120)
    seconds = time.perf_counter() - started
    after = memory_kib(pid)
    return {
        "body_mib": round(len(body) / 2**20, 1),
        "status": answer.status_code,
        "answer": answer.text[:160],
        "seconds": round(seconds, 3),
        "rss_before_mib": before["VmRSS"] // 1024,
        "rss_after_mib": after["VmRSS"] // 1024,
        "hwm_growth_mib": (after["VmHWM"] - before["VmHWM"]) // 1024,
    }


# ----- 3. Slow clients -----


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


def run_slow(url: str, clients: int, seconds: float) -> dict:
    host, port = url.rsplit("/", 1)[-1].split(":")
    stop = threading.Event()
    closed = [0]

    def trickle(sock: socket.socket) -> None:
        message = b"POST /get_sequence_logprobs/ HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
        for byte in message:
            if stop.is_set():
                break
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                closed[0] += 1
                break
            stop.wait(0.5)
        sock.close()

    sockets = [socket.create_connection((host, int(port))) for _ in range(clients)]
    threads = [threading.Thread(target=trickle, args=(s,), daemon=True) for s in sockets]
    for thread in threads:
        thread.start()
    latencies, failures = [], 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        milliseconds = health_ms(host, int(port))
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


# ----- 4. Idle connections -----


def run_idle(url: str, count: int, header_timeout: float, log: Path) -> dict:
    host, port = url.rsplit("/", 1)[-1].split(":")
    sockets = []
    for _ in range(count):
        try:
            sockets.append(socket.create_connection((host, int(port)), timeout=5))
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
    try:
        during = httpx.get(f"{url}/health/", timeout=2).status_code
    except httpx.HTTPError as error:
        during = type(error).__name__
    time.sleep(header_timeout + 1)
    try:
        after = httpx.get(f"{url}/health/", timeout=5).status_code
    except httpx.HTTPError as error:
        after = type(error).__name__
    for sock in sockets:
        sock.close()
    return {
        "opened": len(sockets),
        "closed_at_once_by_the_cap": closed_at_once,
        "health_while_open": during,
        "health_after_header_timeout": after,
        "too_many_open_files_lines": log.read_text().count("Too many open files"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--slow-clients", type=int, default=300)
    parser.add_argument("--slow-seconds", type=float, default=8.0)
    parser.add_argument("--idle", type=int, default=1100)
    parser.add_argument("--header-timeout", type=float, default=10.0)
    args = parser.parse_args()

    from protege.server.guard import raise_open_file_limit

    raise_open_file_limit()  # this process holds the --idle connections itself
    folder = Path(tempfile.mkdtemp(prefix="protege-hostile-"))
    model = build_teacher(folder / "teacher")
    port, log = free_port(), folder / "server.log"
    process = start(model, port, log, "--log-level", "warning", "--header-timeout", str(args.header_timeout))
    url = f"http://127.0.0.1:{port}"
    try:
        results = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
            "hostile": run_hostile(url, args.requests, 300),
            "huge_request": run_huge(url, process.pid),
            "slow_clients": run_slow(url, args.slow_clients, args.slow_seconds),
            "idle_connections": run_idle(url, args.idle, args.header_timeout, log),
            "server_alive": process.poll() is None,
            "server_rss_end_mib": memory_kib(process.pid)["VmRSS"] // 1024,
        }
    finally:
        process.terminate()
        process.wait(timeout=30)
    print(json.dumps(results, indent=1))
    hostile, huge, slow, idle = (results[k] for k in ("hostile", "huge_request", "slow_clients", "idle_connections"))
    print("\n| check | result |\n| --- | --- |")
    print(
        f"| {hostile['requests']} hostile requests | {hostile['5xx_or_dropped']} 5xx or dropped; statuses "
        f"{hostile['statuses']}; largest error body {hostile['largest_error_body_bytes']} B; /health/ failures "
        f"{hostile['health_failures']} |"
    )
    print(
        f"| one 2M-token request ({huge['body_mib']} MiB) | {huge['status']} in {huge['seconds']} s; RSS "
        f"{huge['rss_before_mib']} -> {huge['rss_after_mib']} MiB, high-water +{huge['hwm_growth_mib']} MiB |"
    )
    print(
        f"| /health/ with {slow['slow_clients']} slow clients | p50 {slow['p50_ms']} ms, p99 {slow['p99_ms']} ms, "
        f"max {slow['max_ms']} ms, {slow['health_failures']} failures of {slow['health_requests']} |"
    )
    print(
        f"| {idle['opened']} idle connections | {idle['closed_at_once_by_the_cap']} closed at once by the cap; "
        f"/health/ while open: {idle['health_while_open']}, after the header timeout: "
        f"{idle['health_after_header_timeout']}; 'Too many open files' lines: {idle['too_many_open_files_lines']} |"
    )
    print(f"| server alive at the end | {results['server_alive']}, RSS {results['server_rss_end_mib']} MiB |")


if __name__ == "__main__":
    main()
