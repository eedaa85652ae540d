"""The teacher server's payloads: pure encode and decode, no I/O.

A scored batch is, for each sequence i and each completion position t < completion_lengths[i], the teacher's top-K
log-probs (sorted, descending) with their token ids, and the log-prob of the actual next token. Three formats:

* "json" - nested lists, ragged (no padding); -inf is written as null.
* "binary" - TRL's format: base64 of C-order little-endian float32 / int32 arrays of shape (B, Tmax, K) and
  (B, Tmax, 1), padded with -inf / 0, plus `shape` and `completion_lengths`. A `trl vllm-serve` client reads it.
* "compact" - protege's format: ragged rows (sum of lengths, K) instead of padded ones, float16 log-probs, token ids
  in the narrowest unsigned type the vocabulary fits (uint16 up to 65536 tokens), and no actual-token ids (the client
  sent them). 2x to 2.6x smaller than "binary" at equal completion lengths, 3x to 4x with ragged ones, before HTTP
  compression; with gzip about 8x to 10x smaller than "json" (docs/benchmarks.md).

And one format of another kind:

* "hidden" - the teacher's final (post-norm) hidden states at the scored positions, ragged rows (sum of lengths, H)
  in float16 (default), bfloat16 or float32: 2H bytes a token in 16 bits, whatever the vocabulary. The trainer applies
  the teacher's LM head (served once on /lm_head/) itself, so the loss is exact for every beta and top-k. Asked with
  `Accept: application/octet-stream`, the same payload comes as one safetensors blob instead of JSON (no base64):
  exactly 2H bytes a token plus a small header, what protege's client asks for.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass

import numpy as np

from ..choices import HIDDEN_DTYPES, HIDDEN_FORMAT, LOGPROB_FORMATS


@dataclass
class SequenceScores:
    """One sequence's completion positions: (L, K) top-k log-probs and ids, (L,) actual-token log-probs and ids."""

    topk_logprobs: np.ndarray
    topk_ids: np.ndarray
    actual_logprobs: np.ndarray
    actual_ids: np.ndarray


@dataclass
class BatchScores:
    """A batch padded to (B, Tmax, K): -inf log-probs and id 0 past each sequence's completion length."""

    topk_logprobs: np.ndarray
    topk_ids: np.ndarray
    actual_logprobs: np.ndarray
    actual_ids: np.ndarray
    completion_lengths: np.ndarray

    @classmethod
    def pad(cls, rows: list[SequenceScores], top_k: int) -> BatchScores:
        lengths = np.array([len(r.actual_ids) for r in rows], dtype=np.int64)
        width = int(lengths.max()) if len(rows) else 0
        batch = cls(
            np.full((len(rows), width, top_k), -np.inf, dtype=np.float32),
            np.zeros((len(rows), width, top_k), dtype=np.int64),
            np.full((len(rows), width), -np.inf, dtype=np.float32),
            np.zeros((len(rows), width), dtype=np.int64),
            lengths,
        )
        for i, r in enumerate(rows):
            n = lengths[i]
            batch.topk_logprobs[i, :n] = r.topk_logprobs
            batch.topk_ids[i, :n] = r.topk_ids
            batch.actual_logprobs[i, :n] = r.actual_logprobs
            batch.actual_ids[i, :n] = r.actual_ids
        return batch

    def rows(self) -> list[SequenceScores]:
        return [
            SequenceScores(
                self.topk_logprobs[i, :n], self.topk_ids[i, :n], self.actual_logprobs[i, :n], self.actual_ids[i, :n]
            )
            for i, n in enumerate(self.completion_lengths.tolist())
        ]


class PayloadError(ValueError):
    """A response that does not decode into what its request asked for."""


def _b64(array: np.ndarray, dtype: str) -> str:
    if dtype == "float16":  # keep very unlikely tokens finite instead of overflowing to -inf
        array = np.where(np.isneginf(array), array, np.maximum(array, -65000.0))
    return base64.b64encode(np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()).decode()


