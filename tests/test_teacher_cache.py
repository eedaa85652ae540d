"""Training from an offline teacher cache (`teacher_cache`): the same losses and weights as the live teacher, hidden
and top-k formats, with gradient accumulation and shuffling; no teacher loaded at lmbda=0; each mismatch one line."""

from __future__ import annotations

import threading

import pytest
import torch
from tiny import config, dataset
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from protege import DistillationTrainer
from protege.data import DistillationCollator, Tokenizer, tokenize_dataset
from protege.objective import student_output
from protege.outputs import TeacherHidden
from protege.teacher.cache import CacheManifest, ModelSource, build_cache, teacher_identity, tokenizer_fingerprint
from protege.teacher.cached import READ_KEY, CachedTeacher, tokenization_settings
from protege.teacher.head import load_head
from protege.teacher.quantized import dequantize, quantize

ROUNDINGS = {  # what each stored dtype does to the teacher's hidden states, and the float32 loss's distance after it
    "bfloat16": (lambda hidden: hidden.to(torch.bfloat16).float(), 2e-2),
    "int8": (lambda hidden: dequantize(*quantize(hidden)), 2e-3),
}


def make_cache(
    tiny_paths, folder, args, fmt: str = "hidden", dtype: str = "float32", rows=None, top_k: int = 5, tokenizer=None
):
    """A cache of the tiny teacher on `rows` (24 arithmetic rows), tokenized as the trainer does with `args`."""
    tokenizer = tokenizer or PreTrainedTokenizerFast.from_pretrained(tiny_paths["student"])
    teacher = AutoModelForCausalLM.from_pretrained(tiny_paths["teacher"])
    row_tokenizer = Tokenizer(tokenizer, args.max_prompt_length, args.max_length, args.prompt_truncation)
    tokenized = tokenize_dataset(rows if rows is not None else dataset(24), row_tokenizer, needs_completion=True)
    manifest = CacheManifest(
        format=fmt,
        dtype=dtype if fmt == "hidden" else "float16",
        teacher=teacher_identity(teacher, tiny_paths["teacher"]),
        tokenizer_sha256=tokenizer_fingerprint(tokenizer),
        tokenization=tokenization_settings(args),
        dataset_fingerprint="test",
        hidden_size=teacher.config.hidden_size,
        vocab_size=len(tokenizer),
        top_k=top_k if fmt == "topk" else None,
    )
    source = ModelSource(teacher, DistillationCollator(tokenizer.pad_token_id))
    return build_cache(source, tokenized, folder, manifest, 4, 7)


def trainer_for(tiny_paths, out, teacher=True, **settings) -> DistillationTrainer:
    return DistillationTrainer(
        model=tiny_paths["student"],
        teacher_model=tiny_paths["teacher"] if teacher else None,
        args=config(out, **settings),
        train_dataset=dataset(24),
        processing_class=PreTrainedTokenizerFast.from_pretrained(tiny_paths["student"]),
    )


