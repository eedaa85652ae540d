"""`protege demo`: the task's chain format and scoring, the shipped tokenizer, and a quick run end to end."""

from __future__ import annotations

import json
import random

import pytest

from protege.demo import task

# Measured on quick runs when the demo was written (seeds 0, 1, 2): teacher 100% each time; student 29.5% -> 97%,
# 41.5% -> 100%, 53.5% -> 100% (gains of 46 to 68 points); KL(teacher || student) down 3.6 to 10 times. Seed 0 on an
# AVX2 AMD EPYC (2026-11-30): 39.5% -> 98.5%, KL(teacher || student) down 4.8 times. The thresholds leave wide margins:
# the numbers repeat exactly on one machine but move between machines (README, "Repeatable for a seed").
TEACHER_MIN = 0.90
GAIN_MIN = 0.25
KL_RATIO_MAX = 0.6

EXAMPLE = task.Problem(482130, 359712)
EXAMPLE_CHAIN = "0+2+0=02\n3+1+0=04\n1+7+0=08\n2+9+0=11\n8+5+1=14\n4+3+1=08\nanswer: 841842"


# ----- The task -----


def test_worked_solution_carries_column_by_column():
    assert task.worked_solution(EXAMPLE) == EXAMPLE_CHAIN
    # A carry out of the last column makes a 7-digit answer.
    assert task.worked_solution(task.Problem(999999, 100001)).splitlines()[-2:] == ["9+1+1=11", "answer: 1100000"]


@pytest.mark.parametrize("seed", range(3))
def test_chains_add_up(seed):
    rng = random.Random(seed)
    for _ in range(200):
        problem = task.random_problem(rng)
        lines = task.steps(problem)
        assert len(lines) == task.DIGITS and all(len(line) == 8 for line in lines)
        digits = [int(line[-1]) for line in lines]
        carry = int(lines[-1][-2])
        assert int(str(carry) * carry + "".join(map(str, reversed(digits)))) == problem.answer
        assert task.parse_answer(task.worked_solution(problem)) == problem.answer


def test_messages_are_a_prompt_and_a_completion():
    messages = task.conversation(EXAMPLE)
    assert messages == [
        {"role": "user", "content": "482130+359712"},
        {"role": "assistant", "content": EXAMPLE_CHAIN},
    ]
    assert task.prompt_messages(EXAMPLE) == messages[:1]
    assert task.parse_problem(messages[0]["content"]) == EXAMPLE
    with pytest.raises(ValueError):
        task.parse_problem("482130-359712")


def test_scoring_is_exact_match_of_the_final_answer():
    assert task.score(EXAMPLE_CHAIN, EXAMPLE) == 1.0
    assert task.score(EXAMPLE_CHAIN + "\n", EXAMPLE) == 1.0
    wrong_answer = EXAMPLE_CHAIN.replace("answer: 841842", "answer: 841852")
    assert task.score(wrong_answer, EXAMPLE) == 0.0
    # One early slip (a dropped carry) is copied forward into the answer.
    derailed = EXAMPLE_CHAIN.replace("8+5+1=14", "8+5+0=13").replace("4+3+1=08", "4+3+1=08").replace("841", "831")
    assert task.score(derailed, EXAMPLE) == 0.0
    assert task.first_wrong_line(derailed, EXAMPLE) == 5  # lines count from 1
    assert task.first_wrong_line(EXAMPLE_CHAIN, EXAMPLE) is None
    # The answer must be the last line, whole, and a number.
    assert task.score(EXAMPLE_CHAIN + "\n0+0+0=00", EXAMPLE) == 0.0
    assert task.score("answer: 841842 and more", EXAMPLE) == 0.0
    assert task.score("", EXAMPLE) == 0.0
    assert task.parse_answer("answer: x") is None
    # Only the final answer is scored: a wrong step with the right answer still counts.
    sloppy = EXAMPLE_CHAIN.replace("0+2+0=02", "0+3+0=02")
    assert task.score(sloppy, EXAMPLE) == 1.0 and task.first_wrong_line(sloppy, EXAMPLE) == 1


