"""What the trainer logs means the same in every mode: the sampled-token reverse-KL estimate, and the description of
'loss' it logs at start."""

from __future__ import annotations

import logging

import pytest
import torch
from tiny import config, dataset, logged

from protege import DistillationTrainer
from protege.objective import (
    Objective,
    StudentHidden,
    StudentLogits,
    TeacherHidden,
    TeacherLogits,
    TeacherScores,
    sampled_log_ratio_sum,
)


def test_sampled_log_ratio_is_the_same_from_every_view():
    generator = torch.Generator().manual_seed(0)
    hidden_s, hidden_t = torch.randn(2, 5, 8, generator=generator), torch.randn(2, 5, 12, generator=generator)
    weight_s, weight_t = torch.randn(11, 8, generator=generator), torch.randn(11, 12, generator=generator)
    labels = torch.randint(0, 11, (2, 5), generator=generator)
    labels[1, 3:] = -100
    temperature = 0.7
    logits_s, logits_t = hidden_s @ weight_s.T, hidden_t @ weight_t.T
    mask = labels != -100
    logp_s = torch.log_softmax(logits_s.double() / temperature, -1)
    logp_t = torch.log_softmax(logits_t.double() / temperature, -1)
    targets = labels.clamp(min=0)[..., None]
    expected = (logp_s.gather(-1, targets) - logp_t.gather(-1, targets)).squeeze(-1)[mask].sum().item()

    scores = TeacherScores(
        torch.zeros(2, 5, 1, dtype=torch.long), torch.zeros(2, 5, 1), logp_t.gather(-1, targets)[..., 0]
    )
    views = [
        (StudentLogits(logits_s), TeacherLogits(logits_t)),
        (StudentHidden(hidden_s, weight_s, None), TeacherHidden(hidden_t, weight_t, None)),
        (StudentHidden(hidden_s, weight_s, None), scores),
    ]
    for student, teacher in views:
        got = sampled_log_ratio_sum(student, teacher, labels, temperature, chunk_tokens=3)
        assert got == pytest.approx(expected, rel=1e-5), (type(student).__name__, type(teacher).__name__)


def test_mean_over_student_samples_estimates_the_reverse_kl():
    student_logits, teacher_logits = torch.tensor([2.0, 1.0, 0.0, -1.0]), torch.tensor([0.0, 1.5, 0.5, -2.0])
    p, q = torch.softmax(student_logits.double(), -1), torch.softmax(teacher_logits.double(), -1)
    reverse_kl = (p * (p / q).log()).sum().item()
    samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    estimate = sampled_log_ratio_sum(
        StudentLogits(student_logits.expand(1, len(samples), 4)),
        TeacherLogits(teacher_logits.expand(1, len(samples), 4)),
        samples[None],
        1.0,
    ) / len(samples)
    assert estimate == pytest.approx(reverse_kl, abs=0.01)  # 200,000 samples: standard error about 0.002


def test_describe_says_what_loss_is():
    sparse = Objective(beta=0.5, top_k=1).describe()
    assert sparse.startswith("'loss' is the generalized JSD (beta=0.5) on a sparse support")
    assert "far smaller than the full divergence" in sparse
    assert (
        Objective(beta=0.0, top_k=0)
        .describe()
        .startswith("'loss' is the forward KL(teacher || student) over the full vocabulary, at temperature 1")
    )
    assert "top-5 tokens plus the tail's mass" in Objective(beta=1.0, top_k=5).describe()


def first_step_logs(tiny_paths, tmp_path, **overrides) -> dict:
    trainer = DistillationTrainer(
        model=tiny_paths["student"],
        teacher_model=None if overrides.get("use_teacher_server") else tiny_paths["teacher"],
        args=config(tmp_path, lmbda=1.0, max_steps=1, **overrides),
        train_dataset=dataset(32),
    )
    trainer.train()
    return {key: logged(trainer, key)[0] for key in ("loss", "on_policy_reverse_kl_estimate")}


