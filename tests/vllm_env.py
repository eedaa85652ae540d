"""The vLLM environment (.vllm-env, `make vllm-env`) for tests/test_vllm.py and tests/test_vllm_student.py: its python,
the environment its processes run with, the tiny models vLLM's CPU kernels accept, and starting and stopping servers
there."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
from tiny import arithmetic_rows

from protege.teacher.client import TeacherClient, TeacherServerError
from protege.toy import tiny_model, train_tokenizer

VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".vllm-env" / "bin" / "python"
needs_vllm = [
    pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no .vllm-env: run `make vllm-env` (CI does)"),
    pytest.mark.slow,  # real vLLM: not in the fast tier
]
ENV = {
    **os.environ,
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

# As README runs it: no VLLM_ENABLE_V1_MULTIPROCESSING (serve-student runs vLLM's engine in its process itself).
README_ENV = {key: value for key, value in ENV.items() if key != "VLLM_ENABLE_V1_MULTIPROCESSING"}
README_ENV["VLLM_CPU_KVCACHE_SPACE"] = "2"


def build_vllm_models(folder: Path) -> dict[str, str]:
    """A teacher vLLM's CPU kernels accept (head_dim 32), a student (head_dim 8, which they lack), and a student vLLM
    can generate with (head_dim 32), sharing one tokenizer, in `folder`: their paths by name."""
    rows = arithmetic_rows(200, seed=0)
    tokenizer = train_tokenizer([m["content"] for r in rows for m in r["messages"]], vocab_size=300)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    paths = {}
    models = (("teacher", 2, 64, 2, 3), ("student", 2, 32, 4, 1), ("vllm_student", 2, 64, 2, 1))
    for name, layers, hidden, heads, seed in models:
        model = tiny_model(
            len(tokenizer),
            layers,
            hidden,
            heads,
            arch="llama",
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
            seed=seed,
        )
        if name == "teacher":
            model.lm_head.weight.data.mul_(20.0)  # peaked distributions, as a trained teacher has
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
        paths[name] = str(folder / name)
    return paths


def start(command: list[str], health: str, port: int, env: dict | None = None) -> subprocess.Popen:
    process = subprocess.Popen(
        command, env=env or ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    client = TeacherClient(f"http://127.0.0.1:{port}", protocol="protege" if health == "/health/" else "openai")
    try:
        client.wait_until_ready(timeout=400, interval=1.0)
    except TeacherServerError:
        stop(process)
        raise AssertionError(f"server did not start: {process.stderr.read()[-3000:]}") from None
    return process


def stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)  # vLLM leaves child processes behind a plain kill
        process.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)
