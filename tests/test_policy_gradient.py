"""The policy-gradient objective (issue 28): its gradient is the reverse KL's in expectation, the importance weight
of the sampler and its cap, the discounted teacher term, the group baseline, and the trainer running it (with
rewards, without a teacher, invariant to gradient accumulation, with the sampler's log-probs recorded)."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import config, dataset, length_reward, logged

from protege import DistillationConfig, DistillationTrainer
from protege.chunked import GEMM_ROWS
from protege.outputs import StudentHidden, StudentLogits, TeacherHidden, TeacherLogits, TeacherScores
from protege.policy_gradient import PolicyGradient, discounted_sums, group_advantages, sampled_logprobs
from protege.rollout import SampledLogprobs, model_generate

VOCAB = 6


def one_position(samples: int, seed: int = 0):
    """A student's logits (a leaf to differentiate) and a teacher's at one position, and `samples` tokens drawn
    from the student, as one-token rows."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(VOCAB, generator=generator, dtype=torch.float64).requires_grad_()
    teacher = 2 * torch.randn(VOCAB, generator=generator, dtype=torch.float64)
    tokens = torch.multinomial(student.detach().softmax(-1), samples, replacement=True, generator=generator)
    return student, teacher, tokens[:, None]


def test_the_gradient_is_the_reverse_kl_gradient_in_expectation():
    samples = 40_000
    student, teacher, labels = one_position(samples)
    rows = student.expand(samples, 1, VOCAB)
    sampler = student.detach().log_softmax(-1)[labels]  # the student sampled: rho = 1
    loss, figures = PolicyGradient().loss_sum(
        StudentLogits(rows), TeacherLogits(teacher.expand(samples, 1, VOCAB)), labels, sampler
    )
    (estimate,) = torch.autograd.grad(loss / samples, student)

    log_p, log_q = student.log_softmax(-1), teacher.log_softmax(-1)
    (exact,) = torch.autograd.grad((log_p.exp() * (log_p - log_q)).sum(), student)
    # Each sample's gradient is (log p - log q)(x) (onehot(x) - p); the mean's error is its std / sqrt(n).
    p = log_p.detach().exp()
    per_sample = (log_p - log_q).detach()[labels[:, 0], None] * (torch.eye(VOCAB)[labels[:, 0]] - p)
    tolerance = 5 * per_sample.std(0) / math.sqrt(samples)
    assert (estimate - exact).abs().le(tolerance).all(), (estimate, exact, tolerance)
    assert exact.abs().max() > 8 * tolerance.max()  # a gradient far above the noise, so a wrong sign would show
    assert figures.tokens == samples and figures.rho_sum == pytest.approx(samples) and figures.truncated == 0
    reverse_kl = (p * (log_p - log_q).detach()).sum().item()
    assert figures.teacher_advantage_sum / samples == pytest.approx(-reverse_kl, abs=0.05)


def test_rho_weights_the_gradient_and_is_cut_at_the_cap():
    student, teacher, labels = one_position(64, seed=1)
    rows, teacher_rows = StudentLogits(student.expand(64, 1, VOCAB)), TeacherLogits(teacher.expand(64, 1, VOCAB))
    own = student.detach().log_softmax(-1)[labels]

    def gradient(sampler, cap):
        loss, figures = PolicyGradient(cap=cap).loss_sum(rows, teacher_rows, labels, sampler)
        return torch.autograd.grad(loss, student)[0], figures

    plain, _ = gradient(own, cap=10.0)
    thrice, figures = gradient(own - math.log(3), cap=10.0)  # a sampler 3x less likely to pick each token
    torch.testing.assert_close(thrice, 3 * plain)
    assert figures.rho_max == pytest.approx(3) and figures.truncated == 0
    capped, figures = gradient(own - math.log(3), cap=2.0)
    torch.testing.assert_close(capped, 2 * plain)
    assert figures.rho_max == pytest.approx(3) and figures.truncated == 64  # reported before the cut
    mixed = own - torch.where(torch.arange(64)[:, None] % 2 == 0, math.log(3), 0.0)  # half the rows above the cap
    _, figures = gradient(mixed, cap=2.0)
    assert figures.truncated == 32 and figures.rho_sum == pytest.approx(32 * 3 + 32)


