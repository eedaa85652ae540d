"""The projection rule (`uld_alignment_rule="projection"`): with one tokenizer it is the ordinary loss (value and
gradient, to 1e-6 in float64); on a hand-made coarser teacher it equals the marginal written out by hand; the table
built from real tokenizers spells every teacher token's text in student tokens."""

from __future__ import annotations

import math

import pytest
import torch
from reference import ref_divergence_terms, ref_log_softmax

from protege.crosstok import AlignedSide, CrossTokenizerLoss, VocabularyMatch, cross_tokenizer_loss_sum
from protege.losses import MIN_TAIL_PROB
from protege.projection import TokenProjection

F64 = torch.float64


# With one tokenizer the projection is the ordinary loss, value and gradient: test_crosstok's identity test runs both
# rules (`rule` parametrised there).


# ----- A hand-made coarser teacher -----
# student: 0 "A", 1 "B", 2 "C", 3 "x" (a word no teacher token starts with)
# teacher: 0 "A", 1 "B", 2 "C", 3 "AB", 4 "ABC", 5 "BC", 6 a special token without a partner
SEQUENCES = [[0], [1], [2], [0, 1], [0, 1, 2], [1, 2], []]
COARSE = TokenProjection(
    torch.tensor([s + [-1] * (3 - len(s)) for s in SEQUENCES]), torch.tensor([len(s) for s in SEQUENCES]), 4
)


def reference_q(teacher_p: list[float], written: list[int]) -> list[float | None]:
    """q by the definition, in Python: None where no teacher token goes on past `written`."""
    q = [0.0] * 4
    for token, sequence in enumerate(SEQUENCES):
        if len(sequence) > len(written) and sequence[: len(written)] == written:
            q[sequence[len(written)]] += teacher_p[token]
    total = sum(q)
    return None if total == 0 else [value / total for value in q]


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_projection_equals_the_marginal_on_a_coarser_teacher(beta):
    """Text "ABCA": the student writes A B C A (4 tokens), the teacher "ABC" "A": groups [A B C] and [A]."""
    torch.manual_seed(2)
    student_logits = torch.randn(4, 4, dtype=F64, requires_grad=True)
    teacher_logits = torch.randn(2, 7, dtype=F64)
    student_tokens, student_groups = torch.tensor([0, 1, 2, 0]), torch.tensor([0, 0, 0, 1])
    teacher_tokens, teacher_groups = torch.tensor([4, 0]), torch.tensor([0, 1])
    match = VocabularyMatch(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), 4, 7, COARSE)
    value = cross_tokenizer_loss_sum(
        AlignedSide(student_logits, None, None, student_tokens, student_groups),
        AlignedSide(teacher_logits, None, None, teacher_tokens, teacher_groups),
        2,
        match,
        CrossTokenizerLoss(beta=beta, rule="projection"),
        chunk_groups=3,
    )
    s_logp, t_p = ref_log_softmax(student_logits, 1.0), ref_log_softmax(teacher_logits, 1.0).exp()
    expected = 0.0
    for position, (teacher_row, depth) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0)]):
        q = reference_q(t_p[teacher_row].tolist(), student_tokens[position - depth : position].tolist())
        if q is None:
            continue
        if beta == 1:  # zeros of q read as the floor, then renormalised
            q = [value or MIN_TAIL_PROB for value in q]
            q = [value / sum(q) for value in q]
        log_q = torch.tensor([math.log(v) if v > 0 else -math.inf for v in q], dtype=F64)
        expected += ref_divergence_terms(s_logp[position], log_q, beta).sum().item()
    assert value.item() == pytest.approx(expected, rel=1e-9)
    value.backward()
    assert torch.isfinite(student_logits.grad).all() and student_logits.grad.abs().sum() > 0


# ----- The table, from real tokenizers -----


def spelled(tokenizer, projection: TokenProjection, token_id: int) -> list[int]:
    return projection.sequences[token_id, : int(projection.lengths[token_id])].tolist()


def test_the_walks_table_spells_each_multi_node_token_node_by_node():
    """The walks benchmark's pair: the demo's student (one token a node) and a BPE whose tokens join 1 to 4 nodes."""
    from benchmarks.walk_bpe import walk_tokenizer
    from protege.demo.task import load_tokenizer
    from protege.teacher.foreign import vocabulary_match
    from protege.teacher.projection_table import projection_table

    student, teacher = load_tokenizer(), walk_tokenizer()
    match = vocabulary_match(student, teacher, len(student), len(teacher))
    table = projection_table(student, teacher, len(student), len(teacher), match)
    merged = [i for i, token in enumerate(teacher.convert_ids_to_tokens(list(range(len(teacher))))) if i >= 259]
    for token_id in merged:
        text = teacher.convert_ids_to_tokens(token_id)
        assert student.convert_ids_to_tokens(spelled(student, table, token_id)) == list(text)
    assert spelled(student, table, teacher.eos_token_id) == [student.eos_token_id]
    assert int(table.lengths.max()) == 4


@pytest.mark.slow
@pytest.mark.parametrize("student_side", ["byte_level", "sentencepiece"])
def test_a_real_pair_spells_every_teacher_token(student_side, tmp_path):
    """mistral-common's 32k SentencePiece against a byte-level BPE, either way round: every teacher token but a
    special one without a partner is spelled, and the spelling's bytes are the token's text (leading spaces, partial
    characters in byte tokens, byte fallback)."""
    pytest.importorskip("mistral_common", reason="the 32k SentencePiece model comes with mistral-common (dev extra)")
    import importlib.resources
    import shutil

    from transformers import LlamaTokenizerFast

    from protege.alignment import standalone_bytes
    from protege.teacher.foreign import vocabulary_match
    from protege.teacher.projection_table import projection_table
    from protege.toy import train_tokenizer

    shutil.copy(
        importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1", tmp_path / "tokenizer.model"
    )
    sentencepiece = LlamaTokenizerFast.from_pretrained(tmp_path)
    byte_level = train_tokenizer(["naïve 日本語 😀 the hello world 123", "  \n\t e\u0301 Ünïcödé"] * 8, vocab_size=300)
    student, teacher = (byte_level, sentencepiece) if student_side == "byte_level" else (sentencepiece, byte_level)
    match = vocabulary_match(student, teacher, len(student), len(teacher))
    table = projection_table(student, teacher, len(student), len(teacher), match)
    special = set(teacher.all_special_ids)
    student_bytes, teacher_bytes = (
        standalone_bytes(student, range(len(student))),
        standalone_bytes(teacher, range(len(teacher))),
    )
    special |= {i for i, text in enumerate(teacher_bytes) if not text}  # added control tokens: no text
    assert set((table.lengths == 0).nonzero().squeeze(1).tolist()) <= special
    for token_id in range(len(teacher)):
        if token_id not in special:
            assert b"".join(student_bytes[i] for i in spelled(student, table, token_id)) == teacher_bytes[token_id]
    if student_side == "sentencepiece":  # " hello" as after earlier text ("a hello"), not with a second "▁"
        hello = teacher.convert_tokens_to_ids("Ġhello")
        if hello != teacher.unk_token_id:
            in_text = student("a hello", add_special_tokens=False)["input_ids"][1:]
            assert spelled(student, table, hello) == in_text
