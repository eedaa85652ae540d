"""Cross-tokenizer divergence: pure functions from two models' log-probabilities over their own vocabularies, aligned
in groups of tokens that cover the same text, to a loss per group.

A group is a run of student tokens and a run of teacher tokens covering the same bytes of the completion
(`alignment.align_spans`). Each side's group gets one distribution, GOLD's "observed" rule: the distribution at the
group's first position, times the probabilities of the actual tokens at its later positions (the chain rule's
conditionals of the rest of the group), so a one-token group is just that token's distribution. The two group
distributions are then compared:

* hybrid (`uld_use_hybrid_loss`, protege's default): exactly on the tokens both vocabularies share (`VocabularyMatch`:
  the same text, "▁"/"Ġ" space markers normalised), with the run's divergence (`beta`, as the ordinary loss); the
  mass on the remaining tokens by ULD (the L1 distance between the two sides' sorted probabilities), weighted as
  configured. With one tokenizer every group is one token and every token is shared, so the loss is the ordinary
  divergence, term for term: the property that anchors this path (tests/test_crosstok.py).
* ULD alone (`use_uld_loss` without hybrid): the sorted-probability L1 distance over the whole of both vocabularies.

This is GOLD's rule, `uld_alignment_rule="gold"`. protege's default, `"projection"` (`projection.py`), compares the
student's next token at every position instead: on the walks benchmark GOLD's rule left the student worse than it
started and the projection did not (docs/benchmarks.md).

Memory: a group's full rows are needed at its first position only; later positions contribute one log-probability
each. Rows come a chunk of groups at a time (`cross_tokenizer_loss_sum`), never (tokens x V_student x V_teacher).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .losses import divergence_elements


@dataclass(frozen=True)
class VocabularyMatch:
    """The token pairs two vocabularies share: `student_ids[i]` and `teacher_ids[i]` spell the same text."""

    student_ids: torch.Tensor  # (M,) long
    teacher_ids: torch.Tensor  # (M,) long
    student_vocab: int
    teacher_vocab: int
    projection: Any = None  # projection.TokenProjection, for uld_alignment_rule="projection"

    def unmatched(self, side: str, device: torch.device) -> torch.Tensor:
        """The ids of `side` ("student" or "teacher") that have no partner."""
        size, ids = (
            (self.student_vocab, self.student_ids) if side == "student" else (self.teacher_vocab, self.teacher_ids)
        )
        keep = torch.ones(size, dtype=torch.bool, device=device)
        keep[ids.to(device)] = False
        return keep.nonzero().squeeze(1)

    def adaptive_weights(self) -> tuple[float, float]:
        """GOLD's weights when none are set: the share of the teacher's vocabulary that is matched, and the rest."""
        matched = len(self.teacher_ids) / max(self.teacher_vocab, 1)
        return matched, 1.0 - matched

    @classmethod
    def identity(cls, vocab: int) -> VocabularyMatch:
        from .projection import TokenProjection

        ids = torch.arange(vocab)
        return cls(ids, ids, vocab, vocab, TokenProjection.identity(vocab))


@dataclass(frozen=True)
class CrossTokenizerLoss:
    """The settings of the cross-tokenizer loss (the `uld_*` fields of `DistillationConfig`)."""

    beta: float
    hybrid: bool = True
    matched_weight: float | None = None  # None: adaptive (VocabularyMatch.adaptive_weights)
    unmatched_weight: float | None = None
    distillation_weight: float = 1.0
    crossentropy_weight: float = 0.0
    student_temperature: float = 1.0
    teacher_temperature: float = 1.0
    rule: str = "gold"  # "gold" (the group rule here) or "projection"; DistillationConfig defaults to "projection"


def group_log_masses(
    log_probs: torch.Tensor, token_ids: torch.Tensor, groups: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's first position (G,) and the log-probability of its later tokens (G,): the group's distribution is
    log_probs[first] + later (GOLD's "observed" rule). `log_probs` (C, V) are one side's rows, `token_ids` (C,) its
    actual tokens, `groups` (C,) each position's group in [0, num_groups) (nondecreasing)."""
    positions = torch.arange(len(groups), device=groups.device)
    first = torch.full((num_groups,), len(groups), dtype=torch.long, device=groups.device)
    first = first.scatter_reduce(0, groups, positions, reduce="amin")
    actual = log_probs.gather(-1, token_ids[:, None]).squeeze(-1)
    is_later = positions != first[groups]
    later = torch.zeros(num_groups, dtype=log_probs.dtype, device=log_probs.device)
    later = later.index_add(0, groups[is_later], actual[is_later])
    return first, later


