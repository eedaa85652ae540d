"""Sequence alignment between two tokenizers, for distilling from a teacher whose tokenizer differs from the student's.

The student's tokens and the teacher's tokens of the same text are placed on one axis, the UTF-8 bytes of that text,
and grouped where the two tokenizations agree on a split. Bytes rather than characters, because byte-level BPE and
SentencePiece byte fallback both split characters (an emoji is four byte tokens), and the groups must be able to close
inside a character when both sides do.

The pieces, in the order a trainer uses them:

* `completion_text`: the student's completion ids -> its text and each token's byte span in it;
* `text_tokens`: that text, tokenized by the teacher -> ids and byte spans (from the fast tokenizer's offsets);
* `align_spans`: the two span arrays -> each token's group index on both sides.

`token_bytes` underlies the first two: each token's exact contribution to the text. Pure functions of the tokenizers'
own APIs and numpy; no torch.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# How far (in characters) past a token's own text the generic fallback of `token_bytes` looks for it in the decoded
# text: room for a separator its decoder adds (WordPiece's space), small enough to keep the walk O(n).
_FALLBACK_SLACK = 4


def _byte_level_inverse() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: each printable stand-in character -> the byte it stands for.

    Bytes that print as themselves (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) keep their code point; the other 68
    bytes, in byte order, take code points 256, 257, ...
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    kept = set(printable)
    inverse = {chr(byte): byte for byte in printable}
    others = [byte for byte in range(256) if byte not in kept]
    inverse.update({chr(256 + rank): byte for rank, byte in enumerate(others)})
    return inverse


_BYTE_LEVEL = _byte_level_inverse()


@dataclass(frozen=True)
class _Plan:
    """How a tokenizer's decoder turns one token into text, read once from its decoder's description.

    kind: "byte_level" (GPT-2 alphabet), "pieces" (replacements such as "▁" -> " ", byte fallback "<0xNN>", then a
    strip of leading spaces from the whole text), or "generic" (anything else: located in the decoded text).
    """

    kind: str
    replace: tuple[tuple[str, str], ...] = ()
    byte_fallback: bool = False
    strip_leading: int = 0


def _plan_from_decoder(spec: dict | None) -> _Plan:
    """The plan for a `tokenizers` decoder given as its JSON description; unknown steps give the generic plan."""
    if spec is None:
        return _Plan("generic")
    parts = spec.get("decoders", []) if spec.get("type") == "Sequence" else [spec]
    if parts and all(part.get("type") == "ByteLevel" for part in parts):
        return _Plan("byte_level")
    replace: list[tuple[str, str]] = []
    byte_fallback = fused = False
    strip = 0
    for part in parts:
        kind = part.get("type")
        if kind == "Replace" and "String" in part.get("pattern", {}):
            replace.append((part["pattern"]["String"], part["content"]))
        elif kind == "ByteFallback":
            byte_fallback = True
        elif kind == "Fuse":
            fused = True
        elif kind == "Strip" and fused and part.get("content") == " " and part.get("stop", 0) == 0:
            strip = int(part.get("start", 0))
        elif kind == "Metaspace":
            replace.append((part.get("replacement", "▁"), " "))
            prepends = part.get("prepend_scheme", "always") != "never" and part.get("add_prefix_space", True)
            strip = 1 if prepends else 0
        else:
            return _Plan("generic")
    return _Plan("pieces", tuple(replace), byte_fallback, strip)


def _plan_for(tokenizer: Any) -> _Plan:
    """The plan for a Hugging Face tokenizer: its Rust decoder when fast, else what a slow one is known to be."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        decoder = backend.decoder
        return _plan_from_decoder(None if decoder is None else json.loads(decoder.__getstate__()))
    if hasattr(tokenizer, "sp_model"):  # a slow SentencePiece tokenizer: "▁" for spaces, byte fallback, dummy prefix
        return _Plan("pieces", (("▁", " "),), True, 1)
    if hasattr(tokenizer, "byte_decoder"):  # a slow GPT-2 style tokenizer
        return _Plan("byte_level")
    return _Plan("generic")


