"""An offline teacher cache: the teacher's output for every completion token of a dataset, written once
(`protege cache-teacher`) and read by training (`teacher_cache`), so off-policy slices need no live teacher.

A cache is a folder:

* `manifest.json`: what the cache was made from and how (`CacheManifest`): the format, the teacher's identity, the
  tokenizer's fingerprint, the tokenization settings, the dataset's fingerprint, row and token counts, the shards;
* `lm_head.safetensors` (hidden format): the teacher's LM head, saved once;
* `shard-NNNNN.safetensors`: rows in order, each shard written whole under a temporary name and renamed, so a killed
  run leaves only complete shards and resumes after the last one. Per shard: `row_digests` (R, 20) uint8, the SHA-1 of
  each row's prompt and completion ids; `row_offsets` (R + 1,) int64 into the token axis; and the teacher's output per
  completion token: `hidden` (T, H) in the stored dtype (format "hidden", exact for every beta once the head is
  applied; dtype int8: 8-bit with `hidden_scale` (T,) float32 beside it, lossy, see `quantized`), or `topk_ids`
  (T, K) int32, `topk_logprobs` (T, K) float16 and `token_logprobs` (T,) float32 (format "topk").

Rows are found by the digest of their token ids, not their position, so a shuffled or filtered dataset still finds
its rows, and a row the cache lacks is named. safetensors maps the shards into memory: reading a row reads its bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .head import LMHead, config_sha256, head_of_model, save_head
from .quantized import INT8, SCALE_KEY, dequantize, fold_errors, quantize_rows, source_manifest

MANIFEST = "manifest.json"
HEAD_FILE = "lm_head.safetensors"
FORMATS = ("hidden", "topk")
DIGEST_BYTES = 20
# What a killed run's manifest must share with the command that finishes it.
RESUME_FIELDS = (
    "format",
    "dtype",
    "teacher",
    "tokenizer_sha256",
    "tokenization",
    "dataset_fingerprint",
    "top_k",
    "teacher_name",
)


def row_digest(prompt_ids: list[int], completion_ids: list[int]) -> bytes:
    """The SHA-1 of a row's token ids: the key a cache finds the row by."""
    data = np.asarray([len(prompt_ids), *prompt_ids, *completion_ids], dtype=np.int64).tobytes()
    return hashlib.sha1(data).digest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of everything that decides a tokenizer's ids for a text: its whole definition (vocabulary, merges,
    normalizer, pre-tokenizer, added tokens) and its chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    template = getattr(tokenizer, "chat_template", None) or ""
    return hashlib.sha256((definition + "\x00" + str(template)).encode()).hexdigest()


@dataclass
class CacheManifest:
    """What a cache holds and what it was made from; checked field by field against a training run."""

    format: str
    dtype: str  # of the stored hidden states (int8: one float32 scale a token) or top-k log-probs
    teacher: dict  # the teacher's identity: its name, config and weight digests, or the server's model
    tokenizer_sha256: str
    tokenization: dict  # the settings that decide the token ids: max_length, max_prompt_length, prompt_truncation, ...
    dataset_fingerprint: str
    hidden_size: int | None = None
    vocab_size: int | None = None  # the width the teacher is compared on (the shared vocabulary)
    top_k: int | None = None
    teacher_name: str | None = None  # several teachers: the one whose rows (by `teacher_column`) the cache holds
    rows: int = 0
    tokens: int = 0
    shards: list[str] = field(default_factory=list)
    complete: bool = False
    version: str = ""
    quantization: dict | None = None  # int8: how, and the measured relative error of the hidden states

    def write(self, folder: Path) -> None:
        _atomic_write(folder / MANIFEST, json.dumps(asdict(self), indent=1).encode())

    @classmethod
    def read(cls, folder: Path) -> CacheManifest:
        path = Path(folder) / MANIFEST
        try:
            return cls(**json.loads(path.read_text()))
        except FileNotFoundError:
            raise ValueError(f"teacher_cache={str(folder)!r} has no {MANIFEST}: not a cache-teacher folder") from None
        except (TypeError, json.JSONDecodeError) as error:
            raise ValueError(f"teacher_cache={str(folder)!r}: {MANIFEST} is not a cache manifest ({error})") from None


