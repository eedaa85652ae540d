"""The cross-tokenizer fields of `DistillationConfig`, with TRL GOLD's names and meanings (GOLDConfig), for a teacher
whose tokenizer is not the student's, and protege's own `uld_alignment_rule`. protege's defaults differ from GOLD's in
four places, on purpose (docs/differences-from-trl.md): the rule is the projection onto the student's next token (not
GOLD's group rule), `uld_use_hybrid_loss` is on (exact on shared tokens, so with one tokenizer the loss is
the ordinary one), and `uld_skip_student_eos` / `uld_skip_teacher_eos` are off (the two end-of-turn tokens are
compared with each other, so the student still learns when to stop)."""

from __future__ import annotations

from dataclasses import dataclass, field

ULD_ALIGNMENT_RULES = ("gold", "projection")  # DistillationConfig.uld_alignment_rule


@dataclass
class CrossTokenizerFields:
    teacher_tokenizer_name_or_path: dict[str, str] | str | None = field(
        default=None,
        metadata={
            "help": "The teacher's tokenizer (hub id or folder), when it is not the student's; by default the one "
            "published with the teacher. A tokenizer other than the student's (or one extending it) needs "
            "use_uld_loss=True. Several teachers: a mapping of teacher names to tokenizers (JSON text accepted)."
        },
    )
    use_uld_loss: bool = field(
        default=False,
        metadata={
            "help": "Cross-tokenizer distillation (Universal Logit Distillation): the student's completion is "
            "re-tokenized for the teacher, tokens are aligned by byte offsets into the same text, and each aligned "
            "group's distributions are compared (see uld_use_hybrid_loss)."
        },
    )
    use_extended_uld: bool = field(
        default=True,
        metadata={
            "help": "Align by byte offsets and merge the tokens of a group (GOLD's extended ULD); False compares "
            "positions one to one up to the shorter side, as the original ULD paper."
        },
    )
    uld_use_hybrid_loss: bool = field(
        default=True,
        metadata={
            "help": "Compare the tokens both vocabularies share (same text, space markers normalised) exactly, with "
            "the divergence beta selects, and the rest of the mass by ULD. False: ULD over everything. (GOLD's "
            "default is False.)"
        },
    )
    uld_hybrid_matched_weight: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the shared-token term of the hybrid loss; None: the share of the teacher's vocabulary "
            "that is shared. Set together with uld_hybrid_unmatched_weight."
        },
    )
    uld_hybrid_unmatched_weight: float | None = field(
        default=None,
        metadata={"help": "Weight of the ULD term of the hybrid loss; None: 1 - the shared share."},
    )
    uld_crossentropy_weight: float = field(
        default=0.0, metadata={"help": "Weight of the student's cross-entropy on the completion tokens."}
    )
    uld_distillation_weight: float = field(
        default=1.0, metadata={"help": "Weight of the cross-tokenizer distillation term."}
    )
    uld_student_temperature: float = field(
        default=1.0, metadata={"help": "Temperature of the student's distributions in the cross-tokenizer loss."}
    )
    uld_teacher_temperature: float = field(
        default=1.0, metadata={"help": "Temperature of the teacher's distributions in the cross-tokenizer loss."}
    )
    uld_skip_student_eos: bool = field(
        default=False,
        metadata={"help": "Leave the student's final EOS out of the cross-tokenizer loss (GOLD's default: True)."},
    )
    uld_skip_teacher_eos: bool = field(
        default=False,
        metadata={"help": "Leave the teacher's final EOS out of the cross-tokenizer loss (GOLD's default: True)."},
    )
    uld_alignment_rule: str = field(
        default="projection",
        metadata={
            "help": "How the two tokenizations are compared. 'projection' (protege's, the default): at every student "
            "position, the teacher's distribution over its tokens marginalised onto the student's next token (each "
            "teacher token's text spelled in student tokens), compared with the run's divergence (beta); exact for a "
            "teacher whose tokens are concatenations of the student's, an approximation otherwise; the "
            "uld_use_hybrid_loss and uld_hybrid_* settings do not apply. 'gold': GOLD's rule, each aligned group's "
            "distribution (first position times the later tokens' probabilities) against the teacher's, compared as "
            "uld_use_hybrid_loss says (on the walks benchmark it left the student worse than it started, "
            "docs/benchmarks.md)."
        },
    )
