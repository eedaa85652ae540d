"""What a person watching a run sees: the few numbers that matter on the progress bar (or one short line per log
without it), while the whole log still goes to `trainer.state.log_history`, the JSON state and the trackers.

transformers prints every log as its full dict, about 700 characters a step for a distillation run, written between
the progress bar's redraws.
"""

from __future__ import annotations

import logging
import sys

from transformers.trainer_callback import PrinterCallback, ProgressCallback

logger = logging.getLogger("protege")

# (log key, label, format): what a step's line shows, in this order, where the log has it.
SHOWN = (
    ("loss", "loss", "{:.4g}"),
    ("on_policy_fraction", "on-policy", "{:.0%}"),
    ("on_policy_reverse_kl_estimate", "reverse KL", "{:.4g}"),
    ("reward/mean", "reward", "{:.4g}"),
    ("completion_tokens_per_second", "tokens/s", "{:.0f}"),
    ("eval_loss", "eval loss", "{:.4g}"),
    ("train_loss", "train loss", "{:.4g}"),
    ("train_runtime", "seconds", "{:.0f}"),
)


def short_line(logs: dict) -> str:
    """The shown numbers of one log, as `loss 0.0324  on-policy 100%  tokens/s 26`."""
    parts = []
    for key, label, form in SHOWN:
        value = logs.get(key)
        if isinstance(value, (int, float)):
            parts.append(f"{label} {form.format(value)}")
    return "  ".join(parts)


class ShortProgress(ProgressCallback):
    """transformers' progress bar, with a log's shown numbers on the bar instead of its dict printed under it."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            line = short_line(logs)
            if "train_runtime" in logs or "eval_loss" in logs:  # the end of training, an evaluation: a line that stays
                self.training_bar.write(f"step {state.global_step}: {line}")
            elif line:
                self.training_bar.set_postfix_str(line, refresh=True)

    def close(self) -> None:
        """Close the bar now (an interrupted run's last line then comes after it, not before)."""
        if self.training_bar is not None:
            self.training_bar.close()
            self.training_bar = None


class ShortPrinter(PrinterCallback):
    """One short line per log where the progress bar is off (`disable_tqdm`)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            line = short_line(logs)
            if line:
                print(f"step {state.global_step}: {line}", flush=True)


def shorten_progress(trainer) -> None:
    """Swap transformers' progress bar and printer for the short ones, on a trainer built with either."""
    for long_form, short_form in ((ProgressCallback, ShortProgress), (PrinterCallback, ShortPrinter)):
        if trainer.pop_callback(long_form) is not None:
            trainer.add_callback(short_form)


def close_progress(trainer) -> None:
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, ShortProgress):
            callback.close()


def announce(message: str) -> None:
    """A line every user should see once, library user or command line: through protege's logger where a handler
    shows its INFO lines (`protege` commands install one, and so may the user's logging set-up), else on stderr."""
    if logger.isEnabledFor(logging.INFO) and logger.hasHandlers():
        logger.info(message)
    else:
        print(f"protege: {message}", file=sys.stderr)
