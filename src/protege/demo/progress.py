"""The demo's console and progress display: rich bars on a terminal, plain lines elsewhere.

A pipe or a file (`make demo > log`, CI) cannot show bars that redraw in place: rich then prints them once, when the
run ends, so a log stayed empty for minutes. Off a terminal each stage prints a line when it starts, every tenth of
the way and when it ends instead.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

LINES_PER_STAGE = 10  # progress lines a long stage prints off a terminal, besides its first and last


def make_console():
    """The demo's console: a terminal's own width, else 100 columns. Rich takes 80 when the output goes to a file or a
    pipe, which cut the result table's rows. COLUMNS, when set, still wins."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal and not console.is_jupyter and "COLUMNS" not in os.environ:
        console = Console(width=100)
    return console


def progress_bars(console, plain: bool | None = None):
    """Rich bars on a terminal (or a notebook), `PlainProgress` lines elsewhere; `plain` forces one or the other.

    The bars: one per stage, with a free-text `info` field for the latest loss or accuracy. The bar takes the width
    the other columns leave (up to 40), so the counts and times stay whole down to about 60 columns; on a narrower
    console the description and the info are cut, never the numbers. Descriptions are kept to 21 characters and infos
    to 30 so that everything fits in 80.
    """
    if plain is None:
        plain = not console.is_terminal and not console.is_jupyter
    if plain:
        return PlainProgress(console)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Column

    return Progress(
        TextColumn("{task.description}", table_column=Column(no_wrap=True, overflow="ellipsis")),
        BarColumn(bar_width=None, table_column=Column(ratio=1, max_width=40)),
        MofNCompleteColumn(table_column=Column(no_wrap=True, min_width=7)),
        TimeElapsedColumn(table_column=Column(no_wrap=True, min_width=7)),
        TextColumn("{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis", min_width=4)),
        console=console,
    )


@dataclass
class _Stage:
    description: str
    total: int
    completed: int
    info: str
    started: float = field(default_factory=time.perf_counter)
    printed: int = 0  # the last count a line was printed at
    done: bool = False


class PlainProgress:
    """The part of rich's `Progress` the demo calls (`add_task`, `update`, a context manager), printing plain lines:
    `teacher: supervised   150/1500  0:00:04  loss 1.2345` when a stage starts, each time it passes a tenth of its
    total, and when it ends (`done`). Lines are printed as they happen; rich flushes each one."""

    def __init__(self, console, lines_per_stage: int = LINES_PER_STAGE):
        self.console = console
        self.lines_per_stage = lines_per_stage
        self.stages: list[_Stage] = []

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        return None

    def add_task(self, description: str, total: int, completed: int = 0, info: str = "") -> int:
        stage = _Stage(description, total, completed, info)
        self.stages.append(stage)
        if completed >= total:
            self._finish(stage)
        else:
            self._print(stage, "started")
        return len(self.stages) - 1

    def update(
        self,
        task_id: int,
        advance: int = 0,
        completed: int | None = None,
        total: int | None = None,
        info: str | None = None,
    ) -> None:
        stage = self.stages[task_id]
        stage.total = stage.total if total is None else total
        stage.completed = (stage.completed if completed is None else completed) + advance
        stage.info = stage.info if info is None else info
        if stage.done:
            return
        if stage.completed >= stage.total:
            self._finish(stage)
        elif stage.completed - stage.printed >= max(1, stage.total // self.lines_per_stage):
            self._print(stage)

    def _finish(self, stage: _Stage) -> None:
        stage.done = True
        self._print(stage, "done")

    def _print(self, stage: _Stage, event: str = "") -> None:
        stage.printed = stage.completed
        seconds = int(time.perf_counter() - stage.started)
        elapsed = f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        count = f"{stage.completed}/{stage.total}"
        words = "  ".join(word for word in (event, stage.info) if word)
        self.console.print(
            f"{stage.description:<21} {count:>9}  {elapsed}  {words}".rstrip(), markup=False, highlight=False
        )
