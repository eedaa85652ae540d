"""Student generation from a separate `protege serve-student` server (`use_vllm=True, vllm_mode="server"`).

Same interface as `vllm_colocate.VLLMColocate`: before a generation whose weights changed (every optimizer step, or
every `vllm_sync_frequency` steps) the student's weights go to the server as safetensors bytes in chunks of at most
`vllm_server_chunk_mb`, then the prompts' token ids and the config's sampling go out and completions' token ids come
back. Timeouts, retries and errors naming the URL come from `http_client.RetryingClient`.
"""

from __future__ import annotations

import os

import torch

from .choices import STUDENT_API_KEY_VARIABLE
from .http_client import RetryingClient, ServerError
from .vllm_colocate import prompt_seeds, student_weights, weights_due


class StudentServerError(ServerError):
    """The student's generation server could not be reached, refused a request, or answered something unusable."""


class StudentServerClient(RetryingClient):
    role, error = "student vLLM server", StudentServerError
    startup_setting = "vllm_server_timeout"


def weight_chunks(weights, max_bytes: int):
    """Groups of (name, tensor) of at most `max_bytes` each (a larger tensor alone), in state-dict order.

    A tensor whose memory an earlier one shares (a tied `lm_head.weight`) is copied: safetensors refuses shared memory,
    and vLLM needs every name, the tied head included."""
    group, size, seen = {}, 0, set()
    for name, tensor in weights:
        nbytes = tensor.numel() * tensor.element_size()
        if group and size + nbytes > max_bytes:
            yield group
            group, size = {}, 0
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        group[name] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
        size += nbytes
    if group:
        yield group


class VLLMServer:
    """The student's generations from a `protege serve-student` server (see the module docstring)."""

    def __init__(self, args, sampling: dict, process_index: int):
        """`sampling`: SamplingParams fields for every prompt but its seed (`vllm_colocate.sampling_options`)."""
        url = args.vllm_server_base_url or f"http://{args.vllm_server_host}:{args.vllm_server_port}"
        retries = args.vllm_server_max_retries
        api_key = args.vllm_server_api_key or os.environ.get(STUDENT_API_KEY_VARIABLE)
        self.client = StudentServerClient(url, timeout=args.vllm_server_timeout, max_retries=retries, api_key=api_key)
        self.client.wait_until_ready(args.vllm_server_timeout)
        self.args, self.sampling, self.process_index = args, sampling, process_index
        self.synced_step: int | None = None
        self.generate_calls = 0
        self.pushed_bytes = 0
        self.reports_logprobs = getattr(args, "on_policy_objective", "divergence") == "policy_gradient"
        self.last_logprobs: list[list[float]] | None = None  # read by `rollout.vllm_generate`

    def _sync_weights(self, model: torch.nn.Module, step: int) -> None:
        if not weights_due(self.synced_step, step, self.args.vllm_sync_frequency):
            return
        from safetensors.torch import save

        with torch.no_grad():
            chunks = list(weight_chunks(student_weights(model), int(self.args.vllm_server_chunk_mb * 2**20)))
            for index, chunk in enumerate(chunks):
                blob = save(chunk)
                query = f"/weights/?chunk={index}&chunks={len(chunks)}&version={step}"
                self.client.post(query, headers={"Content-Type": "application/octet-stream"}, content=blob)
                self.pushed_bytes += len(blob)
        self.synced_step = step

    def generate(self, model: torch.nn.Module, prompts: list[list[int]], step: int) -> list[list[int]]:
        self._sync_weights(model, step)
        body = {
            "prompts": prompts,
            "seeds": prompt_seeds(self.args.seed, self.process_index, step, len(prompts)),
            "sampling": self.sampling,
            "logprobs": self.reports_logprobs,
        }
        answer = self.client.post_json("/generate/", body)
        completions = answer.get("completions")
        if not isinstance(completions, list) or len(completions) != len(prompts):
            raise StudentServerError(
                f"student vLLM server at {self.client.base_url}/generate/ answered "
                f"{type(completions).__name__} for {len(prompts)} prompts"
            )
        if self.reports_logprobs:
            logprobs = answer.get("logprobs")
            if not isinstance(logprobs, list) or [len(row) for row in logprobs] != [len(c) for c in completions]:
                raise StudentServerError(
                    f"student vLLM server at {self.client.base_url}/generate/ sent no log-prob for each sampled token "
                    "(the policy-gradient objective needs them: is it an older protege serve-student?)"
                )
            self.last_logprobs = logprobs
        self.generate_calls += 1
        return completions

    def close(self) -> None:
        self.client.close()
