"""Checkpoints that appear whole or not at all, and `resume_from_checkpoint=True` that only picks whole ones.

transformers writes `checkpoint-N` in place, file by file, and `resume_from_checkpoint=True` takes the highest N: a
process killed during a save leaves a newest `checkpoint-N` that cannot be resumed from. The trainer instead has
transformers write the checkpoint inside a staging folder, `tmp-checkpoint-N/checkpoint-N` (a name that transformers'
discovery and rotation never match: their regex is `^checkpoint-(\\d+)$`, their glob `checkpoint-*`), and renames it
to `checkpoint-N` once every file of every rank is written (`publish`). A rename within one filesystem is atomic, so a
kill at any point leaves either the whole checkpoint or none. `newest_complete` passes over what a kill left behind:
staging folders, and a `checkpoint-N` without `trainer_state.json` (transformers writes it last; such a folder comes
from a save that was not staged). The next save deletes leftover staging folders (`clear_staging`).

A kill cannot undo a rename, but a power loss can: the kernel may write the rename to disk before the files' data.
`publish` therefore flushes every file and folder of the checkpoint to disk first, and the parent folder (the rename)
after, as PyTorch's distributed checkpoint writer does by default.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import warnings

from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

STAGING_PREFIX = "tmp-"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
_STAGING = re.compile(rf"^{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"{PREFIX_CHECKPOINT_DIR}-{step}"


def staging_folder(run_dir: str, step: int) -> str:
    """Where the checkpoint of `step` is written before it is published as `run_dir/checkpoint-{step}`."""
    return os.path.join(run_dir, STAGING_PREFIX + checkpoint_name(step))


def clear_staging(run_dir: str) -> None:
    """Delete the staging folders under `run_dir`: a save runs one at a time, so any there is a killed save's."""
    for name in os.listdir(run_dir) if os.path.isdir(run_dir) else []:
        if _STAGING.match(name):
            shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)


def publish(written: str, final: str) -> None:
    """Give the complete checkpoint `written` (inside its staging folder) its name `final`, in one rename.

    A `final` already there (an earlier run's in the same output folder) is first moved into the staging folder, which
    is then deleted with it: a kill between the two renames leaves neither name, so resume falls back to the previous
    checkpoint rather than to a mixture.
    """
    staging = os.path.dirname(written)
    if not os.path.isdir(written):
        return  # another process that saves on a shared filesystem published it already
    sync_tree(written)
    if os.path.lexists(final):
        os.rename(final, os.path.join(staging, "replaced"))
    os.rename(written, final)
    sync_path(os.path.dirname(final))
    shutil.rmtree(staging, ignore_errors=True)


def sync_tree(folder: str) -> None:
    """Flush the data of every file under `folder`, then every folder's entries, to disk."""
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            sync_path(os.path.join(root, name))
        sync_path(root)


def sync_path(path: str) -> None:
    """fsync a file (its data) or a folder (its entries: names created, renamed, deleted), where the platform and the
    filesystem can: not on Windows, whose fsync needs a writable handle and cannot open folders, and not where the
    filesystem refuses (EINVAL, ENOTSUP: some network and FUSE filesystems), whose writes are then as durable as it
    allows."""
    if os.name == "nt":
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(descriptor)


def is_complete(folder: str) -> bool:
    """Whether the save of `folder` finished: transformers writes the trainer state last."""
    return os.path.isfile(os.path.join(folder, TRAINER_STATE_NAME))


