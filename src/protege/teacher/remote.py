"""A teacher behind a server: connect, then score every slice of an optimizer step in one client call.

Two teachers, one per kind of answer, both filling each slice's batch (`teacher_output`) in `prepare`, so the network
round trip is paid once per step, and the loss reads the answer from the batch. Evaluation batches, which skip
`prepare`, are scored when first asked.

* `RemoteTeacher`: top-k log-probs (the json, binary and compact formats), returning "scores";
* `RemoteHiddenTeacher`: final hidden states (the hidden format) and the teacher's LM head, fetched once, so the loss
  is exact for any beta, top-k and temperature; returning "hidden".
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from ..choices import API_KEY_VARIABLE, HIDDEN_FORMAT
from ..losses import IGNORE_INDEX
from ..models import output_rows
from ..outputs import TeacherHidden, TeacherScores
from . import Placement
from .client import TeacherClient
from .head import LMHead, head_from_checkpoint, vocabulary_sha256
from .spec import TeacherSpec, server_format
from .vocabulary import ACCEPTED, TokenizerMismatchError, announce_extra_tokens, shared_rows, teacher_extra_tokens


@dataclass
class ServerConnection:
    """A teacher server that answered: its client, its /info/ answer, and how many tokens its tokenizer adds to the
    student's (0 for the same tokenizer)."""

    client: TeacherClient
    info: dict
    extra_tokens: int

    @property
    def max_model_len(self) -> int | None:
        """The longest sequence the server scores, where it says (rows it would refuse fail at start, named)."""
        served = self.info.get("max_model_len")
        return served if isinstance(served, int) and served > 0 else None


def connect_teacher(args, tokenizer, url: str | None = None, response_format: str | None = None) -> ServerConnection:
    """A connection to the server at `url` asked for `response_format` (default: the config's single teacher server),
    once it answers and serves the student's vocabulary or one that extends it."""
    url = url or args.teacher_model_server_url
    response_format = response_format or server_format(args)
    client = TeacherClient(
        url,
        protocol=args.teacher_server_protocol,
        response_format=response_format,
        timeout=args.teacher_server_timeout,
        max_retries=args.teacher_server_max_retries,
        model=args.teacher_server_model,
        deadline=args.teacher_server_deadline,
        api_key=args.teacher_server_api_key or os.environ.get(API_KEY_VARIABLE),
    )
    try:
        client.wait_until_ready(args.teacher_server_startup_timeout)
        info = client.info()
        extra_tokens = _served_extra_tokens(client, info, response_format, tokenizer)
        formats = info.get("formats")
        if formats is not None and response_format not in formats:
            raise ValueError(
                f"teacher_server_response_format={response_format!r}: the teacher server at "
                f"{url} serves {formats} (the hidden format needs its transformers backend, or the vllm backend "
                "started with --vllm-hidden-states)"
            )
    except BaseException:
        client.close()
        raise
    return ServerConnection(client, info, extra_tokens)


def connect_remote_teacher(spec: TeacherSpec, args, student: torch.nn.Module, tokenizer, objective, own_tokenizer=None):
    """The teacher at `spec.server_url`, connected and checked; with the hidden format, its LM head fetched once and
    sliced to the shared vocabulary. `own_tokenizer`: a teacher of another tokenizer's own (cross-tokenizer), which
    the server is checked against and whose whole vocabulary is kept."""
    connection = connect_teacher(args, own_tokenizer or tokenizer, spec.server_url, spec.response_format)
    try:
        if spec.returns != "hidden":
            return RemoteTeacher(connection, objective.server_top_k, args.temperature, output_rows(student), spec.name)
        head, where = teacher_head(args, connection.client)
        if own_tokenizer is not None:
            vocab_size = min(len(own_tokenizer), head.vocab_size)
        else:
            vocab_size = shared_rows(len(tokenizer), output_rows(student), head.vocab_size, connection.extra_tokens)
        weight, bias = head.for_loss(vocab_size, student.device, student.dtype, where)
        del head
        return RemoteHiddenTeacher(connection, weight, bias, args.teacher_server_hidden_dtype, spec.name)
    except BaseException:
        connection.client.close()
        raise