def _atomic_write(path: Path, data: bytes) -> None:
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")
    partial.write_bytes(data)
    os.replace(partial, path)


def write_shard(folder: Path, index: int, digests: list[bytes], outputs: list[dict[str, torch.Tensor]]) -> str:
    """One shard of rows (each row's outputs a dict of per-token tensors), written whole, then renamed into place."""
    name = f"shard-{index:05d}.safetensors"
    lengths = [len(next(iter(row.values()))) for row in outputs]
    tensors = {key: torch.cat([row[key] for row in outputs]).contiguous() for key in outputs[0]} | {
        "row_digests": torch.frombuffer(bytearray(b"".join(digests)), dtype=torch.uint8).reshape(-1, DIGEST_BYTES),
        "row_offsets": torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64),
    }
    partial = folder / f"{name}.part"
    save_file(tensors, str(partial))
    os.replace(partial, folder / name)
    return name


class CacheReader:
    """A cache's rows by digest, read from the memory-mapped shards on demand."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = CacheManifest.read(self.folder)
        if not self.manifest.complete:
            raise ValueError(
                f"teacher_cache={str(folder)!r} is incomplete ({self.manifest.rows} rows so far): run the same "
                "cache-teacher command again to finish it"
            )
        self.shards = [safe_open(str(self.folder / name), framework="pt") for name in self.manifest.shards]
        self.index: dict[bytes, tuple[int, int, int]] = {}  # digest -> shard, first token, end token
        for shard_number, shard in enumerate(self.shards):
            digests = shard.get_tensor("row_digests").numpy()
            offsets = shard.get_tensor("row_offsets").tolist()
            for row, digest in enumerate(digests):
                self.index.setdefault(digest.tobytes(), (shard_number, offsets[row], offsets[row + 1]))

    def row(self, digest: bytes, key: str) -> torch.Tensor | None:
        """The stored `key` tensor of the row with `digest` (an int8 cache's `hidden` dequantized to float32), or
        None when the cache lacks the row."""
        place = self.index.get(digest)
        if place is None:
            return None
        shard, start, end = place
        stored = self.shards[shard].get_slice(key)[start:end]
        if key == "hidden" and self.manifest.dtype == INT8:
            return dequantize(stored, self.shards[shard].get_slice(SCALE_KEY)[start:end])
        return stored


# ----- Writing a cache -----


def teacher_identity(model: torch.nn.Module, name: str | None) -> dict:
    """Who the teacher is: its name, and digests of its config and of its weights' bytes."""
    weights = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        weights.update(key.encode())
        weights.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return {
        "name": name or model.config._name_or_path,
        "config_sha256": config_sha256(model.config),
        "weights_sha256": weights.hexdigest(),
    }


def start_or_resume(folder: Path, manifest: CacheManifest) -> CacheManifest:
    """The manifest to continue from: a new one, or the one a killed run left, if it describes the same cache."""
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / MANIFEST).exists():
        manifest.write(folder)
        return manifest
    existing = CacheManifest.read(folder)
    for name in RESUME_FIELDS:
        if getattr(existing, name) != getattr(manifest, name):
            raise ValueError(
                f"{folder} already holds a cache whose {name} differs ({getattr(existing, name)!r} vs "
                f"{getattr(manifest, name)!r}); write this one to another folder"
            )
    return existing


class CacheSource(Protocol):
    """Where a cache's teacher outputs come from: a loaded model (`ModelSource`) or a teacher server
    (`cache_server.ServerSource`)."""

    def lm_head(self) -> LMHead:
        """The teacher's LM head (hidden format: saved once beside the shards)."""
        ...

    def outputs(self, rows: list[dict], manifest: CacheManifest) -> list[dict[str, torch.Tensor]]:
        """Each tokenized row's teacher output per completion token, as the cache stores it."""
        ...


