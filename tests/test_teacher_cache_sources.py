"""Teacher caches from a teacher server, and one cache per teacher in a run of several: `protege cache-teacher
--teacher URL` (a hidden-format server gives the exact hidden cache, a log-prob server a top-k one), and
`teacher_cache={name: folder}` (each teacher's off-policy rows from its own cache, the others live)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import free_port, start_server, stop_server
from datasets import Dataset
from safetensors.torch import load_file
from test_teacher_cache import weights
from tiny import config, dataset
from transformers import AutoModelForCausalLM

from protege import DistillationTrainer
from protege.cli import main
from protege.teacher.cache import CacheManifest
from protege.teacher.cached import CachedTeacher
from protege.teacher.head import config_sha256, load_head

LENGTHS = ["--max_length", "48", "--max_completion_length", "12"]  # tiny.config's
NAMES = ("math", "code")


def write_rows(path, rows: Dataset) -> str:
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return str(path)


def routed(rows: int) -> Dataset:
    """Arithmetic rows whose `teacher` column alternates between the two teachers."""
    return dataset(rows).map(lambda _, i: {"teacher": NAMES[i % 2]}, with_indices=True)


def cache_teacher(tiny_paths, teacher: str, data: str, output, *extra: str) -> CacheManifest:
    argv = ["cache-teacher", "--teacher", teacher, "--tokenizer", tiny_paths["student"], "--dataset_name", data]
    assert main([*argv, *LENGTHS, "--output", str(output), *extra]) == 0
    return CacheManifest.read(output)


def train(tiny_paths, out, rows: Dataset, steps: int = 3, **settings) -> DistillationTrainer:
    """`steps` steps of 2 slices of 2 rows (the trainer's shuffled order); the student's tokenizer loaded as `protege
    train` loads it (the one cache-teacher keys rows by)."""
    trainer = DistillationTrainer(
        model=tiny_paths["student"],
        teacher_model=settings.pop("teacher_model", None),
        args=config(out, max_steps=steps, **settings),
        train_dataset=rows,
    )
    trainer.train()
    return trainer


def losses(trainer: DistillationTrainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def assert_same_training(cached: DistillationTrainer, live: DistillationTrainer, rel: float = 1e-5) -> None:
    assert len(losses(live)) == 3 and losses(cached) == pytest.approx(losses(live), rel=rel)
    for name, value in weights(live).items():
        torch.testing.assert_close(weights(cached)[name], value, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_a_hidden_servers_cache_trains_like_the_local_teacher(tiny_paths, tmp_path, teacher_url, beta):
    """The server's float32 hidden states and its LM head: three steps at lmbda=0, no teacher given, equal the live
    local teacher's losses and weights; the manifest names the server's model, config and head."""
    data = write_rows(tmp_path / "rows.jsonl", dataset(24))
    manifest = cache_teacher(tiny_paths, teacher_url, data, tmp_path / "cache", "--dtype", "float32")
    local = AutoModelForCausalLM.from_pretrained(tiny_paths["teacher"], dtype=torch.float32)
    assert manifest.teacher["server_model"] == "teacher" and manifest.hidden_size == 64
    assert manifest.teacher["config_sha256"] == config_sha256(local.config)
    head = load_head(tmp_path / "cache" / "lm_head.safetensors")
    assert torch.equal(head.weight, local.lm_head.weight)
    assert manifest.teacher["lm_head_tensors_sha256"] == head.tensors_sha256()  # of the served head's values
    assert (manifest.rows, manifest.format, manifest.dtype) == (24, "hidden", "float32")
    settings = dict(lmbda=0.0, beta=beta, loss_top_k=0)
    live = train(tiny_paths, tmp_path / "live", dataset(24), teacher_model=tiny_paths["teacher"], **settings)
    cached = train(tiny_paths, tmp_path / "cached", dataset(24), teacher_cache=str(tmp_path / "cache"), **settings)
    assert isinstance(cached.teacher, CachedTeacher) and cached.teacher.live is None
    assert_same_training(cached, live)


@pytest.mark.slow
def test_a_log_prob_servers_cache_trains_like_the_live_server(tiny_paths, tmp_path, teacher_url):
    """A top-5 cache from the server's compact log-probs: the same losses and weights as training against the live
    server's top-5 (beta 0)."""
    data = write_rows(tmp_path / "rows.jsonl", dataset(24))
    manifest = cache_teacher(tiny_paths, teacher_url, data, tmp_path / "top", "--format", "topk", "--loss_top_k", "5")
    assert (manifest.format, manifest.top_k, manifest.hidden_size) == ("topk", 5, None)
    assert manifest.teacher["server_model"] == "teacher" and len(manifest.teacher["lm_head_tensors_sha256"]) == 64
    settings = dict(lmbda=0.0, beta=0.0, loss_top_k=5)
    served = dict(
        use_teacher_server=True, teacher_model_server_url=teacher_url, teacher_server_response_format="compact"
    )
    live = train(tiny_paths, tmp_path / "live", dataset(24), **served, **settings)
    cached = train(tiny_paths, tmp_path / "cached", dataset(24), teacher_cache=str(tmp_path / "top"), **settings)
    assert cached.teacher.returns == "scores"
    assert_same_training(cached, live)


@pytest.mark.slow
def test_a_killed_server_build_resumes_against_the_server_restarted_elsewhere(
    tiny_paths, tmp_path, teacher_url, capsys
):
    """The manifest's teacher is what the server reports, not its URL: a build cut after its first shard finishes
    against the same model served on another port, to the uninterrupted build's bytes; another model is refused."""
    data = write_rows(tmp_path / "rows.jsonl", dataset(24))
    shards = ("--rows_per_shard", "8")
    whole = cache_teacher(tiny_paths, teacher_url, data, tmp_path / "whole", *shards)
    shutil.copytree(tmp_path / "whole", tmp_path / "cut")
    cut = CacheManifest.read(tmp_path / "cut")
    for name in cut.shards[1:]:
        (tmp_path / "cut" / name).unlink()
    first = load_file(str(tmp_path / "cut" / cut.shards[0]))["row_offsets"][-1]
    cut.shards, cut.rows, cut.tokens, cut.complete = cut.shards[:1], 8, int(first), False
    cut.write(tmp_path / "cut")
    for model, folder in (("specialist", "cut-copy"), ("teacher", "cut")):
        if folder == "cut-copy":
            shutil.copytree(tmp_path / "cut", tmp_path / folder)
        process = start_server(tiny_paths[model], port := free_port())
        try:
            url = f"http://127.0.0.1:{port}"
            argv = ["cache-teacher", "--teacher", url, "--tokenizer", tiny_paths["student"], "--dataset_name", data]
            code = main([*argv, *LENGTHS, "--output", str(tmp_path / folder), *shards])
        finally:
            stop_server(process)
        if model == "specialist":
            assert code == 2 and "already holds a cache whose teacher differs" in capsys.readouterr().err
        else:
            assert code == 0, capsys.readouterr().err
    resumed = CacheManifest.read(tmp_path / "cut")
    assert (resumed.rows, resumed.tokens, resumed.shards, resumed.complete) == (24, whole.tokens, whole.shards, True)
    for name in whole.shards:
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name


def test_a_server_url_needs_the_students_tokenizer(tiny_paths, tmp_path, capsys):
    argv = ["cache-teacher", "--teacher", "http://127.0.0.1:9", "--dataset_name", "d", "--output", str(tmp_path)]
    assert main(argv) == 2
    assert "--tokenizer is required with a teacher server URL" in capsys.readouterr().err


def test_two_teachers_each_from_its_cache_train_like_the_two_live_teachers(tiny_paths, tmp_path):
    """`cache-teacher --teacher_name` caches each teacher's rows only; training with the two caches (JSON text, as
    on the command line), no teacher loaded, equals training with the two live teachers; with one cache and one live
    teacher too."""
    data = write_rows(tmp_path / "rows.jsonl", routed(24))
    teachers = {"math": tiny_paths["teacher"], "code": tiny_paths["specialist"]}
    for name, path in teachers.items():
        extra = ("--teacher_name", name, "--dtype", "float32")
        manifest = cache_teacher(tiny_paths, path, data, tmp_path / name, *extra)
        assert (manifest.rows, manifest.teacher_name) == (12, name)
    settings = dict(lmbda=0.0, beta=0.5, loss_top_k=0)
    live = train(tiny_paths, tmp_path / "live", routed(24), teacher_model=teachers, **settings)
    caches = json.dumps({name: str(tmp_path / name) for name in teachers})
    cached = train(tiny_paths, tmp_path / "cached", routed(24), teacher_cache=caches, **settings)
    assert [(t.name, t.route, t.live) for t in cached.teachers] == [("math", 0, None), ("code", 1, None)]
    assert_same_training(cached, live)
    half = train(
        tiny_paths,
        tmp_path / "half",
        routed(24),
        teacher_model=teachers,
        teacher_cache={"code": str(tmp_path / "code")},
        **settings,
    )
    assert not isinstance(half.teachers[0], CachedTeacher) and half.teachers[1].live.name == "code"
    assert_same_training(half, live)


def test_each_teachers_cache_is_checked_and_named(tiny_paths, tmp_path, capsys):
    data = write_rows(tmp_path / "rows.jsonl", routed(24))
    cache_teacher(tiny_paths, tiny_paths["teacher"], data, tmp_path / "math", "--teacher_name", "math")
    math = str(tmp_path / "math")
    settings = dict(lmbda=0.0, beta=0.5, loss_top_k=0)

    def trainer(**more) -> DistillationTrainer:
        return DistillationTrainer(model=tiny_paths["student"], args=config(tmp_path, **settings | more), **rows)

    rows = dict(train_dataset=routed(24))
    with pytest.raises(ValueError, match=r'^teacher "code": teacher_cache=.* holds the rows of teacher \'math\''):
        trainer(teacher_cache={"math": math, "code": math})
    code = {"code": tiny_paths["specialist"]}
    with pytest.raises(ValueError, match=r'^teacher "math": train_dataset row 24 is not in teacher_cache='):
        rows = dict(train_dataset=routed(26))  # row 24 is math's and not cached; row 25 is code's (live)
        trainer(teacher_cache={"math": math}, teacher_model_name_or_path=code)
    rows = dict(train_dataset=routed(24))
    with pytest.raises(ValueError, match=r'^teacher "code": teacher_cache=.*nowhere.* has no manifest.json'):
        trainer(teacher_cache={"math": math, "code": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match=r'^teacher "math": teacher_cache=.* with max_length=48, this run has max_len'):
        trainer(teacher_cache={"math": math}, teacher_model_name_or_path=code, max_length=40)
    with pytest.raises(ValueError, match=r"^teacher_cache is one folder, but the run has the teachers \['math', 'code"):
        trainer(teacher_cache=math, teacher_model_name_or_path={"math": tiny_paths["teacher"]} | code)
    with pytest.raises(ValueError, match=r'^teacher "math" has a cache only \(teacher_cache\).* lmbda=0.5'):
        trainer(teacher_cache={"math": math}, teacher_model_name_or_path=code, lmbda=0.5)
    # default_teacher may name a teacher that has a cache only: math's rows leave the column empty
    rows = dict(
        train_dataset=dataset(24).map(lambda _, i: {"teacher": None if i % 2 == 0 else "code"}, with_indices=True)
    )
    mixed = trainer(teacher_cache={"math": math}, teacher_model_name_or_path=code, default_teacher="math")
    assert [t.name for t in mixed.teachers] == ["code", "math"] and mixed.teachers[1].route == 1
    assert mixed.train_dataset["teacher_index"][:4] == [1, 0, 1, 0]
    capsys.readouterr()
    argv = ["cache-teacher", "--teacher", tiny_paths["teacher"], "--tokenizer", tiny_paths["student"]]
    argv += ["--dataset_name", data, "--output", str(tmp_path / "c"), "--teacher_name", "chat"]
    assert main(argv) == 2
    assert "--teacher_name 'chat': no row of dataset" in capsys.readouterr().err
