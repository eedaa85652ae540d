"""Checkpoints and resume: saves that appear whole or not at all, `resume_from_checkpoint=True` after a kill at any
point of a save, a resumed run bit-exact with an uninterrupted one on- and off-policy, and a non-finite loss that stops
training before it reaches the weights or a checkpoint."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import config, dataset
from transformers import TrainerCallback

from protege import DistillationTrainer, NonFiniteLossError
from protege.checkpoints import publish
from protege.rollout import seeded

TESTS = Path(__file__).parent


def trainer_for(tiny_paths, tmp_path, rows: int = 32, **overrides) -> DistillationTrainer:
    return DistillationTrainer(
        model=tiny_paths["student"],
        teacher_model=tiny_paths["teacher"],
        args=config(tmp_path, **overrides),
        train_dataset=dataset(rows),
    )


def folders(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir())


class RecordFractions(TrainerCallback):
    def __init__(self) -> None:
        self.fractions: dict[int, float] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "on_policy_fraction" in logs:
            self.fractions[state.global_step] = logs["on_policy_fraction"]


@pytest.mark.slow
def test_resume_is_bit_exact_on_and_off_policy(tiny_paths, tmp_path):
    """8 steps straight, against 4 steps, a resume and 4 more: the same on/off-policy draws and the same weights, bit
    for bit, whether the student generates (lmbda 1), never does (lmbda 0) or each slice is drawn (lmbda 0.5)."""
    for lmbda in (0.0, 0.5, 1.0):
        common = dict(lmbda=lmbda, max_steps=8, save_strategy="steps", save_steps=4)
        straight = trainer_for(tiny_paths, tmp_path / f"straight{lmbda}", **common)
        straight_fractions = RecordFractions()
        straight.add_callback(straight_fractions)
        straight.train()
        checkpoint = tmp_path / f"straight{lmbda}" / "out" / "checkpoint-4"
        resumed = trainer_for(tiny_paths, tmp_path / f"resumed{lmbda}", **common)
        resumed_fractions = RecordFractions()
        resumed.add_callback(resumed_fractions)
        resumed.train(resume_from_checkpoint=str(checkpoint))
        assert resumed_fractions.fractions == {k: straight_fractions.fractions[k] for k in (5, 6, 7, 8)}
        if lmbda == 0.5:
            assert len(set(resumed_fractions.fractions.values())) > 1  # the draws differ between steps
        at_save = load_file(checkpoint / "model.safetensors")
        weights = resumed.model.state_dict()
        assert any(not torch.equal(weights[name], value) for name, value in at_save.items())  # the resume trained
        for name, value in straight.model.state_dict().items():
            assert torch.equal(weights[name], value), (lmbda, name, (weights[name] - value).abs().max().item())


def test_seeded_sampling_repeats_and_leaves_the_process_rng_alone():
    cpu, before = torch.device("cpu"), torch.random.get_rng_state()
    with seeded(7, cpu):
        first = torch.rand(4)
    assert torch.equal(torch.random.get_rng_state(), before)
    with seeded(7, cpu):
        assert torch.equal(torch.rand(4), first)


def test_publish_replaces_a_checkpoint_of_the_same_name(tmp_path):
    """An earlier run's checkpoint-2 in the same output folder gives way whole to the new one."""
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "old").write_text("")
    (tmp_path / "tmp-checkpoint-2" / "checkpoint-2").mkdir(parents=True)
    (tmp_path / "tmp-checkpoint-2" / "checkpoint-2" / "new").write_text("")
    publish(str(tmp_path / "tmp-checkpoint-2" / "checkpoint-2"), str(tmp_path / "checkpoint-2"))
    assert folders(tmp_path) == ["checkpoint-2"] and os.listdir(tmp_path / "checkpoint-2") == ["new"]


