"""protege's benchmarks: `python -m benchmarks --list` names them, `python -m benchmarks NAME --help` runs one's help.

This module is what they share, standard library only, so that the TRL and vLLM environments (no protege in the
first) import it as they are:

* results: each measured row is one JSON line (benchmark, table, settings, git commit, machine, UTC date and the
  row's values) appended to `--output`, and `markdown` turns rows into the tables docs/benchmarks.md shows, from a
  run or later from its JSON lines (`python -m benchmarks --table FILE`);
* timing, free ports and process memory;
* worker processes: a worker's settings are one dataclass, written to a command line by `module_command` and read
  back by `parse`; a worker is started as a module (`python -m benchmarks.NAME ...`) and prints its result as one
  JSON line (`emit_result`) that `spawn` reads;
* `Server`: `python -m protege serve-teacher` in a subprocess.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "runs" / "benchmarks"
RESULT_PREFIX = "RESULT "
GIB = 2**30
Settings = TypeVar("Settings")

# ---------------------------------------------------------------------------------------------------------------------
# Results: JSON lines and markdown tables
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Column:
    """One column of a markdown table: its header, the row's value (a key, or a function of the row) and a format.

    A missing value (None) shows as `missing`; `text` columns are left-aligned, the others right-aligned.
    """

    header: str
    value: str | Callable[[dict], Any]
    format: str = "{}"
    text: bool = False
    missing: str = "-"

    def cell(self, row: dict) -> str:
        value = row.get(self.value) if isinstance(self.value, str) else self.value(row)
        return self.missing if value is None else self.format.format(value)


# A benchmark's tables: their columns, or a function of the run's settings that returns them.
Tables = dict[str, "Sequence[Column] | Callable[[dict], Sequence[Column]]"]


def markdown(rows: Iterable[dict], columns: Sequence[Column]) -> str:
    """The markdown table of `rows`, one line each."""
    lines = ["| " + " | ".join(column.header for column in columns) + " |"]
    lines.append("|" + "|".join("---" if column.text else "---:" for column in columns) + "|")
    lines += ["| " + " | ".join(column.cell(row) for column in columns) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """What a figure depends on besides the code: the CPU model, its cores, memory, system and the load at the time."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    except OSError:
        pass
    try:
        memory = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)
    except (ValueError, OSError):
        memory = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory,
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_1min": round(os.getloadavg()[0], 2),
    }


def describe(head: dict[str, Any]) -> str:
    """A run's date, commit and machine (`Report.head`, or a record it wrote) in one line."""
    host, changes = head["machine"], " + uncommitted changes" if head.get("uncommitted") else ""
    return (
        f"{head['date']}, git {head.get('commit')}{changes}; {host['cpu']}, {host['cores']} logical CPUs, "
        f"{host['memory_gib']} GiB RAM, {host['system']}, 1-min load {host['load_1min']}"
    )