def _unb64(text: str, dtype: str, count: int, name: str) -> np.ndarray:
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as error:
        raise PayloadError(f"'{name}' is not valid base64: {error}") from None
    itemsize = np.dtype(dtype).itemsize
    if len(raw) != count * itemsize:
        raise PayloadError(
            f"'{name}' holds {len(raw)} bytes, expected {count} values of {dtype} ({count * itemsize} bytes)"
        )
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))


def _id_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def _nulls(values: np.ndarray) -> list:
    return [[None if math.isinf(v) else v for v in row] for row in values.tolist()]


def encode(rows: list[SequenceScores], top_k: int, response_format: str, vocab_size: int) -> dict:
    """A JSON-serialisable payload for the scored rows of one request."""
    lengths = [len(r.actual_ids) for r in rows]
    if response_format == "json":
        return {
            "completion_lengths": lengths,
            "logprobs": [_nulls(r.topk_logprobs) for r in rows],
            "logprob_token_ids": [r.topk_ids.tolist() for r in rows],
            "actual_logprobs": [[None if math.isinf(v) else v for v in r.actual_logprobs.tolist()] for r in rows],
            "actual_token_ids": [r.actual_ids.tolist() for r in rows],
        }
    if response_format == "binary":
        batch = BatchScores.pad(rows, top_k)
        width = batch.topk_ids.shape[1]
        return {
            "shape": [len(rows), width, top_k],
            "completion_lengths": lengths,
            "logprobs_b64": _b64(batch.topk_logprobs, "float32"),
            "token_ids_b64": _b64(batch.topk_ids, "int32"),
            "actual_logprobs_b64": _b64(batch.actual_logprobs, "float32"),
            "actual_token_ids_b64": _b64(batch.actual_ids, "int32"),
        }
    if response_format == "compact":
        ids_dtype = _id_dtype(vocab_size)

        def stack(name, width):
            parts = [getattr(r, name).reshape(-1, width) for r in rows]
            return np.concatenate(parts) if parts else np.zeros((0, width))

        return {
            "format": "compact",
            "top_k": top_k,
            "completion_lengths": lengths,
            "ids_dtype": ids_dtype,
            "logprobs_f16_b64": _b64(stack("topk_logprobs", top_k), "float16"),
            "token_ids_b64": _b64(stack("topk_ids", top_k), ids_dtype),
            "actual_logprobs_f16_b64": _b64(stack("actual_logprobs", 1), "float16"),
        }
    raise ValueError(f"response_format={response_format!r} is not one of {LOGPROB_FORMATS}")


def _key(payload: dict, name: str):
    if name not in payload:
        raise PayloadError(f"the response has no '{name}' (keys: {sorted(payload)[:8]})")
    return payload[name]


def decode(
    payload: dict, response_format: str, sequences: list[list[int]], prompt_lengths: list[int], top_k: int
) -> BatchScores:
    """Decode and check a response against its request: lengths, shapes, ids and finite values where required."""
    if response_format not in LOGPROB_FORMATS:
        raise ValueError(f"response_format={response_format!r} is not one of {LOGPROB_FORMATS}")
    if not isinstance(payload, dict):
        raise PayloadError(f"the response is a {type(payload).__name__}, not a JSON object")
    try:
        batch = _decode(payload, response_format, sequences, prompt_lengths, top_k)
    except PayloadError:
        raise
    except (TypeError, KeyError, ValueError, IndexError, AttributeError) as error:
        raise PayloadError(f"malformed {response_format} payload ({type(error).__name__}: {error})") from None
    check_scores(batch, sequences, prompt_lengths)
    return batch


def _json_array(rows, dtype, shape: tuple[int, ...], name: str, index: int) -> np.ndarray:
    array = np.array(rows, dtype=dtype)
    if array.shape[:1] != shape[:1] or (len(shape) == 2 and (array.ndim != 2 or array.shape[1] < shape[1])):
        raise PayloadError(f"sequence {index}: '{name}' has shape {list(array.shape)}, expected {list(shape)}")
    array = array[:, : shape[1]] if len(shape) == 2 else array
    if array.dtype.kind == "f":
        array = np.where(np.isnan(array), -np.inf, array)  # null -> -inf; a literal -Infinity stays -inf
    return array


