"""protege side of the protege-vs-TRL CPU benchmark (the counterpart of ``trl_worker.py``).

Run it with protege's interpreter; ``vs_trl.py`` starts it as a subprocess, as it starts the TRL worker, so both run in
a fresh process with the same thread count. The same flags as ``trl_worker.py`` (``workers.WorkerRun``, defined once in
``workers.py``) and the same result keys, printed as one ``RESULT {json}`` line (``workers.emit_result``):

    python benchmarks/protege_worker.py --student DIR --teacher DIR --data FILE.jsonl --steps 8 --warmup 2

It trains ``protege.DistillationTrainer`` on CPU in float32 with the settings the TRL worker passes to TRL: no
activation (gradient) checkpointing, no bf16, ``model.generate`` for on-policy samples, no eval, no saving, logging
every step, ``report_to="none"``.

Timing: protege generates a step's completions in ``get_batch_samples``, which the transformers loop calls BEFORE
``on_step_begin``, so ``on_step_begin``..``on_step_end`` would leave generation out. ``seconds`` is therefore the wall
time from the ``on_step_end`` of the last warm-up step to the ``on_step_end`` of the last step (collation, generation,
teacher and student passes, optimizer step and logging all inside): the TRL worker's ``wall_seconds``, measured the
same way. ``inside_step_seconds`` (``on_step_begin``..``on_step_end``, without generation) is reported for reference.

Token count: ``workers.counting_trainer`` overrides ``compute_loss`` only to count ``labels != -100`` in the inputs it
gets (each slice after generation, so on-policy completions count at their generated length), then calls ``super()``.
"""

from __future__ import annotations

import os
import sys

from workers import WorkerRun, build_trainer, emit_result, load_inputs, parse, result, train

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv=None):
    args = parse(WorkerRun, argv, __doc__.split("\n\n")[0])

    import datasets
    import torch
    import transformers
    from transformers import TrainerCallback

    import protege
    from protege import DistillationConfig, DistillationTrainer

    tokenizer, student, teacher, train_dataset = load_inputs(args, torch, datasets, transformers)
    inputs = dict(model=student, teacher_model=teacher, train_dataset=train_dataset, processing_class=tokenizer)
    trainer, timer, init_warnings = build_trainer(
        args, "protege_worker", DistillationConfig, DistillationTrainer, TrainerCallback, **inputs
    )
    total_seconds, logs = train(trainer)

    total_steps = args.warmup + args.steps
    timed = [s for s in range(args.warmup + 1, total_steps + 1) if s in timer.end and s - 1 in timer.end]
    seconds = sum(timer.end[s] - timer.end[s - 1] for s in timed)

    def mean_logged(key):
        values = [logs[s][key] for s in timed if s in logs and key in logs[s]]
        return sum(values) / len(values) if values else None

    steps = range(1, total_steps + 1)
    report = result(
        args,
        trainer,
        logs,
        timed,
        seconds,
        torch,
        protege_version=protege.__version__,
        transformers_version=transformers.__version__,
        wall_seconds=seconds,
        inside_step_seconds=sum(timer.end[s] - timer.begin[s] for s in timed if s in timer.begin),
        train_seconds_total=total_seconds,
        step_seconds=[
            timer.end[s] - timer.end[s - 1] if s in timer.end and s - 1 in timer.end else None for s in steps
        ],
        logged_completion_tokens_per_second=mean_logged("completion_tokens_per_second"),
        mean_generation_s_per_step=mean_logged("time/generation_s"),
        mean_teacher_s_per_step=mean_logged("time/teacher_s"),
        mean_student_s_per_step=mean_logged("time/student_s"),
        top_p=trainer.generation_config.top_p,
        activation_checkpointing=bool(getattr(trainer.model, "is_gradient_checkpointing", False)),
        init_warnings=init_warnings,
    )
    # protege divides each step's divergence sum by the step's completion tokens: the logged loss is per token.
    report["per_token_losses"] = report["losses"]
    emit_result(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