def test_discounted_sums_add_the_later_terms():
    values = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(discounted_sums(values, 0.0), values)
    expected = torch.tensor([[1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(discounted_sums(values, 0.5), expected)
    torch.testing.assert_close(discounted_sums(values, 1.0)[0], torch.tensor([6.0, 5.0, 3.0, 0.0]))


def test_a_discount_of_one_gives_the_sequence_reverse_kl_gradient():
    """Two-token sequences from a student whose second token's logits depend on the first: with gamma 1 each
    token's advantage holds the whole rest of the sequence, and the estimate is the gradient of KL over sequences."""
    generator = torch.Generator().manual_seed(3)
    first = torch.randn(3, generator=generator, dtype=torch.float64).requires_grad_()
    second = torch.randn(3, 3, generator=generator, dtype=torch.float64).requires_grad_()  # row: the first token
    teacher_first, teacher_second = torch.randn(3, generator=generator), torch.randn(3, 3, generator=generator)
    samples = 60_000
    x1 = torch.multinomial(first.detach().softmax(-1), samples, replacement=True, generator=generator)
    x2 = torch.multinomial(second.detach()[x1].softmax(-1), 1, generator=generator)[:, 0]
    student_rows = torch.stack([first.expand(samples, 3), second[x1]], dim=1)
    teacher_rows = torch.stack([teacher_first.double().expand(samples, 3), teacher_second.double()[x1]], dim=1)
    labels = torch.stack([x1, x2], dim=1)
    loss, _ = PolicyGradient(discount=1.0).loss_sum(StudentLogits(student_rows), TeacherLogits(teacher_rows), labels)
    estimate = torch.autograd.grad(loss / samples, (first, second))

    lp1, lq1 = first.log_softmax(-1), teacher_first.double().log_softmax(-1)
    lp2, lq2 = second.log_softmax(-1), teacher_second.double().log_softmax(-1)
    joint = lp1[:, None] + lp2  # log p(x1, x2)
    kl = (joint.exp() * (joint - lq1[:, None] - lq2)).sum()
    exact = torch.autograd.grad(kl, (first, second))
    for got, want in zip(estimate, exact):
        torch.testing.assert_close(got, want, atol=0.05, rtol=0)
    assert max(w.abs().max() for w in exact) > 0.3


def test_the_chunked_student_gives_the_dense_loss_and_gradient():
    torch.manual_seed(0)
    hidden, weight = torch.randn(3, 5, 8, dtype=torch.float64), torch.randn(VOCAB, 8, dtype=torch.float64)
    weight.requires_grad_()
    teacher = torch.randn(3, 5, VOCAB, dtype=torch.float64)
    labels = torch.randint(VOCAB, (3, 5))
    labels[2, 3:] = -100
    sampler = torch.randn(3, 5, dtype=torch.float64) - 2
    advantage = torch.tensor([0.5, -1.0, 2.0])
    losses = []
    for student, chunk in ((StudentLogits(hidden @ weight.T), None), (StudentHidden(hidden, weight, None), 4)):
        pg = PolicyGradient(kl_coef=0.7, discount=0.5, cap=1.5, chunk_size=chunk)
        loss, _ = pg.loss_sum(student, TeacherLogits(teacher), labels, sampler, advantage)
        losses.append((loss, torch.autograd.grad(loss, weight)[0]))
    torch.testing.assert_close(losses[1][0], losses[0][0])
    torch.testing.assert_close(losses[1][1], losses[0][1])


def test_a_teacher_server_needs_to_send_only_the_sampled_tokens_log_prob():
    torch.manual_seed(1)
    student, teacher = torch.randn(2, 4, VOCAB, dtype=torch.float64), torch.randn(2, 4, VOCAB, dtype=torch.float64)
    labels = torch.randint(VOCAB, (2, 4))
    token_logprobs = teacher.log_softmax(-1).gather(-1, labels[..., None])[..., 0]
    scores = TeacherScores(torch.zeros(2, 4, 1, dtype=torch.long), torch.zeros(2, 4, 1), token_logprobs)
    from_logits, _ = PolicyGradient().loss_sum(StudentLogits(student), TeacherLogits(teacher), labels)
    from_scores, _ = PolicyGradient().loss_sum(StudentLogits(student), scores, labels)
    torch.testing.assert_close(from_scores, from_logits)


def test_group_advantages_centre_on_each_prompts_group():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 3.0])
    torch.testing.assert_close(
        group_advantages(rewards, torch.tensor([7, 7, 9, 9, 4]), scale=False),
        torch.tensor([0.5, -0.5, 0.0, 0.0, 0.0], dtype=torch.float64),
    )
    torch.testing.assert_close(group_advantages(rewards, None, scale=False), (rewards - 1.2).double())
    scaled = group_advantages(rewards[:2], torch.tensor([7, 7]), scale=True)
    torch.testing.assert_close(scaled, torch.tensor([0.5, -0.5], dtype=torch.float64) / (math.sqrt(0.5) + 1e-4))


# ----- The sampler's log-probs -----


def test_generate_records_the_log_probs_of_the_distribution_it_sampled(tiny_paths):
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_paths["student"]).eval()
    prompt = torch.tensor([[5, 9, 12, 7], [0, 0, 3, 8]])
    mask = (torch.arange(4) >= torch.tensor([[0], [2]])).long()
    for temperature, top_k in ((0.7, 0), (1.3, 20)):
        sampling = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=temperature, top_k=top_k, top_p=1.0)
        plain, _ = model_generate(model, sampling, seed=4)(prompt, mask)
        tokens, logprobs = model_generate(model, sampling, seed=4, record_logprobs=True)(prompt, mask)
        assert torch.equal(tokens, plain)  # recording does not change what is drawn
        sequence = torch.cat([prompt, tokens], 1)
        full_mask = torch.cat([mask, torch.ones_like(tokens)], 1)
        with torch.no_grad():
            logits = model(sequence, attention_mask=full_mask, position_ids=(full_mask.cumsum(1) - 1).clamp(min=0))
        scaled = logits.logits[:, 3:-1].double() / temperature
        if top_k:
            kth = scaled.topk(top_k, dim=-1).values[..., -1:]
            scaled = scaled.masked_fill(scaled < kth, -math.inf)
        want = scaled.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
        torch.testing.assert_close(logprobs.double(), want, atol=2e-5, rtol=0)