@pytest.mark.slow
def test_estimate_is_logged_alike_by_every_objective_and_teacher(tiny_paths, tmp_path, teacher_url, caplog):
    """The first step samples the same completions in every run (seeded per step), so the estimate is equal whatever
    the loss, while the losses differ."""
    with caplog.at_level(logging.INFO, logger="protege"):
        dense = first_step_logs(tiny_paths, tmp_path / "dense", loss_top_k=0, beta=0.5)
    assert any("'loss' is the generalized JSD (beta=0.5) over the full vocabulary" in r.message for r in caplog.records)
    chunked = first_step_logs(tiny_paths, tmp_path / "chunked", loss_top_k=0, beta=1.0, loss_chunk_size=7)
    sparse = first_step_logs(tiny_paths, tmp_path / "sparse", loss_top_k=1, beta=0.5)
    server = first_step_logs(
        tiny_paths,
        tmp_path / "server",
        loss_top_k=1,
        beta=0.5,
        use_teacher_server=True,
        teacher_model_server_url=teacher_url,
        teacher_server_response_format="binary",
    )
    estimate = dense["on_policy_reverse_kl_estimate"]
    assert estimate > 0.1  # the tiny teacher is far from the student
    assert chunked["on_policy_reverse_kl_estimate"] == pytest.approx(estimate, rel=1e-4)
    assert sparse["on_policy_reverse_kl_estimate"] == pytest.approx(estimate, rel=1e-4)
    assert server["on_policy_reverse_kl_estimate"] == pytest.approx(estimate, rel=1e-4)
    assert abs(sparse["loss"] - dense["loss"]) > 0.1  # the losses are different quantities; the estimate is not


def test_time_logs_are_per_optimizer_step_for_generation_teacher_and_student():
    """Two steps of 4 gradient-accumulation slices each: the student's and the teacher's seconds add over slices and
    are divided by steps, as generation's (one call a step) are averaged over steps."""
    from protege.metrics import TrainingWindow

    window = TrainingWindow()
    for _ in range(2):
        window.generation_seconds.append(1.5)
        window.teacher_seconds += 0.5
        for _ in range(4):
            window.student_seconds += 0.25
    logs = window.logs(lambda sums: sums)
    assert logs["time/generation_s"] == 1.5
    assert logs["time/teacher_s"] == 0.5
    assert logs["time/student_s"] == 1.0  # 4 slices x 0.25 s, per step (was the per-slice mean, 0.25)


def test_evaluation_adds_no_teacher_time_to_the_training_window(tiny_paths, tmp_path):
    """An evaluation between logs calls the teacher too; its seconds are not training time, so `time/teacher_s` of
    the next log does not count them."""
    trainer = DistillationTrainer(
        model=tiny_paths["student"],
        teacher_model=tiny_paths["teacher"],
        args=config(tmp_path, lmbda=0.0, max_steps=1),
        train_dataset=dataset(8),
        eval_dataset=dataset(8),
    )
    teacher_calls = []
    trainer.teacher_model.register_forward_hook(lambda *_: teacher_calls.append(1))
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0 and len(teacher_calls) >= 1
    assert trainer._window.teacher_seconds == 0.0


def test_a_window_without_generation_logs_no_generation_time():
    """Off-policy steps generate nothing: `time/generation_s` is left out rather than logged as a few microseconds."""
    from protege.metrics import TrainingWindow

    off, mixed = TrainingWindow(), TrainingWindow()
    for window, fractions in ((off, [0.0, 0.0]), (mixed, [0.0, 0.5])):
        for fraction in fractions:
            window.on_policy_fraction.append(fraction)
            window.generation_seconds.append(2e-6 if fraction == 0 else 1.0)
    assert "time/generation_s" not in off.logs(lambda sums: sums)
    assert mixed.logs(lambda sums: sums)["time/generation_s"] == pytest.approx(0.500001)


def test_the_opening_line_reaches_a_library_user_and_promises_the_estimate_only_on_policy():
    """Without any logging set-up (a script that imports protege), the line that says what `loss` is goes to stderr;
    with lmbda 0 no reverse-KL estimate is logged, so the line does not mention one."""
    import subprocess
    import sys

    script = "from protege.progress import announce; announce('what loss is')"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.stderr == "protege: what loss is\n"
    assert "on_policy_reverse_kl_estimate" not in Objective(beta=0.0).describe(on_policy=False)
    assert "logged for steps with on-policy slices" in Objective(beta=0.0).describe(on_policy=True)
    assert "the student's top-5 tokens" in Objective(beta=1.0, top_k=5).describe()
