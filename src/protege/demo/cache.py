"""The trained teacher and warmed-up student kept on disk between runs, each under a fingerprint of everything that
made it, so a second run skips their training and a run with other settings does not reuse them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .settings import ModelSpec, Settings, SFTSpec
from .tasks import get_task

META_FILE = "demo.json"
OPTIMIZER_FILE = "optimizer.pt"


@dataclass
class Cached:
    """A model loaded from its cache folder, what its training recorded, and its AdamW state if one was kept."""

    model: Any
    info: dict[str, Any]
    optimizer_state: dict[str, Any] | None


def model_fingerprint(role: str, spec: ModelSpec, sft: SFTSpec, settings: Settings, seed: int) -> dict[str, Any]:
    """Everything the model's training depends on; the task's `version` is bumped when its data or format changes (or
    the tokenizer's), so that old caches are not reused."""
    return {
        "role": role,
        "task": settings.task,
        "task_version": get_task(settings.task, settings.digits).version,
        "digits": settings.digits,
        "model": asdict(spec),
        "sft": asdict(sft),
        "seed": seed,
    }


def load_cached(folder: Path, fingerprint: dict[str, Any]) -> Cached | None:
    """The model cached in `folder` if it was made with the same fingerprint; None when absent, stale or unreadable."""
    from transformers import GPT2LMHeadModel

    meta = folder / META_FILE
    if not meta.exists():
        return None
    try:
        saved = json.loads(meta.read_text())
        if saved.get("fingerprint") != fingerprint:
            return None
        model = GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32)
        state = torch.load(folder / OPTIMIZER_FILE) if keeps_optimizer(fingerprint) else None
    except (OSError, ValueError, RuntimeError):
        return None
    model.eval()
    return Cached(model, saved, state)


def keeps_optimizer(fingerprint: dict[str, Any]) -> bool:
    """Whether the model's AdamW state is cached with it: only for training that stops at an accuracy (the addition
    student's warm-up, which distillation continues). Read from the fingerprint, not from the file's presence: a
    folder that held another task's student keeps that student's optimizer.pt, whose shapes do not fit."""
    return fingerprint["sft"]["stop_at_accuracy"] is not None


def save_cached(
    folder: Path,
    model,
    tokenizer,
    fingerprint: dict[str, Any],
    info: dict[str, Any],
    optimizer_state: dict[str, Any] | None,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if optimizer_state is not None:
        torch.save(optimizer_state, folder / OPTIMIZER_FILE)
    else:
        (folder / OPTIMIZER_FILE).unlink(missing_ok=True)
    (folder / META_FILE).write_text(json.dumps({"fingerprint": fingerprint, **info}, indent=2))
