"""A teacher cache written from a protege teacher server (`protege cache-teacher --teacher http://...`), so a teacher
that only runs behind a server is paid for once too.

A server in the hidden format gives an exact hidden cache: its final hidden states (asked for in the cache's dtype, so
the server rounds them as a local build would) and the LM head it serves, saved once. A server of log-prob formats
gives a top-k cache: its top-K log-probs and the sampled token's, normalised by the server as the live server's are in
training. So does an OpenAI-compatible server (a stock vLLM or SGLang, `teacher_server_protocol="openai"`): the prompt
log-probs of `/v1/completions`, asked as training asks them. The manifest's teacher identity is what the server
reports of itself (`server_identity`; an OpenAI server's `GET /v1/models` entry).
"""

from __future__ import annotations

import dataclasses
import re
from types import SimpleNamespace

import numpy as np
import torch

from ..choices import HIDDEN_FORMAT
from .cache import CacheManifest
from .client import TeacherClient, TeacherServerError
from .head import LMHead
from .remote import ServerConnection, connect_teacher

LOGPROB_FORMAT = "compact"  # the log-prob payload a top-k cache is filled from (the smallest)
OPENAI = "openai"
OPENAI_CARD = ("root", "parent", "max_model_len")  # what vLLM's /v1/models says of a model, besides its id
# The manifest says what an OpenAI-compatible source leaves unchecked: it reports no vocabulary.
OPENAI_UNCHECKED = (
    "not checked: an OpenAI-compatible server reports no vocabulary, so the tokenizer given (--tokenizer) is taken "
    "to be the served model's"
)


def connection_settings() -> dict:
    """The teacher-server client's settings as `DistillationConfig` defaults them (timeouts, retries, API key from
    the environment): a cache is written with the client training uses."""
    from ..config import DistillationConfig

    return {
        field.name: field.default
        for field in dataclasses.fields(DistillationConfig)
        if field.name.startswith("teacher_server_") or field.name == "teacher_lm_head_path"
    }


def connect_for_cache(url: str, fmt: str, tokenizer, top_k: int | None = None, **settings) -> ServerConnection:
    """The server at `url`, checked as training checks it (it answers, serves the student's vocabulary, and serves
    the payload the cache's format is made from); an OpenAI server's `info` is its model's entry (`openai_info`)."""
    args = SimpleNamespace(**(connection_settings() | settings))
    try:
        connection = connect_teacher(args, tokenizer, url, HIDDEN_FORMAT if fmt == "hidden" else LOGPROB_FORMAT)
    except ValueError as error:
        if not str(error).startswith("teacher_server_response_format="):
            raise
        served = str(error).split(" serves ", 1)[-1]
        other = "--format topk --loss_top_k K" if fmt == "hidden" else "--format hidden"
        raise ValueError(f"--format {fmt}: the teacher server at {url} serves {served}; use {other}") from None
    if args.teacher_server_protocol == OPENAI:
        try:
            connection.info = openai_info(connection.client, top_k)
        except BaseException:
            connection.client.close()
            raise
    return connection


def openai_info(client: TeacherClient, top_k: int) -> dict:
    """An OpenAI server's entry for the model (GET /v1/models), once a 2-token request at `top_k` log-probs has been
    answered: a K over the server's limit fails here, before the data is read, rather than at the first batch."""
    card = client.model_card()
    try:
        client.score([[0, 0]], [1], top_k)
    except TeacherServerError as error:
        if "HTTP 400" not in str(error) or "logprobs" not in str(error):
            raise
        allowed = re.search(r"max allowed: (\d+)", str(error))  # vLLM's words; another server's are quoted
        most, said = (f"at most {allowed[1]}", "") if allowed else ("fewer", f" ({error})")
        raise ValueError(
            f"--loss_top_k {top_k}: the teacher server at {client.base_url} serves {most} log-probs a token (vLLM's "
            f"--max-logprobs, 20 by default); restart it with --max-logprobs {top_k} or more, or lower --loss_top_k"
            + said
        ) from None
    return {"protocol": OPENAI, "model": card["id"]} | {
        key: card[key] for key in OPENAI_CARD if card.get(key) is not None
    }