def commit() -> dict[str, Any]:
    """The checkout's commit, and whether src/ or benchmarks/ have changes on top of it: the code a run measured."""
    git = ["git", "-C", str(REPO)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        status = subprocess.run([*git, "status", "--porcelain", "src", "benchmarks"], capture_output=True, text=True)
    except OSError:
        return {"commit": None, "uncommitted": None}
    return {"commit": head or None, "uncommitted": bool(status.stdout.strip())}


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parser(name: str, doc: str | None, quick: str | None = None) -> argparse.ArgumentParser:
    """A benchmark's argument parser with the flags they share: `--output`, and `--quick` where it has a smoke run."""
    summary = (doc or "").split("\n\n")[0]
    options = argparse.ArgumentParser(prog=f"python -m benchmarks {name}", description=summary, allow_abbrev=False)
    options.add_argument(
        "--output", type=Path, default=RESULTS / f"{name}.jsonl", help="JSON-lines file the measured rows go to"
    )
    if quick:
        options.add_argument("--quick", action="store_true", help=f"smoke run: {quick}")
    return options


class Report:
    """One run of a benchmark: each table's rows are appended to `--output` as JSON lines and returned as markdown.

    Every row of the run carries the same header (benchmark, date, commit, machine, settings), so the JSON lines alone
    give the tables back (`tables`).
    """

    def __init__(self, name: str, args: argparse.Namespace):
        self.path = Path(args.output)
        settings = {key: value for key, value in vars(args).items() if key != "output"}
        self.head = {"benchmark": name, "date": utc_now(), **commit(), "machine": machine()}
        self.head["settings"] = json.loads(json.dumps(settings, default=str))

    def table(self, table: str, rows: Sequence[dict], columns: Tables | Sequence[Column]) -> str:
        """Write `rows` as table `table` of this run; their markdown (`columns` may be the benchmark's `TABLES`)."""
        records = [{**self.head, "table": table, "values": json.loads(json.dumps(row, default=str))} for row in rows]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as out:
            out.writelines(json.dumps(record) + "\n" for record in records)
        spec = columns.get(table) if isinstance(columns, dict) else columns
        return markdown([record["values"] for record in records], columns_of(spec, self.head["settings"]))


def columns_of(spec: Sequence[Column] | Callable[[dict], Sequence[Column]], settings: dict) -> Sequence[Column]:
    return spec(settings) if callable(spec) else spec


def tables(records: Iterable[dict], columns: Callable[[str], Tables]) -> str:
    """Each run's tables, in the order of `records` (JSON lines that `Report` wrote), under a line saying which run.

    `columns(benchmark)` is that benchmark's `TABLES`.
    """
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault((record["benchmark"], record["table"], record["date"]), []).append(record)
    parts = []
    for (benchmark, table, _), group in groups.items():
        first = group[0]
        parts.append(f"{benchmark} {table}, {describe(first)}")
        spec = columns(benchmark)[table]
        parts.append(markdown([r["values"] for r in group], columns_of(spec, first["settings"])))
    return "\n\n".join(parts)


def read_jsonl(path: str | os.PathLike[str], columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (blank lines skipped), keeping only `columns` when given."""
    rows = []
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                row = json.loads(line)
                rows.append(row if columns is None else {name: row[name] for name in columns})
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Timing, ports, process memory
# ---------------------------------------------------------------------------------------------------------------------


def median_ms(call: Callable[[], Any], repeats: int, warmup: int = 0) -> tuple[float, Any]:
    """The median wall time of `repeats` calls after `warmup` untimed ones, in ms, and the last call's result."""
    for _ in range(warmup):
        call()
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = call()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times), result


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now, for a server started next (another process could still take it first)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def status_bytes(field: str, pid: int | str = "self") -> int | None:
    """A memory field of /proc/PID/status (VmRSS, VmHWM, VmSize) in bytes; None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    raise KeyError(field)


# ---------------------------------------------------------------------------------------------------------------------
# Worker settings <-> command line
# ---------------------------------------------------------------------------------------------------------------------


def setting(default: Any = dataclasses.MISSING, help: str | None = None) -> Any:
    """A dataclass field with argparse help; no default makes the flag required."""
    return dataclasses.field(default=default, metadata={"help": help})


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def converter(kind: Any) -> Any:
    """The type argparse converts a value with: `int` for `int`, `float` for `float | None`."""
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        (kind,) = [k for k in typing.get_args(kind) if k is not type(None)]
    return kind


def add_flags(options: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """One flag per field of the dataclass `cls`: a bool is a switch (default False), the rest take one value."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kwargs: dict[str, Any] = {"help": field.metadata.get("help"), "dest": field.name}
        if hints[field.name] is bool:
            if field.default is not False:
                raise TypeError(f"{cls.__name__}.{field.name}: a switch must default to False")
            kwargs["action"] = "store_true"
        elif field.default is dataclasses.MISSING:
            kwargs.update(type=converter(hints[field.name]), required=True)
        else:
            kwargs.update(type=converter(hints[field.name]), default=field.default)
        options.add_argument(flag(field.name), **kwargs)
    return options


def to_argv(settings: Any) -> list[str]:
    """`settings` as the flags `add_flags` defines: `--name value`, a true bool as `--name`; None and False left out."""
    argv: list[str] = []
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if value is True:
            argv.append(flag(field.name))
        elif value is not None and value is not False:
            argv += [flag(field.name), str(value)]  # str() of a float reads back as the same float
    return argv


def from_namespace(cls: type[Settings], namespace: argparse.Namespace) -> Settings:
    """The `cls` fields of a namespace parsed with more flags than `cls` has."""
    return cls(**{field.name: getattr(namespace, field.name) for field in dataclasses.fields(cls)})


def parse(cls: type[Settings], argv: Sequence[str] | None = None, description: str | None = None) -> Settings:
    """A worker's settings from its command line, as `module_command` wrote them."""
    return from_namespace(cls, add_flags(argparse.ArgumentParser(description=description), cls).parse_args(argv))


# ---------------------------------------------------------------------------------------------------------------------
# Worker processes
# ---------------------------------------------------------------------------------------------------------------------


def module_command(python: str, module: str, *parts: Any) -> list[str]:
    """The argv that runs `python -m module`; each part is a string (a subcommand, a flag) or a settings dataclass."""
    argv = [python, "-m", module]
    for part in parts:
        argv += to_argv(part) if dataclasses.is_dataclass(part) else [str(part)]
    return argv


def worker_env(own_environment: bool = False, **variables: str) -> dict[str, str]:
    """This process's environment for a worker, with `variables` set and the repository on PYTHONPATH so that
    `python -m benchmarks.NAME` starts from any folder. `own_environment`: the repository only (another interpreter,
    such as TRL's, must not see this one's packages)."""
    env = {**os.environ, **variables}
    paths = [str(REPO)] + ([] if own_environment else [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


@dataclasses.dataclass
class Finished:
    """A worker that ran to its end: exit status, output, and its `emit_result` JSON (None when it printed none)."""

    command: list[str]
    returncode: int
    stdout: str
    stderr: str
    result: dict[str, Any] | None


def emit_result(result: dict[str, Any]) -> None:
    """Print the worker's result as the one line `spawn` looks for (other output around it does not matter)."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def read_result(stdout: str) -> dict[str, Any] | None:
    """The last `emit_result` line of a worker's output, parsed."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    return None


def spawn(argv: list[str], *, env: dict[str, str] | None = None, cwd: str | os.PathLike[str] | None = None) -> Finished:
    """Run a worker in a fresh process, its output captured, and parse its result."""
    done = subprocess.run(argv, env=env or worker_env(), cwd=cwd, capture_output=True, text=True)
    return Finished(argv, done.returncode, done.stdout, done.stderr, read_result(done.stdout))


def failure(done: Finished) -> str:
    """Why a worker failed, in one line: the last line of its error output."""
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
    return "killed (SIGKILL: OOM killer?)" if done.returncode == -9 else f"exit {done.returncode}: {tail}"


# ---------------------------------------------------------------------------------------------------------------------
# A teacher server in a subprocess
# ---------------------------------------------------------------------------------------------------------------------


class Server:
    """`python -m protege serve-teacher --model MODEL` on 127.0.0.1 and a free port, stopped on exit; its output goes to
    `log_dir`/server-batching.log (or server-no-batching.log)."""

    def __init__(self, model: str, batching: bool, log_dir: Path, extra: Sequence[str] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "protege", "serve-teacher", "--model", model, "--host", "127.0.0.1"]
        self.command += ["--port", str(self.port), "--log-level", "warning", *(["--no-batching"] * (not batching))]
        self.command += [str(part) for part in extra]
        self.log_path = Path(log_dir) / f"server-{'batching' if batching else 'no-batching'}.log"
        self.process: subprocess.Popen | None = None

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

    def __exit__(self, *_: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self.log.close()
