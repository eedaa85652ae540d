"""A teacher behind a server: connect, then score every slice of an optimizer step in one client call.

`RemoteTeacher` is the teacher view for `use_teacher_server`: `prepare` sends the step's completions at once and
puts each slice's answer in its batch (`teacher_scores`), so the network round trip is paid once per step, and the
loss reads it from the batch. Evaluation batches, which skip `prepare`, are scored when first asked.
"""

from __future__ import annotations

import torch

from ..losses import IGNORE_INDEX
from ..objective import TeacherScores
from .client import TeacherClient


def connect_teacher(args, tokenizer) -> TeacherClient:
    """A client for `args.teacher_model_server_url`, once the server answers and serves the student's vocabulary."""
    client = TeacherClient(
        args.teacher_model_server_url,
        protocol=args.teacher_server_protocol,
        response_format=args.teacher_server_response_format,
        timeout=args.teacher_server_timeout,
        max_retries=args.teacher_server_max_retries,
        model=args.teacher_server_model,
    )
    try:
        client.wait_until_ready(args.teacher_server_startup_timeout)
        served = client.vocab_size()
        if served is not None and served != len(tokenizer):
            raise ValueError(
                f"the teacher server at {args.teacher_model_server_url} serves a vocabulary of {served} "
                f"tokens but the student's tokenizer has {len(tokenizer)}; they must share a tokenizer"
            )
    except BaseException:
        client.close()
        raise
    return client


class RemoteTeacher:
    """The teacher view of a server: top-k log-probs at completion positions (see the module docstring)."""

    def __init__(self, client: TeacherClient, top_k: int, temperature: float):
        self.client, self.top_k, self.temperature = client, top_k, temperature

    def close(self) -> None:
        self.client.close()

    def prepare(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """One client call for every slice of the step; each slice's answer rides along in its batch."""
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
        scores = self.client.score(sequences, prompt_lengths, self.top_k, self.temperature) if sequences else None
        for batch in batches:
            rows, width = batch["input_ids"].shape[0], batch["input_ids"].shape[1] - batch["prompt_ids"].shape[1]
            device = batch["input_ids"].device
            batch["teacher_scores"] = TeacherScores(
                topk_ids=torch.zeros((rows, width, self.top_k), dtype=torch.long, device=device),
                topk_logprobs=torch.full((rows, width, self.top_k), float("-inf"), device=device),
                token_logprobs=torch.full((rows, width), float("-inf"), device=device),
            )
        for i, (b, row) in enumerate(places):
            n = int(scores.completion_lengths[i])
            answer = batches[b]["teacher_scores"]
            answer.topk_logprobs[row, :n] = torch.from_numpy(scores.topk_logprobs[i, :n])
            answer.topk_ids[row, :n] = torch.from_numpy(scores.topk_ids[i, :n])
            answer.token_logprobs[row, :n] = torch.from_numpy(scores.actual_logprobs[i, :n])

    def __call__(self, batch: dict[str, torch.Tensor]) -> TeacherScores:
        if "teacher_scores" not in batch:
            self.prepare([batch])
        return batch["teacher_scores"]
