"""`protege serve-teacher`: serve a teacher's log-probs over HTTP for distillation (see docs/teacher-server.md)."""

from __future__ import annotations

import argparse

from ..choices import DTYPE_NAMES


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve-teacher",
        help="Serve a teacher's log-probs or hidden states over HTTP (POST /get_sequence_logprobs/).",
        description="Serve a teacher model's log-probs for distillation. Speaks TRL's /get_sequence_logprobs/ "
        "contract (json and binary formats) plus protege's compact and hidden formats; see docs/teacher-server.md.",
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
        choices=DTYPE_NAMES,
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
    parser.add_argument(
        "--vllm-hidden-states",
        action="store_true",
        help="With --backend vllm: build vLLM's pooling runner, which serves response_format='hidden' (final hidden "
        "states; the LM head is read from the checkpoint for /lm_head/) and only it. The transformers backend "
        "serves every format without this flag.",
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="Allow custom modelling code.")
    parser.add_argument("--log-level", default="info", help="uvicorn log level (default: info).")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..server.app import ServerLimits, serve
    from ..server.backends import return_large_blocks_to_the_os

    return_large_blocks_to_the_os()  # the server process is ours: keep its memory bounded by the live tensors

    if args.backend == "vllm":
        from ..server.backends import VLLMBackend

        backend = VLLMBackend(
            args.model,
            dtype=args.dtype,
            max_model_len=args.max_model_len,
            max_logprobs=args.max_top_logprobs,
            trust_remote_code=args.trust_remote_code,
            hidden_states=args.vllm_hidden_states,
        )
    else:
        from ..server.backends import TransformersBackend

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
