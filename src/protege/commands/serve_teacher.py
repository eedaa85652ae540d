"""`protege serve-teacher`: serve a teacher's log-probs over HTTP for distillation (see docs/teacher-server.md)."""

from __future__ import annotations

import argparse
import logging
import os

from ..choices import API_KEY_VARIABLE, DTYPE_NAMES
from ..server.limits import DEFAULT_LIMITS

_log = logging.getLogger("protege")


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
    _add_limits(parser)
    parser.add_argument(
        "--api-key",
        default=None,
        help="Require 'Authorization: Bearer KEY' on every route but /health/ (default: $PROTEGE_TEACHER_API_KEY, "
        "else no key; the trainer sends teacher_server_api_key or the same variable).",
    )
    parser.add_argument("--ssl-certfile", default=None, help="Serve HTTPS with this certificate (PEM).")
    parser.add_argument("--ssl-keyfile", default=None, help="The certificate's private key (PEM).")
    parser.add_argument(
        "--enable-docs", action="store_true", help="Serve /docs, /redoc and /openapi.json (off by default)."
    )
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


def _add_limits(parser: argparse.ArgumentParser) -> None:
    """The `ServerLimits` flags; their defaults are the dataclass's (None: derived from the others)."""
    default = DEFAULT_LIMITS
    parser.add_argument(
        "--max-model-len",
        type=int,
        default=default["max_model_len"],
        help="Longest sequence accepted, in tokens (default: %(default)s).",
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=default["max_batch_tokens"],
        help="Token budget of one batched backend call (default: %(default)s).",
    )
    parser.add_argument(
        "--max-top-logprobs",
        type=int,
        default=default["max_top_logprobs"],
        help="Largest top_logprobs a request may ask for (default: %(default)s).",
    )
    parser.add_argument(
        "--max-request-tokens",
        type=int,
        default=default["max_request_tokens"],
        help="Most tokens one request may hold; larger ones get 413 (default: the larger of --max-batch-tokens and "
        "--max-model-len). protege's client reads it from /info/ and splits its batches to fit.",
    )
    parser.add_argument(
        "--max-queued-tokens",
        type=int,
        default=default["max_queued_tokens"],
        help="Most tokens waiting for the model; a request past it gets 503 with Retry-After (default: 8 x "
        "--max-request-tokens).",
    )
    parser.add_argument(
        "--max-body-mb",
        type=float,
        default=None if default["max_body_bytes"] is None else default["max_body_bytes"] / 2**20,
        help="Largest request body in MiB (default: 16 bytes a token of --max-request-tokens, at least 1 MiB).",
    )
    parser.add_argument(
        "--header-timeout",
        type=float,
        default=default["header_timeout_s"],
        help="Seconds a connection has to send its request headers "
        "(after connecting, or after its previous answer) before it is closed (default: %(default)g).",
    )
    parser.add_argument(
        "--body-timeout",
        type=float,
        default=default["body_timeout_s"],
        help="Seconds a request body may stall between chunks before a 408 (default: %(default)g).",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        default=default["max_connections"],
        help="Open connections past which each new one closes the connection idle the longest, or itself when all "
        "are busy (default: %(default)s; the open-file limit is raised to its hard limit).",
    )
    parser.add_argument(
        "--no-batching",
        dest="batching",
        action="store_false",
        default=default["batching"],
        help="Score each request alone.",
    )


def run(args: argparse.Namespace) -> int:
    from ..model_source import check_model_source
    from ..server.stopping import report_stop
    from .errors import report
    from .interrupts import Interrupted, interruptible

    try:
        with interruptible():
            try:
                check_model_source(args.model, "teacher")  # before the server's imports: a wrong name fails at once
                limits, backend = _load(args)
            except ImportError as error:  # the server extras, or vLLM for --backend vllm
                return report(
                    "serve-teacher", f"{error} (pip install 'protege[server]'; --backend vllm also needs vLLM)"
                )
            except (ValueError, OSError) as error:  # a bad limit, or a model transformers or vLLM cannot load
                return report("serve-teacher", error)
            signum = _serve(args, limits, backend)
    except Interrupted as stop:
        return report_stop("serve-teacher", stop.signum, "before it served")
    scheme = "https" if args.ssl_certfile else "http"
    return report_stop("serve-teacher", signum, f"after serving {scheme}://{args.host}:{args.port}")


def _serve(args: argparse.Namespace, limits, backend) -> int | None:
    """Serve until SIGINT or SIGTERM; the signal's number."""
    from ..server.app import serve

    return serve(
        backend,
        args.host,
        args.port,
        limits,
        args.log_level,
        api_key=args.api_key or os.environ.get(API_KEY_VARIABLE) or None,
        docs=args.enable_docs,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    )


def _load(args: argparse.Namespace):
    """The server's limits and its backend, with the model loaded: everything that can fail before it listens."""
    from ..server.backends import return_large_blocks_to_the_os
    from ..server.limits import ServerLimits

    limits = ServerLimits(
        max_model_len=args.max_model_len,
        max_top_logprobs=args.max_top_logprobs,
        max_batch_tokens=args.max_batch_tokens,
        max_request_tokens=args.max_request_tokens,
        max_queued_tokens=args.max_queued_tokens,
        max_body_bytes=None if args.max_body_mb is None else int(args.max_body_mb * 2**20),
        batching=args.batching,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        max_connections=args.max_connections,
    )
    # The server process is ours: keep its memory bounded by the live tensors (see the function), and say whether
    # that took, since without it a long request can grow the heap by gigabytes.
    if return_large_blocks_to_the_os():
        _log.info("freed scoring buffers go back to the OS (glibc's mmap threshold is fixed)")
    else:
        _log.warning("the allocator is not glibc: freed scoring buffers may stay in the heap, and memory may grow")

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
    return limits, backend
