"""Memory per rank of the student side of one step, 2 processes: DDP against FSDP2 (CPU, gloo, the same command).

    python -m benchmarks sharded_memory            # vocabulary 151,936, 2 rows x 1,000 completion tokens a rank
    python -m benchmarks sharded_memory --quick    # smoke run: vocabulary 8000, hidden 64, 64 tokens

Why: a student past one device's memory needs its weights, gradients and AdamW moments split over the ranks; this
shows what FSDP2 leaves on each rank next to DDP, with protege's chunked loss reading the LM head outside the forward
(`sharding.whole_head` unshards it for the loss, so each rank holds one full head while the loss runs).

The student is `real_scale`'s 0.5B-shaped Qwen2 (hidden 896, 14 heads, 2 key-value, intermediate 4864, tied
embeddings, vocabulary 151,936) with `--layers` (4) decoder layers, not Qwen2-0.5B's 24: 24 layers under DDP would
need about 10 GiB a rank, more than two ranks have beside other work on a 24 GiB machine. Each engine runs in its own
`torchrun --nproc_per_node 2` (`--worker`), one thread a rank. On every rank: the student is built on the meta
device, wrapped (DDP; or `fully_shard` on each decoder layer and then on the root with `reshard_after_forward=True`,
as accelerate shards), materialised on the CPU and initialised, so no rank ever holds an unsharded copy it would not
hold in training. Then one AdamW step of protege's objective (`Objective`, full-vocabulary generalized JSD, beta 0.5,
`--chunk-size` tokens a chunk, "auto" by default) through `student_output`, on the rank's own 2 rows of 16 prompt and
1,000 completion tokens, against a teacher's random last hidden states (hidden 1536) and LM head: the teacher side is
an input, the same on every rank and under both engines.

Measured per rank after the step: `state` = bytes of the parameters, gradients and optimizer states the rank holds
(the local shard of each `DTensor`, exact); `peak RSS` = `ru_maxrss`, the whole process; `base` = `ru_maxrss` just
before the student is built (imports, the teacher's inputs, the batch), so `peak - base` is the student side.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import time
from collections.abc import Iterable
from typing import Any

from benchmarks import (
    Column,
    Report,
    emit_result,
    failure,
    free_port,
    module_command,
    parse,
    parser,
    setting,
    spawn,
    worker_env,
)
from benchmarks.workers import qwen2

MIB = 2**20
ENGINES = ("ddp", "fsdp2")
TEACHER_HIDDEN = 1536


@dataclasses.dataclass(kw_only=True)
class Case:
    """One engine's run, as every rank of its torchrun reads it from the command line."""

    engine: str = setting(help="ddp or fsdp2")
    vocab: int = setting(151_936)
    hidden: int = setting(896)
    layers: int = setting(4)
    heads: int = setting(14)
    kv_heads: int = setting(2)
    intermediate: int = setting(4864)
    teacher_hidden: int = setting(TEACHER_HIDDEN)
    rows: int = setting(2, "rows a rank")
    prompt: int = setting(16)
    completion: int = setting(1000)
    chunk_size: str = setting("auto", "tokens a chunk of the loss, or auto")
    seed: int = setting(0)


# ---------------------------------------------------------------------------------------------------------------------
# What a rank holds
# ---------------------------------------------------------------------------------------------------------------------


def local_bytes(tensor: Any) -> int:
    """Bytes of the part of `tensor` this rank stores: a `DTensor`'s local shard, a plain tensor whole."""
    if tensor is None:
        return 0
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
    return local.numel() * local.element_size()


def held_bytes(parameters: Iterable[Any], optimizer_state: Iterable[dict]) -> dict[str, int]:
    """Bytes of parameters, gradients and optimizer states (every tensor in each parameter's state) on this rank."""
    parameters = list(parameters)
    states = [value for state in optimizer_state for value in state.values() if hasattr(value, "element_size")]
    held = {
        "parameters": sum(local_bytes(p) for p in parameters),
        "gradients": sum(local_bytes(p.grad) for p in parameters),
        "optimizer": sum(local_bytes(s) for s in states),
    }
    return held | {"state": sum(held.values())}


