"""A teacher cache written from a protege teacher server (`protege cache-teacher --teacher http://...`), so a teacher
that only runs behind a server is paid for once too.

A server in the hidden format gives an exact hidden cache: its final hidden states (asked for in the cache's dtype, so
the server rounds them as a local build would) and the LM head it serves, saved once. A server of log-prob formats
gives a top-k cache: its top-K log-probs and the sampled token's, normalised by the server as the live server's are in
training. The manifest's teacher identity is what the server reports of itself (`server_identity`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..choices import HIDDEN_FORMAT
from .cache import CacheManifest
from .head import LMHead
from .remote import ServerConnection, connect_teacher

LOGPROB_FORMAT = "compact"  # the log-prob payload a top-k cache is filled from (the smallest)


def connection_settings() -> dict:
    """The teacher-server client's settings as `DistillationConfig` defaults them (timeouts, retries, API key from
    the environment): a cache is written with the client training uses."""
    from ..config import DistillationConfig

    return {
        field.name: field.default
        for field in dataclasses.fields(DistillationConfig)
        if field.name.startswith("teacher_server_") or field.name == "teacher_lm_head_path"
    }


def connect_for_cache(url: str, fmt: str, tokenizer, **settings) -> ServerConnection:
    """The server at `url`, checked as training checks it (it answers, serves the student's vocabulary, and serves
    the payload the cache's format is made from)."""
    from types import SimpleNamespace

    args = SimpleNamespace(**(connection_settings() | settings))
    try:
        return connect_teacher(args, tokenizer, url, HIDDEN_FORMAT if fmt == "hidden" else LOGPROB_FORMAT)
    except ValueError as error:
        if not str(error).startswith("teacher_server_response_format="):
            raise
        served = str(error).split(" serves ", 1)[-1]
        other = "--format topk --loss_top_k K" if fmt == "hidden" else "--format hidden"
        raise ValueError(f"--format {fmt}: the teacher server at {url} serves {served}; use {other}") from None


def server_identity(connection: ServerConnection, fmt: str) -> dict:
    """Who the teacher is, as the server reports it: its model's name, revision and config digest, its vocabulary's
    size and fingerprint, and the digest of its LM head's values (where the server serves the head: a fine-tuned
    teacher of the same config differs there). The URL is left out: the same model served elsewhere is the same
    teacher, and a killed build resumes against it."""
    info = connection.info
    identity = {"server_model": info.get("model")}
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
