"""`protege eval`: how close a student is to its teacher on a dataset, and its accuracy on the demo task."""

from __future__ import annotations

import argparse
import json

from ..demo.tasks import TASK_NAMES


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="Score a student against a teacher: mean per-token KL both ways (and demo-task accuracy).",
        description="Mean per-token KL(teacher || student) and KL(student || teacher) on a dataset's completions.",
    )
    parser.add_argument("--model", required=True, help="Student: hub id or local path.")
    parser.add_argument("--teacher", required=True, help="Teacher: hub id or local path.")
    parser.add_argument(
        "--dataset_name",
        required=True,
        help="Hub dataset, a json/jsonl/parquet/csv file, or a folder saved with datasets.",
    )
    parser.add_argument("--dataset_config", default=None, help="Dataset configuration name.")
    parser.add_argument(
        "--split", default="test", help="Split to score (default: test; falls back to validation, dev, then train)."
    )
    parser.add_argument("--max_length", type=int, default=1024, help="Maximum prompt + completion tokens.")
    parser.add_argument("--max_samples", type=int, default=None, help="Score at most this many rows.")
    parser.add_argument("--batch_size", type=int, default=8, help="Rows per forward pass.")
    parser.add_argument(
        "--task",
        choices=["none", "demo", *TASK_NAMES],
        default="none",
        help="Also measure greedy accuracy on this embedded demo task (`protege demo --task`; demo: addition).",
    )
    parser.add_argument("--output", default=None, help="Write the results as JSON to this file.")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..model_source import check_model_source
    from .errors import report

    try:  # both names before torch, the dataset and the weights load: a wrong one fails at once
        check_model_source(args.model, "student")
        check_model_source(args.teacher, "teacher")
    except ValueError as error:
        return report("eval", error)

    from rich.console import Console
    from rich.table import Table

    from ..evaluation import mean_token_kl
    from ..models import load_causal_lm, load_tokenizer
    from ..teacher.local import published_tokenizer
    from ..teacher.vocabulary import teacher_extra_tokens
    from .datasets import eval_split, load_any

    try:
        tokenizer = load_tokenizer(args.model, trust_remote_code=False)
        teacher_tokenizer = published_tokenizer(args.teacher)
        if teacher_tokenizer is not None:  # before the data and the weights: a teacher with other ids fails at once
            teacher_extra_tokens(tokenizer.get_vocab(), teacher_tokenizer.get_vocab())
        dataset = load_any(args.dataset_name, args.dataset_config)
        split = eval_split(dataset, args.split) or ("train" if "train" in dataset else None)
        if split is None:
            raise ValueError(f"dataset {args.dataset_name} has no split {args.split!r} (splits: {sorted(dataset)})")
        rows = dataset[split]
        if args.max_samples is not None:
            rows = rows.select(range(min(args.max_samples, len(rows))))
        student = load_causal_lm(args.model, {}, trust_remote_code=False, role="student").eval()
        teacher = load_causal_lm(args.teacher, {}, trust_remote_code=False, role="teacher").eval()
        scores = mean_token_kl(
            student,
            teacher,
            tokenizer,
            rows,
            args.max_length,
            batch_size=args.batch_size,
            teacher_tokenizer=teacher_tokenizer,
        )
        results = {"split": split, "rows": len(rows), **scores}
        if args.task != "none":
            from ..demo.scoring import accuracy_on_rows

            task = "addition" if args.task == "demo" else args.task
            results["student_accuracy"] = accuracy_on_rows(student, tokenizer, rows, task)
            results["teacher_accuracy"] = accuracy_on_rows(teacher, tokenizer, rows, task)
    except (ValueError, OSError) as error:
        return report("eval", error)
    table = Table(title=f"{args.model} vs {args.teacher} on {args.dataset_name} [{split}]")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in results.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
    if args.output:
        try:
            with open(args.output, "w") as handle:
                json.dump(results, handle, indent=2)
        except OSError as error:
            return report("eval", f"cannot write --output {args.output}: {error.strerror or error}")
    return 0
