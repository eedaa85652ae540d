"""protege: knowledge distillation for causal language models, on-policy and off-policy."""

from .config import DistillationConfig
from .losses import (
    chunked_jsd_loss,
    generalized_jsd_loss,
    local_sparse_top1_loss,
    sparse_top1_loss,
    topk_forward_kl_loss,
)

__all__ = [
    "DistillationConfig",
    "DistillationTrainer",
    "chunked_jsd_loss",
    "generalized_jsd_loss",
    "local_sparse_top1_loss",
    "sparse_top1_loss",
    "topk_forward_kl_loss",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The trainer pulls in more of transformers; import it only when asked for.
    if name == "DistillationTrainer":
        from .trainer import DistillationTrainer

        return DistillationTrainer
    raise AttributeError(f"module 'protege' has no attribute {name!r}")
