"""`protege demo --task mixture`: the mixed stream of addition and walks rows, the runs' equal budgets, and a tiny run
end to end (two teachers, one student, each row routed to its task's teacher, next to each teacher alone)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from protege.demo.mixture import MIXTURE, PARTS, WARMUP_SHARES, Mixture, Tagged
from protege.demo.tasks import get_task

MIX = Mixture()


# ----- The mixed stream -----


def test_rows_of_both_tasks_interleaved_by_a_seeded_shuffle():
    held_out = MIX.held_out_problems(50, seed=3)
    assert [p.task for p in held_out] == ["addition"] * 50 + ["walks"] * 50
    rows = MIX.training_problems(400, seed=3, exclude=held_out, stream="distill")
    assert rows == MIX.training_problems(400, seed=3, exclude=held_out, stream="distill")
    assert rows != MIX.training_problems(400, seed=4, exclude=held_out, stream="distill")
    parts = MIX.split(rows)
    assert {name: len(problems) for name, problems in parts.items()} == {"addition": 200, "walks": 200}
    # Interleaved, not one task after the other: both tasks in every slice of 16 rows (a batch's worth).
    assert all({row.task for row in rows[start : start + 16]} == set(PARTS) for start in range(0, 400, 16))
    # Each task's share is the start of the stream its own run draws from (shuffled), and no held-out prompt is in it.
    for name in PARTS:
        task, own = get_task(name), MIX.split(held_out)[name]
        assert sorted(map(repr, parts[name])) == sorted(map(repr, task.training_problems(200, 3, own, "distill")))
        assert not set(parts[name]) & set(own)


def test_shares_messages_and_parsing_go_to_the_row_task():
    warm_up = Mixture(shares=WARMUP_SHARES)
    assert warm_up.counts(401) == {"addition": 301, "walks": 100}
    counted = warm_up.split(warm_up.training_problems(401, seed=0, stream="student"))
    assert {name: len(problems) for name, problems in counted.items()} == {"addition": 301, "walks": 100}
    for name in PARTS:
        task = get_task(name)
        problem = task.held_out_problems(1, seed=0)[0]
        tagged = Tagged(name, problem)
        assert MIX.teacher_of(tagged) == name
        assert MIX.prompt_messages(tagged) == task.prompt_messages(problem)
        assert MIX.conversation(tagged) == task.conversation(problem)
        answer = task.conversation(problem)[-1]["content"]
        assert MIX.score(answer, tagged) == 1.0 and MIX.first_wrong_line(answer, tagged) is None
        assert MIX.parse_problem(task.prompt_messages(problem)[0]["content"]) == Tagged(name, problem)
    with pytest.raises(ValueError, match="not a prompt of addition, walks"):
        MIX.parse_problem("two plus two")
    # The cache's fingerprint moves with either task's version.
    assert get_task(MIXTURE).version == MIX.version == 10201


def test_every_run_samples_about_the_same_tokens_in_the_same_steps():
    """The mixture's rows are in inverse proportion to their completions' length (64 tokens for addition, 21 for
    walks), so each teacher grades about half of its tokens; each single-teacher run takes the batch whose reference
    completions hold as many tokens in the same steps: fewer prompts for addition, more for walks."""
    from protege.demo.encoder import Encoder
    from protege.demo.mixture_run import Part, batch_sizes, distillation_mixture
    from protege.demo.settings import MixtureSettings
    from protege.demo.task import load_tokenizer

    settings = MixtureSettings.for_run(quick=False)
    tokenizer = load_tokenizer()
    parts = {}
    for name, own in settings.parts.items():
        task = get_task(name)
        parts[name] = Part(name, own, task, Encoder(tokenizer, task), task.held_out_problems(2, 0), [], None)
    lengths = {name: part.completion_length for name, part in parts.items()}
    assert lengths == {"addition": 64, "walks": 21}
    mixture = distillation_mixture(parts, settings.student)
    steps = settings.student.distill_steps
    counts = mixture.counts(steps * settings.student.distill_batch_size)
    tokens = {name: counts[name] * length for name, length in lengths.items()}
    assert abs(tokens["addition"] - tokens["walks"]) <= 64
    batches = batch_sizes(mixture, parts, settings.student)
    assert batches[MIXTURE] == settings.student.distill_batch_size
    assert batches["addition"] < batches[MIXTURE] < batches["walks"]
    for name, length in lengths.items():
        assert abs(steps * batches[name] * length - sum(tokens.values())) <= steps * length / 2


def test_the_command_line_offers_the_mixture():
    import argparse

    from protege.commands import demo

    subparsers = argparse.ArgumentParser().add_subparsers()
    demo.add_parser(subparsers)
    args = subparsers.choices["demo"].parse_args(["--task", "mixture", "--quick"])
    assert args.task == MIXTURE and args.quick


# ----- A tiny run end to end -----


def tiny_mixture():
    """Mixture settings small enough for seconds: the plumbing, not the numbers."""
    from protege.demo.settings import MixtureSettings, ModelSpec, SFTSpec

    base = MixtureSettings.for_run(quick=True)
    teacher = dict(teacher=ModelSpec(layers=1, hidden=32), eval_problems=8, kl_problems=4)
    parts = {
        name: replace(own, teacher_sft=SFTSpec(steps=6, batch_size=8, learning_rate=3e-3), **teacher)
        for name, own in base.parts.items()
    }
    warmup = SFTSpec(steps=4, batch_size=8, learning_rate=1e-3, stop_at_accuracy=0.3, check_every=2)
    student = replace(
        base.student,
        student=ModelSpec(layers=1, hidden=16),
        student_sft=replace(warmup, validation_problems=8),
        distill_steps=5,  # the trainer logs every 5 steps
        distill_batch_size=8,
        eval_every=5,
    )
    return replace(base, parts=parts, student=student)


@pytest.mark.slow
def test_tiny_mixture_run(tmp_path):
    """Both teachers get rows in the mixture run, one each in the single runs; results.json holds every task's score
    before and after each run; models, held-out sets and the plot are written; a rerun loads the cached models."""
    from protege.demo.pipeline import run_demo

    settings = tiny_mixture()
    results = run_demo(str(tmp_path), settings=settings)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    runs = results["runs"]
    assert list(runs) == [MIXTURE, *PARTS]
    mixture = runs[MIXTURE]
    assert mixture["teachers"] == list(PARTS) and sum(mixture["prompts"].values()) == 5 * 8
    assert 0 < mixture["prompts"]["addition"] < mixture["prompts"]["walks"]
    assert all(mixture["teacher_completion_tokens"][name] > 0 for name in PARTS)
    assert sum(mixture["teacher_completion_tokens"].values()) == mixture["completion_tokens"]
    for name in PARTS:
        assert runs[name]["teachers"] == [name] and runs[name]["prompts"] == {name: 5 * runs[name]["batch_size"]}
        assert runs[name]["completion_tokens"] > 0
    assert runs["addition"]["batch_size"] < mixture["batch_size"] < runs["walks"]["batch_size"]
    for name, part in results["task"]["parts"].items():
        scores = [results["before"][name], results["teachers"][name]] + [run["after"][name] for run in runs.values()]
        keys = {"accuracy", "sampled"} if name == "walks" else {"accuracy"}
        assert all(keys <= set(score) and all(0.0 <= score[key] <= 1.0 for key in keys) for score in scores)
        assert part["headline"] == ("sampled" if name == "walks" else "accuracy")
        assert set(results["gains"][name]) == set(runs)
        assert len((tmp_path / f"held_out_{name}.jsonl").read_text().splitlines()) == 8
        assert (tmp_path / f"teacher_{name}" / "model.safetensors").exists()
    for run, record in runs.items():
        assert [point["step"] for point in record["curve"]] == [0, 5]
        assert (tmp_path / f"student_{run}" / "model.safetensors").exists()
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not any(model["cached"] for model in results["models"]["teachers"].values())

    again = run_demo(str(tmp_path), settings=settings)
    assert all(model["cached"] for model in again["models"]["teachers"].values())
    assert again["models"]["student"]["cached"]
    assert again["before"] == results["before"] and again["runs"][MIXTURE]["after"] == mixture["after"]
