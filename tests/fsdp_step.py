"""Run by test_fsdp under torchrun: one SGD step of protege's objective on FSDP2 (`fully_shard`) student and teacher,
and the same step on one process's plain copies over all ranks' rows; every rank writes OUT/rank{R}.json.

    python -m torch.distributed.run --nproc_per_node 2 fsdp_step.py OUT

Sharded the way accelerate shards (each decoder layer, then the root with `reshard_after_forward=True`), so the LM
heads are sharded `DTensor`s when protege reads them after the forward. Each case runs the student's view, the loss,
the reverse-KL metric, `evaluation.summed_token_kl` and transformers' `generate` through protege's own functions.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor
from transformers import GenerationConfig

from protege.evaluation import summed_token_kl
from protege.losses import IGNORE_INDEX
from protege.objective import Objective, sampled_log_ratio_sum, student_output
from protege.rollout import model_generate
from protege.teacher.local import LocalTeacher
from protege.toy import tiny_model
from protege.vllm_colocate import student_weights

VOCAB, ROWS, WIDTH, PROMPT = 300, 2, 12, 5  # ROWS per rank
CASES = {"auto": ("auto", 0), "chunk3": (3, 0), "chunk3_top1": (3, 1), "dense": (None, 0), "dense_top1": (None, 1)}


def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    student = tiny_model(VOCAB, 2, 32, seed=1)
    teacher = tiny_model(VOCAB, 3, 64, seed=2)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30.0)
    teacher.requires_grad_(False).eval()
    return student, teacher


def shard(model: torch.nn.Module) -> torch.nn.Module:
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model, reshard_after_forward=True)
    return model


def batch_rows(rows: slice) -> dict[str, torch.Tensor]:
    """Rows of one fixed batch; some completion columns are not trained (-100), as padding would be."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (ROWS * dist.get_world_size(), WIDTH), generator=generator)
    labels = ids.clone()
    labels[:, :PROMPT] = IGNORE_INDEX
    labels[::2, -3:] = IGNORE_INDEX
    positions = torch.arange(WIDTH).expand_as(ids)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "position_ids": positions, "labels": labels}
    return {k: v[rows] for k, v in batch.items()} | {"prompt_width": torch.tensor(PROMPT)}


def step(student, optimizer, teacher, objective: Objective, batch, tokens: int, ranks: int) -> dict[str, float]:
    """protege's training-slice path: teacher view, student view, loss (scaled as the trainer scales it), metric."""
    labels = batch["labels"][:, PROMPT:]
    teacher_out = LocalTeacher(teacher, VOCAB, "hidden" if objective.chunk_size else "logits")(batch)
    student_out = student_output(student, batch, objective.student_view, VOCAB)
    loss_sum = objective.loss_sum(student_out, teacher_out, labels)
    ratio = sampled_log_ratio_sum(student_out, teacher_out, labels, 1.0)  # before backward, as compute_loss runs it
    (loss_sum / tokens * ranks).backward()  # FSDP averages gradients over `ranks`, like DDP
    optimizer.step()
    return {"loss_sum": loss_sum.item(), "ratio": ratio}


def case(name: str, rank: int, world: int) -> dict:
    chunk_size, top_k = CASES[name]
    objective = Objective(beta=0.5, top_k=top_k, chunk_size=chunk_size)
    student, teacher = models()
    start = {n: p.detach().clone() for n, p in student.named_parameters()}
    plain_student, plain_teacher = copy.deepcopy(student), copy.deepcopy(teacher)
    shard(student), shard(teacher)
    # Made before any forward, as the trainer makes it: FSDP2 swaps the sharded parameters back in only at reshard.
    optimizer, plain_optimizer = (torch.optim.SGD(m.parameters(), lr=2.0) for m in (student, plain_student))
    local, whole = batch_rows(slice(rank * ROWS, (rank + 1) * ROWS)), batch_rows(slice(None))
    tokens = int(whole["labels"].ne(IGNORE_INDEX).sum())
    sharded = step(student, optimizer, teacher, objective, local, tokens, world)
    plain = step(plain_student, plain_optimizer, plain_teacher, objective, whole, tokens, 1)
    summed = torch.tensor([sharded["loss_sum"], sharded["ratio"]], dtype=torch.float64)
    dist.all_reduce(summed)
    kl = torch.stack(list(summed_token_kl(student, teacher, local, VOCAB).values())).double()
    dist.all_reduce(kl)
    plain_kl = torch.stack(list(summed_token_kl(plain_student, plain_teacher, whole, VOCAB).values())).double()
    for module in student.modules():  # the loss outside forward leaves the head's group unsharded until its next use
        if isinstance(module, FSDPModule):
            module.reshard()
    trained = {n: p.full_tensor().detach() for n, p in student.named_parameters()}
    expected = dict(plain_student.named_parameters())
    pushed = dict(student_weights(student))  # what a vLLM engine receives: every tensor whole, on every rank
    pushed_error = max((pushed[n] - t).abs().max().item() for n, t in plain_student.state_dict().items())
    pushed_sharded = (
        any(isinstance(t, DTensor) for t in pushed.values()) or pushed.keys() != plain_student.state_dict().keys()
    )
    # Ranks stop at different lengths (2 and 6 new tokens): a rank that stops must keep joining the others' gathers.
    sampling = GenerationConfig(max_new_tokens=2 + 4 * rank, do_sample=True, pad_token_id=0, eos_token_id=None)
    prompts = (local["input_ids"][:, :PROMPT], local["attention_mask"][:, :PROMPT])
    generated, _ = model_generate(student, sampling, seed=rank)(*prompts)
    plain_generated, _ = model_generate(plain_student, sampling, seed=rank)(*prompts)
    return {
        "loss_sum": [summed[0].item(), plain["loss_sum"]],
        "ratio": [summed[1].item(), plain["ratio"]],
        "kl": [kl.tolist(), plain_kl.tolist()],
        "weight_error": max((trained[n] - expected[n]).abs().max().item() for n in trained),
        "moved": max((expected[n] - start[n]).abs().max().item() for n in start),
        "generated": [generated.tolist(), plain_generated.tolist()],
        "pushed": [pushed_error, pushed_sharded],
    }


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    report = {name: case(name, rank, world) for name in CASES}
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()  # no rank leaves while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
