"""Run by test_fsdp1 under torchrun: protege's objective on FSDP1 (`FullyShardedDataParallel`, use_orig_params)
student and teacher on CPU processes; every rank writes OUT/rank{R}.json.

    python -m torch.distributed.run --nproc_per_node 2 fsdp1_step.py OUT

Wrapped as accelerate wraps for FSDP1 (each decoder layer, then the root; embedding, norm and LM head in the root's
flat parameter). The dense loss (full logits inside the forward) takes one SGD step and is compared with one process's
plain copies over all ranks' rows; the chunked loss, which applies the LM head outside the forward, is refused.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from fsdp_step import ROWS, batch_rows, models, step
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from protege.losses import IGNORE_INDEX
from protege.objective import Objective


def wrap(model: torch.nn.Module) -> FullyShardedDataParallel:
    """FSDP1 on the CPU: `device_id` names the CPU, or FSDP1 looks for an accelerator and stops."""
    policy = ModuleWrapPolicy({type(model.model.layers[0])})
    return FullyShardedDataParallel(model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))


def dense(rank: int, world: int) -> dict:
    objective = Objective(beta=0.5, chunk_size=None)
    student, teacher = models()
    start = [p.detach().clone() for p in student.parameters()]
    plain_student, plain_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    student, teacher = wrap(student), wrap(teacher)
    optimizer, plain_optimizer = (torch.optim.SGD(m.parameters(), lr=2.0) for m in (student, plain_student))
    local, whole = batch_rows(slice(rank * ROWS, (rank + 1) * ROWS)), batch_rows(slice(None))
    tokens = int(whole["labels"].ne(IGNORE_INDEX).sum())
    sharded = step(student, optimizer, teacher, objective, local, tokens, world)
    plain = step(plain_student, plain_optimizer, plain_teacher, objective, whole, tokens, 1)
    summed = torch.tensor(sharded["loss_sum"], dtype=torch.float64)
    dist.all_reduce(summed)
    with FullyShardedDataParallel.summon_full_params(student):
        trained = [p.detach().clone() for p in student.module.parameters()]
    expected = list(plain_student.parameters())
    return {
        "loss_sum": [summed.item(), plain["loss_sum"]],
        "weight_error": max((a - b).abs().max().item() for a, b in zip(trained, expected)),
        "moved": max((b - a).abs().max().item() for a, b in zip(start, expected)),
    }


def chunked(rank: int, world: int) -> str:
    """The error the chunked loss stops with under FSDP1 (both ranks stop at the same point, before any backward)."""
    student, teacher = models()
    student, teacher = wrap(student), wrap(teacher)
    optimizer = torch.optim.SGD(student.parameters(), lr=2.0)
    try:
        step(student, optimizer, teacher, Objective(beta=0.5, chunk_size=3), batch_rows(slice(0, ROWS)), 10, world)
    except RuntimeError as error:
        return str(error)
    return ""


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    report = {"dense": dense(rank, world), "chunked": chunked(rank, world)}
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
