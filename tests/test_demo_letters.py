"""`protege demo --task letters`: the second embedded task's data, verifier and wiring, and the comparison's criterion.

The task is built to show where on-policy distillation should help (docs/benchmarks.md, "A task where the student's
own mistakes matter: protocol"); these tests check the task itself, not that result.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks import gkd_table
from protege.demo import letters
from protege.demo.letters import Letters, Problem
from protege.demo.tasks import get_task

TASK = Letters()
SET = tuple("qdmazkbxerth")
EXAMPLE = Problem(SET)


def lines(*items: str) -> str:
    return "\n".join(items)


# ----- Data from seeds -----


def as_tuples(problems: list[Problem]) -> list[tuple[tuple[str, ...], tuple[str, ...]]]:
    """Problems compare equal by their set alone, so compare listings and answers explicitly."""
    return [(p.letters, p.answer) for p in problems]


def test_problems_are_fixed_by_the_seed():
    held_out = TASK.held_out_problems(200, seed=3)
    assert as_tuples(held_out) == as_tuples(TASK.held_out_problems(200, seed=3))
    assert as_tuples(held_out) != as_tuples(TASK.held_out_problems(200, seed=4))
    assert len({frozenset(p.letters) for p in held_out}) == 200  # distinct sets
    train = TASK.training_problems(400, seed=3, exclude=held_out, stream="teacher")
    assert as_tuples(train) == as_tuples(TASK.training_problems(400, seed=3, exclude=held_out, stream="teacher"))
    assert as_tuples(train) != as_tuples(TASK.training_problems(400, seed=3, exclude=held_out, stream="student"))
    for problem in held_out + train:
        assert len(problem.letters) == len(set(problem.letters)) == letters.SET_SIZE
        assert set(problem.letters) <= set(letters.ALPHABET)
        assert TASK.score(TASK.conversation(problem)[1]["content"], problem) == 1.0


def test_training_never_asks_for_a_held_out_set():
    """Even listed in another order: a forced collision must be skipped."""
    rigged = TASK.training_problems(40, seed=1, stream="x")
    relisted = [Problem(tuple(reversed(p.letters))) for p in rigged[:8]]
    kept = TASK.training_problems(40, seed=1, exclude=relisted, stream="x")
    assert not {frozenset(p.letters) for p in kept} & {frozenset(p.letters) for p in relisted}
    assert len(kept) == 40


def test_teacher_data_holds_several_valid_answers_per_prompt():
    """The teacher learns from diverse valid solutions: every training prompt comes with ORDERS_PER_PROMPT distinct
    orders, all accepted by the verifier, so its target is many-moded rather than one reference answer."""
    held_out = TASK.held_out_problems(50, seed=0)
    rows = TASK.training_problems(400, seed=0, exclude=held_out, stream="teacher")
    answers: dict[tuple[str, ...], set[tuple[str, ...]]] = defaultdict(set)
    for row in rows:
        assert TASK.score("\n".join(row.answer), row) == 1.0
        answers[row.letters].add(row.answer)
    assert len(answers) == 400 // letters.ORDERS_PER_PROMPT
    assert all(len(orders) == letters.ORDERS_PER_PROMPT for orders in answers.values())
    # The orders are not the prompt's listing, nor one another's shifts: their first letters differ too.
    firsts = [{order[0] for order in orders} for orders in answers.values()]
    assert sum(len(first) > 1 for first in firsts) > 0.9 * len(firsts)


# ----- The verifier -----


def test_messages_and_prompt_parsing():
    assert TASK.prompt_messages(EXAMPLE) == [{"role": "user", "content": "q,d,m,a,z,k,b,x,e,r,t,h"}]
    assert TASK.conversation(EXAMPLE)[1] == {"role": "assistant", "content": "\n".join(SET)}
    shuffled = Problem(SET, tuple(sorted(SET)))
    assert TASK.conversation(shuffled)[1]["content"] == "a\nb\nd\ne\nh\nk\nm\nq\nr\nt\nx\nz"
    parsed = TASK.parse_problem(" q,d,m,a,z,k,b,x,e,r,t,h ")
    assert parsed.letters == SET and parsed == EXAMPLE
    for prompt in ("q,d,q", "Q,d", "q d m", "q,,d", "", "482130+359712"):
        with pytest.raises(ValueError):
            TASK.parse_problem(prompt)


def test_verifier_accepts_valid_answers():
    assert TASK.score(lines(*SET), EXAMPLE) == 1.0  # the prompt's order
    assert TASK.score(lines(*reversed(SET)), EXAMPLE) == 1.0
    assert TASK.score(lines(*sorted(SET)), EXAMPLE) == 1.0
    assert TASK.score("h\nt\nr\ne\nx\nb\nk\nz\na\nm\nd\nq", EXAMPLE) == 1.0
    assert TASK.score(lines(*SET) + "\n", EXAMPLE) == 1.0  # a trailing newline, as addition allows
    assert TASK.score(" q \nd\nm\na\nz\nk\nb\nx\ne\nr\nt\nh", EXAMPLE) == 1.0  # spaces around a letter
    assert TASK.first_wrong_line(lines(*SET), EXAMPLE) is None


@settings(max_examples=200, deadline=None)
@given(st.permutations(SET))
def test_verifier_accepts_every_order(order):
    assert TASK.score(lines(*order), EXAMPLE) == 1.0


@settings(max_examples=200, deadline=None)
@given(st.permutations(SET), st.integers(0, 11), st.integers(0, 11))
def test_verifier_rejects_a_repeat_anywhere(order, at, source):
    if at == source:
        return
    wrong = list(order)
    wrong[at] = order[source]  # one letter written twice, another missing
    assert TASK.score(lines(*wrong), EXAMPLE) == 0.0
    assert TASK.first_wrong_line(lines(*wrong), EXAMPLE) == max(at, source) + 1


@pytest.mark.parametrize(
    ("completion", "line"),
    [
        ("q\nd\nq\na\nz\nk\nb\nx\ne\nr\nt\nh", 3),  # q twice (m missing)
        ("q\nd\nm\na\nz\nk\nb\nx\ne\nr\nt\ny", 12),  # y is not in the set
        ("q\nd\nm\na\nz\nk\nb\nx\ne\nr\nt", 12),  # h missing: too short
        ("q\nd\nm\na\nz\nk\nb\nx\ne\nr\nt\nh\nq", 13),  # a 13th line
        ("q\nd\nm\na\nz\nk\nb\nx\ne\nr\nth", 11),  # two letters on one line
        ("q\nd\n\nm\na\nz\nk\nb\nx\ne\nr\nt\nh", 3),  # an empty line
        ("Q\nd\nm\na\nz\nk\nb\nx\ne\nr\nt\nh", 1),  # upper case
        ("q,d,m,a,z,k,b,x,e,r,t,h", 1),  # the prompt copied on one line
        ("", 1),
    ],
)
def test_verifier_rejects_invalid_answers(completion, line):
    assert TASK.score(completion, EXAMPLE) == 0.0
    assert TASK.first_wrong_line(completion, EXAMPLE) == line


def test_canonical_references():
    """The one house-style answer per prompt (gkd_table --references canonical): letters in the prompt's order; on
    addition, the one correct chain."""
    shuffled = Problem(SET, tuple(sorted(SET)))
    assert TASK.canonical(shuffled).answer == SET and TASK.score(lines(*SET), TASK.canonical(shuffled)) == 1.0
    addition = get_task("addition")
    problem = addition.held_out_problems(1, seed=0)[0]
    assert addition.canonical(problem) == problem


def test_many_modes():
    """12! valid answers for every prompt: the description says so, and a small set's are exactly its permutations."""
    assert f"{math.factorial(12):,}" in TASK.description
    small = Problem(tuple("abc"))
    candidates = ["\n".join(p) for p in itertools.product("abcd", repeat=3)]
    assert sorted(c for c in candidates if TASK.score(c, small)) == sorted(
        "\n".join(p) for p in itertools.permutations("abc")
    )


