"""Training from a teacher cache (`teacher_cache`): off-policy slices read the teacher's output from the cache
(`cache.CacheReader`, by each row's token digest, read ahead in a background thread once the step's slices are
known); on-policy slices, whose completions are new, go to the live teacher, so with `lmbda=0` no teacher is loaded at
all.

`check_cache` is the start-up check that a cache fits the run, one line naming the first mismatch: the tokenizer, a
tokenization setting, what the objective needs of the format, or a training row the cache lacks (by its index).
"""

from __future__ import annotations

import warnings
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from ..losses import IGNORE_INDEX
from ..models import output_rows
from ..outputs import TeacherHidden, TeacherScores
from ..routing import INDEX_KEY
from . import Placement, Teacher
from .cache import HEAD_FILE, CacheReader, row_digest, tokenizer_fingerprint
from .head import load_head
from .quantized import INT8, METHOD
from .spec import SINGLE
from .vocabulary import shared_rows

TOKENIZATION_FIELDS = ("max_length", "max_prompt_length", "prompt_truncation")
READ_KEY = "teacher_cache_read"  # a training slice's number among the step's reads ahead


def tokenization_settings(args) -> dict:
    """The settings that decide a row's token ids, as a cache records them."""
    return {name: getattr(args, name) for name in TOKENIZATION_FIELDS}


def check_cache(reader: CacheReader, args, tokenizer, objective, teacher_name: str | None = None) -> None:
    """The cache was made for this run's tokens (and, with several teachers, for the rows of `teacher_name`) and can
    give what the objective needs, or a ValueError naming what differs (rows are checked by `check_rows`, once they
    are tokenized)."""
    manifest, where = reader.manifest, f"teacher_cache={str(reader.folder)!r}"
    if teacher_name is not None and manifest.teacher_name not in (None, teacher_name):
        raise ValueError(
            f"{where} holds the rows of teacher {manifest.teacher_name!r} (cache-teacher --teacher_name "
            f"{manifest.teacher_name}), not of {teacher_name!r}"
        )
    if manifest.tokenizer_sha256 != tokenizer_fingerprint(tokenizer):
        raise ValueError(f"{where} was made with another tokenizer (tokenizer_sha256 differs from the student's)")
    for name, value in tokenization_settings(args).items():
        cached = manifest.tokenization.get(name)
        if cached != value:
            raise ValueError(f"{where} was made with {name}={cached!r}, this run has {name}={value!r}")
    if manifest.format == "topk":
        beta, top_k = args.beta, args.loss_top_k
        if args.temperature != 1:
            raise ValueError(
                f"{where} holds log-probs at temperature 1, this run has temperature={args.temperature}; a hidden "
                "cache is exact at every temperature"
            )
        if beta == 0 and not 1 <= top_k <= manifest.top_k:
            raise ValueError(
                f"{where} holds the teacher's top-{manifest.top_k} log-probs, so with beta=0 loss_top_k must be in "
                f"[1, {manifest.top_k}], not {top_k}; a hidden cache is exact for every setting"
            )
        if beta > 0 and top_k != 1:
            raise ValueError(
                f"{where} holds top-k log-probs: with beta={beta} only the sparse top-1 loss exists on them, so "
                f"loss_top_k must be 1, not {top_k}; a hidden cache is exact for every setting"
            )
    if objective.fused and manifest.format != "hidden":
        raise ValueError(f"{where}: use_liger_kernel needs a hidden cache")


def check_rows(reader: CacheReader, rows, name: str, route: int | None = None) -> None:
    """Every tokenized row with a completion (of those routed to teacher `route`, where given) is in the cache, or a
    ValueError naming the first that is not."""
    owners = rows[INDEX_KEY] if route is not None else None
    for index in range(len(rows)):
        if owners is not None and owners[index] != route:
            continue
        row = rows[index]
        if row["completion_ids"] and row_digest(row["prompt_ids"], row["completion_ids"]) not in reader.index:
            raise ValueError(
                f"{name} row {index} is not in teacher_cache={str(reader.folder)!r} (no row with its token ids: the "
                "dataset, its filtering or its tokenization differ from the cache's)"
            )


def warn_lossy(folder: str, quantization: dict | None) -> None:
    """Say once, when training loads an int8 cache, that its teacher is approximate, and by how much."""
    measured = ""
    if quantization:
        measured = (
            f": each token's hidden state is off by {quantization['relative_error_mean']:.2%} on average, at most "
            f"{quantization['relative_error_max']:.2%} (relative L2 error, measured when it was written)"
        )
    warnings.warn(
        f"teacher_cache={folder!r} holds 8-bit hidden states ({METHOD}), so the teacher's distribution is "
        f"approximate{measured}; a bfloat16 cache is exact. Loss error at real shapes: docs/benchmarks.md",
        UserWarning,
        stacklevel=3,
    )


