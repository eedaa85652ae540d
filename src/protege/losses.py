"""Divergences between a student and a teacher: pure functions, no trainer state, no I/O.

Conventions shared by every function here:

* Logits are divided by `temperature`, then normalised with `log_softmax` in the wider of the inputs' dtype and float32
  (`compute_dtype`): bf16 and fp16 are upcast, since their 8 or 11 bits cannot hold a log-probability's precision,
  while float64 stays float64, so a float64 caller gets float64 accuracy.
* `beta = 0` is forward KL(T || S), `beta = 1` is reverse KL(S || T), and `0 < beta < 1` is the generalized JSD of the
  GKD paper: with M = (1 - beta) * S + beta * T, the loss is beta * KL(T || M) + (1 - beta) * KL(S || M). The interior
  formula tends to 0, not to the KLs, as beta approaches 0 or 1: the endpoints are the two KLs on purpose.
* Positions whose label is -100 contribute nothing and are never normalised; a fully masked batch gives a loss of
  exactly 0 with finite (zero) gradients.
* Reductions: "batchmean" sums over tokens and vocabulary (or support) and divides by the number of unmasked tokens,
  or by `num_items_in_batch` when given (the trainer passes the completion-token count of the whole optimizer step, so
  the gradient does not depend on gradient accumulation); "sum"; "mean" divides by tokens x support size; "none"
  returns the per-element tensor with zeros at masked positions.
* A sparse support (top-k, top-1) either gets a tail bucket holding the mass outside it, log(1 - sum p) with the
  support's log-mass capped at -MIN_TAIL_PROB (TRL's floor), or is renormalised; slots marked invalid (duplicates,
  padding) contribute nothing.
* 0 * log 0 is 0: tokens with zero probability (logits of -inf) never produce NaN, in the value or the gradient.

`trl_generalized_jsd_loss` is the exception to the reduction rules: it reduces exactly as TRL 1.8.0's static
`DistillationTrainer.generalized_jsd_loss` does, for code written against TRL.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
REDUCTIONS = ("batchmean", "sum", "mean", "none")
# The support's log-mass is capped at -MIN_TAIL_PROB, so the tail keeps at least 1 - exp(-1e-7), about 1e-7 (TRL's
# floor): 1 - sum(p) below it is float32 round-off, and the floor keeps log() and its gradient finite.
MIN_TAIL_PROB = 1e-7


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype losses compute in: the widest floating dtype among `tensors` and float32. bf16 and fp16 are upcast
    (too few mantissa bits for log-probabilities); float64 is never rounded down to float32."""
    dtype = torch.float32
    for tensor in tensors:
        if tensor is not None and tensor.is_floating_point():
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def upcast(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`tensor` in `dtype`, by default its own `compute_dtype`."""
    return tensor.to(dtype or compute_dtype(tensor))


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


def _logsumexp(logp: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last dimension that is -inf, with a zero gradient, for a row of zero mass."""
    empty = (logp == -math.inf).all(dim=-1, keepdim=True)
    total = torch.logsumexp(logp.masked_fill(empty, 0.0), dim=-1, keepdim=True)
    return total.masked_fill(empty, -math.inf)


def _tail_logp(support_logp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum exp(support_logp)) over the last dimension, with the log of the sum capped at -MIN_TAIL_PROB (the
    cap also absorbs a sum just above 1 from round-off)."""
    return torch.log(-torch.expm1(_logsumexp(support_logp).clamp(max=-MIN_TAIL_PROB)))


def _renormalise(support_logp: torch.Tensor) -> torch.Tensor:
    total = _logsumexp(support_logp)
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


# ---------------------------------------------------------------------------------------------------------------------
# Row functions: (N, V) student logits and the teacher's rows in, (N, S) divergence elements out
# ---------------------------------------------------------------------------------------------------------------------


def covers_vocabulary(top_k: int, vocab_size: int | None = None) -> bool:
    """Whether a top-k support is the whole vocabulary (`loss_top_k=0`, or k at least the vocabulary): the one rule
    for when the full-vocabulary divergence, and its closed-form gradient, apply."""
    return top_k <= 0 or (vocab_size is not None and top_k >= vocab_size)


def divergence_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    beta: float,
    temperature: float = 1.0,
    top_k: int = 0,
    add_tail: bool = True,
) -> torch.Tensor:
    """Divergence elements for rows of logits (..., V): (..., V) for the full vocabulary, (..., S) for a top-k
    support."""
    dtype = compute_dtype(student_logits, teacher_logits)
    student_logp = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    with torch.no_grad():
        teacher_logp = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    if covers_vocabulary(top_k, student_logp.shape[-1]):
        return divergence_elements(student_logp, teacher_logp, beta)
    ids, valid = top_k_support(student_logp.detach(), teacher_logp, beta, top_k)
    return support_elements(student_logp.gather(-1, ids), teacher_logp.gather(-1, ids), valid, beta, add_tail)


def divergence_rows_value_and_grad(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, beta: float, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The full-vocabulary divergence of rows of finite logits, summed, and its gradient with respect to the student's
    logits, in closed form: the value and gradient of `divergence_rows(..., top_k=0)` under autograd, with about 6
    instead of about 17 (N x V) tensors alive at once (in `compute_dtype` of the inputs).

    With S and T the tempered softmaxes and M = (1 - beta) S + beta T, the gradient of the loss through the softmax is
    S * (g - sum(S * g)) / temperature with g = (1 - beta) log(S / M), g = log(S / T) at beta = 1, and (S - T) /
    temperature at beta = 0.
    """
    dtype = compute_dtype(student_logits, teacher_logits)
    with torch.no_grad():
        student_logp = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
        teacher_logp = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
        student_p = student_logp.exp()
        if beta == 0:
            teacher_p = teacher_logp.exp()
            value = torch.where(teacher_p > 0, teacher_p * (teacher_logp - student_logp), 0.0).sum()
            return value, (student_p - teacher_p).div_(temperature)
        present = student_logp > -math.inf  # 0 * log 0 is 0: tokens the student gives no mass contribute nothing
        if beta == 1:
            g = torch.where(present, student_logp - teacher_logp, 0.0)
            value = (student_p * g).sum()
        else:
            mixture_logp = torch.logaddexp(student_logp + math.log1p(-beta), teacher_logp + math.log(beta))
            teacher_term = torch.where(
                teacher_logp > -math.inf, teacher_logp.exp() * (teacher_logp - mixture_logp), 0.0
            )
            g = torch.where(present, student_logp.sub_(mixture_logp).mul_(1 - beta), 0.0)
            value = beta * teacher_term.sum() + (student_p * g).sum()
            del teacher_term, mixture_logp
        g -= (student_p * g).sum(dim=-1, keepdim=True)
        return value, g.mul_(student_p).div_(temperature)


def support_rows(
    student_logits: torch.Tensor,
    support_ids: torch.Tensor,
    teacher_support_logprobs: torch.Tensor,
    support_valid: torch.Tensor,
    *,
    beta: float,
    temperature: float = 1.0,
    add_tail: bool = True,
) -> torch.Tensor:
    """Divergence elements for rows of student logits (N, V) against a teacher known only on a support (N, S)."""
    dtype = compute_dtype(student_logits, teacher_support_logprobs)
    student_logp = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    return support_elements(
        student_logp.gather(-1, support_ids.long()), teacher_support_logprobs.to(dtype), support_valid, beta, add_tail
    )


def sparse_top1_support(
    reverse_ids: torch.Tensor,
    teacher_reverse_logprobs: torch.Tensor,
    teacher_top1_ids: torch.Tensor,
    teacher_top1_logprobs: torch.Tensor,
    *,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Support (N, S) of the sparse top-1 loss: the reverse token alone at beta = 1, else {teacher top-1, reverse}."""
    if beta <= 0:
        raise ValueError(
            f"the sparse top-1 loss needs beta > 0, got beta={beta}; use the top-k forward KL for beta = 0"
        )
    reverse_ids, reverse_logprobs = reverse_ids.unsqueeze(-1), teacher_reverse_logprobs.unsqueeze(-1)
    if beta == 1:
        return reverse_ids, reverse_logprobs, torch.ones_like(reverse_ids, dtype=torch.bool)
    top1_ids = teacher_top1_ids.unsqueeze(-1)
    valid = torch.cat([torch.ones_like(top1_ids, dtype=torch.bool), reverse_ids != top1_ids], dim=-1)
    ids = torch.cat([top1_ids, reverse_ids], dim=-1)
    return ids, torch.cat([teacher_top1_logprobs.unsqueeze(-1), reverse_logprobs], dim=-1), valid


def sparse_top1_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    beta: float,
    temperature: float = 1.0,
    add_tail: bool = True,
    reverse_kl_top_1_mode: str = "sampled",
) -> torch.Tensor:
    """Sparse top-1 elements for rows (N, V) of student and teacher logits, with the sampled tokens `targets` (N,)."""
    with torch.no_grad():
        teacher_logp = F.log_softmax(
            upcast(teacher_logits, compute_dtype(student_logits, teacher_logits)) / temperature, dim=-1
        )
        top1_logprobs, top1_ids = teacher_logp.max(dim=-1)
        if reverse_kl_top_1_mode == "argmax":
            reverse_ids = student_logits.argmax(dim=-1)
        elif reverse_kl_top_1_mode == "sampled":
            reverse_ids = targets
        else:
            raise ValueError(f"reverse_kl_top_1_mode={reverse_kl_top_1_mode!r} is not 'sampled' or 'argmax'")
        reverse_logprobs = teacher_logp.gather(-1, reverse_ids.unsqueeze(-1)).squeeze(-1)
    ids, teacher_support, valid = sparse_top1_support(reverse_ids, reverse_logprobs, top1_ids, top1_logprobs, beta=beta)
    return support_rows(
        student_logits, ids, teacher_support, valid, beta=beta, temperature=temperature, add_tail=add_tail
    )


# ---------------------------------------------------------------------------------------------------------------------
# Masking and reduction
# ---------------------------------------------------------------------------------------------------------------------


def token_mask(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """Which positions of (..., V) logits count: those whose label is not IGNORE_INDEX (all of them without labels)."""
    if labels is None:
        return torch.ones(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels have shape {tuple(labels.shape)} but logits have {tuple(logits.shape)}; "
            "labels must match the logits without their last (vocabulary) dimension"
        )
    return labels != IGNORE_INDEX


def check_reduction(reduction: str, allowed: tuple[str, ...] = REDUCTIONS) -> None:
    if reduction not in allowed:
        raise ValueError(f"reduction={reduction!r} is not one of {allowed}")


def normaliser(
    reduction: str, num_tokens: int, support_size: int, num_items_in_batch: int | torch.Tensor | None = None
) -> float | torch.Tensor:
    """What a summed loss is divided by under `reduction` (see the module docstring); dense and chunked share it."""
    if reduction == "sum":
        return 1.0
    if reduction == "mean":
        return float(max(num_tokens * support_size, 1))
    if num_items_in_batch is not None:
        return num_items_in_batch
    return float(max(num_tokens, 1))


def reduce_elements(
    elements: torch.Tensor,
    mask: torch.Tensor,
    *,
    reduction: str,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce (N, S) elements taken at the N positions where `mask` is True (see the module docstring)."""
    check_reduction(reduction)
    if reduction == "none":
        full = elements.new_zeros(*mask.shape, elements.shape[-1])
        return full.masked_scatter(mask.unsqueeze(-1), elements)
    return elements.sum() / normaliser(reduction, elements.shape[0], elements.shape[-1], num_items_in_batch)


# ---------------------------------------------------------------------------------------------------------------------
# Public losses on logits
# ---------------------------------------------------------------------------------------------------------------------


def check_same_shape(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; slice both to the shared vocabulary first"
        )


def _masked_loss(rows_fn, student_logits, labels, teacher_tensors, reduction, num_items_in_batch) -> torch.Tensor:
    """`rows_fn(student_rows, *teacher_rows)` at the positions whose label counts, reduced."""
    check_reduction(reduction)
    mask = token_mask(student_logits, labels)
    elements = rows_fn(student_logits[mask], *(t[mask] for t in teacher_tensors))
    return reduce_elements(elements, mask, reduction=reduction, num_items_in_batch=num_items_in_batch)


def generalized_jsd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    top_k: int = 0,
    add_tail: bool = True,
    reduction: str = "batchmean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Generalized JSD between student and teacher logits of shape (..., V); gradients flow to the student only.
    Keyword-only options, divergence first, then reduction, as the other public losses take them."""
    check_same_shape(student_logits, teacher_logits)
    rows_fn = functools.partial(divergence_rows, beta=beta, temperature=temperature, top_k=top_k, add_tail=add_tail)
    return _masked_loss(rows_fn, student_logits, labels, [teacher_logits], reduction, num_items_in_batch)


def trl_generalized_jsd_loss(
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
    """`generalized_jsd_loss` reduced as TRL 1.8.0's static `DistillationTrainer.generalized_jsd_loss` reduces it, with
    its positional signature, so code written against TRL gets TRL's numbers. The divergence elements are protege's
    (same math; see the module docstring); what differs from `generalized_jsd_loss` is the reduction:

    * with `labels`, only the rows whose label is not -100 are kept, (N, S); without, every position, (..., S);
    * `num_items_in_batch`, when given, wins over `reduction`: the sum divided by it, a scalar even for "none";
    * "batchmean": the sum over the number of kept rows with labels (at least 1), but over the first dimension (the
      batch size, in sequences) without them;
    * "sum"; "mean": over every element kept (0 when none is, where TRL gives NaN); "none": the kept elements.
    """
    check_reduction(reduction)
    check_same_shape(student_logits, teacher_logits)
    if labels is not None:
        mask = token_mask(student_logits, labels)
        student_logits, teacher_logits = student_logits[mask], teacher_logits[mask]
    elements = divergence_rows(
        student_logits, teacher_logits, beta=beta, temperature=temperature, top_k=top_k, add_tail=add_tail
    )
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(elements.device)
        return elements.sum() / num_items_in_batch
    if reduction == "none":
        return elements
    if reduction == "sum":
        return elements.sum()
    if reduction == "mean":
        return elements.sum() / max(elements.numel(), 1)
    return elements.sum() / max(elements.shape[0], 1)  # kept rows with labels, sequences (dimension 0) without


def sparse_top1_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_top1_ids: torch.Tensor,
    teacher_top1_logprobs: torch.Tensor,
    teacher_token_logprobs: torch.Tensor,
    *,
    beta: float,
    temperature: float = 1.0,
    add_tail: bool = True,
    reduction: str = "batchmean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Sparse top-1 divergence (beta > 0) from a teacher given as a server returns it ("sampled" mode).

    The support is {teacher's top-1 token, the sampled token (`labels`)} plus the tail bucket; the sampled token alone
    at beta = 1. Teacher inputs are (B, T) or (B, T, 1): top-1 ids and log-probs, and the log-prob of the actual token.
    Values at masked positions (servers pad them with -inf) are never read.
    """

    def rows_fn(student_rows, targets, token_logprobs, top1_ids, top1_logprobs):
        ids, teacher_support, valid = sparse_top1_support(
            targets, upcast(token_logprobs), top1_ids, upcast(top1_logprobs), beta=beta
        )
        return support_rows(
            student_rows, ids, teacher_support, valid, beta=beta, temperature=temperature, add_tail=add_tail
        )

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.squeeze(-1) if t.dim() == labels.dim() + 1 else t

    teacher = [labels, flat(teacher_token_logprobs), flat(teacher_top1_ids), flat(teacher_top1_logprobs)]
    return _masked_loss(rows_fn, student_logits, labels, teacher, reduction, num_items_in_batch)


def local_sparse_top1_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float,
    temperature: float = 1.0,
    add_tail: bool = True,
    reverse_kl_top_1_mode: str = "sampled",
    reduction: str = "batchmean",
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """`sparse_top1_loss` with the teacher given as full logits, as a local teacher provides them."""
    rows_fn = functools.partial(
        sparse_top1_rows,
        beta=beta,
        temperature=temperature,
        add_tail=add_tail,
        reverse_kl_top_1_mode=reverse_kl_top_1_mode,
    )
    return _masked_loss(rows_fn, student_logits, labels, [teacher_logits, labels], reduction, num_items_in_batch)


def topk_forward_kl_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    *,
    temperature: float = 1.0,
    add_tail: bool = True,
    num_items_in_batch: int | torch.Tensor | None = None,
    reduction: str = "batchmean",
) -> torch.Tensor:
    """Forward KL(T || S) over the teacher's top-k, given as ids and log-probs (B, T, K) padded with -inf."""

    def rows_fn(student_rows, ids, logprobs):
        logprobs = upcast(logprobs)
        valid = logprobs > -math.inf
        return support_rows(student_rows, ids, logprobs, valid, beta=0.0, temperature=temperature, add_tail=add_tail)

    teacher = [teacher_topk_ids, teacher_topk_logprobs]
    return _masked_loss(rows_fn, student_logits, labels, teacher, reduction, num_items_in_batch)
