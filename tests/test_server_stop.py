"""Stopping protege's servers with SIGINT (Ctrl-C) or SIGTERM (`kill`, a scheduler): one line that says so, exit code
0, no traceback, and no process of theirs left behind. `protege serve-student` gets the same test in test_vllm.py,
where vLLM is."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest
from conftest import free_port

from protege.teacher.client import TeacherClient


def session_processes(session: int) -> list[psutil.Process]:
    """The live processes of a session (a server started with `start_new_session` and everything it started)."""
    found = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
    return found


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_teacher_stops_on_a_signal_with_one_line_and_exit_0(tiny_paths, tmp_path, stop):
    port = free_port()
    log = tmp_path / "server.log"
    command = [sys.executable, "-m", "protege", "serve-teacher", "--model", tiny_paths["teacher"], "--port", str(port)]
    with open(log, "w") as stderr:
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    try:
        TeacherClient(f"http://127.0.0.1:{port}").wait_until_ready(timeout=120)
        server.send_signal(stop)  # to the server alone, not its group: a clean stop needs no help
        code = server.wait(timeout=60)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    text = log.read_text()
    assert code == 0, text[-2000:]
    assert (
        text.splitlines()[-1] == f"protege serve-teacher: stopped by {stop.name} after serving http://127.0.0.1:{port}"
    )
    assert "Traceback" not in text
    assert session_processes(server.pid) == []


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_the_model_loads_stops_the_command_with_its_line(tiny_paths, monkeypatch, capsys, stop):
    """The signal arrives while the backend loads (here: the load sends it): no traceback, one line, exit 0, and
    the handlers found before are back."""
    from protege.cli import build_parser
    from protege.commands import serve_teacher

    def load_then_signal(args):
        os.kill(os.getpid(), stop)
        pytest.fail("the signal did not stop the load")

    monkeypatch.setattr(serve_teacher, "_load", load_then_signal)
    before = signal.getsignal(stop)
    args = build_parser().parse_args(["serve-teacher", "--model", tiny_paths["teacher"], "--port", str(free_port())])
    assert serve_teacher.run(args) == 0
    assert capsys.readouterr().err == f"protege serve-teacher: stopped by {stop.name} before it served\n"
    assert signal.getsignal(stop) is before