def test_one_token_per_letter_and_line():
    """Every letter of the prompt and the answer is its own token, so every choice is one prediction."""
    from protege.demo.task import load_tokenizer

    tokenizer = load_tokenizer()
    text = tokenizer.apply_chat_template(TASK.conversation(EXAMPLE), tokenize=False)
    assert text.startswith("<|im_start|>user\nq,d,m,a,z,k,b,x,e,r,t,h<|im_end|>\n<|im_start|>assistant\nq\nd\n")
    assert tokenizer.tokenize("q,d,m,a,s,y") == list("q,d,m,a,s,y")
    assert len(tokenizer.tokenize("s\ny\ns\nt\ne\nm")) == 11


# ----- Wiring -----


def test_tasks_do_not_share_cached_models():
    from protege.demo.cache import model_fingerprint
    from protege.demo.settings import Settings

    addition, letter = Settings.for_run(False), Settings.for_run(False, "letters")
    assert model_fingerprint("teacher", addition.teacher, addition.teacher_sft, addition, 0)["task"] == "addition"
    mixed = model_fingerprint("teacher", addition.teacher, addition.teacher_sft, letter, 0)
    assert mixed != model_fingerprint("teacher", addition.teacher, addition.teacher_sft, addition, 0)
    assert get_task("letters").name == "letters" and get_task("addition", 10).description.startswith("10-digit")
    with pytest.raises(ValueError):
        get_task("sudoku")


