"""TRL side of the protege-vs-TRL CPU benchmark.

Standalone: run it with the interpreter of the separate TRL environment (``make trl-env`` creates
``.trl-env``), never with protege's environment. It imports only trl, transformers, torch,
datasets, the standard library and ``workers.py`` next to it (standard library only). Its flags
are ``workers.WorkerRun``'s, as ``protege_worker.py``'s; it prints its result as one
``RESULT {json}`` line (``workers.emit_result``):

    .trl-env/bin/python benchmarks/trl_worker.py --student DIR --teacher DIR --data FILE.jsonl \
        --steps 8 --warmup 2

It trains ``DistillationTrainer`` from ``trl.experimental.distillation`` (TRL 1.8.0) on CPU in
float32: no gradient checkpointing, no bf16, ``model.generate`` for on-policy samples (no vLLM),
no eval, no saving, logging every step, ``report_to="none"``.

Timing: a callback records ``time.perf_counter()`` on ``on_step_begin``/``on_step_end`` for every
optimizer step; steps after the first ``--warmup`` are summed into ``seconds``. The Trainer collates
(tokenizes) a step's batch *before* ``on_step_begin``, so that is outside ``seconds``; generation,
teacher forward, student forward/backward and the optimizer step are inside. ``wall_seconds`` is the
end of the last warm-up step to the end of the last step, so it includes collation and logging.

Token count: ``workers.counting_trainer`` overrides ``compute_loss`` only to count
``labels != -100`` in the inputs it gets (the post-generation slices from TRL's buffer, so
on-policy completions are counted at their generated length), then calls ``super()``.
"""

from __future__ import annotations

import os
import sys

# workers.py is standard library only: nothing from protege enters this environment.
from workers import WorkerRun, build_trainer, emit_result, load_inputs, parse, result, train

# TRL's trainers ping HF telemetry on construction; keep the benchmark offline and quiet.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def has_tokenizer(folder):
    return any(
        os.path.exists(os.path.join(folder, name))
        for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    )


def main(argv=None):
    args = parse(WorkerRun, argv, __doc__.split("\n\n")[0])

    import datasets
    import torch
    import transformers
    import trl
    from transformers import TrainerCallback
    from trl.experimental.distillation import DistillationConfig, DistillationTrainer

    tokenizer, student, teacher, train_dataset = load_inputs(args, torch, datasets, transformers)
    if tokenizer.pad_token is None:
        raise SystemExit(f"tokenizer in {args.student} has no pad token")
    # TRL loads the teacher's tokenizer from teacher.config._name_or_path to check that the vocabularies match.
    # A teacher folder without tokenizer files would make that load fail, so point it at the student's.
    if not has_tokenizer(args.teacher):
        teacher.config._name_or_path = args.student
    teacher_vocab_before = teacher.get_input_embeddings().weight.shape[0]

    inputs = dict(model=student, teacher_model=teacher, train_dataset=train_dataset, processing_class=tokenizer)
    trainer, timer, init_warnings = build_trainer(
        args, "trl_worker", DistillationConfig, DistillationTrainer, TrainerCallback, **inputs
    )
    teacher_vocab_after = trainer.teacher_model.get_input_embeddings().weight.shape[0]
    total_seconds, logs = train(trainer)

    total_steps = args.warmup + args.steps
    timed = [s for s in range(args.warmup + 1, total_steps + 1) if s in timer.begin and s in timer.end]
    wall_start = timer.end.get(args.warmup)  # end[0] is the start of training
    steps = range(1, total_steps + 1)

    # TRL normalizes each micro-batch's divergence sum by the Trainer's num_items_in_batch, which is counted on the
    # raw dataloader batches (dataset labels, and TRL's loader repeats the full generation batch grad_accum times).
    # per_token_losses re-normalizes the logged loss by the completion tokens actually trained on.
    per_token_losses = []
    for s in steps:
        items, toks = trainer.step_items.get(s), trainer.step_tokens.get(s)
        per_token_losses.append(logs[s]["loss"] * items / toks if s in logs and items and toks else None)

    report = result(
        args,
        trainer,
        logs,
        timed,
        sum(timer.end[s] - timer.begin[s] for s in timed),
        torch,
        trl_version=trl.__version__,
        transformers_version=transformers.__version__,
        wall_seconds=(timer.end[timed[-1]] - wall_start) if timed and wall_start is not None else None,
        train_seconds_total=total_seconds,
        step_seconds=[timer.end[s] - timer.begin[s] if s in timer.begin and s in timer.end else None for s in steps],
        per_token_losses=per_token_losses,
        teacher_vocab_rows=[teacher_vocab_before, teacher_vocab_after],
        tokenizers_match=bool(trainer._local_teacher_tokenizer_matches_student),
        top_p=trainer.top_p,
        init_warnings=init_warnings,
    )
    emit_result(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
