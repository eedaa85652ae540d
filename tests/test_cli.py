"""`protege train` as a user runs it: TRL's flags, a YAML config, one-line errors with exit code 2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import free_port

from protege.commands.train import parse


def protege(*args: str, cwd=None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "protege", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
        env=None if env is None else {**os.environ, **env},
    )


def one_error_line(result: subprocess.CompletedProcess, command: str) -> str:
    """The whole of stderr, which must be one `protege COMMAND: error: ...` line, after exit code 2."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"protege {command}: error: "), result.stderr[-3000:]
    return lines[0]


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


@pytest.mark.slow
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
    folder = os.path.abspath(tmp_path / "out")
    assert result.stderr.splitlines()[-1] == (
        f"protege train: done; the trained student is in {folder}. Compare it with its teacher: protege eval "
        f"--model {folder} --teacher {tiny_paths['teacher']} --dataset_name {data_file}"
    )
    steps = [line for line in result.stdout.splitlines() if line.startswith("step ")]  # --disable_tqdm: short lines
    assert re.fullmatch(r"step 1: loss \S+  on-policy \d+%.*tokens/s \d+", steps[0]), steps
    assert "{'loss'" not in result.stdout and "grad_norm" not in result.stdout


@pytest.mark.slow
def test_yaml_config_with_flags_overriding_it(tiny_paths, data_file, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("lmbda: 0.0\nmax_steps: 2\nbeta: 0.0\nloss_top_k: 0\n")
    result = protege(
        "train", "--config", str(config), *common(tiny_paths, data_file, tmp_path / "out"), "--lmbda", "1.0"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [line for line in result.stdout.splitlines() if line.startswith("step ") and "on-policy" in line]
    assert len(steps) == 2 and all(" on-policy 100% " in line for line in steps)  # lmbda 1.0, the flag's


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lmdba", "0.5"], "unknown flag --lmdba (did you mean --lmbda?)"),
        (["--bogus", "1", "--loss_topk=3"], "unknown flags --bogus, --loss_topk (did you mean --loss_top_k?)"),
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_help_lists_trl_flags_in_groups_distillation_first():
    result = protege("train", "--help")
    assert result.returncode == 0
    usage, *_ = result.stdout.splitlines()
    assert len(usage) < 200  # not one [--flag FLAG] per field

    def line_of(pattern: str) -> int:
        found = re.search(pattern, result.stdout, re.MULTILINE)
        assert found, pattern
        return result.stdout.count("\n", 0, found.start())

    groups = ["distillation", "teacher", "generation", "model", "dataset", re.escape("training (transformers ")]
    starts = [line_of(rf"^{group}[^\n]*:$") for group in groups]
    assert starts == sorted(starts)
    flags = {  # the group each flag is listed in (by its index in `groups`)
        "--config": -1,
        "--lmbda": 0,
        "--beta": 0,
        "--loss_top_k": 0,
        "--teacher_model_name_or_path": 1,
        "--use_teacher_server": 1,
        "--num_generations": 2,
        "--model_name_or_path": 3,
        "--use_peft": 3,
        "--dataset_name": 4,
        "--learning_rate": 5,
        "--bf16": 5,
    }
    for flag, group in flags.items():
        line = line_of(rf"^  {flag}\b")
        assert group == -1 or starts[group] < line, flag
        assert group + 1 >= len(starts) or line < starts[group + 1], flag
    first_flag = next(line for line in result.stdout.splitlines()[starts[0] :] if line.startswith("  --"))
    assert first_flag.startswith("  --lmbda ")


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--fp16"], {"fp16": True}),
        (["--fp16", "false"], {"fp16": False}),
        (["--bf16", "--use_cpu"], {"bf16": True, "use_cpu": True}),  # bf16: bool | None, bare failed before
        (["--bf16", "true", "--use_cpu", "true"], {"bf16": True}),
        (["--bf16", "false"], {"bf16": False}),
        (["--gradient_checkpointing"], {"gradient_checkpointing": True}),
        (["--gradient_checkpointing", "no"], {"gradient_checkpointing": False}),
        (["--tf32", "false"], {"tf32": False}),
        (["--disable_tqdm", "--logging_first_step"], {"disable_tqdm": True, "logging_first_step": True}),
        (["--use_teacher_server", "--teacher_model_server_url", "http://127.0.0.1:1"], {"use_teacher_server": True}),
        (["--use_teacher_server", "False"], {"use_teacher_server": False}),
        (["--use_peft"], {"use_peft": True}),
        (["--use_peft", "true", "--dataset_streaming"], {"use_peft": True, "dataset_streaming": True}),
        (["--no_loss_add_tail"], {"loss_add_tail": False}),
        (["--include_num_input_tokens_seen", "non_padding"], {"include_num_input_tokens_seen": "non_padding"}),
        (["--include_num_input_tokens_seen"], {"include_num_input_tokens_seen": "all"}),
    ],
)
def test_boolean_flags_bare_or_with_a_value(tmp_path, flags, expected):
    script_args, args, model_args = parse(
        ["--model_name_or_path", "s", "--teacher_model_name_or_path", "t", "--dataset_name", "d"]
        + ["--output_dir", str(tmp_path), "--report_to", "none", *flags]
    )
    for name, value in expected.items():
        holder = next(a for a in (args, model_args, script_args) if hasattr(a, name))
        assert getattr(holder, name) == value, name


