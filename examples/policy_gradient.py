"""On-policy distillation as policy gradient, with a task reward beside the teacher.

The student samples; the teacher gives only the log-prob of each sampled token; the advantage of each token is the
teacher's log-ratio (kl_coef x (log p_teacher - log p_student)) plus the reward's advantage over the other samples of
the same prompt. Runs offline in seconds: the tokenizer and both models are built here (random weights, so the numbers
only show the mechanics). With real models, pass hub ids or folders, or a teacher server by URL (any OpenAI-compatible
server will do: teacher_server_protocol="openai").

    python examples/policy_gradient.py [OUTPUT_DIR]
"""

from __future__ import annotations

import re
import sys

from datasets import Dataset

from protege import DistillationConfig, DistillationTrainer
from protege.toy import arithmetic_rows, tiny_model, train_tokenizer


def correct_sum(prompts, completions, completion_ids, answer, **kwargs):
    """1 where the completion's last number is the row's `answer`, else 0 (TRL GRPOTrainer's reward signature:
    the dataset's columns arrive as keyword arguments)."""
    rewards = []
    for completion, expected in zip(completions, answer):
        numbers = re.findall(r"-?\d+", completion[0]["content"])  # conversational rows: a list of messages
        rewards.append(float(bool(numbers) and int(numbers[-1]) == expected))
    return rewards


def main(output_dir: str = "policy_gradient_output") -> None:
    rows = arithmetic_rows(64, seed=0)
    tokenizer = train_tokenizer([m["content"] for row in rows for m in row["messages"]], vocab_size=300)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    student, teacher = (
        tiny_model(len(tokenizer), layers, hidden, eos_token_id=eos, pad_token_id=pad, seed=seed)
        for layers, hidden, seed in ((2, 32, 0), (3, 64, 1))
    )
    answers = [int(row["messages"][1]["content"].rpartition("=")[2]) for row in rows]
    dataset = Dataset.from_list([row | {"answer": answer} for row, answer in zip(rows, answers)])
    args = DistillationConfig(
        output_dir=output_dir,
        on_policy_objective="policy_gradient",
        lmbda=1.0,  # every slice on the student's own samples
        kl_coef=1.0,  # the teacher's weight in the advantage; 0 (and no teacher) is RL on the reward alone
        num_generations=4,  # 4 samples a prompt: each reward is compared with its prompt's mean
        max_completion_length=12,
        per_device_train_batch_size=8,
        max_steps=4,
        logging_steps=2,
        learning_rate=1e-3,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        reward_funcs=[correct_sum],
    )
    trainer.train()
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(
                f"step {entry['step']}: reward {entry['reward/correct_sum/mean']:.3f}, teacher advantage "
                f"{entry['pg/teacher_advantage_mean']:.3f}, rho {entry['pg/rho_mean']:.3f}"
            )


if __name__ == "__main__":
    main(*sys.argv[1:2])