def _bytes_of_token(token: str, plan: _Plan) -> bytes:
    """One vocabulary token's bytes under a byte-level or pieces plan."""
    if plan.kind == "byte_level":
        if all(c in _BYTE_LEVEL for c in token):
            return bytes(_BYTE_LEVEL[c] for c in token)
        return token.encode()  # not in the alphabet: a token added as plain text
    if plan.byte_fallback and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            pass
    for old, new in plan.replace:
        token = token.replace(old, new)
    return token.encode()


class _ByteTable:
    """Each id's bytes (before the leading strip), filled on first sight: a lookup per token after that."""

    def __init__(self, tokenizer: Any) -> None:
        self.size = len(tokenizer)
        self.plan = _plan_for(tokenizer)
        added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.special = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
        self.special |= {int(i) for i, token in added.items() if getattr(token, "special", False)}
        self.added = {int(i): getattr(token, "content", str(token)) for i, token in added.items()}
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.id_to_token = backend.id_to_token if backend is not None else tokenizer.convert_ids_to_tokens
        self.known: dict[int, bytes] = {}

    def fill(self, ids: list[int]) -> None:
        """Compute the bytes of the ids not seen yet: b"" for special and unknown ids, added tokens as their text."""
        for i in set(ids).difference(self.known):
            if i in self.special or not 0 <= i < self.size:
                self.known[i] = b""
            elif i in self.added:
                self.known[i] = self.added[i].encode()
            else:
                token = self.id_to_token(i)
                self.known[i] = b"" if token is None else _bytes_of_token(token, self.plan)

    def lookup(self, ids: list[int]) -> list[bytes]:
        """The bytes of each id."""
        known = self.known
        try:
            return [known[i] for i in ids]
        except KeyError:
            self.fill(ids)
            return [known[i] for i in ids]


_TABLES: weakref.WeakKeyDictionary[Any, _ByteTable] = weakref.WeakKeyDictionary()


def _table(tokenizer: Any) -> _ByteTable:
    """The cached byte table of a tokenizer, rebuilt if tokens were added since (uncached if it cannot be a key)."""
    try:
        table = _TABLES.get(tokenizer)
    except TypeError:  # not weakly referenceable or not hashable
        return _ByteTable(tokenizer)
    if table is None or table.size != len(tokenizer):
        table = _TABLES[tokenizer] = _ByteTable(tokenizer)
    return table


def _as_ids(ids: Sequence[int] | Any) -> list[int]:
    """Plain ints from a list, numpy array or tensor."""
    return [int(i) for i in (ids.tolist() if hasattr(ids, "tolist") else ids)]


