"""What the trainer logs, accumulated over one logging window in named fields."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

_TEACHER_FIGURES = ("loss_sum", "tokens", "ratio_sum", "sampled_tokens", "seconds")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass
class TrainingWindow:
    """Counters since the last log. Per-step values are lists averaged at log time; loss sums are per kind of slice."""

    started: float | None = None
    completion_tokens: int = 0  # trained on, all ranks
    teacher_seconds: float = 0.0
    student_seconds: float = 0.0  # forward and backward of every slice, the teacher's time taken out
    on_policy_loss_sum: float = 0.0
    on_policy_tokens: float = 0.0
    off_policy_loss_sum: float = 0.0
    off_policy_tokens: float = 0.0
    sampled_log_ratio_sum: float = 0.0  # on-policy slices of logged steps: sum of log p_student - log p_teacher
    sampled_tokens: float = 0.0
    on_policy_fraction: list[float] = field(default_factory=list)
    generation_seconds: list[float] = field(default_factory=list)
    mean_length: list[float] = field(default_factory=list)
    min_length: list[float] = field(default_factory=list)
    max_length: list[float] = field(default_factory=list)
    truncated_fraction: list[float] = field(default_factory=list)
    samples: list[tuple[str, str]] = field(default_factory=list)  # the last step's (prompt, completion) texts
    # Several teachers: each one's loss sum, tokens, sampled log-ratio sum, sampled tokens and seconds, by position.
    teacher_names: list[str] = field(default_factory=list)
    per_teacher: list[list[float]] = field(default_factory=list)
    # The policy-gradient objective: sums over its tokens on this rank (tokens, teacher advantage, rho, rho > cap),
    # the largest rho, and each reward function's rewards of every rank's completions (gathered when scored).
    policy_gradient: list[float] = field(default_factory=lambda: [0.0] * 4)
    rho_max: float = 0.0
    rewards: dict[str | None, list[float]] = field(default_factory=dict)  # None: the weighted total

    def __post_init__(self) -> None:
        self.per_teacher = [[0.0] * len(_TEACHER_FIGURES) for _ in self.teacher_names]

    def _tally(self, teacher: int, figure: str, value: float) -> None:
        if self.per_teacher:
            self.per_teacher[teacher][_TEACHER_FIGURES.index(figure)] += value

    def start(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def add_loss(self, on_policy: bool, loss_sum: float, tokens: float, teacher: int = 0) -> None:
        self._tally(teacher, "loss_sum", loss_sum)
        self._tally(teacher, "tokens", tokens)
        if on_policy:
            self.on_policy_loss_sum += loss_sum
            self.on_policy_tokens += tokens
        else:
            self.off_policy_loss_sum += loss_sum
            self.off_policy_tokens += tokens

    def add_sampled_log_ratio(self, ratio_sum: float, tokens: float, teacher: int = 0) -> None:
        self.sampled_log_ratio_sum += ratio_sum
        self.sampled_tokens += tokens
        self._tally(teacher, "ratio_sum", ratio_sum)
        self._tally(teacher, "sampled_tokens", tokens)

    def add_teacher_seconds(self, teacher: int, seconds: float) -> None:
        self.teacher_seconds += seconds
        self._tally(teacher, "seconds", seconds)

    def add_policy_gradient(self, figures) -> None:
        """A route's `policy_gradient.PolicyGradientFigures`."""
        sums = (figures.tokens, figures.teacher_advantage_sum, figures.rho_sum, figures.truncated)
        self.policy_gradient = [a + b for a, b in zip(self.policy_gradient, sums)]
        self.rho_max = max(self.rho_max, figures.rho_max)

    def add_rewards(self, name: str | None, values: list[float]) -> None:
        """One reward function's rewards (`name` None: the weighted total) for a step's completions of every rank
        (NaN where it returned None)."""
        self.rewards.setdefault(name, []).extend(values)

    def add_completions(self, lengths: torch.Tensor, truncated: torch.Tensor) -> None:
        """Length statistics of one step's on-policy completions (already gathered from every rank)."""
        self.mean_length.append(lengths.mean().item())
        self.min_length.append(lengths.min().item())
        self.max_length.append(lengths.max().item())
        self.truncated_fraction.append(truncated.mean().item())

    def logs(self, sum_over_ranks, max_over_ranks=None) -> dict[str, float]:
        """The window's log entries; `sum_over_ranks` adds a float tensor across processes, `max_over_ranks` takes
        the largest (the identity if not given)."""
        logs = {
            "on_policy_fraction": _mean(self.on_policy_fraction),
            "time/generation_s": _mean(self.generation_seconds),
            "completions/mean_length": _mean(self.mean_length),
            "completions/min_length": _mean(self.min_length),
            "completions/max_length": _mean(self.max_length),
            "completions/truncated_fraction": _mean(self.truncated_fraction),
        }
        if self.on_policy_fraction and not any(self.on_policy_fraction):
            del logs["time/generation_s"]  # no step of the window generated: nothing to time
        logs = {key: value for key, value in logs.items() if value is not None}
        sums = sum_over_ranks(
            torch.tensor(
                [
                    self.on_policy_loss_sum,
                    self.on_policy_tokens,
                    self.off_policy_loss_sum,
                    self.off_policy_tokens,
                    self.sampled_log_ratio_sum,
                    self.sampled_tokens,
                ],
                dtype=torch.float64,
            )
        ).tolist()
        on_sum, on_tokens, off_sum, off_tokens, ratio_sum, sampled_tokens = sums
        if sampled_tokens > 0:
            logs["on_policy_reverse_kl_estimate"] = round(ratio_sum / sampled_tokens, 6)
        if on_tokens > 0:
            logs["on_policy_loss"] = round(on_sum / on_tokens, 6)
        if off_tokens > 0:
            logs["off_policy_loss"] = round(off_sum / off_tokens, 6)
        steps = max(len(self.generation_seconds), 1)
        logs["time/teacher_s"] = self.teacher_seconds / steps  # per step, as generation's
        logs["time/student_s"] = self.student_seconds / steps
        logs["completion_tokens"] = self.completion_tokens
        if self.started is not None:
            elapsed = time.perf_counter() - self.started
            logs["completion_tokens_per_second"] = self.completion_tokens / max(elapsed, 1e-9)
        if self.teacher_names:
            logs.update(self._teacher_logs(sum_over_ranks, steps))
        logs.update(self._policy_gradient_logs(sum_over_ranks, max_over_ranks or (lambda t: t)))
        return logs

    def _policy_gradient_logs(self, sum_over_ranks, max_over_ranks) -> dict[str, float]:
        """`reward/NAME/mean` and `/std` (over the completions it scored), `reward/mean` and `/std` (the weighted
        total), and `pg/...`: the teacher advantage's mean and rho's mean, max and truncated fraction over the
        policy-gradient tokens of all ranks."""
        logs = {}
        for name, values in self.rewards.items():
            scored = torch.tensor(values, dtype=torch.float64)
            scored = scored[~scored.isnan()]
            prefix = "reward/" if name is None else f"reward/{name}/"
            if scored.numel():
                logs[prefix + "mean"] = round(scored.mean().item(), 6)
                logs[prefix + "std"] = round(scored.std(unbiased=False).item(), 6)
        tokens, advantage, rho, truncated = sum_over_ranks(torch.tensor(self.policy_gradient, dtype=torch.float64))
        if tokens > 0:
            logs["pg/teacher_advantage_mean"] = round(float(advantage / tokens), 6)
            logs["pg/rho_mean"] = round(float(rho / tokens), 6)
            logs["pg/rho_max"] = round(float(max_over_ranks(torch.tensor([self.rho_max], dtype=torch.float64))[0]), 6)
            logs["pg/rho_truncated_fraction"] = round(float(truncated / tokens), 6)
        return logs

    def _teacher_logs(self, sum_over_ranks, steps: int) -> dict[str, float]:
        """`teacher/NAME/...`: each teacher's loss, tokens and reverse-KL estimate over all ranks, and its time per
        step on this rank."""
        counts = sum_over_ranks(torch.tensor([row[:-1] for row in self.per_teacher], dtype=torch.float64)).tolist()
        logs = {}
        for name, sums, row in zip(self.teacher_names, counts, self.per_teacher):
            loss_sum, tokens, ratio_sum, sampled_tokens = sums
            prefix = f"teacher/{name}/"
            logs[prefix + "completion_tokens"] = tokens
            if tokens > 0:
                logs[prefix + "loss"] = round(loss_sum / tokens, 6)
            if sampled_tokens > 0:
                logs[prefix + "on_policy_reverse_kl_estimate"] = round(ratio_sum / sampled_tokens, 6)
            logs[prefix + "time_s"] = row[-1] / steps  # this rank's, per step, as time/teacher_s
        return logs


