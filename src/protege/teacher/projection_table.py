"""The table of `projection.TokenProjection` for a pair of tokenizers: each teacher token's text in student tokens,
built once when a teacher of another tokenizer is loaded (two 32k tokenizers: about 4 s).

A teacher token whose text is a student token's (`VocabularyMatch`: the same text, space markers normalised) is that
token, even where the student's tokenizer would split the text (a BPE whose pre-tokenizer splits digits never writes
its own "14", but a model can): so with one tokenizer every token is itself and the loss is the ordinary one. The
others are spelled as the student's tokenizer writes them in the middle of a text, not alone: a SentencePiece
tokenizer would write "hello" alone as "▁hello" (its dummy prefix), and a teacher token's text comes after earlier
text. So the text is tokenized after an anchor (a newline, else a few other one-character texts) and the tokens after
the anchor's are kept, where the anchor's tokens end exactly where the text starts and the kept tokens spell the text.
Bytes that are not UTF-8 on their own (a byte-level token holding part of a character) are spelled with the
student's one-byte tokens where it has them. Special tokens go to their partner in the vocabulary match (the two
end-of-turn tokens), or nowhere. A text the student cannot spell this way gets an empty sequence, which leaves the
token out of the projection.
"""

from __future__ import annotations

import torch

from ..alignment import standalone_bytes
from ..crosstok import VocabularyMatch
from ..projection import TokenProjection

ANCHORS = ("\n", ".", " ", "0", "a")  # tried in order, the first whose tokens end where the text starts


def _byte_tokens(student_tokenizer, student_width: int) -> dict[int, int]:
    """The student's one-byte tokens: byte value -> id (byte-level alphabets, SentencePiece's <0xNN>)."""
    out: dict[int, int] = {}
    for token_id, text in enumerate(standalone_bytes(student_tokenizer, range(student_width))):
        if len(text) == 1 and token_id not in set(student_tokenizer.all_special_ids):
            out.setdefault(text[0], token_id)
    return out


def _split_valid(data: bytes) -> tuple[str, bytes]:
    """The longest UTF-8 prefix of `data` as text, and the bytes after it."""
    for cut in range(len(data), -1, -1):
        try:
            return data[:cut].decode("utf-8"), data[cut:]
        except UnicodeDecodeError:
            continue
    return "", data


def _mid_text(student_tokenizer, texts: list[str], student_width: int) -> list[list[int] | None]:
    """Each text's student tokens after an anchor (see the module docstring); None where no anchor works."""
    out: list[list[int] | None] = [None] * len(texts)
    todo = [i for i, text in enumerate(texts) if text]
    for anchor in ANCHORS:
        if not todo:
            break
        encoded = student_tokenizer(
            [anchor + texts[i] for i in todo], add_special_tokens=False, return_offsets_mapping=True
        )
        left = []
        for i, ids, offsets in zip(todo, encoded["input_ids"], encoded["offset_mapping"]):
            start = len(anchor)
            straddles = any(a < start < b for a, b in offsets)
            kept = [t for t, (a, b) in zip(ids, offsets) if a >= start and b > a]
            spelled = b"".join(standalone_bytes(student_tokenizer, kept)) if kept else b""
            if straddles or spelled != texts[i].encode() or any(t >= student_width for t in kept):
                left.append(i)
            else:
                out[i] = kept
        todo = left
    return out


def projection_table(
    student_tokenizer, teacher_tokenizer, student_width: int, teacher_width: int, match: VocabularyMatch
) -> TokenProjection:
    """Every teacher token (ids below `teacher_width`) spelled in student tokens (ids below `student_width`)."""
    pieces = standalone_bytes(teacher_tokenizer, range(teacher_width))
    special = set(teacher_tokenizer.all_special_ids)
    partners = dict(zip(match.teacher_ids.tolist(), match.student_ids.tolist()))
    bytes_of = _byte_tokens(student_tokenizer, student_width)
    splits = [_split_valid(piece) for piece in pieces]
    spelled = _mid_text(student_tokenizer, [text for text, _ in splits], student_width)
    sequences: list[list[int]] = []
    for token_id, (piece, (text, rest), tokens) in enumerate(zip(pieces, splits, spelled)):
        if token_id in partners or token_id in special or not piece:  # a token of the same text, or nothing
            sequences.append([partners[token_id]] if token_id in partners else [])
            continue
        head = tokens if text else []
        tail = [bytes_of.get(byte, -1) for byte in rest]
        if (text and tokens is None) or -1 in tail:
            sequences.append([])
        else:
            sequences.append(head + tail)
    width = max((len(s) for s in sequences), default=1) or 1
    table = torch.full((teacher_width, width), -1, dtype=torch.long)
    for token_id, sequence in enumerate(sequences):
        table[token_id, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    return TokenProjection(table, lengths, student_width)