def weights(trainer) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in trainer.model.state_dict().items()}


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_training_from_a_hidden_cache_equals_the_live_teacher(tiny_paths, tmp_path, beta):
    """lmbda=0, no teacher model given: the same losses and weights as with the live teacher (to 1e-5), step by
    step, with gradient accumulation (2 slices a step) and the trainer's shuffled order."""
    settings = dict(lmbda=0.0, beta=beta, loss_top_k=0, max_steps=3)
    live = trainer_for(tiny_paths, tmp_path / "live", **settings)
    make_cache(tiny_paths, tmp_path / "cache", live.args)
    cached = trainer_for(
        tiny_paths, tmp_path / "cached", teacher=False, teacher_cache=str(tmp_path / "cache"), **settings
    )
    assert isinstance(cached.teacher, CachedTeacher) and cached.teacher.live is None and cached.teacher_model is None
    live.train()
    cached.train()
    losses = [[e["loss"] for e in t.state.log_history if "loss" in e] for t in (live, cached)]
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    # the cache's rows were run in other batches (other padding widths): float32 rounding apart, no more
    for name, value in weights(live).items():
        torch.testing.assert_close(weights(cached)[name], value, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("dtype", sorted(ROUNDINGS))
def test_lossy_storage_is_exact_against_the_same_rounding(tiny_paths, tmp_path, dtype):
    """A bfloat16 (int8) cache gives the loss of the live teacher's hidden states rounded to bfloat16 (quantized to
    8 bits a token and back) to 1e-5, and within that rounding's distance of the float32 loss."""
    rounding, distance = ROUNDINGS[dtype]
    live = trainer_for(tiny_paths, tmp_path / "live", lmbda=0.0, beta=0.5, loss_top_k=0)
    make_cache(tiny_paths, tmp_path / "cache", live.args, dtype=dtype)
    cached = trainer_for(
        tiny_paths,
        tmp_path / "c",
        teacher=False,
        lmbda=0.0,
        beta=0.5,
        loss_top_k=0,
        teacher_cache=str(tmp_path / "cache"),
    )
    batch = live.data_collator([live.train_dataset[i] for i in range(4)])
    with torch.no_grad():
        exact = live.compute_loss(live.model, batch).item()
        from_cache = cached.compute_loss(cached.model, batch).item()
        teacher = live.teacher(batch)
        rounded = TeacherHidden(rounding(teacher.hidden), teacher.weight, teacher.bias)
        labels = batch["labels"][:, int(batch["prompt_width"]) :]
        out = student_output(live.model, batch, live.objective.student_view, live.vocab_size)
        same_rounding = (live.objective.loss_sum(out, rounded, labels) / labels.ne(-100).sum()).item()
    assert from_cache == pytest.approx(same_rounding, rel=1e-5)
    assert from_cache == pytest.approx(exact, rel=distance) and from_cache != exact


def test_a_steps_rows_are_read_ahead_in_the_background(tiny_paths, tmp_path, monkeypatch):
    """Every off-policy slice's rows are read on the prefetch thread, started when the step's slices are drawn, and
    each slice takes its own read; a row the cache lacks is named when its slice asks for it."""
    settings = dict(lmbda=0.0, beta=0.5, loss_top_k=0, max_steps=2)
    make_cache(tiny_paths, tmp_path / "cache", trainer_for(tiny_paths, tmp_path / "args", **settings).args)
    cached = trainer_for(
        tiny_paths, tmp_path / "cached", teacher=False, teacher_cache=str(tmp_path / "cache"), **settings
    )
    teacher, threads, taken = cached.teacher, [], []
    read_row, answer = teacher.reader.row, CachedTeacher.__call__
    monkeypatch.setattr(
        teacher.reader, "row", lambda *a: threads.append(threading.current_thread().name) or read_row(*a)
    )
    monkeypatch.setattr(
        CachedTeacher, "__call__", lambda self, b: taken.append(b.get(READ_KEY) in self._reads) or answer(self, b)
    )
    cached.train()
    assert threads and all(name.startswith("protege-cache-read") for name in threads)
    assert taken == [True] * 4 and teacher._reads == {}  # 2 steps x 2 slices, each read ahead and taken once
    batch = cached.data_collator([cached.train_dataset[i] for i in range(2)])
    batch["input_ids"][0, -1] = (batch["input_ids"][0, -1] + 1) % 50  # a completion the cache never saw
    teacher.prefetch([batch])
    with pytest.raises(ValueError, match="a slice's row is not in teacher_cache="):
        teacher(batch)


def test_on_policy_slices_use_the_live_teacher(tiny_paths, tmp_path):
    settings = dict(lmbda=0.5, beta=0.5, loss_top_k=0, max_steps=4)
    live = trainer_for(tiny_paths, tmp_path / "live", **settings)
    make_cache(tiny_paths, tmp_path / "cache", live.args)
    cached = trainer_for(tiny_paths, tmp_path / "cached", teacher_cache=str(tmp_path / "cache"), **settings)
    assert cached.teacher.live is not None
    live.train()
    cached.train()
    fractions = [[e["on_policy_fraction"] for e in t.state.log_history if "loss" in e] for t in (live, cached)]
    assert fractions[0] == fractions[1] and 0 < sum(fractions[0]) < 4
    for name, value in weights(live).items():
        torch.testing.assert_close(weights(cached)[name], value, rtol=1e-6, atol=1e-8, msg=name)


@pytest.mark.slow
def test_a_top_k_cache_equals_the_live_servers_top_k_loss(tiny_paths, tmp_path, teacher_url):
    settings = dict(lmbda=0.0, beta=0.0, loss_top_k=5)
    served = DistillationTrainer(
        model=tiny_paths["student"],
        args=config(
            tmp_path / "s",
            **settings,
            use_teacher_server=True,
            teacher_model_server_url=teacher_url,
            teacher_server_response_format="json",
        ),
        train_dataset=dataset(24),
        processing_class=PreTrainedTokenizerFast.from_pretrained(tiny_paths["student"]),
    )
    make_cache(tiny_paths, tmp_path / "cache", served.args, fmt="topk", top_k=5)
    cached = trainer_for(tiny_paths, tmp_path / "c", teacher=False, teacher_cache=str(tmp_path / "cache"), **settings)
    assert cached.teacher.returns == "scores"
    batch = served.data_collator([served.train_dataset[i] for i in range(6)])
    with torch.no_grad():
        expected = served.compute_loss(served.model, batch).item()
        assert cached.compute_loss(cached.model, batch).item() == pytest.approx(expected, rel=2e-3)


def test_mismatches_are_one_line_naming_what_differs(tiny_paths, tmp_path):
    base = dict(lmbda=0.0, beta=0.5, loss_top_k=0)
    live = trainer_for(tiny_paths, tmp_path / "live", **base)
    make_cache(tiny_paths, tmp_path / "cache", live.args)
    cache = str(tmp_path / "cache")
    with pytest.raises(ValueError, match=r"was made with max_length=48, this run has max_length=40"):
        trainer_for(tiny_paths, tmp_path / "a", teacher=False, teacher_cache=cache, max_length=40, **base)
    with pytest.raises(ValueError, match=r"train_dataset row 24 is not in teacher_cache="):
        DistillationTrainer(
            model=tiny_paths["student"],
            args=config(tmp_path / "b", teacher_cache=cache, **base),
            train_dataset=dataset(25),
            processing_class=PreTrainedTokenizerFast.from_pretrained(tiny_paths["student"]),
        )
    with pytest.raises(ValueError, match="was made with another tokenizer"):
        DistillationTrainer(
            model=tiny_paths["student"],
            args=config(tmp_path / "c", teacher_cache=cache, **base),
            train_dataset=dataset(24),
        )  # AutoTokenizer rebuilds a Qwen2 BPE here: other ids
    make_cache(tiny_paths, tmp_path / "topk", live.args, fmt="topk", top_k=5)
    with pytest.raises(ValueError, match=r"with beta=0.5 only the sparse top-1 loss exists on them, so loss_top_k"):
        trainer_for(tiny_paths, tmp_path / "d", teacher=False, teacher_cache=str(tmp_path / "topk"), **base)
    with pytest.raises(ValueError, match=r"holds log-probs at temperature 1, this run has temperature=0.7"):
        top = dict(lmbda=0.0, beta=0.0, loss_top_k=5, temperature=0.7)
        trainer_for(tiny_paths, tmp_path / "d", teacher=False, teacher_cache=str(tmp_path / "topk"), **top)
    with pytest.raises(ValueError, match=r"teacher_cache serves off-policy slices only, and lmbda > 0"):
        trainer_for(tiny_paths, tmp_path / "e", teacher=False, teacher_cache=cache, lmbda=0.5, beta=0.5, loss_top_k=0)
    with pytest.raises(ValueError, match="has no manifest.json"):
        trainer_for(tiny_paths, tmp_path / "f", teacher=False, teacher_cache=str(tmp_path), **base)


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_an_interrupted_build_resumes_to_the_same_files(tiny_paths, tmp_path, dtype):
    """A build stopped after its first shards (the manifest says incomplete) is refused for training, and running the
    build again finishes it with files byte-equal to an uninterrupted build's (int8: its measured error too)."""
    args = config(tmp_path, lmbda=0.0, beta=0.5, loss_top_k=0)
    whole = make_cache(tiny_paths, tmp_path / "whole", args, dtype=dtype)
    first = make_cache(tiny_paths, tmp_path / "part", args, dtype=dtype, rows=dataset(24).select(range(14)))
    assert first.complete and first.rows == 14
    manifest = CacheManifest.read(tmp_path / "part")
    manifest.complete = False
    manifest.dataset_fingerprint = "test"
    manifest.write(tmp_path / "part")
    with pytest.raises(ValueError, match="is incomplete \\(14 rows so far\\)"):
        trainer_for(tiny_paths, tmp_path / "t", teacher=False, teacher_cache=str(tmp_path / "part"), lmbda=0.0)
    resumed = make_cache(tiny_paths, tmp_path / "part", args, dtype=dtype)
    assert resumed.rows == whole.rows == 24 and resumed.shards == whole.shards
    assert resumed.quantization == whole.quantization and (whole.quantization is None) == (dtype != "int8")
    for name in whole.shards:
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    heads = [load_head(tmp_path / folder / "lm_head.safetensors") for folder in ("part", "whole")]
    assert torch.equal(heads[0].weight, heads[1].weight)  # (safetensors orders a header's metadata freely)
