"""`protege eval`: how close a student is to its teacher on a dataset, and its accuracy on the demo task."""

from __future__ import annotations

import argparse
import json

from ..demo.tasks import TASK_NAMES
from .errors import report


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="Score a student against a teacher: mean per-token KL both ways (and demo-task accuracy).",
        description="Mean per-token KL(teacher || student) and KL(student || teacher) on a dataset's completions.",
    )
    parser.add_argument("--model", required=True, help="Student: hub id or local path.")
    parser.add_argument(
        "--teacher",
        required=True,
        action="append",
        help="Teacher: hub id or local path. Several teachers: NAME=PATH, repeated; each row is scored against the "
        "teacher its --teacher_column names, and the results are given per teacher and over all rows.",
    )
    parser.add_argument(
        "--teacher_column", default="teacher", help="With several teachers, the column naming each row's teacher."
    )
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


def named_teachers(values: list[str]) -> dict[str, str]:
    """The teachers of `--teacher`: one path, or NAME=PATH pairs."""
    if len(values) == 1 and "=" not in values[0]:
        return {"teacher": values[0]}
    teachers = {}
    for value in values:
        name, _, path = value.partition("=")
        if not name or not path:
            raise ValueError(f"--teacher {value!r}: several teachers are given as NAME=PATH")
        if name in teachers:
            raise ValueError(f"--teacher {name!r} is given twice")
        teachers[name] = path
    return teachers


def run(args: argparse.Namespace) -> int:
    from ..model_source import check_model_source

    try:  # every name before torch, the dataset and the weights load: a wrong one fails at once
        teachers = named_teachers(args.teacher)
        check_model_source(args.model, "student")
        for name, path in teachers.items():
            check_model_source(path, "teacher" if len(teachers) == 1 else f'teacher "{name}"')
    except ValueError as error:
        return report("eval", error)
    if len(teachers) > 1:
        return run_several(args, teachers)
    args.teacher = next(iter(teachers.values()))

    from ..evaluation import mean_token_kl
    from ..models import load_causal_lm, load_tokenizer
    from ..teacher.local import published_tokenizer
    from ..teacher.vocabulary import teacher_extra_tokens

    try:
        tokenizer = load_tokenizer(args.model, trust_remote_code=False)
        teacher_tokenizer = published_tokenizer(args.teacher)
        if teacher_tokenizer is not None:  # before the data and the weights: a teacher with other ids fails at once
            teacher_extra_tokens(tokenizer.get_vocab(), teacher_tokenizer.get_vocab())
        split, rows = load_rows(args)
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
    return show(results, f"{args.model} vs {args.teacher} on {args.dataset_name} [{split}]", args.output)


def load_rows(args: argparse.Namespace):
    """The split to score (and its name), cut to --max_samples."""
    from .datasets import eval_split, load_any

    dataset = load_any(args.dataset_name, args.dataset_config)
    split = eval_split(dataset, args.split) or ("train" if "train" in dataset else None)
    if split is None:
        raise ValueError(f"dataset {args.dataset_name} has no split {args.split!r} (splits: {sorted(dataset)})")
    rows = dataset[split]
    if args.max_samples is not None:
        rows = rows.select(range(min(args.max_samples, len(rows))))
    return split, rows


def run_several(args: argparse.Namespace, teachers: dict[str, str]) -> int:
    """Each row against the teacher its column names, one teacher loaded at a time: KL per teacher and over all."""
    from ..evaluation import mean_token_kl
    from ..models import load_causal_lm, load_tokenizer
    from ..routing import TeacherColumn
    from ..teacher.local import published_tokenizer

    if args.task != "none":
        return report("eval", "--task scores one teacher's accuracy; give one --teacher with it")
    try:
        tokenizer = load_tokenizer(args.model, trust_remote_code=False)
        split, rows = load_rows(args)
        column = TeacherColumn(tuple(teachers), args.teacher_column)
        column.check_columns(rows.column_names, f"dataset {args.dataset_name} [{split}]")
        owners = [column.index_of(row, i) for i, row in enumerate(rows)]
        student = load_causal_lm(args.model, {}, trust_remote_code=False, role="student").eval()
        results, kl_sums, tokens = {"split": split, "rows": len(rows)}, [0.0, 0.0], 0
        for index, (name, path) in enumerate(teachers.items()):
            own = rows.select([i for i, owner in enumerate(owners) if owner == index])
            results[f"teacher/{name}/rows"] = len(own)
            if not len(own):
                continue
            teacher = load_causal_lm(path, {}, trust_remote_code=False, role=f'teacher "{name}"').eval()
            scores = mean_token_kl(
                student,
                teacher,
                tokenizer,
                own,
                args.max_length,
                batch_size=args.batch_size,
                teacher_tokenizer=published_tokenizer(path),
            )
            results |= {f"teacher/{name}/{key}": value for key, value in scores.items()}
            kl_sums = [total + scores[key] * scores["completion_tokens"] for total, key in zip(kl_sums, KL_KEYS)]
            tokens += scores["completion_tokens"]
        results |= {key: total / max(tokens, 1) for key, total in zip(KL_KEYS, kl_sums)}
        results["completion_tokens"] = tokens
    except (ValueError, OSError) as error:
        return report("eval", error)
    names = ", ".join(f"{name}={path}" for name, path in teachers.items())
    return show(results, f"{args.model} vs {names} on {args.dataset_name} [{split}]", args.output)


KL_KEYS = ("kl_teacher_student", "kl_student_teacher")


def show(results: dict, title: str, output: str | None) -> int:
    """The results as a table, and as JSON in `output` when given."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in results.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)
    if output:
        try:
            with open(output, "w") as handle:
                json.dump(results, handle, indent=2)
        except OSError as error:
            return report("eval", f"cannot write --output {output}: {error.strerror or error}")
    return 0
