"""Waiting for a server that is not there yet: the trainer's clients say at once that nothing listens at the URL and
how long they will wait, then fail in one line if it never comes."""

from __future__ import annotations

import logging
import subprocess
import sys
import types

import pytest
from conftest import free_port

from protege.teacher.client import TeacherClient, TeacherServerError
from protege.vllm_server import StudentServerError, VLLMServer

pytest_plugins = ["fault_fixtures"]  # the sleeps fixture: the client's waits between attempts, recorded


class Lines(logging.Handler):
    """protege's log lines, each with the number of waits the client had made when it was logged."""

    def __init__(self, sleeps: list[float]):
        super().__init__(logging.INFO)
        self.sleeps, self.lines = sleeps, []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.getMessage(), len(self.sleeps)))


@pytest.fixture
def lines(sleeps):
    logger = logging.getLogger("protege")
    handler, level = Lines(sleeps), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_nothing_listening_is_said_on_the_first_refused_connection_then_waited_for(lines, sleeps):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = TeacherClient(url)
    with pytest.raises(TeacherServerError) as error:
        client.wait_until_ready(timeout=1, interval=0.05)
    client.close()
    assert str(error.value) == (
        f"teacher server at {url}/health/ was not ready after 1 s (ConnectError: [Errno 111] Connection refused)"
    )
    assert lines == [
        (f"waiting up to 1 s for the teacher server at {url}/health/", 0),
        (
            f"nothing listens at {url} yet ([Errno 111] Connection refused); waiting up to 1 s "
            "(teacher_server_startup_timeout) for the teacher server to start",
            0,  # logged after the first attempt, before any wait
        ),
    ]
    assert len(sleeps) >= 2 and set(sleeps) == {0.05}  # and it kept trying until the timeout


def test_the_student_server_client_says_so_too_naming_its_timeout_setting(lines, sleeps):
    url = f"http://127.0.0.1:{free_port()}"
    settings = dict(vllm_server_base_url=url, vllm_server_max_retries=0, vllm_server_api_key=None)
    args = types.SimpleNamespace(**settings, vllm_server_timeout=0.5)
    with pytest.raises(StudentServerError, match=rf"^student vLLM server at {url}/health/ was not ready after 0.5 s"):
        VLLMServer(args, sampling={}, process_index=0)
    assert lines[1] == (
        f"nothing listens at {url} yet ([Errno 111] Connection refused); waiting up to 0.5 s "
        "(vllm_server_timeout) for the student vLLM server to start",
        0,
    )
    assert len(lines) == 2 and sleeps == [0.5]  # one wait, then the deadline


@pytest.mark.slow
def test_cli_with_an_unreachable_teacher_says_it_waits_then_fails_in_one_line(tiny_paths, tmp_path):
    import json as json_module

    from tiny import arithmetic_rows

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json_module.dumps(row) for row in arithmetic_rows(8, seed=1)))
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    result = subprocess.run(
        [sys.executable, "-m", "protege", "train", "--model_name_or_path", tiny_paths["student"]]
        + ["--dataset_name", str(data), "--output_dir", str(tmp_path / "out"), "--use_teacher_server", "true"]
        + ["--teacher_model_server_url", url, "--teacher_server_startup_timeout", "1", "--loss_top_k", "1"]
        + ["--report_to", "none"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"protege: waiting up to 1 s for the teacher server at {url}/health/" in result.stderr
    said = f"protege: nothing listens at {url} yet ([Errno 111] Connection refused); waiting up to 1 s"
    assert result.stderr.index(said) < result.stderr.index("protege train: error:")
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        f"protege train: error: teacher server at {url}/health/ was not ready after 1 s "
        f"(ConnectError: [Errno 111] Connection refused)"
    ]
    assert "Traceback" not in result.stderr
