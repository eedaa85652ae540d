"""real_scale's on-policy modes: each case trains exactly the completion length it names (a student that would stop
at once still samples N tokens), the modes set the objectives the docs compare, and the timing wrapper counts the
policy gradient's no-grad pass without changing what it returns. Fast: no benchmark run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import protege.objective
import protege.policy_gradient
from benchmarks.real_scale import MODES, on_policy_settings, timed_sampled_logprobs
from benchmarks.workers import trainer_config
from protege import DistillationConfig
from protege.outputs import StudentLogits, TeacherLogits
from protege.policy_gradient import PolicyGradient
from protege.rollout import generation_config, model_generate
from protege.toy import tiny_model

VOCAB, EOS, PAD, N = 32, 3, 0, 12


def mode_config(tmp_path, mode: str) -> DistillationConfig:
    """The worker's settings for `mode`: the shared job, then the on-policy settings, then the mode's own."""
    run = SimpleNamespace(
        batch=2, grad_accum=1, warmup=0, steps=1, learning_rate=1e-6, max_length=16 + N + 16, max_completion_length=N
    )
    run.__dict__.update(lmbda=0.0, beta=0.5, loss_top_k=0, temperature=1.0, top_p=0.95, seed=0, threads=1)
    shared = trainer_config(run, str(tmp_path))
    if MODES[mode].library_defaults:
        shared.pop("loss_top_k")
    return DistillationConfig(**{**shared, **on_policy_settings(N), **MODES[mode].config})


def eager_to_stop() -> torch.nn.Module:
    """A tiny student whose every next token is EOS (a zero hidden state, an LM head biased to EOS)."""
    model = tiny_model(VOCAB, layers=1, hidden=16, heads=2, eos_token_id=EOS, pad_token_id=PAD)
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(VOCAB).index_fill_(0, torch.tensor([EOS]), 50.0))
    return model


@pytest.mark.parametrize("mode", ["onpolicy-divergence", "onpolicy-divergence-full", "onpolicy-pg"])
def test_an_on_policy_case_samples_exactly_n_tokens_from_a_student_that_would_stop_at_once(tmp_path, mode):
    args = mode_config(tmp_path, mode)
    assert (args.lmbda, args.temperature, args.top_p, args.beta) == (1.0, 1.0, 1.0, 1.0)
    model, tokenizer = eager_to_stop(), SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD)
    prompts = torch.randint(4, VOCAB, (2, 16))
    recording = args.on_policy_objective == "policy_gradient"

    def sample(settings: DistillationConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
        config, eos_ids = generation_config(settings, model, tokenizer, [])
        assert eos_ids == [EOS]
        return model_generate(model, config, 0, recording)(prompts, torch.ones_like(prompts))

    tokens, logprobs = sample(args)
    assert tokens.shape == (2, N) and not (tokens == EOS).any()
    assert (logprobs is not None) == recording
    args.generation_kwargs = None  # the same student, without the case's min_new_tokens: every row ends at once
    tokens, _ = sample(args)
    assert (tokens[:, 0] == EOS).all()


def test_the_modes_compare_reverse_kl_at_the_defaults_the_full_vocabulary_and_the_policy_gradient(tmp_path):
    divergence, full, pg = (
        mode_config(tmp_path, m) for m in ("onpolicy-divergence", "onpolicy-divergence-full", "onpolicy-pg")
    )

    def settings(args: DistillationConfig) -> tuple:
        return args.on_policy_objective, args.loss_top_k, args.loss_chunk_size, args.kl_coef, args.kl_discount_factor

    assert settings(divergence) == ("divergence", 1, "auto", 1.0, 0.0)  # protege's defaults: reverse KL, top-1
    assert settings(full) == ("divergence", 0, "auto", 1.0, 0.0)
    assert settings(pg) == ("policy_gradient", 1, "auto", 1.0, 0.0)
    assert not any(MODES[m].on_policy for m in ("local-default", "local-dense", "server-top1", "trl-dense"))


def test_the_timer_counts_the_policy_gradients_pass_and_leaves_its_loss_unchanged(monkeypatch):
    for module in (protege.policy_gradient, protege.objective):  # restored after the test
        monkeypatch.setattr(module, "sampled_logprobs", module.sampled_logprobs)
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, 5, VOCAB, generator=generator)
    teacher, labels = (
        torch.randn(2, 5, VOCAB, generator=generator),
        torch.randint(0, VOCAB, (2, 5), generator=generator),
    )
    before, _ = PolicyGradient().loss_sum(StudentLogits(student), TeacherLogits(teacher), labels)
    seconds = timed_sampled_logprobs()
    after, _ = PolicyGradient().loss_sum(StudentLogits(student), TeacherLogits(teacher), labels)
    assert torch.equal(before, after)
    assert seconds["pg_logprob_s"] > 0 and seconds["kl_estimate_s"] == 0
    protege.objective.sampled_log_ratio_sum(StudentLogits(student), TeacherLogits(teacher), labels, 1.0)
    assert seconds["kl_estimate_s"] > 0
