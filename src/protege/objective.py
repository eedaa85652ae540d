"""Which loss runs, decided in one place: an `Objective`, made once from the config.

The config's validation asks `Objective.from_config` whether a combination of settings is allowed, and the trainer
asks the same objective for the student's view and for the loss of each slice. Which divergence and support
(`beta`, `loss_top_k`, `reverse_kl_top_1_mode`) is decided here; which view a teacher gives is decided by
`teacher.spec`, and the loss follows from the type of what the teacher returns (`outputs`).

Families (what the divergence is computed over):

* "full": the whole vocabulary (`loss_top_k=0` or at least the vocabulary, or Liger's fused kernel);
* "top_k": a top-k support with a tail bucket or renormalised (`loss_top_k=k`; with a teacher server and beta 0, the
  teacher's top-k as the server sends it);
* "sparse_top1": beta > 0 and `loss_top_k=1`: the teacher's top-1 token and the reverse token (sampled or argmax).

Views: the student gives logits (dense) or its last hidden state and LM head (chunked, `loss_chunk_size`); the teacher
gives logits, its last hidden state and LM head, or server scores. Every combination reduces to one row function
`elements(student_logits, *teacher_rows)` over the completion tokens, run at once or chunk by chunk (`chunked`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from . import models
from .choices import setting_error
from .chunked import auto_chunk_size, chunked_rows_sum, through_teacher_head
from .crosstok import CrossTokenizerLoss, cross_tokenizer_loss_sum, token_logprob_sum
from .losses import (
    IGNORE_INDEX,
    covers_vocabulary,
    divergence_rows,
    divergence_rows_value_and_grad,
    sparse_top1_rows,
    sparse_top1_support,
    support_rows,
)
from .outputs import (
    StudentHidden,
    StudentLogits,
    StudentOutput,
    TeacherForeign,
    TeacherHidden,
    TeacherLogits,
    TeacherOutput,
    TeacherScores,
)
from .policy_gradient import sampled_logprobs, vocab_width
from .teacher.spec import scores_teachers, server_urls

__all__ = [
    "Objective",
    "StudentHidden",
    "StudentLogits",
    "TeacherHidden",
    "TeacherLogits",
    "TeacherScores",
    "sampled_log_ratio_sum",
    "student_output",
]


def student_output(model, batch: dict[str, torch.Tensor], view: str, vocab_size: int) -> StudentOutput:
    """What the student hands to the loss: its last hidden state and LM head ("hidden"), or completion logits."""
    if view == "hidden":
        return StudentHidden(models.completion_hidden(model, batch), *models.lm_head(model, vocab_size))
    return StudentLogits(models.completion_logits(model, batch, vocab_size))


@functools.lru_cache(maxsize=4)
def _liger_jsd(beta: float, temperature: float):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    return LigerFusedLinearJSDLoss(
        beta=beta, ignore_index=IGNORE_INDEX, temperature=temperature, weight_hard_loss=0.0, weight_soft_loss=1.0
    )


@dataclass(frozen=True)
class Objective:
    """The divergence and its support, and the student's path: dense logits, chunked, or Liger's fused kernel."""

    beta: float
    temperature: float = 1.0
    top_k: int = 0  # 0 = full vocabulary
    add_tail: bool = True
    top1_mode: str = "sampled"
    chunk_size: int | str | None = None  # tokens per chunk of the memory-bounded path, or "auto"; None = dense
    fused: bool = False  # Liger's fused linear JSD (full vocabulary, hidden states)
    cross: CrossTokenizerLoss | None = None  # a teacher of another tokenizer (use_uld_loss): the uld_* settings
    sampled_only: bool = False  # every slice trains by policy gradient: a teacher sends only sampled tokens' log-probs

    @classmethod
    def from_config(cls, args) -> Objective:
        """The objective of a `DistillationConfig`, or a ValueError naming the field whose value is not allowed."""
        server = bool(server_urls(args))
        log_probs_only = scores_teachers(args)  # the teacher servers sending log-probs only
        sampled_only = getattr(args, "on_policy_objective", "divergence") == "policy_gradient" and args.lmbda == 1
        if sampled_only:
            log_probs_only = []  # every slice is on-policy: the sampled token's log-prob is all a teacher sends
        exact = "; teacher_server_response_format='hidden' gives the exact loss for any setting"
        with_server = "with use_teacher_server"
        if isinstance(args.teacher_model_server_url, dict):  # several teachers: name the ones the rule is about
            with_server = f"with the log-prob teacher servers {log_probs_only}"
        if args.use_liger_kernel and server:
            raise setting_error(
                "use_liger_kernel", True, "the Liger fused loss needs a local teacher, not use_teacher_server"
            )
        if log_probs_only:
            if args.reverse_kl_top_1_mode == "argmax":
                raise setting_error(
                    "reverse_kl_top_1_mode",
                    "argmax",
                    f"a teacher server's log-probs cover only the sampled tokens, so {with_server} it must be "
                    f"'sampled'{exact}",
                )
            if args.beta == 0 and args.loss_top_k < 1:
                raise setting_error(
                    "loss_top_k",
                    args.loss_top_k,
                    f"{with_server} and beta=0 the loss uses the teacher's top-k log-probs, so loss_top_k "
                    f"must be >= 1{exact}",
                )
            if args.beta > 0 and args.loss_top_k != 1:
                raise setting_error(
                    "loss_top_k",
                    args.loss_top_k,
                    f"{with_server} and beta={args.beta} only the sparse top-1 loss exists on log-probs, "
                    f"so loss_top_k must be 1{exact}",
                )
        fused = bool(args.use_liger_kernel)
        cross = None
        if args.use_uld_loss:
            cross = CrossTokenizerLoss(
                beta=args.beta,
                hybrid=args.uld_use_hybrid_loss,
                matched_weight=args.uld_hybrid_matched_weight,
                unmatched_weight=args.uld_hybrid_unmatched_weight,
                distillation_weight=args.uld_distillation_weight,
                crossentropy_weight=args.uld_crossentropy_weight,
                student_temperature=args.uld_student_temperature,
                teacher_temperature=args.uld_teacher_temperature,
                rule=args.uld_alignment_rule,
            )
        return cls(
            beta=args.beta,
            temperature=args.temperature,
            top_k=0 if fused else args.loss_top_k,
            add_tail=args.loss_add_tail,
            top1_mode=args.reverse_kl_top_1_mode,
            chunk_size=None if fused else args.loss_chunk_size,
            fused=fused,
            cross=cross,
            sampled_only=sampled_only,
        )

    @staticmethod
    def ineffective_settings(args) -> list[str]:
        """Settings that are allowed but change nothing under this config, as warning messages."""
        notes = []
        sparse_top1 = args.beta > 0 and args.loss_top_k == 1
        if args.reverse_kl_top_1_mode != "sampled" and not sparse_top1:
            notes.append(
                f"reverse_kl_top_1_mode={args.reverse_kl_top_1_mode!r} has no effect unless beta > 0 and "
                "loss_top_k == 1."
            )
        if args.loss_top_k == 0 and not args.loss_add_tail:
            notes.append("loss_add_tail=False has no effect when loss_top_k=0 (full vocabulary).")
        if args.use_liger_kernel and (args.loss_top_k != 0 or args.reverse_kl_top_1_mode != "sampled"):
            notes.append(
                "use_liger_kernel computes the full-vocabulary JSD: loss_top_k, loss_add_tail and "
                "reverse_kl_top_1_mode are ignored."
            )
        if args.loss_chunk_size is not None and args.use_liger_kernel:
            notes.append("loss_chunk_size has no effect with use_liger_kernel (Liger chunks the loss itself).")
        if args.use_uld_loss and args.uld_alignment_rule == "projection" and args.uld_hybrid_matched_weight is not None:
            notes.append(
                "uld_hybrid_matched_weight and uld_hybrid_unmatched_weight apply to uld_alignment_rule='gold' only; "
                "the projection rule compares the whole next-token distribution with the divergence beta selects."
            )
        if args.beta == 1 and sparse_top1 and not args.loss_add_tail:
            notes.append(
                "beta=1, loss_top_k=1 and loss_add_tail=False give a loss that is always zero (one-token support "
                "renormalised to probability 1)."
            )
        return notes

    def dense(self) -> Objective:
        """The same objective on full logits (for models whose logits are transformed after the LM head)."""
        return self if self.fused or self.chunk_size is None else dataclasses.replace(self, chunk_size=None)

    def for_student(self, student) -> Objective:
        """This objective as `student` can run it: dense where its logits are transformed after its LM head and the
        chunk size is "auto" (see `models.head_view`)."""
        view = models.head_view(student, "student", self.chunk_size, self.fused)
        return self if view == self.student_view else self.dense()

    def describe(self, on_policy: bool = True) -> str:
        """What the logged `loss` is, in words: a sparse or top-k loss is not the KL that `protege eval` reports; and,
        where there are on-policy slices (`on_policy`), what the reverse-KL estimate logged beside it is."""
        divergence = {0.0: "forward KL(teacher || student)", 1.0: "reverse KL(student || teacher)"}.get(
            float(self.beta), f"generalized JSD (beta={self.beta:g})"
        )
        if self.family == "full":
            support = "over the full vocabulary"
        elif self.family == "sparse_top1":
            support = (
                "on a sparse support: the teacher's top-1 token and the sampled token only (loss_top_k=1), so it is "
                "far smaller than the full divergence"
            )
        else:
            whose = {0.0: "the teacher's", 1.0: "the student's"}.get(
                float(self.beta), "the teacher's and the student's"
            )
            support = f"over {whose} top-{self.top_k} tokens" + (" plus the tail's mass" if self.add_tail else "")
        text = f"'loss' is the {divergence} {support}, at temperature {self.temperature:g}, per completion token"
        if self.cross is not None:
            compared = (
                f"the {divergence} on the tokens both vocabularies share and ULD (sorted-probability L1) on the rest"
                if self.cross.hybrid
                else "ULD (the L1 distance of sorted probabilities)"
            )
            text = (
                "'loss' is the cross-tokenizer loss: over groups of student and teacher tokens that cover the same "
                f"text, {compared}, summed over groups and divided by the student's completion tokens"
            )
            if self.cross.rule == "projection":
                text = (
                    f"'loss' is the cross-tokenizer loss: the {divergence} between the student's next-token "
                    "distribution and the teacher's projected onto the student's tokens, per completion token"
                )
        if not on_policy:
            return text
        return (
            f"{text}; 'on_policy_reverse_kl_estimate', logged for steps with on-policy slices, is the mean of "
            "log p_student - log p_teacher over the student's sampled tokens: the same quantity whatever the loss"
        )

    @property
    def family(self) -> str:
        return self.family_for()

    def family_for(self, vocab_size: int | None = None) -> str:
        """ "full", "sparse_top1" or "top_k" (see the module docstring); a top-k of at least `vocab_size` is "full"."""
        if self.fused or covers_vocabulary(self.top_k, vocab_size):
            return "full"
        if self.beta > 0 and self.top_k == 1:
            return "sparse_top1"
        return "top_k"

    @property
    def student_view(self) -> str:
        """ "hidden" (last hidden state and LM head) for the chunked and fused paths, else "logits"."""
        return "hidden" if self.chunk_size is not None or self.fused else "logits"

    @property
    def server_top_k(self) -> int:
        """How many log-probs per position to ask of a teacher server that returns scores: one (the smallest request
        a server answers) where only the sampled tokens' are read."""
        return 1 if self.sampled_only else max(self.top_k, 1)

    # ----- The loss -----

    def loss_sum(self, student: StudentOutput, teacher: TeacherOutput, labels: torch.Tensor) -> torch.Tensor:
        """The divergence summed over the completion tokens of a slice (labels (B, C), -100 where not trained)."""
        mask = labels != IGNORE_INDEX
        if isinstance(teacher, TeacherForeign):
            return self._cross_sum(student, teacher, labels)
        if self.fused:
            return self._fused_sum(student, teacher, labels, mask)
        family = self.family_for(vocab_width(student))
        elements, value_and_grad, teacher_rows = self._row_function(family, teacher, mask, labels[mask])
        teacher_head = (teacher.weight, teacher.bias) if isinstance(teacher, TeacherHidden) else None
        if isinstance(student, StudentHidden):
            total, _ = chunked_rows_sum(
                student.hidden[mask],
                student.weight,
                student.bias,
                elements,
                *teacher_rows,
                chunk_size=self.chunk_size,
                value_and_grad_fn=value_and_grad,
                teacher_head=teacher_head,
            )
            return total
        if teacher_head is not None:
            elements = through_teacher_head(elements, *teacher_head)
        return elements(student.logits[mask], *teacher_rows).sum()

    def _row_function(self, family: str, teacher: TeacherOutput, mask: torch.Tensor, targets: torch.Tensor):
        """This objective's row function `elements(student_logits, *rows)`, its closed-form value and gradient where
        there is one (the full-vocabulary divergence), and the teacher's rows for them: its logits, scores, or hidden
        states, which `loss_sum` puts through the teacher's head."""
        options = {"beta": self.beta, "temperature": self.temperature, "add_tail": self.add_tail}
        if isinstance(teacher, TeacherScores):
            if family == "sparse_top1":
                ids, logprobs, valid = sparse_top1_support(
                    targets,
                    teacher.token_logprobs[mask].float(),
                    teacher.topk_ids[..., 0][mask],
                    teacher.topk_logprobs[..., 0][mask].float(),
                    beta=self.beta,
                )
            else:  # the teacher's top-k as sent, forward KL
                ids, logprobs = teacher.topk_ids[mask], teacher.topk_logprobs[mask].float()
                valid = logprobs > -math.inf
            return functools.partial(support_rows, **options), None, (ids, logprobs, valid)

        value_and_grad = None
        if family == "sparse_top1":

            def on_logits(student_logits, teacher_logits, rows_targets):
                return sparse_top1_rows(
                    student_logits, teacher_logits, rows_targets, reverse_kl_top_1_mode=self.top1_mode, **options
                )
        else:

            def on_logits(student_logits, teacher_logits, _rows_targets):
                return divergence_rows(student_logits, teacher_logits, top_k=self.top_k, **options)

            if family == "full":

                def value_and_grad(student_logits, teacher_logits, _rows_targets):
                    return divergence_rows_value_and_grad(
                        student_logits, teacher_logits, beta=self.beta, temperature=self.temperature
                    )

        return on_logits, value_and_grad, (teacher.rows[mask], targets)  # hidden states: through the head in `loss_sum`

    def _cross_sum(self, student: StudentOutput, teacher: TeacherForeign, labels: torch.Tensor) -> torch.Tensor:
        """The cross-tokenizer loss (`crosstok`), a chunk of aligned groups at a time ("auto": sized to the student's
        vocabulary)."""
        chunk = self.chunk_size if isinstance(self.chunk_size, int) else auto_chunk_size(vocab_width(student))
        sides = teacher.student_side(student, labels), teacher.teacher_side
        return cross_tokenizer_loss_sum(*sides, teacher.num_groups, teacher.match, self.cross, chunk)

    def _fused_sum(self, student: StudentHidden, teacher: TeacherHidden, labels, mask) -> torch.Tensor:
        """Liger's fused linear JSD (a mean over tokens), turned back into a sum."""
        mean = _liger_jsd(self.beta, self.temperature)(
            student.hidden.reshape(-1, student.hidden.shape[-1]),
            student.weight,
            teacher.hidden.reshape(-1, teacher.hidden.shape[-1]),
            teacher.weight,
            labels.reshape(-1),
        )
        return mean * mask.sum().clamp(min=1)


