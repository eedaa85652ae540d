"""Two real processes under torchrun (gloo on CPU): same on/off-policy decisions, identical weights."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_agree(tiny_paths, tmp_path):
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": f"{tests}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(tests / "dist_train.py"),
        tiny_paths["student"],
        tiny_paths["teacher"],
        str(tmp_path),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert len(ranks[0]["fractions"]) == 4
    assert ranks[0]["fractions"] == ranks[1]["fractions"]
    assert 0 < sum(ranks[0]["fractions"]) < 4  # lmbda = 0.5 gave both kinds of slices
    assert ranks[0]["weights"] == ranks[1]["weights"]
