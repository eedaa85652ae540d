"""The teacher server's HTTP layer: validation, request batching and response formats (FastAPI + uvicorn).

Concurrent requests wait in a queue; a single worker takes as many as fit a token budget (requests with the same
top_logprobs and temperature, or all asking for hidden states), scores them in one backend call in a thread, and
answers each. A request the server
cannot serve is refused with a 4xx and a message before it reaches the queue, and the next one is served normally.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt

from ..choices import HIDDEN_DTYPES, HIDDEN_FORMAT, LOGPROB_FORMATS, RESPONSE_FORMATS
from ..teacher.codec import encode, encode_hidden, encode_hidden_binary
from ..teacher.head import save_head
from .backends import Backend


class SequenceLogprobsRequest(BaseModel):
    """The body of POST /get_sequence_logprobs/ (TRL's contract, plus the "compact" and "hidden" formats)."""

    model_config = ConfigDict(extra="forbid")

    sequences: list[list[StrictInt]]
    prompt_lengths: list[StrictInt]
    top_logprobs: StrictInt = 1
    temperature: StrictFloat | StrictInt = 1.0
    response_format: Literal[RESPONSE_FORMATS] = "json"
    hidden_dtype: Literal[HIDDEN_DTYPES] = "float16"  # the "hidden" format's wire dtype

    def batch_key(self) -> tuple:
        """Requests with equal keys are scored in one backend call."""
        if self.response_format == HIDDEN_FORMAT:
            return (HIDDEN_FORMAT,)
        return (self.top_logprobs, self.temperature)


@dataclass
class ServerLimits:
    max_model_len: int = 4096
    max_top_logprobs: int = 100
    max_batch_tokens: int = 16384
    max_body_bytes: int = 64 * 2**20
    batching: bool = True
    batch_wait_s: float = 0.005


@dataclass
class _Job:
    request: SequenceLogprobsRequest
    tokens: int
    future: asyncio.Future = field(repr=False)


def serves(backend: Backend) -> tuple[bool, bool]:
    """Whether a backend serves the log-prob formats and the hidden format (a backend that does not say: log-probs)."""
    return getattr(backend, "serves_logprobs", True), getattr(backend, "serves_hidden", False)


def validate(request: SequenceLogprobsRequest, backend: Backend, limits: ServerLimits) -> None:
    """Refuse what the backend cannot serve, naming the sequence and the problem (HTTP 400)."""

    def refuse(message: str) -> None:
        raise HTTPException(status_code=400, detail=message)

    serves_logprobs, serves_hidden = serves(backend)
    if request.response_format == HIDDEN_FORMAT and not serves_hidden:
        refuse(
            "response_format='hidden' needs the transformers backend (serve-teacher --backend transformers), or the "
            "vllm backend started with --vllm-hidden-states"
        )
    if request.response_format != HIDDEN_FORMAT and not serves_logprobs:
        refuse(
            f"response_format={request.response_format!r}: this server was started with --vllm-hidden-states and "
            "serves response_format='hidden' only"
        )
    if not request.sequences:
        refuse("'sequences' is empty")
    if len(request.prompt_lengths) != len(request.sequences):
        refuse(f"'prompt_lengths' has {len(request.prompt_lengths)} entries for {len(request.sequences)} sequences")
    vocab_size = backend.vocab_size
    top_limit = min(limits.max_top_logprobs, vocab_size)
    if not 1 <= request.top_logprobs <= top_limit:
        refuse(f"top_logprobs={request.top_logprobs} is outside [1, {top_limit}]")
    if not (math.isfinite(request.temperature) and request.temperature > 0):
        refuse(f"temperature={request.temperature} must be a finite number > 0")
    if request.temperature != 1 and not getattr(backend, "honours_temperature", True):
        refuse(
            f"temperature={request.temperature}: this backend's log-probs are untempered, so it serves "
            "temperature 1 only (use the transformers backend, or temperature=1.0)"
        )
    for i, (sequence, prompt_length) in enumerate(zip(request.sequences, request.prompt_lengths)):
        if not sequence:
            refuse(f"sequence {i} is empty")
        if len(sequence) > limits.max_model_len:
            refuse(f"sequence {i} has {len(sequence)} tokens, over max_model_len={limits.max_model_len}")
        if not 1 <= prompt_length < len(sequence):
            refuse(
                f"prompt_lengths[{i}]={prompt_length} is outside [1, {len(sequence)}): a prompt needs at least one "
                "token and a completion at least one"
            )
        bad = next((t for t in sequence if not 0 <= t < vocab_size), None)
        if bad is not None:
            refuse(f"sequence {i} holds token id {bad}, outside the vocabulary [0, {vocab_size})")


class BodyLimit:
    """Refuse a request body over `max_bytes` with 413, whether it declares its length or arrives in chunks."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and int(declared) > self.max_bytes:
            response = JSONResponse(status_code=413, content={"detail": self._message(int(declared))})
            return await response(scope, receive, send)
        received = 0

        async def counting_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # raised while the route reads the body: FastAPI answers it
                raise HTTPException(status_code=413, detail=self._message(received))
            return message

        return await self.app(scope, counting_receive, send)

    def _message(self, size: int) -> str:
        return f"request body of {size} bytes or more is over the limit of {self.max_bytes}"


def render(rows, request: SequenceLogprobsRequest, vocab_size: int, binary: bool = False) -> bytes:
    """The answer's body: JSON, or for the hidden format asked as binary, one safetensors blob."""
    if request.response_format == HIDDEN_FORMAT and binary:
        return encode_hidden_binary(rows, request.hidden_dtype)
    if request.response_format == HIDDEN_FORMAT:
        payload = encode_hidden(rows, request.hidden_dtype)
    else:
        payload = encode(rows, request.top_logprobs, request.response_format, vocab_size)
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


class HeadFile:
    """The backend's LM head as one safetensors file, written on first request; its description for /lm_head/meta/."""

    def __init__(self, backend: Backend):
        self.backend, self.lock = backend, asyncio.Lock()
        self.folder: Path | None = None
        self.meta: dict | None = None

    async def ready(self) -> dict:
        if not serves(self.backend)[1]:
            raise HTTPException(
                status_code=404,
                detail="this server does not serve the LM head: use the transformers backend, or the vllm backend "
                "with --vllm-hidden-states",
            )
        async with self.lock:
            if self.meta is None:
                self.meta = await asyncio.get_running_loop().run_in_executor(None, self._write)
        return self.meta

    def _write(self) -> dict:
        head = self.backend.lm_head()
        self.folder = Path(tempfile.mkdtemp(prefix="protege-lm-head-"))
        sha256 = save_head(head, self.path)
        return {**head.metadata(), "sha256": sha256, "bytes": self.path.stat().st_size}

    @property
    def path(self) -> Path:
        return self.folder / "lm_head.safetensors"

    def remove(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def create_app(backend: Backend, limits: ServerLimits | None = None) -> FastAPI:
    limits = limits or ServerLimits()
    queue: asyncio.Queue[_Job] = asyncio.Queue()
    stats = {"requests": 0, "refused": 0, "backend_calls": 0, "scored_tokens": 0}

    async def worker() -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await queue.get()]
            if limits.batching:
                await asyncio.sleep(limits.batch_wait_s)
                key = jobs[0].request.batch_key()
                budget = limits.max_batch_tokens - jobs[0].tokens
                deferred = []
                while not queue.empty():
                    job = queue.get_nowait()
                    if job.request.batch_key() == key and job.tokens <= budget:
                        jobs.append(job)
                        budget -= job.tokens
                    else:
                        deferred.append(job)
                for job in deferred:
                    queue.put_nowait(job)
            sequences = [s for job in jobs for s in job.request.sequences]
            prompt_lengths = [p for job in jobs for p in job.request.prompt_lengths]
            request = jobs[0].request
            stats["backend_calls"] += 1
            stats["scored_tokens"] += sum(len(s) - p for s, p in zip(sequences, prompt_lengths))
            if request.response_format == HIDDEN_FORMAT:
                call = (backend.hidden_states, sequences, prompt_lengths)
            else:
                call = (backend.score, sequences, prompt_lengths, request.top_logprobs, request.temperature)
            try:
                rows = await loop.run_in_executor(None, *call)
            except Exception as error:  # the backend failed: every waiting request gets a 500 with the reason
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(error)
                continue
            start = 0
            for job in jobs:
                count = len(job.request.sequences)
                if not job.future.done():
                    job.future.set_result(rows[start : start + count])
                start += count

    head_file = HeadFile(backend)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        task = asyncio.create_task(worker())
        yield
        task.cancel()
        head_file.remove()

    app = FastAPI(title="protege teacher server", lifespan=lifespan)
    app.add_middleware(GZipMiddleware, minimum_size=1024, compresslevel=6)  # level 9 costs 3x the time for ~1%

    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)

    @app.get("/health/")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/info/")
    async def info() -> dict:
        return {
            "model": backend.model_name,
            "vocab_size": backend.vocab_size,
            "max_model_len": limits.max_model_len,
            "max_top_logprobs": limits.max_top_logprobs,
            "formats": [
                *(LOGPROB_FORMATS if serves(backend)[0] else ()),
                *((HIDDEN_FORMAT,) if serves(backend)[1] else ()),
            ],
            "tokenizer_sha256": getattr(backend, "tokenizer_sha256", None),
            **stats,
        }

    @app.get("/lm_head/meta/")
    async def lm_head_meta() -> dict:
        """The head's vocabulary and hidden size, dtype, logit transform, and the SHA-256 of /lm_head/'s bytes."""
        return await head_file.ready()

    @app.get("/lm_head/")
    async def lm_head() -> FileResponse:
        """The teacher's LM head as a safetensors file ("weight", optional "bias"; the metadata in its header)."""
        meta = await head_file.ready()
        return FileResponse(
            head_file.path,
            media_type="application/octet-stream",
            headers={"ETag": f'"{meta["sha256"]}"'},
            filename="lm_head.safetensors",
        )

    @app.post("/get_sequence_logprobs/")
    async def get_sequence_logprobs(request: SequenceLogprobsRequest, http_request: Request) -> Response:
        stats["requests"] += 1
        try:
            validate(request, backend, limits)
        except HTTPException:
            stats["refused"] += 1
            raise
        future = asyncio.get_running_loop().create_future()
        await queue.put(_Job(request, sum(len(s) for s in request.sequences), future))
        try:
            rows = await future
        except Exception as error:
            raise HTTPException(status_code=500, detail=f"the teacher backend failed: {error}") from None
        # Encoding a large answer takes long enough to stall other requests: do it off the event loop.
        binary = "application/octet-stream" in http_request.headers.get("accept", "")
        try:
            body = await asyncio.get_running_loop().run_in_executor(
                None, render, rows, request, backend.vocab_size, binary
            )
        except ValueError as error:  # hidden states that do not fit the asked dtype
            raise HTTPException(status_code=422, detail=str(error)) from None
        binary = binary and request.response_format == HIDDEN_FORMAT
        return Response(content=body, media_type="application/octet-stream" if binary else "application/json")

    return app


def serve(backend: Backend, host: str, port: int, limits: ServerLimits, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(create_app(backend, limits), host=host, port=port, log_level=log_level)
