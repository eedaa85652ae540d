"""Distil a student from a teacher of another tokenizer (cross-tokenizer, `use_uld_loss`), on-policy.

Runs offline in seconds: two byte-level tokenizers that split the same text differently (the teacher's has almost no
merges, about one token per character) and two small random models are built here. With real models, pass their hub
ids or folders and the teacher's tokenizer:

    python examples/another_tokenizer.py [OUTPUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from datasets import Dataset

from protege import DistillationConfig, DistillationTrainer
from protege.toy import arithmetic_rows, tiny_model, train_tokenizer


def main(output_dir: str = "another_tokenizer_output") -> None:
    rows = arithmetic_rows(64, seed=0)
    texts = [m["content"] for row in rows for m in row["messages"]]
    student_tokenizer = train_tokenizer(texts, vocab_size=300)
    teacher_tokenizer = train_tokenizer(texts, vocab_size=262)  # about a token per character
    teacher_tokenizer.save_pretrained(Path(output_dir) / "teacher_tokenizer")
    student = tiny_model(len(student_tokenizer), 2, 32, eos_token_id=student_tokenizer.eos_token_id, seed=0)
    teacher = tiny_model(len(teacher_tokenizer), 3, 64, eos_token_id=teacher_tokenizer.eos_token_id, seed=1)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20.0)  # a confident teacher, so there is something to learn
    args = DistillationConfig(
        output_dir=output_dir,
        use_uld_loss=True,  # cross-tokenizer: align by text, the teacher projected onto the student's next token
        teacher_tokenizer_name_or_path=str(Path(output_dir) / "teacher_tokenizer"),
        lmbda=1.0,  # on the student's own samples, decoded and re-tokenized for the teacher
        beta=0.5,
        max_completion_length=12,
        per_device_train_batch_size=4,
        max_steps=6,
        logging_steps=2,
        learning_rate=1e-2,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=Dataset.from_list(rows[:48]),
        eval_dataset=Dataset.from_list(rows[48:]),
        processing_class=student_tokenizer,
    )
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    print(f"held-out cross-tokenizer loss: {before:.4f} before, {trainer.evaluate()['eval_loss']:.4f} after")


if __name__ == "__main__":
    main(*sys.argv[1:2])
