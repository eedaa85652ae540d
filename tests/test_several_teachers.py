"""Several teachers in one run: each row's loss is against its own teacher (a float64 reference per row), local and
served teachers mixed, on-policy samples routed to their row's teacher, per-teacher logs, and the bad inputs."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from reference import ref_rows, topk_support
from tiny import config, dataset, logged, run_example
from transformers import AutoModelForCausalLM

from protege import DistillationConfig, DistillationTrainer
from protege.models import completion_logits
from protege.routing import INDEX_KEY, ROUTES_KEY, TeacherColumn, teacher_routes

NAMES = ("general", "specialist")


def routed(rows: int, names=NAMES, seed: int = 0) -> Dataset:
    """Arithmetic rows whose `teacher` column alternates between `names`."""
    return dataset(rows, seed).map(lambda _, i: {"teacher": names[i % len(names)]}, with_indices=True)


def first_slice(trainer: DistillationTrainer, rows: int = 6) -> dict:
    return trainer.data_collator([trainer.train_dataset[i] for i in range(rows)])


def reference_mean(student_path: str, teacher_paths: list[str], batch: dict, beta: float, support=None) -> float:
    """The mean over completion tokens of each row's divergence from its own teacher (`teacher_paths` by teacher
    index), from float64 copies of the models."""
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()  # noqa: E731
    student, teachers = load(student_path), [load(path) for path in teacher_paths]
    labels = batch["labels"][:, int(batch["prompt_width"]) :]
    mask = labels != -100
    with torch.no_grad():
        student_logits = completion_logits(student, batch, student.config.vocab_size)
        own = torch.stack(
            [
                completion_logits(teachers[int(t)], batch, student.config.vocab_size)[row]
                for row, t in enumerate(batch[INDEX_KEY])
            ]
        )
    terms = ref_rows(student_logits, own, labels, beta=beta, support=support).sum(-1)
    return float(terms[mask].sum() / mask.sum())


def eval_loss(trainer: DistillationTrainer, batch: dict) -> float:
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, batch))


@pytest.mark.parametrize("chunk", ["auto", None])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_each_row_against_its_own_local_teacher(tiny_paths, tmp_path, beta, chunk):
    teachers = [tiny_paths["teacher"], tiny_paths["specialist"]]
    trainer = DistillationTrainer(
        model=tiny_paths["student"],
        teacher_model=dict(zip(NAMES, teachers)),
        args=config(tmp_path, beta=beta, loss_top_k=0, loss_chunk_size=chunk),
        train_dataset=routed(8),
    )
    assert [t.name for t in trainer.teachers] == list(NAMES)
    batch = first_slice(trainer)
    assert batch[INDEX_KEY].tolist() == [0, 1, 0, 1, 0, 1]
    expected = reference_mean(tiny_paths["student"], teachers, batch, beta)
    assert eval_loss(trainer, batch) == pytest.approx(expected, rel=1e-5)
    # the routing matters: the same rows all scored by the first teacher give another loss
    batch[INDEX_KEY] = torch.zeros_like(batch[INDEX_KEY])
    assert reference_mean(tiny_paths["student"], teachers, batch, beta) != pytest.approx(expected, rel=1e-3)


def test_gradients_are_the_sum_of_each_teachers_rows(tiny_paths, tmp_path):
    """The step's gradient with two teachers is the sum of the single-teacher gradients on each one's rows, all
    divided by the step's completion tokens: a row weighs the same whichever teacher scored it."""
    teachers = {"general": tiny_paths["teacher"], "specialist": tiny_paths["specialist"]}
    mixed = DistillationTrainer(
        model=tiny_paths["student"], teacher_model=teachers, args=config(tmp_path / "m"), train_dataset=routed(8)
    )
    batch = first_slice(mixed)
    tokens = batch["labels"].ne(-100).sum()

    def grads(trainer, rows) -> dict[str, torch.Tensor]:
        part = {k: v[rows] if isinstance(v, torch.Tensor) and v.dim() else v for k, v in batch.items()}
        trainer.model.zero_grad()
        trainer.compute_loss(trainer.model, part, num_items_in_batch=tokens).backward()
        return {n: p.grad.clone() for n, p in trainer.model.named_parameters()}

    both = grads(mixed, torch.arange(6))
    expected = None
    for index, (name, path) in enumerate(teachers.items()):
        single = DistillationTrainer(
            model=tiny_paths["student"], teacher_model=path, args=config(tmp_path / name), train_dataset=dataset(8)
        )
        part = grads(single, batch[INDEX_KEY].eq(index).nonzero().squeeze(1))
        expected = part if expected is None else {n: expected[n] + g for n, g in part.items()}
    for name, grad in both.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-8, msg=name)