def test_letters_settings():
    from protege.demo.settings import Settings

    full, quick = Settings.for_run(False, "letters"), Settings.for_run(True, "letters")
    assert full.task == quick.task == "letters" and full.sample_eval and quick.sample_eval
    assert full.student.hidden < len(letters.ALPHABET) < full.teacher.hidden  # under-capacity by construction
    assert full.student_sft.stop_at_accuracy is None  # SFT runs its whole schedule
    assert quick.teacher_sft.steps < full.teacher_sft.steps and quick.distill_steps < full.distill_steps


def test_a_teacher_that_failed_its_task_is_named_not_left_to_a_table_of_zeros():
    """The letters task's teacher scores 0% at every budget tried, so its table is all zeros; the console says why
    (and where the docs report it) rather than let that read as distillation failing. A teacher that learned its task
    gets no such line."""
    import io

    from rich.console import Console

    from protege.demo.report import print_teacher_caveat

    def caveat(name: str, teacher: float) -> str:
        console = Console(file=io.StringIO(), width=200)
        results = {"teacher_accuracy": teacher, "task": {"name": name, "metric": get_task(name).metric}}
        print_teacher_caveat(console, results)
        return console.file.getvalue()

    assert caveat("letters", 0.0) == (
        "the teacher scores 0.0% (valid answers): it has not learned the task (docs/benchmarks.md, design 1: no "
        "letters teacher learned it), so it has nothing to pass on and this run cannot show a gain\n"
    )
    assert "has not learned" in caveat("walks", 0.3) and "design 1" not in caveat("walks", 0.3)
    assert caveat("letters", 0.5) == caveat("addition", 1.0) == ""


def test_demo_command_passes_the_task(monkeypatch, tmp_path):
    from protege import cli
    from protege.demo import pipeline

    calls = []
    monkeypatch.setattr(pipeline, "run_demo", lambda *args, **kwargs: calls.append((args, kwargs)))
    assert cli.main(["demo", "--task", "letters", "--quick", "--output-dir", str(tmp_path)]) == 0
    assert calls == [((str(tmp_path),), {"quick": True, "seed": 0, "task": "letters"})]
    assert cli.main(["demo", "--output-dir", str(tmp_path)]) == 0
    assert calls[-1][1]["task"] == "addition"


