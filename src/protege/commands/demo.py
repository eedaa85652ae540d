"""`protege demo`: distil a small student on an embedded task, on this machine, with no network."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="Distil a small student on an embedded arithmetic task, on this machine, with no network.",
        description="Train a teacher (cached in the output folder), warm up a smaller student, distil it on-policy, "
        "then print teacher and student accuracy and KL before and after, and write results.json and a plot.",
    )
    parser.add_argument(
        "--output-dir",
        default="demo_output",
        help="Where the models, results.json and the plot "
        "go (default: demo_output). The teacher is cached there and reused.",
    )
    parser.add_argument("--quick", action="store_true", help="A shorter run (under 3 minutes on 2 cores).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the data and the training runs (default: 0).")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..demo.pipeline import run_demo

    run_demo(args.output_dir, quick=args.quick, seed=args.seed)
    return 0
