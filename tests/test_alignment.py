"""Sequence alignment between two tokenizers (protege.alignment) on real tokenizers: a 32k SentencePiece model with
byte fallback (mistral-common's), a byte-level BPE and a char-level tokenizer with byte fallback, trained here."""

from __future__ import annotations

import importlib.resources
import shutil
import string

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaTokenizerFast, PreTrainedTokenizerFast

from protege.alignment import align_spans, completion_text, text_tokens, token_bytes
from protege.toy import train_tokenizer

PIECES = [
    " ", "  ", "   ", "\n", "\n\n", "\t", " \n ", "\r\n", "日本語", "中文字", "한국어", "😀", "🦜", "👍🏽", "👨‍👩‍👧",
    "e\u0301", "a\u0308\u0323", "naïve", "hello", "world", " the", "Ünïcödé", "123", "...",
]  # fmt: skip
SPECIAL_TEXT = ("<s>", "</s>", "<unk>", "<|")  # spelled in a text, these would encode as special tokens: not text
CHARS = st.characters(codec="utf-8", exclude_characters="\u2581", exclude_categories=("Cs",))  # no "▁": a space in SP
TEXTS = (
    st.lists(st.one_of(st.sampled_from(PIECES), st.text(CHARS, max_size=6)), max_size=10)
    .map("".join)
    .filter(lambda text: not any(mark in text for mark in SPECIAL_TEXT))
)
PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory) -> PreTrainedTokenizerFast:
    """mistral-common's 32k SentencePiece model (byte fallback, Metaspace), as a fast Llama tokenizer."""
    pytest.importorskip("mistral_common", reason="the 32k SentencePiece model comes with mistral-common (dev extra)")
    folder = tmp_path_factory.mktemp("sp32k")
    shutil.copy(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    return LlamaTokenizerFast.from_pretrained(folder)


@pytest.fixture(scope="module")
def byte_level() -> PreTrainedTokenizerFast:
    """A GPT-2 style byte-level BPE, trained on text with multi-byte characters so that merges split them."""
    corpus = [" ".join(PIECES[i:] + PIECES[:i]) for i in range(len(PIECES))] * 4
    return train_tokenizer(corpus, vocab_size=600)


@pytest.fixture(scope="module")
def char_level() -> PreTrainedTokenizerFast:
    """One token per character it knows, byte fallback (<0xNN>) for the rest; decoder ByteFallback + Fuse."""
    vocab = {"<|endoftext|>": 0, "<|im_end|>": 1}
    vocab.update({f"<0x{byte:02X}>": 2 + byte for byte in range(256)})
    for char in sorted(set(string.printable) | set("日本語中文éü")):
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    backend.add_special_tokens(["<|endoftext|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def expected_text(tokenizer, text: str) -> str:
    """The text that encoding then decoding gives back: SentencePiece loses one leading space (see token_bytes)."""
    return text[1:] if isinstance(tokenizer, LlamaTokenizerFast) and text.startswith(" ") else text


def check_tiling(spans: np.ndarray, length: int) -> None:
    """Spans in order, disjoint, covering [0, length) exactly (empty spans anywhere in between)."""
    assert spans.dtype == np.int64 and spans.shape[1] == 2
    assert (spans[:, 0] <= spans[:, 1]).all()
    filled = spans[spans[:, 1] > spans[:, 0]]
    if length == 0:
        assert len(filled) == 0
        return
    assert filled[0, 0] == 0 and filled[-1, 1] == length
    assert (filled[1:, 0] == filled[:-1, 1]).all()


def group_ranges(spans: np.ndarray, groups: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Each group's [lo, hi) bytes over its non-empty tokens, checked to be covered without gaps or overlaps."""
    filled = spans[:, 1] > spans[:, 0]
    lo, hi, total = np.full(count, 1 << 40), np.full(count, -1), np.zeros(count, dtype=np.int64)
    np.minimum.at(lo, groups[filled], spans[filled, 0])
    np.maximum.at(hi, groups[filled], spans[filled, 1])
    np.add.at(total, groups[filled], spans[filled, 1] - spans[filled, 0])
    assert (total == hi - lo).all()
    return lo, hi


def check_groups(groups: np.ndarray, count: int) -> None:
    """Group indices in order from 0, each of the `count` groups holding at least one token."""
    assert groups.dtype == np.int64
    assert (np.diff(groups) >= 0).all()
    assert np.array_equal(np.unique(groups), np.arange(count))


TOKENIZERS = ["sentencepiece", "byte_level", "char_level"]
PAIRS = [
    ("sentencepiece", "byte_level"),
    ("byte_level", "sentencepiece"),
    ("byte_level", "char_level"),
    ("char_level", "byte_level"),
]


@pytest.mark.parametrize("name", TOKENIZERS)
@PROPERTY
@given(text=TEXTS)
def test_token_bytes_rebuild_the_text(request, name, text):
    tokenizer = request.getfixturevalue(name)
    ids = encode(tokenizer, text)
    pieces = token_bytes(tokenizer, ids)
    assert len(pieces) == len(ids)
    joined = b"".join(pieces)
    assert joined == expected_text(tokenizer, text).encode()
    assert joined.decode() == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize(("student_name", "teacher_name"), PAIRS)
@PROPERTY
@given(text=TEXTS, cut=st.floats(0, 1), eos=st.booleans())
def test_groups_cover_the_same_bytes_once_in_order(request, student_name, teacher_name, text, cut, eos):
    student, teacher = request.getfixturevalue(student_name), request.getfixturevalue(teacher_name)
    full = encode(student, text)
    ids = full[: round(cut * len(full))] + ([student.eos_token_id] if eos else [])
    completion, student_spans = completion_text(student, ids)
    data = completion.encode()
    whole = expected_text(student, text).encode()
    assert whole.startswith(data) and len(b"".join(token_bytes(student, ids))) - len(data) <= 3  # cut bytes dropped
    assert student_spans.shape == (len(ids), 2)
    check_tiling(student_spans, len(data))
    if eos:
        assert student_spans[-1, 0] == student_spans[-1, 1] == len(data)
    teacher_ids, teacher_spans = text_tokens(teacher, completion)
    assert teacher_ids == encode(teacher, completion)
    check_tiling(teacher_spans, len(data))
    for side, side_ids, spans in ((student, ids, student_spans), (teacher, teacher_ids, teacher_spans)):
        pieces = token_bytes(side, side_ids)
        if b"".join(pieces) == data:  # no bytes dropped, no leading space lost: each span holds its token's bytes
            assert [data[start:end] for start, end in spans.tolist()] == pieces

    student_groups, teacher_groups, count = align_spans(student_spans, teacher_spans)
    assert student_groups.shape == (len(ids),) and teacher_groups.shape == (len(teacher_ids),)
    if not data:  # nothing to align: the student's empty tokens form the one group, the teacher has no tokens
        assert count == (1 if ids else 0) and len(teacher_ids) == 0 and (student_groups == 0).all()
        return
    check_groups(student_groups, count)
    check_groups(teacher_groups, count)
    if eos:
        assert student_groups[-1] == count - 1
    student_lo, student_hi = group_ranges(student_spans, student_groups, count)
    teacher_lo, teacher_hi = group_ranges(teacher_spans, teacher_groups, count)
    assert np.array_equal(student_lo, teacher_lo) and np.array_equal(student_hi, teacher_hi)
    assert student_lo[0] == 0 and student_hi[-1] == len(data) and (student_lo[1:] == student_hi[:-1]).all()


def test_cut_mid_character_drops_the_partial_bytes(sentencepiece):
    ids = encode(sentencepiece, "ok 🦜")
    tokens = sentencepiece.convert_ids_to_tokens(ids)
    first_byte = tokens.index("<0xF0>")  # 🦜 is not in the 32k vocabulary: four byte-fallback tokens
    assert tokens[first_byte : first_byte + 4] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x9C>"]
    for end in range(first_byte + 1, first_byte + 4):
        text, spans = completion_text(sentencepiece, ids[:end])
        assert text == "ok "
        check_tiling(spans, 3)
        assert (spans[first_byte:] == 3).all()  # the partial character's tokens: empty, at the end
    text, spans = completion_text(sentencepiece, ids)
    assert text == "ok 🦜" and spans[first_byte:].tolist() == [[3, 4], [4, 5], [5, 6], [6, 7]]


def test_stray_byte_inside_is_dropped(char_level):
    stray = char_level.convert_tokens_to_ids("<0xF0>")
    ids = encode(char_level, "ab") + [stray] + encode(char_level, "c")
    text, spans = completion_text(char_level, ids)
    assert text == "abc" and spans.tolist() == [[0, 1], [1, 2], [2, 2], [2, 3]]


def test_special_tokens_add_no_text_and_sit_in_the_last_group(sentencepiece, byte_level):
    ids = encode(sentencepiece, "Hello world") + [sentencepiece.eos_token_id]
    assert token_bytes(sentencepiece, ids)[-1] == b""
    text, student_spans = completion_text(sentencepiece, ids)
    assert text == "Hello world"
    _, teacher_spans = text_tokens(byte_level, text)
    student_groups, teacher_groups, count = align_spans(student_spans, teacher_spans)
    assert student_groups[-1] == teacher_groups[-1] == count - 1


def test_leading_metaspace_rule(sentencepiece):
    ids = encode(sentencepiece, "Hello")
    assert sentencepiece.convert_ids_to_tokens(ids) == ["▁Hello"]
    assert token_bytes(sentencepiece, ids) == [b"Hello"]
    assert token_bytes(sentencepiece, [sentencepiece.bos_token_id, *ids, *ids]) == [b"", b"Hello", b" Hello"]
    # " Hello" encodes the same: its offsets keep the space, so the teacher side still covers every byte
    teacher_ids, spans = text_tokens(sentencepiece, " Hello")
    assert teacher_ids == ids and spans.tolist() == [[0, 6]]


def test_slow_tokenizer_is_refused(sentencepiece):
    from transformers import SentencePieceBackend

    slow = SentencePieceBackend(vocab_file=sentencepiece.vocab_file, unk_token="<unk>", eos_token="</s>")
    assert not slow.is_fast
    with pytest.raises(ValueError, match="SentencePieceBackend.*fast tokenizer"):
        text_tokens(slow, "Hello")
    ids = slow.encode("Hello\n world", add_special_tokens=False)
    assert b"".join(token_bytes(slow, ids)) == b"Hello\n world"  # token_bytes itself needs no offsets


def test_generic_decoder_fallback_rebuilds_the_decoded_text():
    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "##s": 3, "!": 4}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    ids = encode(tokenizer, "hello worlds !")
    pieces = token_bytes(tokenizer, ids)
    assert b"".join(pieces) == tokenizer.decode(ids).encode()
    assert pieces[:2] == [b"hello", b" world"]


def test_align_spans_by_hand():
    student = np.array([[0, 2], [2, 3], [3, 3], [3, 5]])
    teacher = np.array([[0, 0], [0, 1], [1, 3], [3, 4], [4, 5], [5, 5]])
    student_groups, teacher_groups, count = align_spans(student, teacher)
    assert (student_groups.tolist(), teacher_groups.tolist(), count) == ([0, 0, 0, 1], [0, 0, 0, 1, 1, 1], 2)
    # sides of different lengths: the tokens past the last common end form one final group, here student-only
    student_groups, teacher_groups, count = align_spans(np.array([[0, 1], [1, 2]]), np.array([[0, 1]]))
    assert (student_groups.tolist(), teacher_groups.tolist(), count) == ([0, 1], [0], 2)
    assert align_spans(np.zeros((0, 2)), np.zeros((0, 2)))[2] == 0
    with pytest.raises(ValueError, match="student spans must end in order"):
        align_spans(np.array([[0, 3], [1, 2]]), teacher)
