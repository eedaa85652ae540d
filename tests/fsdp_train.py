"""Run by test_fsdp_trainer under torchrun: protege's real trainer on CPU processes, under FSDP2 where asked.

    python -m torch.distributed.run --nproc_per_node N fsdp_train.py STUDENT TEACHER OUT [SETTINGS_JSON]

accelerate builds an FSDP plugin only for accelerator devices: on CPU processes it sets up DDP (MULTI_CPU), and
protege's `sharding.check_engine` then refuses the run. `CpuFsdp2Trainer` is the test-only way round: the accelerator
transformers built from the settings is switched to the FSDP2 plugin those settings describe, so `prepare`, the
teacher's placement, checkpoints and `save_model` all take accelerate's and transformers' FSDP2 paths.

SETTINGS_JSON overrides tiny.config's settings, plus "fsdp" (true: FSDP2), "state_dict_type" (FSDP's), "rows"
(dataset size), "resume" (a checkpoint), "save" (a folder for `save_model`), "specialist" (a second teacher's path:
two teachers, "general" and "specialist", the rows alternating between them) and "every_teacher" (forces the
trainer's stand-in rule on or off, to show what it prevents). Every rank writes OUT/rank{R}.json; rank 0 writes the
full weights to OUT/weights.pt.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from tiny import config, dataset
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from protege import DistillationTrainer
from protege.routing import INDEX_KEY

FSDP2 = dict(
    fsdp=True,
    fsdp_config={
        "fsdp_version": 2,
        "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"],
        "reshard_after_forward": True,
    },
)


class CpuFsdp2Trainer(DistillationTrainer):
    """The trainer with the FSDP2 plugin its settings ask for, forced onto accelerate's state on CPU processes."""

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.is_fsdp_enabled or self.args.fsdp_plugin_args is None:
            return
        state = self.accelerator.state
        state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState sets it on GPUs
        self.is_fsdp_enabled = True

    def compute_loss(self, model: torch.nn.Module, inputs: dict, return_outputs: bool = False, num_items_in_batch=None):
        """The loss as the trainer computes it; each training slice's teachers are noted, to show the routing."""
        if "on_policy" in inputs and INDEX_KEY in inputs:
            self.routed = [*getattr(self, "routed", []), inputs[INDEX_KEY].tolist()]
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight whole, on every rank (a collective: all ranks call it alike)."""
    weights = {}
    for name, value in model.state_dict().items():
        value = value.full_tensor() if isinstance(value, DTensor) else value
        weights[name] = value.detach().to(torch.float32).clone()
    return weights


def main(student: str, teacher: str, out: str, overrides: str = "{}") -> None:
    settings = json.loads(overrides)
    rows, resume, save = settings.pop("rows", 16), settings.pop("resume", None), settings.pop("save", None)
    state_dict_type = settings.pop("state_dict_type", None)
    specialist, every_teacher = settings.pop("specialist", None), settings.pop("every_teacher", None)
    if settings.pop("fsdp", False):
        settings.update(FSDP2)
        if state_dict_type:
            settings["fsdp_config"] = {**settings["fsdp_config"], "state_dict_type": state_dict_type}
    args = config(Path(out), **settings)
    data, teachers = dataset(rows), teacher
    if specialist:
        teachers = {"general": teacher, "specialist": specialist}
        data = data.map(lambda _, i: {"teacher": ("general", "specialist")[i % 2]}, with_indices=True)
    trainer = CpuFsdp2Trainer(model=student, teacher_model=teachers, args=args, train_dataset=data)
    if every_teacher is not None:
        trainer._every_teacher = every_teacher
    trainer.train(resume_from_checkpoint=resume)
    weights = full_weights(trainer.model)
    if save:
        trainer.save_model(save)
    rank = trainer.accelerator.process_index
    report = {
        "rank": rank,
        "world": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "sharded": any(isinstance(p, DTensor) for p in trainer.model.parameters()),
        "teacher_sharded": any(isinstance(p, DTensor) for p in trainer.teacher_model.parameters()),
        "teachers_fsdp": [isinstance(t.model, FSDPModule) for t in trainer.teachers],
        "teachers_whole": [
            [n for n, p in t.model.named_parameters() if not isinstance(p, DTensor)] for t in trainer.teachers
        ],
        "routed": getattr(trainer, "routed", []),
        "loss": [e["loss"] for e in trainer.state.log_history if "loss" in e],
        "fractions": [e["on_policy_fraction"] for e in trainer.state.log_history if "on_policy_fraction" in e],
    }
    if rank == 0:
        torch.save(weights, Path(out, "weights.pt"))
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))  # last: a report means this rank's files are whole
    if torch.distributed.is_initialized():  # close gloo's threads before exit (else, at times: "terminate called")
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
