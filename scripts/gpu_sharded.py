"""One sharded run on one GPU under `accelerate launch`: FSDP2 or DeepSpeed ZeRO-3 at world size 1, bf16, the
0.5B-shaped student of benchmarks/real_scale.py (hidden 896, 4 layers, tied, vocabulary 151,936) and its teacher.

World size 1 still makes the parameters sharded objects (FSDP2 `DTensor`s, ZeRO-3 placeholders), so protege's gather
paths run: the LM head outside the forward, the teacher placed like the student, generation, `save_model`. Prints
`PASS name: figures` (peak GPU memory among them) or `FAIL name: reason`; exit status 1 on failure. Run by
scripts/gpu_check.sh:

    accelerate launch --config_file examples/accelerate/fsdp2.yaml --num_processes 1 scripts/gpu_sharded.py fsdp2
    accelerate launch --config_file examples/accelerate/zero3.yaml --num_processes 1 scripts/gpu_sharded.py zero3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import datasets  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from benchmarks.real_scale import REAL  # noqa: E402
from benchmarks.workers import random_models, word_rows  # noqa: E402
from protege import DistillationConfig, DistillationTrainer  # noqa: E402

GIB = 2**30


def run(engine: str, models: Path, out: Path) -> str:
    """A few steps (on- and off-policy slices), then `save_model` read back; the figures of the run."""
    built = random_models(models, REAL)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(built["tokenizer"])  # AutoTokenizer would rebuild Qwen2's BPE
    texts = word_rows(tokenizer, 16, (12, 200), seed=0)
    rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": c}]} for p, c in texts]
    args = DistillationConfig(
        output_dir=str(out),
        bf16=True,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=1e-5,
        lmbda=0.5,
        max_completion_length=32,
        max_length=256,
        loss_top_k=0,
        loss_chunk_size=None if engine == "zero3" else "auto",  # ZeRO-3 gathers no head outside the forward
        save_strategy="no",
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    trainer = DistillationTrainer(
        model=built["student"],
        teacher_model=built["teacher"],
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    peak, reserved = torch.cuda.max_memory_allocated() / GIB, torch.cuda.max_memory_reserved() / GIB
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses and all(loss == loss for loss in losses), f"losses {losses}"
    trainer.save_model(str(out / "final"))
    trainer.accelerator.wait_for_everyone()
    saved = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)
    count = sum(p.numel() for p in saved.parameters())
    assert count == built["student_params"], f"save_model wrote {count} parameters, not {built['student_params']}"
    return (
        f"{trainer.accelerator.distributed_type}, peak GPU memory {peak:.2f} GiB allocated, {reserved:.2f} GiB "
        f"reserved, losses {[round(x, 4) for x in losses]}, {seconds:.0f} s for {args.max_steps} steps, "
        "save_model read back"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("engine", choices=["fsdp2", "zero3"])
    parser.add_argument("--models", type=Path, default=REPO / "runs" / "gpu_check" / "real_models")
    args = parser.parse_args()
    name = f"{args.engine}-1gpu"
    try:
        print(f"PASS {name}: {run(args.engine, args.models, Path(tempfile.mkdtemp(prefix=f'protege-{name}-')))}")
        return 0
    except Exception as error:  # one line, whatever went wrong
        where = traceback.extract_tb(error.__traceback__)[-1]
        print(f"FAIL {name}: {type(error).__name__}: {error} ({Path(where.filename).name}:{where.lineno})")
        return 1


if __name__ == "__main__":
    sys.exit(main())