def _served_extra_tokens(client: TeacherClient, info: dict, response_format: str, tokenizer) -> int:
    """How many tokens the server's tokenizer adds to the student's (0 for the same one), or a named error.

    /info/'s vocabulary size and fingerprint settle the common case, one shared tokenizer. Otherwise the server's
    token-to-id map (/vocabulary/) is compared as a local teacher's is. An extending teacher is accepted with the
    hidden format only: the trainer then applies the teacher's LM head itself and keeps the student's rows, while the
    log-prob formats are normalised by the server over its whole vocabulary, the extra tokens included.
    """
    served, fingerprint = info.get("vocab_size"), info.get("tokenizer_sha256")
    if (served is None or served == len(tokenizer)) and (
        fingerprint is None or fingerprint == vocabulary_sha256(tokenizer)
    ):
        return 0
    where = f"the tokenizer of the teacher server at {client.base_url}"
    teacher_vocab = client.vocabulary()
    if teacher_vocab is None:  # a server that does not list its vocabulary: only its size and fingerprint are known
        if served is None or served == len(tokenizer):
            how = "the same size, but its token-to-id map's SHA-256 differs"
        else:
            how = f"{served} vs {len(tokenizer)} tokens"
        raise TokenizerMismatchError(
            f"{where} differs from the student's ({how}), and the server does not list its vocabulary (/vocabulary/), "
            f"so an extension of the student's cannot be recognised; {ACCEPTED}"
        )
    extra = teacher_extra_tokens(tokenizer.get_vocab(), teacher_vocab, where)
    if extra and response_format != HIDDEN_FORMAT:
        raise TokenizerMismatchError(
            f"{where} extends the student's by {len(extra)} tokens; with teacher_server_response_format="
            f"{response_format!r} the server normalises its log-probs over its whole vocabulary, "
            "those tokens included, so use teacher_server_response_format='hidden' (the trainer then compares the "
            "teacher on the student's tokens), or a local teacher"
        )
    announce_extra_tokens(extra, len(tokenizer), where)
    return len(extra)


def teacher_head(args, client: TeacherClient) -> tuple[LMHead, str]:
    """The teacher's LM head and where it came from: `teacher_lm_head_path`'s checkpoint when set, else the server."""
    if args.teacher_lm_head_path is None:
        return client.lm_head(), f"{client.base_url}/lm_head/"
    where = f"teacher_lm_head_path={args.teacher_lm_head_path!r}"
    head = head_from_checkpoint(args.teacher_lm_head_path, trust_remote_code=args.trust_remote_code)
    served = client.lm_head_meta()
    if served is not None and (int(served["vocab_size"]), int(served["hidden_size"])) != head.weight.shape:
        raise ValueError(
            f"{where} has an LM head of shape {tuple(head.weight.shape)} but the teacher server at {client.base_url} "
            f"serves a model whose head is ({served['vocab_size']}, {served['hidden_size']}); they must be the same "
            "teacher"
        )
    return head, where


def completion_sequences(batches: list[dict[str, torch.Tensor]]):
    """Every row with a completion, as (prompt + completion ids), its prompt length, and its (slice, row) place."""
    sequences, prompt_lengths, places = [], [], []
    for b, batch in enumerate(batches):
        width = batch["prompt_ids"].shape[1]
        completion_mask = batch["labels"][:, width:].ne(IGNORE_INDEX)
        for row in range(batch["input_ids"].shape[0]):
            prompt = batch["prompt_ids"][row][batch["prompt_mask"][row].bool()].tolist()
            completion = batch["input_ids"][row, width:][completion_mask[row]].tolist()
            if completion:  # a prompt-only row has nothing to score
                sequences.append(prompt + completion)
                prompt_lengths.append(len(prompt))
                places.append((b, row))
    return sequences, prompt_lengths, places