def wrong_model_cases(tiny: dict[str, str], data: str) -> dict[str, tuple[list[str], str]]:
    """Command lines with one wrong model name, and what the error line must say."""
    train = ["train", "--dataset_name", data, "--report_to", "none"]
    return {
        "train-student-absolute": (
            [*train, "--model_name_or_path", "/abs/path/that/does/not/exist"]
            + ["--teacher_model_name_or_path", tiny["teacher"]],
            "the student model folder /abs/path/that/does/not/exist does not exist",
        ),
        "train-teacher-relative": (
            [*train, "--model_name_or_path", tiny["student"], "--teacher_model_name_or_path", "./teachr"],
            "the teacher model folder ./teachr does not exist (looked for ",
        ),
        "eval-student-hub-offline": (
            ["eval", "--model", "studnet", "--teacher", tiny["teacher"], "--dataset_name", data],
            "the student model 'studnet' is neither a local folder nor in the hub cache, and HF_HUB_OFFLINE is set",
        ),
        "serve-teacher": (["serve-teacher", "--model", "/nope"], "the teacher model folder /nope does not exist"),
        "eval-teacher": (
            ["eval", "--model", tiny["student"], "--teacher", "../teachr", "--dataset_name", data],
            "the teacher model folder ../teachr does not exist (looked for ",
        ),
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    ["train-student-absolute", "train-teacher-relative", "serve-teacher", "eval-teacher", "eval-student-hub-offline"],
)
def test_wrong_model_name_is_one_line_naming_role_and_path(tiny_paths, data_file, tmp_path, case):
    argv, message = wrong_model_cases(tiny_paths, data_file)[case]
    result = protege(*argv, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert message in one_error_line(result, argv[0])


def test_hub_name_with_no_hub_fails_at_once(tiny_paths, data_file, tmp_path):
    """A mistyped name, online but with the hub unreachable: one request, no retries, and a message that says so."""
    hub = f"http://127.0.0.1:{free_port()}"
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": hub, "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = protege(
        "eval", "--model", "studnet", "--teacher", tiny_paths["teacher"], "--dataset_name", data_file, env=env
    )
    line = one_error_line(result, "eval")
    assert f"the student model 'studnet' is neither a local folder nor in the hub cache, and the hub ({hub})" in line
    assert "could not be reached" in line


@pytest.mark.slow
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve-teacher", "--max-batch-tokens", "0"], "max_batch_tokens=0 must be >= 1"),
        (["demo", "--output-dir", "{file}"], "is a file, not a folder"),
    ],
)
def test_other_commands_report_load_errors_in_one_line(tiny_paths, tmp_path, argv, message):
    (tmp_path / "file").write_text("")
    argv = [arg.replace("{file}", str(tmp_path / "file")) for arg in argv]
    if argv[0] == "serve-teacher":
        argv += ["--model", tiny_paths["teacher"]]
    assert message in one_error_line(protege(*argv), argv[0])


@pytest.mark.slow
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