def test_publish_flushes_the_checkpoint_to_disk_before_the_rename_and_the_rename_after(tmp_path, monkeypatch):
    """A power loss after the rename must not leave a `checkpoint-N` of empty or partial files (the files' data and the
    rename reach the disk in any order unless forced)."""
    staged = tmp_path / "tmp-checkpoint-3" / "checkpoint-3"
    (staged / "global_step3").mkdir(parents=True)
    for name in ("model.safetensors", "trainer_state.json", "global_step3/optim_states.pt"):
        (staged / name).write_text(name)
    events = []
    real_rename = os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))))
    monkeypatch.setattr(os, "rename", lambda a, b: events.append(("rename", str(b))) or real_rename(a, b))
    publish(str(staged), str(tmp_path / "checkpoint-3"))
    rename = events.index(("rename", str(tmp_path / "checkpoint-3")))
    synced_before = {path for kind, path in events[:rename] if kind == "fsync"}
    files = ["model.safetensors", "trainer_state.json", "global_step3/optim_states.pt"]
    assert synced_before == {str(staged / name) for name in [*files, "global_step3"]} | {str(staged)}
    assert events[rename + 1 :] == [("fsync", str(tmp_path))]
    published = tmp_path / "checkpoint-3"
    assert [(published / name).read_text() for name in files] == files


@pytest.mark.parametrize(("errno_code", "published"), [(errno.EINVAL, True), (errno.ENOTSUP, True), (errno.EIO, False)])
def test_publish_on_a_filesystem_that_cannot_fsync(tmp_path, monkeypatch, errno_code, published):
    """Filesystems that refuse fsync (some FUSE and network ones) still get their checkpoint; a failing disk (EIO)
    stops the save before the rename, so the previous checkpoint stays the newest."""
    staged = tmp_path / "tmp-checkpoint-3" / "checkpoint-3"
    staged.mkdir(parents=True)
    (staged / "trainer_state.json").write_text("{}")

    def refuse(descriptor):
        raise OSError(errno_code, os.strerror(errno_code))

    monkeypatch.setattr(os, "fsync", refuse)
    if published:
        publish(str(staged), str(tmp_path / "checkpoint-3"))
    else:
        with pytest.raises(OSError, match="Input/output error"):
            publish(str(staged), str(tmp_path / "checkpoint-3"))
    assert (tmp_path / "checkpoint-3").is_dir() == published


class Score(TrainerCallback):
    """An evaluation score by step, so that the best checkpoint is known: step 1, then step 3."""

    SCORES = {1: 5.0, 2: 1.0, 3: 9.0, 4: 2.0}

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics["eval_score"] = self.SCORES[state.global_step]


def test_staged_saves_keep_rotation_and_the_best_checkpoint(tiny_paths, tmp_path):
    """A checkpoint saved while it is the best records its final name, not the staging one; rotation keeps the best
    and the newest; the best is loaded at the end; no staging folder is left."""
    trainer = DistillationTrainer(
        model=tiny_paths["student"],
        teacher_model=tiny_paths["teacher"],
        args=config(
            tmp_path,
            lmbda=0.0,
            max_steps=4,
            save_strategy="steps",
            save_steps=1,
            eval_strategy="steps",
            eval_steps=1,
            save_total_limit=2,
            metric_for_best_model="score",
            greater_is_better=True,
            load_best_model_at_end=True,
        ),
        train_dataset=dataset(32),
        eval_dataset=dataset(4, seed=7),
    )
    trainer.add_callback(Score())
    trainer.train()
    out = tmp_path / "out"
    best = str(out / "checkpoint-3")
    assert folders(out) == ["checkpoint-3", "checkpoint-4"]
    assert trainer.state.best_model_checkpoint == best
    for step in (3, 4):
        assert (
            json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["best_model_checkpoint"] == best
        )
    for name, value in load_file(out / "checkpoint-3" / "model.safetensors").items():
        assert torch.equal(trainer.model.state_dict()[name], value), name


class FirstStep(TrainerCallback):
    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.step = state.global_step