def server_identity(connection: ServerConnection, fmt: str) -> dict:
    """Who the teacher is, as the server reports it: its model's name, revision and config digest, its vocabulary's
    size and fingerprint, and the digest of its LM head's values (where the server serves the head: a fine-tuned
    teacher of the same config differs there). The URL is left out: the same model served elsewhere is the same
    teacher, and a killed build resumes against it. An OpenAI server's is its model's id and what /v1/models adds,
    and the manifest says its vocabulary went unchecked."""
    info = connection.info
    identity = {"server_model": info.get("model")}
    if info.get("protocol") == OPENAI:
        card = {key: value for key, value in info.items() if key != "model"}
        return identity | card | {"vocabulary": OPENAI_UNCHECKED}
    for key in ("revision", "config_sha256", "vocab_size", "tokenizer_sha256"):
        if info.get(key) is not None:
            identity[key] = info[key]
    meta = connection.client.lm_head_meta(required=fmt == "hidden")
    if meta is not None and meta.get("tensors_sha256"):
        identity["lm_head_tensors_sha256"] = meta["tensors_sha256"]
    return identity


class ServerSource:
    """A teacher server as a cache's source (see the module docstring); `hidden_size` is its LM head's width."""

    def __init__(self, connection: ServerConnection, hidden_size: int | None = None):
        self.client, self.hidden_size = connection.client, hidden_size

    def lm_head(self) -> LMHead:
        return self.client.lm_head()

    def outputs(self, rows: list[dict], manifest: CacheManifest) -> list[dict[str, torch.Tensor]]:
        """Each row's output per completion token, from one client call for the rows with a completion (a prompt-only
        row, which the server would refuse, gets empty tensors)."""
        scored = [i for i, row in enumerate(rows) if row["completion_ids"]]
        sequences = [rows[i]["prompt_ids"] + rows[i]["completion_ids"] for i in scored]
        prompt_lengths = [len(rows[i]["prompt_ids"]) for i in scored]
        answers = self._hidden(sequences, prompt_lengths, manifest) if manifest.format == "hidden" else None
        if answers is None:
            answers = self._topk(sequences, prompt_lengths, manifest)
        outputs = [self._empty(manifest) for _ in rows]
        for i, answer in zip(scored, answers):
            outputs[i] = answer
        return outputs

    def _hidden(self, sequences, prompt_lengths, manifest: CacheManifest) -> list[dict[str, torch.Tensor]]:
        dtype = getattr(torch, manifest.dtype)
        states = self.client.hidden_states(sequences, prompt_lengths, manifest.dtype, self.hidden_size)
        return [{"hidden": torch.from_numpy(np.ascontiguousarray(state)).to(dtype)} for state in states]

    def _topk(self, sequences, prompt_lengths, manifest: CacheManifest) -> list[dict[str, torch.Tensor]]:
        dtype = getattr(torch, manifest.dtype)
        scores = self.client.score(sequences, prompt_lengths, manifest.top_k, 1.0)
        answers = []
        for i in range(len(sequences)):
            n = int(scores.completion_lengths[i])
            answers.append(
                {
                    "topk_ids": torch.from_numpy(scores.topk_ids[i, :n]).to(torch.int32),
                    "topk_logprobs": torch.from_numpy(scores.topk_logprobs[i, :n]).to(dtype),
                    "token_logprobs": torch.from_numpy(scores.actual_logprobs[i, :n]).float(),
                }
            )
        return answers

    def _empty(self, manifest: CacheManifest) -> dict[str, torch.Tensor]:
        if manifest.format == "hidden":
            return {"hidden": torch.zeros((0, self.hidden_size or 0), dtype=getattr(torch, manifest.dtype))}
        k = manifest.top_k
        return {
            "topk_ids": torch.zeros((0, k), dtype=torch.int32),
            "topk_logprobs": torch.zeros((0, k), dtype=getattr(torch, manifest.dtype)),
            "token_logprobs": torch.zeros(0),
        }
