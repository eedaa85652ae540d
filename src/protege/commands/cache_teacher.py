"""`protege cache-teacher`: run the teacher once over a dataset's completions and write its output to a folder that
`protege train --teacher_cache FOLDER` trains from without the teacher (see `protege.teacher.cache`).

The rows are tokenized exactly as `protege train` tokenizes them (the student's tokenizer, the same length settings
and their defaults), since a cached row is found by the digest of its token ids: a setting that differs here would
give rows training cannot find. A killed run resumes: the same command continues after the last complete shard.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from .errors import report
from .interrupts import Interrupted, interruptible

if TYPE_CHECKING:
    from ..data import SequenceLimit
    from ..teacher.cache import CacheSource

COMMAND = "cache-teacher"
STORED_DTYPES = ("bfloat16", "float16", "float32")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        COMMAND,
        help="Run the teacher once over a dataset and cache its outputs for `protege train --teacher_cache`.",
        description="Write the teacher's output for every completion token of a dataset to a folder (the LM head "
        "once and final hidden states, or top-K log-probs). Rerunning a killed command continues where it stopped.",
    )
    parser.error = one_line_error  # argparse's mistakes too (a missing flag, a bad number): one line, exit 2
    parser.add_argument(
        "--teacher",
        required=True,
        help="Teacher: hub id, local path, or the URL of a `protege serve-teacher` server (the hidden format from a "
        "server serving it, else top-k log-probs; its API key from PROTEGE_TEACHER_API_KEY) or, with "
        "--teacher_server_protocol openai, of a stock vLLM or SGLang server (top-k only).",
    )
    parser.add_argument(
        "--teacher_server_protocol",
        default="protege",
        help="As `protege train`: protege (default) for a `protege serve-teacher` URL; openai for the prompt "
        "log-probs of an OpenAI-compatible server's /v1/completions (--format topk).",
    )
    parser.add_argument(
        "--teacher_server_model", default=None, help="With --teacher_server_protocol openai: the served model's name."
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="The STUDENT's tokenizer (hub id or path): the cache is keyed by the student's token ids. Default: the "
        "teacher's, which must then be the student's too (required with a server URL).",
    )
    parser.add_argument(
        "--teacher_name",
        default=None,
        help="Several teachers: cache only the rows routed to this teacher (by --teacher_column, as training routes "
        "them), for `--teacher_cache '{\"NAME\": FOLDER, ...}'`. Default: every row.",
    )
    parser.add_argument(
        "--teacher_column", default="teacher", help="As `protege train`: the column naming a row's teacher."
    )
    parser.add_argument(
        "--default_teacher", default=None, help="As `protege train`: the teacher of rows without a --teacher_column."
    )
    parser.add_argument(
        "--dataset_name", required=True, help="Hub dataset, a json/jsonl/parquet/csv file, or a saved folder."
    )
    parser.add_argument("--dataset_config", default=None, help="Dataset configuration name.")
    parser.add_argument("--dataset_train_split", default="train", help="Split to cache (the one training uses).")
    parser.add_argument(
        "--max_length", type=optional_int, default=1024, help="As `protege train`: prompt + completion tokens."
    )
    parser.add_argument(
        "--max_prompt_length",
        type=optional_int,
        default=None,
        help="As `protege train`; default max_length - max_completion_length.",
    )
    parser.add_argument(
        "--max_completion_length", type=int, default=512, help="As `protege train` (decides max_prompt_length)."
    )
    parser.add_argument("--prompt_truncation", default="middle", help="As `protege train`: middle, left or error.")
    parser.add_argument(
        "--format",
        default="hidden",
        help="hidden (default): final hidden states and the LM head, exact for every beta; topk: the top-K "
        "log-probs (beta 0 with loss_top_k <= K, or loss_top_k 1).",
    )
    parser.add_argument("--loss_top_k", type=int, default=None, help="K of --format topk.")
    parser.add_argument(
        "--dtype",
        default=None,
        help="Stored dtype: bfloat16 (default for hidden), float16 (default for topk), float32, or int8 (hidden only: "
        "8-bit with a float32 scale a token, H + 4 bytes a token instead of 2H; lossy).",
    )
    parser.add_argument("--teacher_dtype", default="float32", help="Dtype a local teacher's weights are loaded in.")
    parser.add_argument("--device", default="cpu", help="Where a local teacher runs: cpu (default), cuda, cuda:1...")
    parser.add_argument("--batch_size", type=int, default=8, help="Rows per teacher forward pass.")
    parser.add_argument("--rows_per_shard", type=int, default=1024, help="Rows per shard file (the resume unit).")
    parser.add_argument("--output", required=True, help="The cache folder to write (or to finish).")
    parser.set_defaults(handler=run)


def one_line_error(message: str) -> None:
    """argparse's error, as every protege command reports a mistake (argparse prints the usage first)."""
    sys.exit(report(COMMAND, message))


