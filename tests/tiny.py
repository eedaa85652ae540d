"""Tiny student, teacher, tokenizer and arithmetic chat data, built offline for the trainer tests."""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset

from protege.toy import arithmetic_rows, tiny_model, train_tokenizer


def build(folder: Path) -> dict[str, str]:
    """Save a tokenizer, a 2-layer student and a sharper 3-layer teacher; return their paths."""
    rows = arithmetic_rows(200, seed=0)
    tokenizer = train_tokenizer([m["content"] for r in rows for m in r["messages"]], vocab_size=300)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    paths = {}
    for name, layers, hidden, seed in (("student", 2, 32, 1), ("teacher", 3, 64, 2)):
        model = tiny_model(
            len(tokenizer), layers, hidden, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, seed=seed
        )
        if name == "teacher":  # a confident teacher, so there is a large, learnable divergence
            with torch.no_grad():
                model.lm_head.weight.mul_(30.0)
        path = folder / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = str(path)
    return paths


def dataset(count: int = 64, seed: int = 0) -> Dataset:
    return Dataset.from_list(arithmetic_rows(count, seed))