def newest_complete(output_dir: str) -> str | None:
    """The `checkpoint-N` with the highest N that a save finished, warning with the names of incomplete ones."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    steps, incomplete = {}, []
    for name in names:
        path = os.path.join(output_dir, name)
        if not os.path.isdir(path):
            continue
        if _STAGING.match(name):
            incomplete.append(name)
        elif (match := _CHECKPOINT.match(name)) is not None:
            if is_complete(path):
                steps[int(match.group(1))] = path
            else:
                incomplete.append(name)
    newest = steps[max(steps)] if steps else None
    if incomplete:
        warnings.warn(
            f"resume_from_checkpoint=True: skipping incomplete checkpoint folders in {output_dir} (a save that did not "
            f"finish, e.g. a killed process): {', '.join(sorted(incomplete))}; resuming from "
            f"{os.path.basename(newest) if newest else 'none'}. They can be deleted.",
            UserWarning,
            stacklevel=3,
        )
    return newest


class StagedCheckpoints:
    """transformers' `Trainer` checkpointing, staged and published as this module describes: mixed into a `Trainer`
    subclass before `Trainer`, it overrides the three methods through which transformers writes a checkpoint."""

    _staging_dir: str | None = None  # set while a checkpoint is written (see _save_checkpoint)
    _push_pending = False

    def _save_checkpoint(self, model, trial) -> None:
        """transformers' save, with its `run_dir` pointed at a staging folder, then published under its real name.

        Only the processes that save (`should_save`: the main one, or each node's with `save_on_each_node`) delete,
        rename and rotate; the barriers keep every rank's files (RNG states, shards) inside the staging folder before
        the rename, and every rank behind it afterwards.
        """
        run_dir = self._get_output_dir(trial)
        staging = staging_folder(run_dir, self.state.global_step)
        name = checkpoint_name(self.state.global_step)
        written, final = os.path.join(staging, name), os.path.join(run_dir, name)
        if self.args.should_save:
            clear_staging(run_dir)
        self.accelerator.wait_for_everyone()
        self._staging_dir, self._push_pending = staging, False
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        if self.state.best_model_checkpoint == written:  # this step is the best: transformers saw it while staged
            self.state.best_model_checkpoint = final
            if self.args.should_save:
                self.state.save_to_json(os.path.join(written, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish(written, final)
            # transformers' rotation ran inside the staging folder, where there is nothing to rotate; now for real
            rotate_checkpoints(run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()
        if self._push_pending:
            self._push_pending = False
            super()._push_from_checkpoint(final)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """transformers' `save_model`, which under FSDP writes weights only for a FULL_STATE_DICT plugin: with a
        sharded one it writes nothing and says nothing. Under DeepSpeed ZeRO-3 without
        `stage3_gather_16bit_weights_on_model_save` it writes DeepSpeed's partitioned checkpoint instead, which
        `from_pretrained` cannot load. Asked by the user (not from inside a checkpoint, whose shards accelerate or
        DeepSpeed write for resuming), the weights are then gathered whole (a collective: every rank calls this) and
        saved as a Hugging Face folder, as with any other engine."""
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if not _internal_call and plugin is not None and "FULL_STATE_DICT" not in str(plugin.state_dict_type):
            self._save(output_dir, state_dict=self.accelerator.get_state_dict(self.model))
        elif not _internal_call and _zero3_without_gathered_save(self.model_wrapped):
            # DeepSpeed's own layer-by-layer gather (tied weights kept tied), as that setting would have run it
            self._save(output_dir, state_dict=self.model_wrapped._zero3_consolidated_16bit_state_dict())
            if self.args.push_to_hub:
                self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)
            return
        super().save_model(output_dir, _internal_call)

    def _get_output_dir(self, trial) -> str:
        """The staging folder while transformers writes a checkpoint (its `checkpoint-N` goes inside), else its own."""
        return self._staging_dir if self._staging_dir is not None else super()._get_output_dir(trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        """Uploads run in the background: one from the staging folder would lose its files to the rename."""
        if self._staging_dir is not None:
            self._push_pending = True
            return
        super()._push_from_checkpoint(checkpoint_folder)


def _zero3_without_gathered_save(engine) -> bool:
    """Whether `engine` is a DeepSpeed ZeRO-3 engine whose `save_model` would not write whole weights."""
    partitioned = getattr(engine, "zero_optimization_partition_weights", None)
    return partitioned is not None and partitioned() and not engine.zero_gather_16bit_weights_on_model_save()
