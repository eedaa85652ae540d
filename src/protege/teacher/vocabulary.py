"""Which token ids the student and the teacher are compared on, decided here for a local teacher and a server alike.

The teacher's tokenizer must be the student's, or extend it: every student token at the student's id, and the
teacher's extra tokens (Qwen3's think and tool tags over Qwen2.5's vocabulary) at ids past the student's. Anything
else is a `TokenizerMismatchError` that names what differs.

A teacher that extends the student's tokenizer is compared on the student's ids only: its logits (or LM head rows) are
sliced to the student's tokenizer, so its distribution is renormalised over the tokens the student can produce,
p_T(v | v is a student token). The alternative, counting the extra tokens' mass in the tail, is worse in every mode:

* forward KL (beta=0) and the JSD ask the student to match the teacher's mass token by token: the extra tokens' mass
  has no student token to go to, so over the full vocabulary it is unmatchable (there is no tail), and with a top-k
  tail (`loss_add_tail`) the student would be taught to put it on whichever shared tokens lie outside the top-k
  (after `<|im_start|>assistant`, Qwen3 puts most of its mass on `<think>`);
* reverse KL (beta=1): the student puts no mass on the extra tokens, so restricting the sum to the shared ids gives
  KL(S || T renormalised) - log Z, where Z is the teacher's mass on shared ids: renormalising changes only that
  constant, so the gradient is the same and the loss is 0 at the optimum, as with one tokenizer;
* `loss_add_tail` keeps its meaning: the tail is the shared tokens outside the support, as with one tokenizer.

With one shared tokenizer, output layers padded past it (Qwen2.5's 151,936 rows against 151,665 tokens) are compared
on the narrower layer, as before. With an extending teacher the width is the student's tokenizer: past it the teacher
has its extra tokens and the student has padding rows, which are no tokens of the student.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

logger = logging.getLogger(__name__)

ACCEPTED = (
    "distillation on token logits needs the student's tokenizer, or one that extends it: every student token at the "
    "same id, the extra tokens after them (as Qwen3's extends Qwen2.5's); for a teacher of another tokenizer set "
    "use_uld_loss=True (cross-tokenizer distillation)"
)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")  # any one: a tokenizer


def has_tokenizer_files(folder: str) -> bool:
    """Whether a model folder holds a tokenizer (any of `TOKENIZER_FILES`): one without is a model published without
    its tokenizer, where only the sizes of the two vocabularies can be compared."""
    return any(os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES)


class TokenizerMismatchError(ValueError):
    """The teacher's tokenizer is neither the student's nor an extension of it that keeps every student token's id."""


def teacher_extra_tokens(
    student_vocab: Mapping[str, int], teacher_vocab: Mapping[str, int], teacher: str = "the teacher's tokenizer"
) -> list[str]:
    """The tokens the teacher's token-to-id map adds to the student's, in id order: none for the same map, the extra
    ones for an extension (every student token at its own id, the extra ones past the student's ids); else a
    `TokenizerMismatchError` naming the first kind of difference found and a few of its tokens."""
    if teacher_vocab == student_vocab:
        return []
    differs = f"{teacher} differs from the student's ({len(teacher_vocab)} vs {len(student_vocab)} tokens)"
    ordered = sorted(student_vocab, key=student_vocab.__getitem__)  # in id order, so messages are reproducible
    missing = [token for token in ordered if token not in teacher_vocab]
    if missing:
        raise TokenizerMismatchError(
            f"{differs}: it lacks {len(missing)} of the student's tokens, e.g. {missing[:3]}; {ACCEPTED}"
        )
    moved = [token for token in ordered if teacher_vocab[token] != student_vocab[token]]
    if moved:
        examples = ", ".join(f"{t!r}: {student_vocab[t]} vs {teacher_vocab[t]}" for t in moved[:3])
        raise TokenizerMismatchError(
            f"{differs}: {len(moved)} shared tokens have other ids in the teacher ({examples}); {ACCEPTED}"
        )
    last = max(student_vocab.values(), default=-1)
    extra = sorted((i, t) for t, i in teacher_vocab.items() if t not in student_vocab)
    inside = [(i, t) for i, t in extra if i <= last]
    if inside:
        raise TokenizerMismatchError(
            f"{differs}: its extra tokens {[t for _, t in inside[:3]]} take ids {[i for i, _ in inside[:3]]} inside "
            f"the student's range [0, {last}], where the student has no token; {ACCEPTED}"
        )
    return [t for _, t in extra]


def announce_extra_tokens(extra: list[str], student_tokens: int, teacher: str = "the teacher's tokenizer") -> None:
    """The one log line saying that an extending teacher was accepted, and what the loss does with its extra tokens."""
    if extra:
        logger.info(
            "%s extends the student's by %d tokens (%s) that the student cannot produce: the teacher is compared on "
            "the student's %d token ids, its distribution renormalised over them",
            teacher,
            len(extra),
            ", ".join(extra[:5]) + (", ..." if len(extra) > 5 else ""),
            student_tokens,
        )


def shared_rows(tokens: int, student_rows: int, teacher_rows: int, extra_tokens: int = 0) -> int:
    """The logit width both models are compared on: the narrower output layer for one shared tokenizer of `tokens`,
    the student's `tokens` when the teacher's tokenizer adds `extra_tokens` (see the module docstring). Each layer
    must cover the student's tokenizer."""
    for who, rows in (("student", student_rows), ("teacher", teacher_rows)):
        if rows < tokens:
            raise ValueError(
                f"the {who}'s output layer has {rows} rows but the tokenizer has {tokens} tokens; the "
                f"{who} cannot score every token, so it is not a model for this tokenizer"
            )
    return tokens if extra_tokens else min(student_rows, teacher_rows)
