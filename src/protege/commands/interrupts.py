"""Ctrl-C and SIGTERM as a person and a cluster scheduler expect them: the first stops the command where it is (the
command then says in one line where things stand), a second one exits at once, whatever the first is still doing.

Python's default turns SIGINT into a KeyboardInterrupt whose traceback runs to seventy lines and says nothing of the
run, and leaves SIGTERM (a scheduler's preemption) to kill the process without a word. Stopping mid-step is safe for
`protege train`: checkpoints are published whole or not at all (`protege.checkpoints`), so the newest complete one is
the run's state.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The first SIGINT or SIGTERM a command received; its exit code is the shell's 128 + the signal's number."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Within: the first SIGINT or SIGTERM raises `Interrupted` in the main thread; any later one ends the process at
    once with 128 + its number, even while the first is being handled. The previous handlers come back afterwards."""
    received: list[int] = []

    def handle(signum: int, _frame) -> None:
        if received:
            os._exit(128 + signum)
        received.append(signum)
        raise Interrupted(signum)

    previous = {number: signal.signal(number, handle) for number in SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
