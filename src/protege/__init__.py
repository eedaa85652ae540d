"""protege: knowledge distillation for causal language models, on-policy and off-policy.

Names are imported on first use, so `protege serve-teacher` starts without the training stack (and runs in a vLLM
environment that has its own torch and transformers).
"""

import importlib

_EXPORTS = {
    "DistillationConfig": "config",
    "DistillationTrainer": "trainer",
    "NonFiniteLossError": "metrics",
    "chunked_jsd_loss": "chunked",
    "chunked_sparse_top1_loss": "chunked",
    "generalized_jsd_loss": "losses",
    "local_sparse_top1_loss": "losses",
    "sparse_top1_loss": "losses",
    "topk_forward_kl_loss": "losses",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'protege' has no attribute {name!r}")
