"""The teacher server's HTTP layer: validation, request batching and response formats (FastAPI + uvicorn).

Concurrent requests wait in a queue; a single worker takes as many as fit a token budget (requests with the same
top_logprobs and temperature, or all asking for hidden states), scores them in one backend call in a thread, and
answers each. A request the server cannot serve is refused with a 4xx and a short message before it reaches the
queue, and the next one is served normally. Memory stays bounded by the model and the limits: a request holds at most
`max_request_tokens` tokens (413), the queue at most `max_queued_tokens` (503 with Retry-After), and a request whose
client hung up leaves the queue unscored. Parsing and validation run off the event loop, so `/health/` answers
throughout; the transport-level guards (timeouts, connection cap, API key) are in `guard.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, HTTPException, Request
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, ValidationError

from ..choices import API_KEY_VARIABLE, HIDDEN_DTYPES, HIDDEN_FORMAT, LOGPROB_FORMATS, RESPONSE_FORMATS
from ..teacher.codec import BatchScores, check_scores, encode, encode_hidden, encode_hidden_binary
from ..teacher.head import save_head
from .backends import Backend
from .guard import RequestGuard, uvicorn_config, warn_if_open
from .limits import ServerLimits  # defined apart, light enough for `serve-teacher --help`; imported from here too


class SequenceLogprobsRequest(BaseModel):
    """The body of POST /get_sequence_logprobs/ (TRL's contract, plus the "compact" and "hidden" formats)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

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


TEMPERATURE_RANGE = (1e-3, 1e3)  # outside it float32 log-probs degenerate (all -inf but one, or overflow)


@dataclass
class _Job:
    request: SequenceLogprobsRequest
    tokens: int
    future: asyncio.Future = field(repr=False)


class Busy(Exception):
    """The queue holds as many tokens as it may."""


class WorkQueue:
    """Jobs waiting for the backend, bounded in tokens; a cancelled job (its client hung up) leaves the count at once
    and is dropped unscored when it reaches the front."""

    def __init__(self, max_tokens: int):
        self.jobs: asyncio.Queue[_Job] = asyncio.Queue()
        self.max_tokens, self.tokens = max_tokens, 0

    def put(self, job: _Job) -> None:
        if self.tokens + job.tokens > self.max_tokens:
            raise Busy(f"the server is busy: {self.tokens} tokens are queued, the limit is {self.max_tokens}")
        self.tokens += job.tokens
        self.jobs.put_nowait(job)

    def cancel(self, job: _Job) -> None:
        if not job.future.done():
            job.future.cancel()
            self.tokens -= job.tokens

    def _leave(self, job: _Job) -> bool:
        """Take `job` off the count; whether it is still wanted."""
        if job.future.cancelled():
            return False
        self.tokens -= job.tokens
        return True

    async def next_batch(self, limits: ServerLimits) -> list[_Job]:
        """The oldest live job, plus (when batching) every queued job with its batch key that fits the budget."""
        while True:
            first = await self.jobs.get()
            if self._leave(first):
                break
        jobs = [first]
        if limits.batching:
            await asyncio.sleep(limits.batch_wait_s)
            key, budget, deferred = first.request.batch_key(), limits.max_batch_tokens - first.tokens, []
            while not self.jobs.empty():
                job = self.jobs.get_nowait()
                if job.future.cancelled():
                    continue
                if job.request.batch_key() == key and job.tokens <= budget and self._leave(job):
                    jobs.append(job)
                    budget -= job.tokens
                else:
                    deferred.append(job)
            for job in deferred:
                self.jobs.put_nowait(job)
        return jobs


def validate(request: SequenceLogprobsRequest, backend: Backend, limits: ServerLimits) -> None:
    """Refuse what the backend cannot serve, naming the sequence and the problem (HTTP 400)."""

    def refuse(message: str) -> None:
        raise HTTPException(status_code=400, detail=message)

    if request.response_format == HIDDEN_FORMAT and not backend.serves_hidden:
        refuse(
            "response_format='hidden' needs the transformers backend (serve-teacher --backend transformers), or the "
            "vllm backend started with --vllm-hidden-states"
        )
    if request.response_format != HIDDEN_FORMAT and not backend.serves_logprobs:
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
    low, high = TEMPERATURE_RANGE
    if not request.temperature > 0:
        refuse(f"temperature={_short(request.temperature)} must be a finite number > 0")
    if not low <= request.temperature <= high:  # exact for ints of any size: no float conversion
        refuse(f"temperature={_short(request.temperature)} is outside [{low:g}, {high:g}]")
    if request.temperature != 1 and not backend.honours_temperature:
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


def _short(value) -> str:
    """A number as it can be quoted in an error: a huge integer shortened."""
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:8]}...({len(text)} digits)"


