"""Ctrl-C and SIGTERM during `protege train`, sent to a real process: one line that says where the run stands, the
shell's exit code, and a state that resumes; a second signal ends the process at once."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from test_cli import common, protege

from protege.checkpoints import newest_complete

LINE = re.compile(
    r"^protege train: interrupted \((SIGINT|SIGTERM)\) at step (\d+); last complete checkpoint: (\S+); resume with "
    r"--resume_from_checkpoint true$"
)


def wait_for(condition, process: subprocess.Popen, what: str, deadline_s: float = 300.0) -> None:
    """Poll `condition` until it holds; fail if the process exits first or the deadline passes."""
    end = time.monotonic() + deadline_s
    while not condition():
        assert process.poll() is None, f"the process exited ({process.returncode}) before {what}"
        assert time.monotonic() < end, f"no {what} within {deadline_s:g} s"
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_training_says_where_the_run_stands_and_resumes(tiny_paths, data_file, tmp_path, signum):
    out = tmp_path / "out"
    flags = common(tiny_paths, data_file, out)
    flags[flags.index("--save_strategy") + 1] = "steps"
    command = [sys.executable, "-m", "protege", "train", *flags, "--save_steps", "2", "--max_steps", "100000"]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        try:
            wait_for(lambda: newest_complete(str(out)) is not None, process, "complete checkpoint")
            process.send_signal(signum)
            code = process.wait(timeout=120)
        finally:
            process.kill()
    lines = (tmp_path / "stderr.txt").read_text().splitlines()
    assert code == 128 + signum
    assert "Traceback" not in "\n".join(lines)
    match = LINE.match(lines[-1])
    assert match, lines[-5:]
    name, step, checkpoint = match.groups()
    assert name == signal.Signals(signum).name
    assert checkpoint == os.path.abspath(newest_complete(str(out)))  # the one a resume takes: no partial one wins
    saved = int(checkpoint.rsplit("-", 1)[1])
    assert saved % 2 == 0 and saved <= int(step)
    if signum == signal.SIGINT:  # the state resumes: two more steps from the checkpoint
        flags[flags.index("--output_dir") + 1] = str(out)
        resumed = protege("train", *flags, "--max_steps", str(saved + 2), "--resume_from_checkpoint", "true")
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        state = json.loads((out / f"checkpoint-{saved + 2}" / "trainer_state.json").read_text())
        assert state["global_step"] == saved + 2


BLOCKED_CLEANUP = """
import threading
from protege.commands.interrupts import Interrupted, interruptible

with interruptible():
    try:
        print("ready", flush=True)
        threading.Event().wait()
    except Interrupted as interrupt:
        print(f"cleaning up after {interrupt.name}", flush=True)
        threading.Event().wait()  # a clean-up that never ends: only the second signal gets out
"""


def test_a_second_signal_exits_at_once_even_while_the_first_is_handled():
    process = subprocess.Popen(
        [sys.executable, "-c", BLOCKED_CLEANUP], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline() == "ready\n"
        process.send_signal(signal.SIGINT)
        assert process.stdout.readline() == "cleaning up after SIGINT\n"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 128 + signal.SIGTERM
    finally:
        process.kill()
    assert "Traceback" not in process.stderr.read()
