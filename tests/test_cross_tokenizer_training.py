"""Cross-tokenizer distillation through the trainer (`use_uld_loss`): a teacher of another tokenizer trains the
student on-policy and off-policy; with the student's own tokenizer the loss is the ordinary one; the refusals."""

from __future__ import annotations

import pytest
import torch
from tiny import config, dataset, run_example
from transformers import PreTrainedTokenizerFast

from protege import DistillationTrainer
from protege.outputs import TeacherForeign
from protege.teacher.vocabulary import TokenizerMismatchError
from protege.toy import arithmetic_rows, tiny_model, train_tokenizer


@pytest.fixture(scope="module")
def char_teacher(tmp_path_factory) -> dict[str, str]:
    """A teacher whose byte-level tokenizer has almost no merges (about a token per character), against the tiny
    student's 300-token BPE: the two split every completion differently."""
    folder = tmp_path_factory.mktemp("char_teacher")
    rows = arithmetic_rows(200, seed=0)
    tokenizer = train_tokenizer([m["content"] for r in rows for m in r["messages"]], vocab_size=262)
    model = tiny_model(len(tokenizer), 2, 48, eos_token_id=tokenizer.eos_token_id, seed=5)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "tokenizer")
    return {"model": str(folder / "model"), "tokenizer": str(folder / "tokenizer")}


def cross_trainer(tiny_paths, char_teacher, tmp_path, **overrides) -> DistillationTrainer:
    settings = dict(use_uld_loss=True, teacher_tokenizer_name_or_path=char_teacher["tokenizer"]) | overrides
    return DistillationTrainer(
        model=tiny_paths["student"],
        teacher_model=None if settings.get("use_teacher_server") else char_teacher["model"],
        args=config(tmp_path, **settings),
        train_dataset=dataset(32),
        eval_dataset=dataset(16, seed=9),
        processing_class=PreTrainedTokenizerFast.from_pretrained(tiny_paths["student"]),
    )


@pytest.mark.parametrize("rule", ["gold", "projection"])
def test_a_teacher_of_another_tokenizer_trains_the_student(tiny_paths, char_teacher, tmp_path, rule):
    trainer = cross_trainer(tiny_paths, char_teacher, tmp_path, lmbda=0.5, max_steps=8, uld_alignment_rule=rule)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    answer = trainer.teacher(batch)
    assert isinstance(answer, TeacherForeign)
    student_tokens = batch["labels"].ne(-100).sum().item()
    teacher_tokens = answer.token_ids.ne(0).sum().item()
    assert teacher_tokens > student_tokens  # the teacher splits the same text into more tokens
    # every trained student token and every teacher token is in a group, groups in order, each on both sides
    assert answer.student_groups[batch["labels"][:, int(batch["prompt_width"]) :] != -100].min() >= 0
    groups = answer.student_groups[answer.student_groups >= 0]
    assert groups.tolist() == sorted(groups.tolist()) and set(groups.tolist()) == set(range(answer.num_groups))
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < 0.95 * before
    estimates = [
        e["on_policy_reverse_kl_estimate"] for e in trainer.state.log_history if "on_policy_reverse_kl_estimate" in e
    ]
    assert estimates and all(torch.isfinite(torch.tensor(estimates)))


