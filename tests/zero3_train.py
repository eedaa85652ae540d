"""Run by test_zero3_trainer under torchrun: protege's real trainer on CPU processes, under DeepSpeed ZeRO-3 if asked.

    python -m torch.distributed.run --nproc_per_node N zero3_train.py STUDENT TEACHER OUT [SETTINGS_JSON]

protege sets use_cpu=True for a multi-process launch without CUDA, and accelerate enables DeepSpeed only when not
use_cpu, so the trainer would get DDP (MULTI_CPU) and `sharding.check_engine` would refuse the run. `CpuZero3Trainer`
is the test-only way round, as tests/fsdp_train.py's `CpuFsdp2Trainer` is for FSDP2: the accelerator transformers
built is switched to the DeepSpeed plugin the settings describe, so `prepare` (`deepspeed.initialize`), the
teacher's placement and DeepSpeed's backward and step are the real ones. DeepSpeed's process group is set up over gloo
before anything loads, so that transformers' `zero.Init` partitions both models across the ranks as they load.

SETTINGS_JSON overrides tiny.config's settings, plus "zero3" (true: ZeRO-3), "gather16" (DeepSpeed's
`stage3_gather_16bit_weights_on_model_save`), "rows" (dataset size), "resume" (a checkpoint) and "save" (a folder for
`save_model`). Every rank writes OUT/rank{R}.json; rank 0 writes the full weights to OUT/weights.pt.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType
from tiny import config, dataset
from transformers import GenerationConfig, TrainerCallback

from protege import DistillationTrainer
from protege.rollout import model_generate
from protege.vllm_colocate import student_weights

ZERO3 = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # every parameter partitioned
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "zero_allow_untested_optimizer": True,  # the trainer's torch SGD: DeepSpeed's own optimizers need compiled ops
}


class CpuZero3Trainer(DistillationTrainer):
    """The trainer with the DeepSpeed plugin its settings ask for, forced onto accelerate's state on CPU processes."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        plugin = self.args.deepspeed_plugin
        if self.is_deepspeed_enabled or plugin is None:
            return
        state = self.accelerator.state
        plugin.set_mixed_precision(state.mixed_precision)
        plugin.select(_from_accelerator_state=True)
        state.deepspeed_plugins = plugin
        state.distributed_type = DistributedType.DEEPSPEED
        PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED  # as AcceleratorState sets it
        self.is_deepspeed_enabled = True


class Steps(TrainerCallback):
    """Counts the optimizer steps this process ran: a resumed run runs only those after its checkpoint."""

    ran = 0

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.ran += 1


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight whole, on every rank (a collective under ZeRO-3: all ranks call it alike)."""
    parameters = [p for p in model.parameters() if hasattr(p, "ds_id")]
    gathered = contextlib.nullcontext()
    if parameters:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(parameters)
    with gathered:
        return {name: value.detach().to(torch.float32).clone() for name, value in model.state_dict().items()}


def uneven_generation(model: torch.nn.Module, weights: dict[str, torch.Tensor], rank: int) -> list[list[list[int]]]:
    """Tokens sampled by `model` with protege's `model_generate`, rank r stopping after 2 + 4 r new tokens (under
    ZeRO-3 a rank that stops must keep joining the others' gathers), and by a plain copy holding `weights`."""
    sampling = GenerationConfig(max_new_tokens=2 + 4 * rank, do_sample=True, pad_token_id=0, eos_token_id=None)
    prompt = torch.arange(3, 8).expand(2, 5)
    plain = type(model)(model.config)  # the constructor, unlike from_pretrained, does not partition under zero.Init
    plain.load_state_dict(weights)
    return [model_generate(m, sampling, seed=rank)(prompt, torch.ones_like(prompt))[0].tolist() for m in (model, plain)]


def tied_copy(student: str, folder: Path) -> str:
    """`student` with `tie_word_embeddings`: its embedding serves as the LM head too (each rank writes its own copy,
    the same on all)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = folder / f"rank{os.environ.get('RANK', '0')}"
    config = AutoConfig.from_pretrained(student, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_pretrained(student, config=config)
    model.tie_weights()
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(student).save_pretrained(folder)
    return str(folder)


def main(student: str, teacher: str, out: str, overrides: str = "{}") -> None:
    settings = json.loads(overrides)
    rows, resume, save = settings.pop("rows", 16), settings.pop("resume", None), settings.pop("save", None)
    gather16 = settings.pop("gather16", False)
    if settings.pop("tied", False):  # the student with its LM head tied to its embedding (the head gathered is both)
        student = tied_copy(student, Path(out, "tied_student"))
    if settings.pop("zero3", False):
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        zero = {**ZERO3["zero_optimization"], "stage3_gather_16bit_weights_on_model_save": gather16}
        settings["deepspeed"] = {**ZERO3, "zero_optimization": zero}
    args = config(Path(out), **settings)
    trainer = CpuZero3Trainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset(rows))
    steps = Steps()
    trainer.add_callback(steps)
    trainer.train(resume_from_checkpoint=resume)
    weights = full_weights(trainer.model)
    if save:
        trainer.save_model(save)
    generated = uneven_generation(trainer.model, weights, trainer.accelerator.process_index)
    pushed = dict(student_weights(trainer.model))  # what a vLLM engine receives, gathered one tensor at a time
    pushed_error = max((pushed[name].float() - value).abs().max().item() for name, value in weights.items())
    rank = trainer.accelerator.process_index
    report = {
        "rank": rank,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "partitioned": all(hasattr(p, "ds_id") for p in trainer.model.parameters()),
        "teacher_partitioned": all(hasattr(p, "ds_id") for p in trainer.teacher_model.parameters()),
        "steps_run": steps.ran,
        "generated": generated,
        "pushed": [pushed_error, sorted(pushed) == sorted(weights)],
        "loss": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "fractions": [e["on_policy_fraction"] for e in trainer.state.log_history if "on_policy_fraction" in e],
    }
    if rank == 0:
        torch.save(weights, Path(out, "weights.pt"))
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))  # last: a report means this rank's files are whole
    if torch.distributed.is_initialized():  # an orderly end: no rank leaves while another still talks to it
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
