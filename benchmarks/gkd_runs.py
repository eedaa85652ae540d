"""The runs behind `gkd_table`: the methods it compares, and what one worker process does with one of them.

A worker (`python -m benchmarks.gkd_table --worker ...`) prepares or loads a seed's teacher and warmed-up student
(`protege.demo.pipeline.prepare`, cached in the seed's folder) and trains one method from it on the seed's prompt
stream, scoring it on the held-out problems every `--eval-every` steps; `gradients` compares each divergence's
gradient with cross-entropy's in this process. Each function imports protege's demo when called, so that the harness
lists and tabulates without it.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple


@dataclass(frozen=True)
class Method:
    label: str
    short: str  # for the chart
    kind: str  # "sft", "seqkd" or "distill" (DistillationTrainer)
    lmbda: float | None = None
    beta: float | None = None
    loss_top_k: int | None = None  # None: the demo's setting
    response_format: str | None = None  # a teacher server's answer format; None: the local teacher model


METHODS = {
    "sft": Method("Supervised FT (ground truth)", "SFT", "sft"),
    "seqkd": Method("SeqKD (teacher samples)", "SeqKD", "seqkd"),
    "supervised_fkl": Method("Supervised KD, forward KL", "sup. KD\nFKL", "distill", 0.0, 0.0),
    "supervised_jsd": Method("Supervised KD, JSD(0.5)", "sup. KD\nJSD", "distill", 0.0, 0.5),
    "supervised_rkl": Method("Supervised KD, reverse KL", "sup. KD\nRKL", "distill", 0.0, 1.0),
    "onpolicy_fkl": Method("On-policy GKD, forward KL", "on-policy\nFKL", "distill", 1.0, 0.0),
    "onpolicy_jsd": Method("On-policy GKD, JSD(0.5)", "on-policy\nJSD", "distill", 1.0, 0.5),
    "onpolicy_rkl": Method("On-policy GKD, reverse KL", "on-policy\nRKL", "distill", 1.0, 1.0),
    "mixed_jsd": Method("Mixed GKD (lmbda 0.5), JSD(0.5)", "mixed 0.5\nJSD", "distill", 0.5, 0.5),
}
# The hidden mode: on-policy JSD(0.5) through a teacher server's "hidden" format (the exact loss), its "compact" one
# (sparse top-1, all a log-prob format allows for beta > 0), and the local teacher (what "hidden" should match).
HIDDEN_METHODS = {
    "hidden": Method("JSD(0.5) full vocabulary, server 'hidden'", "hidden", "distill", 1.0, 0.5, 0, "hidden"),
    "top1": Method("JSD(0.5) sparse top-1, server 'compact'", "top1", "distill", 1.0, 0.5, 1, "compact"),
    "local": Method("JSD(0.5) full vocabulary, local teacher", "local", "distill", 1.0, 0.5, 0),
}
ALL_METHODS = {**METHODS, **HIDDEN_METHODS}
QUICK_METHODS = ["sft", "supervised_fkl", "onpolicy_fkl"]
# Per task: the steps per method and the evaluation interval when --steps and --eval-every are not given.
BUDGETS = {"addition": (60, 10), "letters": (200, 20), "walks": (200, 20)}
# The flags a worker gets from its parent, and what a saved result depends on (with the demo settings' repr).
RUN_KEYS = ("task", "digits", "steps", "batch_size", "eval_every", "eval_problems", "schedule", "warmup_steps")
RUN_KEYS += ("optimizer", "references")


class Metric(NamedTuple):
    """Where one score lives in a run's result and in the summary's rows (keyed by its name in the curve points)."""

    final: str  # the method's score at the end of the budget
    start: str  # the warmed-up student's
    teacher: str  # the teacher's
    prefix: str  # of the summary row's keys
    label: str


# "sampled" is there when the task's settings ask for sampled scores (letters, walks).
METRICS = {
    "accuracy": Metric("accuracy", "start_accuracy", "teacher_accuracy", "", "greedy"),
    "sampled": Metric(
        "sampled_accuracy", "start_sampled_accuracy", "teacher_sampled_accuracy", "sampled_", "sampled, T=1"
    ),
}


def settings_for(args: argparse.Namespace) -> Any:
    """The demo's settings for the task, with the comparison's budget, batch, schedule and evaluation."""
    from protege.demo.settings import Settings

    base = Settings.for_run(False, args.task)
    if args.quick:  # a smoke run of the plumbing, not of the numbers
        teacher, student = (300, base.student_sft.steps) if args.task == "addition" else (100, 50)
        base = replace(
            base,
            teacher_sft=replace(base.teacher_sft, steps=teacher),
            student_sft=replace(base.student_sft, steps=student),
        )
    settings = replace(
        base,
        digits=args.digits,
        distill_steps=args.steps,
        distill_batch_size=args.batch_size,
        eval_every=args.eval_every,
        eval_problems=args.eval_problems,
        kl_problems=8,
        distill_schedule=args.schedule,
        distill_warmup_steps=args.warmup_steps,
    )
    if args.task != "addition":
        return settings
    # Room for longer chains: ~12 tokens per digit (a 9-token line, the prompt and the answer) and the chat markup.
    positions = max(settings.teacher.positions, 12 * args.digits + 40)
    return replace(
        settings,
        teacher=replace(settings.teacher, positions=positions),
        student=replace(settings.student, positions=positions),
    )


def run_config(args: argparse.Namespace, method: str = "prepare") -> dict:
    """What a saved result depends on: a saved run or prepare.json is reused only when all of it is equal, the demo
    settings (models, SFT steps) included; the hidden mode's runs also on the wire dtype of the hidden states."""
    config = {key: getattr(args, key) for key in (*RUN_KEYS, "quick")} | {"settings": repr(settings_for(args))}
    return config | ({"hidden_dtype": args.hidden_dtype} if method in HIDDEN_METHODS else {})


