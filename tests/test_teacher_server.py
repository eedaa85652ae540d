"""The trainer against a real teacher server started on 127.0.0.1: same loss as a local teacher, survives faults."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import free_port
from test_trainer import config, logged
from tiny import dataset
from transformers import AutoModelForCausalLM, TrainerCallback

from protege import DistillationTrainer
from protege.teacher.client import TeacherClient, TeacherServerError


def start_server(model: str, port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "protege",
            "serve-teacher",
            "--model",
            model,
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        TeacherClient(f"http://127.0.0.1:{port}").wait_until_ready(timeout=120)
    except TeacherServerError:
        process.kill()
        raise AssertionError(f"the teacher server did not start: {process.communicate()[1][-2000:]}") from None
    return process


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


@pytest.fixture(scope="module")
def teacher_url(tiny_paths):
    port = free_port()
    process = start_server(tiny_paths["teacher"], port)
    yield f"http://127.0.0.1:{port}"
    stop_server(process)


def first_loss(tiny_paths, tmp_path, **overrides) -> float:
    common = dict(lmbda=0.0, max_steps=1, learning_rate=1e-2, gradient_accumulation_steps=2)
    use_server = overrides.get("use_teacher_server", False)
    trainer = DistillationTrainer(
        model=tiny_paths["student"],
        teacher_model=None if use_server else tiny_paths["teacher"],
        args=config(tmp_path, **common, **overrides),
        train_dataset=dataset(32),
    )
    trainer.train()
    return logged(trainer, "loss")[0]


@pytest.mark.parametrize(("beta", "top_k"), [(0.5, 1), (1.0, 1), (0.0, 5)])
def test_server_loss_equals_local_teacher_loss(tiny_paths, tmp_path, teacher_url, beta, top_k):
    local = first_loss(tiny_paths, tmp_path / "local", beta=beta, loss_top_k=top_k)
    for response_format, tolerance in (("binary", 1e-5), ("json", 1e-5), ("compact", 1e-3)):
        served = first_loss(
            tiny_paths,
            tmp_path / response_format,
            beta=beta,
            loss_top_k=top_k,
            use_teacher_server=True,
            teacher_model_server_url=teacher_url,
            teacher_server_response_format=response_format,
        )
        assert served == pytest.approx(local, rel=tolerance), response_format


def test_server_trains_on_policy(tiny_paths, tmp_path, teacher_url):
    trainer = DistillationTrainer(
        model=tiny_paths["student"],
        args=config(
            tmp_path,
            lmbda=0.5,
            beta=1.0,
            loss_top_k=1,
            max_steps=3,
            gradient_accumulation_steps=4,
            use_teacher_server=True,
            teacher_model_server_url=teacher_url,
        ),
        train_dataset=dataset(32),
    )
    trainer.train()
    assert logged(trainer, "on_policy_loss") and all(loss == loss for loss in logged(trainer, "loss"))
    assert trainer.evaluate(dataset(8, seed=3))["eval_loss"] > 0


class StopServerAt(TrainerCallback):
    def __init__(self, process, step):
        self.process, self.step = process, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            stop_server(self.process)


def test_server_lost_mid_training_then_resumed(tiny_paths, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(tiny_paths["teacher"], port)
    args = dict(
        lmbda=0.0,
        beta=0.5,
        loss_top_k=1,
        max_steps=6,
        save_strategy="steps",
        save_steps=2,
        use_teacher_server=True,
        teacher_model_server_url=url,
        teacher_server_max_retries=2,
        teacher_server_timeout=10.0,
    )
    trainer = DistillationTrainer(model=tiny_paths["student"], args=config(tmp_path, **args), train_dataset=dataset(64))
    trainer.add_callback(StopServerAt(process, 3))
    with pytest.raises(
        TeacherServerError,
        match=rf"teacher server at {url}/get_sequence_logprobs/ failed after 3 "
        r"attempts",
    ):
        trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint-2"]
    assert AutoModelForCausalLM.from_pretrained(checkpoint).config.num_hidden_layers == 2

    process = start_server(tiny_paths["teacher"], port)
    try:
        resumed = DistillationTrainer(
            model=tiny_paths["student"], args=config(tmp_path, **args), train_dataset=dataset(64)
        )
        resumed.train(resume_from_checkpoint=str(checkpoint))
        assert resumed.state.global_step == 6
        assert [e["step"] for e in resumed.state.log_history if "loss" in e] == [1, 2, 3, 4, 5, 6]
    finally:
        stop_server(process)


def test_unreachable_server_fails_at_construction(tiny_paths, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TeacherServerError, match=rf"teacher server at {url}/health/ was not ready"):
        DistillationTrainer(
            model=tiny_paths["student"],
            args=config(
                tmp_path,
                use_teacher_server=True,
                teacher_model_server_url=url,
                loss_top_k=1,
                teacher_server_startup_timeout=1.0,
            ),
            train_dataset=dataset(8),
        )
