"""`protege train` answers --help, a mistyped flag or key and a missing path before torch and transformers load, from
what the first full parse kept (`commands.train_quick`), with the full parse's own text and messages."""

from __future__ import annotations

import subprocess
import sys

import pytest

from protege.commands import train_quick

PROBE = (
    "import sys; from protege.cli import main; code = main(sys.argv[1:]); "
    "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded'); sys.exit(code)"
)


def test_quick_answers_come_from_what_the_full_parse_kept(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PROTEGE_CACHE_DIR", str(tmp_path))
    assert train_quick.quick_answer(["--lmbad", "0.5"]) is None  # nothing kept yet: the full path decides
    train_quick.remember("usage: protege train ...\n", ["--lmbda", "--beta", "--config", "--dataset_name"], ["lmbda"])
    assert train_quick.quick_answer(["--help"]) == 0
    assert capsys.readouterr().out == "usage: protege train ...\n"
    assert train_quick.quick_answer(["--lmbad", "0.5", "--beta=1"]) == 2
    assert capsys.readouterr().err == "protege train: error: unknown flag --lmbad (did you mean --lmbda?)\n"
    assert train_quick.quick_answer(["--dataset_name", str(tmp_path / "none.jsonl")]) == 2
    assert capsys.readouterr().err == f"protege train: error: dataset file {tmp_path / 'none.jsonl'} does not exist\n"
    config = tmp_path / "run.yaml"
    config.write_text("lmbad: 0.5\n")
    assert train_quick.quick_answer(["--config", str(config)]) == 2
    assert capsys.readouterr().err == f"protege train: error: unknown key(s) in {config}: lmbad (did you mean lmbda?)\n"
    assert train_quick.quick_answer(["--lmbda", "0.5", "--beta", "1"]) is None  # all fine so far: the full path


def test_what_is_kept_is_named_by_the_transformers_version_and_protege_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("PROTEGE_CACHE_DIR", str(tmp_path))
    before = train_quick.cache_file()
    monkeypatch.setattr(train_quick.metadata, "version", lambda name: "0.0.1")
    assert train_quick.cache_file() != before and train_quick.cache_file().parent == before.parent


@pytest.mark.slow
def test_a_second_run_answers_without_loading_torch(tmp_path):
    env = {"PROTEGE_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}

    def protege_train(*args: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-c", PROBE, "train", *args]
        return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)

    full = subprocess.run(
        [sys.executable, "-m", "protege", "train", "--help"], capture_output=True, text=True, env=env, timeout=300
    )
    assert full.returncode == 0 and "--lmbda" in full.stdout
    quick = protege_train("--help")
    assert quick.stdout == full.stdout + "torch not loaded\n"
    typo = protege_train("--lmbad", "0.5")
    assert typo.returncode == 2 and typo.stdout == "torch not loaded\n"
    assert typo.stderr == "protege train: error: unknown flag --lmbad (did you mean --lmbda?)\n"
    missing = protege_train("--model_name_or_path", "./no-such-student", "--dataset_name", "rows.jsonl")
    assert missing.returncode == 2 and missing.stdout == "torch not loaded\n"
    assert missing.stderr.startswith("protege train: error: the student model folder ./no-such-student does not")