class CachedTeacher:
    """Off-policy slices from the cache, on-policy ones from `live` (see the module docstring). With several teachers
    `route` is its index among them: the rows of the dataset it scores."""

    max_model_len = None

    def __init__(self, reader: CacheReader, student, tokenizer, live: Teacher | None = None, name: str | None = None):
        self.reader, self.live = reader, live
        self.name = name or (SINGLE if live is None else live.name)
        self._reads: dict[int, Future] = {}  # the step's off-policy slices read ahead (`prefetch`), by READ_KEY
        self._reading: ThreadPoolExecutor | None = None
        self.route: int | None = None
        self.returns = "hidden" if reader.manifest.format == "hidden" else "scores"
        self.weight = self.bias = None
        if reader.manifest.dtype == INT8:
            warn_lossy(str(reader.folder), reader.manifest.quantization)
        if self.returns == "hidden":
            head = load_head(reader.folder / HEAD_FILE)
            self.vocab_size = shared_rows(len(tokenizer), output_rows(student), head.vocab_size)
            self.weight, self.bias = head.for_loss(
                self.vocab_size, student.device, student.dtype, str(reader.folder / HEAD_FILE)
            )
        else:
            # none recorded (an OpenAI server's cache): the student's rows, as the live server teacher has
            self.vocab_size = min(reader.manifest.vocab_size or output_rows(student), output_rows(student))
        if live is not None:
            self.vocab_size = min(self.vocab_size, live.vocab_size)

    def check_rows(self, rows, name: str) -> None:
        """Every row of a tokenized dataset (routed to this teacher) is in the cache, or a ValueError naming the row
        (and the teacher, where there are several); a streamed dataset cannot be checked ahead."""
        if not hasattr(rows, "__len__"):
            return
        try:
            check_rows(self.reader, rows, name, self.route)
        except ValueError as error:
            if self.route is None:
                raise
            raise ValueError(f'teacher "{self.name}": {error}') from None

    @property
    def model(self):
        return None if self.live is None else self.live.model

    def place(self, placement: Placement) -> None:
        if self.weight is not None:
            self.weight = self.weight.to(placement.device)
            self.bias = None if self.bias is None else self.bias.to(placement.device)
        if self.live is not None:
            self.live.place(placement)

    def close(self) -> None:
        if self._reading is not None:
            self._reading.shutdown(wait=True, cancel_futures=True)
            self._reading, self._reads = None, {}
        if self.live is not None:
            self.live.close()

    def prepare(self, batches: list[dict]) -> None:
        on_policy = [batch for batch in batches if batch.get("on_policy")]
        if on_policy:
            self._live().prepare(on_policy)
        self.prefetch([batch for batch in batches if not batch.get("on_policy")])

    def prefetch(self, batches: list[dict]) -> None:
        """Start reading the rows of a step's off-policy slices in a background thread, in slice order, so each
        slice's rows come off the disk while the slice before it trains. It holds no more than the step's own teacher
        rows, which the step reads anyway; a read's error is raised when its slice asks for it."""
        self._reads = {}
        if batches and self._reading is None:  # no thread for a run whose steps are all on-policy
            self._reading = ThreadPoolExecutor(max_workers=1, thread_name_prefix="protege-cache-read")
        for number, batch in enumerate(batches):
            batch[READ_KEY] = number  # the slice reaches the teacher again as a copy of this dict (`_prepare_inputs`)
            self._reads[number] = self._reading.submit(self.from_cache, batch)

    def __call__(self, batch: dict):
        if batch.get("on_policy"):
            return self._live()(batch)
        read = self._reads.pop(batch.pop(READ_KEY, None), None)
        return read.result() if read is not None else self.from_cache(batch)

    def _live(self) -> Teacher:
        if self.live is None:
            raise ValueError("on-policy slices need a live teacher: teacher_cache serves dataset completions only")
        return self.live

    def from_cache(self, batch: dict):
        """The slice's teacher output, read from the cache row by row into the completion columns."""
        width = int(batch["prompt_width"])
        labels = batch["labels"][:, width:]
        rows, columns = labels.shape
        digests = []
        for row in range(rows):
            prompt = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()].tolist()
            completion = batch["input_ids"][row, width:][labels[row] != IGNORE_INDEX].tolist()
            digest = row_digest(prompt, completion) if completion else None
            if digest is not None and digest not in self.reader.index:
                raise ValueError(f"a slice's row is not in teacher_cache={str(self.reader.folder)!r} ({self.name})")
            digests.append(digest)
        if self.returns == "hidden":
            hidden = self.weight.new_zeros((rows, columns, self.weight.shape[1]))
            answer, fields = TeacherHidden(hidden, self.weight, self.bias), {"hidden": hidden}
        else:
            k, device = self.reader.manifest.top_k, labels.device
            answer = TeacherScores(
                topk_ids=torch.zeros((rows, columns, k), dtype=torch.long, device=device),
                topk_logprobs=torch.full((rows, columns, k), float("-inf"), device=device),
                token_logprobs=torch.full((rows, columns), float("-inf"), device=device),
            )
            fields = {"topk_ids": answer.topk_ids, "topk_logprobs": answer.topk_logprobs}
            fields["token_logprobs"] = answer.token_logprobs
        for row, digest in enumerate(digests):
            for key, target in fields.items() if digest is not None else ():
                stored = self.reader.row(digest, key)
                target[row, : len(stored)] = stored.to(target.device, target.dtype)
        return answer
