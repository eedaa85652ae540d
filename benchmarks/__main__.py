"""The one entry to protege's benchmarks: `python -m benchmarks NAME [flags]`.

    python -m benchmarks --list                 # the benchmarks, one line each
    python -m benchmarks NAME --help            # one benchmark's flags
    python -m benchmarks NAME [flags]           # run it: its tables on stdout, its rows in --output (JSON lines)
    python -m benchmarks --table FILE [FILE]    # the markdown tables of JSON lines written by earlier runs

Every benchmark module has `main(argv)` and `TABLES` (the columns of its tables) and starts its worker processes as
modules, `python -m benchmarks.NAME ...`. `workers`, `gkd_runs` and `walk_bpe` are helpers, not benchmarks.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import sys
from pathlib import Path

from benchmarks import read_jsonl, tables

HERE = Path(__file__).resolve().parent
BENCHMARKS = (
    "payload",
    "teacher_server",
    "vs_trl",
    "loss_memory",
    "real_scale",
    "generation",
    "safeguards",
    "gkd_table",
    "sharded_memory",
    "mixture",
    "cross_tokenizer",
    "teacher_cache",
    "opd_vs_rl",
    "cache_int8",
)
HELPERS = ("__init__", "__main__", "workers", "gkd_runs", "walk_bpe")


def summary(name: str) -> str:
    """The first line of a benchmark's docstring, read without importing it (its imports may need another
    environment)."""
    doc = ast.get_docstring(ast.parse((HERE / f"{name}.py").read_text(encoding="utf-8"))) or ""
    return doc.splitlines()[0] if doc else ""


def listing() -> str:
    width = max(map(len, BENCHMARKS))
    return "\n".join(f"{name:<{width}}  {summary(name)}" for name in BENCHMARKS)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in BENCHMARKS:
        return importlib.import_module(f"benchmarks.{argv[0]}").main(argv[1:]) or 0
    options = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Run one of protege's benchmarks: python -m benchmarks NAME [flags] (NAME --help for its flags).",
    )
    options.add_argument("name", nargs="?", help="the benchmark to run; without it, the list")
    options.add_argument("--list", action="store_true", help="the benchmarks, one line each")
    options.add_argument("--table", nargs="+", type=Path, metavar="FILE", help="markdown tables of JSON-lines results")
    args = options.parse_args(argv)
    if args.name is not None:
        options.error(f"no benchmark {args.name!r}; these exist:\n{listing()}")
    if args.table:
        records = [record for path in args.table for record in read_jsonl(path)]
        print(tables(records, lambda name: importlib.import_module(f"benchmarks.{name}").TABLES))
        return 0
    print(listing())
    return 0


if __name__ == "__main__":
    sys.exit(main())