# ---------------------------------------------------------------------------------------------------------------------
# Worker: one rank of one engine's torchrun
# ---------------------------------------------------------------------------------------------------------------------


def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def rank_inputs(case: Case, rank: int) -> tuple[dict, Any]:
    """This rank's batch (its own rows) and the teacher's hidden view of it (random, as a teacher's would be)."""
    import torch

    from protege.losses import IGNORE_INDEX
    from protege.outputs import TeacherHidden

    generator = torch.Generator().manual_seed(case.seed + rank)
    width = case.prompt + case.completion
    ids = torch.randint(0, case.vocab, (case.rows, width), generator=generator)
    labels = ids.clone()
    labels[:, : case.prompt] = IGNORE_INDEX
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "position_ids": torch.arange(width).expand_as(ids),
        "labels": labels,
        "prompt_width": torch.tensor(case.prompt),
    }
    hidden = torch.randn(case.rows, case.completion, case.teacher_hidden, generator=generator)
    head = torch.randn(case.vocab, case.teacher_hidden, generator=generator).mul_(case.teacher_hidden**-0.5)
    return batch, TeacherHidden(hidden, head, None)


def build_student(case: Case) -> Any:
    """The student wrapped by `case.engine`, built on the meta device and materialised only after wrapping."""
    import torch
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel
    from transformers import AutoModelForCausalLM, Qwen2Config

    shape = qwen2(case.hidden, case.layers, case.heads, case.kv_heads, case.intermediate, tied=True)
    config = Qwen2Config(vocab_size=case.vocab, max_position_embeddings=4096, **shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if case.engine == "fsdp2":
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model, reshard_after_forward=True)
    model.to_empty(device="cpu")
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        model.tie_weights()  # to_empty gives each module its own tensor where a meta parameter is not shared by FSDP
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("the tied LM head came apart while materialising")
    initialise(model, case.seed)
    return DistributedDataParallel(model) if case.engine == "ddp" else model


def initialise(model: Any, seed: int) -> None:
    """Weights as a fresh model's (normal 0.02, norms 1), written into each rank's local shard; the rotary buffers,
    which `to_empty` left unset, recomputed."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            local = parameter.to_local() if hasattr(parameter, "to_local") else parameter
            if "norm" in name:
                local.fill_(1.0)
            else:
                local.normal_(0.0, 0.02)
        rotary = model.model.rotary_emb
        inv_freq, _ = rotary.compute_default_rope_parameters(rotary.config)
        rotary.inv_freq.copy_(inv_freq)
        rotary.original_inv_freq.copy_(inv_freq)


def run_rank(case: Case) -> dict[str, Any]:
    """One AdamW step of the chunked objective on this rank's rows; what the rank held and its peak."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from protege.objective import Objective, student_output

    rank, world = dist.get_rank(), dist.get_world_size()
    batch, teacher = rank_inputs(case, rank)
    base = maxrss()
    started = time.perf_counter()
    student = build_student(case)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)
    chunk_size = case.chunk_size if case.chunk_size == "auto" else int(case.chunk_size)
    objective = Objective(beta=0.5, top_k=0, chunk_size=chunk_size)
    labels = batch["labels"][:, case.prompt :]
    tokens = torch.tensor(float(labels.ne(-100).sum()))
    dist.all_reduce(tokens)
    loss_sum = objective.loss_sum(student_output(student, batch, "hidden", case.vocab), teacher, labels)
    (loss_sum / tokens * world).backward()  # both engines average gradients over the ranks
    optimizer.step()
    seconds = time.perf_counter() - started
    for module in student.modules():  # what the rank keeps between steps, not a group left unsharded
        if isinstance(module, FSDPModule):
            module.reshard()
    held = held_bytes(student.parameters(), optimizer.state.values())
    total = torch.tensor(loss_sum.item(), dtype=torch.float64)
    dist.all_reduce(total)
    return {
        "rank": rank,
        **held,
        "parameter_count": sum(p.numel() for p in student.parameters()),  # a DTensor's numel is the whole one's
        "base": base,
        "peak_rss": maxrss(),
        "seconds": seconds,
        "loss": total.item() / tokens.item(),
    }


