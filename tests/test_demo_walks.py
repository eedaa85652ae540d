"""`protege demo --task walks`: the third embedded task's graph, data, verifier and settings.

The task is design 2 of issue 15 (docs/benchmarks.md, "A task where the student's own mistakes matter"); these tests
check the task itself, not the comparison's result. The pipeline run on it is in test_demo_letters.py's end-to-end
test, parametrised over the tasks.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protege.demo import walks
from protege.demo.tasks import get_task
from protege.demo.walks import GRAPH, NODES, Problem, Walks

TASK = Walks()


def valid_walk(start: str, choices: list[int]) -> str:
    """The walk from `start` that takes successor number `choices[i]` at step i."""
    node, walk = start, []
    for choice in choices:
        node = GRAPH[node][choice % walks.SUCCESSORS]
        walk.append(node)
    return "".join(walk)


EXAMPLE = Problem(("A", *valid_walk("A", [0, 1, 2])))
ANSWER = valid_walk(EXAMPLE.prefix[-1], [step % 3 for step in range(walks.STEPS)])


# ----- The graph -----


def test_graph_is_fixed_three_out_and_strongly_connected():
    assert walks.build_graph() == GRAPH  # the same on every import and machine: a fixed seed
    assert walks.build_graph("another seed") != GRAPH
    assert sorted(GRAPH) == sorted(NODES) and len(NODES) == 36
    for node, successors in GRAPH.items():
        assert len(set(successors)) == walks.SUCCESSORS and node not in successors
        assert set(successors) <= set(NODES)
    for start in NODES:  # every node reaches every other, so walks from any prompt can go anywhere
        seen, frontier = {start}, [start]
        while frontier:
            for following in GRAPH[frontier.pop()]:
                if following not in seen:
                    seen.add(following)
                    frontier.append(following)
        assert len(seen) == len(NODES)


def test_one_token_per_node():
    """Every node is its own token, so every step is one prediction, however nodes follow one another."""
    from protege.demo.task import load_tokenizer

    tokenizer = load_tokenizer()
    rng = random.Random(0)
    for _ in range(200):
        text = "".join(rng.choice(NODES) for _ in range(24))
        assert tokenizer.tokenize(text) == list(text)
    text = tokenizer.apply_chat_template(TASK.conversation(Problem(EXAMPLE.prefix, tuple(ANSWER))), tokenize=False)
    assert text.startswith(f"<|im_start|>user\n{''.join(EXAMPLE.prefix)}<|im_end|>\n<|im_start|>assistant\n{ANSWER}")


# ----- Data from seeds -----


def test_problems_are_fixed_by_the_seed_and_valid():
    held_out = TASK.held_out_problems(300, seed=3)
    assert [(p.prefix, p.walk) for p in held_out] == [(p.prefix, p.walk) for p in TASK.held_out_problems(300, seed=3)]
    assert [p.prefix for p in held_out] != [p.prefix for p in TASK.held_out_problems(300, seed=4)]
    assert len({p.prefix for p in held_out}) == 300
    train = TASK.training_problems(500, seed=3, exclude=held_out, stream="teacher")
    assert [p.walk for p in train] != [p.walk for p in TASK.training_problems(500, seed=3, stream="student")]
    assert not {p.prefix for p in train} & {p.prefix for p in held_out}  # no held-out prompt is trained on
    for problem in held_out + train:
        assert len(problem.prefix) == walks.PREFIX and len(problem.walk) == walks.STEPS
        assert TASK.parse_problem("".join(problem.prefix)) == problem
        assert TASK.score(TASK.conversation(problem)[1]["content"], problem) == 1.0


def test_training_walks_are_uniform_over_successors():
    """The teacher learns from diverse valid solutions: each successor of a node is taken about a third of the
    time (3 modes at every step)."""
    counts: dict[tuple[str, str], int] = {}
    for problem in TASK.training_problems(3000, seed=0, stream="teacher"):
        path = (*problem.prefix[-1:], *problem.walk)
        for node, following in zip(path, path[1:]):
            counts[(node, following)] = counts.get((node, following), 0) + 1
    assert set(counts) == {(node, following) for node in NODES for following in GRAPH[node]}
    for node in NODES:
        taken = [counts[(node, following)] for following in GRAPH[node]]
        assert max(taken) < 1.35 * min(taken)


def test_canonical_references_are_valid_and_visit_few_nodes():
    """`Walks.canonical` is the first-successor walk (the house style of gkd_table's --references canonical): valid,
    the same for every row with the same prompt, and concentrated on the few nodes where that map cycles."""
    rows = TASK.training_problems(2000, seed=0, stream="distill")
    visits: dict[str, int] = {}
    for row in rows:
        reference = TASK.canonical(row)
        assert reference == row and reference.prefix == row.prefix
        assert "".join(reference.answer) == valid_walk(row.prefix[-1], [0] * walks.STEPS)
        assert TASK.score("".join(reference.answer), row) == 1.0
        for node in (row.prefix[-1], *reference.answer[:-1]):
            visits[node] = visits.get(node, 0) + 1
    cycling = {node for node in NODES if _on_first_successor_cycle(node)}
    assert sum(visits.get(node, 0) for node in cycling) > 0.8 * sum(visits.values())
    assert len(cycling) < len(NODES) // 4


def test_canonical_dataset_of_the_benchmark_spends_93_percent_of_its_predictions_on_6_nodes():
    """docs/benchmarks.md's design 3 figure: seed 0's 12,800 distillation rows of gkd_table.py (200 steps x 64, the
    500 held-out prompts excluded), made canonical, predict a node of the first-successor cycle 92.6% of the time."""
    held_out = TASK.held_out_problems(500, seed=0)
    rows = TASK.training_problems(200 * 64, seed=0, exclude=held_out, stream="distill")
    cycling = {node for node in NODES if _on_first_successor_cycle(node)}
    assert cycling == {"0", "1", "2", "9", "I", "K"}
    inputs = [node for row in rows for node in (row.prefix[-1], *TASK.canonical(row).answer[:-1])]
    assert len(inputs) == 12_800 * walks.STEPS
    assert round(sum(node in cycling for node in inputs) / len(inputs), 3) == 0.926


def _on_first_successor_cycle(node: str) -> bool:
    following = GRAPH[node][0]
    for _ in range(len(NODES)):
        if following == node:
            return True
        following = GRAPH[following][0]
    return False


# ----- The verifier -----


def test_messages_and_prompt_parsing():
    assert TASK.prompt_messages(EXAMPLE) == [{"role": "user", "content": "".join(EXAMPLE.prefix)}]
    parsed = TASK.parse_problem(f"  {''.join(EXAMPLE.prefix)} ")
    assert parsed.prefix == EXAMPLE.prefix and parsed == EXAMPLE
    # A parsed prompt's answer (which sizes generation) is the first-successor walk: valid, STEPS nodes.
    assert "".join(parsed.answer) == valid_walk(EXAMPLE.prefix[-1], [0] * walks.STEPS)
    assert TASK.score(TASK.conversation(parsed)[1]["content"], parsed) == 1.0
    non_edge = next(node for node in NODES if node not in GRAPH["A"])
    for prompt in ("", "a", f"A{non_edge}", "A,B", "482130+359712", "A!"):
        with pytest.raises(ValueError, match="not a walk"):
            TASK.parse_problem(prompt)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2), min_size=walks.STEPS, max_size=walks.STEPS))
def test_verifier_accepts_every_valid_walk(choices):
    answer = valid_walk(EXAMPLE.prefix[-1], choices)
    assert TASK.score(answer, EXAMPLE) == 1.0 and TASK.first_wrong_line(answer, EXAMPLE) is None
    assert TASK.score(answer + "\n", EXAMPLE) == 1.0  # a trailing newline, as the other tasks allow


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2), min_size=walks.STEPS, max_size=walks.STEPS), st.integers(0, walks.STEPS - 1))
def test_verifier_rejects_a_non_edge_anywhere(choices, at):
    answer = list(valid_walk(EXAMPLE.prefix[-1], choices))
    before = EXAMPLE.prefix[-1] if at == 0 else answer[at - 1]
    answer[at] = next(node for node in NODES if node not in GRAPH[before])
    assert TASK.score("".join(answer), EXAMPLE) == 0.0
    assert TASK.first_wrong_line("".join(answer), EXAMPLE) == at + 1


def test_verifier_rejects_invalid_answers():
    cases = {
        ANSWER[:-1]: walks.STEPS,  # one step short
        ANSWER + GRAPH[ANSWER[-1]][0]: walks.STEPS + 1,  # one step too many, even along an edge
        "": 1,
        "x" * walks.STEPS: 1,  # not a node
        ANSWER[:5] + " " + ANSWER[5:-1]: 6,  # a space inside the walk
    }
    for completion, step in cases.items():
        assert TASK.score(completion, EXAMPLE) == 0.0, completion
        assert TASK.first_wrong_line(completion, EXAMPLE) == step, completion


def test_many_modes(monkeypatch):
    """3^20 valid continuations of every prompt: with 2 steps, exactly the 9 two-step paths along edges."""
    last = EXAMPLE.prefix[-1]
    monkeypatch.setattr(walks, "STEPS", 2)
    two_steps = {a + b for a in NODES for b in NODES}
    paths = {a + b for a in GRAPH[last] for b in GRAPH[a]}
    assert {text for text in two_steps if TASK.score(text, EXAMPLE)} == paths and len(paths) == 9
    assert "36-node graph" in TASK.description and get_task("walks").name == "walks"


# ----- Settings -----


def test_walks_settings():
    from protege.demo.settings import Settings

    full, quick = Settings.for_run(False, "walks"), Settings.for_run(True, "walks")
    assert full.task == quick.task == "walks" and full.sample_eval and quick.sample_eval
    # Under-capacity by construction: the student's next-node logits are a linear map of a hidden state far narrower
    # than the 36 nodes; the teacher's is wider than them.
    assert full.student.hidden < len(NODES) // 4 and full.teacher.hidden > len(NODES)
    assert full.student_sft.stop_at_accuracy is None  # SFT runs its whole schedule
    # A quick run trains a shorter teacher only: with the student's warm-up and distillation cut too (300 and 60
    # steps), its sampled walks were 0% valid before and after (issue 23).
    assert quick.teacher_sft.steps < full.teacher_sft.steps
    assert quick.student_sft == full.student_sft and quick.distill_steps == full.distill_steps


def test_plot_tells_greedy_from_sampled_and_keeps_its_title_whole():
    """accuracy.png: the student's greedy and sampled curves differ in marker and colour in the legend (they shared
    one), and the walks task's long title stays inside the figure (it was cut at both ends)."""
    from protege.demo.report import accuracy_figure

    curve = [{"step": step, "accuracy": 1.0, "sampled": 0.15 + step / 400} for step in (0, 100, 200)]
    results = {
        "accuracy_curve": curve,
        "task": {"description": TASK.description, "metric": TASK.metric},
        "teacher_accuracy": 1.0,
        "student_accuracy_before": 1.0,
        "teacher_sampled_accuracy": 0.89,
        "student_sampled_accuracy_before": 0.15,
    }
    figure = accuracy_figure(results)
    axes = figure.axes[0]
    legend = axes.get_legend()
    handles = {text.get_text(): handle for handle, text in zip(legend.legend_handles, legend.texts)}
    greedy = handles["student (on-policy distillation), greedy"]
    sampled = handles["student (on-policy distillation), sampled T=1"]
    assert greedy.get_marker() != sampled.get_marker() and greedy.get_color() != sampled.get_color()
    assert len(handles) == 6
    title = axes.title.get_window_extent(figure.canvas.get_renderer())
    assert title.x0 >= 0 and title.x1 <= figure.bbox.width and title.y1 <= figure.bbox.height
    assert "36-node graph" in axes.get_title()


@pytest.mark.slow
def test_quick_run_moves_the_headline(tmp_path):
    """`protege demo --task walks --quick` shows what the task is for: sampled validity rises (seed 0 here: 14.5% to
    64.0% with a teacher at 89.0%; the full run's student goes from 12.4% to 64.4%). It showed 0.0% -> 0.0% when the
    quick run also cut the student's warm-up and distillation."""
    from protege.demo.pipeline import run_demo

    results = run_demo(str(tmp_path), quick=True, task="walks")
    before, after = results["student_sampled_accuracy_before"], results["student_sampled_accuracy_after"]
    assert results["teacher_sampled_accuracy"] >= 0.8 and results["teacher_accuracy"] >= 0.95
    assert before >= 0.05 and after - before >= 0.25, (before, after)
    assert results["student_accuracy_after"] >= 0.95
