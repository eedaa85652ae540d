"""The policy-gradient form of on-policy distillation, as pure functions: the sampled tokens' log-probs, the teacher's
per-token advantage, the reward advantage of a group, the importance weight of the sampler, and the loss.

On the student's own samples, `-sum_t A_t rho_t log p_student(x_t)` with `A_t = log p_teacher(x_t) - log p_student(x_t)`
held fixed has, in expectation, the gradient of the per-token reverse KL(student || teacher) at the sampled prefixes
(the score-function identity: E[grad log p] = 0 removes the KL's own derivative). It needs one number per token from
the teacher, so a server sending only the sampled token's log-prob is enough, and task rewards add to the advantage.
`rho_t = p_student(x_t) / p_sampler(x_t)`, cut at a cap, corrects for a sampler that is not exactly the trained student
(top-p, vLLM's kernels or stale weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .chunked import auto_chunk_size, chunked_rows_sum, head_chunks
from .losses import IGNORE_INDEX, compute_dtype
from .outputs import StudentHidden, StudentOutput, TeacherOutput, TeacherScores


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(target) of each row of `logits` (N, V) at `temperature`, in float32 at least."""
    scaled = logits.to(compute_dtype(logits)) / temperature
    return scaled.gather(-1, targets[:, None]).squeeze(-1) - scaled.logsumexp(-1)


def vocab_width(student: StudentOutput) -> int:
    """The vocabulary the student is compared on: its LM head's rows, or its logits' width."""
    return student.weight.shape[0] if student.weight is not None else student.logits.shape[-1]


