"""Issue 28's benchmark (`python -m benchmarks opd_vs_rl`): the walk-validity reward on known walks, the methods'
settings, and the harness's summary and criteria on made-up runs. The slow test trains each trainer method for two
steps on untrained tiny models, to show the pieces run together; it says nothing about the results."""

from __future__ import annotations

import pytest

from benchmarks.opd_vs_rl import aggregate, criteria, curve_steps, point_step
from protege.demo.rl_run import METHODS, summarise_logs, trainer_rows, walk_validity_reward
from protege.demo.walks import GRAPH, STEPS, Problem, Walks

PREFIX = ("A", GRAPH["A"][0], GRAPH[GRAPH["A"][0]][1])


def walk(start: str, steps: int = STEPS) -> str:
    node, nodes = start, []
    for step in range(steps):
        node = GRAPH[node][step % 3]
        nodes.append(node)
    return "".join(nodes)


VALID = walk(PREFIX[-1])
NON_EDGE = next(n for n in GRAPH if n not in GRAPH[VALID[4]] and n != VALID[4])
CASES = {
    VALID: 1.0,
    VALID + "<|im_end|>": 1.0,  # the end-of-turn marker ends the completion
    VALID[:-1]: 0.0,  # one step short
    VALID + walk(VALID[-1], 1): 0.0,  # one step too many
    VALID[:5] + NON_EDGE + VALID[6:]: 0.0,  # step 6 is not an edge
    "": 0.0,
}


def test_the_reward_is_the_verifier_on_decoded_completions_with_either_prompt_form():
    reward = walk_validity_reward()
    assert reward.__name__ == "walk_validity"  # its metrics: reward/walk_validity/mean
    completions = list(CASES)
    text_prompt = ["".join(PREFIX)] * len(CASES)
    assert reward(prompts=text_prompt, completions=completions) == list(CASES.values())
    messages = [[{"role": "user", "content": "".join(PREFIX)}]] * len(CASES)
    conversational = [[{"role": "assistant", "content": c}] for c in completions]
    assert reward(messages, conversational, completion_ids=None, trainer_state=None) == list(CASES.values())
    assert Walks().score(VALID, Problem(PREFIX)) == 1.0  # the same verifier scores the held-out walks


