"""What the trainer logs, accumulated over one logging window in named fields."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


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

    def start(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def add_loss(self, on_policy: bool, loss_sum: float, tokens: float) -> None:
        if on_policy:
            self.on_policy_loss_sum += loss_sum
            self.on_policy_tokens += tokens
        else:
            self.off_policy_loss_sum += loss_sum
            self.off_policy_tokens += tokens

    def add_sampled_log_ratio(self, ratio_sum: float, tokens: float) -> None:
        self.sampled_log_ratio_sum += ratio_sum
        self.sampled_tokens += tokens

    def add_completions(self, lengths: torch.Tensor, truncated: torch.Tensor) -> None:
        """Length statistics of one step's on-policy completions (already gathered from every rank)."""
        self.mean_length.append(lengths.mean().item())
        self.min_length.append(lengths.min().item())
        self.max_length.append(lengths.max().item())
        self.truncated_fraction.append(truncated.mean().item())

    def logs(self, sum_over_ranks) -> dict[str, float]:
        """The window's log entries; `sum_over_ranks` adds a float tensor across processes."""
        logs = {
            "on_policy_fraction": _mean(self.on_policy_fraction),
            "time/generation_s": _mean(self.generation_seconds),
            "completions/mean_length": _mean(self.mean_length),
            "completions/min_length": _mean(self.min_length),
            "completions/max_length": _mean(self.max_length),
            "completions/truncated_fraction": _mean(self.truncated_fraction),
        }
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
        return logs
