"""The trainer against a real teacher server started on 127.0.0.1: same loss as a local teacher, survives faults."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch
from conftest import free_port, start_server, stop_server
from tiny import config, dataset, logged
from transformers import AutoModelForCausalLM, TrainerCallback

from protege import DistillationTrainer
from protege.server.backends import TransformersBackend
from protege.teacher.client import TeacherServerError


def first_loss(tiny_paths, tmp_path, **overrides) -> float:
    common = dict(lmbda=0.0, max_steps=1, learning_rate=1e-2, gradient_accumulation_steps=2)
    use_server = overrides.get("use_teacher_server", False)
    trainer = DistillationTrainer(
        model=tiny_paths["student"],
        teacher_model=None if use_server else tiny_paths["teacher"],
        args=config(tmp_path, **common, **overrides),
        train_dataset=dataset(32),
    )
    trainer.train()
    return logged(trainer, "loss")[0]


@pytest.mark.slow
@pytest.mark.parametrize(("beta", "top_k"), [(0.5, 1), (1.0, 1), (0.0, 5)])
def test_server_loss_equals_local_teacher_loss(tiny_paths, tmp_path, teacher_url, beta, top_k):
    local = first_loss(tiny_paths, tmp_path / "local", beta=beta, loss_top_k=top_k)
    for response_format, tolerance in (("binary", 1e-5), ("json", 1e-5), ("compact", 1e-3)):
        served = first_loss(
            tiny_paths,
            tmp_path / response_format,
            beta=beta,
            loss_top_k=top_k,
            use_teacher_server=True,
            teacher_model_server_url=teacher_url,
            teacher_server_response_format=response_format,
        )
        assert served == pytest.approx(local, rel=tolerance), response_format


def test_server_trains_on_policy(tiny_paths, tmp_path, teacher_url):
    trainer = DistillationTrainer(
        model=tiny_paths["student"],
        args=config(
            tmp_path,
            lmbda=0.5,
            beta=1.0,
            loss_top_k=1,
            max_steps=3,
            gradient_accumulation_steps=4,
            use_teacher_server=True,
            teacher_model_server_url=teacher_url,
        ),
        train_dataset=dataset(32),
    )
    trainer.train()
    assert logged(trainer, "on_policy_loss") and all(loss == loss for loss in logged(trainer, "loss"))
    assert trainer.evaluate(dataset(8, seed=3))["eval_loss"] > 0


class StopServerAt(TrainerCallback):
    def __init__(self, process, step):
        self.process, self.step = process, step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            stop_server(self.process)


@pytest.mark.slow
@pytest.mark.parametrize("response_format", ["compact", "hidden"])
def test_server_lost_mid_training_then_resumed(tiny_paths, tmp_path, response_format):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server(tiny_paths["teacher"], port)
    args = dict(
        lmbda=0.0,
        beta=0.5,
        loss_top_k=1,
        max_steps=6,
        save_strategy="steps",
        save_steps=2,
        use_teacher_server=True,
        teacher_model_server_url=url,
        teacher_server_max_retries=2,
        teacher_server_timeout=10.0,
        teacher_server_response_format=response_format,
    )
    trainer = DistillationTrainer(model=tiny_paths["student"], args=config(tmp_path, **args), train_dataset=dataset(64))
    trainer.add_callback(StopServerAt(process, 3))
    with pytest.raises(
        TeacherServerError,
        match=rf"teacher server at {url}/get_sequence_logprobs/ failed after 3 "
        r"attempts",
    ):
        trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["checkpoint-2"]
    assert AutoModelForCausalLM.from_pretrained(checkpoint).config.num_hidden_layers == 2

    process = start_server(tiny_paths["teacher"], port)
    try:
        resumed = DistillationTrainer(
            model=tiny_paths["student"], args=config(tmp_path, **args), train_dataset=dataset(64)
        )
        resumed.train(resume_from_checkpoint=str(checkpoint))
        assert resumed.state.global_step == 6
        assert [e["step"] for e in resumed.state.log_history if "loss" in e] == [1, 2, 3, 4, 5, 6]
    finally:
        stop_server(process)


def test_unreachable_server_fails_at_construction(tiny_paths, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TeacherServerError, match=rf"teacher server at {url}/health/ was not ready"):
        DistillationTrainer(
            model=tiny_paths["student"],
            args=config(
                tmp_path,
                use_teacher_server=True,
                teacher_model_server_url=url,
                loss_top_k=1,
                teacher_server_startup_timeout=1.0,
            ),
            train_dataset=dataset(8),
        )


def loss_and_grads(trainer, batch, chunk_size):
    """One slice's loss and the student's gradients, with the trainer's objective chunked as given (None: dense)."""
    trainer.objective = dataclasses.replace(trainer.objective, chunk_size=chunk_size)
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("beta", "top_k"), [(0.5, 1), (1.0, 1), (0.0, 5)])
def test_server_objectives_chunked_equal_dense(tiny_paths, tmp_path, teacher_url, beta, top_k):
    """The memory-bounded path serves the server objectives too: same loss and gradients as full student logits."""
    trainer = DistillationTrainer(
        model=tiny_paths["student"],
        args=config(
            tmp_path, beta=beta, loss_top_k=top_k, use_teacher_server=True, teacher_model_server_url=teacher_url
        ),
        train_dataset=dataset(8),
    )
    assert trainer.objective.chunk_size == "auto" and trainer.objective.student_view == "hidden"
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    dense_loss, dense_grads = loss_and_grads(trainer, batch, None)
    assert dense_loss > 0
    for chunk_size in ("auto", 3):
        loss, grads = loss_and_grads(trainer, batch, chunk_size)
        torch.testing.assert_close(loss, dense_loss, rtol=1e-5, atol=1e-7)
        assert grads.keys() == dense_grads.keys()
        for name, grad in dense_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-7, msg=f"{chunk_size} {name}")


