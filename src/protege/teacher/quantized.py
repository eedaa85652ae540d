"""8-bit hidden caches (`cache-teacher --format hidden --dtype int8`): each token's final hidden state stored as int8
with one float32 scale, H + 4 bytes a token instead of bfloat16's 2H, dequantized when training reads the row.

Symmetric absmax per token: scale = max|x| / 127 and q = round(x / scale), so every element is off by at most
scale / 2 and the token's largest element is kept to float32 precision. One scale a token (not a tensor) because hidden
states differ in size from token to token; no zero point because they are centred. The scale is float32, not
bfloat16: a bfloat16 scale rounds by up to 2^-9 and multiplies the whole token's logits by that error (a per-token
temperature change), all to save 2 bytes of H + 4 (0.13% at H = 1,536).

The cache is lossy, so the writer measures what it lost, per token ||x - x'|| / ||x|| (relative L2 error of the
hidden state), and the manifest records its mean and maximum (`quantization`); training says so once when it loads
the cache (`cached.warn_lossy`). The loss error at real shapes: docs/benchmarks.md ("Offline teacher cache").
"""

from __future__ import annotations

import dataclasses

import torch

INT8 = "int8"
SCALE_KEY = "hidden_scale"  # (T,) float32 beside `hidden` (T, H) int8 in each shard
LEVELS = 127  # symmetric: -127..127, so -x quantizes to -q
METHOD = "int8 per token, symmetric absmax, float32 scale"


def quantize(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states (..., H) as int8 (..., H) and their float32 scales (...,); a token of zeros gets scale 0."""
    values = hidden.float()
    scale = values.abs().amax(dim=-1) / LEVELS
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = (values / divisor.unsqueeze(-1)).round_().clamp_(-LEVELS, LEVELS).to(torch.int8)
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The hidden states (..., H) int8 codes stand for, computed in float32, then in `dtype`."""
    return (codes.float() * scale.float().unsqueeze(-1)).to(dtype)


def source_manifest(manifest):
    """The manifest a cache source is asked with: an int8 cache asks for float32 hidden states and quantizes them
    itself, so a local model and a teacher server give the same codes (tested), their scales to float32 rounding."""
    return dataclasses.replace(manifest, dtype="float32") if manifest.dtype == INT8 else manifest


def quantize_rows(outputs: list[dict[str, torch.Tensor]]) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
    """Each row's `hidden` quantized (`hidden` int8 and `hidden_scale`), and every token's relative error."""
    rows, errors = [], []
    for row in outputs:
        codes, scale = quantize(row["hidden"])
        exact = row["hidden"].float()
        norms = exact.norm(dim=-1)
        lost = (exact - dequantize(codes, scale)).norm(dim=-1)
        errors.append(torch.where(norms > 0, lost / norms.clamp(min=torch.finfo(torch.float32).tiny), 0.0))
        rows.append({"hidden": codes, SCALE_KEY: scale})
    return rows, torch.cat(errors) if errors else torch.zeros(0)


def fold_errors(recorded: dict | None, tokens_before: int, errors: torch.Tensor) -> dict:
    """The manifest's `quantization` after `errors` (per token) of a new shard, folded into what `tokens_before`
    earlier tokens recorded (a resumed build continues the measure)."""
    recorded = recorded or {"method": METHOD, "relative_error_mean": 0.0, "relative_error_max": 0.0}
    tokens = tokens_before + len(errors)
    total = recorded["relative_error_mean"] * tokens_before + float(errors.double().sum())
    largest = max(recorded["relative_error_max"], float(errors.max()) if len(errors) else 0.0)
    return recorded | {"relative_error_mean": total / max(tokens, 1), "relative_error_max": largest}