def uld_distance(student_masses: torch.Tensor, teacher_masses: torch.Tensor) -> torch.Tensor:
    """Per row, the L1 distance between the two sides' probabilities sorted in decreasing order, the shorter side
    padded with zeros (Universal Logit Distillation): (G, A) and (G, B) -> (G,)."""
    width = max(student_masses.shape[-1], teacher_masses.shape[-1])
    student_sorted = F.pad(student_masses.sort(dim=-1, descending=True).values, (0, width - student_masses.shape[-1]))
    teacher_sorted = F.pad(teacher_masses.sort(dim=-1, descending=True).values, (0, width - teacher_masses.shape[-1]))
    return (student_sorted - teacher_sorted).abs().sum(-1)


def group_divergence(
    student_log_masses: torch.Tensor,
    teacher_log_masses: torch.Tensor,
    match: VocabularyMatch,
    loss: CrossTokenizerLoss,
) -> torch.Tensor:
    """The loss of each aligned group (G,), from the two sides' group distributions (G, V_s) and (G, V_t) in log
    space (the teacher's without gradient)."""
    teacher_log_masses = teacher_log_masses.detach()
    if not loss.hybrid:
        return uld_distance(student_log_masses.exp(), teacher_log_masses.exp())
    device = student_log_masses.device
    matched = divergence_elements(
        student_log_masses[:, match.student_ids.to(device)],
        teacher_log_masses[:, match.teacher_ids.to(device)],
        loss.beta,
    ).sum(-1)
    student_rest = student_log_masses[:, match.unmatched("student", device)].exp()
    teacher_rest = teacher_log_masses[:, match.unmatched("teacher", device)].exp()
    if loss.matched_weight is None:
        matched_weight, unmatched_weight = match.adaptive_weights()
    else:
        matched_weight, unmatched_weight = loss.matched_weight, loss.unmatched_weight
    if student_rest.shape[-1] == 0 and teacher_rest.shape[-1] == 0:
        return matched_weight * matched
    return matched_weight * matched + unmatched_weight * uld_distance(student_rest, teacher_rest)


@dataclass
class AlignedSide:
    """One side of a slice's aligned completion tokens, flattened over its rows: the rows the head applies to
    (hidden states, or logits where `weight` is None), the LM head, the actual tokens and each token's group (numbered
    across the slice, nondecreasing)."""

    rows: torch.Tensor  # (N, H) or (N, V)
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    token_ids: torch.Tensor  # (N,)
    groups: torch.Tensor  # (N,)

    def log_probs(self, positions: slice, temperature: float) -> torch.Tensor:
        """Log-probabilities (n, V) at `positions`, at `temperature`, in float32 or wider."""
        rows = self.rows[positions]
        logits = rows if self.weight is None else F.linear(rows, self.weight, self.bias)
        return F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature, dim=-1)


def _chunk_bounds(groups: torch.Tensor, first_group: int, last_group: int) -> slice:
    """The positions of groups [first_group, last_group) in a nondecreasing group vector."""
    bounds = torch.searchsorted(groups, torch.tensor([first_group, last_group], device=groups.device))
    return slice(int(bounds[0]), int(bounds[1]))


