"""The `protege` command line. Each subcommand imports what it needs only when it runs."""

from __future__ import annotations

import argparse
import sys

from .commands import evaluate


def _serve_teacher_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve-teacher",
        help="Serve a teacher's log-probs over HTTP (POST /get_sequence_logprobs/).",
        description="Serve a teacher model's log-probs for distillation. Speaks TRL's /get_sequence_logprobs/ "
        "contract (json and binary formats) plus protege's compact format; see docs/teacher-server.md.",
    )
    parser.add_argument("--model", required=True, help="Hub id or local path of the teacher model.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: 127.0.0.1).")
    parser.add_argument("--port", type=int, default=8000, help="Port to listen on (default: 8000).")
    parser.add_argument(
        "--backend",
        choices=["transformers", "vllm"],
        default="transformers",
        help="Scoring engine (default: transformers; vllm needs vLLM installed).",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16", "auto"],
        help="Weights dtype (default: float32).",
    )
    parser.add_argument(
        "--max-model-len", type=int, default=4096, help="Longest sequence accepted, in tokens (default: 4096)."
    )
    parser.add_argument(
        "--max-batch-tokens", type=int, default=16384, help="Token budget of one batched backend call (default: 16384)."
    )
    parser.add_argument(
        "--max-top-logprobs", type=int, default=100, help="Largest top_logprobs a request may ask for (default: 100)."
    )
    parser.add_argument("--max-body-mb", type=float, default=64.0, help="Largest request body in MiB (default: 64).")
    parser.add_argument("--no-batching", action="store_true", help="Score each request alone.")
    parser.add_argument("--trust-remote-code", action="store_true", help="Allow custom modelling code.")
    parser.add_argument("--log-level", default="info", help="uvicorn log level (default: info).")
    parser.set_defaults(handler=_serve_teacher)


def _serve_teacher(args: argparse.Namespace) -> int:
    from .server.app import ServerLimits, serve

    if args.backend == "vllm":
        from .server.backends import VLLMBackend

        backend = VLLMBackend(
            args.model,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            max_logprobs=args.max_top_logprobs,
            trust_remote_code=args.trust_remote_code,
        )
    else:
        from .server.backends import TransformersBackend

        backend = TransformersBackend(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    limits = ServerLimits(
        max_model_len=args.max_model_len,
        max_top_logprobs=args.max_top_logprobs,
        max_batch_tokens=args.max_batch_tokens,
        max_body_bytes=int(args.max_body_mb * 2**20),
        batching=not args.no_batching,
    )
    serve(backend, args.host, args.port, limits, args.log_level)
    return 0


def _train_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        add_help=False,
        help="Distil a student from a teacher (TRL's distillation flags; --help for all).",
    )
    parser.set_defaults(handler=None)


def _demo_parser(subparsers) -> None:
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
    parser.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    from .demo.pipeline import run_demo

    run_demo(args.output_dir, quick=args.quick, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="protege", description="Knowledge distillation for causal language models.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _train_parser(subparsers)
    _serve_teacher_parser(subparsers)
    evaluate.add_parser(subparsers)
    _demo_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # HfArgumentParser owns every flag of `protege train`
        from .commands.train import run

        return run(argv[1:])
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