def _generic_bytes(tokenizer: Any, ids: list[int]) -> list[bytes]:
    """Each token's bytes for a decoder without a known per-token rule: its decoded text located in the whole text.

    Walks the decoded text once: each token's own decoded text (stripped) is searched a few characters past where the
    previous one ended, and the token takes everything up to its end (the separator its decoder added before it, say).
    A token not found there (its text depends on its neighbours) takes nothing and the next one found takes its text;
    the tail goes to the last token. So the join is always the decoded text; only the split may be approximate.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        full = backend.decode(ids, skip_special_tokens=True)
        pieces = backend.decode_batch([[i] for i in ids], skip_special_tokens=True)
    else:
        options = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
        full = tokenizer.decode(ids, **options)
        pieces = [tokenizer.decode([i], **options) for i in ids]
    out: list[bytes] = []
    cursor = 0
    for piece in pieces:
        core = piece.strip()
        at = full.find(core, cursor, cursor + len(piece) + _FALLBACK_SLACK) if core else -1
        if at < 0:
            out.append(b"")
            continue
        out.append(full[cursor : at + len(core)].encode())
        cursor = at + len(core)
    if cursor < len(full) and out:
        out[-1] += full[cursor:].encode()
    return out


def standalone_bytes(tokenizer: Any, ids: Sequence[int]) -> list[bytes]:
    """Each id's bytes on its own, as a vocabulary entry (no leading strip; special tokens b""): what two vocabularies
    are matched on (`teacher.foreign.vocabulary_match`)."""
    ids = _as_ids(ids)
    table = _table(tokenizer)
    if table.plan.kind == "generic":
        return [tokenizer.decode([i], skip_special_tokens=True).encode() for i in ids]
    return table.lookup(ids)


def token_bytes(tokenizer: Any, ids: Sequence[int]) -> list[bytes]:
    """Each id's exact contribution to the UTF-8 text the sequence decodes to, so that the join is that text.

    Needed because tokens split characters (byte-level BPE, byte fallback), so text offsets must be in bytes.
    Rules, read from the fast tokenizer's decoder (cached per tokenizer, one dict lookup per token after the first):

    * special tokens (EOS, BOS, pad, <unk>, added special tokens) and ids outside the vocabulary give b"", as
      ``decode(..., skip_special_tokens=True)`` does; non-special added tokens give their text;
    * byte-level BPE (GPT-2 alphabet): each character mapped back to its byte;
    * SentencePiece / Metaspace: "▁" -> b" ", byte-fallback tokens "<0xNN>" -> that byte. The leading "▁": where
      the decoder strips leading spaces from the text (``Strip`` after ``Fuse``, or a ``Metaspace`` decoder that
      prepends), one space is dropped from the first token that has any bytes. This is the text ``decode`` gives and
      the text that encodes back to the same ids ("Hello" -> "▁Hello"); a text that began with a space (" Hello"
      also encodes to "▁Hello") comes back without it, which no rule could tell apart;
    * any other decoder (WordPiece, CTC, none): the generic walk of `_generic_bytes`, one decode of the sequence and
      one batched decode of its tokens: the join is the decoded text, the split between tokens may be approximate.

    Invalid UTF-8 (a lone byte-fallback token) is kept as raw bytes here; `completion_text` drops it.
    """
    ids = _as_ids(ids)
    table = _table(tokenizer)
    if table.plan.kind == "generic":
        return _generic_bytes(tokenizer, ids)
    out = table.lookup(ids)
    strip = table.plan.strip_leading
    if strip:
        out = list(out)
        for position, piece in enumerate(out):
            if not piece:
                continue
            spaces = len(piece) - len(piece.lstrip(b" "))
            out[position] = piece[min(strip, spaces) :]
            break
    return out


def _valid_utf8(data: bytes) -> tuple[str, list[tuple[int, int]]]:
    """The text of `data` with the bytes that are not valid UTF-8 dropped, and the dropped [start, end) byte runs."""
    parts: list[str] = []
    dropped: list[tuple[int, int]] = []
    position = 0
    while True:
        try:
            parts.append(data[position:].decode("utf-8"))
            return "".join(parts), dropped
        except UnicodeDecodeError as error:
            start, end = position + error.start, position + error.end
            parts.append(data[position:start].decode("utf-8"))
            dropped.append((start, end))
            position = end


def completion_text(tokenizer: Any, ids: Sequence[int]) -> tuple[str, np.ndarray]:
    """The text of a student's completion ids and each token's [start, end) byte span in its UTF-8 encoding.

    The teacher must be given valid text, but a completion can end mid-character (generation stopped after the first
    byte-fallback token of an emoji) or hold stray bytes. Bytes that do not decode as UTF-8 are dropped from the
    text: an incomplete character at the end, and any invalid run inside (where ``decode`` would write U+FFFD, which
    would change byte lengths). Spans are in the kept text: a token wholly inside dropped bytes gets an empty span
    where they were (at the end of the text for a cut last character), a token partly inside one is shortened.
    Special tokens (EOS) get empty spans at their position. Returns spans of shape (n, 2), int64.
    """
    pieces = token_bytes(tokenizer, ids)
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    data = b"".join(pieces)
    text, dropped = _valid_utf8(data)
    if dropped:
        keep = np.ones(len(data), dtype=np.int64)
        for start, end in dropped:
            keep[start:end] = 0
        bounds = np.concatenate([[0], np.cumsum(keep)])[bounds]
    return text, np.stack([bounds[:-1], bounds[1:]], axis=1)


def _char_to_byte(text: str) -> np.ndarray:
    """For each character offset 0..len(text), the UTF-8 byte offset: cumulative UTF-8 lengths of the code points."""
    points = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
    widths = 1 + (points >= 0x80).astype(np.int64) + (points >= 0x800) + (points >= 0x10000)
    return np.concatenate([[0], np.cumsum(widths)]).astype(np.int64)


def _monotone(spans: np.ndarray) -> np.ndarray:
    """Spans made ordered and disjoint: a token overlapping the ones before it keeps only the bytes after them.

    Tokens that share a character (byte tokens of one emoji) all carry its whole span in an offset mapping; the first
    keeps it and the rest become empty at its end, so they fall in its group.
    """
    ends = np.maximum.accumulate(spans[:, 1]) if len(spans) else spans[:, 1]
    previous = np.concatenate([[0], ends[:-1]]) if len(spans) else ends
    starts = np.minimum(np.maximum(spans[:, 0], previous), ends)
    return np.stack([starts, ends], axis=1).astype(np.int64)


def text_tokens(tokenizer: Any, text: str) -> tuple[list[int], np.ndarray]:
    """`text` tokenized with no special tokens added, and each token's [start, end) UTF-8 byte span, int64 (n, 2).

    The spans come from the fast tokenizer's offset mapping (characters, converted to bytes). Where the tokens'
    bytes (`token_bytes`) rebuild the text exactly and each lies inside its offsets, they are used instead: they are
    the same at character boundaries and also split a character between the byte tokens that spell it. Otherwise
    (a normalizer changed the text, an <unk>, a dropped leading space) the offsets are made ordered and disjoint:
    tokens sharing a character after the first get empty spans at its end.
    """
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError(
            f"{type(tokenizer).__name__} cannot give token offsets: aligning a teacher with another tokenizer needs "
            "a fast tokenizer (PreTrainedTokenizerFast, backed by Rust `tokenizers`)."
        )
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
    ids = list(encoded["input_ids"])
    offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    spans = _char_to_byte(text)[offsets]
    pieces = token_bytes(tokenizer, ids)
    encoded_text = text.encode("utf-8", errors="surrogatepass")
    if b"".join(pieces) == encoded_text:
        lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        exact = np.stack([bounds[:-1], bounds[1:]], axis=1)
        filled = lengths > 0
        inside = (exact[filled, 0] >= spans[filled, 0]) & (exact[filled, 1] <= spans[filled, 1])
        if inside.all():
            return ids, exact.astype(np.int64)
    return ids, _monotone(spans)


def _group_of(spans: np.ndarray, closes: np.ndarray) -> np.ndarray:
    """Each token's group: the number of close points before its end; an empty token takes the group before it."""
    filled = spans[:, 1] > spans[:, 0]
    groups = np.where(filled, np.searchsorted(closes, spans[:, 1], side="left"), 0)
    return np.maximum.accumulate(groups) if len(groups) else groups.astype(np.int64)