def run_method(args: argparse.Namespace) -> dict:
    """One (seed, method) run, or with method "prepare" the seed's teacher and warmed-up student and their scores."""
    import torch
    from rich.progress import Progress
    from transformers.utils import logging as transformers_logging

    from protege.demo import pipeline
    from protege.demo.distill import distill

    torch.set_num_threads(1)
    transformers_logging.set_verbosity_error()
    settings = settings_for(args)
    folder = Path(args.output_dir) / f"seed{args.seed}"
    quiet = Progress(disable=True)
    prepared = pipeline.prepare(folder, settings, args.seed, quiet)
    if args.method == "prepare":
        info = {"teacher": prepared.teacher_info, "student": prepared.student_info}
        return {"seed": args.seed, **info, **scores(prepared, settings, args.seed)}
    method = ALL_METHODS[args.method]
    saved = prepared_scores(folder, args) or scores(prepared, settings, args.seed)
    start = start_point(saved)
    count = settings.distill_steps * settings.distill_batch_size
    problems = prepared.training_problems(settings, args.seed, count, "distill")
    if args.references == "canonical":  # the dataset's completions, not its prompts: SFT, supervised KD, mixed
        problems = [prepared.task.canonical(problem) for problem in problems]
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    extra: dict[str, Any] = {}
    if method.kind == "distill":
        overrides = {"lmbda": method.lmbda, "beta": method.beta, "logging_steps": 1}
        overrides |= {} if method.loss_top_k is None else {"loss_top_k": method.loss_top_k}
        if method.response_format is not None:
            overrides |= {
                "use_teacher_server": True,
                "teacher_model_server_url": args.url,
                "teacher_server_response_format": method.response_format,
                "teacher_server_hidden_dtype": args.hidden_dtype,
            }
        distilled = distill(
            None if method.response_format else prepared.teacher,  # with a server the trainer gets no teacher model
            prepared.student,
            prepared.optimizer_state if args.optimizer == "continue" else None,
            prepared.encoder,
            replace(settings, beta=method.beta, distill_overrides=overrides),
            args.seed,
            problems,
            prepared.eval_problems,
            start,
            folder / ("hidden_vs_top1" if args.method in HIDDEN_METHODS else "") / args.method,
            quiet,
        )
        curve, tokens, eval_seconds = distilled.curve, distilled.completion_tokens, distilled.eval_seconds
        extra = {"losses": distilled.losses, "step_seconds": distilled.step_seconds}
    else:
        curve, tokens, eval_seconds = supervised(method, settings, prepared, problems, start, args)
    return {
        "seed": args.seed,
        "method": args.method,
        **{key: value for key, value in saved.items() if key.startswith(("teacher_", "start_"))},
        **{metric.final: curve[-1][key] for key, metric in METRICS.items() if key in curve[-1]},
        "curve": curve,
        "completion_tokens": tokens,
        "train_seconds": round(time.perf_counter() - started - eval_seconds, 2),
        **extra,
    }


def scores(prepared: Any, settings: Any, seed: int) -> dict[str, float]:
    """The seed's teacher and warmed-up student (every method's start) on the held-out problems: greedy accuracy, and
    sampled accuracy when the task's settings ask for it."""
    from protege.demo.scoring import scores as model_scores

    teacher, student = (
        model_scores(model, prepared.encoder, prepared.eval_problems, settings.sample_eval, seed)
        for model in (prepared.teacher, prepared.student)
    )
    return {METRICS[key].teacher: value for key, value in teacher.items()} | {
        METRICS[key].start: value for key, value in student.items()
    }


