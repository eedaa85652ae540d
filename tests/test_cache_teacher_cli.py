"""`protege cache-teacher`: the cache it writes trains like the live teacher, a killed run resumes to the same files,
and a mistake is one line with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from tiny import config

from protege import DistillationTrainer
from protege.cli import main
from protege.commands.datasets import load_any
from protege.teacher.cache import CacheManifest
from protege.teacher.head import load_head

LENGTHS = ["--max_length", "48", "--max_completion_length", "12"]  # tiny.config's


def command(tiny_paths, data_file, output, *extra: str) -> list[str]:
    return [
        "cache-teacher",
        "--teacher",
        tiny_paths["teacher"],
        "--tokenizer",
        tiny_paths["student"],
        "--dataset_name",
        data_file,
        *LENGTHS,
        "--output",
        str(output),
        *extra,
    ]


def one_error_line(capsys, code: int) -> str:
    assert code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("protege cache-teacher: error: "), lines
    return lines[0]


def first_loss(tiny_paths, data_file, out, **settings) -> float:
    trainer = DistillationTrainer(
        model=tiny_paths["student"],
        teacher_model=None if "teacher_cache" in settings else tiny_paths["teacher"],
        args=config(out, lmbda=0.0, beta=0.5, loss_top_k=0, max_steps=1, **settings),
        train_dataset=Dataset.from_json(data_file),  # the student's tokenizer loaded as `protege train` loads it
    )
    trainer.train()
    return next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)


def test_the_commands_cache_trains_like_the_live_teacher(tiny_paths, data_file, tmp_path, capsys):
    """lmbda=0 and no teacher given: the first step's loss from the cache equals the live teacher's (float32 storage:
    to 1e-5; the default bfloat16 within its rounding)."""
    assert main(command(tiny_paths, data_file, tmp_path / "f32", "--dtype", "float32", "--rows_per_shard", "10")) == 0
    assert main(command(tiny_paths, data_file, tmp_path / "bf16")) == 0
    done = capsys.readouterr().err.splitlines()[-1]
    assert done.startswith("protege cache-teacher: done; 32 rows") and "--teacher_cache" in done
    manifest = CacheManifest.read(tmp_path / "f32")
    assert manifest.complete and manifest.rows == 32 and len(manifest.shards) == 4 and manifest.version
    assert manifest.tokenization == {"max_length": 48, "max_prompt_length": 36, "prompt_truncation": "middle"}
    assert manifest.dataset_fingerprint == load_any(data_file)["train"]._fingerprint  # as `protege train` loads it
    live = first_loss(tiny_paths, data_file, tmp_path / "live")
    assert first_loss(tiny_paths, data_file, tmp_path / "a", teacher_cache=str(tmp_path / "f32")) == pytest.approx(
        live, rel=1e-5
    )
    assert first_loss(tiny_paths, data_file, tmp_path / "b", teacher_cache=str(tmp_path / "bf16")) == pytest.approx(
        live, rel=1e-2
    )


def test_a_top_k_cache_has_k_log_probs_a_token(tiny_paths, data_file, tmp_path):
    assert main(command(tiny_paths, data_file, tmp_path / "top", "--format", "topk", "--loss_top_k", "5")) == 0
    manifest = CacheManifest.read(tmp_path / "top")
    assert (manifest.format, manifest.top_k, manifest.dtype, manifest.hidden_size) == ("topk", 5, "float16", None)
    assert not (tmp_path / "top" / "lm_head.safetensors").exists()


KILL_AFTER_FIRST_SHARD = """
import os, sys
import protege.teacher.cache as cache
write = cache.write_shard
def write_then_die(folder, index, *rest):
    if index == 1:  # shard 0 and its manifest are written; die while shard 1 is half written
        (folder / "shard-00001.safetensors.part").write_bytes(b"half a shard")
        os.kill(os.getpid(), 9)
    return write(folder, index, *rest)