def _shape(batch: dict[str, torch.Tensor]) -> tuple[int, int, torch.device]:
    """Rows, completion columns and device of a slice."""
    rows, width = batch["input_ids"].shape[0], batch["input_ids"].shape[1] - batch["prompt_ids"].shape[1]
    return rows, width, batch["input_ids"].device


class RemoteTeacher:
    """A server's top-k log-probs at completion positions (see the module docstring)."""

    returns = "scores"
    model = None

    def __init__(self, connection: ServerConnection, top_k: int, temperature: float, vocab_size: int, name: str):
        self.client, self.max_model_len = connection.client, connection.max_model_len
        self.top_k, self.temperature, self.vocab_size, self.name = top_k, temperature, vocab_size, name

    def place(self, placement: Placement) -> None:
        """Nothing to place: answers are made on the slice's device as they arrive."""

    def close(self) -> None:
        self.client.close()

    def prepare(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """One client call for every slice of the step; each slice's answer rides along in its batch."""
        sequences, prompt_lengths, places = completion_sequences(batches)
        scores = self.client.score(sequences, prompt_lengths, self.top_k, self.temperature) if sequences else None
        for batch in batches:
            rows, width, device = _shape(batch)
            batch["teacher_output"] = TeacherScores(
                topk_ids=torch.zeros((rows, width, self.top_k), dtype=torch.long, device=device),
                topk_logprobs=torch.full((rows, width, self.top_k), float("-inf"), device=device),
                token_logprobs=torch.full((rows, width), float("-inf"), device=device),
            )
        for i, (b, row) in enumerate(places):
            n = int(scores.completion_lengths[i])
            answer = batches[b]["teacher_output"]
            answer.topk_logprobs[row, :n] = torch.from_numpy(scores.topk_logprobs[i, :n])
            answer.topk_ids[row, :n] = torch.from_numpy(scores.topk_ids[i, :n])
            answer.token_logprobs[row, :n] = torch.from_numpy(scores.actual_logprobs[i, :n])

    def __call__(self, batch: dict[str, torch.Tensor]) -> TeacherScores:
        if "teacher_output" not in batch:
            self.prepare([batch])
        return batch["teacher_output"]


class RemoteHiddenTeacher(RemoteTeacher):
    """A server's final hidden states, with the teacher's LM head held here (`weight`, `bias`: sliced to the shared
    vocabulary, in the student's compute dtype, and on its device once placed)."""

    returns = "hidden"

    def __init__(
        self, connection: ServerConnection, weight: torch.Tensor, bias: torch.Tensor | None, wire_dtype: str, name: str
    ):
        self.client, self.max_model_len, self.name = connection.client, connection.max_model_len, name
        self.weight, self.bias, self.wire_dtype, self.vocab_size = weight, bias, wire_dtype, weight.shape[0]

    def place(self, placement: Placement) -> None:
        self.weight = self.weight.to(placement.device)
        self.bias = None if self.bias is None else self.bias.to(placement.device)

    def prepare(self, batches: list[dict[str, torch.Tensor]]) -> None:
        sequences, prompt_lengths, places = completion_sequences(batches)
        hidden_size = self.weight.shape[1]
        states = self.client.hidden_states(sequences, prompt_lengths, self.wire_dtype, hidden_size) if sequences else []
        for batch in batches:
            rows, width, device = _shape(batch)
            hidden = torch.zeros((rows, width, hidden_size), dtype=self.weight.dtype, device=device)
            batch["teacher_output"] = TeacherHidden(hidden, self.weight, self.bias)
        for (b, row), state in zip(places, states):
            batches[b]["teacher_output"].hidden[row, : len(state)] = torch.from_numpy(np.ascontiguousarray(state))