# ----- A divergence every mode can log the same way -----


@torch.no_grad()
def sampled_log_ratio_sum(
    student: StudentOutput,
    teacher: TeacherOutput,
    labels: torch.Tensor,
    temperature: float,
    chunk_tokens: int | None = None,
) -> float:
    """The sum over trained tokens x of log p_student(x) - log p_teacher(x), both at `temperature`.

    On the student's own samples its mean is an unbiased estimate of the reverse KL(student || teacher) per token,
    and needs only the two log-probs of the sampled token, which every teacher view has (a server's log-prob formats
    send the actual token's), so runs with different objectives, local or remote, log the same quantity. Computed a
    chunk of tokens at a time, without gradients, so it never holds (tokens x vocabulary) logits.
    """
    chunk_tokens = chunk_tokens or auto_chunk_size(vocab_width(student))
    if isinstance(teacher, TeacherForeign):  # log p_student(text) - log p_teacher(text), each on its own tokens
        student_sum = token_logprob_sum(teacher.student_side(student, labels), temperature, chunk_tokens)
        return student_sum - token_logprob_sum(teacher.teacher_side, temperature, chunk_tokens)
    student_logprobs, teacher_logprobs = sampled_logprobs(student, teacher, labels, temperature, chunk_tokens)
    return (student_logprobs - teacher_logprobs).sum().item()