def _decode(payload, response_format, sequences, prompt_lengths, top_k) -> BatchScores:
    expected = [len(s) - p for s, p in zip(sequences, prompt_lengths)]
    lengths = _key(payload, "completion_lengths")
    if lengths != expected:
        raise PayloadError(f"completion_lengths {lengths!r:.120} do not match the request's {expected!r:.120}")
    if response_format == "json":
        names = ("logprobs", "logprob_token_ids", "actual_logprobs", "actual_token_ids")
        fields = {name: _key(payload, name) for name in names}
        for name, value in fields.items():
            if not isinstance(value, list) or len(value) != len(sequences):
                raise PayloadError(f"'{name}' must be a list of {len(sequences)} sequences")
        rows = [
            SequenceScores(
                _json_array(fields["logprobs"][i], np.float32, (n, top_k), "logprobs", i),
                _json_array(fields["logprob_token_ids"][i], np.int64, (n, top_k), "logprob_token_ids", i),
                _json_array(fields["actual_logprobs"][i], np.float32, (n,), "actual_logprobs", i),
                _json_array(fields["actual_token_ids"][i], np.int64, (n,), "actual_token_ids", i),
            )
            for i, n in enumerate(expected)
        ]
        return BatchScores.pad(rows, top_k)
    if response_format == "binary":
        shape = _key(payload, "shape")
        width = max(expected, default=0)
        if not isinstance(shape, list) or shape != [len(sequences), width, top_k]:
            raise PayloadError(f"shape {shape!r} does not match the request's {[len(sequences), width, top_k]}")
        shape, count = tuple(shape), len(sequences) * width
        return BatchScores(
            _unb64(_key(payload, "logprobs_b64"), "float32", count * top_k, "logprobs_b64").reshape(shape).copy(),
            _unb64(_key(payload, "token_ids_b64"), "int32", count * top_k, "token_ids_b64")
            .reshape(shape)
            .astype(np.int64),
            _unb64(_key(payload, "actual_logprobs_b64"), "float32", count, "actual_logprobs_b64")
            .reshape(shape[:2])
            .copy(),
            _unb64(_key(payload, "actual_token_ids_b64"), "int32", count, "actual_token_ids_b64")
            .reshape(shape[:2])
            .astype(np.int64),
            np.array(expected, dtype=np.int64),
        )
    total = sum(expected)
    ids_dtype = _key(payload, "ids_dtype")
    if ids_dtype not in ("uint16", "uint32"):
        raise PayloadError(f"ids_dtype {ids_dtype!r} is not uint16 or uint32")
    topk = _unb64(_key(payload, "logprobs_f16_b64"), "float16", total * top_k, "logprobs_f16_b64")
    ids = _unb64(_key(payload, "token_ids_b64"), ids_dtype, total * top_k, "token_ids_b64")
    actual = _unb64(_key(payload, "actual_logprobs_f16_b64"), "float16", total, "actual_logprobs_f16_b64")
    topk, ids = topk.astype(np.float32).reshape(total, top_k), ids.astype(np.int64).reshape(total, top_k)
    actual = actual.astype(np.float32)
    rows, start = [], 0
    for s, p, n in zip(sequences, prompt_lengths, expected):
        end = start + n
        rows.append(SequenceScores(topk[start:end], ids[start:end], actual[start:end], np.asarray(s[p:], np.int64)))
        start = end
    return BatchScores.pad(rows, top_k)