@pytest.mark.slow
def test_a_local_teacher_beside_a_hidden_server(tiny_paths, tmp_path, teacher_url):
    args = config(
        tmp_path,
        beta=0.5,
        loss_top_k=0,
        teacher_model_server_url={"general": teacher_url},
        teacher_server_response_format={"general": "hidden"},
        teacher_server_hidden_dtype="float32",
    )
    trainer = DistillationTrainer(
        model=tiny_paths["student"],
        teacher_model={"specialist": tiny_paths["specialist"]},
        args=args,
        train_dataset=routed(8),
    )
    assert [(t.name, t.returns) for t in trainer.teachers] == [("specialist", "hidden"), ("general", "hidden")]
    batch = first_slice(trainer)
    # the local teacher comes first, so "general" rows are teacher 1: index by position in trainer.teachers
    expected = reference_mean(tiny_paths["student"], [tiny_paths["specialist"], tiny_paths["teacher"]], batch, 0.5)
    assert eval_loss(trainer, batch) == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_a_hidden_server_beside_a_top_k_server(tiny_paths, tmp_path, teacher_url):
    """Two servers, one sending hidden states and one its top-5 log-probs (json): forward KL on the teacher's top-5
    with a tail for every row, each against its own teacher."""
    from conftest import free_port, start_server, stop_server

    port = free_port()
    process = start_server(tiny_paths["specialist"], port)
    try:
        args = config(
            tmp_path,
            beta=0.0,
            loss_top_k=5,
            teacher_model_server_url={"general": teacher_url, "specialist": f"http://127.0.0.1:{port}"},
            teacher_server_response_format={"general": "hidden", "specialist": "json"},
            teacher_server_hidden_dtype="float32",
        )
        trainer = DistillationTrainer(model=tiny_paths["student"], args=args, train_dataset=routed(8))
        assert [t.returns for t in trainer.teachers] == ["hidden", "scores"]
        batch = first_slice(trainer)
        teachers = [tiny_paths["teacher"], tiny_paths["specialist"]]
        expected = reference_mean(tiny_paths["student"], teachers, batch, 0.0, support=topk_support(5, 0.0))
        assert eval_loss(trainer, batch) == pytest.approx(expected, rel=1e-4)
    finally:
        stop_server(process)


class Recorder:
    """A teacher as it is, that notes which rows (by their teacher index) each call hands it."""

    def __init__(self, teacher, index: int, seen: list):
        self.teacher, self.index, self.seen = teacher, index, seen

    def __getattr__(self, name: str):
        return getattr(self.teacher, name)

    def __call__(self, batch: dict):
        self.seen.append((self.index, batch[INDEX_KEY].tolist()))
        return self.teacher(batch)


