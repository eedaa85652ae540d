"""A client for a remote teacher: protege's / TRL's `/get_sequence_logprobs/`, or any OpenAI-compatible server.

It must not lose a training run to a flaky network, nor train on a wrong answer:

* timeouts, retries with backoff on connection errors, timeouts and 5xx (never on 4xx): `http_client.RetryingClient`;
* every response is checked against its request (lengths, shapes, ids, finite values) before it reaches the loss;
* large batches are split into requests sent concurrently.

Every error names the URL and what was wrong.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..choices import TEACHER_PROTOCOLS
from ..http_client import RetryingClient, ServerError
from .codec import BatchScores, PayloadError, SequenceScores, check_scores, decode, decode_hidden_binary
from .head import LMHead, cache_dir, file_sha256, load_head


class TeacherServerError(ServerError):
    """The teacher server could not be reached, refused the request, or answered something unusable."""


class TeacherClient(RetryingClient):
    role, error = "teacher server", TeacherServerError
    startup_setting = "teacher_server_startup_timeout"

    def __init__(
        self,
        base_url: str,
        protocol: str = "protege",
        response_format: str = "compact",
        timeout: float = 120.0,
        max_retries: int = 4,
        backoff: float = 0.5,
        max_tokens_per_request: int = 16384,
        max_concurrency: int = 4,
        model: str | None = None,
        deadline: float | None = None,
        api_key: str | None = None,
    ):
        if protocol not in TEACHER_PROTOCOLS:
            raise ValueError(f"protocol={protocol!r} is not one of {TEACHER_PROTOCOLS}")
        super().__init__(base_url, timeout, max_retries, backoff, deadline, api_key)
        self.protocol, self.response_format = protocol, response_format
        self.max_tokens_per_request, self.max_concurrency = max_tokens_per_request, max_concurrency
        self.model = model
        self._warned: set[str] = set()

    def wait_until_ready(self, timeout: float = 60.0, interval: float = 0.5, path: str | None = None) -> None:
        path = path or ("/health/" if self.protocol == "protege" else "/health")
        super().wait_until_ready(timeout, interval, path)

    def info(self) -> dict:
        """What a protege server reports on /info/ (vocabulary size and fingerprint, formats, limits); {} where the
        server has no such endpoint. A server that refuses requests over `max_request_tokens` gets its batches split to
        fit from then on."""
        info = (self._get_json("/info/") or {}) if self.protocol == "protege" else {}
        if info.get("max_request_tokens"):
            self.max_tokens_per_request = min(self.max_tokens_per_request, int(info["max_request_tokens"]))
        return info

    def vocabulary(self) -> dict[str, int] | None:
        """The teacher tokenizer's token-to-id map from a protege server's /vocabulary/, or None where it is not
        served (another protocol, an older server, a teacher without a tokenizer)."""
        return self._get_json("/vocabulary/") if self.protocol == "protege" else None

    def vocab_size(self) -> int | None:
        """The vocabulary size a protege server reports on /info/, or None where the server has no such endpoint."""
        return self.info().get("vocab_size")

    def model_card(self) -> dict:
        """An OpenAI-compatible server's entry for `model` on GET /v1/models (its `id`; vLLM adds `root`, `parent` and
        `max_model_len`): what such a server says of the teacher, since it has no /info/."""
        url = self._url("/v1/models")
        response = self.get("/v1/models", refusal_ok=True)
        listed = self._json_of(response, "/v1/models") if response.status_code == 200 else None
        cards = listed.get("data") if isinstance(listed, dict) else None
        if not isinstance(cards, list) or not all(isinstance(card, dict) and "id" in card for card in cards):
            raise TeacherServerError(
                f"teacher server at {url} answered no model list (HTTP {response.status_code}), which an "
                "OpenAI-compatible server gives"
            )
        for card in cards:
            if card["id"] == self.model:
                return card
        served = [card["id"] for card in cards]
        raise TeacherServerError(f"teacher server at {url} serves {served}, not teacher_server_model={self.model!r}")

    def lm_head_meta(self, required: bool = False) -> dict | None:
        """/lm_head/meta/: the served head's sizes, dtype, logit transform and SHA-256; None where it is not served
        (an error when `required`). Retried like every other call."""
        response = self.get("/lm_head/meta/", refusal_ok=True)
        if response.status_code == 200:
            return self._json_of(response, "/lm_head/meta/")
        if required:
            raise TeacherServerError(
                f"teacher server at {self._url('/lm_head/meta/')} does not serve the LM head "
                f"(HTTP {response.status_code}): {response.text[:300]}"
            )
        return None

    def lm_head(self, folder: Path | None = None) -> LMHead:
        """The teacher's LM head from /lm_head/, kept in `folder` (default: `head.cache_dir()`) under its SHA-256, so
        it is downloaded once per head, whatever the number of runs."""
        meta = self.lm_head_meta(required=True)
        folder = Path(folder) if folder is not None else cache_dir()
        path = folder / f"{meta['sha256']}.safetensors"
        if not path.exists():
            folder.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}.{os.getpid()}.part")
            self.download("/lm_head/", partial)
            if file_sha256(partial) != meta["sha256"]:
                partial.unlink(missing_ok=True)
                raise TeacherServerError(
                    f"teacher server at {self._url('/lm_head/')}: the downloaded head does not match its SHA-256"
                )
            os.replace(partial, path)
        return load_head(path)

    # ----- Scoring -----

    def _in_requests(self, sequences: list[list[int]], prompt_lengths: list[int], run) -> list:
        """`run(sequences, prompt_lengths)` on requests of at most `max_tokens_per_request` tokens, sent concurrently;
        their rows in order."""
        chunks, current, tokens = [], [], 0
        for i, sequence in enumerate(sequences):
            if current and tokens + len(sequence) > self.max_tokens_per_request:
                chunks.append(current)
                current, tokens = [], 0
            current.append(i)
            tokens += len(sequence)
        if current:
            chunks.append(current)

        def one(chunk: list[int]) -> list:
            return run([sequences[i] for i in chunk], [prompt_lengths[i] for i in chunk])

        if len(chunks) == 1:
            return one(chunks[0])
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return [row for part in pool.map(one, chunks) for row in part]

    def score(
        self, sequences: list[list[int]], prompt_lengths: list[int], top_k: int = 1, temperature: float = 1.0
    ) -> BatchScores:
        """Teacher log-probs for the completion part of each sequence, padded to (B, Tmax, K)."""

        def run(seqs: list[list[int]], plens: list[int]) -> list[SequenceScores]:
            if self.protocol == "protege":
                return self._score_protege(seqs, plens, top_k, temperature)
            rows = self._score_openai(seqs, plens, top_k, temperature)
            try:  # the protege formats are checked as they decode; an OpenAI answer is checked the same way here
                check_scores(BatchScores.pad(rows, top_k), seqs, plens)
            except PayloadError as error:
                raise TeacherServerError(
                    f"teacher server at {self._url('/v1/completions')} answered impossible log-probs: {error}"
                ) from None
            return rows

        return BatchScores.pad(self._in_requests(sequences, prompt_lengths, run), top_k)

    def hidden_states(
        self,
        sequences: list[list[int]],
        prompt_lengths: list[int],
        dtype: str = "float16",
        hidden_size: int | None = None,
    ) -> list[np.ndarray]:
        """The teacher's final hidden states at the completion positions of each sequence, (length, H) float32."""
        url = self._url("/get_sequence_logprobs/")

        def run(seqs: list[list[int]], plens: list[int]) -> list[np.ndarray]:
            body = {"sequences": seqs, "prompt_lengths": plens, "response_format": "hidden", "hidden_dtype": dtype}
            # Raw safetensors bytes: 2H a token in 16 bits. gzip of base64 JSON saves a quarter of that at several
            # times the encode time (docs/benchmarks.md), so the binary answer goes uncompressed.
            headers = {"Accept": "application/octet-stream", "Accept-Encoding": "identity"}
            answer = self.post("/get_sequence_logprobs/", headers=headers, json=body)
            try:
                return decode_hidden_binary(answer.content, seqs, plens, hidden_size)
            except PayloadError as error:
                raise TeacherServerError(f"teacher server at {url} answered a bad payload: {error}") from None

        return self._in_requests(sequences, prompt_lengths, run)

    def _score_protege(self, sequences, prompt_lengths, top_k, temperature) -> list[SequenceScores]:
        body = {
            "sequences": sequences,
            "prompt_lengths": prompt_lengths,
            "top_logprobs": top_k,
            "temperature": temperature,
            "response_format": self.response_format,
        }
        payload = self.post_json("/get_sequence_logprobs/", body)
        try:
            return decode(payload, self.response_format, sequences, prompt_lengths, top_k).rows()
        except PayloadError as error:
            raise TeacherServerError(
                f"teacher server at {self._url('/get_sequence_logprobs/')} answered a bad payload: {error}"
            ) from None

    def _score_openai(self, sequences, prompt_lengths, top_k, temperature) -> list[SequenceScores]:
        """Prompt log-probs from `/v1/completions` (vLLM, SGLang): each sequence is a prompt, one token generated."""
        url = self._url("/v1/completions")
        if temperature != 1:
            self._warn_once(
                "temperature",
                f"teacher server at {url}: vLLM's prompt log-probs ignore temperature, "
                f"so with temperature={temperature} its answers may be untempered",
            )
        body = {
            "model": self.model,
            "prompt": sequences,
            "max_tokens": 1,
            "temperature": temperature,
            "prompt_logprobs": top_k,
            "return_tokens_as_token_ids": True,
        }
        payload = self.post_json("/v1/completions", body)
        choices = sorted(payload.get("choices", []), key=lambda c: c.get("index", 0))
        if len(choices) != len(sequences):
            raise TeacherServerError(
                f"teacher server at {url} returned {len(choices)} choices for {len(sequences)} prompts"
            )
        rows = []
        for i, (sequence, prompt_length, choice) in enumerate(zip(sequences, prompt_lengths, choices)):
            prompt_logprobs = choice.get("prompt_logprobs")
            if not prompt_logprobs:
                raise TeacherServerError(
                    f"teacher server at {url} returned no prompt_logprobs for prompt {i}; the server must support "
                    "the 'prompt_logprobs' parameter, and prefix caching must be off (a cached prefix has none)"
                )
            if len(prompt_logprobs) != len(sequence):
                raise TeacherServerError(
                    f"teacher server at {url} returned {len(prompt_logprobs)} prompt log-probs "
                    f"for prompt {i} of {len(sequence)} tokens"
                )
            rows.append(self._openai_row(url, i, sequence, prompt_length, prompt_logprobs, top_k))
        return rows

    def _openai_row(self, url, index, sequence, prompt_length, prompt_logprobs, top_k) -> SequenceScores:
        n = len(sequence) - prompt_length
        top_logprobs = np.full((n, top_k), -np.inf, dtype=np.float32)
        top_ids = np.zeros((n, top_k), dtype=np.int64)
        actual = np.full(n, -np.inf, dtype=np.float32)
        for t, position in enumerate(range(prompt_length, len(sequence))):
            entries = prompt_logprobs[position] or {}
            parsed = []
            for key, value in entries.items():
                token = int(key.split(":")[-1]) if isinstance(key, str) else int(key)
                logprob = value["logprob"] if isinstance(value, dict) else float(value)
                rank = value.get("rank", 0) if isinstance(value, dict) else 0
                parsed.append((rank, -logprob, token, logprob))
                if token == sequence[position]:
                    actual[t] = logprob
            ranked = sorted(parsed)[:top_k]
            if sum(1 for rank, *_ in parsed if rank <= top_k) < top_k:
                self._warn_once(
                    "fewer",
                    f"teacher server at {url} returned fewer than {top_k} log-probs at some "
                    "positions (its --max-logprobs may be lower); missing entries count as -inf",
                )
            for k, (_, _, token, logprob) in enumerate(ranked):
                top_ids[t, k], top_logprobs[t, k] = token, logprob
            if not np.isfinite(actual[t]):
                raise TeacherServerError(
                    f"teacher server at {url}: prompt {index} position {position} has no log-prob for the actual token"
                )
        return SequenceScores(top_logprobs, top_ids, actual, np.asarray(sequence[prompt_length:], dtype=np.int64))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