def decoded_samples(batches: list[dict[str, torch.Tensor]], tokenizer) -> list[tuple[str, str]]:
    """The (prompt, completion) texts of a step's on-policy slices, for the completions table."""
    from .losses import IGNORE_INDEX

    samples = []
    for batch in batches:
        width = batch["prompt_ids"].shape[1]
        trained = batch["labels"][:, width:] != IGNORE_INDEX
        completions = batch["input_ids"][:, width:].masked_fill(~trained, tokenizer.pad_token_id)
        prompts = tokenizer.batch_decode(batch["prompt_ids"], skip_special_tokens=True)
        samples.extend(zip(prompts, tokenizer.batch_decode(completions, skip_special_tokens=True)))
    return samples


def print_completions(samples: list[tuple[str, str]], step: int, limit: int | None = None) -> None:
    """A table of the step's prompts and completions (the first `limit`, or all), as TRL's `log_completions` shows."""
    if not samples:
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Completions at step {step}", show_lines=True)
    table.add_column("prompt", overflow="fold")
    table.add_column("completion", overflow="fold")
    for prompt, completion in samples[: limit or len(samples)]:
        table.add_row(prompt, completion)
    Console().print(table)


class NonFiniteLossError(FloatingPointError):
    """Training stopped on a NaN or infinite loss, before the optimizer step could write it into the weights."""

    @classmethod
    def at(cls, step: int, ranks: list[int], local: tuple[float, bool] | None) -> NonFiniteLossError:
        """The error for optimizer `step`, whose loss was non-finite on `ranks` (this rank's value and whether its
        slice was on-policy, where it is one of them)."""
        where = f"on rank {ranks[0]}" if len(ranks) == 1 else f"on ranks {ranks}"
        value = f"{local[0]} in an {'on' if local[1] else 'off'}-policy slice" if local else "non-finite"
        return cls(
            f"the loss was {value} at optimizer step {step} ({where}); training stopped before that step's update, so "
            f"the weights in memory are those of step {step - 1} and no checkpoint holds a non-finite update. Likely "
            "causes: a teacher that returns NaN or infinite log-probs (a teacher server's answers, an fp16 teacher "
            "overflowing), NaN or inf already in the student's or teacher's weights, inputs or a loss temperature that "
            "overflow, or a learning rate high enough to diverge (lower learning_rate, keep max_grad_norm > 0, prefer "
            "bf16 to fp16)."
        )
