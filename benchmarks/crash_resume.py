"""A crash during a checkpoint save, then `resume_from_checkpoint=True`; and whether a resumed run is bit-exact.

    .venv/bin/python benchmarks/crash_resume.py [--workdir DIR] [--no-baseline]

Part 1 trains a tiny student (tests/tiny.py) for 8 optimizer steps, saving every 2 and keeping 2 checkpoints, in a
subprocess (tests/crash_train.py), and kills it with SIGKILL at 8 points of the save at step 6: on entering the save,
with model.safetensors cut to half its size, after the model, with optimizer.pt cut to half, after the RNG states,
after trainer_state.json, after the rename to checkpoint-6, and at the end of the save (after rotation). Each killed
run is resumed in a fresh process with `resume_from_checkpoint=True`; it counts as resumed when it finishes the 8 steps
with exactly the weights of a run that was never killed (lmbda 0.5: the student generates in some slices). The
baseline does the same with transformers' own save (checkpoint-N written in place) and resume (the highest N); it
has no rename, so 7 points.

Part 2 trains 8 steps straight and, from that run's checkpoint-4, 4 steps after a resume, at lmbda 0, 0.5 and 1, and
compares every weight. Markdown tables on stdout; 1 to 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
sys.path.insert(0, str(TESTS))  # tiny.py and crash_train.py, shared with the tests

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from crash_train import POINTS  # noqa: E402
from tiny import build, config, dataset  # noqa: E402

from protege import DistillationTrainer  # noqa: E402


def crash_runs(paths: dict[str, str], workdir: Path, points: tuple[str, ...], in_place: bool) -> dict:
    """tests/crash_train.py's report for `points`, with protege's staged saves or transformers' in-place ones."""
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    settings = json.dumps({"in_place": True} if in_place else {})
    command = [sys.executable, str(TESTS / "crash_train.py"), paths["student"], paths["teacher"], str(workdir)]
    result = subprocess.run([*command, settings, *points], env=env, capture_output=True, text=True, timeout=1200)
    if result.returncode != 0:
        raise SystemExit(f"crash_train.py failed:\n{result.stderr[-4000:]}")
    return json.loads((workdir / "report.json").read_text())


def outcome(run: dict, straight: dict) -> str:
    if "error" in run:  # the exception's last line, paths cut to their last two parts
        line = re.sub(r"/\S*/([^/\s]+/[^/\s]+)", r"\1", run["error"].strip().splitlines()[-1])
        return "failed: " + line[:100].replace("|", "/")
    if not run["killed"]:
        return "not killed"
    same = run["global_step"] == 8 and run["digest"] == straight["digest"]
    how = f"from checkpoint-{run['resumed_from']}" if run["resumed_from"] else "from scratch"
    return f"resumed {how}, {'same weights' if same else 'DIFFERENT weights'}"


def resumed_ok(run: dict, straight: dict) -> bool:
    return "error" not in run and run["killed"] and run["digest"] == straight["digest"] and run["global_step"] == 8


def crash_table(paths: dict[str, str], workdir: Path, baseline: bool) -> None:
    staged = crash_runs(paths, workdir / "staged", POINTS, in_place=False)
    points = tuple(p for p in POINTS if p != "renamed")
    plain = crash_runs(paths, workdir / "in-place", points, in_place=True) if baseline else None
    print("| kill point (save at step 6) | left on disk (protege) | protege | transformers in place |")
    print("|---|---|---|---|")
    for point in POINTS:
        run = staged["points"][point]
        other = (
            "-" if plain is None or point not in plain["points"] else outcome(plain["points"][point], plain["straight"])
        )
        print(f"| {point} | {', '.join(run['left'])} | {outcome(run, staged['straight'])} | {other} |")
    count = sum(resumed_ok(run, staged["straight"]) for run in staged["points"].values())
    line = f"\nprotege: {count} of {len(POINTS)} resumed and finished with the uninterrupted run's weights"
    if plain is not None:
        plain_count = sum(resumed_ok(run, plain["straight"]) for run in plain["points"].values())
        line += f"; transformers in place: {plain_count} of {len(points)}"
    print(line + ".\n")


def exactness_table(paths: dict[str, str], workdir: Path) -> None:
    print("| lmbda | max abs weight difference, 8 straight vs 4 + resume + 4 | bit-exact |")
    print("|---|---|---|")
    for lmbda in (0.0, 0.5, 1.0):
        runs = {}
        for name, resume in (("straight", None), ("resumed", workdir / f"straight{lmbda}" / "out" / "checkpoint-4")):
            args = config(workdir / f"{name}{lmbda}", lmbda=lmbda, max_steps=8, save_strategy="steps", save_steps=4)
            trainer = DistillationTrainer(
                model=paths["student"], teacher_model=paths["teacher"], args=args, train_dataset=dataset(32)
            )
            with contextlib.redirect_stdout(io.StringIO()):  # the trainer prints its logs; stdout is the tables
                trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
            runs[name] = trainer.model.state_dict()
        straight, resumed = runs["straight"], runs["resumed"]
        gap = max((resumed[k] - v).abs().max().item() for k, v in straight.items())
        exact = all(torch.equal(resumed[k], v) for k, v in straight.items())
        print(f"| {lmbda} | {gap:.3g} | {'yes' if exact else 'no'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where runs write and stay (default: a temporary folder, deleted)"
    )
    parser.add_argument("--no-baseline", action="store_true", help="skip the transformers in-place runs")
    options = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="protege-crash-") as temporary:
        workdir = options.workdir or Path(temporary)
        started = time.perf_counter()
        paths = build(workdir / "tiny")
        crash_table(paths, workdir, baseline=not options.no_baseline)
        exactness_table(paths, workdir / "exactness")
        print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