def optional_int(text: str) -> int | None:
    """An integer, or none/None (no limit, as `protege train` accepts)."""
    return None if text.lower() == "none" else int(text)


def check_settings(args: argparse.Namespace) -> None:
    """The flags make sense together, and the derived values are filled in as `DistillationConfig` derives them."""
    from ..choices import PROMPT_TRUNCATIONS
    from ..teacher.cache import FORMATS

    if args.format not in FORMATS:
        raise ValueError(f"--format {args.format!r}: choose one of {', '.join(FORMATS)}")
    if args.format == "topk" and (args.loss_top_k is None or args.loss_top_k < 1):
        raise ValueError("--format topk needs --loss_top_k K (K >= 1): the number of log-probs kept per token")
    if args.format == "hidden" and args.loss_top_k is not None:
        raise ValueError("--loss_top_k is for --format topk; a hidden cache keeps the whole distribution")
    args.dtype = args.dtype or ("bfloat16" if args.format == "hidden" else "float16")
    int8 = args.format == "hidden" and args.dtype == "int8"  # hidden states only: `teacher.quantized`
    for flag, value in (("--dtype", None if int8 else args.dtype), ("--teacher_dtype", args.teacher_dtype)):
        if value is not None and value not in STORED_DTYPES:
            hidden_only = " (int8: --format hidden only)" if flag == "--dtype" else ""
            raise ValueError(f"{flag} {value!r}: choose one of {', '.join(STORED_DTYPES)}{hidden_only}")
    if args.prompt_truncation not in PROMPT_TRUNCATIONS:
        raise ValueError(f"--prompt_truncation {args.prompt_truncation!r}: choose one of {PROMPT_TRUNCATIONS}")
    for flag in ("batch_size", "rows_per_shard"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be at least 1, not {getattr(args, flag)}")
    check_protocol(args)
    if is_url(args.teacher) and args.tokenizer is None:
        raise ValueError(
            "--tokenizer is required with a teacher server URL: the student's tokenizer, whose token ids key the cache"
        )
    if args.max_prompt_length is None and args.max_length is not None:  # DistillationConfig._derive's rule
        args.max_prompt_length = args.max_length - args.max_completion_length
    args.tokenizer = args.tokenizer or args.teacher


def check_protocol(args: argparse.Namespace) -> None:
    """An OpenAI-compatible server is a URL with a model name, and serves log-probs only: refused before connecting."""
    from ..choices import TEACHER_PROTOCOLS

    if args.teacher_server_protocol not in TEACHER_PROTOCOLS:
        raise ValueError(
            f"--teacher_server_protocol {args.teacher_server_protocol!r}: choose one of {', '.join(TEACHER_PROTOCOLS)}"
        )
    if args.teacher_server_protocol != "openai":
        return
    if not is_url(args.teacher):
        raise ValueError(f"--teacher_server_protocol openai needs a server URL as --teacher, not {args.teacher!r}")
    if args.format == "hidden":
        raise ValueError(
            "--format hidden: an OpenAI-compatible server (--teacher_server_protocol openai) serves log-probs only, "
            "not hidden states; use --format topk --loss_top_k K"
        )
    if args.teacher_server_model is None:
        raise ValueError("--teacher_server_protocol openai needs --teacher_server_model: the served model's name")


def is_url(teacher: str) -> bool:
    return teacher.startswith(("http://", "https://"))


def run(args: argparse.Namespace) -> int:
    from ..http_client import ServerError

    with interruptible():
        try:
            try:
                check_settings(args)
                with quiet_libraries():
                    manifest = cache(args)
            except (ValueError, OSError, ServerError) as error:  # a server that refuses or is not there: one line
                return report(COMMAND, error)
        except Interrupted as interrupt:
            print(where_it_stands(interrupt, Path(args.output)), file=sys.stderr)
            return interrupt.exit_code
    print(finished(manifest, args), file=sys.stderr)
    return 0


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """datasets' and transformers' own bars off while the command shows its one bar (and its errors one line)."""
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets_on, transformers_on = datasets.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_on:
            datasets.enable_progress_bars()
        if transformers_on:
            transformers_logging.enable_progress_bar()


def tokenized_rows(args: argparse.Namespace, tokenizer, limit):
    """The split's rows (those of --teacher_name, where given) tokenized as the trainer tokenizes a training set at
    lmbda < 1, and the raw split; `limit` is the `data.SequenceLimit` an over-long row is refused by."""
    from ..data import Tokenizer, tokenize_dataset
    from .datasets import load_any

    dataset = load_any(args.dataset_name, args.dataset_config)
    if args.dataset_train_split not in dataset:
        raise ValueError(
            f"dataset {args.dataset_name} has no split {args.dataset_train_split!r} (splits: {sorted(dataset)})"
        )
    raw = dataset[args.dataset_train_split]
    row_tokenizer = Tokenizer(
        tokenizer, args.max_prompt_length, args.max_length, args.prompt_truncation, args.max_completion_length, limit
    )
    rows = tokenize_dataset(teacher_rows(raw, args), row_tokenizer, needs_completion=True, name="train_dataset")
    return rows, raw


def teacher_rows(raw, args: argparse.Namespace):
    """The rows training routes to --teacher_name (`routing.TeacherColumn`'s rule: the row's --teacher_column, else
    --default_teacher); every row without --teacher_name."""
    name, column = args.teacher_name, args.teacher_column
    if name is None:
        return raw
    if column not in raw.column_names and args.default_teacher is None:
        raise ValueError(
            f"--teacher_name {name!r}: dataset {args.dataset_name} has no {column!r} column to route rows by "
            f"(columns: {raw.column_names}); name it with --teacher_column, or set --default_teacher"
        )
    owners = raw[column] if column in raw.column_names else [None] * len(raw)
    owners = [args.default_teacher if owner is None else owner for owner in owners]
    picked = [index for index, owner in enumerate(owners) if owner == name]
    if not picked:
        named = sorted({str(owner) for owner in owners})
        raise ValueError(f"--teacher_name {name!r}: no row of dataset {args.dataset_name} is routed to it ({named})")
    return raw.select(picked)


def shared_width(tokenizer, teacher, teacher_tokenizer) -> int:
    """The vocabulary the teacher is compared on, checked as training checks it (`teacher.local.shared_vocab_size`,
    with the teacher in the student's place: the student is not here, training checks its layer)."""
    from ..models import output_rows
    from ..teacher.vocabulary import shared_rows, teacher_extra_tokens

    extra = (
        [] if teacher_tokenizer is None else teacher_extra_tokens(tokenizer.get_vocab(), teacher_tokenizer.get_vocab())
    )
    rows = output_rows(teacher)
    return shared_rows(len(tokenizer), rows, rows, len(extra))


@dataclass
class Source:
    """Where the outputs come from, and what the manifest says of the teacher."""

    source: CacheSource
    identity: dict
    vocab_size: int | None  # None: an OpenAI server, which does not say
    hidden_size: int | None


def local_source(args: argparse.Namespace, tokenizer) -> tuple[Callable[[], Source], SequenceLimit | None, Callable]:
    """A local teacher, checked before the data and loaded after it: the source's maker, the row limit (its
    max_position_embeddings where max_length is none), and what closes it (nothing)."""
    import torch
    from transformers import AutoConfig

    from ..data import DistillationCollator, sequence_limit
    from ..model_source import check_model_source
    from ..models import load_causal_lm
    from ..teacher.cache import ModelSource, teacher_identity
    from ..teacher.local import published_tokenizer
    from ..teacher.vocabulary import teacher_extra_tokens

    check_model_source(args.teacher, "teacher")
    teacher_tokenizer = published_tokenizer(args.teacher) if args.tokenizer != args.teacher else None
    if teacher_tokenizer is not None:  # before the data and the weights: a teacher of other ids fails at once
        teacher_extra_tokens(tokenizer.get_vocab(), teacher_tokenizer.get_vocab())
    limit = sequence_limit(
        args.max_length, None, {"teacher": SimpleNamespace(config=AutoConfig.from_pretrained(args.teacher))}
    )

    def make() -> Source:
        dtype = getattr(torch, args.teacher_dtype)
        teacher = load_causal_lm(args.teacher, {"dtype": dtype}, False, role="teacher").to(args.device).eval()
        collate = DistillationCollator(tokenizer.pad_token_id)

        def on_device(part: list[dict]) -> dict:
            return {key: value.to(args.device) for key, value in collate(part).items()}

        hidden = teacher.config.get_text_config().hidden_size if args.format == "hidden" else None
        width = shared_width(tokenizer, teacher, teacher_tokenizer)
        return Source(ModelSource(teacher, on_device), teacher_identity(teacher, args.teacher), width, hidden)

    return make, limit, lambda: None


def server_source(args: argparse.Namespace, tokenizer) -> tuple[Callable[[], Source], SequenceLimit | None, Callable]:
    """A teacher server, connected and checked before the data (it must serve the format's payload and the student's
    vocabulary, an OpenAI one the model named and K log-probs): the source's maker, the row limit (its max_model_len,
    less the token an OpenAI server generates), and what closes the connection."""
    from ..data import SequenceLimit, sequence_limit
    from ..teacher.cache_server import ServerSource, connect_for_cache, server_identity
    from ..teacher.vocabulary import shared_rows

    protocol = {key: getattr(args, key) for key in ("teacher_server_protocol", "teacher_server_model")}
    connection = connect_for_cache(args.teacher, args.format, tokenizer, args.loss_top_k, **protocol)
    openai, served = args.teacher_server_protocol == "openai", connection.max_model_len
    limit = sequence_limit(args.max_length, None if openai else served)
    if openai and served is not None:
        limit = SequenceLimit(served - 1, f"the max_model_len of the server at {args.teacher} less the token it adds")

    def make() -> Source:
        identity = server_identity(connection, args.format)
        # An OpenAI server reports no vocabulary size: none recorded, training compares on the student's rows, as
        # it does with the live server.
        width = None if openai else connection.info.get("vocab_size") or len(tokenizer)
        hidden = None
        if args.format == "hidden":
            meta = connection.client.lm_head_meta(required=True)
            rows, hidden = int(meta["vocab_size"]), int(meta["hidden_size"])
            width = shared_rows(len(tokenizer), rows, rows, connection.extra_tokens)
        return Source(ServerSource(connection, hidden), identity, width, hidden)

    return make, limit, connection.client.close


def cache(args: argparse.Namespace):
    """Check the teacher, tokenize, then write (or finish) the cache; returns its finished manifest."""
    from .. import __version__
    from ..models import load_tokenizer
    from ..teacher.cache import CacheManifest, build_cache, start_or_resume, tokenizer_fingerprint
    from ..teacher.cached import tokenization_settings

    tokenizer = load_tokenizer(args.tokenizer, trust_remote_code=False)
    make, limit, close = (server_source if is_url(args.teacher) else local_source)(args, tokenizer)
    try:
        rows, raw = tokenized_rows(args, tokenizer, limit)
        made = make()
        manifest = CacheManifest(
            format=args.format,
            dtype=args.dtype,
            teacher=made.identity,
            tokenizer_sha256=tokenizer_fingerprint(tokenizer),
            tokenization=tokenization_settings(args),
            dataset_fingerprint=raw._fingerprint,
            hidden_size=made.hidden_size,
            vocab_size=made.vocab_size,
            top_k=args.loss_top_k,
            teacher_name=args.teacher_name,
            version=__version__,
        )
        folder = Path(args.output)
        done = start_or_resume(folder, manifest)  # a different cache in the folder fails here, before any work
        tokens = sum(len(ids) for ids in rows["completion_ids"])
        with RowProgress(len(rows), tokens, done.rows, done.tokens) as progress:
            return build_cache(made.source, rows, folder, done, args.batch_size, args.rows_per_shard, progress)
    finally:
        close()


class RowProgress:
    """A progress bar on stderr: rows done, tokens/s, ETA (by tokens, since rows differ in length)."""

    def __init__(self, rows: int, tokens: int, rows_done: int, tokens_done: int):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]caching the teacher"),
            BarColumn(),
            TextColumn("{task.fields[rows]:,}/{task.fields[total_rows]:,} rows"),
            TextColumn("{task.fields[speed]} tokens/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=False,
        )
        self.task = self.progress.add_task(
            "cache", total=max(tokens, 1), completed=tokens_done, rows=rows_done, total_rows=rows, speed="-"
        )
        self.rows = rows_done

    def __enter__(self) -> RowProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def __call__(self, rows: int, tokens: int) -> None:
        self.rows += rows
        self.progress.advance(self.task, tokens)
        speed = self.progress.tasks[0].speed
        self.progress.update(self.task, rows=self.rows, speed="-" if speed is None else f"{speed:,.0f}")


