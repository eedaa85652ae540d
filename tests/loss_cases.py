"""Inputs, comparisons and the reference loss of the loss tests (test_losses*.py); the float64 math itself is in
reference.py.

Ties: the "ties" inputs contain exact ties in every row. Top-k selection under a tie at the k-boundary is ambiguous,
so where a support is selected (top-k, sparse top-1) the ties are only put below the row's median (entries floored to
a 0.5 grid, and the 4 smallest made equal), never among the top 16 entries where any top-5 support, argmax or reverse
token lies. The full-vocabulary loss selects nothing, so there every entry is on a 0.5 grid and the two largest
entries are tied. The "masked_vocab" inputs have -inf at the same vocabulary positions in student and teacher, and for
0 < beta < 1 also one -inf only in the student and one only in the teacher.

Tolerances: the implementation computes float32 (and bf16) inputs in float32, the reference in float64. Values and
gradients (vector-Jacobian products with a random cotangent) must satisfy
|got - want| <= atol * max(1, max|want|) + rtol * |want| element-wise, with rtol = 1e-5 and atol = 2e-6 for losses on
logits (the worst error seen is 0.98e-6 of the tensor's scale, at temperature 0.5 where log-probs reach -30), and
atol = 2e-5 for the chunked path, whose logits come from a float32 matmul and whose weight gradients sum
tokens x hidden (worst seen 0.68e-5). float64 inputs are computed in float64 and must match the reference to 1e-12 of
the tensor's scale.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from hypothesis import settings
from hypothesis import strategies as st
from reference import F64, IGNORE, NEG_INF, ref_log_softmax, ref_rows

from protege.losses import generalized_jsd_loss, local_sparse_top1_loss, sparse_top1_loss, topk_forward_kl_loss

RTOL, ATOL = 1e-5, 2e-6  # float32 implementation vs float64 reference; see assert_close_tol
CHUNKED_ATOL = 2e-5  # hidden @ W.T in float32 first, and weight gradients sum over tokens x hidden
FLOAT64_TOL = 1e-12  # float64 implementation vs float64 reference: round-off only

V = 32
SHAPE = (2, 6)
SHARED_INF_COLS = [3, 17, 30]  # -inf in both student and teacher: a masked vocabulary
STUDENT_ONLY_INF_COL, TEACHER_ONLY_INF_COL = 8, 21  # -inf in one of them (JSD only: a KL would be infinite)
SAFE_LABEL_COLS = [c for c in range(V) if c not in {*SHARED_INF_COLS, STUDENT_ONLY_INF_COL, TEACHER_ONLY_INF_COL}]
H_STUDENT, H_TEACHER = 8, 12  # hidden sizes of the chunked inputs

BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]
TEMPERATURES = [0.5, 1.0, 2.0]
REDUCTIONS = ["batchmean", "sum", "mean", "none"]
TOPK_VARIANTS = [(0, True), (1, True), (1, False), (5, True), (5, False)]  # (top_k, add_tail)
SETTINGS = settings(max_examples=20, deadline=None, derandomize=True)
seeds = st.integers(0, 2**16)
betas = st.sampled_from(BETAS)
top_ks = st.sampled_from([0, 1, 5])


def seed_of(*params) -> int:
    """A seed that depends on the test parameters, stable across runs (unlike hash() of strings)."""
    return zlib.crc32(repr(params).encode()) % 10_000


def ref_loss(
    student_logits,
    teacher_logits,
    labels,
    *,
    beta,
    temperature=1.0,
    reduction="batchmean",
    support=None,
    add_tail=True,
    num_items_in_batch=None,
):
    """The reference with protege's reductions: the unmasked tokens' rows (N, S) of reference.ref_rows, summed, or
    divided by N (or num_items_in_batch), by N x S ("mean"), or put back in place with zeros at masked positions
    ("none"). `support` as for ref_rows (None: the full vocabulary)."""
    mask = labels != IGNORE
    rows = ref_rows(
        student_logits[mask],
        teacher_logits[mask],
        labels[mask],
        beta=beta,
        temperature=temperature,
        support=support,
        add_tail=add_tail,
    )
    num_tokens, width = rows.shape
    if reduction == "none":
        out = torch.zeros(*labels.shape, width, dtype=F64)
        out[mask] = rows
        return out
    total = rows.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / (num_tokens * width)
    return total / (num_tokens if num_items_in_batch is None else float(num_items_in_batch))


def make_labels(g: torch.Generator, shape, teacher_logits: torch.Tensor, safe_cols=SAFE_LABEL_COLS) -> torch.Tensor:
    """Label tokens on safe columns (finite in both models), about a third masked, but never [0, 0] and [0, 1].
    Column 1 holds the teacher's argmax where that is a safe column, so the sparse top-1 support meets a duplicate.
    (A label the student gives probability 0 is tested on its own: test_zero_student_mass_on_sparse_support_...)"""
    safe = torch.tensor(safe_cols)
    labels = safe[torch.randint(len(safe), shape, generator=g)]
    top1 = teacher_logits[..., 1, :].argmax(dim=-1)
    labels[..., 1] = torch.where(torch.isin(top1, safe), top1, labels[..., 1])
    keep = labels.flatten()[:2].clone()
    labels[torch.rand(shape, generator=g) < 0.35] = IGNORE
    labels.view(-1)[:2] = keep  # positions [0, 0] and [0, 1] are never masked
    return labels


def make_inputs(seed: int, scenario: str = "ties", *, sparse: bool = True, one_sided: bool = False, shape=SHAPE):
    """Student logits, teacher logits (float32, (*shape, V)) and labels for one scenario.

    scenario "ties": exact ties, below the row median when `sparse` (a top-k support, argmax or reverse token is
    selected), everywhere otherwise. scenario "masked_vocab": SHARED_INF_COLS are -inf in both, and with `one_sided`
    STUDENT_ONLY_INF_COL is -inf in the student only and TEACHER_ONLY_INF_COL in the teacher only.
    """
    g = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(*shape, V, generator=g)
    teacher = 2 * torch.randn(*shape, V, generator=g)
    if scenario == "ties":

        def tie(x):
            order = x.argsort(dim=-1)
            if sparse:  # floor the lower half to a 0.5 grid and tie the 4 smallest entries exactly
                x = torch.where(x < x.median(dim=-1, keepdim=True).values, torch.floor(x * 2) / 2, x)
                return x.scatter(-1, order[..., :4], x.gather(-1, order[..., :1]).expand(*x.shape[:-1], 4))
            x = torch.floor(x * 2) / 2  # everything on a 0.5 grid, and the two largest entries tied exactly
            return x.scatter(-1, order[..., -2:], x.gather(-1, order[..., -1:]).expand(*x.shape[:-1], 2))

        student, teacher = tie(student), tie(teacher)
    elif scenario == "masked_vocab":
        student[..., SHARED_INF_COLS] = NEG_INF
        teacher[..., SHARED_INF_COLS] = NEG_INF
        if one_sided:
            student[..., STUDENT_ONLY_INF_COL] = NEG_INF
            teacher[..., TEACHER_ONLY_INF_COL] = NEG_INF
    else:
        raise AssertionError(scenario)
    safe_cols = SAFE_LABEL_COLS if scenario == "masked_vocab" else list(range(V))
    return student, teacher, make_labels(g, shape, teacher, safe_cols)


def assert_close_tol(actual, expected, rtol=RTOL, atol=ATOL):
    """|actual - expected| <= atol * max(1, max|expected|) + rtol * |expected|, element-wise.

    The absolute part scales with the tensor's largest entry: float32 log-softmax errors grow with the magnitude of the
    log-probs (up to ~30 at temperature 0.5), so the error of a small entry follows the scale of the whole tensor."""
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale)


def assert_matches_reference(impl, ref, student_logits, *, seed=0, rtol=RTOL, atol=ATOL):
    """impl(leaf in the logits' dtype) against ref(float64 leaf): dtype (float32, or float64 for float64 logits), shape,
    value, and the gradient of <output, cotangent>."""
    s32 = student_logits.detach().clone().requires_grad_(True)
    s64 = student_logits.detach().to(F64).requires_grad_(True)
    out, expected = impl(s32), ref(s64)
    assert out.dtype == torch.promote_types(student_logits.dtype, torch.float32)
    assert out.shape == expected.shape
    assert torch.isfinite(out).all()
    assert_close_tol(out.detach().to(F64), expected.detach(), rtol=rtol, atol=atol)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    (grad,) = torch.autograd.grad((out.to(F64) * cotangent).sum(), s32)
    (expected_grad,) = torch.autograd.grad((expected * cotangent).sum(), s64)
    assert torch.isfinite(grad).all()
    assert_close_tol(grad.to(F64), expected_grad, rtol=rtol, atol=atol)
    return out


def teacher_server_inputs(teacher_logits, labels, temperature, squeeze):
    """What a teacher server returns for the sparse top-1 loss: top-1 ids, float32 top-1 log-probs and the log-prob of
    the actual token, temperature-scaled. Masked positions hold garbage (-100 ids, -inf log-probs), never to be read."""
    log_t = ref_log_softmax(teacher_logits, temperature)
    top1_logprobs, top1_ids = log_t.max(dim=-1)
    token_logprobs = log_t.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    masked = labels == IGNORE
    top1_ids, top1_logprobs = top1_ids.masked_fill(masked, IGNORE), top1_logprobs.masked_fill(masked, NEG_INF)
    token_logprobs = token_logprobs.masked_fill(masked, NEG_INF)
    out = [top1_ids, top1_logprobs.float(), token_logprobs.float()]
    return out if squeeze else [t.unsqueeze(-1) for t in out]


def teacher_topk_inputs(teacher_logits, labels, temperature, k, valid_k=None):
    """Teacher's top-k ids / float32 log-probs (B, T, K); slots from valid_k on are padding (id 0, log-prob -inf)."""
    log_t = ref_log_softmax(teacher_logits, temperature)
    logprobs, ids = log_t.sort(dim=-1, descending=True, stable=True)
    ids, logprobs = ids[..., :k].clone(), logprobs[..., :k].float()
    if valid_k is not None:
        ids[..., valid_k:] = 0
        logprobs[..., valid_k:] = NEG_INF
    return ids, logprobs


def make_chunked_inputs(seed, *, bias=True, masked_vocab=False, one_sided=False, padded_rows=0, shape=SHAPE):
    """Hidden states (*shape, H), LM heads (V + padded_rows, H) and biases; a masked vocabulary is a -inf bias."""
    g = torch.Generator().manual_seed(seed)
    rows = V + padded_rows
    sh, sw = torch.randn(*shape, H_STUDENT, generator=g), 0.7 * torch.randn(rows, H_STUDENT, generator=g)
    th, tw = torch.randn(*shape, H_TEACHER, generator=g), 0.6 * torch.randn(rows, H_TEACHER, generator=g)
    sb = 0.5 * torch.randn(rows, generator=g) if bias else None
    tb = 0.5 * torch.randn(rows, generator=g) if bias else None
    if masked_vocab:
        sb[SHARED_INF_COLS] = NEG_INF
        tb[SHARED_INF_COLS] = NEG_INF
        if one_sided:
            sb[STUDENT_ONLY_INF_COL] = NEG_INF
            tb[TEACHER_ONLY_INF_COL] = NEG_INF
    teacher_logits = F.linear(th, tw[:V], None if tb is None else tb[:V])
    return sh, sw, sb, th, tw, tb, make_labels(g, shape, teacher_logits)


def chunked_grads(loss_fn, sh, sw, sb, dtype=None):
    """Loss and gradients w.r.t. student hidden, weight and bias (leaves cast to `dtype` when given)."""
    leaves = [t if t is None else t.detach().to(dtype or t.dtype).requires_grad_(True) for t in (sh, sw, sb)]
    loss = loss_fn(*leaves)
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return loss, grads


def every_loss(student, teacher, labels, reduction, num_items_in_batch=None, beta=0.5):
    """Each public loss on the same inputs (the server forms fed from the teacher logits), by name."""
    server = teacher_server_inputs(teacher, labels, 1.0, squeeze=True)
    ids, logprobs = teacher_topk_inputs(teacher, labels, 1.0, 5)
    kw = dict(reduction=reduction, num_items_in_batch=num_items_in_batch)
    return {
        "jsd": generalized_jsd_loss(student, teacher, labels, beta=beta, **kw),
        "jsd_top5": generalized_jsd_loss(student, teacher, labels, beta=beta, top_k=5, **kw),
        "sparse_top1": sparse_top1_loss(student, labels, *server, beta=beta, **kw),
        "local_sparse_top1": local_sparse_top1_loss(student, teacher, labels, beta=beta, **kw),
        "topk_forward_kl": topk_forward_kl_loss(student, labels, ids, logprobs, **kw),
    }
