"""Run by test_distributed under torchrun: train on one rank of several, then write what the test compares.

    python -m torch.distributed.run --nproc_per_node N dist_train.py STUDENT TEACHER OUT [SETTINGS_JSON]

SETTINGS_JSON overrides SETTINGS below (and "rows", the dataset size, 64 by default; "resume", passed to
`train(resume_from_checkpoint=...)`; "specialist", a second teacher's path: rows then alternate between the two
teachers; "teacher_cache", a cache folder, for no teacher model), so each test states only what it changes. Every
rank writes OUT/rank{R}.json; rank 0 also saves the trained weights to OUT/weights.pt.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from tiny import config, dataset
from transformers import TrainerCallback

from protege import DistillationTrainer

# test_trainer.config's settings, but for these: 4 micro-batches of 2 per step, short completions, both kinds of slice.
SETTINGS = dict(gradient_accumulation_steps=4, max_completion_length=8, max_length=40, lmbda=0.5)


class RecordFractions(TrainerCallback):
    def __init__(self) -> None:
        self.fractions: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "on_policy_fraction" in logs:
            self.fractions.append(logs["on_policy_fraction"])


def main(student: str, teacher: str, out: str, overrides: str = "{}") -> None:
    settings = {**SETTINGS, **json.loads(overrides)}
    rows = settings.pop("rows", 64)
    resume = settings.pop("resume", None)
    specialist = settings.pop("specialist", None)
    args = config(Path(out), **settings)
    train_dataset = dataset(rows)
    if specialist is not None:  # two teachers, rows routed to them in turn
        teacher = {"general": teacher, "specialist": specialist}
        train_dataset = train_dataset.map(lambda _, i: {"teacher": ("general", "specialist")[i % 2]}, with_indices=True)
    if args.teacher_cache is not None:  # every slice from the cache: no teacher model
        teacher = None
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=train_dataset)
    record = RecordFractions()
    trainer.add_callback(record)
    trainer.train(resume_from_checkpoint=resume)
    weights = {name: value.detach().cpu().to(torch.float32) for name, value in trainer.model.state_dict().items()}
    digest = hashlib.sha256()
    for name, value in sorted(weights.items()):
        digest.update(name.encode())
        digest.update(value.numpy().tobytes())
    rank = trainer.accelerator.process_index
    report = {
        "rank": rank,
        "world": trainer.accelerator.num_processes,
        "fractions": record.fractions,
        "weights": digest.hexdigest(),
        "loss": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "teacher_tokens": [
            [e[key] for key in sorted(e) if key.endswith("/completion_tokens")]
            for e in trainer.state.log_history
            if "loss" in e
        ],
    }
    if rank == 0:
        torch.save(weights, Path(out, "weights.pt"))
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))  # last: a report means this rank's files are whole
    if torch.distributed.is_initialized():  # close gloo's threads before exit (else, at times: "terminate called")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