def check_scores(batch: BatchScores, sequences: list[list[int]], prompt_lengths: list[int]) -> None:
    """What every answer must be, whoever sent it: actual ids as sent, finite actual and top-1 log-probs, no NaN or
    positive log-prob, ids >= 0, top-k sorted (PayloadError naming the sequence)."""
    for i, (sequence, prompt_length) in enumerate(zip(sequences, prompt_lengths)):
        n = int(batch.completion_lengths[i])
        if not np.array_equal(batch.actual_ids[i, :n], np.asarray(sequence[prompt_length:], dtype=np.int64)):
            raise PayloadError(f"sequence {i}: actual_token_ids differ from the completion tokens that were sent")
        if not np.isfinite(batch.actual_logprobs[i, :n]).all():
            raise PayloadError(f"sequence {i}: the log-prob of an actual token is missing or not finite")
        top = batch.topk_logprobs[i, :n]
        if n and not np.isfinite(top[:, 0]).all():
            raise PayloadError(f"sequence {i}: a top-1 log-prob is missing or not finite")
        if np.isnan(top).any() or (top > 1e-3).any():
            raise PayloadError(f"sequence {i}: top-k log-probs contain NaN or positive values")
        if (batch.topk_ids[i, :n] < 0).any():
            raise PayloadError(f"sequence {i}: top-k token ids contain negative values")
        if (np.diff(top, axis=-1) > 1e-3).any():
            raise PayloadError(f"sequence {i}: top-k log-probs are not sorted in descending order")


# ----- The "hidden" format -----


def _bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> the upper 16 bits of its nearest bfloat16 (round half to even); numpy has no bfloat16 type."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _from_bfloat16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _hidden_wire(rows: list[np.ndarray], dtype: str) -> tuple[np.ndarray, int]:
    """The stacked (N, H) states as sent in `dtype` (bfloat16 as uint16 bits), or a ValueError naming the first
    sequence whose states are not finite in it (float16 overflows past 65,504: ask for bfloat16 or float32)."""
    if dtype not in HIDDEN_DTYPES:
        raise ValueError(f"hidden dtype {dtype!r} is not one of {HIDDEN_DTYPES}")
    hidden_size = rows[0].shape[-1] if rows else 0
    parts = [np.asarray(r, np.float32).reshape(-1, hidden_size) for r in rows]
    stacked = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    if dtype == "bfloat16":
        wire = _bfloat16_bits(stacked)
        back = _from_bfloat16_bits(wire)
    else:
        with np.errstate(over="ignore"):
            wire = stacked.astype(np.dtype(dtype).newbyteorder("<"))
        back = wire
    if not np.isfinite(back).all():
        row = int(np.flatnonzero(~np.isfinite(back).all(axis=-1))[0])
        sequence = int(np.searchsorted(np.cumsum([len(r) for r in rows]), row, side="right"))
        raise ValueError(
            f"sequence {sequence}: the teacher's hidden states are not finite in {dtype} (largest magnitude "
            f"{float(np.abs(stacked[row]).max()):.4g}); ask for bfloat16 or float32"
        )
    return np.ascontiguousarray(wire), int(hidden_size)


def encode_hidden(rows: list[np.ndarray], dtype: str = "float16") -> dict:
    """A JSON-serialisable payload of each sequence's (L, H) hidden states (see `_hidden_wire` for its errors)."""
    wire, hidden_size = _hidden_wire(rows, dtype)
    return {
        "format": HIDDEN_FORMAT,
        "completion_lengths": [len(r) for r in rows],
        "hidden_size": hidden_size,
        "dtype": dtype,
        "hidden_b64": base64.b64encode(wire.tobytes()).decode(),
    }


def encode_hidden_binary(rows: list[np.ndarray], dtype: str = "float16") -> bytes:
    """The same payload as one safetensors blob: tensor "hidden" (N, H) (bfloat16 as its uint16 bits) and the other
    fields in its metadata. 2H bytes a token in 16 bits, plus a header of about 200 bytes: no base64, no gzip."""
    from safetensors.numpy import save

    wire, hidden_size = _hidden_wire(rows, dtype)
    metadata = {
        "format": HIDDEN_FORMAT,
        "completion_lengths": json.dumps([len(r) for r in rows]),
        "hidden_size": str(hidden_size),
        "dtype": dtype,
    }
    return save({"hidden": wire.reshape(-1, hidden_size) if hidden_size else wire}, metadata=metadata)


