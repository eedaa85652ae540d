"""The one float64 reference for protege's divergences, written from the math; shared by the loss tests and the TRL
parity tests. It never calls protege and uses no fused log-softmax or log-sum-exp.

* Both logits are divided by the temperature and normalised with a dense softmax (an explicit sum over the
  vocabulary); -inf logits give probability 0.
* beta = 0 gives the elements of KL(T || S), beta = 1 those of KL(S || T), and 0 < beta < 1
  beta * KL(T || M) + (1 - beta) * KL(S || M) with the mixture M = (1 - beta) S + beta T formed in probability space.
  KL terms are p * (log p - log q) with 0 * log 0 = 0.
* A sparse support is a list of vocabulary ids per row, chosen token by token in Python (`topk_support`,
  `top1_support`), with a validity flag per slot: an invalid slot (a student id that repeats a teacher id) carries
  no probability. The support's probabilities then get a tail bucket 1 - sum p (floored at TAIL_FLOOR, TRL's
  1 - exp(-1e-7)) as their last slot, or are renormalised by sum p.

Gradients come from autograd on float64 inputs; the teacher never gets one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

F64 = torch.float64
IGNORE = -100
NEG_INF = -math.inf
TAIL_FLOOR = -math.expm1(-1e-7)  # 1 - exp(-1e-7): the smallest tail mass (the support's log-mass is capped at -1e-7)

# support(log_s_row, log_t_row, label) -> (ids, valid): the slots of one row
Support = Callable[[torch.Tensor, torch.Tensor, int], tuple[list[int], list[bool]]]


def ref_log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) with an explicit sum over the vocabulary; -inf logits give probability 0."""
    x = logits.to(F64) / temperature
    shift = x.max(dim=-1, keepdim=True).values.detach()  # any constant works; the max keeps exp() in range
    return x - shift - torch.log(torch.exp(x - shift).sum(dim=-1, keepdim=True))


def safe_log(p: torch.Tensor) -> torch.Tensor:
    """log p with log 0 = -inf and no NaN in the gradient."""
    positive = p > 0
    return torch.where(positive, torch.log(torch.where(positive, p, 1.0)), NEG_INF)


def ref_kl_terms(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Per-element p * (log p - log q), 0 where p = 0."""
    present = log_p > NEG_INF
    lp, lq = torch.where(present, log_p, 0.0), torch.where(present, log_q, 0.0)
    return torch.where(present, torch.exp(lp) * (lp - lq), 0.0)


def ref_divergence_terms(log_s: torch.Tensor, log_t: torch.Tensor, beta: float) -> torch.Tensor:
    if beta == 0:
        return ref_kl_terms(log_t, log_s)  # KL(T || S)
    if beta == 1:
        return ref_kl_terms(log_s, log_t)  # KL(S || T)
    log_m = safe_log((1 - beta) * torch.exp(log_s) + beta * torch.exp(log_t))
    return beta * ref_kl_terms(log_t, log_m) + (1 - beta) * ref_kl_terms(log_s, log_m)


def ref_sparse_terms(log_s, log_t, ids, valid, beta, add_tail):
    """Divergence over support slots `ids` (rows, S) of full-vocabulary log-distributions (rows, V); invalid slots
    carry no probability; then a tail bucket 1 - sum p (floored at TAIL_FLOOR) or renormalisation by sum p."""
    keep = valid.to(F64)
    p_s, p_t = torch.exp(log_s.gather(-1, ids)) * keep, torch.exp(log_t.gather(-1, ids)) * keep
    if add_tail:
        p_s = torch.cat([p_s, (1 - p_s.sum(-1, keepdim=True)).clamp(min=TAIL_FLOOR)], dim=-1)
        p_t = torch.cat([p_t, (1 - p_t.sum(-1, keepdim=True)).clamp(min=TAIL_FLOOR)], dim=-1)
    else:
        p_s, p_t = p_s / p_s.sum(-1, keepdim=True), p_t / p_t.sum(-1, keepdim=True)
    return ref_divergence_terms(safe_log(p_s), safe_log(p_t), beta)


def ref_topk(log_p: torch.Tensor, k: int) -> list[int]:
    return torch.argsort(log_p, descending=True, stable=True)[:k].tolist()


def topk_support(k: int, beta: float) -> Support:
    """Per token: the teacher's top-k (beta=0), the student's (beta=1), else the teacher's then the student's, a
    student id that repeats a teacher id being an invalid slot."""

    def support(log_s, log_t, _label):
        teacher_ids, student_ids = ref_topk(log_t, k), ref_topk(log_s, k)
        if beta == 0:
            return teacher_ids, [True] * k
        if beta == 1:
            return student_ids, [True] * k
        return teacher_ids + student_ids, [True] * k + [i not in teacher_ids for i in student_ids]

    return support


def top1_support(beta: float, mode: str = "sampled") -> Support:
    """Per token: [teacher argmax, reverse token (invalid if the same)], or [reverse token] at beta = 1. The reverse
    token is the label ("sampled") or the student's argmax ("argmax")."""

    def support(log_s, log_t, label):
        reverse = int(torch.argmax(log_s)) if mode == "argmax" else label
        if beta == 1:
            return [reverse], [True]
        top1 = int(torch.argmax(log_t))
        return [top1, reverse], [True, reverse != top1]

    return support


def ref_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    row_labels: torch.Tensor | None = None,
    *,
    beta: float,
    temperature: float = 1.0,
    support: Support | None = None,
    add_tail: bool = True,
) -> torch.Tensor:
    """Divergence elements (..., S) of (..., V) logits: S = V for the full vocabulary (`support` None), else the
    support's slots and the tail. `row_labels` (...) are handed to `support` (the sampled top-1 reads them)."""
    log_s = ref_log_softmax(student_logits, temperature)
    log_t = ref_log_softmax(teacher_logits.detach(), temperature)
    if support is None:
        return ref_divergence_terms(log_s, log_t, beta)
    vocab = log_s.shape[-1]
    rows_s, rows_t = log_s.reshape(-1, vocab), log_t.reshape(-1, vocab)
    labels = [IGNORE] * rows_s.shape[0] if row_labels is None else row_labels.reshape(-1).tolist()
    chosen = [support(s, t, label) for s, t, label in zip(rows_s.detach(), rows_t, labels, strict=True)]
    ids = torch.tensor([c[0] for c in chosen], dtype=torch.long)
    valid = torch.tensor([c[1] for c in chosen], dtype=torch.bool)
    return ref_sparse_terms(rows_s, rows_t, ids, valid, beta, add_tail).reshape(*log_s.shape[:-1], -1)
