"""TRL 1.8.0 parity for what callers of TRL's API see: `DistillationTrainer.generalized_jsd_loss` and the trainer's
attributes.

TRL's static `generalized_jsd_loss` (trl/experimental/distillation/distillation_trainer.py, with its
`_reduce_divergence_loss`), restated as the semantics the reference (reference.py) is written from:

* both logits are divided by `temperature` and normalised with a softmax over the vocabulary;
* beta = 0 gives the elements of KL(T || S), beta = 1 those of KL(S || T), and 0 < beta < 1
  beta * KL(T || M) + (1 - beta) * KL(S || M) with M = (1 - beta) S + beta T;
* top_k > 0 (below the vocabulary size) keeps a support: the teacher's top-k at beta = 0, the student's at beta = 1,
  else the teacher's then the student's with a repeated id as an empty slot; the full-vocabulary probabilities there
  either get a tail bucket 1 - sum p, with sum p capped at exp(-1e-7), or are renormalised;
* with labels, only the positions whose label is not -100 are kept, as rows (N, S); without, every position;
* `num_items_in_batch`, when given, wins over `reduction`: the sum divided by it (a scalar, even for "none");
* "batchmean" divides the sum by N with labels and by the first dimension (sequences) without; "sum"; "mean" over
  every element kept; "none" returns the kept elements.

The reference is reference.py's (shared with test_losses.py): float64 throughout, with explicit sums and supports
chosen row by row in Python; it never calls protege. TRL's masking and reductions are applied to its elements here.
protege must match it to a relative 1e-12 for float64 inputs (it computes in float64 there), and compute bf16 and fp16
inputs in float32. A few values computed once with TRL 1.8.0 itself are pinned as a check on the reference.
"""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch
from reference import F64, IGNORE, ref_rows, topk_support
from tiny import config, dataset

from protege import DistillationTrainer
from protege.losses import generalized_jsd_loss

REDUCTIONS = ["batchmean", "sum", "mean", "none"]
REL = 1e-12  # float64 in, float64 computed: only float64 round-off between protege and the reference


# ---------------------------------------------------------------------------------------------------------------------
# Reference: reference.py's float64 elements, with TRL's masking and reductions
# ---------------------------------------------------------------------------------------------------------------------


def ref_trl_loss(
    student_logits,
    teacher_logits,
    labels=None,
    *,
    beta=0.5,
    temperature=1.0,
    reduction="batchmean",
    top_k=0,
    add_tail=True,
    num_items_in_batch=None,
) -> torch.Tensor:
    """TRL's reductions of the reference's elements (..., S); a top_k of at least the vocabulary is the full one."""
    sparse = 0 < top_k < student_logits.shape[-1]
    support = topk_support(top_k, beta) if sparse else None
    elements = ref_rows(
        student_logits, teacher_logits, beta=beta, temperature=temperature, support=support, add_tail=add_tail
    )
    if labels is not None:
        elements = elements[labels != IGNORE]
    if num_items_in_batch is not None:
        return elements.sum() / float(num_items_in_batch)
    if reduction == "none":
        return elements
    if reduction == "sum":
        return elements.sum()
    if reduction == "mean":
        return elements.sum() / elements.numel()
    return elements.sum() / elements.shape[0]


# ---------------------------------------------------------------------------------------------------------------------
# Inputs and comparison
# ---------------------------------------------------------------------------------------------------------------------


def make_inputs(seed: int, dtype: torch.dtype = F64, vocab: int = 7):
    """(2, 3, vocab) student and teacher logits and labels with 4 of 6 positions kept: B = 2, T = 3 and N = 4 differ,
    so each denominator is told apart."""
    g = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(2, 3, vocab, generator=g, dtype=F64)).to(dtype)
    teacher = (2 * torch.randn(2, 3, vocab, generator=g, dtype=F64)).to(dtype)
    labels = torch.randint(vocab, (2, 3), generator=g)
    labels[0, 1] = labels[1, 0] = IGNORE
    return student, teacher, labels


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    """|actual - expected| <= rel * max|expected| element-wise: round-off relative to the tensor's scale."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().item() if expected.numel() else 0.0
    error = (actual.to(F64) - expected).abs().max().item() if expected.numel() else 0.0
    assert error <= rel * scale, (error, scale)


def check_value_and_gradient(kwargs: dict, student, teacher, labels, rel: float, seed: int = 0) -> torch.Tensor:
    """protege's static method against the reference: value, and the gradient of <output, random cotangent>."""
    leaf = student.detach().clone().requires_grad_(True)
    leaf64 = student.detach().to(F64).requires_grad_(True)
    out = DistillationTrainer.generalized_jsd_loss(leaf, teacher, labels, **kwargs)
    expected = ref_trl_loss(leaf64, teacher.to(F64), labels, **kwargs)
    assert_rel_close(out.detach(), expected.detach(), rel)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    (grad,) = torch.autograd.grad((out.to(F64) * cotangent).sum(), leaf)
    (expected_grad,) = torch.autograd.grad((expected * cotangent).sum(), leaf64)
    assert_rel_close(grad, expected_grad, rel)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The static method
