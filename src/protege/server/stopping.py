"""How protege's servers stop on SIGINT or SIGTERM (Ctrl-C, `kill`, a scheduler): with one line that says so and exit
code 0, whether the signal comes while the model loads (`commands.interrupts.interruptible` raises `Interrupted`) or
while serving. A server stopped on request has done its job, so it exits 0 as daemons do (a supervisor counts any
other code as a failure); the line names the signal.

uvicorn shuts down gracefully on these signals, but then raises the signal again under the handler it found, so that
the process dies of it: SIGINT became a KeyboardInterrupt traceback, and SIGTERM killed the process before Python's
exit handlers ran. Those handlers are what stops vLLM's engine processes, so SIGTERM left EngineCore, its Worker and
the multiprocessing resource tracker they hold open running as orphans. `StoppableServer` returns instead.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator

import uvicorn

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StoppableServer(uvicorn.Server):
    """uvicorn's server, stopped by SIGINT or SIGTERM as uvicorn stops (gracefully; a second SIGINT skips waiting for
    open connections), which then returns: `stopped_by` is the first signal's number, None if none came."""

    stopped_by: int | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():  # only the main thread can take signals
            yield
            return
        previous = {number: signal.signal(number, self.handle_exit) for number in STOP_SIGNALS}
        try:
            yield
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def handle_exit(self, sig: int, frame) -> None:
        if self.stopped_by is None:
            self.stopped_by = sig
        super().handle_exit(sig, frame)


def serve_until_stopped(config: uvicorn.Config) -> int | None:
    """Serve until a stop signal; the signal's number (None when the server ended for another reason)."""
    server = StoppableServer(config)
    server.run()
    return server.stopped_by


def report_stop(command: str, signum: int | None, where: str) -> int:
    """Print `protege COMMAND: stopped by SIGNAL WHERE` on stderr when a signal stopped it; the exit code, 0."""
    if signum is not None:
        print(f"protege {command}: stopped by {signal.Signals(signum).name} {where}", file=sys.stderr, flush=True)
    return 0
