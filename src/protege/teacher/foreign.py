"""A teacher of another tokenizer (`use_uld_loss`): every slice is translated into the teacher's own tokens.

The teacher reads the row's prompt in its own chat template (rendered at tokenization, `teacher_prompt_ids`) and the
student's completion (the dataset's, or the student's sample) as text, decoded from the student's ids and
re-tokenized by the teacher's tokenizer. `alignment.align_spans` groups the two token runs by the bytes they cover;
the two end-of-turn tokens, when the student's completion ends with one, form their own last group. The inner teacher
(a local model) scores the translated batch, and the loss compares the groups (`crosstok`, `TeacherForeign`).
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch

from ..alignment import align_spans, completion_text, standalone_bytes, text_tokens
from ..crosstok import VocabularyMatch
from ..data import sequence_batch
from ..losses import IGNORE_INDEX
from ..models import head_view, load_tokenizer, output_rows
from ..outputs import TeacherForeign
from . import Placement, Teacher
from .local import LocalTeacher, load_teacher
from .projection_table import projection_table
from .remote import connect_remote_teacher
from .spec import TeacherSpec


def _max_positions(model) -> int | None:
    """The positions a local teacher has (its max_position_embeddings), None for a server or where unknown."""
    if model is None:
        return None
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return positions if isinstance(positions, int) and positions > 0 else None


def token_texts(tokenizer, width: int) -> dict[bytes, int]:
    """Each token's text as bytes (`alignment.standalone_bytes`: byte-level symbols decoded, "▁" as a space,
    byte-fallback tokens as their byte), special tokens under their own name only; the first id wins where two spell
    the same."""
    ids = list(range(width))
    tokens = tokenizer.convert_ids_to_tokens(ids)
    special = set(tokenizer.all_special_ids)
    texts: dict[bytes, int] = {}
    for token_id, token, text in zip(ids, tokens, standalone_bytes(tokenizer, ids)):
        if (token_id in special or not text) and token is not None:  # special and added control tokens: by name
            texts.setdefault(b"\x00special:" + token.encode(), token_id)
        elif text:
            texts.setdefault(text, token_id)
    return texts


def vocabulary_match(student_tokenizer, teacher_tokenizer, student_width: int, teacher_width: int) -> VocabularyMatch:
    """The tokens the two vocabularies share by text, and the two end-of-turn tokens as a pair."""
    student_texts = token_texts(student_tokenizer, student_width)
    pairs = {
        student_texts[text]: teacher_id
        for text, teacher_id in token_texts(teacher_tokenizer, teacher_width).items()
        if text in student_texts
    }
    if student_tokenizer.eos_token_id is not None and teacher_tokenizer.eos_token_id is not None:
        pairs[student_tokenizer.eos_token_id] = teacher_tokenizer.eos_token_id
    seen_teacher: set[int] = set()
    student_ids, teacher_ids = [], []
    for student_id, teacher_id in sorted(pairs.items()):
        if teacher_id not in seen_teacher:  # one partner each
            seen_teacher.add(teacher_id)
            student_ids.append(student_id)
            teacher_ids.append(teacher_id)
    return VocabularyMatch(torch.tensor(student_ids), torch.tensor(teacher_ids), student_width, teacher_width)


def load_foreign_teacher(spec: TeacherSpec, args, student, tokenizer, objective) -> ForeignTokenizerTeacher:
    """The teacher of `spec` with its own tokenizer (`teacher_tokenizer_name_or_path`, else the one published with a
    local teacher), run on its own tokens: a local model, or a teacher server in the hidden format."""
    model, teacher_tokenizer = (None, None) if spec.server_url is not None else load_teacher(spec.model, args)
    named = args.teacher_tokenizer_name_or_path
    named = named.get(spec.name) if isinstance(named, dict) else named  # several teachers: each its own
    if named is not None:
        teacher_tokenizer = load_tokenizer(named, args.trust_remote_code)
    if teacher_tokenizer is None:
        raise ValueError(
            "use_uld_loss needs the teacher's tokenizer, and the teacher was given without one: set "
            "teacher_tokenizer_name_or_path"
        )
    for who, candidate in (("student", tokenizer), ("teacher", teacher_tokenizer)):
        if not getattr(candidate, "is_fast", False):
            raise ValueError(
                f"use_uld_loss aligns tokens by their offsets in the text, which only a fast (Rust) tokenizer gives; "
                f"the {who}'s tokenizer ({type(candidate).__name__}) is not one"
            )
    if spec.server_url is not None:  # it scores the teacher's token ids the translation sends it
        inner = connect_remote_teacher(spec, args, student, tokenizer, objective, own_tokenizer=teacher_tokenizer)
    else:
        returns = "logits"
        if spec.returns == "hidden":
            returns = head_view(model, spec.name, objective.chunk_size, objective.fused)
        inner = LocalTeacher(model, min(len(teacher_tokenizer), output_rows(model)), returns, spec.name)
    eos = getattr(getattr(student, "generation_config", None), "eos_token_id", None)
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    return ForeignTokenizerTeacher(
        inner,
        tokenizer,
        teacher_tokenizer,
        min(len(tokenizer), output_rows(student)),
        [*eos_ids, tokenizer.eos_token_id],
        extended=args.use_extended_uld,
        skip_eos=args.uld_skip_student_eos or args.uld_skip_teacher_eos,
        teacher_limit=inner.max_model_len or _max_positions(model),
        rule=args.uld_alignment_rule,
    )


class ForeignTokenizerTeacher:
    """A teacher (`inner`, run on its own tokens) behind the translation of each slice (see the module docstring)."""

    returns = "foreign"

    def __init__(
        self,
        inner: Teacher,
        student_tokenizer,
        teacher_tokenizer,
        student_width: int,
        eos_token_ids: list[int],
        extended: bool = True,
        skip_eos: bool = False,
        teacher_limit: int | None = None,
        rule: str = "gold",
    ):
        self.inner, self.name, self.max_model_len = inner, inner.name, inner.max_model_len
        self.student_tokenizer, self.prompt_tokenizer = student_tokenizer, teacher_tokenizer
        self.vocab_size, self.eos_token_ids = student_width, set(eos_token_ids)
        self.extended, self.skip_eos = extended, skip_eos
        self.teacher_limit, self._warned_cut = teacher_limit, False
        self.match = vocabulary_match(student_tokenizer, teacher_tokenizer, student_width, inner.vocab_size)
        if rule == "projection":  # each teacher token spelled in student tokens, once (projection_table)
            table = projection_table(student_tokenizer, teacher_tokenizer, student_width, inner.vocab_size, self.match)
            self.match = replace(self.match, projection=table)

    @property
    def model(self):
        return self.inner.model

    def place(self, placement: Placement) -> None:
        self.inner.place(placement)

    def close(self) -> None:
        self.inner.close()

    def prepare(self, batches: list[dict]) -> None:
        for batch in batches:
            batch["foreign"] = self.translate(batch)
        self.inner.prepare([batch["foreign"][0] for batch in batches])

    def __call__(self, batch: dict) -> TeacherForeign:
        if "foreign" not in batch:
            batch["foreign"] = self.translate(batch)
        teacher_batch, token_ids, teacher_groups, student_groups, num_groups = batch["foreign"]
        output = self.inner(teacher_batch)
        return TeacherForeign(output, token_ids, teacher_groups, student_groups, num_groups, self.match)

    def translate(self, batch: dict):
        """The teacher's batch for a slice, its completion ids, and both sides' groups (-1: in no group)."""
        width = int(batch["prompt_width"])
        labels, ids = batch["labels"][:, width:], batch["input_ids"][:, width:]
        student_groups = torch.full_like(labels, -1)
        completions, groups, offset = [], [], 0
        prompt_lengths = batch["teacher_prompt_mask"].sum(1).tolist()
        for row in range(labels.shape[0]):
            trained = labels[row].ne(IGNORE_INDEX).nonzero().squeeze(1)
            room = None if self.teacher_limit is None else self.teacher_limit - int(prompt_lengths[row])
            teacher_ids, row_groups, count, student_row = self._row(ids[row, trained].tolist(), room)
            student_groups[row, trained] = torch.where(student_row >= 0, student_row + offset, -1)
            groups.append([g + offset if g >= 0 else -1 for g in row_groups])
            completions.append(teacher_ids)
            offset += count
        device = labels.device
        width_t = max((len(c) for c in completions), default=0)
        completion = torch.zeros((len(completions), width_t), dtype=torch.long, device=device)
        completion_mask = torch.zeros_like(completion)
        teacher_groups = torch.full_like(completion, -1)
        for row, (tokens, row_groups) in enumerate(zip(completions, groups)):
            completion[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            completion_mask[row, : len(tokens)] = 1
            teacher_groups[row, : len(tokens)] = torch.tensor(row_groups, dtype=torch.long)
        prompts = batch["teacher_prompt_ids"], batch["teacher_prompt_mask"]
        teacher_batch = sequence_batch(*prompts, completion, completion_mask)
        return teacher_batch, completion, teacher_groups, student_groups, offset

    def _row(self, student_ids: list[int], room: int | None = None):
        """One completion: the teacher's ids (at most `room`), their groups, the number of groups, and the student
        tokens' groups."""
        ends_in_eos = bool(student_ids) and student_ids[-1] in self.eos_token_ids
        body = student_ids[:-1] if ends_in_eos else student_ids
        text, student_spans = completion_text(self.student_tokenizer, body)
        teacher_ids, teacher_spans = text_tokens(self.prompt_tokenizer, text)
        if self.extended:
            student_row, teacher_row, count = align_spans(student_spans, teacher_spans)
            student_row, teacher_row = torch.as_tensor(student_row), torch.as_tensor(teacher_row)
            student_row, teacher_row, count = _drop_one_sided(student_row, teacher_row, count)
        else:  # position by position, up to the shorter side
            count = min(len(body), len(teacher_ids))
            student_row = torch.tensor([i if i < count else -1 for i in range(len(body))], dtype=torch.long)
            teacher_row = torch.tensor([i if i < count else -1 for i in range(len(teacher_ids))], dtype=torch.long)
        teacher_ids = list(teacher_ids)
        if ends_in_eos:  # the two end-of-turn tokens: a group of their own
            eos_group = -1 if self.skip_eos else count
            count += 0 if self.skip_eos else 1
            student_row = torch.cat([student_row, torch.tensor([eos_group])])
            teacher_row = torch.cat([teacher_row, torch.tensor([eos_group])])
            teacher_ids.append(self.prompt_tokenizer.eos_token_id)
        if room is not None and len(teacher_ids) > room:  # past the teacher's positions: the cut groups leave the loss
            teacher_ids, teacher_row, student_row, count = _cut(teacher_ids, teacher_row, student_row, max(room, 0))
            if not self._warned_cut:
                self._warned_cut = True
                warnings.warn(
                    f"teacher {self.name!r}: a completion takes more of the teacher's tokens than its "
                    f"{self.teacher_limit} positions leave after the prompt; the text past them is left out of the "
                    "loss (set max_length or max_completion_length lower to avoid it)",
                    UserWarning,
                    stacklevel=2,
                )
        return teacher_ids, teacher_row.tolist(), count, student_row.to(torch.long)