class ModelSource:
    """A loaded teacher: `collate` turns tokenized rows into a batch on its device."""

    def __init__(self, model: torch.nn.Module, collate):
        self.model, self.collate = model.eval(), collate

    def lm_head(self) -> LMHead:
        return head_of_model(self.model)

    def outputs(self, rows: list[dict], manifest: CacheManifest) -> list[dict[str, torch.Tensor]]:
        return row_outputs(self.model, self.collate(rows), manifest)


@torch.no_grad()
def row_outputs(model: torch.nn.Module, batch: dict, manifest: CacheManifest) -> list[dict[str, torch.Tensor]]:
    """Each row's teacher output per completion token, as the cache stores it."""
    from ..models import completion_hidden, completion_logits

    lengths = batch["labels"][:, int(batch["prompt_width"]) :].ne(-100).sum(1).tolist()
    dtype = getattr(torch, manifest.dtype)
    if manifest.format == "hidden":
        hidden = completion_hidden(model, batch)
        return [{"hidden": hidden[row, :n].to(dtype)} for row, n in enumerate(lengths)]
    width = int(batch["prompt_width"])
    logprobs = torch.log_softmax(completion_logits(model, batch, manifest.vocab_size).float(), dim=-1)
    top = logprobs.topk(manifest.top_k, dim=-1)
    actual = logprobs.gather(-1, batch["input_ids"][:, width:, None].clamp(min=0)).squeeze(-1)
    return [
        {
            "topk_ids": top.indices[row, :n].to(torch.int32),
            "topk_logprobs": top.values[row, :n].to(dtype),
            "token_logprobs": actual[row, :n].float(),
        }
        for row, n in enumerate(lengths)
    ]


def build_cache(
    source: CacheSource,
    rows,
    folder: str | Path,
    manifest: CacheManifest,
    batch_size: int = 8,
    rows_per_shard: int = 1024,
    on_rows=None,
) -> CacheManifest:
    """Write (or finish) the cache of `rows` (tokenized: prompt_ids, completion_ids) in `folder`. `on_rows(rows,
    tokens)` is called after each batch (a progress bar). Returns the finished manifest."""
    folder = Path(folder)
    if manifest.dtype == INT8 and manifest.format != "hidden":
        raise ValueError(f"dtype {INT8} is for the hidden format (8-bit hidden states), not {manifest.format!r}")
    manifest = start_or_resume(folder, manifest)
    if manifest.format == "hidden" and not (folder / HEAD_FILE).exists():
        save_head(source.lm_head(), folder / HEAD_FILE)
    asked = source_manifest(manifest)  # int8: float32 from the source, quantized batch by batch here
    for start in range(manifest.rows, len(rows), rows_per_shard):
        stop = min(start + rows_per_shard, len(rows))
        digests, outputs, errors = [], [], []
        for first in range(start, stop, batch_size):
            part = [rows[i] for i in range(first, min(first + batch_size, stop))]
            answers = source.outputs(part, asked)
            if manifest.dtype == INT8:
                answers, lost = quantize_rows(answers)
                errors.append(lost)
            outputs += answers
            digests += [row_digest(r["prompt_ids"], r["completion_ids"]) for r in part]
            if on_rows is not None:
                on_rows(len(part), sum(len(r["completion_ids"]) for r in part))
        if errors:
            manifest.quantization = fold_errors(manifest.quantization, manifest.tokens, torch.cat(errors))
        manifest.shards.append(write_shard(folder, len(manifest.shards), digests, outputs))
        manifest.rows = stop
        manifest.tokens += sum(len(next(iter(o.values()))) for o in outputs)
        manifest.write(folder)
    manifest.complete = True
    manifest.write(folder)
    return manifest
