"""Student rollouts: which slices are on-policy, and one batched generation call for all of them.

The decisions are a pure function of (seed, optimizer step), so they are identical on every rank and survive a
checkpoint and resume without any saved state; the trainer still broadcasts rank 0's draw as a guard against ranks
configured with different seeds. Sampling is seeded the same way, from (seed, rank, step) (`sampling_seed`), for
transformers' `generate` as for vLLM, so a resumed run generates exactly what an uninterrupted one does. Sampling from
the process-wide RNG did not: on a resume, transformers restores that RNG from the checkpoint only after the first
step's batches are fetched, and generation runs while they are (in `get_batch_samples`), so the first resumed step
sampled from an unrestored RNG and every later step from the stream one step behind.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Sampler
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from .data import sequence_batch
from .sharding import sharded_across_ranks

SAMPLER_LOGPROBS = "sampler_logprobs"  # (B, C) batch entry: each sampled token's log-prob as the generator reported it


def draw_on_policy(lmbda: float, num_slices: int, seed: int, step: int) -> list[bool]:
    """Which of a step's slices are on-policy: each independently with probability `lmbda`."""
    draws = np.random.default_rng([seed, step]).random(num_slices)
    return [bool(u < lmbda) for u in draws]


def sampling_seed(seed: int, process_index: int, step: int) -> int:
    """The seed of one rank's sampling at one optimizer step: runs repeat, resumed or not, and ranks differ."""
    return int(np.random.default_rng([seed, process_index, step]).integers(2**31))


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Draws inside come from `seed` alone (on the CPU and on `device`), and the process's RNG continues afterwards as
    if they had not been made: generation does not move the random streams the rest of training uses."""
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            yield
        return
    module = torch.get_device_module(device.type)
    with torch.random.fork_rng(devices=[device], device_type=device.type):
        torch.random.default_generator.manual_seed(seed)
        with module.device(device) if hasattr(module, "device") else nullcontext():  # that device's generator
            module.manual_seed(seed)
        yield


def completion_lengths(tokens: torch.Tensor, eos_token_ids: list[int]) -> torch.Tensor:
    """Length of each generated row up to and including its first EOS (the full width when it has none)."""
    width = tokens.shape[1]
    is_eos = torch.isin(tokens, torch.tensor(eos_token_ids, device=tokens.device))
    positions = torch.arange(1, width + 1, device=tokens.device).expand_as(tokens)
    return torch.where(is_eos, positions, width + 1).min(dim=1).values.clamp(max=width)


def left_pad_to(ids: torch.Tensor, mask: torch.Tensor, width: int, pad_token_id: int):
    extra = width - ids.shape[1]
    return F.pad(ids, (extra, 0), value=pad_token_id), F.pad(mask, (extra, 0), value=0)


@dataclass
class Rollout:
    """Sequences generated for one slice, in the trainer's batch layout, plus what metrics need."""

    batch: dict[str, torch.Tensor]
    lengths: torch.Tensor
    truncated: torch.Tensor