@pytest.mark.parametrize("rule", ["gold", "projection"])
def test_the_students_own_tokenizer_gives_the_ordinary_loss(tiny_paths, tmp_path, rule):
    """The cross-tokenizer path with the student's tokenizer as the teacher's: every group is one token, every token
    shared (and spelled by itself), so the slice's loss and gradient are the ordinary path's, under either rule."""
    ordinary = DistillationTrainer(
        model=tiny_paths["student"],
        teacher_model=tiny_paths["teacher"],
        args=config(tmp_path / "a", beta=0.5, loss_top_k=0),
        train_dataset=dataset(8),
    )
    cross = DistillationTrainer(
        model=tiny_paths["student"],
        teacher_model=tiny_paths["teacher"],
        args=config(tmp_path / "b", beta=0.5, loss_top_k=0, use_uld_loss=True, uld_alignment_rule=rule),
        train_dataset=dataset(8),
    )
    batch = ordinary.data_collator([ordinary.train_dataset[i] for i in range(4)])
    cross_batch = cross.data_collator([cross.train_dataset[i] for i in range(4)])
    results = []
    for trainer, inputs in ((ordinary, batch), (cross, cross_batch)):
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}))
    assert results[0][0] > 0
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-7)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_refusals_name_the_setting(tiny_paths, char_teacher, tmp_path):
    with pytest.raises(TokenizerMismatchError, match="set use_uld_loss=True"):
        _mismatch(tiny_paths, char_teacher, tmp_path)
    server = dict(use_uld_loss=True, use_teacher_server=True, teacher_model_server_url="http://127.0.0.1:1")
    with pytest.raises(ValueError, match=r"use_uld_loss=True is not allowed: .* use teacher_server_response_format='h"):
        config(tmp_path, **server, teacher_server_response_format="compact")
    with pytest.raises(ValueError, match=r"teacher_tokenizer_name_or_path=None is not allowed: with use_uld_loss and"):
        config(tmp_path, **server, teacher_server_response_format="hidden")
    with pytest.raises(ValueError, match="uld_hybrid_matched_weight=0.5 is not allowed: set it together"):
        config(tmp_path, uld_hybrid_matched_weight=0.5)
    with pytest.raises(ValueError, match=r"uld_alignment_rule='tokens' is not allowed: one of \('gold', 'projection'"):
        config(tmp_path, uld_alignment_rule="tokens")


def test_the_hybrid_weights_under_the_projection_rule_warn(tmp_path):
    with pytest.warns(UserWarning, match="apply to uld_alignment_rule='gold' only"):
        config(tmp_path, use_uld_loss=True, uld_hybrid_matched_weight=0.5, uld_hybrid_unmatched_weight=0.5)


