"""`protege demo`: on-policy distillation shown end to end on a laptop CPU, with no network and no GPU.

`task` is the embedded task (6-digit addition worked column by column) and its shipped tokenizer; `pipeline` trains a
teacher, warms up a smaller student and distils it with `DistillationTrainer`. Entry point: `run_demo(output_dir,
quick=False, seed=0)`, imported lazily so that `import protege.demo` stays light.
"""

from __future__ import annotations

__all__ = ["run_demo"]


def __getattr__(name: str):
    if name == "run_demo":
        from .pipeline import run_demo

        return run_demo
    raise AttributeError(f"module 'protege.demo' has no attribute {name!r}")