def start_point(saved: dict[str, float]) -> dict[str, float]:
    """Every method's curve at step 0, from the seed's saved scores of the warmed-up student."""
    return {key: saved[metric.start] for key, metric in METRICS.items() if metric.start in saved}


def prepared_scores(folder: Path, args: argparse.Namespace) -> dict[str, float] | None:
    """The scores the seed's prepare run saved for this configuration, if it saved them (older runs did not)."""
    path = folder / "prepare.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    if saved.get("config") != run_config(args) or "start_accuracy" not in saved:
        return None
    return saved


def supervised(method: Method, settings: Any, prepared: Any, problems: list, start: dict, args: argparse.Namespace):
    """Cross-entropy on reference chains (sft) or on the teacher's samples (seqkd), with the same optimizer, learning
    rate schedule, budget, prompts and evaluation points as the trainer runs. Returns the accuracy curve, the
    completion tokens trained on and the seconds spent on evaluation."""
    from protege.demo.scoring import generate, scores
    from protege.demo.settings import SFTSpec
    from protege.demo.supervised import adamw, supervised_training

    warmup = settings.student_sft
    spec = SFTSpec(
        steps=settings.distill_steps,
        batch_size=settings.distill_batch_size,
        learning_rate=warmup.learning_rate,
        adam_beta2=warmup.adam_beta2,
        schedule=settings.distill_schedule,
        warmup_steps=settings.distill_warmup_steps,
    )
    encoder, student = prepared.encoder, prepared.student
    optimizer = adamw(student, spec)
    if args.optimizer == "continue":
        optimizer.load_state_dict(prepared.optimizer_state)
    curve, tokens, timer, losses = [{"step": 0, **start}], [0], {"eval": 0.0}, []

    def make_batch(batch_problems):
        if method.kind == "seqkd":
            samples = generate(prepared.teacher, encoder, batch_problems, sample=True)
            batch = encoder.completions_batch(batch_problems, samples.completion_ids)
        else:
            batch = encoder.batch(batch_problems)
        tokens[0] += int(batch["labels"].ne(-100).sum())
        return batch

    def on_step(loss: float) -> None:
        step = len(losses) + 1
        losses.append(loss)
        if step % settings.eval_every == 0 or step == settings.distill_steps:
            clock = time.perf_counter()
            point = scores(student, encoder, prepared.eval_problems, settings.sample_eval, args.seed)
            curve.append({"step": step, **point})
            timer["eval"] += time.perf_counter() - clock

    supervised_training(student, encoder, problems, spec, on_step, optimizer=optimizer, make_batch=make_batch)
    return curve, tokens[0], timer["eval"]


def gradients(folder: Path, seed: int) -> tuple[dict, list[dict]]:
    """On one seed's warmed-up demo student and 64 reference chains: the teacher's probability of the reference tokens,
    and, for DistillationTrainer's off-policy loss at beta 0 / 0.5 / 1, the cosine and norm ratio of its gradient to
    the supervised cross-entropy gradient. Trains the seed's models in `folder` if they are not there."""
    import torch
    import torch.nn.functional as F
    from datasets import Dataset
    from rich.progress import Progress

    from protege import DistillationConfig, DistillationTrainer
    from protege.demo import pipeline, task
    from protege.demo.encoder import next_token_logits
    from protege.demo.settings import Settings

    torch.set_num_threads(1)
    settings = Settings(kl_problems=8)
    prepared = pipeline.prepare(folder, settings, seed, Progress(disable=True))
    encoder, teacher = prepared.encoder, prepared.teacher
    problems = prepared.training_problems(settings, seed, 64, "distill")
    batch = encoder.batch(problems)
    labels = batch["labels"][:, 1:]
    with torch.no_grad():
        teacher_logp = next_token_logits(teacher, batch).log_softmax(-1)
    target = teacher_logp[labels.ne(-100)].gather(-1, labels[labels.ne(-100)][:, None]).exp()
    reference = {"mean": target.mean().item(), "lowest": target.min().item()}

    def flat_grad(model) -> torch.Tensor:
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    student = copy.deepcopy(prepared.student)
    F.cross_entropy(next_token_logits(student, batch).transpose(1, 2), labels, ignore_index=-100).backward()
    sft = flat_grad(student)
    rows = Dataset.from_list([{"messages": task.conversation(p)} for p in problems])
    results = []
    for beta in (0.0, 0.5, 1.0):
        student = copy.deepcopy(prepared.student)
        config = DistillationConfig(
            output_dir=str(folder / "gradients"),
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
        cosine, ratio = F.cosine_similarity(grad, sft, 0).item(), (grad.norm() / sft.norm()).item()
        results.append({"beta": beta, "cosine": cosine, "norm_ratio": ratio})
    return reference, results
