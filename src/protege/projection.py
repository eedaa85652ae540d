"""Cross-tokenizer distillation by projection (`uld_alignment_rule="projection"`): the teacher's distribution over
its own tokens, marginalised onto the distribution of the student's NEXT TOKEN, so that the student is compared with
the teacher on the same event at every one of its positions.

Why: GOLD's "observed" rule (`crosstok`) gives a group of student tokens "A B C" one distribution whose entry "A" is
the student's probability of the whole text "A B C", and compares it with the teacher's token "A", which means "A,
then a teacher-token boundary". When the two tokenizations split differently these are different events, and on the
walks benchmark the student collapsed (docs/benchmarks.md, cross-tokenizer distillation).

The rule. Each teacher token t has seq(t) = (s_1..s_m), its text tokenized by the student (`TokenProjection`, built
once per tokenizer pair by `teacher.projection_table`). At a student position at depth d of an aligned group (the
group's student tokens a_1..a_d already written; d = 0 where a teacher token starts), with p_T the teacher's row at
the group's first teacher position:

    q(s) ∝ sum of p_T(t) over the t whose seq starts with a_1..a_d and has seq(t)[d] = s

renormalised over those t; a position where no t remains gets no loss. The loss at the position is the run's
divergence (`beta`, as the ordinary loss: `losses.divergence_elements`) between the student's full next-token
distribution and q. With one tokenizer seq(t) = (t), every group is one token, q = p_T and the loss is the ordinary one,
value and gradient (tests/test_projection.py).

Exactness. At a group's first position q is the teacher's exact marginal of the student's next token when every
teacher token's text is a concatenation of student tokens, tokenized alone as in context (a coarser or equal teacher).
Inside a group it is the teacher's distribution conditioned on its current token going on past the written prefix:
the teacher tokens that end exactly at depth d are left out, since what follows them would need the teacher's row for
a context that was never computed; exact when the teacher gives them no mass. Where the teacher is finer (a student
token spans several teacher tokens), q is an approximation: at the group's first position the teacher's next token
is mapped to the student's spelling of ITS text alone, so the student's longer token ("assistant" against the
teacher's "a") gets nothing there and the teacher's mass goes to the student's shorter token ("a"); later student
positions of such a group still use the first teacher row only.

Zeros. q is exactly 0 on the student tokens that start no teacher token's text. Forward KL and the JSD take them as
the ordinary loss takes a teacher's zeros (0 log 0 = 0; the mixture keeps the JSD finite). Under reverse KL the
ordinary loss would be +inf wherever the student puts mass on a teacher zero (losses._kl_elements); it never meets one
there, since a teacher's softmax of finite logits has none. Here they are the rule, not an accident, so under reverse
KL each zero of q is read as `losses.MIN_TAIL_PROB` (the floor the sparse losses' tail bucket uses) before
renormalising: the student is pushed off those tokens with a finite gradient.

Memory: a chunk of student positions at a time, recomputed in the backward pass; at most (chunk x V_teacher) and
(chunk x V_student) tensors, never (tokens x V_student x V_teacher).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .crosstok import AlignedSide, CrossTokenizerLoss, crossentropy_term, recomputed_in_backward
from .losses import MIN_TAIL_PROB, divergence_elements


@dataclass(frozen=True)
class TokenProjection:
    """Each teacher token's text as student tokens: `sequences` (V_t, D) long padded with -1, `lengths` (V_t,);
    a length of 0 (a special token without a partner, text the student cannot spell) leaves the token out of q."""

    sequences: torch.Tensor
    lengths: torch.Tensor
    student_vocab: int

    @classmethod
    def identity(cls, vocab: int) -> TokenProjection:
        """One tokenizer: every token is itself."""
        return cls(torch.arange(vocab)[:, None], torch.ones(vocab, dtype=torch.long), vocab)

    def fitted(self, teacher_width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The table for teacher rows of `teacher_width` (extra rows, an LM head's padding, are empty), on `device`."""
        sequences, lengths = self.sequences, self.lengths
        extra = teacher_width - len(lengths)
        if extra > 0:
            sequences = torch.cat([sequences, sequences.new_full((extra, sequences.shape[1]), -1)])
            lengths = torch.cat([lengths, lengths.new_zeros(extra)])
        return sequences[:teacher_width].to(device), lengths[:teacher_width].to(device)


