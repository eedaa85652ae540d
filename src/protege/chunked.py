"""The memory-bounded path: hidden states and an LM head in, never a (tokens x vocabulary) tensor for the whole batch.

Any row function of `losses` (student logits and the teacher's rows in, divergence elements out) runs here on
`hidden @ lm_head.T` logits a chunk of tokens at a time, with the same value and gradient as on full logits. Pure
functions of tensors, like `losses`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .losses import (
    IGNORE_INDEX,
    check_reduction,
    compute_dtype,
    covers_vocabulary,
    divergence_rows,
    divergence_rows_value_and_grad,
    normaliser,
    sparse_top1_rows,
)

# Per-chunk working memory that "auto" aims at. A chunk of the full-vocabulary JSD (closed-form gradient) keeps about
# 10 (chunk x vocabulary) float32 tensors alive, top-k and sparse top-1 about 6 (measured at vocabulary 151,936,
# docs/benchmarks.md), so a chunk is about 256 MiB / (10 * 4 bytes * vocabulary) tokens.
AUTO_CHUNK_BYTES = 256 * 2**20
TENSORS_PER_CHUNK_ROW = 10
# Rows per LM-head product. A product of a few dozen rows streams the whole (V x H) head for little work: at V = 151,936
# and H = 896 on the 2-core development machine, the head's forward and two backward products ran at about 70% of
# their 128-row speed with 44-row chunks (docs/benchmarks.md, "Loss memory"). So the heads are applied to GEMM_ROWS
# rows at once and the loss's element-wise math still runs a chunk at a time inside them: one (GEMM_ROWS x V) buffer
# of the student's logits (which its gradient then overwrites), and one of the teacher's for a teacher given by its
# hidden states, on top of the chunk's tensors (78 MiB each at V = 151,936 in float32).
GEMM_ROWS = 128


def auto_chunk_size(vocab_size: int) -> int:
    """Tokens per chunk for a vocabulary: bounded memory at a large vocabulary, few chunks at a small one."""
    return max(16, AUTO_CHUNK_BYTES // (TENSORS_PER_CHUNK_ROW * 4 * max(vocab_size, 1)))


def apply_head(rows: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """Logits of `rows`: hidden states through the LM head `weight` (V, H) and `bias`, or logits already when `weight`
    is None."""
    return rows if weight is None else F.linear(rows.to(weight.dtype), weight, bias)


def head_groups(
    rows: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    group_size: int,
    *aligned: torch.Tensor,
    teacher_head: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> Iterator[tuple[slice, torch.Tensor, list[torch.Tensor]]]:
    """(which rows, their logits, the `aligned` tensors' same rows), `group_size` rows at a time: `rows` are hidden
    states (N, H) put through the LM head `weight` (V, H) and `bias` without gradients, or logits already when `weight`
    is None. With `teacher_head` (weight, bias), `aligned[0]` are a teacher's hidden states, given as logits through
    that head. The one place the memory-bounded path applies a head."""
    for start in range(0, rows.shape[0], group_size):
        part = slice(start, start + group_size)
        group_aligned = [t[part] for t in aligned]
        with torch.no_grad():
            logits = apply_head(rows[part], weight, bias)
            if teacher_head is not None:
                group_aligned[0] = apply_head(group_aligned[0], *teacher_head)
        yield part, logits, group_aligned
        del logits, group_aligned  # before the next group's logits exist, once the caller has dropped its own


def head_chunks(
    rows: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    chunk_size: int,
    *aligned: torch.Tensor,
    teacher_head: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> Iterator[tuple[slice, torch.Tensor, list[torch.Tensor]]]:
    """The one chunk loop of the memory-bounded path: (which rows, their logits, the `aligned` tensors' same rows), a
    chunk of `chunk_size` rows at a time, the heads applied `GEMM_ROWS` rows at once (`head_groups`, whose
    `teacher_head` it takes). The sampled-token metric and the teacher server's scoring run on it, so no caller ever
    holds (tokens x vocabulary) logits."""
    groups = head_groups(rows, weight, bias, max(chunk_size, GEMM_ROWS), *aligned, teacher_head=teacher_head)
    for group, logits, group_aligned in groups:
        for start in range(0, logits.shape[0], chunk_size):
            part = slice(start, start + chunk_size)
            yield (
                slice(group.start + start, group.start + start + chunk_size),
                logits[part],
                [t[part] for t in group_aligned],
            )


def _chunk_value_and_grad(logits, chunk_rows, elements_fn, value_and_grad_fn, needs_grad: bool):
    """A chunk's summed loss (detached), its gradient in the logits' dtype (None where none is needed) and the
    support size of its elements: in closed form by `value_and_grad_fn` where given, else autograd through
    `elements_fn`."""
    if value_and_grad_fn is not None:
        chunk_loss, grad_logits = value_and_grad_fn(logits, *chunk_rows)
        return chunk_loss.detach(), grad_logits.to(logits.dtype), logits.shape[-1]  # as autograd gives it
    logits = logits.detach().requires_grad_(needs_grad)  # a leaf sharing the group buffer's storage
    with torch.enable_grad():
        elements = elements_fn(logits, *chunk_rows)
        chunk_loss = elements.sum()
    grad_logits = torch.autograd.grad(chunk_loss, logits)[0] if needs_grad else None
    return chunk_loss.detach(), grad_logits, elements.shape[-1]


class _ChunkedRows(torch.autograd.Function):
    """Forward computes the summed loss and its gradient chunk by chunk; backward only scales the stored gradient.

    The LM head is applied `GEMM_ROWS` rows at a time (`head_groups`) and the divergence runs on a chunk of those rows
    at a time, so peak memory is bounded by the group's logits and the chunk's tensors, and no logits are recomputed
    in backward, so the cost stays that of one dense forward and backward. Each chunk's gradient overwrites its spent
    logits, and the group's gradient goes through the head's two backward products at once; the head's (V x H)
    gradient is accumulated in place with `addmm_`, so no (V x H) temporary is made per group, and backward scales the
    accumulated gradients in place. The teacher's rows (any tensors with one row per token) are sliced alongside and
    handed to `elements_fn`, or, when given, to `value_and_grad_fn`, which returns a chunk's summed loss and its
    gradient in closed form (fewer (C x V) tensors). With `teacher_head` (weight, bias), the first of the teacher's
    rows are its hidden states, put through that head a group at a time.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, elements_fn, value_and_grad_fn, chunk_size, teacher_head, *teacher_rows):
        needs = ctx.needs_input_grad[:3]
        # Sums over tokens are kept in float32 at least (bf16 would lose a chunk's gradient against the total), and in
        # float64 for float64 inputs, which a float32 sum would round.
        accumulate = compute_dtype(hidden, weight, bias)
        grads = [
            torch.zeros_like(hidden) if needs[0] else None,
            torch.zeros_like(weight, dtype=compute_dtype(weight)) if needs[1] else None,
            torch.zeros_like(bias, dtype=compute_dtype(bias)) if needs[2] else None,
        ]
        total = torch.zeros((), dtype=accumulate, device=hidden.device)
        support_size = 0
        group_size = max(chunk_size, GEMM_ROWS)
        groups = head_groups(hidden, weight, bias, group_size, *teacher_rows, teacher_head=teacher_head)
        for rows, logits, group_rows in groups:
            for start in range(0, logits.shape[0], chunk_size):
                part = slice(start, start + chunk_size)
                chunk_loss, grad_logits, support_size = _chunk_value_and_grad(
                    logits[part], [t[part] for t in group_rows], elements_fn, value_and_grad_fn, any(needs)
                )
                total = total + chunk_loss  # promotes: a teacher in float64 makes the chunk's loss float64
                if grad_logits is not None:
                    logits[part] = grad_logits  # the chunk's logits are spent: the group's gradient takes their place
                del chunk_loss, grad_logits
            del group_rows
            if not any(needs):
                continue
            if needs[0]:
                grads[0][rows] = logits @ weight
            if needs[1]:
                grads[1].addmm_(logits.T.to(grads[1].dtype), hidden[rows].to(grads[1].dtype))
            if needs[2]:
                grads[2] += logits.to(grads[2].dtype).sum(0)
            del logits
        ctx.grads = grads  # intermediate results, not inputs or outputs: kept on ctx, scaled in place in backward
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        support = torch.tensor(support_size)
        ctx.mark_non_differentiable(support)
        return total, support

    @staticmethod
    def backward(ctx, grad_total, _grad_support):
        if ctx.grads is None:
            raise RuntimeError(
                "the chunked loss's backward can run once per forward (its gradients are scaled in place)"
            )
        grads = tuple(
            g.mul_(grad_total).to(dtype) if need and g is not None else None
            for g, need, dtype in zip(ctx.grads, ctx.needs_input_grad[:3], ctx.dtypes)
        )
        ctx.grads = None
        return (*grads, *([None] * (len(ctx.needs_input_grad) - 3)))


def chunked_rows_sum(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    elements_fn,
    *teacher_rows: torch.Tensor,
    chunk_size: int | str,
    value_and_grad_fn=None,
    teacher_head: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, int]:
    """Sum of `elements_fn(hidden @ weight.T + bias, *teacher_rows)` over rows (N, H), `chunk_size` rows at a time
    ("auto": `auto_chunk_size` of the weight's vocabulary). With `teacher_head` (weight, bias), `teacher_rows[0]` are
    the teacher's hidden states, and `elements_fn` gets them as logits through that head.

    Returns the sum (differentiable in hidden, weight and bias) and the support size of the elements.
    """
    if chunk_size == "auto":
        chunk_size = auto_chunk_size(weight.shape[0])
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")
    if not torch.is_grad_enabled():  # evaluation: autograd.Function would still compute the gradients
        hidden, weight = hidden.detach(), weight.detach()
        bias = None if bias is None else bias.detach()
    total, support = _ChunkedRows.apply(
        hidden, weight, bias, elements_fn, value_and_grad_fn, chunk_size, teacher_head, *teacher_rows
    )
    return total, int(support)


def through_teacher_head(fn, weight: torch.Tensor, bias: torch.Tensor | None):
    """`fn(student_logits, teacher_logits, *rest)` made to take the teacher's last hidden state in place of its logits;
    the teacher's chunk of logits is made under no_grad, like the student's."""

    def on_hidden(student_logits, teacher_hidden, *rest):
        with torch.no_grad():
            teacher_logits = apply_head(teacher_hidden, weight, bias)
        return fn(student_logits, teacher_logits, *rest)

    return on_hidden


def chunked_logits_loss(
    rows_fn,
    heads: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
    *,
    chunk_size: int | str = 256,
    reduction: str = "batchmean",
    num_items_in_batch: int | torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    vocab_size: int | None = None,
    value_and_grad_fn=None,
) -> torch.Tensor:
    """Any row loss `rows_fn(student_logits, teacher_logits, targets)` of `hidden @ lm_head.T (+ bias)` logits,
    `chunk_size` tokens at a time; `heads` is (student_hidden, student_lm_head, teacher_hidden, teacher_lm_head,
    labels). `value_and_grad_fn`, with the same arguments, may give a chunk's sum and gradient in closed form.

    Hidden states are (B, T, H) with labels (B, T), or (N, H) with labels (N,). LM heads are weight matrices (V, H);
    `vocab_size` keeps only their first rows (a head padded past the tokenizer). Gradients reach the student's hidden
    states, LM head and bias; the teacher gets none. Reductions: "batchmean", "sum", "mean".
    """
    check_reduction(reduction, ("batchmean", "sum", "mean"))
    student_hidden, student_lm_head, teacher_hidden, teacher_lm_head, labels = heads
    if vocab_size is not None:
        student_lm_head, teacher_lm_head = student_lm_head[:vocab_size], teacher_lm_head[:vocab_size]
        student_bias = None if student_bias is None else student_bias[:vocab_size]
        teacher_bias = None if teacher_bias is None else teacher_bias[:vocab_size]
    if student_lm_head.shape[0] != teacher_lm_head.shape[0]:
        raise ValueError(
            f"student LM head has {student_lm_head.shape[0]} rows and teacher {teacher_lm_head.shape[0]}; "
            "pass vocab_size to compare the shared vocabulary"
        )
    if labels is None:
        labels = torch.zeros(student_hidden.shape[:-1], dtype=torch.long, device=student_hidden.device)
    mask = labels != IGNORE_INDEX

    total, support = chunked_rows_sum(
        student_hidden[mask],
        student_lm_head,
        student_bias,
        rows_fn,
        teacher_hidden[mask],
        labels[mask],
        chunk_size=chunk_size,
        value_and_grad_fn=value_and_grad_fn,
        teacher_head=(teacher_lm_head, teacher_bias),
    )
    return total / normaliser(reduction, int(mask.sum()), support, num_items_in_batch)


def chunked_jsd_loss(
    student_hidden: torch.Tensor,
    student_lm_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_lm_head: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    top_k: int = 0,
    add_tail: bool = True,
    **chunk_options,
) -> torch.Tensor:
    """`generalized_jsd_loss` of `hidden @ lm_head.T` logits, computed chunk by chunk; `chunk_options` are those of
    `chunked_logits_loss` (chunk_size, reduction, num_items_in_batch, student_bias, teacher_bias, vocab_size)."""

    def rows_fn(student_logits, teacher_logits, _targets):
        return divergence_rows(
            student_logits, teacher_logits, beta=beta, temperature=temperature, top_k=top_k, add_tail=add_tail
        )

    def value_and_grad_fn(student_logits, teacher_logits, _targets):
        return divergence_rows_value_and_grad(student_logits, teacher_logits, beta=beta, temperature=temperature)

    heads = (student_hidden, student_lm_head, teacher_hidden, teacher_lm_head, labels)
    full = covers_vocabulary(top_k, student_lm_head.shape[0])
    return chunked_logits_loss(rows_fn, heads, value_and_grad_fn=value_and_grad_fn if full else None, **chunk_options)


def chunked_sparse_top1_loss(
    student_hidden: torch.Tensor,
    student_lm_head: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_lm_head: torch.Tensor,
    labels: torch.Tensor,
    *,
    beta: float,
    reverse_kl_top_1_mode: str = "sampled",
    temperature: float = 1.0,
    add_tail: bool = True,
    **chunk_options,
) -> torch.Tensor:
    """`local_sparse_top1_loss` of `hidden @ lm_head.T` logits, computed chunk by chunk (options as
    `chunked_jsd_loss`)."""
    options = dict(beta=beta, temperature=temperature, add_tail=add_tail)
    rows_fn = functools.partial(sparse_top1_rows, reverse_kl_top_1_mode=reverse_kl_top_1_mode, **options)
    heads = (student_hidden, student_lm_head, teacher_hidden, teacher_lm_head, labels)
    return chunked_logits_loss(rows_fn, heads, **chunk_options)
