"""`protege train` and its output_dir: one line saying where outputs go, and no silent mixing with an earlier run."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from protege.commands.errors import UsageError
from protege.commands.train import check_output_dir, parse

NAMES = ["--model_name_or_path", "s", "--teacher_model_name_or_path", "t", "--dataset_name", "d", "--report_to", "none"]


def args_for(*flags: str):
    _, args, _ = parse([*NAMES, *flags])
    return args


@pytest.mark.parametrize(
    "leftover",
    [
        "checkpoint-10/",
        "tmp-checkpoint-20/",  # a save killed before it was published
        "model.safetensors",
        "model-00001-of-00002.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "adapter_model.safetensors",
        "adapter_config.json",
        "config.json",
        "trainer_state.json",
    ],
)
def test_an_earlier_run_is_refused_unless_resumed_or_overwritten(tmp_path, leftover):
    out = tmp_path / "out"
    (out / leftover).parent.mkdir(parents=True, exist_ok=True)
    (out / leftover).mkdir() if leftover.endswith("/") else (out / leftover).write_text("{}")
    message = f"--output_dir {out} already holds an earlier run ({leftover.rstrip('/')})"
    with pytest.raises(UsageError, match=re.escape(message)):
        check_output_dir(args_for("--output_dir", str(out)))
    assert check_output_dir(args_for("--output_dir", str(out), "--overwrite_output_dir")) == (
        f"protege train: checkpoints and the trained model go to {out} (over the earlier run there: "
        "--overwrite_output_dir)"
    )
    notice = check_output_dir(args_for("--output_dir", str(out), "--resume_from_checkpoint", "true"))
    assert notice.endswith("(resuming the run there)")
    with pytest.raises(UsageError, match="already holds an earlier run"):
        check_output_dir(args_for("--output_dir", str(out), "--resume_from_checkpoint", "false"))


def test_a_new_or_unrelated_folder_is_fine_and_named(tmp_path, monkeypatch):
    notice = check_output_dir(args_for("--output_dir", str(tmp_path / "new")))
    assert notice == f"protege train: checkpoints and the trained model go to {tmp_path / 'new'}"
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "runs").mkdir()  # tensorboard logs are not a model
    assert check_output_dir(args_for("--output_dir", str(tmp_path), "--overwrite_output_dir", "false")).endswith(
        str(tmp_path)
    )
    # Without --output_dir, transformers picks ./trainer_output: the line says so, with the absolute path.
    monkeypatch.chdir(tmp_path)
    assert check_output_dir(args_for()) == (
        f"protege train: checkpoints and the trained model go to {tmp_path / 'trainer_output'} "
        "(transformers' default: choose another with --output_dir)"
    )
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        check_output_dir(args_for("--output_dir", str(tmp_path / "file")))


@pytest.mark.slow
def test_the_command_refuses_in_one_line_before_loading_the_data(tiny_paths, tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-5").mkdir(parents=True)
    models = ["--model_name_or_path", tiny_paths["student"], "--teacher_model_name_or_path", tiny_paths["teacher"]]
    result = subprocess.run(
        [sys.executable, "-m", "protege", "train", *models, "--dataset_name", "absent.jsonl", "--output_dir", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"protege train: error: --output_dir {out} already holds an earlier run (checkpoint-5): pass "
        "--resume_from_checkpoint to continue it, --overwrite_output_dir to train over it, or another --output_dir"
    ]


def test_overwrite_output_dir_is_listed_with_the_training_flags():
    from protege.commands.train import TRAINING_GROUP, build_parser

    parser = build_parser()
    group = next(g for g in parser._action_groups if g.title == TRAINING_GROUP)
    assert "--overwrite_output_dir" in [option for action in group._group_actions for option in action.option_strings]
