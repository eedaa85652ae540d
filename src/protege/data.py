"""Datasets in, token ids out: validation, chat templating, truncation and collation.

Two dataset shapes are accepted, as in TRL's dataset formats:

* conversational `messages`: a list of {"role", "content"}; a final assistant turn is the completion, everything
  before it the prompt (a row without a final assistant turn is prompt-only);
* `prompt` / `completion` columns: both strings (plain text, no template) or both message lists (chat template).

Every row is checked before training starts, and a bad row raises a ValueError naming its index and the problem.
Conversations follow the role order chat templates are written for (`ORDER_RULE`), since a template renders a
misordered conversation without complaint and the completion the author meant can end up in the prompt.

Truncation is explicit (`Tokenizer`): a prompt over its budget is cut as `prompt_truncation` says (by default in the
middle, keeping the template's start and the question's end), a completion over what `max_length` leaves is cut at the
end without an EOS (it trains as unfinished text), both are marked in the row (`prompt_tokens_cut`,
`completion_tokens_cut`), and `tokenize_dataset` reports them in one warning with counts. Rows that no truncation
shortens but that cannot fit a known limit (`SequenceLimit`: a teacher server's max_model_len, a model's positions)
are refused at start, naming the row, instead of failing at the step that meets them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from datasets import Dataset, IterableDataset

from .choices import PROMPT_TRUNCATIONS
from .losses import IGNORE_INDEX
from .routing import INDEX_KEY, TeacherColumn

ROLES = ("system", "user", "assistant", "tool")
ORDER_RULE = (
    "a conversation is an optional system message, then user and assistant turns alternating from a user turn, "
    "with tool messages only right after an assistant message or another tool message"
)
_NEXT_ROLES = {None: ("user",), "user": ("assistant",), "assistant": ("user", "tool"), "tool": ("tool", "assistant")}


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


def _check_order(conversation: list[tuple[str, dict]], index: int) -> None:
    """Refuse role orders such as [assistant, user] or [user, user]: templates render them silently, and the first
    hides the intended completion in the prompt."""
    previous = None
    for where, message in conversation:
        role = message["role"]
        if role == "system":  # first position only, checked already
            continue
        if role not in _NEXT_ROLES[previous]:
            after = "before any user message" if previous is None else f"right after role {previous!r}"
            hint = " (merge them into one message)" if role == previous else ""
            raise ValueError(f"row {index}: {where} has role {role!r} {after}{hint}; {ORDER_RULE}")
        previous = role


def _check_completion(completion: list[tuple[str, dict]], index: int) -> None:
    """A message completion ends with an assistant turn and says something, as a plain completion must."""
    where, last = completion[-1]
    if last["role"] != "assistant":
        raise ValueError(
            f"row {index}: the completion ends with a {last['role']!r} message ({where}); it must end with an "
            "assistant turn to be distilled"
        )
    for where, message in completion:
        if message["role"] == "assistant" and not message["content"].strip() and not message.get("tool_calls"):
            raise ValueError(f"row {index}: the completion is empty: {where} (assistant) has no content")


def split_row(row: dict[str, Any], index: int) -> tuple[str | list[dict], str | list[dict] | None]:
    """The prompt and completion of one row (completion None for a prompt-only row), validated."""
    conversation: list[tuple[str, dict]] = []
    completion_turns: list[tuple[str, dict]] = []
    if row.get("messages") is not None:
        messages = row["messages"]
        _check_messages(messages, index, "messages")
        conversation = [(f"messages[{i}]", m) for i, m in enumerate(messages)]
        if len(messages) > 1 and messages[-1]["role"] == "assistant":
            prompt, completion = messages[:-1], [messages[-1]]
            completion_turns = conversation[-1:]
        else:
            prompt, completion = messages, None
    elif row.get("prompt") is not None:
        prompt, completion = row["prompt"], row.get("completion")
        if isinstance(prompt, list):
            _check_messages(prompt, index, "prompt")
            conversation = [(f"prompt[{i}]", m) for i, m in enumerate(prompt)]
            if completion is not None:
                _check_messages(completion, index, "completion")
                if completion[0]["role"] != "assistant":
                    raise ValueError(
                        f"row {index}: the completion must start with an assistant message, got "
                        f"role {completion[0]['role']!r}"
                    )
                completion_turns = [(f"completion[{i}]", m) for i, m in enumerate(completion)]
                conversation += completion_turns
        elif isinstance(prompt, str):
            if completion is not None and not isinstance(completion, str):
                raise ValueError(
                    f"row {index}: 'prompt' is a string, so 'completion' must be a string too, got "
                    f"{type(completion).__name__}"
                )
            if not prompt.strip():
                raise ValueError(f"row {index}: the prompt is empty")
            if completion is not None and not completion.strip():
                raise ValueError(f"row {index}: the completion is empty")
        else:
            raise ValueError(
                f"row {index}: 'prompt' must be a string or a list of messages, got {type(prompt).__name__}"
            )
    else:
        present = [repr(column) for column in ("messages", "prompt") if column in row]
        if present:
            raise ValueError(
                f"row {index}: {' and '.join(present)} {'is' if len(present) == 1 else 'are'} None; a row needs a "
                "list of messages in 'messages', or a 'prompt' (and a 'completion')"
            )
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
        _check_order(conversation, index)
    if completion_turns:
        _check_completion(completion_turns, index)
    return prompt, completion


@dataclass(frozen=True)
class SequenceLimit:
    """The longest sequence something in the run accepts, and what that is (named in errors)."""

    tokens: int
    source: str


def _max_positions(model: Any) -> int | None:
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def sequence_limit(
    max_length: int | None, server_max_model_len: int | None = None, models: dict[str, Any] | None = None
) -> SequenceLimit | None:
    """The smallest limit known before training, so an over-long row fails at start rather than at its step.

    A teacher server's max_model_len is hard (it refuses longer sequences), so it always counts. A model's
    max_position_embeddings counts only with max_length=None: rotary models often run past it, and an explicit
    max_length is the user's word on what fits.
    """
    limits = []
    if isinstance(server_max_model_len, int) and server_max_model_len > 0:
        limits.append(SequenceLimit(server_max_model_len, "the teacher server's max_model_len"))
    if max_length is None:
        for name, model in (models or {}).items():
            positions = _max_positions(model)
            if positions is not None:
                limits.append(SequenceLimit(positions, f"the {name}'s max_position_embeddings"))
    return min(limits, key=lambda limit: limit.tokens, default=None)


def cut_prompt(ids: list[int], budget: int, mode: str) -> list[int]:
    """`ids` shortened to `budget` tokens: 'middle' keeps the first and last halves (a template's start, with BOS and
    system prompt, and its end, with the question and the assistant header); 'left' keeps the end."""
    if len(ids) <= budget:
        return ids
    if mode == "left":
        return ids[len(ids) - budget :]
    tail = budget // 2
    return ids[: budget - tail] + ids[len(ids) - tail :]


@dataclass
class Tokenizer:
    """Turns validated rows into prompt and completion ids within the configured budgets (see the module docstring).

    `max_completion_length` and `limit` only serve the start-up check of rows against a known `SequenceLimit`.
    """

    tokenizer: Any
    max_prompt_length: int | None
    max_length: int | None
    prompt_truncation: str = "middle"
    max_completion_length: int | None = None
    limit: SequenceLimit | None = None
    teachers: TeacherColumn | None = None  # several teachers: which one each row names
    teacher_tokenizers: tuple | None = None  # teachers of other tokenizers, by teacher index: each row's own rendering

    def __post_init__(self) -> None:
        if self.prompt_truncation not in PROMPT_TRUNCATIONS:
            raise ValueError(f"prompt_truncation={self.prompt_truncation!r} is not one of {PROMPT_TRUNCATIONS}")

    @property
    def prompt_budget(self) -> int | None:
        """Prompt tokens allowed: max_prompt_length, and at most max_length - 1 so a completion keeps a token."""
        budgets = [self.max_prompt_length, None if self.max_length is None else self.max_length - 1]
        return min((b for b in budgets if b is not None), default=None)

    def budget_name(self) -> str:
        budget = self.prompt_budget
        if self.max_prompt_length is not None and budget == self.max_prompt_length:
            return f"max_prompt_length={budget}"
        return f"max_length - 1 = {budget}"

    def _render_prompt(self, prompt: str | list[dict], tokenizer: Any = None) -> list[int]:
        tokenizer = tokenizer or self.tokenizer
        if isinstance(prompt, str):
            return tokenizer(prompt, add_special_tokens=False)["input_ids"]
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

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

    def __call__(
        self,
        row: dict[str, Any],
        index: int,
        needs_completion: bool,
        uses_completion: bool = True,
        on_policy: bool = False,
    ) -> dict[str, Any]:
        """One row's ids and how many tokens each part lost. `needs_completion`: a row without one is an error;
        `uses_completion` / `on_policy`: which sequences the row can become, for the check against `limit`."""
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
        prompt_cut = completion_cut = 0
        budget = self.prompt_budget
        if budget is not None and len(prompt_ids) > budget:
            if self.prompt_truncation == "error":
                raise ValueError(
                    f"row {index}: the prompt has {len(prompt_ids)} tokens, over {self.budget_name()}; "
                    "prompt_truncation='error' refuses such rows ('middle' keeps their first and last tokens)"
                )
            prompt_cut = len(prompt_ids) - budget
            prompt_ids = cut_prompt(prompt_ids, budget, self.prompt_truncation)
        if self.max_length is not None and len(prompt_ids) + len(completion_ids) > self.max_length:
            room = self.max_length - len(prompt_ids)
            completion_cut = len(completion_ids) - room
            completion_ids = completion_ids[:room]  # no EOS appended: the row trains as unfinished text
        self._check_limit(index, len(prompt_ids), len(completion_ids) if uses_completion else 0, on_policy)
        out = {
            "prompt_ids": prompt_ids,
            "completion_ids": completion_ids,
            "prompt_tokens_cut": prompt_cut,
            "completion_tokens_cut": completion_cut,
        }
        if self.teachers is not None:
            out[INDEX_KEY] = self.teachers.index_of(row, index)
        if self.teacher_tokenizers is not None:  # the same prompt in its teacher's own chat template, cut alike
            teacher_ids = self._render_prompt(prompt, self.teacher_tokenizers[out.get(INDEX_KEY, 0)])
            if budget is not None:
                teacher_ids = cut_prompt(teacher_ids, budget, self.prompt_truncation)
            out["teacher_prompt_ids"] = teacher_ids
        return out

    def _check_limit(self, index: int, prompt: int, completion: int, on_policy: bool) -> None:
        limit = self.limit
        if limit is None:
            return
        advice = f"set max_length (at most {limit.tokens}) to cut rows to fit, or drop the row"
        if completion and prompt + completion > limit.tokens:
            raise ValueError(
                f"row {index}: prompt and completion are {prompt} + {completion} = {prompt + completion} tokens, "
                f"over {limit.source} ({limit.tokens}); {advice}"
            )
        generated = self.max_completion_length or 0
        if on_policy and prompt + generated > limit.tokens:
            raise ValueError(
                f"row {index}: the prompt has {prompt} tokens, so with max_completion_length={generated} a generated "
                f"sequence can reach {prompt + generated} tokens, over {limit.source} ({limit.tokens}); {advice}"
            )

    def describe_cut(self) -> str:
        """How this tokenizer cuts an over-long prompt, for the truncation warning."""
        budget = self.prompt_budget
        if self.prompt_truncation == "left":
            return f"from the left to their last {budget} tokens (prompt_truncation='left')"
        return (
            f"in the middle to their first {budget - budget // 2} and last {budget // 2} tokens "
            "(prompt_truncation='middle')"
        )


def _rows(indices: list[int], shown: int = 5) -> str:
    more = f" and {len(indices) - shown} more" if len(indices) > shown else ""
    return f"row{'s' if len(indices) > 1 else ''} {', '.join(map(str, indices[:shown]))}{more}"


def truncation_warning(
    name: str, tokenizer: Tokenizer, prompt_cuts: list[int], completion_cuts: list[int] | None
) -> str | None:
    """One message counting the rows whose prompt or completion was cut (None when none was); `completion_cuts` is
    None where completions are not trained on."""
    total, parts = len(prompt_cuts), []
    prompts = [i for i, cut in enumerate(prompt_cuts) if cut]
    if prompts:
        longest = max(prompt_cuts) + tokenizer.prompt_budget
        parts.append(
            f"{len(prompts)} of {total} prompts were longer than {tokenizer.budget_name()} (the longest {longest} "
            f"tokens) and were cut {tokenizer.describe_cut()}: {_rows(prompts)}"
        )
    completions = [i for i, cut in enumerate(completion_cuts or []) if cut]
    if completions:
        parts.append(
            f"{len(completions)} of {total} completions were cut at the end to fit max_length={tokenizer.max_length}, "
            f"losing their EOS, so they train as unfinished text: {_rows(completions)}"
        )
    return f"{name}: {'; '.join(parts)}." if parts else None


def tokenize_dataset(
    dataset: Dataset | IterableDataset,
    tokenizer: Tokenizer,
    needs_completion: bool,
    uses_completion: bool = True,
    on_policy: bool = False,
    name: str = "dataset",
    keep_columns: bool = False,
):
    """Validate and tokenize every row up front (lazily for an IterableDataset), warning once with the counts of cut
    rows (for a streamed dataset, at its first cut row: the counts are unknown until it has been read). `keep_columns`
    keeps the dataset's own columns beside the tokens, with each row's index (`ROW_INDEX`), for reward functions."""
    columns = dataset.column_names
    if columns is not None and "messages" not in columns and "prompt" not in columns:
        raise ValueError(
            f"the dataset needs a 'messages' column or 'prompt' (and 'completion') columns; it has {columns}"
        )
    if tokenizer.teachers is not None:
        tokenizer.teachers.check_columns(columns, name)

    def tokenize(row: dict[str, Any], index: int) -> dict[str, Any]:
        out = tokenizer(row, index, needs_completion, uses_completion, on_policy)
        return out | {ROW_INDEX: index} if keep_columns else out

    if isinstance(dataset, IterableDataset):
        warned = []

        def tokenize_and_warn(row: dict[str, Any], index: int) -> dict[str, Any]:
            out = tokenize(row, index)
            parts = []
            if out["prompt_tokens_cut"]:
                parts.append(f"its prompt lost {out['prompt_tokens_cut']} tokens, cut {tokenizer.describe_cut()}")
            if out["completion_tokens_cut"] and uses_completion:
                parts.append(
                    f"its completion lost {out['completion_tokens_cut']} tokens at the end to fit "
                    f"max_length={tokenizer.max_length}, and its EOS, so it trains as unfinished text"
                )
            if parts and not warned:
                warned.append(index)
                warnings.warn(
                    f"{name} (streamed): row {index} was cut: {'; '.join(parts)}. A streamed dataset is tokenized "
                    "during training, so its cut rows cannot be counted up front; later ones are not reported.",
                    UserWarning,
                    stacklevel=2,
                )
            return out

        return dataset.map(tokenize_and_warn, with_indices=True, remove_columns=None if keep_columns else columns)
    rows = dataset.map(tokenize, with_indices=True, remove_columns=None if keep_columns else columns)
    if len(rows):
        completion_cuts = list(rows["completion_tokens_cut"]) if uses_completion else None
        message = truncation_warning(name, tokenizer, list(rows["prompt_tokens_cut"]), completion_cuts)
        if message:
            warnings.warn(message, UserWarning, stacklevel=2)
        if tokenizer.teachers is not None:
            message = tokenizer.teachers.unused_warning(list(rows[INDEX_KEY]), name)
            if message:
                warnings.warn(message, UserWarning, stacklevel=2)
    return rows


ROW_COLUMNS_KEY = "row_columns"  # batch entry: the dataset's own columns of each row, for reward functions
ROW_INDEX = "row_index"  # the dataset row a training row came from (its group, with num_generations > 1)
# Per-row entries of a batch that are not its sequence layout, carried over when on-policy samples replace a slice.
ROW_KEYS = (INDEX_KEY, "teacher_prompt_ids", "teacher_prompt_mask", ROW_COLUMNS_KEY)


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
    """Collates tokenized rows into the off-policy sequence batch (dataset completions); the dataset's own `carried`
    columns, where the rows have them, ride along as lists in `ROW_COLUMNS_KEY` (for reward functions)."""

    pad_token_id: int
    carried: tuple[str, ...] = ()

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        prompts = [r["prompt_ids"] for r in rows]
        completions = [r["completion_ids"] for r in rows]
        prompt_ids = _pad(prompts, self.pad_token_id, left=True)
        prompt_mask = _pad([[1] * len(p) for p in prompts], 0, left=True)
        completion_ids = _pad(completions, self.pad_token_id, left=False)
        completion_mask = _pad([[1] * len(c) for c in completions], 0, left=False)
        batch = sequence_batch(prompt_ids, prompt_mask, completion_ids, completion_mask)
        if rows and INDEX_KEY in rows[0]:
            batch[INDEX_KEY] = torch.tensor([r[INDEX_KEY] for r in rows], dtype=torch.long)
        if rows and "teacher_prompt_ids" in rows[0]:  # padding masked out; the teacher's own pad id is not needed
            teacher_prompts = [r["teacher_prompt_ids"] for r in rows]
            batch["teacher_prompt_ids"] = _pad(teacher_prompts, 0, left=True)
            batch["teacher_prompt_mask"] = _pad([[1] * len(p) for p in teacher_prompts], 0, left=True)
        carried = [name for name in self.carried if rows and name in rows[0]]
        if carried:
            batch[ROW_COLUMNS_KEY] = {name: [r[name] for r in rows] for name in carried}
        return batch
