"""A teacher whose tokenizer extends the student's (Qwen3's over Qwen2.5's): every student token at its own id, a few
extra special tokens after them. It is accepted, locally and through a server's hidden format, compared on the
student's ids with its distribution renormalised over them; every other difference is a named error."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import ThreadedUvicorn
from tiny import config, dataset, logged
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from protege import DistillationTrainer
from protege.losses import IGNORE_INDEX
from protege.teacher.vocabulary import TokenizerMismatchError, shared_rows, teacher_extra_tokens
from protege.toy import tiny_model

EXTRA = ["<think>", "</think>", "<tool_response>"]
PADDING = 5  # output rows past the tokenizer, as Qwen pads 151,665 tokens to 151,936 rows


def save(folder, tokenizer, rows: int, layers: int, hidden: int, seed: int, extra_like: list[int] = ()) -> str:
    """A tiny model with `rows` output rows, saved with `tokenizer`. `extra_like`: ids whose LM-head rows, doubled,
    are the rows past the student's tokenizer, so the extra tokens take about half of the teacher's mass."""
    model = tiny_model(
        rows, layers, hidden, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, seed=seed
    )
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # a confident teacher, as in tiny.py
        for j, token_id in enumerate(extra_like):
            model.lm_head.weight[rows - PADDING - len(extra_like) + j] = 2.0 * model.lm_head.weight[token_id]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def models(tiny_paths, tmp_path_factory) -> dict[str, str]:
    """The tiny student's tokenizer; a teacher whose tokenizer adds EXTRA to it (a larger embedding, padded); the same
    student padded to the teacher's rows; a teacher whose tokenizer swaps two of the student's ids."""
    folder = tmp_path_factory.mktemp("extension")
    student_tokenizer = AutoTokenizer.from_pretrained(tiny_paths["student"])
    tokens = len(student_tokenizer)
    teacher_tokenizer = AutoTokenizer.from_pretrained(tiny_paths["student"])
    assert teacher_tokenizer.add_special_tokens({"additional_special_tokens": EXTRA}) == len(EXTRA)
    frequent = student_tokenizer.convert_tokens_to_ids(["1", "=", "<|im_end|>"])
    rows = tokens + len(EXTRA) + PADDING
    swapped = json.loads(student_tokenizer.backend_tokenizer.to_str())
    vocab = swapped["model"]["vocab"]
    vocab["1"], vocab["2"] = vocab["2"], vocab["1"]
    moved_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(swapped)), pad_token="<|endoftext|>", eos_token="<|im_end|>"
    )
    return {
        "tokens": tokens,
        "teacher": save(folder / "teacher", teacher_tokenizer, rows, 3, 64, seed=2, extra_like=frequent),
        "padded_student": save(folder / "student", student_tokenizer, rows, 2, 32, seed=1),
        "moved": save(folder / "moved", moved_tokenizer, tokens, 2, 32, seed=3),
    }


# ----- The comparison itself -----


def test_comparison_accepts_an_extension_and_names_every_other_difference():
    student = {"a": 0, "b": 1, "c": 2}
    assert teacher_extra_tokens(student, dict(student)) == []
    assert teacher_extra_tokens(student, student | {"<y>": 4, "<x>": 3}) == ["<x>", "<y>"]
    lacks = r"differs from the student's \(2 vs 3 tokens\): it lacks 1 of the student's tokens, e\.g\. \['c'\]"
    refusals = [
        ({"a": 0, "b": 1}, lacks),
        ({"a": 0, "b": 2, "c": 1, "d": 3}, r"2 shared tokens have other ids in the teacher \('b': 1 vs 2, 'c': 2 vs 1"),
        ({"a": 0, "c": 2, "b": 1, "<x>": 1}, r"its extra tokens \['<x>'\] take ids \[1\] inside the student's range"),
    ]
    for teacher, message in refusals:
        with pytest.raises(TokenizerMismatchError, match=message):
            teacher_extra_tokens(student, teacher)


def test_one_place_decides_the_width():
    assert shared_rows(10, 12, 16) == 12  # one tokenizer: the narrower padded layer, as before
    assert shared_rows(10, 16, 16, extra_tokens=3) == 10  # past 10: the teacher's extra tokens, the student's padding
    with pytest.raises(ValueError, match="the teacher's output layer has 9 rows but the tokenizer has 10 tokens"):
        shared_rows(10, 16, 9, extra_tokens=3)


# ----- A local teacher -----


def test_training_with_an_extending_teacher_logs_the_extra_tokens_once(tiny_paths, models, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="protege"):
        trainer = DistillationTrainer(
            model=tiny_paths["student"],
            teacher_model=models["teacher"],
            args=config(tmp_path, lmbda=0.5, max_steps=2),
            train_dataset=dataset(16),
        )
    lines = [r.getMessage() for r in caplog.records if "extends the student's" in r.getMessage()]
    assert lines == [
        f"the teacher's tokenizer extends the student's by 3 tokens ({', '.join(EXTRA)}) that the student cannot "
        f"produce: the teacher is compared on the student's {models['tokens']} token ids, its distribution "
        "renormalised over them"
    ]
    assert trainer.vocab_size == models["tokens"]
    trainer.train()
    losses = logged(trainer, "loss")
    assert len(losses) == 2 and all(0 < loss < float("inf") for loss in losses)


def completion_logits(model, batch) -> torch.Tensor:
    """Full logits (B, C, rows) predicting each completion column, in float64."""
    width = int(batch["prompt_width"])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        return model(**inputs).logits[:, width - 1 : -1].double()


def divergence(student_logp, teacher_logp, beta: float, top_k: int) -> torch.Tensor:
    """Per-token divergence written out: forward KL, reverse KL, the JSD, or forward KL over the teacher's top-k and
    a tail bucket."""
    if top_k:
        ids = teacher_logp.topk(top_k, dim=-1).indices
        s, t = student_logp.gather(-1, ids).exp(), teacher_logp.gather(-1, ids).exp()
        s, t = torch.cat([s, 1 - s.sum(-1, keepdim=True)], -1), torch.cat([t, 1 - t.sum(-1, keepdim=True)], -1)
        return (t * (t.log() - s.log())).sum(-1)
    s, t = student_logp.exp(), teacher_logp.exp()
    if beta == 0:
        return (t * (teacher_logp - student_logp)).sum(-1)
    if beta == 1:
        return (s * (student_logp - teacher_logp)).sum(-1)
    m = (1 - beta) * s + beta * t
    return beta * (t * (teacher_logp - m.log())).sum(-1) + (1 - beta) * (s * (student_logp - m.log())).sum(-1)


def renormalised_reference(models, batch, beta: float, top_k: int) -> tuple[float, float]:
    """The mean per-token loss with the teacher renormalised over the student's tokens, and, for contrast, with the
    teacher normalised over all its tokens (the extra tokens' mass dropped, or in the tail with a top-k)."""
    student = AutoModelForCausalLM.from_pretrained(models["padded_student"])
    teacher = AutoModelForCausalLM.from_pretrained(models["teacher"])
    n = models["tokens"]
    mask = batch["labels"][:, int(batch["prompt_width"]) :] != IGNORE_INDEX
    student_logits, teacher_logits = completion_logits(student, batch)[mask], completion_logits(teacher, batch)[mask]
    student_logp = F.log_softmax(student_logits[:, :n], -1)
    renormalised = divergence(student_logp, F.log_softmax(teacher_logits[:, :n], -1), beta, top_k)
    whole = F.log_softmax(teacher_logits[:, : n + len(EXTRA)], -1)[:, :n]
    return renormalised.mean().item(), divergence(student_logp, whole, beta, top_k).mean().item()


def batch_of(trainer, rows: int = 4) -> dict[str, torch.Tensor]:
    return trainer.data_collator([trainer.train_dataset[i] for i in range(rows)])


@pytest.mark.parametrize(
    ("beta", "top_k", "chunk"), [(0.0, 0, None), (1.0, 0, None), (0.5, 0, None), (0.0, 3, None), (0.5, 0, 4)]
)
def test_loss_equals_the_renormalised_reference(models, tmp_path, beta, top_k, chunk):
    """Student and teacher both padded to the same rows: the comparison keeps the student's tokens only, not the
    narrower layer (there, the teacher's extra tokens against the student's padding rows)."""
    trainer = DistillationTrainer(
        model=models["padded_student"],
        teacher_model=models["teacher"],
        args=config(tmp_path, lmbda=0.0, beta=beta, loss_top_k=top_k, loss_chunk_size=chunk),
        train_dataset=dataset(8),
    )
    assert trainer.vocab_size == models["tokens"]
    batch = batch_of(trainer)
    loss = trainer.compute_loss(trainer.model, batch).item()
    reference, whole_teacher = renormalised_reference(models, batch, beta, top_k)
    assert loss == pytest.approx(reference, rel=1e-5)
    assert abs(whole_teacher - reference) > 0.05 * reference  # the extra tokens carry enough mass to tell them apart


def test_a_teacher_that_lacks_student_tokens_is_refused(tiny_paths, models, tmp_path):
    """The extension the other way round: the student's tokenizer has 3 tokens the teacher's lacks."""
    with pytest.raises(TokenizerMismatchError, match=r"it lacks 3 of the student's tokens, e\.g\. \['<think>'"):
        DistillationTrainer(
            model=models["teacher"],
            teacher_model=tiny_paths["teacher"],
            args=config(tmp_path),
            train_dataset=dataset(8),
        )


def test_a_teacher_that_moves_a_student_token_is_refused(tiny_paths, models, tmp_path):
    with pytest.raises(TokenizerMismatchError, match=r"2 shared tokens have other ids in the teacher \('1': 19 vs 20"):
        DistillationTrainer(
            model=tiny_paths["student"], teacher_model=models["moved"], args=config(tmp_path), train_dataset=dataset(8)
        )


def test_each_of_several_teachers_is_checked_on_its_own_and_named(tiny_paths, models, tmp_path):
    """An extending teacher beside the student's own is accepted; a teacher that moves ids is refused, by name."""
    rows = dataset(8).map(lambda _, i: {"teacher": ("same", "wider")[i % 2]}, with_indices=True)
    trainer = DistillationTrainer(
        model=tiny_paths["student"],
        teacher_model={"same": tiny_paths["teacher"], "wider": models["teacher"]},
        args=config(tmp_path),
        train_dataset=rows,
    )
    assert trainer.vocab_size == models["tokens"]  # compared on the student's ids with both
    with pytest.raises(TokenizerMismatchError, match=r'^teacher "moved": .*2 shared tokens have other ids'):
        DistillationTrainer(
            model=tiny_paths["student"],
            teacher_model={"same": tiny_paths["teacher"], "moved": models["moved"]},
            args=config(tmp_path),
            train_dataset=rows,
        )


# ----- A teacher server -----


@pytest.fixture(scope="module")
def extending_server(models):
    from protege.server.app import create_app
    from protege.server.backends import TransformersBackend

    backend = TransformersBackend(models["teacher"], device="cpu")
    with ThreadedUvicorn(create_app(backend)) as running:
        yield running.url, backend


def server_trainer(models, tmp_path, url, response_format: str) -> DistillationTrainer:
    args = config(
        tmp_path,
        lmbda=0.0,
        beta=0.5,
        loss_top_k=0 if response_format == "hidden" else 1,
        use_teacher_server=True,
        teacher_model_server_url=url,
        teacher_server_response_format=response_format,
        teacher_server_hidden_dtype="float32",
    )
    return DistillationTrainer(model=models["padded_student"], args=args, train_dataset=dataset(8))


def test_server_hidden_format_accepts_the_extension_with_the_local_loss(models, tmp_path, extending_server, caplog):
    url, _ = extending_server
    with caplog.at_level(logging.INFO, logger="protege"):
        trainer = server_trainer(models, tmp_path, url, "hidden")
    lines = [r.getMessage() for r in caplog.records if "extends the student's" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(
        f"the tokenizer of the teacher server at {url} extends the student's by 3"
    )
    assert trainer.vocab_size == models["tokens"]
    batch = batch_of(trainer)
    reference, _ = renormalised_reference(models, batch, 0.5, 0)
    assert trainer.compute_loss(trainer.model, batch).item() == pytest.approx(reference, rel=1e-5)


def test_server_log_prob_formats_refuse_the_extension(models, tmp_path, extending_server):
    """The server normalises log-probs over its whole vocabulary, so only the hidden format can renormalise."""
    url, _ = extending_server
    with pytest.raises(TokenizerMismatchError, match=r"extends the student's by 3 tokens; with teacher_server_respo"):
        server_trainer(models, tmp_path, url, "binary")


def test_server_without_a_vocabulary_list_keeps_a_named_error(models, tmp_path, extending_server, monkeypatch):
    url, backend = extending_server
    monkeypatch.setattr(backend, "vocabulary", None)  # an older server, or one that does not list its tokens
    with pytest.raises(TokenizerMismatchError, match=r"\(303 vs 300 tokens\), and the server does not list its vocab"):
        server_trainer(models, tmp_path, url, "hidden")


# ----- protege eval -----


@pytest.mark.slow
def test_eval_checks_the_teachers_tokenizer_as_training_does(tiny_paths, models, tmp_path):
    from test_cli import one_error_line, protege

    data = tmp_path / "rows.jsonl"
    dataset(8).to_json(str(data))
    common = ["--dataset_name", str(data), "--max_samples", "4"]
    # Same number of rows as the student, so only the tokenizers tell that ids 19 and 20 mean other tokens.
    moved = protege("eval", "--model", tiny_paths["student"], "--teacher", models["moved"], *common)
    assert "2 shared tokens have other ids in the teacher ('1': 19 vs 20" in one_error_line(moved, "eval")
    output = tmp_path / "scores.json"
    extending = protege(
        "eval", "--model", tiny_paths["student"], "--teacher", models["teacher"], *common, "--output", str(output)
    )
    assert extending.returncode == 0, extending.stderr[-3000:]
    assert "extends the student's by 3 tokens" in extending.stderr
    assert json.loads(output.read_text())["kl_teacher_student"] > 0


# ----- On-policy samples stay within the student's tokenizer -----


def test_a_padded_student_never_samples_its_padding_rows(models, tmp_path):
    """Past the student's tokenizer the student has padding rows and the teacher its extra tokens, at the same ids: a
    sampled padding id would reach the teacher as `<think>`, and the loss has no column for it."""
    student = AutoModelForCausalLM.from_pretrained(models["padded_student"])
    tokens, rows = models["tokens"], student.lm_head.weight.shape[0]
    with torch.no_grad():  # padding rows that would win most draws
        student.lm_head.weight[tokens:] = 10.0 * student.lm_head.weight[:tokens].abs().max(0).values
    trainer = DistillationTrainer(
        model=student,
        teacher_model=models["teacher"],
        args=config(tmp_path, lmbda=1.0, max_steps=2, max_completion_length=12),
        train_dataset=dataset(16),
    )
    assert trainer.vocab_size == tokens < rows
    prompt = torch.tensor([trainer.train_dataset[0]["prompt_ids"]])
    torch.manual_seed(0)
    unmasked = student.generate(prompt, do_sample=True, max_new_tokens=12, pad_token_id=0)
    assert (unmasked[0, prompt.shape[1] :] >= tokens).float().mean() > 0.5  # the trap is real for this student
    generated = student.generate(prompt, generation_config=trainer.generation_config)
    assert trainer.suppressed_ids == list(range(tokens, rows))
    assert generated[0, prompt.shape[1] :].max() < tokens
    trainer.train()
    losses = logged(trainer, "loss")
    assert len(losses) == 2 and all(0 < loss < float("inf") for loss in losses)


def test_vllm_sampling_suppresses_the_same_ids_over_generation_kwargs(tmp_path):
    from protege.vllm_colocate import sampling_options

    args = config(tmp_path, generation_kwargs={"logit_bias": {"5": 2.0, "301": 50.0}})
    options = sampling_options(args, [2], suppressed_ids=[300, 301])
    assert options["logit_bias"] == {5: 2.0, 300: -100.0, 301: -100.0}  # vLLM's lowest bias
    assert "logit_bias" not in sampling_options(config(tmp_path), [2])
    assert sampling_options(args, [2])["logit_bias"] == {"5": 2.0, "301": 50.0}  # the user's, untouched