def crossentropy_term(side: AlignedSide, loss: CrossTokenizerLoss) -> torch.Tensor | float:
    """The weighted log-likelihood of a chunk's own tokens at temperature 1 (the hybrid losses' cross-entropy part),
    or 0 where its weight is 0."""
    if not loss.crossentropy_weight:
        return 0.0
    plain = side.log_probs(slice(None), 1.0)
    return loss.crossentropy_weight * plain.gather(-1, side.token_ids[:, None]).sum()


def recomputed_in_backward(chunk_loss, rows: torch.Tensor) -> torch.Tensor:
    """`chunk_loss(rows)`, its (chunk x vocabulary) tensors recomputed in backward rather than kept, so a chunk's
    logits live only while it is computed; run plainly where no gradient is wanted."""
    if torch.is_grad_enabled() and rows.requires_grad:
        return torch.utils.checkpoint.checkpoint(chunk_loss, rows, use_reentrant=False)
    return chunk_loss(rows)


def cross_tokenizer_loss_sum(
    student: AlignedSide,
    teacher: AlignedSide,
    num_groups: int,
    match: VocabularyMatch,
    loss: CrossTokenizerLoss,
    chunk_groups: int = 256,
) -> torch.Tensor:
    """The loss summed over a slice's aligned groups (plus `crossentropy_weight` times the student's summed token
    cross-entropy), `chunk_groups` groups at a time. Each chunk is recomputed in the backward pass
    (`torch.utils.checkpoint`), so at most one chunk's (tokens x V) rows are held on either side. Under
    `rule="projection"`, `projection.projection_loss_sum` instead."""
    if loss.rule == "projection":
        from .projection import projection_loss_sum

        if match.projection is None:
            raise ValueError(
                "uld_alignment_rule='projection' needs the pair's TokenProjection (VocabularyMatch.projection)"
            )
        return projection_loss_sum(student, teacher, num_groups, match.projection, loss, chunk_groups)
    total = student.rows.new_zeros((), dtype=torch.promote_types(student.rows.dtype, torch.float32))
    for start in range(0, num_groups, chunk_groups):
        stop = min(start + chunk_groups, num_groups)
        s_part = _chunk_bounds(student.groups, start, stop)
        t_part = _chunk_bounds(teacher.groups, start, stop)
        with torch.no_grad():
            teacher_logp = teacher.log_probs(t_part, loss.teacher_temperature)
            t_first, t_later = group_log_masses(
                teacher_logp, teacher.token_ids[t_part], teacher.groups[t_part] - start, stop - start
            )
            teacher_masses = teacher_logp[t_first] + t_later[:, None]

        def chunk_loss(rows: torch.Tensor, s_part=s_part, start=start, stop=stop, teacher_masses=teacher_masses):
            side = AlignedSide(rows, student.weight, student.bias, student.token_ids[s_part], student.groups[s_part])
            student_logp = side.log_probs(slice(None), loss.student_temperature)
            first, later = group_log_masses(student_logp, side.token_ids, side.groups - start, stop - start)
            value = (
                loss.distillation_weight
                * group_divergence(student_logp[first] + later[:, None], teacher_masses, match, loss).sum()
            )
            return value - crossentropy_term(side, loss)

        total = total + recomputed_in_backward(chunk_loss, student.rows[s_part])
    return total


@torch.no_grad()
def token_logprob_sum(side: AlignedSide, temperature: float, chunk_tokens: int = 1024) -> float:
    """The sum of log p(actual token) over a side's grouped tokens: its log-probability of the whole aligned text, so
    the student's minus the teacher's is the sampled estimate of the reverse KL whatever the two tokenizations."""
    total = 0.0
    for start in range(0, len(side.token_ids), chunk_tokens):
        part = slice(start, start + chunk_tokens)
        logp = side.log_probs(part, temperature)
        total += logp.gather(-1, side.token_ids[part][:, None]).double().sum().item()
    return total