def test_on_policy_samples_go_to_their_rows_teacher(tiny_paths, tmp_path):
    """lmbda=1 with gradient accumulation: every call a teacher gets holds only its own rows (on the student's
    samples), each teacher once per slice, and the per-teacher logs add up to the step's tokens."""
    trainer = DistillationTrainer(
        model=tiny_paths["student"],
        teacher_model={"general": tiny_paths["teacher"], "specialist": tiny_paths["specialist"]},
        args=config(tmp_path, lmbda=1.0, max_steps=2, per_device_train_batch_size=3),
        train_dataset=routed(12),
    )
    seen: list[tuple[int, list[int]]] = []
    trainer.teachers = [Recorder(teacher, index, seen) for index, teacher in enumerate(trainer.teachers)]
    trainer.train()
    assert {index for index, _ in seen} == {0, 1}
    assert all(set(rows) == {index} for index, rows in seen)
    assert len(seen) == 2 * 2 * 2  # 2 steps x 2 slices x 2 teachers (3 alternating rows a slice: both have rows)
    tokens = logged(trainer, "completion_tokens")
    per_teacher = [logged(trainer, f"teacher/{name}/completion_tokens") for name in ("general", "specialist")]
    assert [a + b for a, b in zip(*per_teacher)] == tokens
    assert all(logged(trainer, f"teacher/{name}/on_policy_reverse_kl_estimate") for name in ("general", "specialist"))
    assert logged(trainer, "teacher/general/loss")[0] > logged(trainer, "teacher/specialist/loss")[0] >= 0


def test_routes_split_a_slice_and_keep_a_single_teacher_whole():
    batch = {
        "input_ids": torch.arange(12).reshape(4, 3),
        "labels": torch.ones(4, 3, dtype=torch.long),
        "prompt_width": torch.tensor(1),
        INDEX_KEY: torch.tensor([1, 0, 1, 1]),
        "on_policy": True,
    }
    routes = teacher_routes(batch, 3)
    assert [(r.teacher, r.rows.tolist()) for r in routes] == [(0, [1]), (1, [0, 2, 3])]
    assert routes[1].batch["input_ids"].tolist() == [[0, 1, 2], [6, 7, 8], [9, 10, 11]]
    assert routes[1].batch["prompt_width"] is batch["prompt_width"] and routes[1].batch["on_policy"] is True
    sharded = teacher_routes(batch, 3, every_teacher=True)  # teacher 2 has no row: it runs one, unscored
    assert [(r.teacher, r.scored, r.rows.tolist()) for r in sharded][2] == (2, False, [0])
    whole = teacher_routes(batch, 1)
    assert len(whole) == 1 and whole[0].rows is None and whole[0].batch is batch
    batch[ROUTES_KEY] = routes
    assert teacher_routes(batch, 3) is routes  # a training slice carries its routes through the step


# ----- Bad input -----


def test_a_row_naming_an_unknown_teacher_fails_at_start(tiny_paths, tmp_path):
    rows = routed(8).map(lambda r, i: {"teacher": "physics" if i == 5 else r["teacher"]}, with_indices=True)
    with pytest.raises(
        ValueError,
        match=r"row 5: 'teacher' is 'physics', which is not one of the teachers "
        r"\['general', 'specialist'\]",
    ):
        DistillationTrainer(
            model=tiny_paths["student"],
            teacher_model={"general": tiny_paths["teacher"], "specialist": tiny_paths["specialist"]},
            args=config(tmp_path),
            train_dataset=rows,
        )


def test_missing_column_needs_default_teacher_and_idle_teachers_warn(tiny_paths, tmp_path):
    teachers = {"general": tiny_paths["teacher"], "specialist": tiny_paths["specialist"]}
    with pytest.raises(ValueError, match=r"train_dataset has no 'teacher' column .*set default_teacher"):
        DistillationTrainer(
            model=tiny_paths["student"], teacher_model=teachers, args=config(tmp_path), train_dataset=dataset(8)
        )
    with pytest.warns(UserWarning, match=r"teachers? \['specialist'\] get no row \('general': 8, 'specialist': 0"):
        trainer = DistillationTrainer(
            model=tiny_paths["student"],
            teacher_model=teachers,
            args=config(tmp_path, default_teacher="general"),
            train_dataset=dataset(8),
        )
    assert trainer.train_dataset[INDEX_KEY] == [0] * 8