MAX_LISTED_ERRORS = 5


def parse(body: bytes, backend: Backend, limits: ServerLimits) -> tuple[SequenceLogprobsRequest, int]:
    """The request and its token count, or the HTTPException that refuses it: 422 for a body that is not a valid
    request (the first few errors and their count, never the input echoed back), 413 over max_request_tokens, 400
    for what the backend cannot serve."""
    try:
        request = SequenceLogprobsRequest.model_validate_json(body)
    except ValidationError as error:
        errors = error.errors(include_url=False, include_input=False, include_context=False)
        listed = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in errors[:MAX_LISTED_ERRORS]]
        raise HTTPException(status_code=422, detail={"errors": listed, "error_count": error.error_count()}) from None
    tokens = sum(len(s) for s in request.sequences)
    if tokens > limits.max_request_tokens:
        raise HTTPException(
            status_code=413,
            detail=f"the request holds {tokens} tokens, over the limit of {limits.max_request_tokens} a request "
            "(max_request_tokens on /info/): split it",
        )
    validate(request, backend, limits)
    return request, tokens


def render(rows, request: SequenceLogprobsRequest, vocab_size: int, binary: bool = False) -> bytes:
    """The answer's body: JSON, or for the hidden format asked as binary, one safetensors blob."""
    if request.response_format == HIDDEN_FORMAT and binary:
        return encode_hidden_binary(rows, request.hidden_dtype)
    if request.response_format == HIDDEN_FORMAT:
        payload = encode_hidden(rows, request.hidden_dtype)
    else:
        check_scores(BatchScores.pad(rows, request.top_logprobs), request.sequences, request.prompt_lengths)
        payload = encode(rows, request.top_logprobs, request.response_format, vocab_size)
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


