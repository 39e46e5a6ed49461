"""Orbax checkpoints of the train state: asynchronous, atomic, kept K deep, restorable onto any mesh.

Each checkpoint has two items: "state" (the TrainState; its step is also the data position) and
"meta" (JSON: the model config, to refuse restoring into a different model).
"""
import jax
import orbax.checkpoint as ocp


def make_checkpoint_manager(directory, checkpoint_config) -> ocp.CheckpointManager:
    """Keeps the last `checkpoint_config.keep` checkpoints; the loop decides when to save.

    Orbax writes each checkpoint into a temporary directory and renames it when complete, so an
    interrupted save is never listed or restored.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=checkpoint_config.keep,
        enable_async_checkpointing=checkpoint_config.asynchronous, create=True)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def save(manager: ocp.CheckpointManager, state, meta: dict) -> None:
    """Starts a (possibly asynchronous) save at the state's step."""
    step = int(jax.device_get(state.step))
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)), force=True)


def abstract_like(state, state_sharding):
    """Shape/dtype/sharding placeholders to restore into: the current mesh decides the layout."""
    return jax.tree.map(lambda leaf, target: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=target),
                        state, state_sharding)


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
    return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]


def restore(manager: ocp.CheckpointManager, abstract_state, model_meta: dict, step: int | None = None):
    """Restores the latest (or given) step into `abstract_state`'s shardings.

    Raises ValueError naming the differing fields when the checkpoint was written for another model
    (fields in EXECUTION_FIELDS may differ).
    """
    step = manager.latest_step() if step is None else step
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    written, expected = _architecture(meta["model"]), _architecture(model_meta["model"])
    if written != expected:
        raise ValueError(f"checkpoint {manager.directory}/{step} was written for another model "
                         f"({describe_mismatch(expected, written)}); use a fresh --workdir "
                         "or config.init_from for fine-tuning")
    return load_state(manager, step, abstract_state)
