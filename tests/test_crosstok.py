"""The cross-tokenizer loss as pure functions: with one tokenizer it is the ordinary divergence (loss and gradient, to
1e-6 in float64), and on a hand-made pair of vocabularies it equals a reference written from the definitions."""

from __future__ import annotations

import math

import pytest
import torch
from reference import ref_divergence_terms, ref_log_softmax

from protege.crosstok import (
    AlignedSide,
    CrossTokenizerLoss,
    VocabularyMatch,
    cross_tokenizer_loss_sum,
    group_log_masses,
    uld_distance,
)
from protege.objective import Objective, StudentHidden, StudentLogits, TeacherHidden, TeacherLogits

F64 = torch.float64


@pytest.mark.parametrize("rule", ["gold", "projection"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("view", ["logits", "hidden"])
def test_one_tokenizer_gives_the_ordinary_loss_and_gradient(beta, view, rule):
    torch.manual_seed(0)
    rows, columns, hidden, vocab = 3, 7, 16, 50
    labels = torch.randint(0, vocab, (rows, columns))
    labels[0, 5:] = -100
    labels[2, 3:] = -100
    mask = labels != -100
    student_hidden = torch.randn(rows, columns, hidden, dtype=F64, requires_grad=True)
    teacher_hidden = torch.randn(rows, columns, hidden, dtype=F64)
    student_head, teacher_head = torch.randn(vocab, hidden, dtype=F64), torch.randn(vocab, hidden, dtype=F64) * 2

    if view == "logits":
        student_rows = student_hidden @ student_head.T
        student_out, teacher_out = StudentLogits(student_rows), TeacherLogits(teacher_hidden @ teacher_head.T)
        ordinary = Objective(beta=beta, top_k=0).loss_sum(student_out, teacher_out, labels)
        weights = (None, None)
        student_flat, teacher_flat = student_rows[mask], (teacher_hidden @ teacher_head.T)[mask]
    else:
        student_out = StudentHidden(student_hidden, student_head, None)
        teacher_out = TeacherHidden(teacher_hidden, teacher_head, None)
        ordinary = Objective(beta=beta, top_k=0, chunk_size=4).loss_sum(student_out, teacher_out, labels)
        weights = (student_head, teacher_head)
        student_flat, teacher_flat = student_hidden[mask], teacher_hidden[mask]
    (ordinary_grad,) = torch.autograd.grad(ordinary, student_hidden, retain_graph=True)

    tokens = labels[mask]
    groups = torch.arange(len(tokens))
    cross = cross_tokenizer_loss_sum(
        AlignedSide(student_flat, weights[0], None, tokens, groups),
        AlignedSide(teacher_flat, weights[1], None, tokens, groups),
        len(tokens),
        VocabularyMatch.identity(vocab),
        CrossTokenizerLoss(beta=beta, rule=rule),
        chunk_groups=5,
    )
    (cross_grad,) = torch.autograd.grad(cross, student_hidden)
    assert ordinary.item() > 0
    torch.testing.assert_close(cross, ordinary, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(cross_grad, ordinary_grad, rtol=1e-6, atol=1e-12)


# ----- A hand-made pair of vocabularies -----
# student: 0 "a", 1 "b", 2 "ab", 3 "c";  teacher: 0 "b", 1 "a", 2 "d", 3 "e", 4 "c"
# shared by text: a (s0, t1), b (s1, t0), c (s3, t4); student-only: ab; teacher-only: d, e.
MATCH = VocabularyMatch(torch.tensor([0, 1, 3]), torch.tensor([1, 0, 4]), 4, 5)


def reference_group(student_logp, teacher_logp, student_tokens, teacher_tokens, beta, weights):
    """One group from the definitions, in Python: the first position's probabilities times the later actual tokens'
    probabilities; the shared tokens compared with the divergence, the others by sorted L1."""

    def masses(logp, tokens):
        later = sum(logp[i, tokens[i]].item() for i in range(1, len(tokens)))
        return [math.exp(logp[0, v].item() + later) for v in range(logp.shape[1])]

    s, t = masses(student_logp, student_tokens), masses(teacher_logp, teacher_tokens)
    pairs = list(zip(MATCH.student_ids.tolist(), MATCH.teacher_ids.tolist()))
    matched = (
        ref_divergence_terms(
            torch.log(torch.tensor([s[i] for i, _ in pairs], dtype=F64)),
            torch.log(torch.tensor([t[j] for _, j in pairs], dtype=F64)),
            beta,
        )
        .sum()
        .item()
    )
    s_rest = sorted((s[i] for i in range(4) if i not in MATCH.student_ids.tolist()), reverse=True)
    t_rest = sorted((t[j] for j in range(5) if j not in MATCH.teacher_ids.tolist()), reverse=True)
    width = max(len(s_rest), len(t_rest))
    s_rest += [0.0] * (width - len(s_rest))
    t_rest += [0.0] * (width - len(t_rest))
    uld = sum(abs(a - b) for a, b in zip(s_rest, t_rest))
    return weights[0] * matched + weights[1] * uld


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("weights", [None, (0.7, 0.3)])
def test_hybrid_loss_equals_the_reference_on_a_hand_made_pair(beta, weights):
    """Text "abc": the student writes "ab" "c" (2 tokens), the teacher "a" "b" "c" (3 tokens): groups "ab" (1
    student token, 2 teacher tokens) and "c" (1 and 1)."""
    torch.manual_seed(1)
    student_logits = torch.randn(2, 4, dtype=F64, requires_grad=True)
    teacher_logits = torch.randn(3, 5, dtype=F64)
    student_tokens, teacher_tokens = torch.tensor([2, 3]), torch.tensor([1, 0, 4])
    student_groups, teacher_groups = torch.tensor([0, 1]), torch.tensor([0, 0, 1])
    setting = CrossTokenizerLoss(
        beta=beta, matched_weight=weights and weights[0], unmatched_weight=weights and weights[1]
    )
    value = cross_tokenizer_loss_sum(
        AlignedSide(student_logits, None, None, student_tokens, student_groups),
        AlignedSide(teacher_logits, None, None, teacher_tokens, teacher_groups),
        2,
        MATCH,
        setting,
    )
    used = weights or (3 / 5, 2 / 5)  # adaptive: the share of the teacher's vocabulary that is matched
    s_logp, t_logp = ref_log_softmax(student_logits, 1.0), ref_log_softmax(teacher_logits, 1.0)
    expected = reference_group(s_logp[:1], t_logp[:2], [2], [1, 0], beta, used)
    expected += reference_group(s_logp[1:], t_logp[2:], [3], [4], beta, used)
    assert value.item() == pytest.approx(expected, rel=1e-9)
    value.backward()
    assert student_logits.grad.abs().sum() > 0


def test_uld_alone_and_the_group_rule():
    student = torch.tensor([[0.7, 0.2, 0.1]], dtype=F64)
    teacher = torch.tensor([[0.1, 0.6, 0.2, 0.1]], dtype=F64)
    # sorted: [0.7, 0.2, 0.1, 0] vs [0.6, 0.2, 0.1, 0.1]
    assert uld_distance(student, teacher).item() == pytest.approx(0.1 + 0 + 0 + 0.1)
    logp = torch.log(torch.tensor([[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]], dtype=F64))
    first, later = group_log_masses(logp, torch.tensor([0, 1, 0]), torch.tensor([0, 0, 1]), 2)
    assert first.tolist() == [0, 2]
    assert later.exp().tolist() == pytest.approx([0.75, 1.0])  # group 0: p(second token) = 0.75; group 1: nothing
    uld_only = CrossTokenizerLoss(beta=0.5, hybrid=False)
    value = cross_tokenizer_loss_sum(
        AlignedSide(torch.log(student), None, None, torch.tensor([0]), torch.tensor([0])),
        AlignedSide(torch.log(teacher), None, None, torch.tensor([1]), torch.tensor([0])),
        1,
        MATCH,
        uld_only,
    )
    assert value.item() == pytest.approx(0.2)
