"""TRL side of the protege-vs-TRL CPU benchmark.

Standalone: run it with the interpreter of the separate TRL environment (``make trl-env`` creates
``.trl-env``), never with protege's environment. It imports only trl, transformers, torch,
datasets and the standard library.

    .trl-env/bin/python benchmarks/trl_worker.py --student DIR --teacher DIR --data FILE.jsonl \
        --steps 8 --warmup 2 --out result.json

It trains ``DistillationTrainer`` from ``trl.experimental.distillation`` (TRL 1.8.0) on CPU in
float32: no gradient checkpointing, no bf16, ``model.generate`` for on-policy samples (no vLLM),
no eval, no saving, logging every step, ``report_to="none"``.

Timing: a callback records ``time.perf_counter()`` on ``on_step_begin``/``on_step_end`` for every
optimizer step; steps after the first ``--warmup`` are summed into ``seconds``. The Trainer collates
(tokenizes) a step's batch *before* ``on_step_begin``, so that is outside ``seconds``; generation,
teacher forward, student forward/backward and the optimizer step are inside. ``wall_seconds`` is the
end of the last warm-up step to the end of the last step, so it includes collation and logging.

Token count: ``compute_loss`` is overridden only to count ``labels != -100`` in the inputs it gets
(the post-generation slices from TRL's buffer, so on-policy completions are counted at their
generated length), then it calls ``super()``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

# TRL's trainers ping HF telemetry on construction; keep the benchmark offline and quiet.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", required=True, help="student model folder (also holds the tokenizer)")
    p.add_argument("--teacher", required=True, help="teacher model folder")
    p.add_argument("--data", required=True, help="jsonl file with a 'messages' column")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps timed (after warm-up)")
    p.add_argument("--warmup", type=int, default=1, help="optimizer steps run first and not timed")
    p.add_argument("--batch", type=int, default=2, help="per_device_train_batch_size")
    p.add_argument("--grad-accum", type=int, default=8)
    p.add_argument("--max-completion-length", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lmbda", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.5)
    p.add_argument("--loss-top-k", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=None, help="generation top_p (default: TRL's default, 0.95)")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", required=True, help="where to write the result JSON")
    p.add_argument("--output-dir", default=None, help="Trainer output_dir (nothing is saved; default: a temp dir)")
    return p.parse_args(argv)


def read_jsonl(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                row = json.loads(line)
                rows.append({"messages": row["messages"]})
    return rows


def has_tokenizer(folder):
    return any(
        os.path.exists(os.path.join(folder, name))
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    )


def main(argv=None):
    args = parse_args(argv)

    import tempfile
    import warnings

    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.distillation import DistillationConfig, DistillationTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()

    total_steps = args.warmup + args.steps

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin = {}
            self.end = {}
            self.t_end = {}

        def on_step_begin(self, _args, state, control, **kwargs):
            # global_step is the number of finished steps, so step k (1-based) begins at global_step k-1.
            self.begin[state.global_step + 1] = time.perf_counter()

        def on_step_end(self, _args, state, control, **kwargs):
            self.end[state.global_step] = time.perf_counter()

    class CountingTrainer(DistillationTrainer):
        """Counts the completion tokens each optimizer step trains on; otherwise DistillationTrainer as is."""

        step_tokens: dict = {}
        step_items: dict = {}

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                step = self.state.global_step + 1
                n = int((inputs["labels"] != -100).sum().item())
                self.step_tokens[step] = self.step_tokens.get(step, 0) + n
                if num_items_in_batch is not None:
                    self.step_items[step] = float(num_items_in_batch)
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )

    tokenizer = AutoTokenizer.from_pretrained(args.student)
    if tokenizer.pad_token is None:
        raise SystemExit(f"tokenizer in {args.student} has no pad token")

    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32)
    # TRL loads the teacher's tokenizer from teacher.config._name_or_path to check that the vocabularies match.
    # A teacher folder without tokenizer files would make that load fail, so point it at the student's.
    if not has_tokenizer(args.teacher):
        teacher.config._name_or_path = args.student
    teacher_vocab_before = teacher.get_input_embeddings().weight.shape[0]

    train_dataset = datasets.Dataset.from_list(read_jsonl(args.data))

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="trl_worker_")
    config_kwargs = dict(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=total_steps,
        learning_rate=args.learning_rate,
        max_length=args.max_length,
        max_completion_length=args.max_completion_length,
        lmbda=args.lmbda,
        beta=args.beta,
        loss_top_k=args.loss_top_k,
        temperature=args.temperature,
        seed=args.seed,
        use_cpu=True,
        bf16=False,
        fp16=False,
        activation_checkpointing=False,  # transformers 5.x name of gradient_checkpointing
        use_vllm=False,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    if args.top_p is not None:
        config_kwargs["top_p"] = args.top_p

    timer = StepTimer()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = DistillationConfig(**config_kwargs)
        trainer = CountingTrainer(
            model=student,
            teacher_model=teacher,
            args=config,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            callbacks=[timer],
        )
    teacher_vocab_after = trainer.teacher_model.get_input_embeddings().weight.shape[0]
    init_warnings = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    for w in init_warnings:
        print(f"[trl_worker] setup warning: {w}", file=sys.stderr)

    t0 = time.perf_counter()
    trainer.train()
    total_seconds = time.perf_counter() - t0

    losses = {}
    for entry in trainer.state.log_history:
        if "loss" in entry and "step" in entry:
            losses[int(entry["step"])] = float(entry["loss"])

    timed = [s for s in range(args.warmup + 1, total_steps + 1) if s in timer.begin and s in timer.end]
    seconds = sum(timer.end[s] - timer.begin[s] for s in timed)
    tokens = sum(CountingTrainer.step_tokens.get(s, 0) for s in timed)
    wall_start = timer.end.get(args.warmup, timer.begin.get(args.warmup + 1))
    wall_seconds = (timer.end[timed[-1]] - wall_start) if timed and wall_start is not None else None

    # TRL normalizes each micro-batch's divergence sum by the Trainer's num_items_in_batch, which is counted on the
    # raw dataloader batches (dataset labels, and TRL's loader repeats the full generation batch grad_accum times).
    # per_token_losses re-normalizes the logged loss by the completion tokens actually trained on.
    per_token_losses = []
    for s in range(1, total_steps + 1):
        items, toks = CountingTrainer.step_items.get(s), CountingTrainer.step_tokens.get(s)
        if s in losses and items and toks:
            per_token_losses.append(losses[s] * items / toks)
        else:
            per_token_losses.append(None)

    result = {
        "steps_timed": len(timed),
        "seconds": seconds,
        "completion_tokens": tokens,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "final_loss": losses.get(total_steps),
        "losses": [losses.get(s) for s in range(1, total_steps + 1)],
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        # extras
        "torch_version": torch.__version__,
        "warmup_steps": args.warmup,
        "wall_seconds": wall_seconds,
        "train_seconds_total": total_seconds,
        "step_seconds": [
            (timer.end[s] - timer.begin[s]) if s in timer.begin and s in timer.end else None
            for s in range(1, total_steps + 1)
        ],
        "step_completion_tokens": [CountingTrainer.step_tokens.get(s) for s in range(1, total_steps + 1)],
        "num_items_in_batch": [CountingTrainer.step_items.get(s) for s in range(1, total_steps + 1)],
        "per_token_losses": per_token_losses,
        "teacher_vocab_rows": [teacher_vocab_before, teacher_vocab_after],
        "tokenizers_match": bool(trainer._local_teacher_tokenizer_matches_student),
        "top_p": trainer.top_p,
        "torch_threads": torch.get_num_threads(),
        "init_warnings": init_warnings,
        "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    print(
        json.dumps(
            {k: result[k] for k in ("steps_timed", "seconds", "completion_tokens", "tokens_per_second", "final_loss")}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
