"""`protege serve-student`: the student's vLLM engine behind HTTP, for `use_vllm=True, vllm_mode="server"`.

The trainer pushes the student's weights after each optimizer step as safetensors bytes (`POST /weights/`, in chunks
of at most `vllm_server_chunk_mb`; the last chunk commits them all at once with vLLM's `reload_weights`) and asks for
completions of token-id prompts (`POST /generate/`). Plain HTTP, so it works wherever vLLM runs, CPU included (TRL's
`trl vllm-serve` syncs weights over NCCL, GPU only). Requests are served one at a time: generation and a weight
update never interleave.
"""

from __future__ import annotations

import asyncio
import logging
import os

from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, ConfigDict, StrictInt

from .guard import RequestGuard


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: list[list[StrictInt]]
    seeds: list[StrictInt]
    sampling: dict  # vLLM SamplingParams fields (token ids out), plus "structured_outputs_regex"
    logprobs: bool = False  # also return each sampled token's log-prob (to check which weights sampled it)


IN_PROCESS_VARIABLE = "VLLM_ENABLE_V1_MULTIPROCESSING"


def run_engine_in_process() -> None:
    """Make vLLM run its engine in this process (before vLLM is imported).

    Weights reach the engine as `collective_rpc("reload_weights", kwargs={"weights_iterator": ...})`. In its default
    mode vLLM runs the engine in a child process and sends such calls there with its msgpack encoder, which refuses
    the iterator (`Object of type <class 'dict_itemiterator'> is not serializable`) and would not rebuild tensors
    from untyped arguments anyway; only pickling, which vLLM allows with VLLM_ALLOW_INSECURE_SERIALIZATION=1, would
    carry them. In process the tensors are handed over as they are: no copy, no EngineCore and Worker processes (the
    server started in 11-16 s here, against 33 s), and none left behind when it stops."""
    previous = os.environ.get(IN_PROCESS_VARIABLE)
    if previous not in (None, "0"):
        logging.getLogger("protege.server").warning(
            "%s=%s ignored: serve-student runs vLLM's engine in its own process, where weight updates can reach it",
            IN_PROCESS_VARIABLE,
            previous,
        )
    os.environ[IN_PROCESS_VARIABLE] = "0"