class SampledLogprobs(LogitsProcessor):
    """The log-prob, under the distribution sampled from, of each token `generate` samples: run last, after the
    warpers, it keeps the step's log-softmax and reads the sampled token from the next step's `input_ids` (memory of
    one step's (B, V), where `output_scores` would hold every step's).

    The values go into one (B, `max_new_tokens`) buffer: a small tensor kept from each step lands in glibc's heap
    among the (B, V) blocks the steps free and pins them, so that the heap grew by about a (B, V) block a step (GiBs
    over thousands of tokens at a vocabulary of 151,936, docs/benchmarks.md)."""

    def __init__(self, max_new_tokens: int | None = None) -> None:
        self.capacity = max(max_new_tokens or 0, 1)
        self.previous: torch.Tensor | None = None
        self.values: torch.Tensor | None = None  # (B, capacity), the first `count` columns written
        self.count = 0

    def _store(self, value: torch.Tensor) -> None:
        if self.values is None:
            self.values = value.new_zeros((value.shape[0], self.capacity))
        elif self.count == self.values.shape[1]:  # more steps than max_new_tokens said: grow (not in `generate`)
            self.values = torch.cat([self.values, torch.zeros_like(self.values)], dim=1)
        self.values[:, self.count] = value
        self.count += 1

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:
            self._store(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = scores.float().log_softmax(-1)
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """(B, W) log-probs of `new_tokens`, the tokens generated (-inf where a finished row was padded)."""
        width = new_tokens.shape[1]
        if self.previous is not None and self.count < width:
            self._store(self.previous.gather(1, new_tokens[:, self.count : self.count + 1]).squeeze(1))
        if self.values is None or width == 0:
            return new_tokens.new_zeros(new_tokens.shape, dtype=torch.float32)
        return self.values[:, : min(width, self.count)].clone()


def recording_generation(generation_config: GenerationConfig) -> tuple[GenerationConfig, LogitsProcessorList]:
    """`generation_config` with its sampling warpers moved into a processor list that ends in a `SampledLogprobs`:
    transformers appends its own warpers after the caller's processors, so this is how the recorder sees the final
    distribution. The warpers run in transformers' order, so the same tokens are drawn."""
    extra = [name for name in ("typical_p", "epsilon_cutoff", "eta_cutoff", "top_h") if _warps(generation_config, name)]
    if extra:
        raise ValueError(
            f"on_policy_objective='policy_gradient' records the sampler's log-probs after temperature, top_k, top_p "
            f"and min_p only; generation_kwargs sets {extra}, which it cannot record: drop them"
        )
    config = GenerationConfig.from_dict(generation_config.to_dict())
    warpers = []
    if config.temperature is not None and config.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(config.temperature))
    if config.top_k:
        warpers.append(TopKLogitsWarper(top_k=config.top_k))
    if config.top_p is not None and config.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=config.top_p))
    if config.min_p is not None:
        warpers.append(MinPLogitsWarper(min_p=config.min_p))
    config.temperature, config.top_k, config.top_p, config.min_p = 1.0, 0, 1.0, None
    return config, LogitsProcessorList([*warpers, SampledLogprobs(config.max_new_tokens)])


def _warps(config: GenerationConfig, name: str) -> bool:
    value = getattr(config, name, None)
    return value is not None and (name == "top_h" or 0.0 < value < 1.0)


