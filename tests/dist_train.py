"""Run by test_distributed under torchrun: train on one rank of several, then write what the test compares."""

import hashlib
import json
import sys
from pathlib import Path

import torch
from tiny import dataset
from transformers import TrainerCallback

from protege import DistillationConfig, DistillationTrainer


class RecordFractions(TrainerCallback):
    def __init__(self):
        self.fractions = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "on_policy_fraction" in logs:
            self.fractions.append(logs["on_policy_fraction"])


def main(student: str, teacher: str, out: str) -> None:
    args = DistillationConfig(
        output_dir=out,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=4,
        max_steps=4,
        logging_steps=1,
        report_to="none",
        learning_rate=1e-2,
        max_completion_length=8,
        max_length=40,
        save_strategy="no",
        lmbda=0.5,
        beta=0.5,
        loss_top_k=0,
        seed=0,
        disable_tqdm=True,
    )
    trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset(64))
    record = RecordFractions()
    trainer.add_callback(record)
    trainer.train()
    digest = hashlib.sha256()
    for name, value in sorted(trainer.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().to(torch.float32).numpy().tobytes())
    rank = trainer.accelerator.process_index
    report = {
        "rank": rank,
        "world": trainer.accelerator.num_processes,
        "fractions": record.fractions,
        "weights": digest.hexdigest(),
        "loss": [e["loss"] for e in trainer.state.log_history if "loss" in e],
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:4])
