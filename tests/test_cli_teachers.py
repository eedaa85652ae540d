"""Several teachers on the command line: `--teacher NAME=PATH_OR_URL` (repeatable), a YAML mapping, and a real run."""

from __future__ import annotations

import json

import pytest
from test_cli import common, protege
from tiny import dataset

from protege.commands.errors import UsageError
from protege.commands.train import parse

BASE = ["--model_name_or_path", "s", "--dataset_name", "d", "--report_to", "none"]


def test_teacher_flags_map_names_to_models_and_servers(tmp_path):
    _, args, _ = parse(
        [*BASE, "--output_dir", str(tmp_path), "--teacher", "math=./math", "--teacher=code=http://127.0.0.1:9"]
        + ["--teacher_server_response_format", '{"code": "hidden"}', "--beta", "0"]
    )
    assert args.teacher_model_name_or_path == {"math": "./math"}
    assert args.teacher_model_server_url == {"code": "http://127.0.0.1:9"}
    assert args.use_teacher_server and args.teacher_server_response_format == {"code": "hidden"}


def test_yaml_mapping_of_teachers(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("teacher_model_name_or_path:\n  math: ./math\n  code: ./code\ndefault_teacher: math\n")
    _, args, _ = parse([*BASE, "--output_dir", str(tmp_path), "--config", str(config)])
    assert args.teacher_model_name_or_path == {"math": "./math", "code": "./code"}
    assert args.default_teacher == "math" and not args.use_teacher_server


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--teacher", "math"], "--teacher takes NAME=PATH_OR_URL, got 'math'"),
        (["--teacher", "math=a", "--teacher", "math=b"], "--teacher 'math' is given twice"),
        (["--teacher", "a=x", "--teacher_model_name_or_path", "t"], "not both"),
    ],
)
def test_teacher_flag_mistakes(tmp_path, flags, message):
    with pytest.raises(UsageError, match=message):
        parse([*BASE, "--output_dir", str(tmp_path), *flags])


@pytest.mark.slow
def test_train_with_two_teachers(tiny_paths, tmp_path):
    data = tmp_path / "routed.jsonl"
    names = ("general", "specialist")
    data.write_text(
        "\n".join(json.dumps(row | {"teacher": names[i % 2]}) for i, row in enumerate(dataset(16).to_list()))
    )
    argv = common(tiny_paths, str(data), tmp_path / "out")
    position = argv.index("--teacher_model_name_or_path")
    argv[position : position + 2] = ["--teacher", f"general={tiny_paths['teacher']}"]
    argv += ["--teacher", f"specialist={tiny_paths['specialist']}", "--max_steps", "2", "--lmbda", "0.5"]
    argv += ["--disable_tqdm", "false", "--logging_steps", "1"]
    result = protege("train", *argv)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert result.stderr.splitlines()[-1].endswith(str(tmp_path / "out"))  # no one-teacher eval command to suggest


@pytest.mark.slow
def test_eval_scores_each_row_against_its_own_teacher(tiny_paths, tmp_path):
    """Per-teacher KL equals a one-teacher eval of that teacher's rows, and the overall figure is their token-weighted
    mean."""
    names = ("general", "specialist")
    rows = [row | {"teacher": names[i % 2]} for i, row in enumerate(dataset(8).to_list())]
    for name, subset in [("all", rows)] + [(n, [r for r in rows if r["teacher"] == n]) for n in names]:
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in subset))
    teachers = [f"--teacher={name}={tiny_paths['teacher' if name == 'general' else name]}" for name in names]
    result = protege(
        "eval",
        "--model",
        tiny_paths["student"],
        *teachers,
        "--dataset_name",
        str(tmp_path / "all.jsonl"),
        "--output",
        str(tmp_path / "mixed.json"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    mixed = json.loads((tmp_path / "mixed.json").read_text())
    assert mixed["rows"] == 8 and mixed["teacher/general/rows"] == mixed["teacher/specialist/rows"] == 4
    tokens, weighted = 0, 0.0
    for name in names:
        path = tiny_paths["teacher" if name == "general" else name]
        single = protege(
            "eval",
            "--model",
            tiny_paths["student"],
            "--teacher",
            path,
            "--dataset_name",
            str(tmp_path / f"{name}.jsonl"),
            "--output",
            str(tmp_path / f"{name}.json"),
        )
        assert single.returncode == 0, single.stderr[-3000:]
        alone = json.loads((tmp_path / f"{name}.json").read_text())
        assert mixed[f"teacher/{name}/kl_teacher_student"] == pytest.approx(alone["kl_teacher_student"], rel=1e-6)
        tokens += alone["completion_tokens"]
        weighted += alone["kl_teacher_student"] * alone["completion_tokens"]
    assert mixed["kl_teacher_student"] == pytest.approx(weighted / tokens, rel=1e-6)
    (tmp_path / "plain.jsonl").write_text("\n".join(json.dumps(r) for r in dataset(4).to_list()))
    plain = protege(
        "eval", "--model", tiny_paths["student"], *teachers, "--dataset_name", str(tmp_path / "plain.jsonl")
    )
    assert plain.returncode == 2 and "has no 'teacher' column" in plain.stderr
