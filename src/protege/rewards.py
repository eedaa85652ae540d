"""Task rewards for the policy-gradient objective: the user's reward functions called as TRL's GRPOTrainer calls them,
their answers checked (one line naming the function and the dataset row), weighted, and turned into each completion's
advantage over its group (`policy_gradient.group_advantages`)."""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .data import ROW_COLUMNS_KEY, ROW_INDEX, split_row

RewardFunc = Callable[..., list]


class RewardFunctionError(ValueError):
    """A reward function raised or returned something that is not one finite number (or None) per completion."""


def reward_name(func: Any) -> str:
    """A reward function's name as the metrics and errors show it."""
    if isinstance(func, str):
        return func.rpartition(":")[2]
    return getattr(func, "__name__", type(func).__name__)


def resolve_reward_funcs(funcs: RewardFunc | str | Sequence[RewardFunc | str] | None) -> list[RewardFunc]:
    """Callables from callables or 'module:function' import paths (one, or a list)."""
    if funcs is None:
        return []
    if callable(funcs) or isinstance(funcs, str):
        funcs = [funcs]
    resolved = []
    for index, func in enumerate(funcs):
        if isinstance(func, str):
            module_name, _, attribute = func.partition(":")
            if not module_name or not attribute:
                raise ValueError(f"reward_funcs[{index}]={func!r} must be an import path 'module:function'")
            try:
                func = getattr(_import_here(module_name), attribute)
            except (ImportError, AttributeError) as error:
                raise ValueError(f"reward_funcs[{index}]={func!r} cannot be imported: {error}") from None
        if not callable(func):
            raise TypeError(f"reward_funcs[{index}] must be callable, got {type(func).__name__}")
        resolved.append(func)
    return resolved


def _import_here(module_name: str):
    """The module, found on sys.path or in the working directory (as `python -m` would: a console script like
    `protege train` does not put the working directory on sys.path)."""
    here = os.getcwd()
    if here in sys.path:
        return importlib.import_module(module_name)
    sys.path.insert(0, here)
    try:
        return importlib.import_module(module_name)
    finally:
        sys.path.remove(here)


@dataclass
class Completions:
    """A step's on-policy completions, as the reward functions receive them."""

    prompts: list  # each row's prompt as the dataset gives it (text, or a list of messages)
    completions: list  # decoded text, or [{"role": "assistant", "content": text}] for conversational prompts
    completion_ids: list[list[int]]
    columns: dict[str, list]  # the dataset's other columns
    rows: list[int]  # the dataset row of each completion


def completions_of(batches: list[dict], tokenizer) -> Completions:
    """The on-policy slices' completions with their dataset rows (each batch's `ROW_COLUMNS_KEY`), in slice order."""
    from .losses import IGNORE_INDEX

    ids, raw = [], {}
    for batch in batches:
        width = int(batch["prompt_width"])
        trained = batch["labels"][:, width:] != IGNORE_INDEX
        ids += [row[keep].tolist() for row, keep in zip(batch["input_ids"][:, width:], trained)]
        for name, values in batch[ROW_COLUMNS_KEY].items():
            raw.setdefault(name, []).extend(values)
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    rows = list(raw.pop(ROW_INDEX))
    prompts = []
    for position, index in enumerate(rows):
        prompt, _ = split_row({name: values[position] for name, values in raw.items()}, index)
        prompts.append(prompt)
    completions = [
        [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
        for prompt, text in zip(prompts, texts)
    ]
    columns = {name: values for name, values in raw.items() if name not in ("prompt", "completion")}
    return Completions(prompts, completions, ids, columns, rows)


def call_reward(func: RewardFunc, batch: Completions, trainer_state: Any) -> list[float]:
    """One function's rewards for every completion (NaN where it returned None), or a `RewardFunctionError` naming it
    and the dataset row at fault (a function that raises is called again row by row to find it)."""
    name = reward_name(func)
    try:
        values = _call(func, batch, range(len(batch.rows)), trainer_state)
    except Exception as error:
        for position in range(len(batch.rows)):
            try:
                _call(func, batch, [position], trainer_state)
            except Exception as row_error:
                raise RewardFunctionError(
                    f"reward function {name!r} raised on dataset row {batch.rows[position]}: "
                    f"{type(row_error).__name__}: {row_error}"
                ) from row_error
        raise RewardFunctionError(
            f"reward function {name!r} raised on the step's {len(batch.rows)} completions (dataset rows "
            f"{batch.rows}), though on none alone: {type(error).__name__}: {error}"
        ) from error
    if not isinstance(values, (list, tuple)) or len(values) != len(batch.rows):
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else f"a {type(values).__name__}"
        raise RewardFunctionError(
            f"reward function {name!r} returned {got} for {len(batch.rows)} completions (dataset rows {batch.rows}); "
            "it must return a list with one float (or None) per completion"
        )
    rewards = []
    for position, value in enumerate(values):
        if value is None:
            rewards.append(math.nan)
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RewardFunctionError(
                f"reward function {name!r} returned {value!r} for dataset row {batch.rows[position]}; a reward must "
                "be a finite number, or None where the function does not apply"
            )
        rewards.append(float(value))
    return rewards


def _call(func: RewardFunc, batch: Completions, positions, trainer_state: Any):
    positions = list(positions)
    return func(
        prompts=[batch.prompts[p] for p in positions],
        completions=[batch.completions[p] for p in positions],
        completion_ids=[batch.completion_ids[p] for p in positions],
        trainer_state=trainer_state,
        **{name: [values[p] for p in positions] for name, values in batch.columns.items()},
    )


def weighted_rewards(per_func: torch.Tensor, weights: Sequence[float] | None) -> torch.Tensor:
    """The completions' rewards (N,) from each function's (N, F): the weighted sum of the functions that applied (a
    function's None is left out, as TRL's nansum; a completion no function scored gets 0)."""
    weight = torch.tensor(list(weights) if weights is not None else [1.0] * per_func.shape[1], dtype=per_func.dtype)
    return (per_func * weight).nansum(dim=1)