def _mismatch(tiny_paths, char_teacher, tmp_path):
    """The teacher of another tokenizer without use_uld_loss: the vocabulary check refuses it."""
    import shutil

    folder = tmp_path / "teacher_with_tokenizer"
    shutil.copytree(char_teacher["model"], folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{char_teacher['tokenizer']}/{name}", folder / name)
    DistillationTrainer(
        model=tiny_paths["student"], teacher_model=str(folder), args=config(tmp_path), train_dataset=dataset(8)
    )


@pytest.mark.slow
def test_sentencepiece_32k_teacher_and_byte_level_student_on_policy(tiny_paths, tmp_path):
    """mistral-common's real 32k SentencePiece (byte fallback) as the teacher's tokenizer, the tiny byte-level BPE as
    the student's: on-policy training runs and lowers the held-out cross-tokenizer divergence."""
    pytest.importorskip("mistral_common", reason="the 32k SentencePiece model comes with mistral-common (dev extra)")
    import importlib.resources
    import shutil

    from transformers import LlamaTokenizerFast

    from protege.toy import CHAT_TEMPLATE

    folder = tmp_path / "sp32k"
    folder.mkdir()
    shutil.copy(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    sentencepiece = LlamaTokenizerFast.from_pretrained(folder)
    sentencepiece.chat_template = CHAT_TEMPLATE
    sentencepiece.save_pretrained(folder)
    teacher = tiny_model(len(sentencepiece), 2, 32, eos_token_id=sentencepiece.eos_token_id, seed=7)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20.0)
    args = config(
        tmp_path, lmbda=1.0, max_steps=6, use_uld_loss=True, teacher_tokenizer_name_or_path=str(folder), beta=0.5
    )
    trainer = DistillationTrainer(
        model=tiny_paths["student"],
        teacher_model=teacher,
        args=args,
        train_dataset=dataset(32),
        eval_dataset=dataset(16, seed=9),
        processing_class=PreTrainedTokenizerFast.from_pretrained(tiny_paths["student"]),
    )
    assert trainer.teacher.match.teacher_vocab == 32000 and len(trainer.teacher.match.teacher_ids) > 50
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < before


@pytest.mark.slow
def test_the_readme_example_runs(tmp_path):
    stdout = run_example("another_tokenizer.py", tmp_path / "out")
    line = next(line for line in stdout.splitlines() if line.startswith("held-out cross-tokenizer loss"))
    before, after = (float(word) for word in line.split()[3:6:2])
    assert after < before


@pytest.mark.slow
def test_a_teacher_server_in_the_hidden_format_gives_the_local_loss(tiny_paths, char_teacher, tmp_path):
    """The translation sends the teacher's own token ids to a real server on 127.0.0.1, which returns hidden states:
    the slice's loss and gradients are the local teacher's."""
    import shutil

    from conftest import free_port, start_server, stop_server

    served = tmp_path / "served_teacher"
    shutil.copytree(char_teacher["model"], served)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{char_teacher['tokenizer']}/{name}", served / name)
    port = free_port()
    process = start_server(str(served), port)
    try:
        remote = cross_trainer(
            tiny_paths,
            char_teacher,
            tmp_path / "remote",
            use_teacher_server=True,
            teacher_model_server_url=f"http://127.0.0.1:{port}",
            teacher_server_response_format="hidden",
            teacher_server_hidden_dtype="float32",
            beta=0.5,
        )
        local = cross_trainer(tiny_paths, char_teacher, tmp_path / "local", beta=0.5)
        results = []
        for trainer in (local, remote):
            batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
            trainer.model.zero_grad()
            loss = trainer.compute_loss(trainer.model, batch)
            loss.backward()
            results.append((loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}))
    finally:
        stop_server(process)
    assert results[0][0] > 0
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-7)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_several_teachers_each_with_its_own_tokenizer(tiny_paths, char_teacher, tmp_path):
    """Two teachers routed by row, one of the student's tokenizer and one near char-level, each row's prompt in its
    own teacher's tokens: the slice's loss sums each teacher's cross-tokenizer loss on its own rows."""
    student_tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_paths["student"])
    student_tokenizer.save_pretrained(tmp_path / "student_tokenizer")  # a folder without config.json: loaded as is
    tokenizers = {"general": str(tmp_path / "student_tokenizer"), "char": char_teacher["tokenizer"]}
    models = {"general": tiny_paths["teacher"], "char": char_teacher["model"]}
    rows = dataset(8).map(lambda _, i: {"teacher": ("general", "char")[i % 2]}, with_indices=True)

    def trainer(names, out):
        settings = dict(use_uld_loss=True, beta=0.5, teacher_tokenizer_name_or_path={n: tokenizers[n] for n in names})
        return DistillationTrainer(
            model=tiny_paths["student"],
            teacher_model={name: models[name] for name in names},
            args=config(tmp_path / out, **settings, default_teacher=names[0]),
            train_dataset=rows,
            processing_class=student_tokenizer,
        )

    mixed = trainer(("general", "char"), "mixed")
    batch = mixed.data_collator([mixed.train_dataset[i] for i in range(6)])
    assert batch["teacher_prompt_ids"].shape[1] > batch["prompt_ids"].shape[1]  # the char rows' prompts are longer
    tokens = batch["labels"].ne(-100).sum()
    with torch.no_grad():
        total = mixed.compute_loss(mixed.model, batch).item() * tokens.item()
        expected = 0.0
        for index, name in enumerate(("general", "char")):
            single = trainer((name,), name)
            own = [i for i in range(6) if i % 2 == index]
            part = single.data_collator([single.train_dataset[i] for i in own])
            expected += single.compute_loss(single.model, part).item() * part["labels"].ne(-100).sum().item()
    assert total == pytest.approx(expected, rel=1e-5)


def test_a_completion_past_the_teachers_positions_is_cut_not_a_crash(tiny_paths, char_teacher, tmp_path):
    """The teacher's tokens of a completion can outnumber the student's: past the teacher's positions its text leaves
    the loss, with one warning, instead of an index error in the teacher's position table."""
    trainer = cross_trainer(tiny_paths, char_teacher, tmp_path)
    foreign = trainer.teacher
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    prompt = int(batch["teacher_prompt_mask"].sum(1).max())
    foreign.teacher_limit = prompt + 5  # five of the teacher's completion tokens at most
    with pytest.warns(UserWarning, match="the text past them is left out of the loss"):
        answer = foreign(batch)
    teacher_batch = batch["foreign"][0]
    assert teacher_batch["attention_mask"].sum(1).max() <= foreign.teacher_limit
    kept = answer.student_groups[answer.student_groups >= 0]
    assert 0 < len(kept) < batch["labels"].ne(-100).sum()  # some student tokens lost their group, some kept it
    assert torch.isfinite(trainer.compute_loss(trainer.model, batch))
