"""A local teacher: frozen, in eval mode, sharing the student's tokenizer."""

from __future__ import annotations

from ..models import output_rows


def shared_vocab_size(student, teacher, tokenizer, teacher_tokenizer=None) -> int:
    """The logit width both models are compared on, or a ValueError that says what differs.

    Output layers padded past the tokenizer (Qwen2.5's 152064 rows against 151936 tokens) are fine: logits are
    sliced to the narrower layer. A tokenizer that differs from the teacher's, or an output layer smaller than the
    tokenizer, is a real mismatch.
    """
    if teacher_tokenizer is not None and teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        student_vocab, teacher_vocab = tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
        only_student = sorted(set(student_vocab) - set(teacher_vocab))[:3]
        only_teacher = sorted(set(teacher_vocab) - set(student_vocab))[:3]
        moved = [t for t in student_vocab if t in teacher_vocab and student_vocab[t] != teacher_vocab[t]][:3]
        raise ValueError(
            f"the teacher's tokenizer differs from the student's ({len(teacher_vocab)} vs {len(student_vocab)} "
            f"tokens; only in the student: {only_student}, only in the teacher: {only_teacher}, different ids: "
            f"{moved}). Distillation on token logits needs one shared tokenizer."
        )
    tokens = len(tokenizer)
    student_rows, teacher_rows = output_rows(student), output_rows(teacher)
    for who, rows in (("student", student_rows), ("teacher", teacher_rows)):
        if rows < tokens:
            raise ValueError(
                f"the {who}'s output layer has {rows} rows but the tokenizer has {tokens} tokens; the "
                f"{who} cannot score every token, so it is not a model for this tokenizer"
            )
    return min(student_rows, teacher_rows)
