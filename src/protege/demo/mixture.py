"""The demo's task mixture (`protege demo --task mixture`): the rows of several demo tasks in one stream, each tagged
with the task it comes from, which also names its teacher. It meets the `Task` interface (`tasks.py`) so that the
student's warm-up batches (`Encoder.batch`) and the distillation's prompts take a mixed list of problems as they take
one task's; scores stay per task (`mixture_pipeline.py`), as each task's generation length and verifier differ.

Every part keeps its own seeded streams (held-out prompts first, training streams that skip them); the mixture draws
an equal share from each and interleaves them by a seeded shuffle, so a step's rows come from both tasks in varying
proportions and no model trains on a held-out prompt of either.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .tasks import Task, get_task

MIXTURE = "mixture"
PARTS = ("addition", "walks")  # the tasks of `protege demo --task mixture`, each with its own teacher
VERSION = 1  # the mixture's own format and WARMUP_SHARES; the parts' versions are folded into `Mixture.version`
# Rows of each task in the student's warm-up: walks are learnt several times faster than addition, so an even mix left
# the student's sampled walks near the teacher's before addition reached 30% (no room to gain on walks).
WARMUP_SHARES = {"addition": 3, "walks": 1}


@dataclass(frozen=True)
class Tagged:
    """A problem of the task called `task` (and taught by the teacher of that name)."""

    task: str
    problem: Any


class Mixture:
    """Several demo tasks as one `Task` whose problems are `Tagged`: messages, scores and parsing go to the part that
    a problem names."""

    name = MIXTURE
    metric = "each task's own score"
    line_one = "line 1 of the row's own task"

    def __init__(self, parts: Iterable[str] = PARTS, digits: int | None = None, shares: dict[str, int] | None = None):
        self.parts: dict[str, Task] = {name: get_task(name, digits) for name in parts}
        self.shares = {name: (shares or {}).get(name, 1) for name in self.parts}  # rows of each part, in proportion

    @property
    def version(self) -> int:
        """Bumped with any part's version (two digits each after the mixture's own), so stale caches are not used."""
        return int(str(VERSION) + "".join(f"{task.version:02d}" for task in self.parts.values()))

    @property
    def prompt_format(self) -> str:
        return " or ".join(task.prompt_format for task in self.parts.values())

    @property
    def description(self) -> str:
        return "one student, " + "; ".join(f"{name}: {task.description}" for name, task in self.parts.items())

    def held_out_problems(self, count: int, seed: int) -> list[Tagged]:
        """`count` held-out problems of each part, part after part (scores are per part)."""
        return [Tagged(name, p) for name, task in self.parts.items() for p in task.held_out_problems(count, seed)]

    def training_problems(
        self, count: int, seed: int, exclude: Iterable[Any] = (), stream: str = "train"
    ) -> list[Tagged]:
        """`count` rows, each part's share of them (`shares`, rounded down; the first part takes the remainder) from
        its `stream`, none of them in `exclude`, interleaved by a shuffle seeded with `seed` and `stream`."""
        excluded, counts = self.split(exclude), self.counts(count)
        rows = [
            Tagged(name, p)
            for name, task in self.parts.items()
            for p in task.training_problems(counts[name], seed, excluded[name], stream)
        ]
        random.Random(f"protege-demo-mixture-{stream}-{seed}").shuffle(rows)
        return rows

    def counts(self, count: int) -> dict[str, int]:
        """How many of `count` rows come from each part: its share, rounded down; the first part takes the rest."""
        total = sum(self.shares.values())
        counts = {name: count * share // total for name, share in self.shares.items()}
        counts[next(iter(counts))] += count - sum(counts.values())
        return counts

    def teacher_of(self, problem: Tagged) -> str:
        """The teacher that grades the row: its task's."""
        return problem.task

    def prompt_messages(self, problem: Tagged) -> list[dict[str, str]]:
        return self.parts[problem.task].prompt_messages(problem.problem)

    def conversation(self, problem: Tagged) -> list[dict[str, str]]:
        return self.parts[problem.task].conversation(problem.problem)

    def score(self, completion: str, problem: Tagged) -> float:
        return self.parts[problem.task].score(completion, problem.problem)

    def first_wrong_line(self, completion: str, problem: Tagged) -> int | None:
        return self.parts[problem.task].first_wrong_line(completion, problem.problem)

    def parse_problem(self, prompt: str) -> Tagged:
        """The first part whose prompts `prompt` fits (the tasks' prompts do not overlap: digits and '+', or nodes)."""
        for name, task in self.parts.items():
            try:
                return Tagged(name, task.parse_problem(prompt))
            except ValueError:
                continue
        raise ValueError(f"not a prompt of {', '.join(self.parts)}: {prompt!r}")

    def canonical(self, problem: Tagged) -> Tagged:
        return Tagged(problem.task, self.parts[problem.task].canonical(problem.problem))

    def split(self, problems: Iterable[Tagged]) -> dict[str, list[Any]]:
        """The problems of each part, untagged, in their order."""
        parts: dict[str, list[Any]] = {name: [] for name in self.parts}
        for problem in problems:
            parts[problem.task].append(problem.problem)
        return parts
