"""Waiting for a server that is not there yet: the trainer's clients say at once that nothing listens at the URL and
how long they will wait, then fail in one line if it never comes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import free_port


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
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        f"protege train: error: teacher server at {url}/health/ was not ready after 1 s "
        f"(ConnectError: [Errno 111] Connection refused)"
    ]
    assert "Traceback" not in result.stderr
