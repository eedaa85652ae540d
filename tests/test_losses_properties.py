"""Properties every loss has whatever its inputs (hypothesis, derandomised): non-negative, zero for equal
distributions, the two KLs at the endpoints, num_items_in_batch a plain divisor, fully masked batches exactly zero.
Inputs and tolerances are described in loss_cases.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from loss_cases import (
    ATOL,
    REDUCTIONS,
    RTOL,
    SETTINGS,
    TEMPERATURES,
    assert_close_tol,
    betas,
    chunked_grads,
    every_loss,
    make_chunked_inputs,
    make_inputs,
    ref_loss,
    seeds,
    top_ks,
)
from reference import F64, IGNORE, topk_support

from protege.chunked import chunked_jsd_loss, chunked_sparse_top1_loss
from protege.losses import generalized_jsd_loss, local_sparse_top1_loss


@SETTINGS
@given(seed=seeds, beta=betas, top_k=top_ks, add_tail=st.booleans(), temperature=st.sampled_from(TEMPERATURES))
def test_per_token_loss_is_non_negative(seed, beta, top_k, add_tail, temperature):
    student, teacher, labels = make_inputs(seed, "ties", sparse=True)
    per_token = generalized_jsd_loss(
        student, teacher, labels, beta=beta, temperature=temperature, reduction="none", top_k=top_k, add_tail=add_tail
    ).sum(-1)
    assert (per_token >= -1e-6).all()
    if beta > 0:
        per_token = local_sparse_top1_loss(
            student, teacher, labels, beta=beta, temperature=temperature, add_tail=add_tail, reduction="none"
        )
        assert (per_token.sum(-1) >= -1e-6).all()


@SETTINGS
@given(seed=seeds, beta=betas, top_k=top_ks, add_tail=st.booleans(), temperature=st.sampled_from(TEMPERATURES))
def test_loss_is_zero_for_equal_distributions(seed, beta, top_k, add_tail, temperature):
    student, _, labels = make_inputs(seed, "masked_vocab")
    loss = generalized_jsd_loss(
        student,
        student.clone(),
        labels,
        beta=beta,
        temperature=temperature,
        reduction="sum",
        top_k=top_k,
        add_tail=add_tail,
    )
    if beta in (0, 1):
        assert loss == 0  # log p - log q is exactly 0
    else:
        assert abs(loss.item()) < 1e-5  # the mixture log (1-b) p + b p is p up to float32 round-off


@SETTINGS
@given(seed=seeds, top_k=top_ks, add_tail=st.booleans(), temperature=st.sampled_from(TEMPERATURES))
def test_endpoints_are_the_two_kls_exactly(seed, top_k, add_tail, temperature):
    """beta = 0 is KL(T || S) and beta = 1 is KL(S || T): swapping the models swaps the two, bit for bit."""
    a, b, labels = make_inputs(seed, "ties", sparse=True)
    options = dict(temperature=temperature, reduction="none", top_k=top_k, add_tail=add_tail)
    forward = generalized_jsd_loss(a, b, labels, beta=0.0, **options)
    reverse_swapped = generalized_jsd_loss(b, a, labels, beta=1.0, **options)
    assert torch.equal(forward, reverse_swapped)
    kl = ref_loss(
        a,
        b,
        labels,
        beta=0.0,
        temperature=temperature,
        reduction="none",
        support=topk_support(top_k, 0.0) if top_k else None,
        add_tail=add_tail,
    )
    torch.testing.assert_close(forward.to(F64), kl, rtol=RTOL, atol=ATOL)


def test_interior_jsd_tends_to_zero_not_to_the_kls():
    """Documented discontinuity: the endpoints are the KLs on purpose, the interior formula vanishes near them."""
    student, teacher, labels = make_inputs(41, "ties", sparse=False)
    for endpoint, near in ((0.0, 1e-4), (1.0, 1 - 1e-4)):
        kl = generalized_jsd_loss(student, teacher, labels, beta=endpoint)
        assert kl > 0.1
        assert generalized_jsd_loss(student, teacher, labels, beta=near) < 1e-2 * kl


@SETTINGS
@given(seed=seeds, n=st.one_of(st.integers(1, 10_000), st.integers(1, 10_000).map(torch.tensor)))
def test_num_items_in_batch_divides_the_sum(seed, n):
    student, teacher, labels = make_inputs(seed, "ties")
    leaf = student.clone().requires_grad_(True)
    sums = every_loss(leaf, teacher, labels, "sum")
    scaled = every_loss(leaf, teacher, labels, "batchmean", num_items_in_batch=n)
    for name, total in sums.items():
        torch.testing.assert_close(scaled[name], total / n, rtol=1e-6, atol=0, msg=name)
        (g_scaled,) = torch.autograd.grad(scaled[name], leaf, retain_graph=True)
        (g_sum,) = torch.autograd.grad(total, leaf, retain_graph=True)
        assert_close_tol(g_scaled, g_sum / n, rtol=1e-6, atol=1e-6)  # float32 round-off of backward only
    sh, sw, sb, th, tw, tb, labels = make_chunked_inputs(seed)
    args = (sh, sw, th, tw, labels)
    total = chunked_jsd_loss(*args, beta=0.5, reduction="sum", student_bias=sb, teacher_bias=tb)
    scaled = chunked_jsd_loss(*args, beta=0.5, num_items_in_batch=n, student_bias=sb, teacher_bias=tb)
    torch.testing.assert_close(scaled, total / n, rtol=1e-6, atol=0)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_fully_masked_batch_gives_exact_zero_and_zero_gradients(reduction):
    student, teacher, labels = make_inputs(51, "ties")
    labels = torch.full_like(labels, IGNORE)
    leaf = student.clone().requires_grad_(True)
    for name, loss in every_loss(leaf, teacher, labels, reduction).items():
        assert loss.dtype == torch.float32, name
        assert (loss == 0).all(), name
        if reduction == "none":
            assert loss.shape[:-1] == labels.shape, name
        (grad,) = torch.autograd.grad(loss.sum(), leaf, allow_unused=True)
        assert grad is None or (torch.isfinite(grad).all() and (grad == 0).all()), name
    if reduction == "none":
        return
    sh, sw, sb, th, tw, tb, _ = make_chunked_inputs(51)
    for loss_fn in (chunked_jsd_loss, chunked_sparse_top1_loss):
        loss, grads = chunked_grads(
            lambda h, w, b, fn=loss_fn: fn(
                h, w, th, tw, labels, beta=0.5, reduction=reduction, student_bias=b, teacher_bias=tb
            ),
            sh,
            sw,
            sb,
        )
        assert loss.dtype == torch.float32 and loss == 0
        assert all(torch.isfinite(g).all() and (g == 0).all() for g in grads)