def decode_hidden(
    payload: dict, sequences: list[list[int]], prompt_lengths: list[int], hidden_size: int | None = None
) -> list[np.ndarray]:
    """Each sequence's (completion length, H) float32 hidden states, checked against the request: lengths, the
    hidden size (when known), the byte count and finite values."""
    if not isinstance(payload, dict):
        raise PayloadError(f"the response is a {type(payload).__name__}, not a JSON object")
    if payload.get("format") != HIDDEN_FORMAT:
        raise PayloadError(f"the response's format is {payload.get('format')!r}, not {HIDDEN_FORMAT!r}")
    width, dtype, total = _check_hidden_header(payload, sequences, prompt_lengths, hidden_size)
    if dtype == "bfloat16":
        hidden = _from_bfloat16_bits(_unb64(_key(payload, "hidden_b64"), "uint16", total * width, "hidden_b64"))
    else:
        hidden = _unb64(_key(payload, "hidden_b64"), dtype, total * width, "hidden_b64").astype(np.float32)
    return _hidden_rows(hidden.reshape(total, width), sequences, prompt_lengths)


def decode_hidden_binary(
    data: bytes, sequences: list[list[int]], prompt_lengths: list[int], hidden_size: int | None = None
) -> list[np.ndarray]:
    """`decode_hidden` for a safetensors blob of `encode_hidden_binary`, with the same checks."""
    from safetensors.numpy import load

    try:
        header_length = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_length]).get("__metadata__") or {}
        lengths = json.loads(metadata.get("completion_lengths", "null"))
        hidden_size_sent = int(metadata.get("hidden_size", "0"))
        tensors = load(data)
    except Exception as error:  # safetensors raises its own SafetensorError besides ValueError and friends
        problem = f"{type(error).__name__}: {error}"
        raise PayloadError(f"the response is not a safetensors hidden payload ({problem})") from None
    if metadata.get("format") != HIDDEN_FORMAT or "hidden" not in tensors:
        raise PayloadError(f"the response's format is {metadata.get('format')!r}, not {HIDDEN_FORMAT!r}")
    header = {"completion_lengths": lengths, "hidden_size": hidden_size_sent, "dtype": metadata.get("dtype")}
    width, dtype, total = _check_hidden_header(header, sequences, prompt_lengths, hidden_size)
    wire = tensors["hidden"]
    expected = {"bfloat16": np.uint16, "float16": np.float16, "float32": np.float32}[dtype]
    if wire.dtype != expected or wire.size != total * width:
        raise PayloadError(
            f"'hidden' holds {wire.size} values of {wire.dtype}, expected {total * width} of {np.dtype(expected)}"
        )
    hidden = _from_bfloat16_bits(wire) if dtype == "bfloat16" else wire.astype(np.float32)
    return _hidden_rows(hidden.reshape(total, width), sequences, prompt_lengths)


def _check_hidden_header(payload: dict, sequences, prompt_lengths, hidden_size: int | None) -> tuple[int, str, int]:
    """(H, dtype, scored tokens) of a hidden payload, checked against the request and the LM head's width."""
    expected = [len(s) - p for s, p in zip(sequences, prompt_lengths)]
    lengths = _key(payload, "completion_lengths")
    if lengths != expected:
        raise PayloadError(f"completion_lengths {lengths!r:.120} do not match the request's {expected!r:.120}")
    width, dtype = _key(payload, "hidden_size"), _key(payload, "dtype")
    if not isinstance(width, int) or width < 1 or (hidden_size is not None and width != hidden_size):
        raise PayloadError(f"hidden_size {width!r} does not match the teacher's LM head ({hidden_size})")
    if dtype not in HIDDEN_DTYPES:
        raise PayloadError(f"dtype {dtype!r} is not one of {HIDDEN_DTYPES}")
    return width, dtype, sum(expected)


def _hidden_rows(hidden: np.ndarray, sequences, prompt_lengths) -> list[np.ndarray]:
    """Split (N, H) states by sequence, refusing a non-finite one (named by sequence and completion position)."""
    rows, start = [], 0
    for i, (s, p) in enumerate(zip(sequences, prompt_lengths)):
        row = hidden[start : start + len(s) - p]
        if not np.isfinite(row).all():
            position = int(np.flatnonzero(~np.isfinite(row).all(axis=-1))[0])
            raise PayloadError(f"sequence {i}: the hidden state at completion position {position} is not finite")
        rows.append(row)
        start += len(s) - p
    return rows
