"""`protege demo`: on-policy distillation shown end to end on a laptop CPU, with no network and no GPU.

`tasks` is the interface every embedded task meets: `task` (the default, 6-digit addition worked column by column,
and the shipped tokenizer), `letters` (write a set's letters once each in any order, checked by a verifier) and
`walks` (continue a walk along a hidden graph's edges, checked by a verifier).
`pipeline` runs the stages in order: train a teacher and warm up a smaller student (`supervised`, cached by `cache`),
distil the student with `DistillationTrainer` (`distill`), score both (`scoring`), and write and print the results
(`report`), showing its stages as it goes (`progress`: bars on a terminal, plain lines in a log). `settings` holds
what shapes a run, `encoder` turns problems into batches. Entry point:
`run_demo(output_dir, quick=False, seed=0, task="addition")`, imported lazily so that `import protege.demo` stays
light.
"""

from __future__ import annotations

__all__ = ["run_demo"]


def __getattr__(name: str):
    if name == "run_demo":
        from .pipeline import run_demo

        return run_demo
    raise AttributeError(f"module 'protege.demo' has no attribute {name!r}")