@torch.no_grad()
def sampled_logprobs(
    student: StudentOutput,
    teacher: TeacherOutput | None,
    labels: torch.Tensor,
    temperature: float,
    chunk_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p_student and log p_teacher of every trained token (labels != -100, in row order), in float64 and without
    gradients, a chunk of tokens at a time (never (tokens x vocabulary) logits at once). The teacher's are None where
    there is no teacher."""
    mask = labels != IGNORE_INDEX
    chunk_tokens = chunk_tokens or auto_chunk_size(vocab_width(student))
    teacher_head = None
    if teacher is None:
        teacher_rows = labels[mask]  # a stand-in, unused
    elif isinstance(teacher, TeacherScores):
        teacher_rows = teacher.token_logprobs[mask]
    else:  # logits, or hidden states that the chunk loop puts through the teacher's head
        teacher_rows = teacher.rows[mask]
        teacher_head = None if teacher.weight is None else (teacher.weight, teacher.bias)
    student_parts, teacher_parts = [], []
    chunks = head_chunks(
        student.rows[mask],
        student.weight,
        student.bias,
        chunk_tokens,
        teacher_rows,
        labels[mask],
        teacher_head=teacher_head,
    )
    for _, student_logits, (teacher_part, targets) in chunks:
        student_parts.append(token_logprobs(student_logits, targets, temperature).double())
        if teacher is None:
            continue
        if isinstance(teacher, TeacherScores):
            teacher_parts.append(teacher_part.double())
        else:
            teacher_parts.append(token_logprobs(teacher_part, targets, temperature).double())
    empty = labels.new_zeros(0, dtype=torch.float64)
    student_lp = torch.cat(student_parts) if student_parts else empty
    return student_lp, (torch.cat(teacher_parts) if teacher_parts else empty) if teacher is not None else None


def discounted_sums(values: torch.Tensor, gamma: float) -> torch.Tensor:
    """out[b, t] = sum over t' >= t of gamma^(t' - t) values[b, t'] (rows (B, C); zeros where nothing is trained)."""
    if gamma == 0:
        return values.clone()
    out = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in range(values.shape[1] - 1, -1, -1):
        running = values[:, t] + gamma * running
        out[:, t] = running
    return out


def group_advantages(rewards: torch.Tensor, groups: torch.Tensor | None, scale: bool) -> torch.Tensor:
    """Each reward minus its group's mean (GRPO's baseline), divided by the group's standard deviation when `scale`;
    with `groups` None, the whole batch is one group. A group of one has advantage 0."""
    rewards = rewards.double()
    if groups is None:
        groups = torch.zeros_like(rewards, dtype=torch.long)
    _, index = torch.unique(groups, return_inverse=True)
    count = torch.zeros(int(index.max()) + 1 if index.numel() else 0, dtype=torch.float64).index_add_(
        0, index, torch.ones_like(rewards)
    )
    mean = torch.zeros_like(count).index_add_(0, index, rewards) / count
    centred = rewards - mean[index]
    if not scale:
        return centred
    variance = torch.zeros_like(count).index_add_(0, index, centred**2) / (count - 1).clamp(min=1)
    return centred / (variance.sqrt()[index] + 1e-4)


@dataclass(frozen=True)
class PolicyGradientFigures:
    """What a slice's policy-gradient loss reports: sums over its tokens, for the logged means."""

    tokens: float = 0.0
    teacher_advantage_sum: float = 0.0
    rho_sum: float = 0.0
    rho_max: float = 0.0
    truncated: float = 0.0
    log_ratio_sum: float | None = None  # sum of log p_student - log p_teacher (None: no teacher), the logged estimate's


@dataclass(frozen=True)
class PolicyGradient:
    """The policy-gradient loss of on-policy slices (`on_policy_objective="policy_gradient"`)."""

    kl_coef: float = 1.0
    discount: float = 0.0
    cap: float = 2.0
    temperature: float = 1.0
    chunk_size: int | str | None = None  # the student's memory-bounded path, as the divergence's

    @classmethod
    def from_config(cls, args) -> PolicyGradient | None:
        if args.on_policy_objective != "policy_gradient":
            return None
        return cls(
            kl_coef=args.kl_coef,
            discount=args.kl_discount_factor,
            cap=args.importance_sampling_cap,
            temperature=args.temperature,
            chunk_size=args.loss_chunk_size,
        )

    def loss_sum(
        self,
        student: StudentOutput,
        teacher: TeacherOutput | None,
        labels: torch.Tensor,
        sampler_logprobs: torch.Tensor | None = None,
        reward_advantage: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, PolicyGradientFigures]:
        """-sum_t A_t rho_t log p_student(x_t) over the slice's trained tokens (labels (B, C)), with A_t and rho_t
        fixed; `sampler_logprobs` (B, C) the generator's log-prob of each sampled token (None: the student itself
        sampled, rho = 1), `reward_advantage` (B,) each completion's reward advantage (None: no rewards)."""
        mask = labels != IGNORE_INDEX
        student_lp, teacher_lp = sampled_logprobs(student, teacher, labels, self.temperature)
        rows = torch.zeros(labels.shape, dtype=torch.float64, device=labels.device)
        teacher_term = torch.zeros_like(rows)
        if teacher_lp is not None:
            teacher_term = discounted_sums(rows.masked_scatter(mask, teacher_lp - student_lp), self.discount)
        advantage = self.kl_coef * teacher_term
        if reward_advantage is not None:
            advantage = advantage + reward_advantage.to(rows)[:, None]
        rho = torch.ones_like(student_lp)
        if sampler_logprobs is not None:
            rho = (student_lp - sampler_logprobs[mask].double()).exp()
        weights = (advantage[mask] * rho.clamp(max=self.cap)).detach()
        loss = self._weighted_logprob_sum(student, mask, labels[mask], weights)
        figures = PolicyGradientFigures(
            tokens=float(mask.sum()),
            teacher_advantage_sum=float(teacher_term[mask].sum()),
            rho_sum=float(rho.sum()),
            rho_max=float(rho.max()) if rho.numel() else 0.0,
            truncated=float((rho > self.cap).sum()),
            log_ratio_sum=None if teacher_lp is None else (student_lp - teacher_lp).sum().item(),
        )
        return loss, figures

    def _weighted_logprob_sum(self, student, mask, targets, weights) -> torch.Tensor:
        """-sum of weights * log p_student(target), differentiable in the student (chunked: a chunk at a time)."""

        def elements(logits, rows_targets, rows_weights):
            return -(rows_weights.to(compute_dtype(logits)) * token_logprobs(logits, rows_targets, self.temperature))

        if isinstance(student, StudentHidden):
            chunk = self.chunk_size if self.chunk_size is not None else auto_chunk_size(student.weight.shape[0])
            total, _ = chunked_rows_sum(
                student.hidden[mask], student.weight, student.bias, elements, targets, weights, chunk_size=chunk
            )
            return total
        return elements(student.logits[mask], targets, weights).sum()
