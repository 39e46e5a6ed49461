"""Orbax checkpoints of the train state: asynchronous, atomic, kept K deep, restorable onto any mesh.

Each checkpoint has two items: "state" (the TrainState) and "meta" (JSON: the model config, to
refuse restoring into a different model, and where the data stream stands, train.resume).

Faults: a save that fails in the background is reported at the first step after it failed (the loop
polls `check_save`), its partial temporary directory removed; a checkpoint that no longer restores
(truncated or garbled files) is set aside under another name and the one before it restored.
"""
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from shunted_jax.train.console import RunError, short_cause


class CheckpointMismatchError(RunError, ValueError):
    """The checkpoint was written for another model: restoring an older one would not help."""


class NoCheckpointError(RunError):
    """There is no checkpoint to restore, or none of them restores."""


class CheckpointSaveError(RunError):
    """A save failed (full disk, read-only or vanished directory); the run stops at it."""


# Orbax's replica-parallel save has each replica of a replicated array write a slice of it, and
# each slice shape is a program compiled on first use (tens of ms on a CPU host, a few hundred for
# a model's parameters and optimizer state). A slice smaller than this is written whole by one
# replica instead: splitting it would cost more in compiling than it saves in writing.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    """The train state's handler: orbax's standard types, replica-parallel only for large slices
    (orbax's choice of platform otherwise: on for CPUs and TPUs, off for GPUs)."""
    scalars = ocp.type_handlers.ScalarHandler()
    arrays = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES)
    registry = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, arrays), (np.ndarray, ocp.type_handlers.NumpyHandler()),
        (int, scalars), (float, scalars), (np.number, scalars))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def make_checkpoint_manager(directory, checkpoint_config, read_only: bool = False) -> ocp.CheckpointManager:
    """Keeps the last `checkpoint_config.keep` checkpoints; the loop decides when to save.

    Orbax writes each checkpoint into a temporary directory and renames it when complete, so an
    interrupted save is never listed or restored. `read_only` (evaluation) creates and writes nothing.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=checkpoint_config.keep, read_only=read_only,
        enable_async_checkpointing=checkpoint_config.asynchronous, create=not read_only)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"),
                                 item_handlers={"state": _state_handler(), "meta": ocp.JsonCheckpointHandler()})


def save(manager: ocp.CheckpointManager, state, meta: dict) -> int:
    """Starts a (possibly asynchronous) save at the state's step; returns that step for `check_save`.

    Orbax waits for the previous save before starting one; waiting here first names the right step
    if that one failed.
    """
    wait_for_saves(manager)
    step = int(jax.device_get(state.step))
    try:
        manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                   meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as error:  # noqa: BLE001 - any failure of the storage stops the run the same way
        raise _save_failed(manager, step, error) from None
    return step


def check_save(manager: ocp.CheckpointManager, step: int | None) -> int | None:
    """Polled every step while the save of `step` runs: None once it has finished, CheckpointSaveError
    if it failed. Waiting only once orbax says the save is over keeps saves asynchronous."""
    if step is None or manager.is_saving_in_progress():
        return step
    wait_for_saves(manager)
    return None


def wait_for_saves(manager: ocp.CheckpointManager) -> None:
    """Blocks until the save in flight (if any) is complete; CheckpointSaveError if it failed."""
    in_flight = manager.latest_step()
    try:
        manager.wait_until_finished()
    except Exception as error:  # noqa: BLE001
        raise _save_failed(manager, in_flight, error) from None


def _save_failed(manager: ocp.CheckpointManager, step: int | None, error: Exception) -> CheckpointSaveError:
    """Removes the failed save's temporary directories (never a complete-looking step) and says what failed."""
    directory = pathlib.Path(manager.directory)
    if jax.process_index() == 0 and directory.is_dir():
        for partial in filter(ocp.utils.is_tmp_checkpoint, directory.iterdir()):
            shutil.rmtree(partial, ignore_errors=True)
    latest = max(all_steps_on_disk(directory), default=None)
    resume = f"step {latest}" if latest is not None else "the start"
    return CheckpointSaveError(f"saving checkpoint step {step} to {directory / str(step)} failed: "
                               f"{short_cause(error)}. Fix the storage and rerun: it resumes from {resume}")


def all_steps_on_disk(directory: pathlib.Path) -> list[int]:
    """The complete steps in a checkpoint directory (names that are a step number)."""
    if not directory.is_dir():
        return []
    return sorted(int(path.name) for path in directory.iterdir() if path.name.isdigit())


