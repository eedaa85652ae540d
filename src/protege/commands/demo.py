"""`protege demo`: distil a small student on an embedded task, on this machine, with no network."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..demo.mixture import MIXTURE
from ..demo.tasks import TASK_NAMES


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="Distil a small student on an embedded task, on this machine, with no network.",
        description="Train a teacher (cached in the output folder), warm up a smaller student, distil it on-policy, "
        "then print teacher and student accuracy and KL before and after, and write results.json and a plot.",
    )
    parser.add_argument(
        "--task",
        choices=(*TASK_NAMES, MIXTURE),
        default="addition",
        help="addition (default): 6-digit sums worked column by column, one correct answer each. walks: continue "
        "a walk on a hidden 36-node graph by 20 steps along its edges, checked by a verifier and scored greedy and "
        "sampled at temperature 1 (a student whose next-node table is low-rank; the sampled score is the one that "
        "moves). letters: write the 12 letters of a set once each in any order, scored the same way; a failed "
        "design kept for the record: its teacher does not learn the task, so no gain shows (docs/benchmarks.md). "
        "mixture: an addition teacher and a walks teacher, and one student distilled from both in one run (each "
        "row routed to its task's teacher), next to the same student distilled from each teacher alone at the same "
        "budget.",
    )
    parser.add_argument(
        "--output-dir",
        default="demo_output",
        help="Where the models, results.json and the plot "
        "go (default: demo_output). The teacher is cached there and reused.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="A shorter run: about 1 to 3 minutes on 2 cores, more under load (the full run: 2 to 9).",
    )
    parser.add_argument(
        "--seed", type=seed_value, default=0, help="Seed of the data and the training runs (default: 0)."
    )
    parser.set_defaults(handler=run)


def seed_value(text: str) -> int:
    """An integer seed in [0, 2**32): what numpy's and so transformers' set_seed accept; argparse reports others."""
    seed = int(text)
    if not 0 <= seed < 2**32:
        raise argparse.ArgumentTypeError(f"{seed} is not in [0, 2**32)")
    return seed


def run(args: argparse.Namespace) -> int:
    from .errors import report

    output = Path(args.output_dir)
    if output.exists() and not output.is_dir():
        return report("demo", f"--output-dir {output} is a file, not a folder")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return report("demo", f"cannot create --output-dir {output}: {error.strerror or error}")
    if not os.access(output, os.W_OK):
        return report("demo", f"cannot write to --output-dir {output}")
    from ..demo.pipeline import run_demo

    try:
        run_demo(args.output_dir, quick=args.quick, seed=args.seed, task=args.task)
    except OSError as error:  # the machine's, not the demo's: a full disk, a folder removed while it ran
        return report("demo", error)
    return 0