def projected_log_probs(
    teacher_log_probs: torch.Tensor,
    depth: torch.Tensor,
    prefix: torch.Tensor,
    projection: TokenProjection,
    student_width: int,
    floor_zeros: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q in log space (n, student_width) for n positions, and which positions have any (n,) bool.

    `teacher_log_probs` (n, V_t) is the teacher's row for each position's group, `depth` (n,) the position's depth in
    its group, `prefix` (n, max depth) the group's student tokens already written (columns past a row's depth are
    ignored). `floor_zeros`: read zeros of q as MIN_TAIL_PROB (reverse KL, see the module docstring)."""
    sequences, lengths = projection.fitted(teacher_log_probs.shape[-1], teacher_log_probs.device)
    keep = lengths[None, :] > depth[:, None]  # (n, V_t): the tokens that go on past the written prefix
    for k in range(min(prefix.shape[1], sequences.shape[1])):  # deeper: no token is that long, keep is False
        keep &= (depth[:, None] <= k) | (sequences[None, :, k] == prefix[:, k, None])
    mass = torch.where(keep, teacher_log_probs.exp(), 0.0)
    del keep
    q = mass.new_zeros(len(depth), student_width)
    for d in depth.clamp(max=sequences.shape[1] - 1).unique().tolist():  # one (V_t,) column of seq(t)[d] per depth
        rows = (depth.clamp(max=sequences.shape[1] - 1) == d).nonzero().squeeze(1)
        next_token = sequences[:, d].clamp(min=0).expand(len(rows), -1)  # a view: no (n, V_t) index is held
        q[rows] = q[rows].scatter_add_(1, next_token, mass[rows])
    del mass
    total = q.sum(-1, keepdim=True)
    present = total.squeeze(-1) > 0
    if floor_zeros:
        q = torch.where(q > 0, q, MIN_TAIL_PROB * total)  # relative to the row's mass, before renormalising
        total = q.sum(-1, keepdim=True)
    log_q = q.log() - total.clamp(min=torch.finfo(q.dtype).tiny).log()
    return log_q.masked_fill(~present[:, None], 0.0), present


def group_positions(groups: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For a side's nondecreasing `groups` (N,): each group's first position (num_groups,; N where it has none) and
    each position's depth in its group (N,)."""
    positions = torch.arange(len(groups), device=groups.device)
    first = torch.full((num_groups,), len(groups), dtype=torch.long, device=groups.device)
    first = first.scatter_reduce(0, groups, positions, reduce="amin")
    return first, positions - first[groups]


def written_prefix(token_ids: torch.Tensor, positions: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """(n, max depth): for each of `positions`, the `depth` tokens of its group written before it (-1 past them)."""
    width = int(depth.max()) if len(depth) else 0
    offsets = torch.arange(width, device=depth.device)
    index = positions[:, None] - depth[:, None] + offsets[None, :]
    inside = offsets[None, :] < depth[:, None]
    return torch.where(inside, token_ids[index.clamp(0, max(len(token_ids) - 1, 0))], -1)


def projection_loss_sum(
    student: AlignedSide,
    teacher: AlignedSide,
    num_groups: int,
    projection: TokenProjection,
    loss: CrossTokenizerLoss,
    chunk_tokens: int = 256,
) -> torch.Tensor:
    """The projection loss summed over a slice's grouped student positions (plus `crossentropy_weight` times the
    student's summed token cross-entropy), `chunk_tokens` positions at a time, each chunk recomputed in the backward
    pass (`torch.utils.checkpoint`)."""
    total = student.rows.new_zeros((), dtype=torch.promote_types(student.rows.dtype, torch.float32))
    teacher_first, _ = group_positions(teacher.groups, num_groups)
    _, depth = group_positions(student.groups, num_groups)
    for start in range(0, len(student.groups), chunk_tokens):
        part = slice(start, min(start + chunk_tokens, len(student.groups)))
        positions = torch.arange(part.start, part.stop, device=student.groups.device)
        rows_t = teacher_first[student.groups[part]]
        has_teacher = rows_t < len(teacher.groups)
        needed, inverse = torch.unique(rows_t[has_teacher], return_inverse=True)
        part_depth = depth[part][has_teacher]
        prefix = written_prefix(student.token_ids, positions[has_teacher], part_depth)

        def chunk_loss(rows: torch.Tensor, part=part, has_teacher=has_teacher, needed=needed, inverse=inverse,
                       part_depth=part_depth, prefix=prefix) -> torch.Tensor:  # fmt: skip
            side = AlignedSide(rows, student.weight, student.bias, student.token_ids[part], student.groups[part])
            student_logp = side.log_probs(slice(None), loss.student_temperature)
            with torch.no_grad():  # the teacher's rows too are recomputed in the backward pass, never all held
                teacher_logp = teacher.log_probs(needed, loss.teacher_temperature)[inverse]
                log_q, present = projected_log_probs(
                    teacher_logp, part_depth, prefix, projection, student_logp.shape[-1], loss.beta == 1
                )
                del teacher_logp
            values = divergence_elements(student_logp[has_teacher], log_q.to(student_logp.dtype), loss.beta)
            value = loss.distillation_weight * torch.where(present, values.sum(-1), 0.0).sum()
            return value - crossentropy_term(side, loss)

        total = total + recomputed_in_backward(chunk_loss, student.rows[part])
    return total