def test_sampled_scores_are_seeded_and_leave_the_global_generator_alone():
    import torch

    from protege.demo.encoder import Encoder
    from protege.demo.scoring import generate, scores
    from protege.demo.settings import ModelSpec
    from protege.demo.task import load_tokenizer

    encoder = Encoder(load_tokenizer(), TASK)
    model = ModelSpec(layers=1, hidden=16, heads=2).build(encoder.tokenizer, seed=0)
    problems = TASK.held_out_problems(6, seed=0)
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    first = generate(model, encoder, problems, sample=True, seed=11)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert first.texts == generate(model, encoder, problems, sample=True, seed=11).texts
    assert first.texts != generate(model, encoder, problems, sample=True, seed=12).texts
    point = scores(model, encoder, problems, sampled=True, seed=11)
    assert set(point) == {"accuracy", "sampled"} and point["sampled"] == first.accuracy
    assert set(scores(model, encoder, problems, sampled=False, seed=11)) == {"accuracy"}


def test_greedy_scoring_passes_no_sampling_flags(capfd):
    """Greedy scoring (the demo's, and `protege eval --task NAME`'s) gives generate no top_k / top_p, which
    transformers warned it ignores under greedy decoding, once per `protege eval`."""
    from transformers.utils import logging as transformers_logging

    from protege.demo.encoder import Encoder
    from protege.demo.scoring import generate
    from protege.demo.settings import ModelSpec
    from protege.demo.task import load_tokenizer

    encoder = Encoder(load_tokenizer(), TASK)
    model = ModelSpec(layers=1, hidden=16, heads=2).build(encoder.tokenizer, seed=0)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_warning()
    try:
        generate(model, encoder, TASK.held_out_problems(2, seed=0))
    finally:
        transformers_logging.set_verbosity(verbosity)
    assert "generation flags are not valid" not in capfd.readouterr().err


@pytest.mark.parametrize("name", ["letters", "walks"])
def test_a_tiny_verifier_task_run_end_to_end(tmp_path, capsys, name):
    """The demo's pipeline on a task scored by a verifier, with models and budgets tiny enough for seconds:
    results.json holds greedy and sampled validity at every point, and `protege eval --task NAME` reads its held-out
    file."""
    from test_demo import tiny_settings

    from protege.cli import main
    from protege.demo.pipeline import run_demo
    from protege.demo.settings import ModelSpec, Settings

    task = get_task(name)
    tiny = tiny_settings(Settings.for_run(True, name), student=ModelSpec(layers=1, hidden=16, heads=2))
    results = run_demo(str(tmp_path), settings=tiny)
    assert results["task"]["name"] == name and results["task"]["metric"] == task.metric
    assert [sorted(point) for point in results["accuracy_curve"]] == [["accuracy", "sampled", "step"]] * 3
    assert results["accuracy_curve"][0]["sampled"] == results["student_sampled_accuracy_before"]
    assert results["accuracy_curve"][-1]["sampled"] == results["student_sampled_accuracy_after"]
    assert 0.0 <= results["teacher_sampled_accuracy"] <= 1.0
    assert f"{task.metric}, sampled T=1" in capsys.readouterr().out
    assert (tmp_path / "accuracy.png").exists()
    held_out = [json.loads(row) for row in (tmp_path / "held_out.jsonl").read_text().splitlines()]
    assert len(held_out) == 8
    for row in held_out:
        user, assistant = row["messages"]
        assert task.score(assistant["content"], task.parse_problem(user["content"])) == 1.0
    output = tmp_path / "eval.json"
    code = main(
        ["eval", "--model", str(tmp_path / "student_distilled"), "--teacher", str(tmp_path / "teacher")]
        + ["--dataset_name", str(tmp_path / "held_out.jsonl"), "--task", name, "--output", str(output)]
    )
    assert code == 0
    assert json.loads(output.read_text())["student_accuracy"] == results["student_accuracy_after"]