def describe_mismatch(expected: dict, found: dict) -> str:
    """The differing fields of two flat config dicts, as 'field: found != expected'."""
    keys = sorted(set(expected) | set(found))
    return ", ".join(f"{key}: {found.get(key)!r} != {expected.get(key)!r}"
                     for key in keys if expected.get(key) != found.get(key))


# Model fields that change how the model computes, not its parameters: a run may resume with others.
# `attention_impl` and `depthwise_impl`, which `kernels` replaced, are in checkpoints written before.
EXECUTION_FIELDS = ("dtype", "kernels", "attention_impl", "depthwise_impl", "scan_unroll", "stem_space_to_depth")


def _architecture(model_fields: dict) -> dict:
    return {key: value for key, value in model_fields.items() if key not in EXECUTION_FIELDS}


def load_state(manager: ocp.CheckpointManager, step: int | None = None, target=None):
    """The train state saved at `step` (the latest by default): the one way a checkpoint is read.

    Into `target`'s shapes, dtypes and shardings when given (the loop's abstract state on its mesh),
    else as saved, a dict of arrays on the first local device whatever mesh wrote it (for tools).
    """
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    if target is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        layout = manager.item_metadata(step)["state"]
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), layout)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    return manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(target, restore_args=restore_args)))["state"]


def load_meta(manager: ocp.CheckpointManager, step: int) -> dict:
    """The JSON saved beside the state of `step` (`save`'s meta)."""
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore(manager: ocp.CheckpointManager, abstract_state, model_meta: dict, step: int | None = None):
    """Restores the latest (or given) step into `abstract_state`'s shardings.

    Raises CheckpointMismatchError naming the differing fields when the checkpoint was written for
    another model (fields in EXECUTION_FIELDS may differ).
    """
    step = manager.latest_step() if step is None else step
    meta = load_meta(manager, step)
    written, expected = _architecture(meta["model"]), _architecture(model_meta["model"])
    if written != expected:
        raise CheckpointMismatchError(
            f"checkpoint {manager.directory}/{step} was written for another model "
            f"({describe_mismatch(expected, written)}); use a fresh --workdir or config.init_from for fine-tuning")
    return load_state(manager, step, abstract_state)


def restore_newest(manager: ocp.CheckpointManager, abstract_state, model_meta: dict, set_aside: bool):
    """Restores the newest step that restores, or returns None when there is no checkpoint.

    A step that fails to restore (truncated or garbled files) is logged in one line and, with
    `set_aside` (training), renamed "<step>.damaged-<n>" so that it is kept but never listed again;
    evaluation (`set_aside=False`) only skips it, as it may run on read-only storage. A checkpoint
    of another model stops here: an older one was written for the same other model.
    """
    failures = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return restore(manager, abstract_state, model_meta, step)
        except CheckpointMismatchError:
            raise
        except Exception as error:  # noqa: BLE001 - whatever broke the files, the step before may be whole
            cause = short_cause(error)
            failures.append(f"step {step} ({cause})")
        kept = f"; kept aside as {_set_aside(manager, step)}" if set_aside else ""
        logging.warning("checkpoint step %d in %s cannot be restored: %s%s; trying the step before",
                        step, manager.directory, cause, kept)
    if failures:
        raise NoCheckpointError(
            f"no checkpoint in {manager.directory} restores; tried {'; '.join(failures)}. "
            + ("They are kept aside as <step>.damaged-<n>: rerun to start from scratch, or use another --workdir"
               if set_aside else "Nothing to evaluate"))
    return None


def _set_aside(manager: ocp.CheckpointManager, step: int) -> pathlib.Path:
    """Renames a step's directory to the first free "<step>.damaged-<n>" (never deletes it). Orbax
    has no call that moves a step; `CheckpointManager.reload` is its way to see the directory
    changed by others."""
    directory = pathlib.Path(manager.directory)
    target = next(directory / f"{step}.damaged-{n}" for n in range(1, 10_000)
                  if not (directory / f"{step}.damaged-{n}").exists())
    if jax.process_index() == 0:
        (directory / str(step)).rename(target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
    manager.reload()
    if step in manager.all_steps():
        raise RuntimeError(f"orbax still lists checkpoint step {step} after renaming it to {target}")
    return target
