"""Divergences between a student and a teacher: pure functions, no trainer state, no I/O.

Conventions shared by every function here:

* Logits are divided by `temperature`, then normalised with `log_softmax` in float32, whatever the input dtype.
* `beta = 0` is forward KL(T || S), `beta = 1` is reverse KL(S || T), and `0 < beta < 1` is the generalized JSD of the
  GKD paper: with M = (1 - beta) * S + beta * T, the loss is beta * KL(T || M) + (1 - beta) * KL(S || M). The interior
  formula tends to 0, not to the KLs, as beta approaches 0 or 1: the endpoints are the two KLs on purpose.
* Positions whose label is -100 contribute nothing and are never normalised; a fully masked batch gives a loss of
  exactly 0 with finite (zero) gradients.
* Reductions: "batchmean" sums over tokens and vocabulary (or support) and divides by the number of unmasked tokens,
  or by `num_items_in_batch` when given (the trainer passes the completion-token count of the whole optimizer step, so
  the gradient does not depend on gradient accumulation); "sum"; "mean" divides by tokens x support size; "none"
  returns the per-element tensor with zeros at masked positions.
* A sparse support (top-k, top-1) either gets a tail bucket holding the mass outside it, log(1 - sum p), or is
  renormalised; slots marked invalid (duplicates, padding) contribute nothing.
* 0 * log 0 is 0: tokens with zero probability (logits of -inf) never produce NaN, in the value or the gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
REDUCTIONS = ("batchmean", "sum", "mean", "none")
# Smallest tail mass kept: 1 - sum(p) below this is float32 round-off, and a floor keeps log() and its gradient finite.
MIN_TAIL_PROB = 1e-7


# ---------------------------------------------------------------------------------------------------------------------
# Element-wise building blocks
# ---------------------------------------------------------------------------------------------------------------------


def _kl_elements(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p * (log p - log q) element-wise, with 0 wherever p is 0, and no NaN in the gradient."""
    present = log_p > -math.inf
    log_p = log_p.masked_fill(~present, 0.0)
    log_q = log_q.masked_fill(~present, 0.0)
    return torch.where(present, log_p.exp() * (log_p - log_q), 0.0)