class StudentEngine:
    """A `vllm.LLM` of the student, run in this process, that takes weight updates in chunks and generates from token
    ids."""

    def __init__(self, model: str, dtype: str = "auto", max_model_len: int | None = None, **engine_options):
        run_engine_in_process()
        import torch
        import vllm

        from ..vllm_engine import quiet_vllm_notices

        self.vllm = vllm
        options = {"model": model, "dtype": dtype, "skip_tokenizer_init": True, **engine_options}
        options.setdefault("enforce_eager", not torch.cuda.is_available())
        # The log-prob a sampled token had in the distribution it was drawn from (after temperature and top-k/p), as the
        # policy-gradient objective's importance weight needs; with plain sampling it is the model's own.
        options.setdefault("logprobs_mode", "processed_logprobs")
        if max_model_len is not None:
            options["max_model_len"] = max_model_len
        quiet_vllm_notices()
        self.llm = vllm.LLM(**options)
        # vLLM may pick another dtype than the trainer's (bfloat16 for a float32 checkpoint on CPU, with "auto")
        self.dtype = self.llm.llm_engine.model_config.dtype
        self.model_name = model
        self.pending: dict = {}  # tensors of an update not yet committed
        self.weights_version: int | None = None  # the trainer's step of the last committed update

    def receive(self, blob: bytes, chunk: int, chunks: int, version: int) -> bool:
        """Add one chunk of an update (chunk 0 starts a new one); the last commits it. Returns whether it did."""
        from safetensors.torch import load

        if chunk == 0:
            self.pending = {}
        self.pending.update(load(blob))
        if chunk < chunks - 1:
            return False
        weights, self.pending = self.pending, {}
        # In the engine's dtype: vLLM would convert each tensor anyway, logging a warning per tensor and push.
        weights = {name: t.to(self.dtype) if t.is_floating_point() else t for name, t in weights.items()}
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights.items())})
        self.weights_version = version
        return True

    def generate(self, request: GenerateRequest) -> dict:
        """{"completions": token ids per prompt} and, when asked, "logprobs" of each sampled token."""
        options = dict(request.sampling) | ({"logprobs": 0} if request.logprobs else {})
        if options.get("logit_bias"):  # JSON object keys are strings; vLLM indexes logits with them
            options["logit_bias"] = {int(token): float(bias) for token, bias in options["logit_bias"].items()}
        regex = options.pop("structured_outputs_regex", None)
        if regex:
            from vllm.sampling_params import StructuredOutputsParams

            options["structured_outputs"] = StructuredOutputsParams(regex=regex)
        params = [self.vllm.SamplingParams(seed=seed, **options) for seed in request.seeds]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in request.prompts], params, use_tqdm=False)
        answer = {"completions": [list(output.outputs[0].token_ids) for output in outputs]}
        if request.logprobs:
            answer["logprobs"] = [
                [step[token].logprob for step, token in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                for o in outputs
            ]
        return answer


def create_student_app(
    engine: StudentEngine, max_body_bytes: int = 2**30, max_prompts: int = 4096, api_key: str | None = None
) -> FastAPI:
    """The student server's app. `api_key`: every route but /health/ needs `Authorization: Bearer <key>`, so that
    nobody else can replace the weights the trainer samples from."""
    lock = asyncio.Lock()  # one engine call at a time
    expected_chunk = {"next": 0}

    app = FastAPI(title="protege student generation server")
    app.add_middleware(RequestGuard, max_bytes=max_body_bytes, api_key=api_key)

    @app.get("/health/")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/info/")
    async def info() -> dict:
        return {"model": engine.model_name, "weights_version": engine.weights_version}

    @app.post("/weights/")
    async def weights(request: Request, chunk: int, chunks: int, version: int) -> dict:
        if not 0 <= chunk < chunks:
            raise HTTPException(status_code=400, detail=f"chunk={chunk} is outside [0, chunks={chunks})")
        if chunk not in (0, expected_chunk["next"]):
            raise HTTPException(
                status_code=409,
                detail=f"chunk {chunk} arrived but chunk {expected_chunk['next']} was expected; start again at 0",
            )
        blob = await request.body()
        async with lock:
            try:
                committed = await asyncio.get_running_loop().run_in_executor(
                    None, engine.receive, blob, chunk, chunks, version
                )
            except Exception as error:  # noqa: BLE001 (safetensors' own error type, or vLLM refusing a tensor)
                expected_chunk["next"] = 0
                raise HTTPException(status_code=400, detail=f"the update was refused: {error}") from None
        expected_chunk["next"] = 0 if committed else chunk + 1
        return {"committed": committed, "weights_version": engine.weights_version}

    @app.post("/generate/")
    async def generate(request: GenerateRequest) -> dict:
        if len(request.seeds) != len(request.prompts):
            detail = f"{len(request.seeds)} seeds for {len(request.prompts)} prompts"
            raise HTTPException(status_code=400, detail=detail)
        if not request.prompts or len(request.prompts) > max_prompts:
            raise HTTPException(status_code=400, detail=f"{len(request.prompts)} prompts: send 1 to {max_prompts}")
        if any(not prompt for prompt in request.prompts):
            raise HTTPException(status_code=400, detail="a prompt is empty")
        async with lock:
            try:
                answer = await asyncio.get_running_loop().run_in_executor(None, engine.generate, request)
            except (TypeError, ValueError) as error:  # sampling fields vLLM does not accept, a prompt too long
                raise HTTPException(status_code=400, detail=f"vLLM refused the request: {error}") from None
        return answer | {"weights_version": engine.weights_version}

    return app
