"""`protege train` as a user runs it: TRL's flags, a YAML config, one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tiny import arithmetic_rows


def protege(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "protege", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in arithmetic_rows(32, seed=1)))
    return str(path)


def common(tiny_paths, data_file, out):
    return [
        "--model_name_or_path",
        tiny_paths["student"],
        "--teacher_model_name_or_path",
        tiny_paths["teacher"],
        "--dataset_name",
        data_file,
        "--output_dir",
        str(out),
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "2",
        "--max_completion_length",
        "8",
        "--max_length",
        "48",
        "--report_to",
        "none",
        "--logging_steps",
        "1",
        "--disable_tqdm",
        "true",
        "--save_strategy",
        "no",
    ]


def test_train_runs_trl_flags_and_saves(tiny_paths, data_file, tmp_path):
    result = protege(
        "train",
        *common(tiny_paths, data_file, tmp_path / "out"),
        "--learning_rate",
        "2e-5",
        "--lmbda",
        "0.5",
        "--beta",
        "0.5",
        "--max_steps",
        "2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_yaml_config_with_flags_overriding_it(tiny_paths, data_file, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("lmbda: 0.0\nmax_steps: 2\nbeta: 0.0\nloss_top_k: 0\n")
    result = protege(
        "train", "--config", str(config), *common(tiny_paths, data_file, tmp_path / "out"), "--lmbda", "1.0"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on_policy_loss" in result.stdout and "off_policy_loss" not in result.stdout


def test_lora_flags(tiny_paths, data_file, tmp_path):
    result = protege(
        "train",
        *common(tiny_paths, data_file, tmp_path / "out"),
        "--max_steps",
        "1",
        "--use_peft",
        "--lora_r",
        "4",
        "--lora_alpha",
        "8",
        "--lora_target_modules",
        "q_proj",
        "v_proj",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "adapter_config.json").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--bogus", "1"], "arguments are not used by the HfArgumentParser: ['--bogus', '1']"),
        (["--lmbda", "3"], "lmbda=3.0 is not allowed: it must be in [0.0, 1.0]"),
        (["--dataset_name", "missing.jsonl"], "dataset file missing.jsonl does not exist"),
        (["--dataset_train_split", "nope"], "has no split 'nope'"),
    ],
)
def test_bad_input_is_one_line_exit_2(tiny_paths, data_file, tmp_path, extra, message):
    result = protege("train", *common(tiny_paths, data_file, tmp_path / "out"), *extra, cwd=tmp_path)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("protege train: error:")]
    assert len(errors) == 1 and message in errors[0]
    assert "Traceback" not in result.stderr


def test_unknown_yaml_key_and_missing_column(tiny_paths, data_file, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("lmbda: 0.5\nlambda_typo: 1\n")
    result = protege("train", "--config", str(config), *common(tiny_paths, data_file, tmp_path / "out"))
    assert result.returncode == 2 and f"unknown key(s) in {config}: lambda_typo" in result.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a"}\n')
    result = protege("train", *common(tiny_paths, data_file, tmp_path / "out"), "--dataset_name", str(bad))
    assert result.returncode == 2 and "needs a 'messages' column or 'prompt'" in result.stderr
    assert "Traceback" not in result.stderr


def test_help_lists_trl_flags():
    result = protege("train", "--help")
    assert result.returncode == 0
    for flag in ("--teacher_model_name_or_path", "--lmbda", "--beta", "--loss_top_k", "--use_peft", "--config"):
        assert flag in result.stdout


def test_eval_reports_kl_both_ways(tiny_paths, data_file, tmp_path):
    output = tmp_path / "eval.json"
    result = protege(
        "eval",
        "--model",
        tiny_paths["student"],
        "--teacher",
        tiny_paths["teacher"],
        "--dataset_name",
        data_file,
        "--max_samples",
        "8",
        "--output",
        str(output),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads(output.read_text())
    assert scores["rows"] == 8 and scores["split"] == "train" and scores["completion_tokens"] > 0
    assert scores["kl_teacher_student"] > 0 and scores["kl_student_teacher"] > 0
    same = protege(
        "eval",
        "--model",
        tiny_paths["teacher"],
        "--teacher",
        tiny_paths["teacher"],
        "--dataset_name",
        data_file,
        "--max_samples",
        "4",
        "--output",
        str(output),
    )
    assert same.returncode == 0 and json.loads(output.read_text())["kl_teacher_student"] == pytest.approx(0, abs=1e-6)