def _checked(spans: np.ndarray, side: str) -> np.ndarray:
    """Spans as int64 (n, 2), refused unless the non-empty ones end in order (as both span makers give them)."""
    spans = np.asarray(spans, dtype=np.int64).reshape(-1, 2)
    ends = spans[spans[:, 1] > spans[:, 0], 1]
    if np.any(np.diff(ends) < 0):
        raise ValueError(f"the {side} spans must end in order (non-decreasing ends of the non-empty spans)")
    return spans


def align_spans(student_spans: np.ndarray, teacher_spans: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The aligned groups: each student token's and each teacher token's group index (int64), and the group count.

    A group closes at every byte where a non-empty student token and a non-empty teacher token both end: the points
    where the two tokenizations agree on a split. The tokens ending after one close point, up to and at the next,
    form a group on each side, so every group has at least one non-empty token on both sides. Empty tokens (special
    tokens, bytes dropped from the text) join the group of the token before them, or the first group. Groups are
    numbered in order from 0 and every token is in exactly one.

    The one exception to "both sides non-empty": when the two sides' last non-empty tokens do not end at the same
    byte (the spans cover different lengths of text, or a side has no non-empty token), the tokens after the last
    close point form one more, final group, which may be empty on one side.
    """
    student = _checked(student_spans, "student")
    teacher = _checked(teacher_spans, "teacher")
    student_ends = student[student[:, 1] > student[:, 0], 1]
    teacher_ends = teacher[teacher[:, 1] > teacher[:, 0], 1]
    closes = np.intersect1d(student_ends, teacher_ends)
    student_groups = _group_of(student, closes)
    teacher_groups = _group_of(teacher, closes)
    trailing = bool((student_groups == len(closes)).any() or (teacher_groups == len(closes)).any())
    return student_groups.astype(np.int64), teacher_groups.astype(np.int64), len(closes) + int(trailing)