@pytest.mark.slow
def test_resume_true_skips_incomplete_checkpoints_with_a_warning(tiny_paths, tmp_path):
    common = dict(lmbda=0.0, save_strategy="steps", save_steps=2)
    trainer_for(tiny_paths, tmp_path, max_steps=4, **common).train()
    out = tmp_path / "out"
    shutil.copytree(out / "checkpoint-4", out / "tmp-checkpoint-6" / "checkpoint-6")  # a staged save, killed
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-8")  # a save in place (not staged), killed
    (out / "checkpoint-8" / "trainer_state.json").unlink()
    resumed = trainer_for(tiny_paths, tmp_path, max_steps=6, **common)
    first = FirstStep()
    resumed.add_callback(first)
    match = r"skipping incomplete checkpoint folders .*: checkpoint-8, tmp-checkpoint-6; resuming from checkpoint-4"
    with pytest.warns(UserWarning, match=match):
        resumed.train(resume_from_checkpoint=True)
    assert first.step == 4 and resumed.state.global_step == 6
    # The save at step 6 replaced the leftover staging folder; the unstaged remnant stays, still skipped.
    assert folders(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6", "checkpoint-8"]

    (tmp_path / "none" / "out" / "checkpoint-2").mkdir(parents=True)
    empty = trainer_for(tiny_paths, tmp_path / "none", max_steps=4, **common)
    warns = pytest.warns(UserWarning, match="checkpoint-2; resuming from none")
    with warns, pytest.raises(ValueError, match="No complete checkpoint found"):
        empty.train(resume_from_checkpoint=True)


@pytest.mark.slow
def test_killed_saves_resume_to_the_uninterrupted_weights(tiny_paths, tmp_path):
    """A real training process (tests/crash_train.py) killed with SIGKILL inside the save at step 6, with the model
    file cut short, after the RNG states, and after the rename: `resume_from_checkpoint=True` then finishes the 8 steps
    with the weights of a run that was never killed."""
    points = ("model-torn", "rng", "renamed")
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(TESTS / "crash_train.py"), tiny_paths["student"], tiny_paths["teacher"]]
    result = subprocess.run(
        [*command, str(tmp_path), "{}", *points], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["straight"]["global_step"] == 8
    for point in points:
        run = report["points"][point]
        assert "error" not in run, run["error"]
        assert run["killed"], point
        assert run["global_step"] == 8 and run["digest"] == report["straight"]["digest"], point
    for point in ("model-torn", "rng"):
        run = report["points"][point]
        assert run["left"] == ["checkpoint-2", "checkpoint-4", "tmp-checkpoint-6"] and run["resumed_from"] == 4
        assert "tmp-checkpoint-6" in run["warning"]
    run = report["points"]["renamed"]  # published, killed before rotation
    assert run["left"] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"] and run["resumed_from"] == 6
    assert run["warning"] is None


class PoisonTeacherAfterSave(TrainerCallback):
    """After the save at step 2: remember the student's weights, then put a NaN in the teacher's LM head (as an fp16
    teacher that overflows would), so that step 3's loss is NaN."""

    def __init__(self, trainer: DistillationTrainer) -> None:
        self.trainer, self.saved = trainer, None

    def on_save(self, args, state, control, **kwargs):
        self.saved = {k: v.clone() for k, v in self.trainer.model.state_dict().items()}
        with torch.no_grad():
            self.trainer.teacher_model.get_output_embeddings().weight[0, 0] = float("nan")


def test_nonfinite_loss_stops_training_before_the_update(tiny_paths, tmp_path):
    trainer = trainer_for(tiny_paths, tmp_path, lmbda=0.0, max_steps=4, save_strategy="steps", save_steps=2)
    poison = PoisonTeacherAfterSave(trainer)
    trainer.add_callback(poison)
    with pytest.raises(NonFiniteLossError, match=r"loss was nan .*at optimizer step 3 .*Likely causes: a teacher"):
        trainer.train()
    assert trainer.state.global_step == 2
    for name, value in trainer.model.state_dict().items():  # the failed step changed nothing
        assert torch.equal(value, poison.saved[name]), name
    out = tmp_path / "out"
    assert folders(out) == ["checkpoint-2"]
    for name, value in load_file(out / "checkpoint-2" / "model.safetensors").items():
        assert torch.isfinite(value).all() and torch.equal(value, poison.saved[name]), name