def test_held_out_problems_are_fixed_and_never_trained_on():
    held_out = task.held_out_problems(300, seed=4)
    assert held_out == task.held_out_problems(300, seed=4)
    assert held_out != task.held_out_problems(300, seed=5)
    assert len(set(held_out)) == 300
    train = task.training_problems(2000, seed=4, exclude=held_out[:10] + [held_out[-1]])
    assert train == task.training_problems(2000, seed=4, exclude=held_out[:10] + [held_out[-1]])
    # Force a collision: a training stream that would draw a held-out problem must skip it.
    rigged = task.training_problems(50, seed=4, stream="x")
    assert not set(task.training_problems(50, seed=4, exclude=rigged[:5], stream="x")) & set(rigged[:5])
    assert all(10**5 <= n < 10**6 for p in held_out + train for n in (p.a, p.b, p.answer))


def test_shipped_tokenizer():
    files = {p.name: p.stat().st_size for p in task.ASSETS.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert sum(files.values()) < 100_000
    tokenizer = task.load_tokenizer()
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    text = tokenizer.apply_chat_template(task.conversation(EXAMPLE), tokenize=False)
    assert text.startswith("<|im_start|>user\n482130+359712<|im_end|>\n<|im_start|>assistant\n0+2+0=02\n")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    # One token per digit and symbol, so every digit of the chain is its own prediction.
    assert tokenizer.tokenize("482130+359712=") == list("482130+359712=")
    assert len(tokenizer.tokenize("assistant")) == 1 and len(tokenizer.tokenize("answer")) == 1


def test_tokenizer_can_be_rebuilt_identically(tmp_path):
    task.save_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.loads((tmp_path / name).read_text()) == json.loads((task.ASSETS / name).read_text()), name


# ----- The pipeline -----


def tiny_settings(base=None, **overrides):
    """Demo settings small enough for seconds: the pipeline's plumbing, not its numbers (`base`: another task's
    settings to shrink; default: addition's)."""
    from dataclasses import replace

    from protege.demo.settings import ModelSpec, Settings, SFTSpec

    values = dict(
        teacher=ModelSpec(layers=1, hidden=32),
        student=ModelSpec(layers=1, hidden=16),
        teacher_sft=SFTSpec(steps=4, batch_size=8, learning_rate=1e-3),
        student_sft=SFTSpec(steps=2, batch_size=8, learning_rate=1e-3),
        distill_steps=2,
        distill_batch_size=4,
        eval_every=1,
        eval_problems=8,
        kl_problems=4,
    )
    return replace(base or Settings(), **{**values, **overrides})


def outcome(results: dict) -> dict:
    """What a run's seed decides: results.json without the wall-clock times and the cache flags."""
    kept = json.loads(json.dumps(results))
    for key in ("timings_s", "distillation_step_seconds"):
        kept.pop(key)
    for model in kept["models"].values():
        model.pop("train_seconds", None), model.pop("cached", None)
    return kept


@pytest.mark.slow
def test_same_seed_same_numbers_with_or_without_the_cache(tmp_path):
    """Two runs of a seed, each training its own models, give the same numbers to the last bit, and so does a third
    that loads them from the cache: the teacher, the warm-up, the distillation's sampling and batches, the scores."""
    from protege.demo.pipeline import run_demo

    tiny = tiny_settings(distill_steps=5, eval_every=2)  # the trainer logs its loss every 5 steps
    first = outcome(run_demo(str(tmp_path / "a"), settings=tiny))
    assert first == outcome(run_demo(str(tmp_path / "b"), settings=tiny))
    assert first == outcome(run_demo(str(tmp_path / "a"), settings=tiny))
    assert first["distillation_loss"] and first["kl_teacher_student_after"] != first["kl_teacher_student_before"]
    other = outcome(run_demo(str(tmp_path / "c"), seed=1, settings=tiny))
    assert other["kl_teacher_student_after"] != first["kl_teacher_student_after"]


def test_progress_bars_fit_80_columns():
    """Every bar's count and time stay whole at 80 columns (they were cut to `700/… 0:0…`), with the longest
    descriptions and infos the demo writes."""
    import io

    from rich.console import Console

    from protege.demo.progress import progress_bars

    for width in (80, 100):
        console = Console(file=io.StringIO(), width=width)
        with progress_bars(console, plain=False) as progress:
            progress.add_task("teacher: supervised", total=700, completed=700, info="loss 12.3456  val acc 100%")
            progress.add_task("student: warm-up", total=600, completed=140, info="cached (student_warmup/)")
            progress.add_task("scoring before", total=2, completed=2, info="teacher 100.0%, student 100.0%")
            progress.add_task("student: distillation", total=200, completed=200, info="loss 0.0384  acc 100.0%")
        lines = console.file.getvalue().splitlines()
        assert len(lines) == 4 and all(len(line) <= width and "…" not in line for line in lines), lines
        assert all(any(f"{n}/{n}" in line for n in (700, 2, 200)) or "140/600" in line for line in lines)
        assert all("0:00:00" in line for line in lines)


def test_off_a_terminal_each_stage_prints_plain_lines():
    """Into a pipe or a file, rich's bars show nothing until the run ends; the plain display prints a line when a
    stage starts, at each tenth of it and when it ends (early, when a warm-up stops short), and one for a cached
    model, with no terminal control codes."""
    import io

    from rich.console import Console
    from rich.progress import Progress

    from protege.demo.progress import PlainProgress, progress_bars

    console = Console(file=io.StringIO(), width=100)
    assert isinstance(progress_bars(console), PlainProgress)
    assert isinstance(progress_bars(Console(file=io.StringIO(), force_terminal=True)), Progress)
    with progress_bars(console) as progress:
        progress.add_task("teacher: supervised", total=1, completed=1, info="cached (teacher/)")
        bar = progress.add_task("student: warm-up", total=600, info="")
        for step in range(1, 131):
            progress.update(bar, advance=1, info=f"loss {1 / step:.4f}")
        progress.update(bar, total=130, completed=130, info="val acc 31%")
        progress.update(bar, info="ignored once done")
    lines = console.file.getvalue().splitlines()
    assert [line.split()[:4] for line in lines] == [
        ["teacher:", "supervised", "1/1", "0:00:00"],
        ["student:", "warm-up", "0/600", "0:00:00"],
        ["student:", "warm-up", "60/600", "0:00:00"],
        ["student:", "warm-up", "120/600", "0:00:00"],
        ["student:", "warm-up", "130/130", "0:00:00"],
    ]
    assert lines[0].endswith("done  cached (teacher/)") and lines[1].endswith("started")
    assert lines[2].endswith("loss 0.0167") and lines[-1].endswith("done  val acc 31%")
    assert "\x1b" not in console.file.getvalue()


def test_the_console_and_results_json_number_lines_alike(tmp_path):
    """The example the console shows "went wrong at line N" where results.json says N, both counting from 1."""
    import io

    from rich.console import Console

    from protege.demo import report

    problem = EXAMPLE
    wrong = EXAMPLE_CHAIN.replace("3+1+0=04", "3+1+0=05").replace("841842", "841852")
    assert task.first_wrong_line(wrong, problem) == 2
    results = {
        "examples": [{"prompt": "482130+359712", "before": wrong, "after": EXAMPLE_CHAIN, "first_wrong_line_before": 2}]
    }
    console = Console(file=io.StringIO(), width=100)
    report.print_examples(console, results)
    assert "went wrong at line 2 " in console.file.getvalue()


def test_a_cached_model_never_takes_another_models_optimizer_state(tmp_path):
    """A folder where the addition student (AdamW state kept) was cached and then a walks student (none kept): the walks
    student loads without the addition student's optimizer.pt, which crashed the distillation on a shape mismatch
    (`make demo`, then `protege demo --task walks` twice in demo_output/)."""
    import torch

    from protege.demo.cache import OPTIMIZER_FILE, load_cached, model_fingerprint, save_cached
    from protege.demo.settings import Settings

    tokenizer = task.load_tokenizer()
    folder = tmp_path / "student_warmup"
    for settings in (Settings.for_run(True), Settings.for_run(True, "walks")):
        model = settings.student.build(tokenizer, seed=0)
        fingerprint = model_fingerprint("student", settings.student, settings.student_sft, settings, 0)
        state = torch.optim.AdamW(model.parameters()).state_dict() if settings.task == "addition" else None
        save_cached(folder, model, tokenizer, fingerprint, {}, state)
        assert (folder / OPTIMIZER_FILE).exists() == (state is not None)
        cached = load_cached(folder, fingerprint)
        assert cached is not None and (cached.optimizer_state is None) == (state is None)
    # An older cache still holding a stale optimizer.pt next to the walks student: ignored, by the fingerprint's rule.
    torch.save({"state": {}, "param_groups": []}, folder / OPTIMIZER_FILE)
    assert load_cached(folder, fingerprint).optimizer_state is None


@pytest.mark.slow
def test_cached_models_are_reused(tmp_path):
    from protege.demo.pipeline import run_demo
    from protege.demo.settings import ModelSpec

    tiny = tiny_settings()
    first = run_demo(str(tmp_path), settings=tiny)
    assert not first["models"]["teacher"]["cached"] and not first["models"]["student"]["cached"]
    assert [point["step"] for point in first["accuracy_curve"]] == [0, 1, 2]
    second = run_demo(str(tmp_path), settings=tiny)
    assert second["models"]["teacher"]["cached"] and second["models"]["student"]["cached"]
    assert second["student_accuracy_before"] == first["student_accuracy_before"]
    assert second["kl_teacher_student_before"] == pytest.approx(first["kl_teacher_student_before"])
    # Other settings make other models: the cache is not reused.
    third = run_demo(str(tmp_path), settings=tiny_settings(teacher=ModelSpec(layers=1, hidden=48)))
    assert not third["models"]["teacher"]["cached"] and third["models"]["student"]["cached"]


@pytest.mark.slow
def test_eval_scores_the_demo_models_like_the_demo(tmp_path, capsys):
    """`protege eval --task demo` on the demo's output folder reproduces the demo's own numbers."""
    from protege.cli import main
    from protege.demo.pipeline import run_demo
    from protege.demo.settings import SFTSpec

    tiny = tiny_settings(
        teacher_sft=SFTSpec(steps=30, batch_size=16, learning_rate=6e-3), eval_every=2, eval_problems=24, kl_problems=24
    )
    results = run_demo(str(tmp_path), settings=tiny)
    held_out = tmp_path / "held_out.jsonl"
    assert len(held_out.read_text().splitlines()) == 24
    output = tmp_path / "eval.json"
    code = main(
        ["eval", "--model", str(tmp_path / "student_distilled"), "--teacher", str(tmp_path / "teacher")]
        + ["--dataset_name", str(held_out), "--task", "demo", "--output", str(output), "--batch_size", "24"]
    )
    assert code == 0
    scored = json.loads(output.read_text())
    assert scored["rows"] == 24
    assert scored["student_accuracy"] == results["student_accuracy_after"]
    assert scored["teacher_accuracy"] == results["teacher_accuracy"]
    assert scored["kl_teacher_student"] == pytest.approx(results["kl_teacher_student_after"], rel=1e-4)

    bad = tmp_path / "bad.jsonl"
    rows = [{"prompt": "123456+111111", "completion": "answer: 234567"}, {"prompt": "two plus two?", "completion": "4"}]
    bad.write_text("".join(json.dumps(row) + "\n" for row in rows))
    code = main(
        ["eval", "--model", str(tmp_path / "teacher"), "--teacher", str(tmp_path / "teacher")]
        + ["--dataset_name", str(bad), "--task", "demo"]
    )
    assert code == 2
    assert "row 1: not a demo-task prompt" in capsys.readouterr().err


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """`protege demo --quick` as `make demo > log` runs it: its output a pipe, Python's buffering left on. Returns
    the output folder, results.json, and each printed line with whether results.json existed when it arrived."""
    import os
    import subprocess
    import sys

    output = tmp_path_factory.mktemp("demo")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONUNBUFFERED", "COLUMNS")}
    command = [sys.executable, "-m", "protege", "demo", "--quick", "--output-dir", str(output)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = [(line.rstrip("\n"), (output / "results.json").exists()) for line in process.stdout]
    assert process.wait() == 0, "\n".join(line for line, _ in lines)
    return output, json.loads((output / "results.json").read_text()), lines


@pytest.mark.slow
def test_quick_demo_writes_its_results(quick_run):
    output, results, _ = quick_run
    assert (output / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (output / "teacher" / "model.safetensors").exists()
    assert (output / "student_warmup" / "model.safetensors").exists()
    assert results["models"]["student"]["parameters"] < results["models"]["teacher"]["parameters"] / 2
    curve = results["accuracy_curve"]
    assert curve[0] == {"step": 0, "accuracy": results["student_accuracy_before"]}
    assert curve[-1] == {"step": results["settings"]["distill_steps"], "accuracy": results["student_accuracy_after"]}


@pytest.mark.slow
def test_quick_demo_into_a_pipe_prints_each_stage_as_it_goes(quick_run):
    """Each stage's lines reach the pipe while the run goes on (results.json not written yet): its start, every
    tenth of a long stage, its end; then the table."""
    _, results, lines = quick_run
    during = [line for line, finished in lines if not finished]
    stages = ("teacher: supervised", "student: warm-up", "scoring before", "student: distillation", "scoring after")
    for stage in stages:
        mine = [line for line in during if line.startswith(stage)]
        assert mine and "  started" in mine[0] and "  done" in mine[-1], (stage, during)
        assert sum("  done" in line for line in mine) == 1, mine
    counts = [line.split()[2] for line in during if line.startswith("teacher: supervised")]
    teacher_steps = results["settings"]["teacher_sft"]["steps"]
    assert counts == [f"{step}/{teacher_steps}" for step in range(0, teacher_steps + 1, teacher_steps // 10)]
    distill_steps = results["settings"]["distill_steps"]
    distilled = [line for line in during if line.startswith("student: distillation")]
    assert len(distilled) == 11 and distilled[-1].split()[2] == f"{distill_steps}/{distill_steps}"
    assert f"acc {results['student_accuracy_after']:.1%}" in distilled[-1]
    assert any("on-policy distillation (quick run, seed 0)" in line for line, finished in lines if finished)
    assert not any("\x1b" in line for line, _ in lines)


@pytest.mark.slow
def test_quick_demo_teacher_is_good(quick_run):
    _, results, _ = quick_run
    assert results["teacher_accuracy"] >= TEACHER_MIN


@pytest.mark.slow
def test_quick_demo_distillation_improves_the_student(quick_run):
    _, results, _ = quick_run
    before, after = results["student_accuracy_before"], results["student_accuracy_after"]
    assert after - before >= GAIN_MIN, (before, after)
    assert results["kl_teacher_student_after"] < KL_RATIO_MAX * results["kl_teacher_student_before"]
    assert results["kl_student_teacher_after"] < KL_RATIO_MAX * results["kl_student_teacher_before"]


@pytest.mark.slow
def test_quick_demo_student_starts_partly_right(quick_run):
    _, results, _ = quick_run
    student = results["models"]["student"]
    # The warm-up stops once the student solves 30% of the validation problems, well before its step budget.
    assert student["validation_accuracy"] >= 0.3 and student["steps"] < results["settings"]["student_sft"]["steps"]
    assert 0.05 <= results["student_accuracy_before"] <= 0.75