def model_generate(model: torch.nn.Module, generation_config, seed: int, record_logprobs: bool = False):
    """`generate(prompt_ids, prompt_mask)` with transformers' `model.generate`, sampling from `seed`: the new tokens
    (B, W), right-padded, and with `record_logprobs` each one's log-prob under the distribution it was drawn from
    (else None)."""

    @torch.no_grad()
    def generate(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
        config, processors = generation_config, None
        if record_logprobs:
            config, processors = recording_generation(generation_config)
        was_training = model.training
        model.eval()
        try:
            with seeded(seed, prompt_ids.device):
                output = model.generate(
                    input_ids=prompt_ids,
                    attention_mask=prompt_mask,
                    generation_config=config,
                    logits_processor=processors,
                    synced_gpus=sharded_across_ranks(model),
                )
        finally:
            model.train(was_training)
        new_tokens = output[:, prompt_ids.shape[1] :]
        return new_tokens, processors[-1].finish(new_tokens) if processors is not None else None

    return generate


def vllm_generate(engine, model: torch.nn.Module, step: int, pad_token_id: int):
    """`generate(prompt_ids, prompt_mask)` with a vLLM engine, colocated (`vllm_colocate.VLLMColocate`) or a
    `protege serve-student` server (`vllm_server.VLLMServer`), which first gets the student's current weights: the new
    tokens (B, W), right-padded."""

    def generate(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
        prompts = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask)]
        completions = engine.generate(model, prompts, step)
        width = max(1, max(len(c) for c in completions))
        out = torch.full((len(completions), width), pad_token_id, dtype=torch.long)
        reported = getattr(engine, "last_logprobs", None)  # each sampled token's log-prob, where the engine gives it
        logprobs = None if reported is None else torch.full((len(completions), width), -math.inf)
        for row, tokens in enumerate(completions):
            out[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            if logprobs is not None:
                logprobs[row, : len(tokens)] = torch.tensor(reported[row], dtype=torch.float32)
        device = prompt_ids.device
        return out.to(device), None if logprobs is None else logprobs.to(device)

    return generate


def generate_slices(
    slices: list[dict[str, torch.Tensor]], generate, eos_token_ids: list[int], pad_token_id: int, max_new_tokens: int
) -> list[Rollout]:
    """Generate completions for every slice's prompts in one `generate(prompt_ids, prompt_mask)` call (the new
    tokens, right-padded, and their sampler log-probs or None), then split them back by slice; the log-probs ride in
    each slice's batch as `SAMPLER_LOGPROBS`."""
    width = max(s["prompt_ids"].shape[1] for s in slices)
    padded = [left_pad_to(s["prompt_ids"], s["prompt_mask"], width, pad_token_id) for s in slices]
    generated, logprobs = generate(torch.cat([p[0] for p in padded]), torch.cat([p[1] for p in padded]))
    lengths = completion_lengths(generated, eos_token_ids)
    rollouts, start = [], 0
    for s in slices:
        rows = slice(start, start + s["prompt_ids"].shape[0])
        start = rows.stop
        slice_lengths = lengths[rows]
        keep = int(slice_lengths.max()) if slice_lengths.numel() else 0
        completion_ids = generated[rows, :keep].clone()
        completion_mask = (torch.arange(keep, device=generated.device) < slice_lengths.unsqueeze(1)).long()
        completion_ids = completion_ids.masked_fill(completion_mask == 0, pad_token_id)
        batch = sequence_batch(s["prompt_ids"], s["prompt_mask"], completion_ids, completion_mask)
        if logprobs is not None:
            batch[SAMPLER_LOGPROBS] = logprobs[rows, :keep].masked_fill(completion_mask == 0, 0.0)
        # A row truncated at the limit has no EOS; a row ending in EOS exactly at the limit is complete.
        ends_in_eos = torch.isin(
            generated[rows, :].gather(1, (slice_lengths - 1).clamp(min=0).unsqueeze(1)),
            torch.tensor(eos_token_ids, device=generated.device),
        ).squeeze(1)
        truncated = (slice_lengths >= max_new_tokens) & ~ends_in_eos
        rollouts.append(Rollout(batch, slice_lengths, truncated))
    return rollouts


class RepeatSampler(Sampler):
    """Shuffled indices, each repeated `repeats` times in a row (num_generations completions per prompt)."""

    def __init__(self, size: int, repeats: int, seed: int):
        self.size, self.repeats, self.seed, self.epoch = size, repeats, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        for index in order.tolist():
            yield from [index] * self.repeats

    def __len__(self) -> int:
        return self.size * self.repeats


def generation_config(args, model, tokenizer, suppressed_ids: list[int]) -> tuple[GenerationConfig, list[int]]:
    """transformers' sampling for on-policy slices, from the config (`generation_kwargs` override its fields), and the
    stop ids: the model's generation config's and the tokenizer's EOS. `suppressed_ids` are never sampled."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
    options = dict(args.generation_kwargs or {})
    if suppressed_ids:
        options["suppress_tokens"] = sorted({*(options.get("suppress_tokens") or []), *suppressed_ids})
    config = GenerationConfig(
        max_new_tokens=args.max_completion_length,
        do_sample=True,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_ids,
        use_cache=True,
        **options,
    )
    return config, eos_ids