def test_unreachable_server_and_config_mistakes_name_the_teacher(tiny_paths, tmp_path):
    from conftest import free_port

    url = f"http://127.0.0.1:{free_port()}"
    args = config(
        tmp_path,
        teacher_model_server_url={"code": url},
        teacher_server_response_format={"code": "hidden"},
        teacher_server_startup_timeout=1,
    )
    with pytest.raises(ValueError, match=r"with the log-prob teacher servers \['code'\] and beta=0.5"):
        config(tmp_path, teacher_model_server_url={"code": url})
    with pytest.raises(Exception, match=rf'^teacher "code": .*{url}'):
        DistillationTrainer(
            model=tiny_paths["student"],
            teacher_model={"general": tiny_paths["teacher"]},
            args=args,
            train_dataset=routed(8, names=("general", "code")),
        )
    with pytest.raises(ValueError, match="default_teacher='physics' is not one of the teachers"):
        DistillationTrainer(
            model=tiny_paths["student"],
            teacher_model={"general": tiny_paths["teacher"], "specialist": tiny_paths["specialist"]},
            args=config(tmp_path, default_teacher="physics"),
            train_dataset=routed(8),
        )
    with pytest.raises(ValueError, match="name the local teacher too"):
        DistillationTrainer(
            model=tiny_paths["student"], teacher_model=tiny_paths["teacher"], args=args, train_dataset=routed(8)
        )


def test_config_mappings(tmp_path):
    args = DistillationConfig(
        output_dir=str(tmp_path),
        report_to="none",
        teacher_model_server_url='{"math": "http://127.0.0.1:1", "code": "http://127.0.0.1:2"}',
        teacher_server_response_format='{"math": "hidden"}',
    )
    assert args.use_teacher_server is True  # a mapping of servers is used as given
    assert args.teacher_model_server_url == {"math": "http://127.0.0.1:1", "code": "http://127.0.0.1:2"}
    from protege.teacher.spec import teacher_specs

    specs = teacher_specs(args)
    assert [(s.name, s.returns, s.response_format) for s in specs] == [
        ("math", "hidden", "hidden"),
        ("code", "scores", "compact"),
    ]
    with pytest.raises(ValueError, match=r"teacher_server_response_format.*names \['physics'\]"):
        DistillationConfig(
            output_dir=str(tmp_path),
            teacher_model_server_url={"math": "http://127.0.0.1:1"},
            teacher_server_response_format={"physics": "hidden"},
        )
    with pytest.raises(ValueError, match=r"teacher_model_name_or_path.*not valid JSON"):
        DistillationConfig(output_dir=str(tmp_path), teacher_model_name_or_path='{"math": ')
    with pytest.raises(ValueError, match=r"teacher 'math' must map to non-empty text"):
        DistillationConfig(output_dir=str(tmp_path), teacher_model_name_or_path={"math": ""})
    with pytest.raises(ValueError, match=r"both a local model and a server URL"):
        teacher_specs(args, {"math": "some/path"})


def test_teacher_column_rules():
    column = TeacherColumn(("a", "b"), column="domain", default="b")
    assert column.index_of({"domain": "a"}, 0) == 0
    assert column.index_of({"domain": None}, 1) == 1
    assert column.index_of({}, 2) == 1
    assert column.unused_warning([0, 1, 1], "train_dataset") is None
    with pytest.raises(ValueError, match="row 3 has no 'domain' value and default_teacher is not set"):
        TeacherColumn(("a", "b"), column="domain").index_of({}, 3)


@pytest.mark.slow
def test_the_readme_example_runs(tmp_path):
    stdout = run_example("several_teachers.py", tmp_path / "out")
    lines = [line for line in stdout.splitlines() if "loss per teacher" in line]
    assert len(lines) == 2 and all("'math':" in line and "'code':" in line for line in lines)
