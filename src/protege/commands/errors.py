"""How every `protege` subcommand reports a problem the user can fix: one line on stderr and exit code 2, like
argparse's own errors, instead of a traceback."""

from __future__ import annotations

import sys

USAGE_EXIT = 2


class UsageError(ValueError):
    """A problem with what the user asked for: printed as one line, exit code 2."""


def one_line(error: BaseException | str) -> str:
    """The message on one line: library errors (transformers', vLLM's) often span several."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


def report(command: str, error: BaseException | str) -> int:
    """Print `protege COMMAND: error: MESSAGE` on stderr and return the exit code for it."""
    print(f"protege {command}: error: {one_line(error)}", file=sys.stderr)
    return USAGE_EXIT
