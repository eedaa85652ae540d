"""8-bit hidden caches (`cache-teacher --dtype int8`): each element within half a scale step, H + 4 bytes a token,
a training loss within the measured tolerance of the bfloat16 cache's, a warning that the cache is lossy, and a
top-k cache refused."""

from __future__ import annotations

import json
import struct
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_cache_teacher_cli import command, one_error_line
from test_teacher_cache import make_cache, trainer_for

from protege.cli import main
from protege.teacher.cache import CacheManifest
from protege.teacher.quantized import METHOD, dequantize, quantize

# The largest relative difference between the int8 and the bfloat16 cache's loss over 3 steps of tiny.config at beta
# 0, 0.5 and 1 was 8.2e-4 (beta 0, step 2; the hidden states' relative error is 0.63% on average, 1.0% at most, and
# the bfloat16 cache is itself 1.7e-4 from float32): 1.5e-3 leaves less than 2x for other machines' arithmetic.
LOSS_TOLERANCE = 1.5e-3


def test_each_element_is_within_half_a_scale_step():
    """Round trip of rows with an outlier element, a zero row and float32 extremes: |x - x'| <= scale / 2 (up to
    float32 rounding of the division and the product), the largest element exact, scale = max|x| / 127."""
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(64, 96, generator=generator) * torch.logspace(-6, 6, 64)[:, None]
    rows[3, 7] = 500.0  # an outlier dimension: the other elements of its token get a coarse step
    rows[5] = 0.0
    codes, scale = quantize(rows.to(torch.bfloat16))
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (64,)
    exact = rows.to(torch.bfloat16).float()
    assert torch.equal(scale, exact.abs().amax(dim=-1) / 127)
    error = (exact - dequantize(codes, scale)).abs()
    assert bool((error <= scale[:, None] / 2 * (1 + 2**-16)).all())
    assert float((error / scale.clamp(min=1e-30)[:, None]).max()) > 0.49  # the bound is reached, not loose
    assert codes.abs().max() == 127 and torch.equal(codes[5], torch.zeros(96, dtype=torch.int8)) and scale[5] == 0
    largest = exact.abs().argmax(dim=-1)
    torch.testing.assert_close(dequantize(codes, scale).gather(1, largest[:, None]), exact.gather(1, largest[:, None]))
    assert torch.equal(quantize(-exact)[0], -codes)  # symmetric
    assert dequantize(codes, scale, torch.bfloat16).dtype == torch.bfloat16


def data_bytes(folder: Path) -> int:
    """The bytes of a cache's shards less their safetensors headers (8 bytes of length, then the JSON header)."""
    total = 0
    for path in sorted(folder.glob("shard-*.safetensors")):
        with path.open("rb") as file:
            (header,) = struct.unpack("<Q", file.read(8))
        total += path.stat().st_size - 8 - header
    return total


def test_an_int8_cache_has_h_plus_4_bytes_a_token(tiny_paths, data_file, tmp_path, capsys):
    """H + 4 bytes a token exactly (int8 hidden state and a float32 scale; H = 64 for the tiny teacher), against 2H
    for bfloat16, beside the same 20-byte digest and 8-byte offsets a row; the manifest says how and what it lost."""
    for dtype in ("int8", "bfloat16"):
        assert main(command(tiny_paths, data_file, tmp_path / dtype, "--dtype", dtype, "--rows_per_shard", "10")) == 0
    done = [line for line in capsys.readouterr().err.splitlines() if "done;" in line]
    assert "bytes a token (hidden, int8)" in done[0] and "bytes a token (hidden, bfloat16)" in done[1]
    manifest = CacheManifest.read(tmp_path / "int8")
    hidden, tokens, rows, shards = manifest.hidden_size, manifest.tokens, manifest.rows, len(manifest.shards)
    assert (manifest.dtype, hidden, rows, shards) == ("int8", 64, 32, 4)
    overhead = rows * 20 + (rows + shards) * 8
    assert data_bytes(tmp_path / "int8") == tokens * (hidden + 4) + overhead
    assert data_bytes(tmp_path / "bfloat16") == tokens * 2 * hidden + overhead
    quantization = manifest.quantization
    assert quantization["method"] == METHOD and CacheManifest.read(tmp_path / "bfloat16").quantization is None
    # a bound per element of scale / 2 = max|x| / 254 is at most sqrt(H) / 254 = 3.1% of ||x||; the mean is far less
    assert 0 < quantization["relative_error_mean"] < quantization["relative_error_max"] < 64**0.5 / 254
    assert json.loads((tmp_path / "int8" / "manifest.json").read_text())["quantization"] == quantization


def test_a_top_k_cache_refuses_int8(tiny_paths, data_file, tmp_path, capsys):
    flags = ("--format", "topk", "--loss_top_k", "5", "--dtype", "int8")
    line = one_error_line(capsys, main(command(tiny_paths, data_file, tmp_path / "c", *flags)))
    assert "--dtype 'int8': choose one of bfloat16, float16, float32 (int8: --format hidden only)" in line
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_training_from_an_int8_cache_is_within_the_tolerance_of_bfloat16(tiny_paths, tmp_path, beta):
    """3 steps with gradient accumulation and shuffling: each step's loss within LOSS_TOLERANCE of the bfloat16
    cache's, and not equal to it (the cache is lossy); loading the cache warns once, with the measured error."""
    settings = dict(lmbda=0.0, beta=beta, loss_top_k=0, max_steps=3)
    losses = {}
    for dtype in ("bfloat16", "int8"):
        make_cache(
            tiny_paths, tmp_path / dtype, trainer_for(tiny_paths, tmp_path / "live", **settings).args, dtype=dtype
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = trainer_for(
                tiny_paths, tmp_path / f"t-{dtype}", teacher=False, teacher_cache=str(tmp_path / dtype), **settings
            )
        lossy = [str(w.message) for w in caught if "8-bit hidden states" in str(w.message)]
        assert len(lossy) == (dtype == "int8"), lossy
        trainer.train()
        losses[dtype] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert "on average, at most" in lossy[0] and "docs/benchmarks.md" in lossy[0]
    assert len(losses["int8"]) == 3 and losses["int8"] == pytest.approx(losses["bfloat16"], rel=LOSS_TOLERANCE)
    assert losses["int8"] != losses["bfloat16"]


def test_a_servers_int8_cache_is_the_local_builds(tiny_paths, data_file, tmp_path, teacher_url):
    """Asked for float32 hidden states and quantized here, a teacher server gives the local build's int8 cache: the
    same codes but where float32 rounding in another batch moved a value across a rounding boundary (by one step),
    and the scales to float32 precision."""
    for name, teacher in (("local", tiny_paths["teacher"]), ("served", teacher_url)):
        argv = command(tiny_paths, data_file, tmp_path / name, "--dtype", "int8")
        argv[argv.index("--teacher") + 1] = teacher
        assert main(argv) == 0
    manifests = [CacheManifest.read(tmp_path / name) for name in ("local", "served")]
    assert manifests[0].shards == manifests[1].shards == ["shard-00000.safetensors"]
    local, served = (load_file(str(tmp_path / name / "shard-00000.safetensors")) for name in ("local", "served"))
    assert torch.equal(local["row_digests"], served["row_digests"])
    moved = (local["hidden"].int() - served["hidden"].int()).abs()
    assert int(moved.max()) <= 1 and int((moved > 0).sum()) <= moved.numel() // 1000, int((moved > 0).sum())
    torch.testing.assert_close(local["hidden_scale"], served["hidden_scale"], rtol=1e-5, atol=0)
