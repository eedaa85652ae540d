"""Gradients of each divergence against cross-entropy, for one seed's warmed-up demo student on 64 reference chains.

Backs the figures in docs/benchmarks.md ("The GKD paper's comparison"): the teacher's probability of the reference
tokens, and, for DistillationTrainer's off-policy loss at beta 0 / 0.5 / 1, the cosine and norm ratio of its
gradient to the supervised cross-entropy gradient.

    python benchmarks/gkd_gradients.py --folder runs/gkd_table_fresh/seed0   # trains the models there if absent
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import Dataset
from rich.progress import Progress

from protege import DistillationConfig, DistillationTrainer
from protege.demo import pipeline, task
from protege.demo.encoder import next_token_logits
from protege.demo.settings import Settings


def flat_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--folder", default="runs/gkd_table_fresh/seed0")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = Settings(kl_problems=8)
    prepared = pipeline.prepare(Path(args.folder), settings, args.seed, Progress(disable=True))
    encoder, teacher = prepared.encoder, prepared.teacher
    problems = prepared.training_problems(settings, args.seed, 64, "distill")
    batch = encoder.batch(problems)
    labels = batch["labels"][:, 1:]
    with torch.no_grad():
        teacher_logp = next_token_logits(teacher, batch).log_softmax(-1)
    target = teacher_logp[labels.ne(-100)].gather(-1, labels[labels.ne(-100)][:, None]).exp()
    print(f"teacher probability of the reference tokens: mean {target.mean():.5f}, lowest {target.min():.4f}")

    student = copy.deepcopy(prepared.student)
    F.cross_entropy(next_token_logits(student, batch).transpose(1, 2), labels, ignore_index=-100).backward()
    sft = flat_grad(student)
    rows = Dataset.from_list([{"messages": task.conversation(p)} for p in problems])
    for beta in (0.0, 0.5, 1.0):
        student = copy.deepcopy(prepared.student)
        config = DistillationConfig(
            output_dir=str(Path(args.folder) / "gradients"),
            lmbda=0.0,
            beta=beta,
            loss_top_k=0,
            per_device_train_batch_size=64,
            max_completion_length=80,
            max_length=112,
            use_cpu=True,
            bf16=False,
            report_to="none",
        )
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=config, train_dataset=rows, processing_class=encoder.tokenizer
        )
        student.train()
        trainer.compute_loss(student, trainer.data_collator([trainer.train_dataset[i] for i in range(64)])).backward()
        grad = flat_grad(student)
        print(
            f"beta {beta}: cosine to the cross-entropy gradient {F.cosine_similarity(grad, sft, 0):.4f}, "
            f"norm ratio {grad.norm() / sft.norm():.3f}"
        )


if __name__ == "__main__":
    main()
