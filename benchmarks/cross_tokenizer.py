"""Cross-tokenizer distillation (issue 26) measured: the walks comparison, and the alignment's cost per step.

    python -m benchmarks cross_tokenizer walks --seeds 0 1 2 3 4       # the comparison (docs/benchmarks.md), ~40 min
    python -m benchmarks cross_tokenizer walks --teachers-only --seeds 0 --teacher-layers 1   # the teacher pilot
    python -m benchmarks cross_tokenizer walks --quick                 # smoke run: 1 seed, tiny budgets
    python -m benchmarks cross_tokenizer walks --seeds 0 1 2 --teacher-layers 2 --rule projection   # the other rule
    python -m benchmarks cross_tokenizer cost                          # alignment vs a whole step, 2 x 1,000 tokens
    python -m benchmarks cross_tokenizer cost --cost-rule gold         # the same under GOLD's rule

`walks`: gkd_table's walks task with canonical references (docs/benchmarks.md, design 3); from each seed's warmed-up
student (gkd_table's prepare, cache and runs), on-policy GKD reverse KL with a teacher of another tokenizer
(`use_uld_loss`; `walk_tokenizer`, whose merges join nodes), the same with the same-tokenizer teacher, and SFT.

`cost`: `ForeignTokenizerTeacher.translate` inside real training steps at 2 rows x 1,000 completion tokens, student on
Tekken's first 32,000 ranks (byte-level BPE), teacher on mistral-common's 32k SentencePiece, small random Qwen2s; under
the projection rule also its marginalisation inside the loss (`projection.projected_log_probs`) and its table's build.
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from benchmarks import REPO, Column, Report, gkd_table, module_command, parser, spawn, worker_env
from benchmarks.gkd_runs import BUDGETS, METRICS, prepared_scores, run_config, scores, settings_for, start_point
from benchmarks.walk_bpe import MERGES, chatml, group_sizes, walk_tokenizer

CROSS = "onpolicy_rkl_crosstok"
LABELS = {
    CROSS: "On-policy GKD, reverse KL, teacher of another tokenizer (use_uld_loss)",
    "onpolicy_rkl": "On-policy GKD, reverse KL, same-tokenizer teacher",
    "sft": "Supervised FT (canonical references)",
}
GAIN_SHARE = 0.7  # the criterion: the cross-tokenizer gain at least this share of the same-tokenizer gain


def spread(prefix: str, key: str, points: float = 100.0):
    return lambda r: (points * r[f"{prefix}{key}_mean"], points * r[f"{prefix}{key}_std"])


def both(first: str, second: str, spec: str = "{:.3f}"):
    return lambda r: " / ".join("-" if r[k] is None else spec.format(r[k]) for k in (first, second))


TABLES = {
    "walks": [
        Column("method", "label", text=True),
        Column("sampled validity after", spread("sampled_", "accuracy"), "{0[0]:.1f} +- {0[1]:.1f}"),
        Column("gain over warm-up", spread("sampled_", "gain"), "{0[0]:+.1f} +- {0[1]:.1f}"),
        Column("per seed", lambda r: " / ".join(f"{100 * a:.1f}" for a in r["sampled_per_seed"]), text=True),
        Column("greedy validity after", spread("", "accuracy"), "{0[0]:.1f} +- {0[1]:.1f}"),
        Column("completion tokens", "completion_tokens_mean", "{:,.0f}"),
        Column("train s", "train_seconds_mean", "{:.0f}"),
    ],
    "teachers": [
        Column("seed", "seed"),
        Column("same-tokenizer teacher, sampled / greedy", both("same_sampled", "same_greedy")),
        Column("other-tokenizer teacher, sampled / greedy", both("sampled", "accuracy")),
        Column("warmed-up student, sampled", "student_sampled", "{:.3f}"),
        Column("teacher tokens per walk", "teacher_tokens_per_walk", "{:.2f}"),
        Column("student tokens per group", "student_tokens_per_group", "{:.2f}"),
        Column("teacher tokens per group", "teacher_tokens_per_group", "{:.2f}"),
        Column("groups of 2+ student tokens", "multi_token_groups", "{:.1%}"),
    ],
    "cost": [
        Column("step", "case", text=True),
        Column("completion tokens, student / teacher", both("student_tokens", "teacher_tokens", "{:,}")),
        Column("step s", "step_s", "{:.2f}"),
        Column("translate s", "translate_s", "{:.3f}"),
        Column("translate share", "share", "{:.1%}"),
        Column("translate s, alone", "translate_alone_s", "{:.3f}"),
        Column("projection s", "projection_s", "{:.3f}"),
        Column("translate + projection share", "alignment_share", "{:.1%}"),
        Column("projection table s (once)", "table_s", "{:.2f}"),
    ],
}

# ---------------------------------------------------------------------------------------------------------------------
# walks: the other tokenizer, its teacher, the cross-tokenizer run
# ---------------------------------------------------------------------------------------------------------------------


def cross_teacher(gkd: argparse.Namespace, seed: int, layers: int) -> tuple[Any, Path, dict]:
    """The seed's teacher of the other tokenizer, trained as gkd_table's teacher is (same rows, steps, schedule,
    width; `layers` layers) or loaded from its cache, with its tokenizer in the same folder; its held-out scores and
    how the alignment groups the held-out reference walks."""
    from rich.progress import Progress

    from protege.demo import pipeline
    from protege.demo.encoder import Encoder
    from protege.demo.scoring import scores as model_scores
    from protege.demo.task import load_tokenizer
    from protege.demo.tasks import get_task

    settings, task = settings_for(gkd), get_task("walks")
    encoder = Encoder(walk_tokenizer(), task)
    held_out = task.held_out_problems(settings.eval_problems, seed)
    spec, sft = replace(settings.teacher, layers=layers), settings.teacher_sft
    rows = task.training_problems(sft.steps * sft.batch_size, seed, exclude=held_out, stream="teacher")
    folder = Path(gkd.output_dir) / f"seed{seed}" / f"teacher_crosstok_{layers}x{spec.hidden}"
    role, quiet = f"teacher-crosstok-bpe{MERGES}", Progress(disable=True)
    trained = pipeline.trained_model(role, folder, spec, sft, settings, seed, encoder, rows, [], quiet, "teacher")
    info = {"seed": seed, "layers": layers, **model_scores(trained.model, encoder, held_out, True, seed)}
    texts = ["".join(p.walk) for p in held_out]
    info |= group_sizes(load_tokenizer(), encoder.tokenizer, texts) | {"train": trained.info}
    return trained.model, folder, info


def cross_run(args: argparse.Namespace, gkd: argparse.Namespace) -> dict:
    """A worker: the seed's cross teacher alone (`--worker teacher`), or on-policy GKD reverse KL from the seed's
    warmed-up student with it (`--worker run`), gkd_table's run in every other respect."""
    import torch
    from rich.progress import Progress

    from protege.demo import pipeline
    from protege.demo.distill import distill

    torch.set_num_threads(1)
    seed = args.seeds[0]
    teacher, folder, info = cross_teacher(gkd, seed, args.teacher_layers)
    if args.worker == "teacher":
        return info
    # A student sample re-tokenized for the teacher can outgrow its 128 positions ("assistant", one student token, is
    # 9 teacher tokens) and the translation does not cut it: positions past 128 reuse the last one's embedding.
    table = teacher.transformer.wpe.weight.detach()
    wider = torch.cat([table, table[-1:].expand(512 - len(table), -1)])
    teacher.transformer.wpe = torch.nn.Embedding.from_pretrained(wider)
    settings, seed_folder, quiet = settings_for(gkd), Path(gkd.output_dir) / f"seed{seed}", Progress(disable=True)
    prepared = pipeline.prepare(seed_folder, settings, seed, quiet)
    saved = prepared_scores(seed_folder, gkd) or scores(prepared, settings, seed)
    count = settings.distill_steps * settings.distill_batch_size
    problems = prepared.training_problems(settings, seed, count, "distill")
    overrides = {
        "lmbda": 1.0,
        "beta": 1.0,
        "logging_steps": 1,
        "use_uld_loss": True,
        "teacher_tokenizer_name_or_path": str(folder),
        "uld_alignment_rule": args.rule,
    }
    started, run = time.perf_counter(), replace(settings, beta=1.0, distill_overrides=overrides)
    torch.manual_seed(seed)
    distilled = distill(
        teacher, prepared.student, None, prepared.encoder, run, seed, problems, prepared.eval_problems,
        start_point(saved), seed_folder / cross_name(args), quiet,
    )  # fmt: skip
    curve = distilled.curve
    return {
        "seed": seed,
        "method": CROSS,
        **{key: value for key, value in saved.items() if key.startswith(("teacher_", "start_"))},
        **{metric.final: curve[-1][key] for key, metric in METRICS.items() if key in curve[-1]},
        "curve": curve,
        "completion_tokens": distilled.completion_tokens,
        "train_seconds": round(time.perf_counter() - started - distilled.eval_seconds, 2),
        "losses": distilled.losses,
        "step_seconds": distilled.step_seconds,
        "cross_teacher": info,
    }


