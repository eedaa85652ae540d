"""The demo's embedded tasks behind one interface, so that the pipeline, the scoring, the report and
benchmarks/gkd_table.py run any of them with the same code.

- `addition` (`task.py`): 6-digit addition worked column by column. One correct completion per problem, which the
  teacher learns almost one-hot: the task where every distillation method ends in the same place
  (docs/benchmarks.md, "The GKD paper's comparison, on the demo task").
- `letters` (`letters.py`): list the letters of a set, each once, in any order. Many valid completions, a verifier,
  and a student too narrow to keep track of which letters it has written: the task built to show where on-policy
  distillation should help (docs/benchmarks.md, "A task where the student's own mistakes matter: protocol"). Its
  teacher could not learn it (design 1, failed at the protocol's first gate).
- `walks` (`walks.py`): continue a walk on a fixed hidden graph, each step along an edge. Many valid continuations, a
  local rule a small teacher learns exactly, and a student whose next-node table is low-rank (design 2).

A task's problems come from seeded streams: the held-out problems first, then training streams that skip them, so
every score is on problems no model trained on. `distinct_problems` and `problems_excluding` are those two streams,
shared by the tasks.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

TASK_NAMES = ("addition", "letters", "walks")
P = TypeVar("P", bound=Hashable)


class Task(Protocol):
    """What the demo needs of a task: seeded problems, chat messages, a verifier and where an answer went wrong."""

    name: str
    version: int  # bumped when the task's data or format changes, so that cached models are not reused
    metric: str  # what `score` measures, for tables and plots: "exact-match accuracy", "valid answers"
    line_one: str  # what line 1 of a completion is, for the console's "went wrong at line N"
    prompt_format: str  # the user turn the task expects, for error messages

    @property
    def description(self) -> str: ...

    def held_out_problems(self, count: int, seed: int) -> list[Any]: ...

    def training_problems(
        self, count: int, seed: int, exclude: Iterable[Any] = (), stream: str = "train"
    ) -> list[Any]: ...

    def prompt_messages(self, problem: Any) -> list[dict[str, str]]: ...

    def conversation(self, problem: Any) -> list[dict[str, str]]: ...

    def score(self, completion: str, problem: Any) -> float: ...

    def first_wrong_line(self, completion: str, problem: Any) -> int | None: ...

    def parse_problem(self, prompt: str) -> Any: ...

    def canonical(self, problem: Any) -> Any:
        """`problem` with the task's one canonical answer in place of its own: the single reference that a dataset
        written in a fixed house style would hold (benchmarks/gkd_table.py --references canonical)."""
        ...


def get_task(name: str, digits: int | None = None) -> Task:
    """The task called `name`; `digits` sizes the addition task (6 when None) and is ignored by the others."""
    if name == "addition":
        from .task import DIGITS, Addition

        return Addition(DIGITS if digits is None else digits)
    if name == "letters":
        from .letters import Letters

        return Letters()
    if name == "walks":
        from .walks import Walks

        return Walks()
    if name == "mixture":  # addition and walks in one stream (`mixture.py`): `protege demo --task mixture`
        from .mixture import Mixture

        return Mixture(digits=digits)
    raise ValueError(f"unknown demo task {name!r}: use one of {', '.join(TASK_NAMES)}")


def distinct_problems(draw: Callable[[random.Random], P], count: int, rng: random.Random) -> list[P]:
    """`count` distinct problems from `draw`, in the order first drawn: a held-out set."""
    problems: dict[P, None] = {}
    while len(problems) < count:
        problems.setdefault(draw(rng), None)
    return list(problems)


def problems_excluding(
    draw: Callable[[random.Random], Sequence[P]], count: int, rng: random.Random, exclude: Iterable[P]
) -> list[P]:
    """`count` problems from `draw` (which may return several rows for one prompt), none equal to one in `exclude`:
    a training stream that never holds a held-out problem."""
    excluded, problems = set(exclude), []
    while len(problems) < count:
        problems.extend(p for p in draw(rng) if p not in excluded)
    return problems[:count]