cache.write_shard = write_then_die
from protege.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_a_killed_run_resumes_to_the_same_files(tiny_paths, data_file, tmp_path, dtype):
    """SIGKILL while the second shard is being written: the same command finishes the cache, and its shards and
    manifest equal an uninterrupted run's, byte for byte (the LM head, written once, holds the same tensors)."""
    shards = ["--rows_per_shard", "8", "--batch_size", "3", "--dtype", dtype]
    assert main(command(tiny_paths, data_file, tmp_path / "whole", *shards)) == 0
    started = time.perf_counter()
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_FIRST_SHARD, *command(tiny_paths, data_file, tmp_path / "cut", *shards)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    cut = CacheManifest.read(tmp_path / "cut")
    assert (cut.rows, cut.shards, cut.complete) == (8, ["shard-00000.safetensors"], False)
    assert main(command(tiny_paths, data_file, tmp_path / "cut", *shards)) == 0
    names = sorted(path.name for path in (tmp_path / "whole").iterdir())
    assert names == sorted(path.name for path in (tmp_path / "cut").iterdir() if not path.name.endswith(".part"))
    assert len([name for name in names if name.startswith("shard-")]) == 4
    for name in names:
        if name == "lm_head.safetensors":  # safetensors orders a header's metadata differently in each process
            cut, whole = (load_head(tmp_path / run / name) for run in ("cut", "whole"))
            assert torch.equal(cut.weight, whole.weight) and cut.metadata() == whole.metadata()
        else:
            assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert time.perf_counter() - started < 60


def test_mistakes_are_one_line_exit_2(tiny_paths, data_file, tmp_path, capsys):
    assert "--format 'logits': choose one of hidden, topk" in one_error_line(
        capsys, main(command(tiny_paths, data_file, tmp_path / "c", "--format", "logits"))
    )
    assert "--format topk needs --loss_top_k" in one_error_line(
        capsys, main(command(tiny_paths, data_file, tmp_path / "c", "--format", "topk"))
    )
    with pytest.raises(SystemExit) as exit_info:  # argparse's own mistakes too
        main(command(tiny_paths, data_file, tmp_path / "c", "--batch_size", "many"))
    assert "--batch_size: invalid int value" in one_error_line(capsys, exit_info.value.code)
    texts = Path(tmp_path / "text.jsonl")
    texts.write_text("\n".join(json.dumps({"text": f"row {i}"}) for i in range(4)))
    line = one_error_line(capsys, main(command(tiny_paths, str(texts), tmp_path / "c")))
    assert "needs a 'messages' column or 'prompt'" in line and "['text']" in line
    assert not (tmp_path / "c").exists()  # nothing written before the rows are known to fit


def test_another_cache_in_the_folder_is_refused(tiny_paths, data_file, tmp_path, capsys):
    assert main(command(tiny_paths, data_file, tmp_path / "c", "--rows_per_shard", "16")) == 0
    capsys.readouterr()
    line = one_error_line(capsys, main(command(tiny_paths, data_file, tmp_path / "c", "--dtype", "float16")))
    assert "already holds a cache whose dtype differs" in line


def test_train_from_the_cache_alone_needs_no_teacher_flag(tmp_path):
    from protege.commands.train import parse

    base = ["--model_name_or_path", "s", "--dataset_name", "d", "--output_dir", str(tmp_path), "--report_to", "none"]
    _, args, _ = parse([*base, "--teacher_cache", "cache", "--lmbda", "0"])
    assert args.teacher_cache == "cache" and args.teacher_model_name_or_path is None
    _, args, _ = parse([*base, "--teacher_cache", '{"math": "m", "code": "c"}', "--lmbda", "0"])
    assert args.teacher_cache == {"math": "m", "code": "c"}  # several teachers: JSON text, like the other mappings
    from protege.commands.errors import UsageError

    with pytest.raises(UsageError, match="or --teacher_cache with --lmbda 0"):
        parse([*base, "--teacher_cache", "cache", "--lmbda", "0.5"])
