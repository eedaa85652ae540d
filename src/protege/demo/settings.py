"""What shapes a demo run: the two models, their supervised training, the distillation, and the learning-rate schedules
those settings name. `results.json` records a run's `Settings`, and the cache keys on them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from .task import DIGITS


def lr_multiplier(schedule: str, step: int, total: int, warmup_steps: int = 0) -> float:
    """Learning-rate multiplier at `step` of `total`: a linear warm-up over `warmup_steps`, then "constant", or
    "cosine" / "linear" decay to zero. One definition, so the warm-up, the distillation and the benchmark's baselines
    follow the same schedule."""
    warm = min(1.0, (step + 1) / max(warmup_steps, 1))
    if schedule == "constant":
        return warm
    if schedule == "cosine":
        return warm * 0.5 * (1.0 + math.cos(math.pi * step / total))
    if schedule == "linear":
        return warm * (1.0 - step / total)
    raise ValueError(f"schedule={schedule!r} is not allowed: use 'constant', 'cosine' or 'linear'")


@dataclass(frozen=True)
class ModelSpec:
    """A GPT-2 shaped causal LM. GPT-2's learned absolute positions suit this fixed-layout task: a model with
    rotary positions (Qwen2, Llama) needs several times more steps to learn which column to read."""

    layers: int
    hidden: int
    heads: int = 4
    positions: int = 128

    def build(self, tokenizer, seed: int):
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=self.positions,
            n_embd=self.hidden,
            n_layer=self.layers,
            n_head=self.heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=None,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        return model


@dataclass(frozen=True)
class SFTSpec:
    """Supervised training on reference chains: AdamW, a linear warm-up, then `schedule` over `steps`.

    With `stop_at_accuracy`, the learning rate stays constant after the warm-up, and training stops as soon as
    greedy accuracy on `validation_problems` (drawn apart from the held-out ones) reaches it, checked every
    `check_every` steps; `steps` is then the most it may take. That is how the student gets its partial accuracy:
    when a small model "gets" the task varies a lot from seed to seed, so a fixed number of steps would leave one
    seed's student at 10% and another's at 80%.
    """

    steps: int
    batch_size: int
    learning_rate: float
    warmup_steps: int = 30
    adam_beta2: float = 0.999
    stop_at_accuracy: float | None = None
    check_every: int = 10
    validation_problems: int = 64
    schedule: str = "cosine"  # after the warm-up: "cosine" or "linear" decay to zero, or "constant"

    def lr_factor(self, step: int) -> float:
        schedule = "constant" if self.stop_at_accuracy is not None else self.schedule
        return lr_multiplier(schedule, step, self.steps, self.warmup_steps)


@dataclass(frozen=True)
class Settings:
    """Everything that shapes a run; `results.json` records it. The defaults are the addition task's; `for_run`
    gives each task's own."""

    task: str = "addition"  # one of tasks.TASK_NAMES
    digits: int = DIGITS  # the addition task's numbers (the other tasks ignore it)
    teacher: ModelSpec = ModelSpec(layers=1, hidden=128, heads=8)
    student: ModelSpec = ModelSpec(layers=1, hidden=64)
    teacher_sft: SFTSpec = SFTSpec(steps=700, batch_size=32, learning_rate=6e-3)
    student_sft: SFTSpec = SFTSpec(steps=600, batch_size=32, learning_rate=3e-3, stop_at_accuracy=0.3)
    distill_steps: int = 200  # at the student's warm-up learning rate, with its optimizer state
    distill_schedule: str = "constant"  # or "linear" / "cosine" decay to zero over distill_steps
    distill_warmup_steps: int = 0  # linear learning-rate warm-up (for a fresh optimizer)
    distill_batch_size: int = 64
    beta: float = 0.5  # generalized JSD between forward and reverse KL
    temperature: float = 1.0
    eval_every: int = 20
    eval_problems: int = 500
    kl_problems: int = 200
    threads: int = 1
    sample_eval: bool = False  # also score one sample per held-out problem at temperature 1, next to greedy
    distill_overrides: dict[str, Any] = field(default_factory=dict)  # more DistillationConfig fields

    @classmethod
    def for_run(cls, quick: bool, task: str = "addition") -> Settings:
        """The demo's settings for `task`, full or `quick`."""
        if task == "letters":
            return cls.letters(quick)
        if task == "walks":
            return cls.walks(quick)
        if task != "addition":
            raise ValueError(f"unknown demo task {task!r}")
        if not quick:
            return cls()
        return cls(
            teacher_sft=SFTSpec(steps=400, batch_size=32, learning_rate=6e-3),
            distill_steps=100,
            eval_every=10,
            eval_problems=200,
            kl_problems=96,
        )

    @classmethod
    def letters(cls, quick: bool = False) -> Settings:
        """The letters task (`letters.py`). The student is narrower than the alphabet (16 < 26)."""
        return cls._verifier_task(
            quick,
            quick_steps=(600, 300, 60),
            task="letters",
            teacher=ModelSpec(layers=2, hidden=128, heads=4),
            student=ModelSpec(layers=1, hidden=16, heads=2),
            # 4000: gate A's one allowed change (docs/benchmarks.md); at 2000 no teacher passed
            teacher_sft=SFTSpec(steps=4000, batch_size=32, learning_rate=3e-3),
            student_sft=SFTSpec(steps=2000, batch_size=32, learning_rate=3e-3),
        )

    @classmethod
    def walks(cls, quick: bool = False) -> Settings:
        """The walks task (`walks.py`). The teacher (1 layer, hidden 64) learns the graph's edges; 6000 steps make it
        sharp enough that a sampled 20-step walk is valid about 97% of the time. The student's hidden size (8) is far
        below the 36 nodes, so its next-node table is low-rank (docs/benchmarks.md, design 2, has the pilot that set
        the teacher's steps and the student's width).

        A quick run shortens the teacher's training alone (1500 steps: every greedy walk valid, about 89% of sampled
        ones). The student keeps its full warm-up and distillation, which cost seconds: cut to 300 and 60 steps, its
        sampled walks stayed 0% valid before and after, since a 20-step walk is valid only when nearly every step is."""
        return cls._verifier_task(
            quick,
            quick_steps=(1500, 1000, 200),
            task="walks",
            teacher=ModelSpec(layers=1, hidden=64, heads=4),
            student=ModelSpec(layers=1, hidden=8, heads=2),
            teacher_sft=SFTSpec(steps=6000, batch_size=32, learning_rate=3e-3),
            student_sft=SFTSpec(steps=1000, batch_size=32, learning_rate=3e-3),
        )

    @classmethod
    def _verifier_task(cls, quick: bool, quick_steps: tuple[int, int, int], **fields: Any) -> Settings:
        """What the tasks scored by a verifier share. The student is trained by SFT to the end of a cosine schedule,
        as the GKD paper starts from a fine-tuned student, so what distillation adds is measured against a student
        that SFT has taken about as far as it goes. Distillation then starts a fresh AdamW with 10 warm-up steps and
        a linear decay (benchmarks/gkd_table.py's optimisation). Validity is scored greedily and by sampling at
        temperature 1. `quick_steps`: a quick run's teacher SFT, student SFT and distillation steps."""
        teacher_steps, student_steps, distill_steps = quick_steps
        settings = cls(
            distill_steps=200, distill_schedule="linear", distill_warmup_steps=10, sample_eval=True, **fields
        )
        if not quick:
            return settings
        return replace(
            settings,
            teacher_sft=replace(settings.teacher_sft, steps=teacher_steps),
            student_sft=replace(settings.student_sft, steps=student_steps),
            distill_steps=distill_steps,
            eval_every=10,
            eval_problems=200,
            kl_problems=96,
        )