def where_it_stands(interrupt: Interrupted, folder: Path) -> str:
    """One line for an interrupted run: the rows its complete shards hold, and how to go on."""
    from ..teacher.cache import MANIFEST, CacheManifest

    if not (folder / MANIFEST).exists():
        return f"protege {COMMAND}: interrupted ({interrupt.name}) before caching started; nothing was written"
    manifest = CacheManifest.read(folder)
    return (
        f"protege {COMMAND}: interrupted ({interrupt.name}); {manifest.rows} rows in {len(manifest.shards)} complete "
        f"shards in {folder.resolve()}; run the same command again to continue from there"
    )


def finished(manifest, args: argparse.Namespace) -> str:
    """Where the cache went, its size, and the flag that trains from it."""
    folder = Path(args.output).resolve()
    size = sum(
        path.stat().st_size
        for path in folder.iterdir()
        if path.name.startswith("shard-") and path.suffix == ".safetensors"
    )
    per_token = size / max(manifest.tokens, 1)
    return (
        f"protege {COMMAND}: done; {manifest.rows} rows, {manifest.tokens} completion tokens, {per_token:,.0f} bytes "
        f"a token ({manifest.format}, {manifest.dtype}) in {folder}. Train from it: protege train ... "
        f"--teacher_cache {folder}"
    )
