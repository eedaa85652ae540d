"""Distil one student from two teachers in one run, each row scored by the teacher its `teacher` column names.

Runs offline in seconds: the tokenizer and the three models are built here (random weights, so the numbers only show
the mechanics). With real models, pass hub ids or folders instead, and teacher servers by URL:

    python examples/several_teachers.py [OUTPUT_DIR]
"""

from __future__ import annotations

import sys

from datasets import Dataset

from protege import DistillationConfig, DistillationTrainer
from protege.toy import arithmetic_rows, tiny_model, train_tokenizer


def main(output_dir: str = "several_teachers_output") -> None:
    rows = arithmetic_rows(64, seed=0)
    tokenizer = train_tokenizer([m["content"] for row in rows for m in row["messages"]], vocab_size=300)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    student, math, code = (
        tiny_model(len(tokenizer), layers, hidden, eos_token_id=eos, pad_token_id=pad, seed=seed)
        for layers, hidden, seed in ((2, 32, 0), (3, 64, 1), (3, 64, 2))
    )
    # Each row names its teacher; default_teacher would take rows without one.
    dataset = Dataset.from_list([row | {"teacher": ("math", "code")[i % 2]} for i, row in enumerate(rows)])
    args = DistillationConfig(
        output_dir=output_dir,
        lmbda=0.5,  # half the slices on the student's own samples, each sent to its row's teacher
        beta=0.5,
        loss_top_k=0,
        max_completion_length=12,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=4,
        logging_steps=2,
        learning_rate=1e-3,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model={"math": math, "code": code},  # or paths; servers: teacher_model_server_url={"code": URL}
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()
    for entry in trainer.state.log_history:
        if "loss" in entry:
            losses = {name: entry[f"teacher/{name}/loss"] for name in ("math", "code")}
            print(f"step {entry['step']}: loss per teacher {losses}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
