"""The `protege` command line. Each subcommand imports what it needs only when it runs."""

from __future__ import annotations

import argparse
import logging
import sys

from .commands import cache_teacher, demo, evaluate, serve_student, serve_teacher


def _train_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        add_help=False,
        help="Distil a student from a teacher (TRL's distillation flags; --help for all).",
    )
    parser.set_defaults(handler=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="protege", description="Knowledge distillation for causal language models.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _train_parser(subparsers)
    serve_teacher.add_parser(subparsers)
    serve_student.add_parser(subparsers)
    evaluate.add_parser(subparsers)
    cache_teacher.add_parser(subparsers)
    demo.add_parser(subparsers)
    return parser


def show_protege_logs() -> None:
    """protege's own log lines (waiting for a server, retries, warnings) on stderr, once per process."""
    logger = logging.getLogger("protege")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("protege: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    show_protege_logs()
    if argv[:1] == ["train"]:  # HfArgumentParser owns every flag of `protege train`
        from .commands.train_quick import quick_answer

        answered = quick_answer(argv[1:])  # --help, a typo, a missing path: before torch and transformers load
        if answered is not None:
            return answered
        from .commands.train import run

        return run(argv[1:])
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