def worker(case: Case) -> None:
    """A rank: run it, gather every rank's figures on rank 0, which prints them as the result."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    figures = run_rank(case)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, figures)
    if dist.get_rank() == 0:
        emit_result({"ranks": gathered})
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------------------
# Parent: one torchrun per engine, the tables
# ---------------------------------------------------------------------------------------------------------------------


def mib(key: str) -> Column:
    return Column(f"{key.replace('_', ' ')} MiB", lambda row: row.get(key) and row[key] / MIB, "{:,.0f}")


TABLES = {
    "ranks": [
        Column("engine", "engine", text=True),
        Column("rank", "rank"),
        mib("parameters"),
        mib("gradients"),
        mib("optimizer"),
        mib("state"),
        mib("base"),
        mib("peak_rss"),
        Column("peak - base MiB", lambda r: r.get("peak_rss") and (r["peak_rss"] - r["base"]) / MIB, "{:,.0f}"),
        Column("step s", "seconds", "{:.1f}"),
        Column("loss", "loss", "{:.6g}"),
        Column("error", "error", text=True, missing=""),
    ],
    "share": [
        Column("per rank", "figure", text=True),
        Column("DDP MiB", "ddp", "{:,.0f}"),
        Column("FSDP2 MiB", "fsdp2", "{:,.0f}"),
        Column("FSDP2 / DDP", "ratio", "{:.3f}"),
    ],
}


def share(rows: list[dict]) -> list[dict]:
    """The largest rank's state, peak RSS and peak - base under each engine, and FSDP2's fraction of DDP's."""
    figures = {
        "state (parameters + gradients + AdamW)": lambda r: r["state"],
        "peak RSS": lambda r: r["peak_rss"],
        "peak RSS - base (student side)": lambda r: r["peak_rss"] - r["base"],
    }
    out = []
    for figure, value in figures.items():
        largest = {e: max((value(r) for r in rows if r["engine"] == e and "state" in r), default=None) for e in ENGINES}
        if None in largest.values():
            continue
        mibs = {engine: largest[engine] / MIB for engine in ENGINES}
        out.append({"figure": figure, **mibs, "ratio": largest["fsdp2"] / largest["ddp"]})
    return out


def run_engine(case: Case) -> list[dict]:
    """One engine's torchrun of 2 ranks: a row per rank, or one row saying why it failed."""
    command = module_command(
        sys.executable,
        "torch.distributed.run",
        *("--nproc_per_node", 2, "--master_addr", "127.0.0.1", "--master_port", free_port()),
        *("-m", "benchmarks.sharded_memory", "--worker"),
        case,
    )
    print(f"{case.engine}: {' '.join(command[1:])}", flush=True)
    done = spawn(command, env=worker_env(OMP_NUM_THREADS="1"))
    if done.result is None:
        errors = [line for line in done.stderr.splitlines() if line.startswith("[rank") and "Error" in line]
        return [{"engine": case.engine, "error": errors[-1][:200] if errors else failure(done)}]
    return [{"engine": case.engine, **figures} for figures in done.result["ranks"]]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser("sharded_memory", __doc__, quick="vocabulary 8000, hidden 64, 2 layers, 64 completion tokens")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of the 0.5B-shaped student")
    p.add_argument("--completion", type=int, default=1000, help="completion tokens a row (2 rows a rank)")
    p.add_argument("--chunk-size", default="auto", help="tokens a chunk of the loss, or auto")
    p.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    return p.parse_args(argv)


def cases(args: argparse.Namespace) -> list[Case]:
    """The engines' runs, alike but for the engine."""
    shape: dict[str, Any] = {"layers": args.layers, "completion": args.completion, "chunk_size": args.chunk_size}
    if args.quick:
        shape |= {"vocab": 8000, "hidden": 64, "layers": 2, "heads": 4, "intermediate": 256, "teacher_hidden": 128}
        shape |= {"completion": 64}
    return [Case(engine=engine, **shape) for engine in args.engines]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--worker"]:
        worker(parse(Case, argv[1:]))
        return 0
    args = parse_args(argv)
    rows = [row for case in cases(args) for row in run_engine(case)]
    report = Report("sharded_memory", args)
    print("\n" + report.table("ranks", rows, TABLES))
    print("\n" + report.table("share", share(rows), TABLES))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
