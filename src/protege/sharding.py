"""Sharding engines (FSDP, DeepSpeed) as protege meets them: the engine asked for must be the one that runs, and an
LM head that the engine holds in pieces is made whole before the loss applies it outside the model's forward.

Why an unshard and not a gather inside autograd: under FSDP2 the head's weight is a sharded `DTensor` outside the
forward of the module that owns it (always so when `reshard_after_forward=True` reaches the root module, as accelerate
passes it). `FSDPModule.unshard()` puts the module's full parameters back in place, so the loss multiplies by the same
tensor the model's forward would have used, and its gradient accumulates on that unsharded parameter; FSDP's own
post-backward (run for every group at the end of backward) then reduce-scatters it with its own averaging, reduce
dtype and gradient-accumulation rules (no reduction in `no_sync` micro-batches), and reshards. `DTensor.full_tensor()`
would instead send the gradient back as a local slice (no reduction over ranks) or, with a `Partial` gradient
placement, as a sum reduced on every micro-batch, outside those rules. Peak memory: one full (V x H) head, as DDP
holds all the time; never (tokens x vocabulary) logits.

Under DeepSpeed ZeRO-3 the head's weight is a 0-element placeholder outside the forward. `deepspeed.zero.
GatheredParameters` gathers it for reading only (it is partitioned again when the block ends, and the loss's backward
comes later), so the loss gets a full copy made while it is gathered, through an autograd function whose backward
hands the copy's gradient to the parameter itself, gathered again for that moment (autograd accumulates a gradient
only into a parameter of its shape) and partitioned when the backward ends; DeepSpeed's own hook on the parameter's
gradient accumulation then reduce-scatters it into its partition, as for any parameter used in a forward. Peak memory:
one full head copy per call, as above, and the whole head again during the backward.

FSDP1 (`FullyShardedDataParallel`) is refused (`FSDP1_REFUSAL`). Outside the forward, its original parameters are
views of each rank's slice of a flat parameter (the head's weight is 1-D), and no public call gives the whole head
with gradients that FSDP1 then reduces: `summon_full_params` gives a copy whose gradients reach no shard. Applying the
head, or reading the decoder's output, outside the root's forward also breaks FSDP1's backward, whose root hooks run
only for a loss computed from the root's own output (seen on CPU: "expected to be in states [FORWARD_BACKWARD] but
current state is IDLE"), and transformers' `generate` on the unwrapped model reads the root's sharded embedding
("'weight' must be 2-D"). FSDP2 has none of these problems.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

FSDP1_REFUSAL = (
    "FSDP1 (fsdp_version 1) is not supported: protege applies the LM head outside the model's forward and generates "
    "with transformers' generate, which FSDP1's flat parameters do not allow; use FSDP2 (fsdp_version: 2)"
)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def engines_asked(args) -> list[str]:
    """The sharding engines the settings or the launcher ask for: "FSDP" and/or "DeepSpeed"."""
    asked = []
    if getattr(args, "fsdp_plugin_args", None) is not None or _env_flag("ACCELERATE_USE_FSDP"):
        asked.append("FSDP")
    if (
        getattr(args, "deepspeed", None)
        or getattr(args, "deepspeed_plugin", None)
        or _env_flag("ACCELERATE_USE_DEEPSPEED")
    ):
        asked.append("DeepSpeed")
    return asked


def check_engine(args, accelerator, fsdp_enabled: bool, deepspeed_enabled: bool) -> None:
    """Stop, in one line, where FSDP or DeepSpeed was asked for but accelerate built something else, or where it
    built FSDP1 (see the module docstring).

    accelerate enables either engine only for processes on an accelerator device launched together (torchrun or
    `accelerate launch`); elsewhere it trains with DDP or on one process, silently, and transformers keeps that
    silence. A user who asked for a sharded run would then hold full weights and optimizer states on every rank.
    """
    if fsdp_enabled and getattr(getattr(accelerator.state, "fsdp_plugin", None), "fsdp_version", 2) == 1:
        raise RuntimeError(FSDP1_REFUSAL)
    running = {"FSDP": fsdp_enabled, "DeepSpeed": deepspeed_enabled}
    missing = [engine for engine in engines_asked(args) if not running[engine]]
    if not missing:
        return
    state = accelerator.state
    if accelerator.device.type == "cpu":
        why = "accelerate enables it only on GPU (or other accelerator) processes, and this run is on CPU"
    elif accelerator.num_processes == 1 and "LOCAL_RANK" not in os.environ:
        why = "accelerate enables it only for processes started by torchrun or accelerate launch"
    else:
        why = f"accelerate set up {state.distributed_type.value} instead"
    fallback = "DDP" if accelerator.num_processes > 1 else "one unsharded process"
    raise RuntimeError(
        f"{' and '.join(missing)} was asked for (settings or accelerate config), but {why}: the run would train with "
        f"{fallback}. Launch on GPUs with accelerate launch, or drop the {' and '.join(missing)} settings."
    )


def _owner(model: nn.Module, head: nn.Module) -> nn.Module | None:
    """The FSDP2 module whose parameter group holds `head`'s weight: the innermost `fully_shard`-ed module among
    `head` and its ancestors (a module's group takes the parameters no nested `fully_shard` took first)."""
    from torch.distributed.fsdp import FSDPModule

    path = next((name for name, module in model.named_modules() if module is head), None)
    if path is None:
        return None
    parts = path.split(".") if path else []
    for depth in range(len(parts), -1, -1):
        module = model.get_submodule(".".join(parts[:depth]))
        if isinstance(module, FSDPModule):
            return module
    return None


@dataclass(frozen=True)
class GatheredHead:
    """A ZeRO-3 head's full weight and bias, copied while gathered; gradients reach the partitioned parameters."""

    weight: torch.Tensor
    bias: torch.Tensor | None


class _GatheredCopy(torch.autograd.Function):
    """A copy of a parameter applied while DeepSpeed holds it whole; the copy's gradient is the parameter's. autograd
    accumulates a gradient into a parameter of the parameter's present shape, so the backward gathers it again (a
    collective, at the same point of every rank's backward) and partitions it once the whole backward has run."""

    @staticmethod
    def forward(ctx, parameter: torch.Tensor) -> torch.Tensor:
        ctx.parameter = parameter
        return parameter.detach().clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        parameter = ctx.parameter
        if parameter.ds_status == ZeroParamStatus.NOT_AVAILABLE:
            parameter.all_gather(param_list=[parameter])

            def release() -> None:
                # A tied head's embedding may have been taken up by its own module's backward since: DeepSpeed then
                # releases it with that module, and refuses a release here.
                if not parameter.ds_active_sub_modules:
                    parameter.partition(param_list=[parameter], has_been_updated=False)

            torch.autograd.Variable._execution_engine.queue_callback(release)
        return grad


def _zero3_copy(parameter: torch.Tensor | None) -> torch.Tensor | None:
    """The full value of a ZeRO-3 parameter, gathered from every rank (a collective), linked to it for autograd."""
    if parameter is None:
        return None
    with _zero3_gathered(parameter):
        return _GatheredCopy.apply(parameter)


def _zero3_gathered(parameter: torch.Tensor):
    """A ZeRO-3 parameter held whole for the block: gathered from every rank (a collective), or left as it is where
    DeepSpeed already holds it whole (a tied LM head's embedding, kept for the head's forward that protege never
    runs; gathering and releasing it there makes DeepSpeed refuse to free a parameter still active in a module)."""
    import contextlib

    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if parameter.ds_status == ZeroParamStatus.AVAILABLE:
        return contextlib.nullcontext()
    return deepspeed.zero.GatheredParameters([parameter], modifier_rank=None)


def whole_head(model: nn.Module, head: nn.Module) -> nn.Module | GatheredHead:
    """`head` with its full weight in place: unsharded through its FSDP2 owner when the weight is a sharded `DTensor`,
    or a gathered copy of a DeepSpeed ZeRO-3 head (see the module docstring); as it is otherwise (one process, DDP, or
    an FSDP2 root that kept it unsharded). An FSDP1 head is refused."""
    weight = head.weight
    if getattr(weight, "ds_id", None) is not None:  # a DeepSpeed ZeRO-3 parameter (0 elements outside forward)
        return GatheredHead(_zero3_copy(weight), _zero3_copy(head.bias))
    if getattr(weight, "_fsdp_flattened", False):  # FSDP1's mark on the parameters it flattened
        raise RuntimeError(FSDP1_REFUSAL)
    from torch.distributed.tensor import DTensor

    if not isinstance(weight, DTensor):
        return head
    owner = _owner(model, head)
    if owner is not None:
        owner.unshard()
    if owner is None or isinstance(head.weight, DTensor):
        raise RuntimeError(
            "the LM head's weight is sharded by FSDP2 outside the model's forward and no fully_shard-ed module "
            "around it could unshard it (a head tied to a separately sharded embedding?); shard the head with its "
            "model's root module, or set loss_chunk_size=None"
        )
    return head


def sharded_across_ranks(model: nn.Module) -> bool:
    """Whether `model` holds parameters sharded across a group of several ranks, by FSDP2 or DeepSpeed ZeRO-3 (its
    parameters carry `ds_id`): every forward then gathers them from all ranks, so a rank that has finished generating
    must keep stepping until all have (transformers' `synced_gpus`), or the others wait for it forever. protege passes
    `synced_gpus` itself, which overrides transformers' own guess."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return False
    from torch.distributed.fsdp import FSDPModule

    if any(hasattr(parameter, "ds_id") for parameter in model.parameters()):
        return True
    return any(isinstance(module, FSDPModule) for module in model.modules())


def full_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """`model`'s state dict with every sharded tensor whole: an FSDP2 `DTensor` through `full_tensor`, a ZeRO-3
    parameter gathered and copied. One tensor at a time, in the state dict's order on every rank (each gather is a
    collective), so a weight push holds one full tensor beyond the shards, never a second copy of the model."""
    from torch.distributed.tensor import DTensor

    parameters = dict(model.named_parameters(remove_duplicate=False))  # tied weights under each of their names
    for name, tensor in model.state_dict().items():
        parameter = parameters.get(name)
        if parameter is not None and getattr(parameter, "ds_id", None) is not None:
            with _zero3_gathered(parameter):
                tensor = parameter.detach().clone()
        elif isinstance(tensor, DTensor):
            tensor = tensor.full_tensor()
        yield name, tensor