def _cut(teacher_ids: list[int], teacher_row: torch.Tensor, student_row: torch.Tensor, room: int):
    """The teacher's tokens cut to `room`, and every group that lost a token left out on both sides."""
    cut = teacher_row[room:]
    lost = torch.unique(cut[cut >= 0])
    teacher_row, student_row = teacher_row[:room].clone(), student_row.clone()
    teacher_row[torch.isin(teacher_row, lost)] = -1
    student_row[torch.isin(student_row, lost)] = -1
    count = int(max(teacher_row.max().item(), student_row.max().item(), -1)) + 1 if len(teacher_row) else 0
    teacher_row, student_row = teacher_row.to(torch.long), student_row.to(torch.long)
    student_row, teacher_row, count = _drop_one_sided(student_row, teacher_row, count)
    return teacher_ids[:room], teacher_row, student_row, count


def _drop_one_sided(student_row: torch.Tensor, teacher_row: torch.Tensor, count: int):
    """Groups with tokens on one side only (text one side spells and the other cannot) are left out, the rest
    renumbered in order."""
    both = (torch.bincount(student_row[student_row >= 0], minlength=count) > 0) & (
        torch.bincount(teacher_row[teacher_row >= 0], minlength=count) > 0
    )
    new_index = torch.cumsum(both.long(), 0) - 1

    def renumber(row: torch.Tensor) -> torch.Tensor:
        keep = row >= 0
        out = torch.full_like(row, -1)
        out[keep] = torch.where(both[row[keep]], new_index[row[keep]], -1)
        return out

    return renumber(student_row), renumber(teacher_row), int(both.sum())
