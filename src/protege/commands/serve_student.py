"""`protege serve-student`: the student's vLLM engine over HTTP, for `use_vllm=True, vllm_mode="server"`."""

from __future__ import annotations

import argparse
import os

from ..choices import DTYPE_NAMES, STUDENT_API_KEY_VARIABLE


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve-student",
        help="Serve the student's generations with vLLM, taking weight updates over HTTP (vllm_mode='server').",
        description="Start a vLLM engine of the student that generates completions of token-id prompts "
        "(POST /generate/) and takes the trainer's weights after each optimizer step (POST /weights/, safetensors "
        "bytes in chunks). Needs vLLM in this environment. See README's 'Student generation with vLLM'.",
    )
    parser.add_argument("--model", required=True, help="The student's starting checkpoint (folder or hub id).")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (default: 127.0.0.1).")
    parser.add_argument("--port", type=int, default=8001, help="Port to listen on (default: 8001, TRL's).")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_NAMES, help="Weights dtype (default: auto).")
    parser.add_argument("--max-model-len", type=int, default=None, help="vLLM's max_model_len (prompt + completion).")
    parser.add_argument(
        "--gpu-memory-utilization", type=float, default=0.9, help="Fraction of GPU memory vLLM may take."
    )
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM tensor parallel size.")
    parser.add_argument("--max-body-mb", type=float, default=1024.0, help="Largest request body in MiB (a chunk).")
    parser.add_argument(
        "--max-connections",
        type=int,
        default=64,
        help="Open connections past which each new one closes the connection idle the longest, or itself when all "
        "are busy (default: 64; the trainer's processes hold one each).",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"Require 'Authorization: Bearer KEY' on every route but /health/ (default: ${STUDENT_API_KEY_VARIABLE}, "
        "else no key; the trainer sends vllm_server_api_key or the same variable).",
    )
    parser.add_argument("--log-level", default="info", help="uvicorn log level (default: info).")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..server.stopping import report_stop
    from .errors import report
    from .interrupts import Interrupted, interruptible

    try:
        with interruptible():
            try:
                engine = _load(args)
            except ImportError as error:
                return report("serve-student", f"{error} (serve-student needs vLLM and the server extras)")
            except (ValueError, OSError) as error:
                return report("serve-student", error)
            signum = _serve(args, engine)
    except Interrupted as stop:
        return report_stop("serve-student", stop.signum, "before it served")
    return report_stop("serve-student", signum, f"after serving http://{args.host}:{args.port}")


def _load(args: argparse.Namespace):
    """The student's engine, after the checks that can fail before vLLM starts: a wrong name, a student vLLM would
    refuse or die of."""
    from ..model_source import check_model_source

    check_model_source(args.model, "student")
    import torch
    from transformers import AutoConfig

    from ..server.student import StudentEngine
    from ..vllm_engine import check_student_for_vllm

    config = AutoConfig.from_pretrained(args.model)
    check_student_for_vllm(config, args.max_model_len, "--max-model-len", on_cpu=not torch.cuda.is_available())
    return StudentEngine(
        args.model,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        gpu_memory_utilization=args.gpu_memory_utilization,
        tensor_parallel_size=args.tensor_parallel_size,
    )


def _serve(args: argparse.Namespace, engine) -> int | None:
    """Serve until SIGINT or SIGTERM; the signal's number."""
    from ..server.guard import uvicorn_config, warn_if_open
    from ..server.stopping import serve_until_stopped
    from ..server.student import create_student_app

    api_key = args.api_key or os.environ.get(STUDENT_API_KEY_VARIABLE) or None
    warn_if_open(args.host, args.port, api_key, "student's weights and generations", STUDENT_API_KEY_VARIABLE)
    app = create_student_app(engine, max_body_bytes=int(args.max_body_mb * 2**20), api_key=api_key)
    config = uvicorn_config(app, args.host, args.port, max_connections=args.max_connections, log_level=args.log_level)
    return serve_until_stopped(config)