# ----- The comparison's decision rule (benchmarks/gkd_table.py) -----


def run(method: str, seed: int, gain: float, start: float = 0.3) -> dict:
    final = start + gain
    curve = [{"step": 0, "accuracy": start, "sampled": start}, {"step": 10, "accuracy": final, "sampled": final}]
    return {
        "seed": seed,
        "method": method,
        "start_accuracy": start,
        "teacher_accuracy": 1.0,
        "start_sampled_accuracy": start,
        "teacher_sampled_accuracy": 0.99,
        "accuracy": final,
        "sampled_accuracy": final,
        "curve": curve,
        "completion_tokens": 100,
        "train_seconds": 1.0,
    }


def test_criterion_follows_the_protocol():
    methods = ["supervised_fkl", "supervised_rkl", "onpolicy_jsd", "onpolicy_rkl", "sft"]
    gains = {
        "supervised_fkl": [0.05, 0.06, 0.04],
        "supervised_rkl": [0.09, 0.10, 0.11],  # the best supervised KD: mean 0.10, std 0.01
        "onpolicy_jsd": [0.20, 0.10, 0.30],  # the best on-policy: mean 0.20, std 0.10
        "onpolicy_rkl": [0.14, 0.15, 0.16],
        "sft": [0.5, 0.5, 0.5],  # not a distillation family: ignored
    }
    results = [run(method, seed, gain) for method in methods for seed, gain in enumerate(gains[method])]
    verdict = gkd_table.criterion(gkd_table.aggregate(results, methods), "sampled_")
    assert (verdict["onpolicy"], verdict["supervised"]) == ("onpolicy_jsd", "supervised_rkl")
    assert verdict["ratio"] == pytest.approx(2.0) and verdict["difference"] == pytest.approx(0.10)
    # The margin is twice the larger of the two standard deviations: 0.2 here, so a ratio of 2 is not enough.
    assert verdict["two_std"] == pytest.approx(0.2)
    assert verdict["ratio_met"] and not verdict["margin_met"] and not verdict["met"]

    # A clear win: ratio 3, difference 0.2 against 2 std of 0.02.
    clear = {**gains, "onpolicy_jsd": [0.29, 0.30, 0.31], "onpolicy_rkl": [0.0, 0.0, 0.0]}
    results = [run(method, seed, gain) for method in methods for seed, gain in enumerate(clear[method])]
    verdict = gkd_table.criterion(gkd_table.aggregate(results, methods), "sampled_")
    assert verdict["met"] and verdict["onpolicy"] == "onpolicy_jsd"
    assert verdict["paired_difference_mean"] == pytest.approx(0.2)
    # Ratio 1.4 fails however small the spread.
    close = {**clear, "onpolicy_jsd": [0.14, 0.14, 0.14]}
    results = [run(method, seed, gain) for method in methods for seed, gain in enumerate(close[method])]
    verdict = gkd_table.criterion(gkd_table.aggregate(results, methods), "")
    assert not verdict["ratio_met"] and verdict["margin_met"] and not verdict["met"]
    # Supervised KD losing ground: any positive on-policy gain meets the ratio.
    worse = {**clear, "supervised_fkl": [-0.1, -0.1, -0.1], "supervised_rkl": [-0.05, -0.05, -0.05]}
    results = [run(method, seed, gain) for method in methods for seed, gain in enumerate(worse[method])]
    verdict = gkd_table.criterion(gkd_table.aggregate(results, methods), "")
    assert verdict["ratio"] is None and verdict["ratio_met"]
    line = gkd_table.criterion_line(verdict, "greedy")
    assert line.startswith("Criterion, greedy: best on-policy (On-policy GKD, JSD(0.5)) gain +30.0")
    assert line.endswith("**met**.")