def spawn_cross(args: argparse.Namespace, gkd: argparse.Namespace, seed: int, what: str) -> dict:
    """A cross-teacher worker in a fresh process (1 torch thread), or its saved result for the same configuration."""
    name = "teacher_crosstok" if what == "teacher" else cross_name(args)
    out = Path(gkd.output_dir) / f"seed{seed}" / f"{name}_{args.teacher_layers}layer.json"
    config = cross_config(args, gkd)
    if out.exists() and not gkd.fresh:
        saved = json.loads(out.read_text())
        if saved.get("config") == config:
            return saved
    flags = ["--worker", what, "--seeds", seed, "--teacher-layers", args.teacher_layers, "--out", out]
    flags += ["--rule", args.rule, "--output-dir", gkd.output_dir, *(["--quick"] * gkd.quick)]
    env = worker_env(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    started = time.perf_counter()
    done = spawn(module_command(sys.executable, "benchmarks.cross_tokenizer", "walks", *flags), env=env)
    if done.returncode != 0:
        raise SystemExit(f"seed {seed} {what} failed:\n{done.stderr[-4000:]}")
    result = json.loads(out.read_text())
    shown = result if what == "teacher" else {"sampled": result.get("sampled_accuracy")}
    brief = {k: round(v, 3) for k, v in shown.items() if isinstance(v, float)}
    print(f"  seed {seed} cross {what:8s} {time.perf_counter() - started:6.1f}s  {brief}", flush=True)
    return result


def cross_name(args: argparse.Namespace, base: str = CROSS) -> str:
    return base if args.rule == "gold" else f"{base}_{args.rule}"  # GOLD's rule keeps the first results' names


def cross_config(args: argparse.Namespace, gkd: argparse.Namespace) -> dict:
    config = run_config(gkd, "onpolicy_rkl") | {"teacher_layers": args.teacher_layers, "merges": MERGES}
    return config | ({} if args.rule == "gold" else {"uld_alignment_rule": args.rule})


def gkd_args(args: argparse.Namespace) -> argparse.Namespace:
    """gkd_table's settings for its walks runs with canonical references, as its `main` fills them."""
    argv = ["--task", "walks", "--references", "canonical", "--jobs", str(args.jobs), "--output", str(args.output)]
    argv += ["--seeds", *map(str, args.seeds), *(["--quick"] * args.quick), *(["--fresh"] * args.fresh)]
    gkd = gkd_table.parse_args(argv)
    default = "cross_tokenizer_quick" if args.quick else "gkd_table_walks_canonical"  # quick: never gkd's cache
    gkd.output_dir = args.output_dir or str(REPO / "runs" / default)
    gkd.steps, gkd.eval_every = BUDGETS["walks"]
    if gkd.quick:  # as gkd_table's quick run
        gkd.seeds, gkd.steps, gkd.eval_every, gkd.eval_problems = gkd.seeds[:1], 4, 2, 32
    return gkd


def summarize(results: list[dict]) -> list[dict]:
    """One row per method: final validity, gain over the warmed-up student (mean, std over seeds, per seed)."""
    rows = []
    for name in LABELS:
        runs = sorted((r for r in results if r["method"] == name), key=lambda r: r["seed"])
        row: dict[str, Any] = {"method": name, "label": LABELS[name], "seeds": [r["seed"] for r in runs]}
        for metric in METRICS.values():
            finals = [r[metric.final] for r in runs]
            gains = [r[metric.final] - r[metric.start] for r in runs]
            for key, values in (("accuracy", finals), ("gain", gains)):
                row[f"{metric.prefix}{key}_mean"], row[f"{metric.prefix}{key}_std"] = gkd_table.mean_std(values)
            row |= {f"{metric.prefix}per_seed": finals, f"{metric.prefix}gain_per_seed": gains}
        row["completion_tokens_mean"] = statistics.fmean(r["completion_tokens"] for r in runs)
        row["train_seconds_mean"] = statistics.fmean(r["train_seconds"] for r in runs)
        rows.append(row)
    return rows


def criterion(rows: list[dict]) -> dict:
    """The protocol's test on sampled validity: the cross-tokenizer gain at least GAIN_SHARE of the same-tokenizer
    gain (means over seeds), with the per-seed ratios beside it."""
    cross, same = (next(r for r in rows if r["method"] == name) for name in (CROSS, "onpolicy_rkl"))
    ratio = cross["sampled_gain_mean"] / same["sampled_gain_mean"]
    per_seed = [c / s for c, s in zip(cross["sampled_gain_per_seed"], same["sampled_gain_per_seed"])]
    return {"ratio": ratio, "per_seed": per_seed, "needed": GAIN_SHARE, "met": ratio >= GAIN_SHARE}


def walks_mode(args: argparse.Namespace) -> None:
    gkd = gkd_args(args)
    started = time.perf_counter()
    with ThreadPoolExecutor(gkd.jobs) as pool:
        jobs = [(seed, kind) for seed in gkd.seeds for kind in ("teacher", *(["prepare"] * (not args.teachers_only)))]
        done = list(pool.map(lambda j: spawn_cross(args, gkd, j[0], "teacher") if j[1] == "teacher" else
                             gkd_table.spawn_run(gkd, j[0], "prepare"), jobs))  # fmt: skip
        teachers = [d for d, (_, kind) in zip(done, jobs) if kind == "teacher"]
        if args.teachers_only:
            print(json.dumps([{k: v for k, v in t.items() if k != "config"} for t in teachers], indent=2))
            return
        runs = [(seed, method) for seed in gkd.seeds for method in LABELS]
        results = list(pool.map(lambda r: spawn_cross(args, gkd, r[0], "run") if r[1] == CROSS else
                                gkd_table.spawn_run(gkd, *r), runs))  # fmt: skip
    report = Report("cross_tokenizer", args)
    LABELS[CROSS] += f", uld_alignment_rule={args.rule}"
    prepared = {d["seed"]: d for d, (_, kind) in zip(done, jobs) if kind == "prepare"}
    for teacher in teachers:
        same = prepared[teacher["seed"]]
        teacher |= {"same_sampled": same["teacher_sampled_accuracy"], "same_greedy": same["teacher_accuracy"]}
        teacher["student_sampled"] = same["start_sampled_accuracy"]
    rows = summarize(results)
    verdict = criterion(rows)
    print(report.table("teachers", teachers, TABLES) + "\n")
    print(report.table("walks", rows, TABLES) + "\n")
    per_seed = " / ".join(f"{ratio:.2f}" for ratio in verdict["per_seed"])
    print(
        f"Criterion: cross-tokenizer gain / same-tokenizer gain = {verdict['ratio']:.2f} (needs {GAIN_SHARE}; per "
        f"seed {per_seed}): **{'met' if verdict['met'] else 'not met'}**."
    )
    seconds = round(time.perf_counter() - started)
    summary = {"rows": rows, "teachers": teachers, "criterion": verdict, "runs": results, "seconds": seconds}
    name = cross_name(args, "cross_tokenizer_summary") + ".json"
    (Path(gkd.output_dir) / name).write_text(json.dumps(summary, indent=2, default=str))
    print(f"wrote {gkd.output_dir}/{name} in {seconds}s")


# ---------------------------------------------------------------------------------------------------------------------
# cost: the translation against a whole step, two real 32k tokenizers
# ---------------------------------------------------------------------------------------------------------------------


def tekken_32k(size: int = 32000):
    """mistral-common's Tekken (a tiktoken byte-level BPE) cut to its first `size` ranks, converted by transformers'
    `TikTokenConverter`, with the ChatML special tokens; a 32k vocabulary, as the SentencePiece one it is paired with,
    so that neither side's step is larger than the other's for its vocabulary."""
    import base64

    from transformers.convert_slow_tokenizer import TikTokenConverter

    from protege.toy import SPECIAL_TOKENS

    data = json.loads((importlib.resources.files("mistral_common") / "data" / "tekken_240911.json").read_text())
    ranks = {base64.b64decode(entry["token_bytes"]): entry["rank"] for entry in data["vocab"][:size]}

    class Tekken(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return ranks

    backend = Tekken("tekken", pattern=data["config"]["pattern"], extra_special_tokens=SPECIAL_TOKENS).converted()
    return chatml(backend)


def sentencepiece_32k(folder: Path):
    """mistral-common's 32k SentencePiece (`tokenizer.model.v1`, byte fallback) as a LlamaTokenizerFast saved in
    `folder` with the ChatML template (the teacher's tokenizer is given to the trainer as a folder)."""
    import shutil

    from transformers import LlamaTokenizerFast

    from protege.toy import CHAT_TEMPLATE

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    tokenizer = LlamaTokenizerFast.from_pretrained(folder)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return tokenizer


def document_rows(tokenizer, tokens: int) -> list[dict]:
    """Two chat rows whose completions are consecutive runs of the docs' text, `tokens` student tokens with the end
    of turn (re-tokenizing the decoded run may give a token more or less; the table gives the counts)."""
    text = "\n\n".join(path.read_text(encoding="utf-8") for path in sorted((REPO / "docs").glob("*.md")))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    chunks = [tokenizer.decode(ids[start : start + tokens - 1]) for start in (0, tokens)]
    return [{"messages": [{"role": "user", "content": "Go on."}, {"role": "assistant", "content": c}]} for c in chunks]


def clocked(call, spent: list[float]):
    """`call`, each call's wall time added to `spent[0]`."""

    def timed(*args: Any, **kwargs: Any):
        started = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - started

    return timed


def timed_steps(trainer) -> tuple[list[float], list[float], list[float]]:
    """Train; each step's wall time (from the end of the one before; the first from the start of
    training), the time its `translate` calls took, and the time its projection rule's marginalisation took
    (`projection.projected_log_probs`, inside the loss, forward and the checkpointed backward's recomputation)."""
    from transformers import TrainerCallback

    from protege import projection

    teacher, translate, project = trainer.teacher, trainer.teacher.translate, projection.projected_log_probs
    marks, spent, per_step, projected, per_step_projection = [time.perf_counter()], [0.0], [], [0.0], []

    class Mark(TrainerCallback):
        def on_train_begin(self, *_: Any, **__: Any) -> None:
            marks[0] = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            marks.append(time.perf_counter())
            per_step.append(spent[0])
            per_step_projection.append(projected[0])
            spent[0] = projected[0] = 0.0

    teacher.translate, projection.projected_log_probs = clocked(translate, spent), clocked(project, projected)
    trainer.add_callback(Mark())
    try:
        trainer.train()
    finally:
        projection.projected_log_probs = project
    return [b - a for a, b in zip(marks, marks[1:])], per_step, per_step_projection


def cost_case(args: argparse.Namespace, lmbda: float, tokenizers: tuple, rows: list[dict], folder: Path) -> dict:
    """One case of `cost`: a fresh random student and teacher, the translation of the first batch alone, then
    `args.steps` timed steps after a warm-up step, with the time of their translations."""
    from datasets import Dataset
    from transformers import PrinterCallback

    from benchmarks import median_ms
    from protege import DistillationConfig, DistillationTrainer
    from protege.teacher import foreign
    from protege.toy import tiny_model

    (student_tokenizer, teacher_tokenizer), shape = tokenizers, dict(layers=args.layers, hidden=args.hidden, heads=4)
    student = tiny_model(len(student_tokenizer), **shape, eos_token_id=student_tokenizer.eos_token_id, seed=1)
    teacher = tiny_model(len(teacher_tokenizer), **shape, eos_token_id=teacher_tokenizer.eos_token_id, seed=2)
    for model in (student, teacher):  # tiny_model's 512 positions would cut the teacher's side (foreign.py) mid-row;
        model.config.max_position_embeddings = 8 * args.tokens  # rotary positions: nothing else changes
    config = DistillationConfig(
        output_dir=str(folder / "run"), per_device_train_batch_size=2, max_steps=args.steps + 1, lmbda=lmbda,
        beta=1.0, loss_top_k=0, max_completion_length=args.tokens, max_length=args.tokens + 32, learning_rate=1e-4,
        logging_steps=args.steps + 1, save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, bf16=False,
        use_uld_loss=True, teacher_tokenizer_name_or_path=str(folder / "sp32k"), seed=0,
        **({"uld_alignment_rule": args.cost_rule} if args.cost_rule else {}),
    )  # fmt: skip
    dataset = Dataset.from_list(rows * (args.steps + 1))
    build, table_s = foreign.projection_table, [0.0]
    foreign.projection_table = clocked(build, table_s)  # the projection rule's table, built once at setup
    try:
        trainer = DistillationTrainer(
            model=student, teacher_model=teacher, args=config, train_dataset=dataset, processing_class=student_tokenizer
        )
    finally:
        foreign.projection_table = build
    trainer.remove_callback(PrinterCallback)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    alone, translated = median_ms(lambda: trainer.teacher.translate(batch), args.repeats, warmup=1)
    steps, translate, projected = timed_steps(trainer)
    steps, translate, projected = steps[1:], translate[1:], projected[1:]  # the first step warms up
    logged = [e["completion_tokens"] for e in trainer.state.log_history if "completion_tokens" in e]
    off_policy = lmbda == 0
    return {
        "case": "off-policy (dataset completions)" if off_policy else "on-policy (the student's samples)",
        "student_tokens": round(sum(logged) / (args.steps + 1)),  # one log at the end: no per-step estimate pass
        "teacher_tokens": int(translated[1].ne(0).sum()) if off_policy else None,
        "step_s": statistics.median(steps),
        "translate_s": statistics.median(translate),
        "share": sum(translate) / sum(steps),
        "translate_alone_s": alone / 1e3 if off_policy else None,
        "projection_s": statistics.median(projected),
        "alignment_share": (sum(translate) + sum(projected)) / sum(steps),
        "table_s": table_s[0] or None,
        "rule": config.uld_alignment_rule,
        "steps": steps,
        "translates": translate,
        "projections": projected,
    }


def cost_mode(args: argparse.Namespace) -> None:
    """Translation time against whole training steps at 2 rows x `args.tokens` completion tokens, off-policy (the
    docs' text as completions) and on-policy (the random student's samples, to `args.tokens` tokens)."""
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="cross_tokenizer_cost_"))
    tokenizers = tekken_32k(), sentencepiece_32k(folder / "sp32k")
    rows = document_rows(tokenizers[0], args.tokens)
    results = [cost_case(args, lmbda, tokenizers, rows, folder) for lmbda in (0.0, 1.0)]
    shapes = f"student and teacher: Qwen2, {args.layers} layers, hidden {args.hidden}, 4 heads, random init"
    print(f"{shapes}; vocabularies {len(tokenizers[0]):,} (Tekken 32k) and {len(tokenizers[1]):,} (SentencePiece)")
    print(f"uld_alignment_rule={results[0]['rule']}" + ("" if args.cost_rule else " (DistillationConfig's default)"))
    print(Report("cross_tokenizer", args).table("cost", results, TABLES))


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    options = parser("cross_tokenizer", __doc__, quick="walks: 1 seed, 4 steps, 32 held-out prompts, short teachers")
    options.add_argument("mode", choices=["walks", "cost"])
    options.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    options.add_argument("--teacher-layers", type=int, default=1, help="walks: the other-tokenizer teacher's layers")
    options.add_argument("--rule", choices=["gold", "projection"], default="gold", help="walks: uld_alignment_rule")
    options.add_argument("--teachers-only", action="store_true", help="walks: only the other-tokenizer teachers")
    options.add_argument("--jobs", type=int, default=2, help="walks: runs at once (1 torch thread each)")
    options.add_argument("--output-dir", default=None, help="walks: default runs/gkd_table_walks_canonical (gkd's)")
    options.add_argument("--fresh", action="store_true", help="walks: rerun what is already saved")
    options.add_argument("--tokens", type=int, default=1000, help="cost: completion tokens per row")
    options.add_argument("--steps", type=int, default=3, help="cost: timed steps per case, after one warm-up step")
    options.add_argument("--repeats", type=int, default=5, help="cost: timed translations of the dataset batch")
    options.add_argument("--layers", type=int, default=2, help="cost: layers of both models")
    options.add_argument("--hidden", type=int, default=256, help="cost: hidden size of both models")
    options.add_argument("--threads", type=int, default=2, help="cost: torch threads")
    options.add_argument("--cost-rule", choices=["gold", "projection"], default=None, help="cost: default the config's")
    options.add_argument("--worker", choices=["teacher", "run"], default=None, help=argparse.SUPPRESS)
    options.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return options.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode == "cost":
        cost_mode(args)
    elif args.worker:
        gkd = gkd_args(args)
        result = cross_run(args, gkd) | {"config": cross_config(args, gkd)}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    else:
        walks_mode(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
