"""What a resumed run continues: the config its workdir was trained with, and where its data stood.

The config of a training run is kept as `WORKDIR/config.json`. A resume whose config differs in a
field that changes the trajectory (anything but `FREE_FIELDS`) is refused, naming each field, its
recorded and its new value; with `config.allow_config_change` it goes on, and the change is
recorded in config.json and, as a "config_change" record, in metrics.jsonl. The model's fields are
the checkpoint's own concern (it refuses another model, `checkpoint.restore`).

Each checkpoint also records where the data stream stands (`data.StreamPosition`), so that a run
resumed with another batch size continues with the next unseen example, not with the example its
step number would give.
"""
import dataclasses
import json
import os
import pathlib
import tempfile

import jax
from absl import logging

from shunted_jax import data
from shunted_jax.train import checkpoint
from shunted_jax.train.console import RunError

RECORD_NAME = "config.json"
CHANGE_KIND = "config_change"  # the kind of metrics.jsonl's record of an allowed change
STREAM_KEY = "stream"  # the checkpoint meta's data position
# Fields not compared, each with everything under it: the model's, which the checkpoint compares
# itself, and those that change how a run is carried out, observed or stored, not what it computes.
FREE_FIELDS = ("model", "evals", "eval_batch_size", "log_every_steps", "checkpoint", "compilation_cache_dir",
               "prefetch_to_device", "mesh", "distributed", "compiler_options", "init_from", "allow_config_change",
               "data.data_dir", "data.manual_dir", "data.prefetch", "data.num_parallel_calls",
               "data.num_eval_examples", "data.on_corrupt")


class ConfigChangeError(RunError):
    """The workdir's run was trained with other values of fields that change its trajectory."""


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def as_record(config) -> dict:
    """The config as JSON values (tuples become lists), as config.json holds it."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def trajectory_changes(recorded: dict, config) -> dict:
    """{dotted field: (recorded value, new value)} of the fields outside FREE_FIELDS that both
    have and that differ (a field added to the configs since the record was written is not compared)."""
    old, new = _flat(recorded), _flat(as_record(config))
    free = tuple(f"{field}." for field in FREE_FIELDS)
    return {field: (old[field], new[field]) for field in sorted(old.keys() & new.keys())
            if old[field] != new[field] and field not in FREE_FIELDS and not field.startswith(free)}


def _listed(changes: dict) -> str:
    return ", ".join(f"config.{field} {old!r} -> {new!r}" for field, (old, new) in changes.items())


def check_config(workdir: pathlib.Path, config) -> dict:
    """Before anything is built: the trajectory changes against the config the workdir's
    checkpoints were trained with (none for a fresh workdir, or one without a record); raises
    ConfigChangeError unless `config.allow_config_change`."""
    path = workdir / RECORD_NAME
    if not checkpoint.all_steps_on_disk(workdir / "checkpoints") or not path.is_file():
        return {}
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise ConfigChangeError(f"{path} is not a readable config record ({error}): restore it, or delete it to "
                                "resume without comparing configs (the run records its config again)") from error
    changes = trajectory_changes(recorded, config)
    if changes and not config.allow_config_change:
        raise ConfigChangeError(
            f"--workdir {workdir} was trained with another config: {_listed(changes)}. Resume with the values recorded in "
            f"{path}, or give this run another --workdir; to go on with the new values on purpose, add "
            "--config.allow_config_change=True (the change is recorded there and in metrics.jsonl)")
    return changes


def record_config(workdir: pathlib.Path, config, changes: dict, step: int, writer) -> None:
    """Keeps `config` as the workdir's record (process 0, atomically); a change it makes to the
    trajectory at `step` is logged and recorded in metrics.jsonl through `writer`."""
    if changes:
        logging.warning("resuming at step %d with another config, as config.allow_config_change allows: %s",
                        step, _listed(changes))
        writer.note(CHANGE_KIND, step, {"changes": {field: [old, new] for field, (old, new) in changes.items()}})
    if jax.process_index() != 0:
        return
    descriptor, temporary = tempfile.mkstemp(dir=workdir, prefix=f".{RECORD_NAME}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            json.dump(as_record(config), file, indent=1, sort_keys=True)
        os.replace(temporary, workdir / RECORD_NAME)
    finally:
        pathlib.Path(temporary).unlink(missing_ok=True)


def stream_start(manager, step: int, steps_per_epoch: int, global_batch_size: int) -> data.StreamPosition:
    """Where the data stream resumes at `step`: as the checkpoint of that step recorded it (written
    with whatever batch size), else (a fresh run, or a checkpoint from before positions were
    recorded) as an uninterrupted run with these sizes stands; fitted to these sizes."""
    position = data.StreamPosition.at_step(step, steps_per_epoch, global_batch_size)
    if step in manager.all_steps():
        recorded = checkpoint.load_meta(manager, step).get(STREAM_KEY)
        position = data.StreamPosition(**recorded) if recorded else position
    return position.fitted(steps_per_epoch, global_batch_size)


def checkpoint_meta(model_meta: dict, position: data.StreamPosition) -> dict:
    """What a checkpoint records beside the state: the model, and where the data stream stands."""
    return {**model_meta, STREAM_KEY: dataclasses.asdict(position)}