# ----- The trainer -----


def pg_config(tmp_path, **overrides) -> DistillationConfig:
    return config(tmp_path, on_policy_objective="policy_gradient", top_p=1.0, **overrides)


def test_rho_is_one_when_the_student_sampled_with_its_own_distribution(tiny_paths, tmp_path, monkeypatch):
    import protege.objective
    import protege.policy_gradient

    passes = {"loss": 0, "metric": 0}  # the sampled tokens' log-probs, taken once a route: by the loss, not again

    def counted(name, function):
        def wrapper(*args, **kwargs):
            passes[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(
        protege.policy_gradient, "sampled_logprobs", counted("loss", protege.policy_gradient.sampled_logprobs)
    )
    monkeypatch.setattr(protege.objective, "sampled_logprobs", counted("metric", protege.objective.sampled_logprobs))
    trainer = DistillationTrainer(
        model=tiny_paths["student"],
        teacher_model=tiny_paths["teacher"],
        args=pg_config(tmp_path, max_steps=2),
        train_dataset=dataset(16),
    )
    trainer.train()
    said = trainer._describe_loss()  # what train() announces
    assert "on-policy slices train by policy gradient" in said and "A = 1 x the teacher's log-ratio" in said
    assert logged(trainer, "pg/rho_mean") == pytest.approx([1.0, 1.0], abs=1e-5)
    assert logged(trainer, "pg/rho_max") == pytest.approx([1.0, 1.0], abs=1e-5)
    assert logged(trainer, "pg/rho_truncated_fraction") == [0.0, 0.0]
    # The teacher's advantage is minus the sampled-token reverse-KL estimate logged beside it, on the same tokens.
    estimates = logged(trainer, "on_policy_reverse_kl_estimate")
    assert len(estimates) == 2
    assert logged(trainer, "pg/teacher_advantage_mean") == pytest.approx([-e for e in estimates], abs=1e-5)
    assert passes["loss"] >= 2 and passes["metric"] == 0, passes

    nucleus = DistillationTrainer(
        model=tiny_paths["student"],
        teacher_model=tiny_paths["teacher"],
        args=config(tmp_path / "p", on_policy_objective="policy_gradient", top_p=0.5, max_steps=1),
        train_dataset=dataset(16),
    )
    nucleus.train()  # a top-p sampler gives each token its nucleus' share: rho is the nucleus' mass, at most 1
    assert 0.5 <= logged(nucleus, "pg/rho_mean")[0] < 0.999 and logged(nucleus, "pg/rho_max")[0] <= 1.0 + 1e-6


def test_the_update_does_not_depend_on_gradient_accumulation(tiny_paths, tmp_path):
    from test_trainer import one_sgd_step

    policy = dict(lmbda=1.0, on_policy_objective="policy_gradient", top_p=1.0, kl_discount_factor=0.5)
    policy |= dict(reward_funcs=[length_reward], train=dataset(16))
    whole, sliced = (
        one_sgd_step(tiny_paths, tmp_path, 8, 1, **policy),
        one_sgd_step(tiny_paths, tmp_path, 2, 4, **policy),
    )
    assert max(v.abs().max().item() for v in whole.values()) > 1e-3
    for name, delta in whole.items():
        torch.testing.assert_close(sliced[name], delta, rtol=1e-4, atol=1e-6, msg=name)


def test_rewards_alone_train_without_a_teacher(tiny_paths, tmp_path):
    seen = []

    def spy(prompts, completions, completion_ids, trainer_state, answer, **columns):
        seen.append((prompts, completions, completion_ids, answer, trainer_state.global_step, columns))
        return length_reward(prompts, completions, completion_ids)

    rows = dataset(16).map(lambda row, i: {"answer": i}, with_indices=True)
    args = pg_config(tmp_path, kl_coef=0.0, num_generations=2, max_steps=3, reward_weights=[2.0])
    trainer = DistillationTrainer(model=tiny_paths["student"], args=args, train_dataset=rows, reward_funcs=spy)
    assert trainer.teacher_model is None and trainer.teacher.returns == "none"
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    assert max((v - start[k]).abs().max().item() for k, v in trainer.model.state_dict().items()) > 1e-4
    assert [step for *_, step, _ in seen] == [0, 1, 2]
    prompts, completions, completion_ids, answers, _, columns = seen[0]
    assert len(prompts) == len(completions) == len(completion_ids) == 4  # 2 slices of 2, generated in one call
    assert answers[0] == answers[1] and answers[2] == answers[3]  # num_generations 2: each prompt twice in a row
    assert prompts[0] == rows[answers[0]]["messages"][:-1]  # the dataset's own prompt, as TRL passes it
    assert completions[0][0]["role"] == "assistant"  # a conversational prompt gets its completion as a message
    assert (
        "messages" in columns
        and trainer.processing_class.decode(completion_ids[0], skip_special_tokens=True)
        == (completions[0][0]["content"])
    )
    means, totals = logged(trainer, "reward/spy/mean"), logged(trainer, "reward/mean")
    assert len(means) == 3 and totals == pytest.approx([2 * m for m in means], abs=1e-5)  # weighted by reward_weights
    assert not logged(trainer, "pg/teacher_advantage_mean") or logged(trainer, "pg/teacher_advantage_mean") == [0.0] * 3


def test_bad_rewards_name_the_function_and_the_row(tiny_paths, tmp_path):
    rows = dataset(8).map(lambda row, i: {"answer": i}, with_indices=True)

    def fails_on_row_5(prompts, completions, completion_ids, answer, **_):
        if 5 in answer:
            raise KeyError("no such answer")
        return [0.0] * len(answer)

    def short(prompts, **_):
        return [0.0]

    def not_a_number(prompts, answer, **_):
        return [math.nan if a == 2 else 0.0 for a in answer]

    expected = {
        fails_on_row_5: r"reward function 'fails_on_row_5' raised on dataset row 5: KeyError: 'no such answer'",
        short: r"reward function 'short' returned 1 values for 8 completions",
        not_a_number: r"reward function 'not_a_number' returned nan for dataset row 2",
    }
    for func, message in expected.items():
        args = pg_config(tmp_path, kl_coef=0.0, max_steps=1, per_device_train_batch_size=4)
        trainer = DistillationTrainer(model=tiny_paths["student"], args=args, train_dataset=rows, reward_funcs=[func])
        with pytest.raises(ValueError, match=message):
            trainer.train()


def test_settings_the_policy_gradient_cannot_run_with_are_refused():
    with pytest.warns(UserWarning, match="lmbda=0: no slice is on-policy, so it never applies"):
        DistillationConfig(output_dir="/tmp/x", on_policy_objective="policy_gradient", lmbda=0.0)
    refused = {
        "on_policy_objective='pg' is not allowed": dict(on_policy_objective="pg"),
        "kl_coef=-1.0 is not allowed": dict(on_policy_objective="policy_gradient", kl_coef=-1.0),
        "kl_discount_factor=1.5 is not allowed": dict(kl_discount_factor=1.5),
        "importance_sampling_cap=0 is not allowed": dict(importance_sampling_cap=0),
        "reward_funcs=.* set on_policy_objective='policy_gradient'": dict(reward_funcs=["tiny:x"]),
        "reward_weights=.* one weight per reward function": dict(
            on_policy_objective="policy_gradient", reward_funcs=["tiny:x"], reward_weights=[1.0, 2.0]
        ),
        "use_uld_loss=True is not allowed: the policy-gradient": dict(
            on_policy_objective="policy_gradient", use_uld_loss=True
        ),
    }
    for message, settings in refused.items():
        with pytest.raises(ValueError, match=message):
            DistillationConfig(output_dir="/tmp/x", **settings)


def test_rewards_alone_need_no_teacher_but_anything_else_does(tiny_paths, tmp_path):
    with pytest.raises(ValueError, match="no teacher"):
        DistillationTrainer(model=tiny_paths["student"], args=pg_config(tmp_path), train_dataset=dataset(8))
    with pytest.raises(ValueError, match="eval_dataset: evaluation measures the divergence to a teacher"):
        DistillationTrainer(
            model=tiny_paths["student"],
            args=pg_config(tmp_path, kl_coef=0.0),
            train_dataset=dataset(8),
            eval_dataset=dataset(4),
            reward_funcs=length_reward,
        )


@pytest.mark.slow
def test_the_command_line_trains_on_rewards_alone_from_a_module_in_the_working_directory(tiny_paths, tmp_path):
    from test_cli import common, protege

    (tmp_path / "my_rewards.py").write_text(
        "def short(prompts, completions, completion_ids, **_):\n    return [-len(ids) / 8 for ids in completion_ids]\n"
    )
    data = tmp_path / "rows.jsonl"
    dataset(8).to_json(str(data))
    argv = common(tiny_paths, str(data), tmp_path / "out")
    position = argv.index("--teacher_model_name_or_path")
    del argv[position : position + 2]  # rewards alone: no teacher
    argv += ["--on_policy_objective", "policy_gradient", "--kl_coef", "0", "--reward_funcs", "my_rewards:short"]
    argv += ["--max_steps", "1", "--lmbda", "1", "--logging_steps", "1", "--save_strategy", "no"]
    result = protege("train", *argv, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert "step 1: loss " in result.stdout and "  reward -" in result.stdout  # the progress line shows the reward


@pytest.mark.slow
def test_the_policy_gradient_example_runs(tmp_path):
    from tiny import run_example

    stdout = run_example("policy_gradient.py", tmp_path / "out")
    lines = [line for line in stdout.splitlines() if line.startswith("step ") and "teacher advantage" in line]
    assert [line.split(":")[0] for line in lines] == ["step 2", "step 4"]
    assert all(float(line.rpartition("rho ")[2]) <= 1.0 for line in lines)  # top_p 0.95: rho is the nucleus' mass


def test_a_teacher_server_is_asked_for_one_log_prob_when_only_sampled_tokens_are_read():
    from protege.objective import Objective

    def asked(**settings) -> int:
        args = DistillationConfig(output_dir="/tmp/x", on_policy_objective="policy_gradient", loss_top_k=50, **settings)
        return Objective.from_config(args).server_top_k

    assert asked(lmbda=1.0) == 1  # the smallest request: a stock server's --max-logprobs never refuses it
    assert asked(lmbda=0.5, beta=0.0) == 50  # off-policy slices still take the divergence's top-k


@pytest.mark.parametrize("capacity", [5, None])
def test_the_recorded_log_probs_fill_one_buffer_not_a_tensor_a_step(capacity):
    """A small tensor kept per sampled token pinned each step's freed (B, V) block in glibc's heap, which grew by a
    block a step (GiBs at 2 x 4,000 tokens, vocabulary 151,936); the recorder now writes into one buffer, grown only
    past `max_new_tokens` (which `generate` does not pass)."""
    generator = torch.Generator().manual_seed(0)
    scores = [torch.randn(2, VOCAB, generator=generator) for _ in range(5)]
    tokens = torch.randint(0, VOCAB, (2, 5), generator=generator)
    recorder, ids, buffers = SampledLogprobs(capacity), torch.zeros(2, 3, dtype=torch.long), set()
    for step, step_scores in enumerate(scores):
        assert recorder(ids, step_scores) is step_scores
        ids = torch.cat([ids, tokens[:, step : step + 1]], dim=1)
        if recorder.values is not None:
            buffers.add(recorder.values.data_ptr())
    expected = torch.stack([s.log_softmax(-1).gather(1, tokens[:, [i]]).squeeze(1) for i, s in enumerate(scores)], 1)
    assert torch.allclose(recorder.finish(tokens), expected)
    assert len(buffers) == (1 if capacity else 3)  # capacity 1 grown to 2 and 4 over the first four steps
    assert SampledLogprobs(4).finish(tokens[:, :0]).shape == (2, 0)


@pytest.mark.parametrize("chunk", [5, GEMM_ROWS + 1])
def test_sampled_logprobs_over_several_head_products_equal_full_logits(chunk):
    """Rows past one head product (GEMM_ROWS), a teacher given by hidden states or by logits: each trained token's
    log-probs, in row order, are those of the full logits."""
    generator = torch.Generator().manual_seed(3)
    rows, width, vocab = 2, GEMM_ROWS + 20, 30
    hidden, weight = torch.randn(rows, width, 8, generator=generator), torch.randn(vocab, 8, generator=generator)
    teacher_hidden, teacher_weight = torch.randn(rows, width, 6, generator=generator), torch.randn(vocab, 6)
    teacher_bias = torch.randn(vocab, generator=generator)
    labels = torch.randint(vocab, (rows, width), generator=generator)
    labels[1, 100:] = -100
    mask = labels != -100
    teacher_logits = teacher_hidden @ teacher_weight.T + teacher_bias

    def expected(logits):
        return (logits / 0.7).log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)[mask].double()

    student = StudentHidden(hidden, weight, None)
    for teacher in (TeacherHidden(teacher_hidden, teacher_weight, teacher_bias), TeacherLogits(teacher_logits)):
        student_lp, teacher_lp = sampled_logprobs(student, teacher, labels, 0.7, chunk)
        torch.testing.assert_close(student_lp, expected(hidden @ weight.T), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(teacher_lp, expected(teacher_logits), rtol=1e-5, atol=1e-5)
