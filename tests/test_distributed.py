"""Real processes under torchrun (gloo on CPU): ranks agree, and the world size does not change the update."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port
from tiny import assert_same_update, ended_well

TESTS = Path(__file__).parent
pytestmark = pytest.mark.slow  # torchrun processes: not in the fast tier


def torchrun(processes: int, tiny_paths: dict[str, str], out: Path, **settings: object) -> list[dict]:
    """tests/dist_train.py on `processes` ranks with `settings` over its defaults; each rank's report."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)),
        *("--master_addr", "127.0.0.1", "--master_port", str(free_port())),
        *(str(TESTS / "dist_train.py"), tiny_paths["student"], tiny_paths["teacher"], str(out), json.dumps(settings)),
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    reports = [out / f"rank{r}.json" for r in range(processes)]
    assert ended_well(result.returncode, result.stderr, reports), result.stderr[-4000:]
    return [json.loads(report.read_text()) for report in reports]


def test_two_processes_agree_and_resume_exactly(tiny_paths, tmp_path):
    """With two teachers, rows routed between them: ranks agree; each checkpoint is published whole (both ranks' RNG
    states in it, no staging folder left); and resuming both ranks from the step-2 checkpoint ends with the
    uninterrupted run's weights and draws."""
    two = {"specialist": tiny_paths["specialist"]}
    ranks = torchrun(2, tiny_paths, tmp_path / "straight", save_strategy="steps", save_steps=2, **two)
    assert [r["world"] for r in ranks] == [2, 2]
    tokens = ranks[0]["teacher_tokens"]  # per teacher, summed over ranks: the same on both, each teacher used
    assert tokens == ranks[1]["teacher_tokens"] and len(tokens) == 4 and all(a > 0 and b > 0 for a, b in tokens)
    assert len(ranks[0]["fractions"]) == 4
    assert ranks[0]["fractions"] == ranks[1]["fractions"]
    assert 0 < sum(ranks[0]["fractions"]) < 4  # lmbda = 0.5 gave both kinds of slices
    assert ranks[0]["weights"] == ranks[1]["weights"]
    out = tmp_path / "straight" / "out"
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-2", "checkpoint-4"]
    expected = {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json", "optimizer.pt", "model.safetensors"}
    for step in (2, 4):
        assert expected <= {p.name for p in (out / f"checkpoint-{step}").iterdir()}

    resumed = torchrun(2, tiny_paths, tmp_path / "resumed", resume=str(out / "checkpoint-2"), **two)
    assert [r["fractions"] for r in resumed] == [ranks[0]["fractions"][2:]] * 2
    assert [r["weights"] for r in resumed] == [ranks[0]["weights"]] * 2


def test_world_size_does_not_change_the_update(tiny_paths, tmp_path):
    """2 processes x 4 micro-batches and 1 process x 8 micro-batches of one row: the same weights after 2 steps.

    DDP keeps ranks equal whatever the loss scale, so `test_two_processes_agree` cannot see a normalisation that
    depends on the world size; comparing against one process can. Both runs see the same 8 rows per optimizer step:
    the sampler is seeded (transformers' default `use_seedable_sampler`), so its order does not depend on the world
    size, and accelerate shards whole batches, rank r taking batches r, r + 2, ... of that order (`split_batches`
    False). Off-policy only (lmbda 0), so nothing is sampled. Plain SGD, so the update is lr x gradient: a loss scaled
    by 2 on one side moves the weights twice as far (AdamW would divide the scale away), and the learning rate is
    large enough that the step is far above the tolerance (checked below against the untrained weights).
    """
    settings = dict(lmbda=0.0, per_device_train_batch_size=1, optim="sgd", learning_rate=2.0, max_steps=2, rows=16)
    two = torchrun(2, tiny_paths, tmp_path / "two", gradient_accumulation_steps=4, **settings)
    one = torchrun(1, tiny_paths, tmp_path / "one", gradient_accumulation_steps=8, **settings)
    assert [r["world"] for r in two] == [2, 2] and one[0]["world"] == 1
    assert [r["fractions"] for r in two + one] == [[0.0, 0.0]] * 3

    assert_same_update(tiny_paths["student"], tmp_path / "two", tmp_path / "one", "a 2x loss scale")
    assert two[0]["loss"] == pytest.approx(one[0]["loss"], rel=1e-5)

    # The policy-gradient objective with a task reward: the reward's baseline is the step's mean over both ranks. With
    # top_k 1 each rank samples what one process does (the argmax), so the updates can be compared.
    policy = dict(settings, lmbda=1.0, on_policy_objective="policy_gradient", top_k=1, kl_discount_factor=0.5)
    policy |= dict(reward_funcs=["tiny:length_reward"], learning_rate=0.5)
    torchrun(2, tiny_paths, tmp_path / "pg2", gradient_accumulation_steps=4, **policy)
    torchrun(1, tiny_paths, tmp_path / "pg1", gradient_accumulation_steps=8, **policy)
    assert_same_update(tiny_paths["student"], tmp_path / "pg2", tmp_path / "pg1", "a 2x policy-gradient scale")

    # From an offline teacher cache, each rank reading its own rows: the same update, with no teacher model
    from dist_train import SETTINGS
    from test_teacher_cache import make_cache
    from tiny import config, dataset

    from protege.models import load_tokenizer

    cache_args = config(tmp_path, **(SETTINGS | {"lmbda": 0.0}))
    tokenizer = load_tokenizer(tiny_paths["student"], False)  # the tokenizer the workers load
    make_cache(tiny_paths, tmp_path / "cache", cache_args, rows=dataset(16), tokenizer=tokenizer)
    torchrun(
        2,
        tiny_paths,
        tmp_path / "cached",
        gradient_accumulation_steps=4,
        **settings,
        teacher_cache=str(tmp_path / "cache"),
    )
    assert_same_update(tiny_paths["student"], tmp_path / "cached", tmp_path / "one", "rows read from another rank")
