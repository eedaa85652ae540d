"""The chunked loss (hidden states and LM heads, chunk by chunk) against the float64 reference of reference.py and
against the dense loss on the same logits. Gradients of the reference come from autograd on float64 hidden states,
LM head and bias; inputs and tolerances are described in loss_cases.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from loss_cases import (
    ATOL,
    BETAS,
    CHUNKED_ATOL,
    FLOAT64_TOL,
    H_STUDENT,
    H_TEACHER,
    RTOL,
    SETTINGS,
    TOPK_VARIANTS,
    V,
    assert_close_tol,
    betas,
    chunked_grads,
    make_chunked_inputs,
    ref_loss,
    seed_of,
    seeds,
    top_ks,
)
from reference import F64, topk_support

from protege.chunked import GEMM_ROWS, chunked_jsd_loss, chunked_sparse_top1_loss
from protege.losses import generalized_jsd_loss, local_sparse_top1_loss


def assert_matches_dense(chunked_fn, dense_fn, params) -> None:
    """The chunked loss and its gradients in (student hidden, head, bias) equal the dense loss's on full logits, and
    are finite."""
    loss, grads = chunked_grads(chunked_fn, *params)
    dense, dense_grads = chunked_grads(dense_fn, *params)
    torch.testing.assert_close(loss, dense, rtol=RTOL, atol=ATOL)
    for grad, expected in zip(grads, dense_grads, strict=True):
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.slow
@pytest.mark.parametrize("bias", ["none", "finite", "masked_vocab"])
@pytest.mark.parametrize(("top_k", "add_tail"), TOPK_VARIANTS)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("beta", BETAS)
def test_chunked_jsd_matches_reference_for_every_chunk_size(beta, temperature, top_k, add_tail, bias):
    seed = seed_of("chunked", beta, temperature, top_k, add_tail, bias)
    sh, sw, sb, th, tw, tb, labels = make_chunked_inputs(
        seed, bias=bias != "none", masked_vocab=bias == "masked_vocab", one_sided=0 < beta < 1
    )
    support = topk_support(top_k, beta) if top_k else None
    teacher64 = F.linear(th.to(F64), tw.to(F64), None if tb is None else tb.to(F64))
    for reduction in ("batchmean", "sum", "mean"):
        expected, expected_grads = chunked_grads(
            lambda h, w, b, r=reduction: ref_loss(
                F.linear(h, w, b),
                teacher64,
                labels,
                beta=beta,
                temperature=temperature,
                reduction=r,
                support=support,
                add_tail=add_tail,
            ),
            sh,
            sw,
            sb,
            F64,
        )
        for chunk_size in (1, 5, 1024):
            loss, grads = chunked_grads(
                lambda h, w, b, r=reduction, c=chunk_size: chunked_jsd_loss(
                    h,
                    w,
                    th,
                    tw,
                    labels,
                    beta=beta,
                    temperature=temperature,
                    chunk_size=c,
                    top_k=top_k,
                    add_tail=add_tail,
                    reduction=r,
                    student_bias=b,
                    teacher_bias=tb,
                ),
                sh,
                sw,
                sb,
            )
            assert loss.dtype == torch.float32
            assert_close_tol(loss.to(F64), expected, atol=CHUNKED_ATOL)
            for grad, expected_grad in zip(grads, expected_grads, strict=True):
                assert torch.isfinite(grad).all()
                assert_close_tol(grad.to(F64), expected_grad, atol=CHUNKED_ATOL)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_vocab_size_drops_padded_head_rows(beta):
    sh, sw, sb, th, tw, tb, labels = make_chunked_inputs(31, padded_rows=4)
    loss, (g_h, g_w, g_b) = chunked_grads(
        lambda h, w, b: chunked_jsd_loss(
            h, w, th, tw, labels, beta=beta, chunk_size=4, student_bias=b, teacher_bias=tb, vocab_size=V
        ),
        sh,
        sw,
        sb,
    )
    dense, (d_h, d_w, d_b) = chunked_grads(
        lambda h, w, b: generalized_jsd_loss(
            F.linear(h, w[:V], b[:V]), F.linear(th, tw[:V], tb[:V]), labels, beta=beta
        ),
        sh,
        sw,
        sb,
    )
    torch.testing.assert_close(loss, dense, rtol=RTOL, atol=ATOL)
    for grad, expected in ((g_h, d_h), (g_w, d_w), (g_b, d_b)):
        torch.testing.assert_close(grad, expected, rtol=RTOL, atol=ATOL)
    assert (g_w[V:] == 0).all() and (g_b[V:] == 0).all()
    with pytest.raises(ValueError, match="vocab_size"):
        chunked_jsd_loss(sh, sw, th, tw[:V], labels, beta=beta)


def test_chunked_flat_inputs_without_labels_and_frozen_parts():
    """(N, H) hidden states with labels=None, a student whose hidden states need no gradient, teacher gets none."""
    sh, sw, _, th, tw, _, _ = make_chunked_inputs(32, bias=False)
    sh, th = sh.reshape(-1, H_STUDENT), th.reshape(-1, H_TEACHER).requires_grad_(True)
    w = sw.clone().requires_grad_(True)
    loss = chunked_jsd_loss(sh, w, th, tw, None, beta=0.5, chunk_size=3)
    loss.backward()
    dense_w = sw.clone().requires_grad_(True)
    dense = generalized_jsd_loss(F.linear(sh, dense_w), F.linear(th.detach(), tw), None, beta=0.5)
    dense.backward()
    torch.testing.assert_close(loss, dense, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(w.grad, dense_w.grad, rtol=RTOL, atol=ATOL)
    assert th.grad is None


@pytest.mark.parametrize("mode", ["sampled", "argmax"])
@pytest.mark.parametrize("beta", [0.5, 1.0])
def test_chunked_sparse_top1_equals_local_sparse_top1(beta, mode):
    sh, sw, sb, th, tw, tb, labels = make_chunked_inputs(33)
    assert_matches_dense(
        lambda h, w, b: chunked_sparse_top1_loss(
            h,
            w,
            th,
            tw,
            labels,
            beta=beta,
            temperature=2.0,
            chunk_size=4,
            reverse_kl_top_1_mode=mode,
            student_bias=b,
            teacher_bias=tb,
        ),
        lambda h, w, b: local_sparse_top1_loss(
            F.linear(h, w, b), F.linear(th, tw, tb), labels, beta=beta, temperature=2.0, reverse_kl_top_1_mode=mode
        ),
        (sh, sw, sb),
    )


@SETTINGS
@given(
    seed=seeds,
    beta=betas,
    top_k=top_ks,
    chunk_size=st.integers(1, 15),
    reduction=st.sampled_from(["batchmean", "sum", "mean"]),
)
def test_chunked_equals_dense_for_any_chunk_size(seed, beta, top_k, chunk_size, reduction):
    sh, sw, sb, th, tw, tb, labels = make_chunked_inputs(seed, masked_vocab=True, one_sided=0 < beta < 1)
    assert_matches_dense(
        lambda h, w, b: chunked_jsd_loss(
            h,
            w,
            th,
            tw,
            labels,
            beta=beta,
            chunk_size=chunk_size,
            top_k=top_k,
            reduction=reduction,
            student_bias=b,
            teacher_bias=tb,
        ),
        lambda h, w, b: generalized_jsd_loss(
            F.linear(h, w, b), F.linear(th, tw, tb), labels, beta=beta, reduction=reduction, top_k=top_k
        ),
        (sh, sw, sb),
    )


@pytest.mark.parametrize(("top_k", "add_tail"), [(0, True), (5, True), (5, False)])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_chunked_float64_is_computed_in_float64(beta, top_k, add_tail):
    """The chunked path (closed-form gradient at top_k=0, autograd per chunk otherwise) keeps float64 hidden states,
    LM heads and biases in float64: loss and gradients equal the float64 reference to float64 round-off."""
    sh, sw, sb, th, tw, tb, labels = make_chunked_inputs(64, one_sided=0 < beta < 1)
    th, tw, tb = th.to(F64), tw.to(F64), tb.to(F64)
    support = topk_support(top_k, beta) if top_k else None
    options = dict(beta=beta, temperature=0.5, add_tail=add_tail)
    expected, expected_grads = chunked_grads(
        lambda h, w, b: ref_loss(F.linear(h, w, b), F.linear(th, tw, tb), labels, support=support, **options),
        sh,
        sw,
        sb,
        F64,
    )
    loss, grads = chunked_grads(
        lambda h, w, b: chunked_jsd_loss(
            h, w, th, tw, labels, chunk_size=5, top_k=top_k, student_bias=b, teacher_bias=tb, **options
        ),
        sh,
        sw,
        sb,
        F64,
    )
    assert loss.dtype == F64 and all(g.dtype == F64 for g in grads)
    assert_close_tol(loss, expected, rtol=FLOAT64_TOL, atol=FLOAT64_TOL)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        assert_close_tol(grad, expected_grad, rtol=FLOAT64_TOL, atol=FLOAT64_TOL)


def test_bf16_chunked_is_float32_and_close_to_float32_inputs():
    sh, sw, sb, th, tw, tb, labels = make_chunked_inputs(62)
    loss32, grads32 = chunked_grads(
        lambda h, w, b: chunked_jsd_loss(h, w, th, tw, labels, beta=0.5, student_bias=b, teacher_bias=tb), sh, sw, sb
    )
    loss16, grads16 = chunked_grads(
        lambda h, w, b: chunked_jsd_loss(
            h, w, th.bfloat16(), tw.bfloat16(), labels, beta=0.5, student_bias=b, teacher_bias=tb.bfloat16()
        ),
        sh,
        sw,
        sb,
        torch.bfloat16,
    )
    assert loss16.dtype == torch.float32
    torch.testing.assert_close(loss16, loss32, rtol=2e-2, atol=1e-3)
    for g16, g32 in zip(grads16, grads32, strict=True):
        assert g16.dtype == torch.bfloat16
        torch.testing.assert_close(g16.float(), g32, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("chunk_size", [5, GEMM_ROWS, 200])
@pytest.mark.parametrize(("beta", "top_k"), [(0.0, 0), (0.5, 0), (1.0, 0), (0.0, 3), (0.5, 3)])
def test_rows_past_one_head_product_equal_dense(beta, top_k, chunk_size):
    """Over several groups of GEMM_ROWS rows (the head applied to a group, the divergence to a chunk of it, each chunk's
    gradient written over its logits), with a partial last group: the dense loss and gradients, in float64."""
    generator = torch.Generator().manual_seed(7)
    rows, vocab, width = 2 * GEMM_ROWS + 37, 40, 8
    sh, sw, sb = (
        torch.randn(*shape, generator=generator, dtype=F64) for shape in ((rows, width), (vocab, width), (vocab,))
    )
    th, tw, tb = (torch.randn(*shape, generator=generator, dtype=F64) for shape in ((rows, 6), (vocab, 6), (vocab,)))
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[::9] = -100
    assert_matches_dense(
        lambda h, w, b: chunked_jsd_loss(
            h, w, th, tw, labels, beta=beta, top_k=top_k, chunk_size=chunk_size, student_bias=b, teacher_bias=tb
        ),
        lambda h, w, b: generalized_jsd_loss(F.linear(h, w, b), F.linear(th, tw, tb), labels, beta=beta, top_k=top_k),
        (sh, sw, sb),
    )
