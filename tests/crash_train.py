"""Kill a training process with SIGKILL at named points of a checkpoint save, then resume it with
`resume_from_checkpoint=True`; run by test_resume and `python -m benchmarks safeguards crash_resume`.

    python crash_train.py STUDENT TEACHER WORKDIR SETTINGS_JSON POINT [POINT ...]

Training runs 8 optimizer steps and saves every 2 (keeping 2 checkpoints); the kill comes during the save at step 6, at
one of `POINTS`. This process imports the training stack once, then forks one process per run, so that each run is a
fresh process that really dies of SIGKILL, without paying for the imports again: an uninterrupted run, then for each
point a run killed there and a run that resumes after it. The report, WORKDIR/report.json, holds the uninterrupted
run's final weights digest and, per point, how the killed run ended and what the resumed run did.

SETTINGS_JSON overrides SETTINGS; its key "in_place": true saves and resumes as plain transformers does (checkpoint-N
written in place, the highest N resumed), the benchmark's baseline.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import traceback
import warnings
from pathlib import Path

import torch
from tiny import config, dataset
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import TrainerState
from transformers.trainer_utils import get_last_checkpoint

import protege.checkpoints
from protege import DistillationTrainer

SETTINGS = dict(max_steps=8, save_strategy="steps", save_steps=2, save_total_limit=2, lmbda=0.5)
KILL_STEP = 6
# Points of the save at KILL_STEP, in the order the save reaches them. "-torn" ones cut the file just written to half
# its size first, as a kill in the middle of writing it would.
POINTS = ("start", "model-torn", "model", "optimizer-torn", "rng", "trainer-state", "renamed", "saved")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def tear(path: str) -> None:
    with open(path, "r+b") as file:
        file.truncate(os.path.getsize(path) // 2)


class Crashing(DistillationTrainer):
    """Dies at `point` of the save at KILL_STEP (the points inside transformers' save are its methods' ends)."""

    point: str | None = None
    in_place = False

    def _at(self, point: str) -> bool:
        return self.point == point and self.state.global_step == KILL_STEP

    def _save_checkpoint(self, model, trial) -> None:
        if self._at("start"):
            die()
        if self.in_place:
            Trainer._save_checkpoint(self, model, trial)
        else:
            super()._save_checkpoint(model, trial)
        if self._at("saved"):
            die()

    def save_model(self, output_dir=None, _internal_call=False):
        super().save_model(output_dir, _internal_call)
        if self._at("model-torn"):
            tear(os.path.join(output_dir, "model.safetensors"))
        if self._at("model-torn") or self._at("model"):
            die()

    def _save_optimizer_and_scheduler(self, output_dir):
        super()._save_optimizer_and_scheduler(output_dir)
        if self._at("optimizer-torn"):
            tear(os.path.join(output_dir, "optimizer.pt"))
            die()

    def _save_rng_state(self, output_dir):
        super()._save_rng_state(output_dir)
        if self._at("rng"):
            die()


def install_module_hooks(trainer: Crashing) -> None:
    """Kill points outside the trainer's methods: after trainer_state.json is written, and after the rename."""
    save_to_json, publish = TrainerState.save_to_json, protege.checkpoints.publish

    def save_to_json_then_die(state, path):
        save_to_json(state, path)
        if trainer._at("trainer-state"):
            die()

    def publish_then_die(written, final):
        publish(written, final)
        if trainer._at("renamed"):
            die()

    TrainerState.save_to_json = save_to_json_then_die
    protege.checkpoints.publish = publish_then_die


class FirstStep(TrainerCallback):
    """The global step a run starts from (the resumed checkpoint's)."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.step = state.global_step


def digest(model: torch.nn.Module) -> str:
    hasher = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        hasher.update(name.encode())
        hasher.update(value.detach().cpu().numpy().tobytes())
    return hasher.hexdigest()


def run(student: str, teacher: str, out: Path, settings: dict, point: str | None, resume: bool) -> dict:
    """One training run in this (forked) process: killed at `point`, or to the end (resuming if `resume`)."""
    settings = dict(settings)
    in_place = settings.pop("in_place", False)
    args = config(out, **settings)
    trainer = Crashing(model=student, teacher_model=teacher, args=args, train_dataset=dataset(32, seed=3))
    trainer.point, trainer.in_place = point, in_place
    install_module_hooks(trainer)
    first = FirstStep()
    trainer.add_callback(first)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if resume and in_place:
            trainer.train(resume_from_checkpoint=get_last_checkpoint(args.output_dir))
        else:
            trainer.train(resume_from_checkpoint=True if resume else None)
    skipped = [str(w.message) for w in caught if "incomplete checkpoint" in str(w.message)]
    return {
        "resumed_from": first.step,
        "global_step": trainer.state.global_step,
        "digest": digest(trainer.model),
        "warning": skipped[0] if skipped else None,
    }


def forked(result_file: Path, *args) -> int:
    """`run(*args)` in a child process, its result written to `result_file`; the child's wait status."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            result = run(*args)
        except BaseException:
            result, code = {"error": traceback.format_exc()[-3000:]}, 1
        result_file.write_text(json.dumps(result))
        os._exit(code)
    return os.waitpid(pid, 0)[1]


def main(student: str, teacher: str, workdir: str, settings_json: str, *points: str) -> None:
    torch.set_num_threads(1)
    settings = {**SETTINGS, **json.loads(settings_json)}
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    forked(workdir / "straight.json", student, teacher, workdir / "straight", settings, None, False)
    report = {"straight": json.loads((workdir / "straight.json").read_text()), "points": {}}
    for point in points:
        folder = workdir / point
        status = forked(folder.with_suffix(".killed.json"), student, teacher, folder, settings, point, False)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        left = sorted(p.name for p in (folder / "out").iterdir() if p.is_dir())
        forked(folder.with_suffix(".json"), student, teacher, folder, settings, None, True)
        resumed = json.loads(folder.with_suffix(".json").read_text())
        report["points"][point] = {"killed": killed, "left": left, **resumed}
    (workdir / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main(*sys.argv[1:])