@dataclass(frozen=True)
class MixtureSettings:
    """`protege demo --task mixture`: one student distilled from two specialist teachers in one run, next to the same
    student distilled from each teacher alone at the same budget.

    `parts` are the tasks' own settings (`Settings.for_run`), which give each teacher, held-out set and score; their
    student and distillation fields are not used. `student` (task "mixture") gives the one student, its warm-up on
    both tasks' rows (`warmup_shares` of them from each) and the distillation the three runs share: the same steps,
    and batch sizes that make each run sample about the same number of completion tokens (`mixture_run.py`). Its
    teacher fields are not used."""

    parts: dict[str, Settings]
    student: Settings
    warmup_shares: dict[str, int]

    @classmethod
    def for_run(cls, quick: bool) -> MixtureSettings:
        """The mixture's settings, full or `quick`."""
        from .mixture import PARTS

        parts = {name: Settings.for_run(quick, name) for name in PARTS}
        student = Settings(
            task="mixture",
            student=ModelSpec(layers=1, hidden=64),
            student_sft=SFTSpec(steps=1200, batch_size=32, learning_rate=3e-3, stop_at_accuracy=0.3),
            distill_steps=80 if quick else 200,
            distill_batch_size=64,
            eval_every=40 if quick else 50,
        )
        return cls(parts=parts, student=student, warmup_shares={"addition": 3, "walks": 1})