class HeadFile:
    """The backend's LM head as one safetensors file, written on first request; its description for /lm_head/meta/."""

    def __init__(self, backend: Backend):
        self.backend, self.lock = backend, asyncio.Lock()
        self.folder: Path | None = None
        self.meta: dict | None = None

    async def ready(self) -> dict:
        if not self.backend.serves_hidden:
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
        meta = {**head.metadata(), "sha256": sha256, "bytes": self.path.stat().st_size}
        return meta | {"tensors_sha256": head.tensors_sha256()}  # the file's SHA-256 changes with each server process

    @property
    def path(self) -> Path:
        return self.folder / "lm_head.safetensors"

    def remove(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


class Scorer:
    """The scoring route and the worker behind it: requests are parsed and queued by `answer`, batched and scored by
    `work`, one backend call at a time; `stats` are the counters /info/ reports."""

    def __init__(self, backend: Backend, limits: ServerLimits):
        self.backend, self.limits = backend, limits
        self.queue = WorkQueue(limits.max_queued_tokens)
        self.stats = {"requests": 0, "refused": 0, "busy": 0, "cancelled": 0, "backend_calls": 0, "scored_tokens": 0}

    async def work(self) -> None:
        """Score the queue's batches for as long as the server runs."""
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self.queue.next_batch(self.limits)
            sequences = [s for job in jobs for s in job.request.sequences]
            prompt_lengths = [p for job in jobs for p in job.request.prompt_lengths]
            request = jobs[0].request
            self.stats["backend_calls"] += 1
            self.stats["scored_tokens"] += sum(len(s) - p for s, p in zip(sequences, prompt_lengths))
            if request.response_format == HIDDEN_FORMAT:
                call = (self.backend.hidden_states, sequences, prompt_lengths)
            else:
                call = (self.backend.score, sequences, prompt_lengths, request.top_logprobs, request.temperature)
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

    async def answer(self, http_request: Request) -> Response:
        """One POST /get_sequence_logprobs/: refused (4xx, 503 when busy), dropped (the client hung up), or scored."""
        self.stats["requests"] += 1
        loop = asyncio.get_running_loop()
        body = await http_request.body()
        try:
            request, tokens = await loop.run_in_executor(None, parse, body, self.backend, self.limits)
        except HTTPException:
            self.stats["refused"] += 1
            raise
        job = _Job(request, tokens, loop.create_future())
        try:
            self.queue.put(job)
        except Busy as error:
            self.stats["busy"] += 1
            raise HTTPException(status_code=503, detail=str(error), headers={"Retry-After": "1"}) from None
        hung_up = asyncio.create_task(client_gone(http_request))
        try:
            await asyncio.wait({job.future, hung_up}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hung_up.cancel()
        if not job.future.done():  # the client is gone: nobody will read an answer
            self.queue.cancel(job)
            self.stats["cancelled"] += 1
            return Response(status_code=499)
        try:
            rows = job.future.result()
        except Exception as error:
            raise HTTPException(status_code=500, detail=f"the teacher backend failed: {error}") from None
        # Encoding a large answer takes long enough to stall other requests: do it off the event loop.
        binary = "application/octet-stream" in http_request.headers.get("accept", "")
        try:
            body = await loop.run_in_executor(None, render, rows, request, self.backend.vocab_size, binary)
        except ValueError as error:  # non-finite log-probs or hidden states that do not fit the asked dtype
            raise HTTPException(status_code=422, detail=str(error)) from None
        binary = binary and request.response_format == HIDDEN_FORMAT
        return Response(content=body, media_type="application/octet-stream" if binary else "application/json")


def create_app(
    backend: Backend, limits: ServerLimits | None = None, api_key: str | None = None, docs: bool = False
) -> FastAPI:
    """The teacher server's app. `api_key`: every route but /health/ needs `Authorization: Bearer <key>`. `docs`:
    serve /docs, /redoc and /openapi.json (off by default: they describe the server to anyone who reaches it)."""
    limits = limits or ServerLimits()
    scorer = Scorer(backend, limits)
    head_file = HeadFile(backend)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        task = asyncio.create_task(scorer.work())
        yield
        task.cancel()
        head_file.remove()

    hidden = {} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="protege teacher server", lifespan=lifespan, **hidden)
    app.add_middleware(GZipMiddleware, minimum_size=1024, compresslevel=6)  # level 9 costs 3x the time for ~1%
    app.add_middleware(
        RequestGuard, max_bytes=limits.max_body_bytes, body_timeout_s=limits.body_timeout_s, api_key=api_key
    )

    @app.get("/health/")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/info/")
    async def info() -> dict:
        return {
            "model": public_name(backend.model_name),
            "revision": backend.revision,
            "config_sha256": backend.config_sha256,
            "vocab_size": backend.vocab_size,
            "max_model_len": limits.max_model_len,
            "max_top_logprobs": limits.max_top_logprobs,
            "max_request_tokens": limits.max_request_tokens,
            "formats": [
                *(LOGPROB_FORMATS if backend.serves_logprobs else ()),
                *((HIDDEN_FORMAT,) if backend.serves_hidden else ()),
            ],
            "tokenizer_sha256": backend.tokenizer_sha256,
            **scorer.stats,
            "queued_tokens": scorer.queue.tokens,
        }

    vocabulary_body: list[bytes] = []  # /vocabulary/'s JSON, encoded once

    @app.get("/vocabulary/")
    async def vocabulary() -> Response:
        """The teacher tokenizer's token-to-id map, so that a client whose tokenizer it extends can check that every
        student token has the same id here (/info/'s fingerprint only says whether the two maps are equal)."""
        if backend.vocabulary is None:
            raise HTTPException(status_code=404, detail="this teacher has no tokenizer")
        if not vocabulary_body:
            vocabulary_body.append(json.dumps(backend.vocabulary).encode())  # ASCII: any token survives
        return Response(vocabulary_body[0], media_type="application/json")

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

    @app.post("/get_sequence_logprobs/", openapi_extra=REQUEST_SCHEMA)
    async def get_sequence_logprobs(http_request: Request) -> Response:
        return await scorer.answer(http_request)

    return app


# The route reads its body itself (to parse it off the event loop); this keeps the request schema in /openapi.json.
REQUEST_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": SequenceLogprobsRequest.model_json_schema()}},
    }
}


async def client_gone(request: Request) -> None:
    """Return when the client disconnects (after the body, the ASGI server's next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def public_name(model: str) -> str:
    """A local model's folder name, not its absolute path (which says how the host is laid out); a hub id as is."""
    path = Path(model)
    return path.name if path.is_absolute() or path.exists() else model


def serve(
    backend: Backend,
    host: str,
    port: int,
    limits: ServerLimits,
    log_level: str = "info",
    api_key: str | None = None,
    docs: bool = False,
    **ssl,
) -> int | None:
    """Serve the teacher until SIGINT or SIGTERM; the signal's number (None when the server ended otherwise)."""
    from .stopping import serve_until_stopped

    warn_if_open(host, port, api_key, "teacher", API_KEY_VARIABLE)
    return serve_until_stopped(
        uvicorn_config(
            create_app(backend, limits, api_key, docs),
            host,
            port,
            header_timeout_s=limits.header_timeout_s,
            max_connections=limits.max_connections,
            log_level=log_level,
            **ssl,
        )
    )
