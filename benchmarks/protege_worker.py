"""protege side of the protege-vs-TRL CPU benchmark (the counterpart of ``trl_worker.py``).

Run it with protege's interpreter; ``vs_trl.py`` starts it as a subprocess, as it starts the TRL worker, so both run in
a fresh process with the same thread count. Same flags and the same result keys as ``trl_worker.py``:

    python benchmarks/protege_worker.py --student DIR --teacher DIR --data FILE.jsonl --steps 8 --warmup 2 --out r.json

It trains ``protege.DistillationTrainer`` on CPU in float32 with the settings the TRL worker passes to TRL: no
activation (gradient) checkpointing, no bf16, ``model.generate`` for on-policy samples, no eval, no saving, logging
every step, ``report_to="none"``.

Timing: protege generates a step's completions in ``get_batch_samples``, which the transformers loop calls BEFORE
``on_step_begin``, so ``on_step_begin``..``on_step_end`` would leave generation out. ``seconds`` is therefore the wall
time from the ``on_step_end`` of the last warm-up step to the ``on_step_end`` of the last step (collation, generation,
teacher and student passes, optimizer step and logging all inside): the TRL worker's ``wall_seconds``, measured the
same way. ``inside_step_seconds`` (``on_step_begin``..``on_step_end``, without generation) is reported for reference.

Token count: ``compute_loss`` is overridden only to count ``labels != -100`` in the inputs it gets (each slice after
generation, so on-policy completions count at their generated length), then it calls ``super()``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
    p.add_argument("--top-p", type=float, default=None, help="generation top_p (default: protege's default, 0.95)")
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
                rows.append({"messages": json.loads(line)["messages"]})
    return rows


def main(argv=None):
    args = parse_args(argv)

    import tempfile
    import warnings

    import datasets
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    import protege
    from protege import DistillationConfig, DistillationTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    total_steps = args.warmup + args.steps

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.end = {}, {}

        def on_train_begin(self, _args, state, control, **kwargs):
            self.end[0] = time.perf_counter()  # "end of step 0": the loop starts fetching step 1 right after

        def on_step_begin(self, _args, state, control, **kwargs):
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
    student = AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32)
    train_dataset = datasets.Dataset.from_list(read_jsonl(args.data))

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="protege_worker_")
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
        activation_checkpointing=False,
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
    init_warnings = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    for w in init_warnings:
        print(f"[protege_worker] setup warning: {w}", file=sys.stderr)

    t0 = time.perf_counter()
    trainer.train()
    total_seconds = time.perf_counter() - t0

    logs = {int(e["step"]): e for e in trainer.state.log_history if "loss" in e and "step" in e}
    losses = {s: float(e["loss"]) for s, e in logs.items()}

    timed = [s for s in range(args.warmup + 1, total_steps + 1) if s in timer.end and s - 1 in timer.end]
    seconds = sum(timer.end[s] - timer.end[s - 1] for s in timed)
    inside = sum(timer.end[s] - timer.begin[s] for s in timed if s in timer.begin)
    tokens = sum(CountingTrainer.step_tokens.get(s, 0) for s in timed)

    def mean_logged(key):
        values = [logs[s][key] for s in timed if s in logs and key in logs[s]]
        return sum(values) / len(values) if values else None

    steps = range(1, total_steps + 1)
    result = {
        "steps_timed": len(timed),
        "seconds": seconds,
        "completion_tokens": tokens,
        "tokens_per_second": tokens / seconds if seconds > 0 else None,
        "final_loss": losses.get(total_steps),
        "losses": [losses.get(s) for s in steps],
        "protege_version": protege.__version__,
        "transformers_version": transformers.__version__,
        # extras
        "torch_version": torch.__version__,
        "warmup_steps": args.warmup,
        "wall_seconds": seconds,
        "inside_step_seconds": inside,
        "train_seconds_total": total_seconds,
        "step_seconds": [
            (timer.end[s] - timer.end[s - 1]) if s in timer.end and s - 1 in timer.end else None for s in steps
        ],
        "step_completion_tokens": [CountingTrainer.step_tokens.get(s) for s in steps],
        "num_items_in_batch": [CountingTrainer.step_items.get(s) for s in steps],
        # protege divides each step's divergence sum by the step's completion tokens: the logged loss is per token.
        "per_token_losses": [losses.get(s) for s in steps],
        "logged_completion_tokens_per_second": mean_logged("completion_tokens_per_second"),
        "mean_generation_s_per_step": mean_logged("time/generation_s"),
        "mean_teacher_s_per_step": mean_logged("time/teacher_s"),
        "mean_student_s_per_slice": mean_logged("time/student_s"),
        "top_p": trainer.generation_config.top_p,
        "activation_checkpointing": bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
        "torch_threads": torch.get_num_threads(),
        "init_warnings": init_warnings,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
    summary = ("steps_timed", "seconds", "completion_tokens", "tokens_per_second", "final_loss")
    print(json.dumps({k: result[k] for k in summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