def divergence_elements(student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-element generalized JSD between two log-distributions over the last dimension (see module docstring)."""
    if beta == 0:
        return _kl_elements(teacher_logp, student_logp)
    if beta == 1:
        return _kl_elements(student_logp, teacher_logp)
    absent = (student_logp == -math.inf) & (teacher_logp == -math.inf)
    mixture_logp = torch.logaddexp(
        student_logp.masked_fill(absent, 0.0) + math.log1p(-beta),
        teacher_logp.masked_fill(absent, 0.0) + math.log(beta),
    )
    return beta * _kl_elements(teacher_logp, mixture_logp) + (1 - beta) * _kl_elements(student_logp, mixture_logp)


def _tail_logp(support_logp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum exp(support_logp)) over the last dimension, floored at MIN_TAIL_PROB."""
    covered = torch.logsumexp(support_logp, dim=-1, keepdim=True)
    return torch.log((-torch.expm1(covered)).clamp(min=MIN_TAIL_PROB))


def _renormalise(support_logp: torch.Tensor) -> torch.Tensor:
    total = torch.logsumexp(support_logp, dim=-1, keepdim=True)
    return support_logp - total.masked_fill(total == -math.inf, 0.0)


def support_elements(
    student_support_logp: torch.Tensor,
    teacher_support_logp: torch.Tensor,
    valid: torch.Tensor,
    beta: float,
    add_tail: bool,
) -> torch.Tensor:
    """Divergence elements over a sparse support of full-vocabulary log-probs; shape (..., S + add_tail)."""
    student_support_logp = student_support_logp.masked_fill(~valid, -math.inf)
    teacher_support_logp = teacher_support_logp.masked_fill(~valid, -math.inf)
    if add_tail:
        student_support_logp = torch.cat([student_support_logp, _tail_logp(student_support_logp)], dim=-1)
        teacher_support_logp = torch.cat([teacher_support_logp, _tail_logp(teacher_support_logp)], dim=-1)
    else:
        student_support_logp = _renormalise(student_support_logp)
        teacher_support_logp = _renormalise(teacher_support_logp)
    return divergence_elements(student_support_logp, teacher_support_logp, beta)


def top_k_support(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, beta: float, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Support ids and validity: teacher's top-k (beta=0), student's top-k (beta=1), else their union."""
    if beta == 0:
        ids = teacher_logp.topk(top_k, dim=-1).indices
        return ids, torch.ones_like(ids, dtype=torch.bool)
    if beta == 1:
        ids = student_logp.topk(top_k, dim=-1).indices
        return ids, torch.ones_like(ids, dtype=torch.bool)
    teacher_ids = teacher_logp.topk(top_k, dim=-1).indices
    student_ids = student_logp.topk(top_k, dim=-1).indices
    duplicate = (student_ids.unsqueeze(-1) == teacher_ids.unsqueeze(-2)).any(dim=-1)
    valid = torch.cat([torch.ones_like(teacher_ids, dtype=torch.bool), ~duplicate], dim=-1)
    return torch.cat([teacher_ids, student_ids], dim=-1), valid


def token_divergence_elements(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    beta: float,
    temperature: float = 1.0,
    top_k: int = 0,
    add_tail: bool = True,
) -> torch.Tensor:
    """Divergence elements for rows of logits (N, V): (N, V) for the full vocabulary, (N, S) for a top-k support."""
    student_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    with torch.no_grad():
        teacher_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if top_k <= 0 or top_k >= student_logp.shape[-1]:
        return divergence_elements(student_logp, teacher_logp, beta)
    ids, valid = top_k_support(student_logp.detach(), teacher_logp, beta, top_k)
    return support_elements(student_logp.gather(-1, ids), teacher_logp.gather(-1, ids), valid, beta, add_tail)


# ---------------------------------------------------------------------------------------------------------------------
# Masking and reduction
# ---------------------------------------------------------------------------------------------------------------------


def _token_mask(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    if labels is None:
        return torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels have shape {tuple(labels.shape)} but logits have {tuple(logits.shape)}; "
                         "labels must match the logits without their last (vocabulary) dimension")
    return labels != IGNORE_INDEX


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not one of {REDUCTIONS}")


def reduce_elements(
    elements: torch.Tensor,
    mask: torch.Tensor,
    reduction: str,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce (N, S) elements taken at the N positions where `mask` is True (see the module docstring)."""
    _check_reduction(reduction)
    if reduction == "none":
        full = elements.new_zeros(*mask.shape, elements.shape[-1])
        return full.masked_scatter(mask.unsqueeze(-1), elements)
    total = elements.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / max(elements.numel(), 1)
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    return total / max(elements.shape[0], 1)


# ---------------------------------------------------------------------------------------------------------------------
# Public losses
# ---------------------------------------------------------------------------------------------------------------------


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    beta: float = 0.5,
    temperature: float = 1.0,
    reduction: str = "batchmean",
    top_k: int = 0,
    add_tail: bool = True,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Generalized JSD between student and teacher logits of shape (..., V); gradients flow to the student only."""
    _check_reduction(reduction)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ; slice both to the shared vocabulary first")
    mask = _token_mask(student_logits, labels)
    elements = token_divergence_elements(
        student_logits[mask], teacher_logits[mask], beta, temperature, top_k, add_tail
    )
    return reduce_elements(elements, mask, reduction, num_items_in_batch)


def support_divergence_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    support_ids: torch.Tensor,
    teacher_support_logprobs: torch.Tensor,
    beta: float,
    temperature: float = 1.0,
    add_tail: bool = True,
    support_valid: torch.Tensor | None = None,
    reduction: str = "batchmean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Divergence over a given sparse support, with the teacher known only there (the form a server returns).

    `support_ids` and `teacher_support_logprobs` are (B, T, S); the teacher log-probs must already be
    temperature-scaled full-vocabulary log-probs. Slots are valid where `support_valid` says so, by default where the
    teacher log-prob is finite (servers pad with -inf).
    """
    mask = _token_mask(student_logits, labels)
    student_logp = F.log_softmax(student_logits[mask].float() / temperature, dim=-1)
    teacher_logp = teacher_support_logprobs[mask].float()
    valid = teacher_logp > -math.inf if support_valid is None else support_valid[mask]
    ids = support_ids[mask].long()
    elements = support_elements(student_logp.gather(-1, ids), teacher_logp, valid, beta, add_tail)
    return reduce_elements(elements, mask, reduction, num_items_in_batch)


def sparse_top1_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_top1_ids: torch.Tensor,
    teacher_top1_logprobs: torch.Tensor,
    teacher_token_logprobs: torch.Tensor,
    beta: float,
    temperature: float = 1.0,
    add_tail: bool = True,
    reverse_ids: torch.Tensor | None = None,
    teacher_reverse_logprobs: torch.Tensor | None = None,
    reduction: str = "batchmean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Sparse top-1 divergence (beta > 0) on {teacher's top-1 token, reverse token} plus the tail bucket.

    The reverse token is the sampled completion token (`labels`) unless `reverse_ids` names another (the student's
    argmax), in which case `teacher_reverse_logprobs` gives the teacher there. All teacher inputs are (B, T) or
    (B, T, 1): the top-1 id and log-prob, and the log-prob of the actual token, as a teacher server returns them.
    At beta = 1 the support is the reverse token alone.
    """
    if beta <= 0:
        raise ValueError(f"sparse_top1_loss needs beta > 0, got beta={beta}; use topk_forward_kl_loss for beta = 0")

    def column(t: torch.Tensor) -> torch.Tensor:
        return t if t.dim() == labels.dim() + 1 else t.unsqueeze(-1)

    if reverse_ids is None:
        reverse_ids, teacher_reverse_logprobs = labels.clamp(min=0), teacher_token_logprobs
    elif teacher_reverse_logprobs is None:
        raise ValueError("reverse_ids were given without teacher_reverse_logprobs")
    reverse_ids, teacher_reverse = column(reverse_ids), column(teacher_reverse_logprobs)
    # Padded positions of a server reply hold -inf; their values never matter but must not reach the arithmetic.
    masked = column(labels == IGNORE_INDEX)
    teacher_reverse = teacher_reverse.masked_fill(masked, 0.0)
    if beta == 1:
        ids, teacher_logprobs = reverse_ids, teacher_reverse
        valid = torch.ones_like(ids, dtype=torch.bool)
    else:
        top1_ids = column(teacher_top1_ids)
        top1 = column(teacher_top1_logprobs).masked_fill(masked, 0.0)
        ids = torch.cat([top1_ids, reverse_ids], dim=-1)
        teacher_logprobs = torch.cat([top1, teacher_reverse], dim=-1)
        valid = torch.cat([torch.ones_like(top1_ids, dtype=torch.bool), reverse_ids != top1_ids], dim=-1)
    return support_divergence_loss(
        student_logits, labels, ids, teacher_logprobs, beta, temperature, add_tail, valid, reduction,
        num_items_in_batch,
    )


def local_sparse_top1_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    beta: float,
    temperature: float = 1.0,
    add_tail: bool = True,
    reverse_kl_top_1_mode: str = "sampled",
    reduction: str = "batchmean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """`sparse_top1_loss` with the teacher given as full logits, as a local teacher provides them."""
    with torch.no_grad():
        teacher_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
        top1_logprobs, top1_ids = teacher_logp.max(dim=-1)
        token_logprobs = teacher_logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        reverse_ids = reverse_logprobs = None
        if reverse_kl_top_1_mode == "argmax":
            reverse_ids = student_logits.argmax(dim=-1)
            reverse_logprobs = teacher_logp.gather(-1, reverse_ids.unsqueeze(-1)).squeeze(-1)
        elif reverse_kl_top_1_mode != "sampled":
            raise ValueError(f"reverse_kl_top_1_mode={reverse_kl_top_1_mode!r} is not 'sampled' or 'argmax'")
    return sparse_top1_loss(
        student_logits, labels, top1_ids, top1_logprobs, token_logprobs, beta, temperature, add_tail,
        reverse_ids, reverse_logprobs, reduction, num_items_in_batch,
    )


def topk_forward_kl_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    temperature: float = 1.0,
    add_tail: bool = True,
    reduction: str = "batchmean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward KL(T || S) over the teacher's top-k, given as ids and log-probs (B, T, K) padded with -inf."""
    return support_divergence_loss(
        student_logits, labels, teacher_topk_ids, teacher_topk_logprobs, 0.0, temperature, add_tail, None,
        reduction, num_items_in_batch,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Memory-bounded path: hidden states and LM heads in, never a (tokens x vocabulary) tensor for the whole batch
# ---------------------------------------------------------------------------------------------------------------------


def _project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(hidden, weight, bias)


class _ChunkedDivergence(torch.autograd.Function):
    """Forward computes the loss and its gradient chunk by chunk; backward only scales the stored gradient.

    Each chunk's (C x V) logits live only inside one loop iteration, so peak memory is bounded by the chunk size, and
    no logits are recomputed in backward, so the cost stays that of one dense forward and backward.
    """

    @staticmethod
    def forward(ctx, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                options):
        beta, temperature, chunk_size, top_k, add_tail, normaliser = options
        needs = ctx.needs_input_grad
        weight_leaf = student_weight.detach().requires_grad_(needs[1])
        bias_leaf = None if student_bias is None else student_bias.detach().requires_grad_(needs[2])
        grad_hidden = torch.zeros_like(student_hidden) if needs[0] else None
        grad_weight = torch.zeros_like(student_weight, dtype=torch.float32) if needs[1] else None
        grad_bias = torch.zeros_like(student_bias, dtype=torch.float32) if needs[2] else None
        total = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
        for start in range(0, student_hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            hidden_leaf = student_hidden[rows].detach().requires_grad_(needs[0])
            with torch.no_grad():
                teacher_logits = _project(teacher_hidden[rows], teacher_weight, teacher_bias)
            with torch.enable_grad():
                student_logits = _project(hidden_leaf, weight_leaf, bias_leaf)
                chunk_loss = token_divergence_elements(
                    student_logits, teacher_logits, beta, temperature, top_k, add_tail
                ).sum()
            wanted = [t for t, need in ((hidden_leaf, needs[0]), (weight_leaf, needs[1]), (bias_leaf, needs[2]))
                      if need]
            grads = list(torch.autograd.grad(chunk_loss, wanted)) if wanted else []
            if needs[0]:
                grad_hidden[rows] = grads.pop(0)
            if needs[1]:
                grad_weight += grads.pop(0)
            if needs[2]:
                grad_bias += grads.pop(0)
            total += chunk_loss.detach()
        ctx.save_for_backward(*(g if g is not None else torch.empty(0) for g in (grad_hidden, grad_weight, grad_bias)))
        ctx.normaliser = normaliser
        ctx.dtypes = (student_hidden.dtype, student_weight.dtype, None if student_bias is None else student_bias.dtype)
        return total / normaliser

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        scale = grad_output / ctx.normaliser
        needs, dtypes = ctx.needs_input_grad, ctx.dtypes
        return (
            (grad_hidden * scale).to(dtypes[0]) if needs[0] else None,
            (grad_weight * scale).to(dtypes[1]) if needs[1] else None,
            (grad_bias * scale).to(dtypes[2]) if needs[2] else None,
            None, None, None, None,
        )


def chunked_jsd_loss(
    student_hidden: torch.Tensor,
    student_lm_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_lm_head: torch.Tensor,
    labels: torch.Tensor | None,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    top_k: int = 0,
    add_tail: bool = True,
    reduction: str = "batchmean",
    num_items_in_batch: int | torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """`generalized_jsd_loss` of `hidden @ lm_head.T` logits, computed `chunk_size` tokens at a time.

    Hidden states are (B, T, H) with labels (B, T), or (N, H) with labels (N,). LM heads are weight matrices (V, H);
    `vocab_size` keeps only their first rows (a head padded past the tokenizer). Gradients reach the student's hidden
    states, LM head and bias; the teacher gets none. Reductions: "batchmean", "sum", "mean".
    """
    if reduction not in ("batchmean", "sum", "mean"):
        raise ValueError(f"chunked_jsd_loss supports reductions 'batchmean', 'sum', 'mean', not {reduction!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    if vocab_size is not None:
        student_lm_head, teacher_lm_head = student_lm_head[:vocab_size], teacher_lm_head[:vocab_size]
        student_bias = None if student_bias is None else student_bias[:vocab_size]
        teacher_bias = None if teacher_bias is None else teacher_bias[:vocab_size]
    if student_lm_head.shape[0] != teacher_lm_head.shape[0]:
        raise ValueError(f"student LM head has {student_lm_head.shape[0]} rows and teacher {teacher_lm_head.shape[0]}; "
                         "pass vocab_size to compare the shared vocabulary")
    mask = (torch.ones(student_hidden.shape[:-1], dtype=torch.bool, device=student_hidden.device)
            if labels is None else labels != IGNORE_INDEX)
    student_rows, teacher_rows = student_hidden[mask], teacher_hidden[mask]
    num_tokens = student_rows.shape[0]
    if reduction == "sum":
        normaliser = 1.0
    elif reduction == "mean":
        support = student_lm_head.shape[0] if top_k <= 0 else top_k * (1 if beta in (0, 1) else 2) + add_tail
        normaliser = float(max(num_tokens * support, 1))
    elif num_items_in_batch is not None:
        normaliser = float(num_items_in_batch)
    else:
        normaliser = float(max(num_tokens, 1))
    options = (beta, temperature, chunk_size, top_k, add_tail, normaliser)
    return _ChunkedDivergence.apply(
        student_rows, student_lm_head, student_bias, teacher_rows, teacher_lm_head, teacher_bias, options
    )
