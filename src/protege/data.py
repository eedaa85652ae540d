"""Datasets in, token ids out: validation, chat templating, truncation and collation.

Two dataset shapes are accepted, as in TRL's dataset formats:

* conversational `messages`: a list of {"role", "content"}; a final assistant turn is the completion, everything
  before it the prompt (a row without a final assistant turn is prompt-only);
* `prompt` / `completion` columns: both strings (plain text, no template) or both message lists (chat template).

Every row is checked before training starts, and a bad row raises a ValueError naming its index and the problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset, IterableDataset

from .losses import IGNORE_INDEX

ROLES = ("system", "user", "assistant", "tool")


def _check_messages(messages: Any, index: int, column: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"row {index}: column '{column}' must be a non-empty list of messages, got {messages!r:.80}")
    for position, message in enumerate(messages):
        where = f"row {index}: {column}[{position}]"
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"{where} must be a dict with 'role' and 'content', got {message!r:.80}")
        if message["role"] not in ROLES:
            raise ValueError(f"{where} has role {message['role']!r}; allowed roles are {ROLES}")
        if not isinstance(message["content"], str):
            raise ValueError(f"{where} content must be a string, got {type(message['content']).__name__}")
        if message["role"] == "system" and position != 0:
            raise ValueError(f"{where} is a system message after the first position")


def split_row(row: dict[str, Any], index: int) -> tuple[str | list[dict], str | list[dict] | None]:
    """The prompt and completion of one row (completion None for a prompt-only row), validated."""
    if "messages" in row and row["messages"] is not None:
        messages = row["messages"]
        _check_messages(messages, index, "messages")
        if len(messages) > 1 and messages[-1]["role"] == "assistant":
            prompt, completion = messages[:-1], [messages[-1]]
        else:
            prompt, completion = messages, None
    elif "prompt" in row:
        prompt, completion = row["prompt"], row.get("completion")
        if isinstance(prompt, list):
            _check_messages(prompt, index, "prompt")
            if completion is not None:
                _check_messages(completion, index, "completion")
                if completion[0]["role"] != "assistant":
                    raise ValueError(
                        f"row {index}: the completion must start with an assistant message, got "
                        f"role {completion[0]['role']!r}"
                    )
        elif isinstance(prompt, str):
            if completion is not None and not isinstance(completion, str):
                raise ValueError(
                    f"row {index}: 'prompt' is a string, so 'completion' must be a string too, got "
                    f"{type(completion).__name__}"
                )
            if not prompt.strip():
                raise ValueError(f"row {index}: the prompt is empty")
            if completion is not None and not completion:
                raise ValueError(f"row {index}: the completion is empty")
        else:
            raise ValueError(
                f"row {index}: 'prompt' must be a string or a list of messages, got {type(prompt).__name__}"
            )
    else:
        raise ValueError(f"row {index}: no 'messages' or 'prompt' column (columns: {sorted(row)})")
    if isinstance(prompt, list):
        if not any(m["role"] == "user" for m in prompt):
            raise ValueError(f"row {index}: the prompt has no user message")
        if prompt[-1]["role"] == "assistant":
            raise ValueError(
                f"row {index}: the prompt ends with an assistant message, so the completion would "
                "continue it; the turn before the completion must be a user or tool message"
            )
        if not any(m["content"].strip() for m in prompt if m["role"] != "system"):
            raise ValueError(f"row {index}: the prompt is empty")
    return prompt, completion


@dataclass
class Tokenizer:
    """Turns validated rows into prompt and completion ids within the configured budgets."""

    tokenizer: Any
    max_prompt_length: int | None
    max_length: int | None

    def _render_prompt(self, prompt: str | list[dict]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        text = self.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _render_completion(self, prompt: str | list[dict], completion: str | list[dict], prompt_ids: list[int]):
        if isinstance(completion, str):
            ids = self.tokenizer(completion, add_special_tokens=False)["input_ids"]
            eos = self.tokenizer.eos_token_id
            return ids if (eos is None or (ids and ids[-1] == eos)) else [*ids, eos]
        text = self.tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        full_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if full_ids[: len(prompt_ids)] != prompt_ids:
            raise ValueError(
                "the chat template does not render the prompt as a prefix of the full conversation, so "
                "the completion cannot be separated from it"
            )
        completion_ids = full_ids[len(prompt_ids) :]
        # Templates often render text after the end-of-turn token (a newline); generation stops at EOS, so do we.
        eos = self.tokenizer.eos_token_id
        if eos in completion_ids:
            completion_ids = completion_ids[: len(completion_ids) - completion_ids[::-1].index(eos)]
        return completion_ids

    def __call__(self, row: dict[str, Any], index: int, needs_completion: bool) -> dict[str, list[int]]:
        prompt, completion = split_row(row, index)
        if completion is None and needs_completion:
            raise ValueError(
                f"row {index} has no completion, but lmbda < 1 trains off-policy slices on dataset "
                "completions; give every row a completion or set lmbda=1.0"
            )
        prompt_ids = self._render_prompt(prompt)
        if not prompt_ids:
            raise ValueError(f"row {index}: the prompt tokenizes to nothing")
        try:
            completion_ids = [] if completion is None else self._render_completion(prompt, completion, prompt_ids)
        except ValueError as error:
            raise ValueError(f"row {index}: {error}") from None
        if self.max_prompt_length is not None:
            prompt_ids = prompt_ids[-self.max_prompt_length :]
        if self.max_length is not None:
            completion_ids = completion_ids[: max(self.max_length - len(prompt_ids), 0)]
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids}


def tokenize_dataset(dataset: Dataset | IterableDataset, tokenizer: Tokenizer, needs_completion: bool):
    """Validate and tokenize every row up front (lazily for an IterableDataset)."""
    columns = dataset.column_names
    if columns is not None and "messages" not in columns and "prompt" not in columns:
        raise ValueError(
            f"the dataset needs a 'messages' column or 'prompt' (and 'completion') columns; it has {columns}"
        )
    return dataset.map(
        lambda row, index: tokenizer(row, index, needs_completion), with_indices=True, remove_columns=columns
    )


def _pad(rows: list[list[int]], value: int, left: bool) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            if left:
                out[i, width - len(r) :] = torch.tensor(r)
            else:
                out[i, : len(r)] = torch.tensor(r)
    return out


def sequence_batch(
    prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, completion_ids: torch.Tensor, completion_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """[left-padded prompt | right-padded completion] rows; labels only on completion tokens.

    `prompt_width` tells the loss where completions start, so only completion positions reach the LM head.
    """
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    return {
        "input_ids": torch.cat([prompt_ids, completion_ids], dim=1),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(dim=1) - 1).clamp(min=0),
        "labels": torch.cat(
            [torch.full_like(prompt_ids, IGNORE_INDEX), completion_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)],
            dim=1,
        ),
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "prompt_width": torch.tensor(prompt_ids.shape[1]),
    }


@dataclass
class DistillationCollator:
    """Collates tokenized rows into the off-policy sequence batch (dataset completions)."""

    pad_token_id: int

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        prompts = [r["prompt_ids"] for r in rows]
        completions = [r["completion_ids"] for r in rows]
        prompt_ids = _pad(prompts, self.pad_token_id, left=True)
        prompt_mask = _pad([[1] * len(p) for p in prompts], 0, left=True)
        completion_ids = _pad(completions, self.pad_token_id, left=False)
        completion_mask = _pad([[1] * len(c) for c in completions], 0, left=False)
        return sequence_batch(prompt_ids, prompt_mask, completion_ids, completion_mask)