def test_backend_scores_in_chunks_like_full_logits(tiny_paths):
    """The transformers backend's LM head runs a few positions at a time; the answers equal full-logits scoring."""
    backend = TransformersBackend(tiny_paths["teacher"])
    sequences = [[5, 9, 12, 40, 41, 7], [3, 8, 22, 17], [11, 12, 13, 14, 15, 16, 17, 18]]
    prompt_lengths = [2, 3, 4]
    for temperature in (0.7, 1.0):  # the last, 1.0, is compared with `score` below
        ids = torch.zeros((3, 8), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(sequences):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        with torch.inference_mode():
            full = backend._score_logits(ids, mask, sequences, prompt_lengths, 4, temperature)
            backend.chunk_tokens = 3
            chunked = backend._score_chunked(ids, mask, sequences, prompt_lengths, 4, temperature)
        assert full[0].shape == (4 + 1 + 4, 4)  # one row per scored token
        np.testing.assert_allclose(chunked[0], full[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(chunked[1], full[1])
        np.testing.assert_allclose(chunked[2], full[2], rtol=1e-5, atol=1e-6)
    rows = backend.score(sequences, prompt_lengths, 4, 1.0)
    assert [len(r.actual_ids) for r in rows] == [4, 1, 4]
    np.testing.assert_allclose(np.concatenate([r.actual_logprobs for r in rows]), full[2], rtol=1e-5, atol=1e-6)


def tokenizerless_teacher(folder) -> str:
    """A tiny teacher saved without any tokenizer file (a folder that holds only a model)."""
    from protege.toy import tiny_model

    tiny_model(50, layers=1, hidden=16, heads=2).save_pretrained(folder)
    return str(folder)


def test_backend_without_tokenizer_files_serves_without_one_and_says_so_once(tmp_path, caplog):
    folder = tokenizerless_teacher(tmp_path / "teacher")
    with caplog.at_level("WARNING", logger="protege"):
        backend = TransformersBackend(folder, device="cpu")
    assert (backend.tokenizer_sha256, backend.vocabulary, backend.vocab_size) == (None, None, 50)
    said = [r.getMessage() for r in caplog.records if "holds no tokenizer" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(f"the teacher folder {folder} holds no tokenizer"), said


def test_backend_with_a_broken_tokenizer_fails_naming_the_folder_and_the_cause(tmp_path):
    folder = tokenizerless_teacher(tmp_path / "teacher")
    (tmp_path / "teacher" / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match=rf"the teacher's tokenizer at {re.escape(folder)} could not be loaded: \w+"):
        TransformersBackend(folder, device="cpu")


@pytest.mark.slow
def test_server_process_returns_large_freed_blocks_to_the_os(tiny_paths):
    """`serve-teacher` fixes glibc's mmap threshold, which keeps the chunked scoring's freed blocks from piling up,
    and says that the setting took: glibc has no getter for it, so the command's log line is what can be checked."""
    process = start_server(tiny_paths["teacher"], free_port())
    stop_server(process)
    log = process.stderr.read()
    assert "protege: freed scoring buffers go back to the OS (glibc's mmap threshold is fixed)" in log, log[-2000:]