def test_the_reward_decodes_completion_ids_cut_at_the_first_end_of_turn():
    from protege.demo.task import load_tokenizer

    tokenizer = load_tokenizer()
    reward = walk_validity_reward(tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    valid = tokenizer.convert_tokens_to_ids(list(VALID))
    ids = [valid + [eos], valid + [eos, pad, pad], valid + [eos] + valid[:3], valid[:-1] + [eos], valid + valid[:1]]
    values = reward(["".join(PREFIX)] * len(ids), ["ignored"] * len(ids), completion_ids=ids, trainer_state=None)
    assert values == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_the_methods_share_steps_and_completions_and_only_rl_runs_without_a_teacher():
    assert list(METHODS) == ["gkd", "pg_opd", "pg_opd_reward", "rl", "sft"]
    assert [m for m, method in METHODS.items() if method.distillation] == ["gkd", "pg_opd", "pg_opd_reward"]
    rl, pg = METHODS["rl"], METHODS["pg_opd"]
    assert (rl.fields["kl_coef"], rl.generations, rl.reward, rl.teacher) == (0.0, 4, True, False)
    assert (pg.fields["kl_coef"], pg.generations, pg.reward, pg.teacher_bytes) == (1.0, 1, False, "4")
    assert METHODS["gkd"].fields["beta"] == 1.0 and METHODS["gkd"].fields["on_policy_objective"] == "divergence"
    problems = [Problem(PREFIX)] * 200
    assert len(trainer_rows(rl, Walks(), problems, steps=10, batch_size=16)) == 40  # 4 prompts x 4 samples a step
    assert len(trainer_rows(pg, Walks(), problems, steps=10, batch_size=16)) == 160
    with pytest.raises(ValueError, match="prompts needed"):
        trainer_rows(pg, Walks(), problems, steps=20, batch_size=16)


def test_logged_figures_are_averaged_and_the_largest_rho_kept():
    logs = [{"loss": 1.0, "pg/rho_mean": 1.0, "pg/rho_max": 1.5}, {"pg/rho_mean": 0.5, "pg/rho_max": 2.0}, {}]
    assert summarise_logs(logs) == {"pg/rho_mean": 0.75, "pg/rho_max": 2.0}


def run(method: str, seed: int, finals: list[float], start: float = 0.1) -> dict:
    """A made-up run: validity rising from `start` through `finals` (steps 10, 20, ...)."""
    curve = [{"step": 0, "sampled": start, "accuracy": 1.0}]
    curve += [{"step": 10 * (i + 1), "sampled": v, "accuracy": 1.0} for i, v in enumerate(finals)]
    logged = {"pg/rho_mean": 1.0} if method.startswith("pg") else {}
    record = {"seed": seed, "method": method, "start": {"sampled": start}, "curve": curve, "completion_tokens": 100}
    return record | {"train_seconds": 1.0, "logged": logged}


def test_summary_gains_reaching_steps_and_both_criteria():
    settings = {"steps": 50, "eval_every": 10}
    results = []
    for seed, shift in ((0, 0.0), (1, 0.02)):
        results += [
            run("gkd", seed, [0.3 + shift, 0.5, 0.6, 0.6, 0.6]),
            run("pg_opd", seed, [0.2, 0.3, 0.4, 0.5, 0.55]),
            run("rl", seed, [0.12, 0.14, 0.16, 0.18, 0.2 + shift]),
            run("sft", seed, [0.7, 0.8, 0.8, 0.8, 0.8]),
        ]
    rows = {row["method"]: row for row in aggregate(results, ["gkd", "pg_opd", "rl", "sft"], settings)}
    assert rows["gkd"]["gain"][0] == pytest.approx(50.0) and rows["pg_opd"]["gain"][0] == pytest.approx(45.0)
    assert rows["gkd"]["reach_mean"] == 10 and rows["gkd"]["reach_per_seed"] == [10, 10]
    assert rows["pg_opd"]["reach_mean"] == 20 and rows["pg_opd"]["reach_per_seed"] == [10, 20]
    assert "reach_mean" not in rows["sft"] and "reach_mean" not in rows["rl"]  # neither learns from the teacher
    assert rows["gkd"]["curve"]["0"] == pytest.approx(10.0) and rows["pg_opd"]["pg/rho_mean"] == 1.0
    first, second = criteria(list(rows.values()), settings)
    assert first["ratio"] == pytest.approx(0.9) and first["met"]
    assert second["met"] and "gkd 10" in second["found"]  # 10 <= 50 / 5
    slow = [run("gkd", 0, [0.1, 0.1, 0.1, 0.1, 0.3]), run("pg_opd", 0, [0.1] * 5), run("rl", 0, [0.2] * 5)]
    first, second = criteria(aggregate(slow, ["gkd", "pg_opd", "rl"], settings), settings)
    assert not first["met"] and not second["met"] and "pg_opd not reached" in second["found"]
    worse = [run("gkd", 0, [0.1] * 5), run("pg_opd", 0, [0.1] * 5), run("rl", 0, [0.05] * 5)]
    _, second = criteria(aggregate(worse, ["gkd", "pg_opd", "rl"], settings), settings)
    assert second["met"] and "gkd 0, pg_opd 0 (RL-only ended at or below its start" in second["found"]


def test_curve_points_are_scored_steps():
    settings = {"steps": 200, "eval_every": 10}
    assert [point_step(settings, share) for share in (0.25, 0.5, 1.0)] == [50, 100, 200]
    assert point_step({"steps": 10, "eval_every": 5}, 0.25) == 5  # the first scored step at or after 2.5
    assert curve_steps(settings) == [0, 10, 20, 30, 40, 50, 100, 150, 200]
    assert curve_steps({"steps": 10, "eval_every": 5}) == [0, 5, 10]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gkd", "pg_opd", "pg_opd_reward", "rl"])
def test_each_trainer_method_runs_two_steps_on_tiny_models(tmp_path, name):
    import copy
    from dataclasses import replace
    from types import SimpleNamespace

    from rich.progress import Progress

    from protege.demo.encoder import Encoder
    from protege.demo.rl_run import run_trainer_method
    from protege.demo.settings import Settings
    from protege.demo.task import load_tokenizer

    settings = replace(
        Settings.walks(), distill_steps=2, distill_batch_size=8, eval_every=1, eval_problems=8, kl_problems=8
    )
    task, tokenizer = Walks(), load_tokenizer()
    student = settings.student.build(tokenizer, seed=2)
    prepared = SimpleNamespace(
        encoder=Encoder(tokenizer, task),
        eval_problems=task.held_out_problems(8, 0),
        teacher=settings.teacher.build(tokenizer, seed=1),
        student=student,
    )
    before = copy.deepcopy(student.state_dict())
    problems = task.training_problems(16, 0, prepared.eval_problems, "distill")
    start = {"accuracy": 0.0, "sampled": 0.0}
    result = run_trainer_method(name, prepared, settings, 0, problems, start, tmp_path, Progress(disable=True))
    assert [point["step"] for point in result["curve"]] == [0, 1, 2]
    assert result["completion_tokens"] > 0 and result["prompts"] == 16 // METHODS[name].generations
    assert student.state_dict()["lm_head.weight"].equal(before["lm_head.weight"])  # the run trained a copy
    if METHODS[name].reward:
        assert "reward/walk_validity/mean" in result["logged"]
    if name.startswith("pg"):
        assert {"pg/rho_mean", "pg/teacher_advantage_mean"} <= set(result["logged"])
