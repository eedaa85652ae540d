"""Sharding engines (FSDP, DeepSpeed) as protege meets them: the engine asked for must be the one that runs."""

from __future__ import annotations

import os


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
    """Stop, in one line, where FSDP or DeepSpeed was asked for but accelerate built something else.

    accelerate enables either engine only for processes on an accelerator device launched together (torchrun or
    `accelerate launch`); elsewhere it trains with DDP or on one process, silently, and transformers keeps that
    silence. A user who asked for a sharded run would then hold full weights and optimizer states on every rank.
    """
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