# ---------------------------------------------------------------------------------------------------------------------


def test_static_method_has_trls_signature():
    assert isinstance(inspect.getattr_static(DistillationTrainer, "generalized_jsd_loss"), staticmethod)
    parameters = inspect.signature(DistillationTrainer.generalized_jsd_loss).parameters
    # TRL 1.8.0's parameters, in order, with their defaults; all positional-or-keyword
    assert [(p.name, p.default) for p in parameters.values()] == [
        ("student_logits", inspect.Parameter.empty),
        ("teacher_logits", inspect.Parameter.empty),
        ("labels", None),
        ("beta", 0.5),
        ("temperature", 1.0),
        ("reduction", "batchmean"),
        ("top_k", 0),
        ("add_tail", True),
        ("num_items_in_batch", None),
    ]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in parameters.values())


# num_items_in_batch wins over reduction, so it is checked under one reduction per form (int, tensor), "none" among them
REDUCTION_CASES = [(reduction, None) for reduction in REDUCTIONS] + [("batchmean", 7), ("none", torch.tensor(5))]


@pytest.mark.parametrize("top_k", [0, 2], ids=["full", "top2"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_float64_matches_reference_exactly(beta, temperature, top_k):
    """Each input once (the inputs depend on beta, temperature and top_k alone), under every option that changes the
    computation on it: the tail bucket or renormalisation (top-k), with and without labels, each reduction, and
    num_items_in_batch as an int and as a tensor."""
    student, teacher, labels = make_inputs(int(beta * 10 + temperature * 100 + top_k))
    tails = (True, False) if top_k else (True,)
    for add_tail, with_labels, (reduction, num_items_in_batch) in itertools.product(
        tails, (False, True), REDUCTION_CASES
    ):
        kwargs = dict(
            beta=beta,
            temperature=temperature,
            reduction=reduction,
            top_k=top_k,
            add_tail=add_tail,
            num_items_in_batch=num_items_in_batch,
        )
        out = check_value_and_gradient(kwargs, student, teacher, labels if with_labels else None, REL)
        assert out.dtype == F64, kwargs


@pytest.mark.parametrize("beta", [0.1, 0.9])
def test_interior_beta_with_top_k_union_matches_reference(beta):
    """The union support (teacher's then student's top-k) at betas near the endpoints, with and without labels."""
    student, teacher, labels = make_inputs(3, vocab=9)
    for with_labels, add_tail in [(False, True), (True, True), (True, False)]:
        kwargs = dict(beta=beta, temperature=0.5, reduction="sum", top_k=3, add_tail=add_tail)
        check_value_and_gradient(kwargs, student, teacher, labels if with_labels else None, REL)


def test_batchmean_without_labels_divides_by_sequences_not_tokens():
    """The issue's case: protege's own loss is a per-token mean, TRL's static method divides by the batch size, so on
    (2, 3, V) logits TRL's value is 3 (tokens per sequence) times protege's."""
    student, teacher, _ = make_inputs(11)
    trl = DistillationTrainer.generalized_jsd_loss(student, teacher)
    total = DistillationTrainer.generalized_jsd_loss(student, teacher, reduction="sum")
    torch.testing.assert_close(trl, total / 2, rtol=1e-15, atol=0)
    torch.testing.assert_close(trl, 3 * generalized_jsd_loss(student, teacher), rtol=1e-14, atol=0)


def test_none_with_labels_returns_the_kept_rows():
    student, teacher, labels = make_inputs(12)
    kept = DistillationTrainer.generalized_jsd_loss(student, teacher, labels, reduction="none")
    every = DistillationTrainer.generalized_jsd_loss(student, teacher, reduction="none")
    assert kept.shape == (4, 7) and every.shape == (2, 3, 7)
    torch.testing.assert_close(kept, every[labels != IGNORE], rtol=1e-14, atol=1e-16)
    tail = DistillationTrainer.generalized_jsd_loss(student, teacher, labels, reduction="none", top_k=2)
    assert tail.shape == (4, 5)  # at beta = 0.5 the teacher's 2 and the student's 2 slots, then the tail bucket


def test_num_items_in_batch_wins_over_every_reduction():
    student, teacher, labels = make_inputs(13)
    total = DistillationTrainer.generalized_jsd_loss(student, teacher, labels, reduction="sum")
    for reduction in REDUCTIONS:
        for n in (3, torch.tensor(3)):
            loss = DistillationTrainer.generalized_jsd_loss(
                student, teacher, labels, reduction=reduction, num_items_in_batch=n
            )
            assert loss.shape == ()
            torch.testing.assert_close(loss, total / 3, rtol=1e-15, atol=0)


def test_fully_masked_batch_gives_zero_where_trl_divides_zero_by_zero():
    """TRL gives 0 for "batchmean" (its denominator is clamped to 1) and NaN for "mean" (the mean of nothing); protege
    gives 0 for both, with a zero gradient, and an empty (0, V) tensor for "none"."""
    student, teacher, labels = make_inputs(14)
    labels = torch.full_like(labels, IGNORE)
    leaf = student.clone().requires_grad_(True)
    for reduction in ("batchmean", "sum", "mean"):
        loss = DistillationTrainer.generalized_jsd_loss(leaf, teacher, labels, reduction=reduction)
        assert loss == 0
        (grad,) = torch.autograd.grad(loss, leaf)
        assert (grad == 0).all()
    assert DistillationTrainer.generalized_jsd_loss(leaf, teacher, labels, reduction="none").shape == (0, 7)


# Computed once with TRL 1.8.0 (`DistillationTrainer.generalized_jsd_loss` of trl.experimental.distillation, torch
# 2.13.0, CPU) on the float64 inputs of `pinned_inputs`; printed with repr().
PINNED = [
    (dict(labels=False, beta=0.5, temperature=1.0, reduction="batchmean"), 0.9273296467322568),
    (dict(labels=True, beta=0.5, temperature=1.0, reduction="batchmean"), 0.32004721215803955),
    (dict(labels=False, beta=0.0, temperature=2.0, reduction="sum", top_k=2, add_tail=True), 3.0812659158174354),
    (dict(labels=True, beta=1.0, temperature=0.5, reduction="mean", top_k=2, add_tail=False), 1.4835869777017787),
    (dict(labels=True, beta=0.1, temperature=1.0, reduction="none", num_items_in_batch=4), 0.1305852124497596),
    (dict(labels=False, beta=0.9, temperature=1.0, reduction="sum", top_k=1, add_tail=True), 0.5860059585565968),
]
PINNED_NONE_SUM = 1.2801888486321582  # labels, beta 0.5, "none": shape (4, 5), this sum, and this first row
PINNED_NONE_ROW = [
    0.1841062657576593,
    0.09206520850599734,
    0.008007067332640016,
    0.0019372857490260213,
    0.065290366921151,
]


def pinned_inputs():
    """No random generator: the same numbers in any torch version."""
    x = torch.arange(30, dtype=F64).reshape(2, 3, 5)
    labels = torch.tensor([[4, IGNORE, 1], [IGNORE, 0, 2]])
    return 2 * torch.sin(1.7 * x), 3 * torch.cos(0.9 * x + 0.4), labels


@pytest.mark.parametrize(("case", "expected"), PINNED)
def test_values_computed_with_trl(case, expected):
    student, teacher, labels = pinned_inputs()
    case = dict(case)
    labels = labels if case.pop("labels") else None
    got = DistillationTrainer.generalized_jsd_loss(student, teacher, labels, **case)
    assert got.item() == pytest.approx(expected, rel=REL, abs=0)
    assert ref_trl_loss(student, teacher, labels, **case).item() == pytest.approx(expected, rel=REL, abs=0)


def test_none_values_computed_with_trl():
    student, teacher, labels = pinned_inputs()
    got = DistillationTrainer.generalized_jsd_loss(student, teacher, labels, beta=0.5, reduction="none")
    assert got.shape == (4, 5)
    assert got.sum().item() == pytest.approx(PINNED_NONE_SUM, rel=REL, abs=0)
    assert got[0].tolist() == pytest.approx(PINNED_NONE_ROW, rel=REL, abs=0)


def test_tail_floor_is_trls():
    """A teacher that gives its top-1 token more than 1 - 1e-7: the tail bucket takes TRL's floor, 1 - exp(-1e-7),
    exactly (a floor of 1e-7 on the tail itself was 2.6e-11 off here, relative). The value was computed once with
    TRL 1.8.0, as those of PINNED."""
    student, teacher = torch.zeros(1, 1, 6, dtype=F64), torch.zeros(1, 1, 6, dtype=F64)
    student[..., 0], teacher[..., 0] = 8.0, 22.0
    kwargs = dict(beta=0.0, reduction="sum", top_k=1, add_tail=True)
    got = DistillationTrainer.generalized_jsd_loss(student, teacher, None, **kwargs)
    assert got.item() == pytest.approx(0.0016749340380314039, rel=REL, abs=0)
    check_value_and_gradient(kwargs, student, teacher, None, REL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_half_precision_inputs_are_computed_in_float32(dtype, beta):
    """bf16 and fp16 logits are upcast (exactly) and computed in float32: the value is that of the float32 inputs,
    within float32 round-off of the float64 reference on the same rounded inputs, not within bf16's 2^-8 (TRL
    computes them in their own dtype). The gradient is the float32 one, rounded once to the logits' dtype."""
    student, teacher, labels = make_inputs(15, dtype)
    for reduction in REDUCTIONS:
        for lab in (None, labels):
            kwargs = dict(beta=beta, temperature=2.0, reduction=reduction, top_k=0)
            leaf = student.clone().requires_grad_(True)
            loss = DistillationTrainer.generalized_jsd_loss(leaf, teacher, lab, **kwargs)
            assert loss.dtype == torch.float32
            upcast = check_value_and_gradient(kwargs, student.float(), teacher, lab, rel=2e-6)
            assert torch.equal(loss, upcast)
            cotangent = torch.randn(loss.shape, generator=torch.Generator().manual_seed(0))
            (grad,) = torch.autograd.grad((loss * cotangent).sum(), leaf)
            leaf32 = student.float().requires_grad_(True)
            upcast = DistillationTrainer.generalized_jsd_loss(leaf32, teacher.float(), lab, **kwargs)
            (grad32,) = torch.autograd.grad((upcast * cotangent).sum(), leaf32)
            assert grad.dtype == dtype
            assert torch.equal(grad, grad32.to(dtype))


# ---------------------------------------------------------------------------------------------------------------------
# Attributes
# ---------------------------------------------------------------------------------------------------------------------


def test_trainer_sets_trls_attributes_from_args(tiny_paths, tmp_path):
    """TRL 1.8.0's __init__ copies these from args; callbacks and subclasses read them."""
    with pytest.warns(UserWarning, match="identical copies"):  # num_generations > 1 with lmbda < 1, as TRL allows
        args = config(
            tmp_path,
            lmbda=0.25,
            beta=0.3,
            temperature=0.7,
            top_p=0.8,
            num_generations=2,
            reverse_kl_top_1_mode="argmax",
            loss_top_k=1,
            loss_add_tail=False,
            log_completions=True,
            log_completions_steps=7,
            num_completions_to_print=2,
        )
    trainer = DistillationTrainer(
        model=tiny_paths["student"], teacher_model=tiny_paths["teacher"], args=args, train_dataset=dataset(8)
    )
    expected = {
        "lmbda": 0.25,
        "beta": 0.3,
        "temperature": 0.7,
        "top_p": 0.8,
        "num_generations": 2,
        "reverse_kl_top_1_mode": "argmax",
        "loss_top_k": 1,
        "loss_add_tail": False,
        "use_teacher_server": False,
        "teacher_model_server_url": None,
        "use_liger_loss": False,
        "use_vllm": False,
        "log_completions": True,
        "log_completions_steps": 7,
        "num_completions_to_print": 2,
    }
    assert {name: getattr(trainer, name) for name in expected} == expected
    assert trainer.generalized_jsd_loss is DistillationTrainer.generalized_jsd_loss
