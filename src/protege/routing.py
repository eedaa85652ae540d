"""Several teachers in one run: which teacher scores each row, and the slice's rows split by teacher.

A dataset column (`teacher_column`, default "teacher") names each row's teacher; `default_teacher` takes rows without
it. Tokenization turns the name into `teacher_index` (checked there, so an unknown name fails at start, naming the
row), the collator carries it as a (B,) tensor, and every step splits each slice into one `TeacherRoute` per teacher:
the rows it scores, as a batch of their own. Each teacher is then asked once per step for all its rows (`prepare`),
and each row's loss is against its own teacher. The loss is still summed over the step's completion tokens and
divided once by their count, so a row weighs the same whichever teacher scored it.

With one teacher there is no column and one route: the whole slice, untouched.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

ROUTES_KEY = "teacher_routes"  # where a training slice carries its routes through the step
INDEX_KEY = "teacher_index"  # the (B,) tensor of each row's teacher


@dataclass(frozen=True)
class TeacherColumn:
    """How rows name their teacher: the column, the teachers' names in the run's order, and the default."""

    names: tuple[str, ...]
    column: str = "teacher"
    default: str | None = None

    def index_of(self, row: dict[str, Any], index: int) -> int:
        """The position in `names` of row `index`'s teacher, or a ValueError naming the row and the known names."""
        name = row.get(self.column)
        if name is None:
            if self.default is None:
                raise ValueError(
                    f"row {index} has no {self.column!r} value and default_teacher is not set; name one of the "
                    f"teachers {list(self.names)} in every row, or set default_teacher"
                )
            name = self.default
        if name not in self.names:
            raise ValueError(
                f"row {index}: {self.column!r} is {name!r}, which is not one of the teachers {list(self.names)}"
            )
        return self.names.index(name)

    def check_columns(self, columns: list[str] | None, name: str) -> None:
        """A dataset without the column needs default_teacher: one line, before any row is read."""
        if columns is not None and self.column not in columns and self.default is None:
            raise ValueError(
                f"{name} has no {self.column!r} column to route rows to the teachers {list(self.names)} (columns: "
                f"{columns}); add it, name another column with teacher_column, or set default_teacher"
            )

    def unused_warning(self, indices: list[int], name: str) -> str | None:
        """A message when a teacher gets no row of the dataset, with the counts per teacher; None when all get some."""
        counts = Counter(indices)
        if all(counts[i] for i in range(len(self.names))):
            return None
        per_teacher = ", ".join(f"{teacher!r}: {counts[i]}" for i, teacher in enumerate(self.names))
        idle = [teacher for i, teacher in enumerate(self.names) if not counts[i]]
        return f"{name}: teacher{'s' if len(idle) > 1 else ''} {idle} get no row ({per_teacher} rows per teacher)"


@dataclass
class TeacherRoute:
    """One teacher's rows of a slice: their positions (None: the whole slice) and the batch of just those rows."""

    teacher: int
    rows: torch.Tensor | None
    batch: dict[str, Any]
    scored: bool = True  # False for a stand-in row, run only so that every rank calls a sharded teacher alike


def take_rows(batch: dict[str, Any], rows: torch.Tensor) -> dict[str, Any]:
    """The batch restricted to `rows`: every per-row tensor indexed, everything else (prompt_width, flags) kept."""
    size = batch["input_ids"].shape[0]
    return {
        key: value[rows] if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == size else value
        for key, value in batch.items()
        if key != ROUTES_KEY
    }


def teacher_routes(batch: dict[str, Any], num_teachers: int, every_teacher: bool = False) -> list[TeacherRoute]:
    """The slice's rows split by teacher, in teacher order; a teacher with no row gets no route, unless
    `every_teacher` (a teacher sharded across ranks must be run by all of them): then it runs one stand-in row."""
    if ROUTES_KEY in batch:
        return batch[ROUTES_KEY]
    if num_teachers == 1 or INDEX_KEY not in batch:
        return [TeacherRoute(0, None, batch)]
    owners = batch[INDEX_KEY]
    routes = []
    for teacher in range(num_teachers):
        rows = (owners == teacher).nonzero().squeeze(1)
        if rows.numel():
            routes.append(TeacherRoute(teacher, rows, take_rows(batch, rows)))
        elif every_teacher:
            first = torch.zeros(1, dtype=torch.long, device=owners.device)
            routes.append(TeacherRoute(teacher, first, take_rows(batch, first), scored=False))
    return routes
