"""The key of the train step that train.py keeps: the schedule's numbers (an input of the step)
and the fields only the host reads are left out of it, so a second run of another length, learning
rate or dataset size loads the kept step; whatever decides the program is kept in it."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from test_train_step import BATCH, IMAGE_SIZE, NUM_CLASSES, tiny_config

from shunted_jax import data
from shunted_jax.train import compilation_cache, loop, metrics, optim, step


class Recorded:
    """A config whose reads are recorded in `reads` as paths (tuples of names). A method of a
    section (to_dict, get, ...) counts as reading the whole section."""

    def __init__(self, node, path: tuple, reads: set):
        self._node, self._path, self._reads = node, path, reads

    def __getattr__(self, name):
        value = getattr(self._node, name)
        if isinstance(value, ml_collections.ConfigDict):
            return Recorded(value, (*self._path, name), self._reads)
        self._reads.add(self._path if callable(value) else (*self._path, name))
        return value

    __getitem__ = __getattr__


def overlaps(path: tuple, field: str) -> bool:
    """Whether reading `path` reads the dotted `field`: the same, under it, or a section holding it."""
    names = tuple(field.split("."))
    shorter = min(len(path), len(names))
    return path[:shorter] == names[:shorter]


def test_the_schedule_reads_its_fields_and_the_batch_size_only():
    config = tiny_config()
    config.optimizer.warmup_steps = -1  # -1: the epoch counts are read as well
    reads = set()
    optim.schedule_from_config(Recorded(config, (), reads), steps_per_epoch=10)
    assert {".".join(path) for path in reads} == {*optim.SCHEDULE_FIELDS, "global_batch_size"}


def test_building_and_tracing_the_train_step_reads_no_field_left_out_of_its_key():
    config = tiny_config()
    reads = set()
    recorded = Recorded(config, (), reads)
    mesh = step.make_mesh(recorded.mesh, jax.devices()[:1])
    model = step.create_model(recorded.model, NUM_CLASSES)
    abstract_state, _, train_step, _ = step.prepare_training(recorded, model, mesh, image_size=IMAGE_SIZE,
                                                             num_classes=NUM_CLASSES)
    train_step.lower(abstract_state, step.synthetic_batch(mesh, BATCH, IMAGE_SIZE, NUM_CLASSES),
                     step.replicated_schedule(config, mesh, steps_per_epoch=10))
    assert [(path, field) for path in reads for field in step.NOT_IN_TRAIN_PROGRAM if overlaps(path, field)] == []
    assert {("model",), ("mixup", "cutmix_alpha"), ("optimizer", "b1"), ("optimizer", "grad_clip_norm"),
            ("data", "device_pp_train"), ("seed",), ("compiler_options",), ("mesh", "fsdp")} <= reads


def other_value(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float, str)):
        return value + type(value)(1)
    raise TypeError(f"no other value for {value!r}")


def leaves(node, field: str) -> dict:
    """{dotted field: value} of every leaf at or under `field`."""
    if isinstance(node, ml_collections.ConfigDict):
        return {name: value for key, child in node.items() for name, value in leaves(child, f"{field}.{key}").items()}
    return {field: node}


def with_other_values(config, fields):
    """A copy of `config` with every leaf at or under each of `fields` changed; a field it lacks raises."""
    other = config.copy_and_resolve_references()
    for field in fields:
        node = functools.reduce(lambda section, name: section[name], field.split("."), other)
        other.update_from_flattened_dict({name: other_value(value) for name, value in leaves(node, field).items()})
    return other


def train_step_key(config):
    """The key as the loop computes it, for a fixed (small) argument: only the config varies."""
    return compilation_cache.program_key("train_step", step.program_config(config), (jnp.zeros(2),),
                                         {"num_classes": NUM_CLASSES, "image_size": IMAGE_SIZE})


def test_the_key_ignores_the_schedule_and_host_fields_and_sees_the_rest():
    config = tiny_config()
    for field in step.NOT_IN_TRAIN_PROGRAM:
        assert step.program_config(with_other_values(config, [field])) == step.program_config(config), field
    base = train_step_key(config)
    assert train_step_key(with_other_values(config, step.NOT_IN_TRAIN_PROGRAM)) == base
    for field in ("model.drop_path_rate", "mixup.mixup_alpha", "optimizer.b1", "label_smoothing", "seed",
                  "ema_decay", "data.device_pp_train", "compiler_options"):
        assert train_step_key(with_other_values(config, [field])) != base, field


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty store of kept steps, and JAX's persistent cache writing nothing meanwhile: on the
    CPU a step that JAX's cache served is not kept, so the train step here must never be written there."""
    monkeypatch.setattr(compilation_cache, "steps_dir", lambda: tmp_path / "steps")
    before = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
    yield tmp_path / "steps"
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before)


def synthetic_run(num_train_steps: int):
    """The tiny ViT on synthetic data, without mixup and evaluators, in JAX's current cache."""
    config = tiny_config(vit_model=True, drop_path_rate=0.0)
    config.mixup.update({"mixup_alpha": 0.0, "cutmix_alpha": 0.0})
    config.data.update({"name": "synthetic", "num_classes": NUM_CLASSES, "num_train_examples": 64})
    config.update({"num_train_steps": num_train_steps, "log_every_steps": 1, "compilation_cache_dir": ""})
    config.evals = ml_collections.ConfigDict()
    return config


def test_a_run_extended_with_another_learning_rate_loads_the_kept_step(store, tmp_path, caplog):
    """The second run resumes the first (so it initialises nothing) for more steps on another
    schedule: it loads the step the first one kept, and trains on its own schedule."""
    loop.train_and_evaluate(synthetic_run(1), tmp_path, keep_compiled_step=True)
    kept = list(store.glob("train_step-*.step"))
    assert len(kept) == 1, "JAX's cache served the train step: a test that compiles the same program wrote it there"
    extended = synthetic_run(3)
    extended.optimizer.update({"base_lr": 2e-2, "warmup_steps": 1})
    extended.allow_config_change = True
    caplog.clear()
    with caplog.at_level("INFO"):
        loop.train_and_evaluate(extended, tmp_path, keep_compiled_step=True)
    assert "resumed from" in caplog.text and f"loaded the compiled train_step from {kept[0]}" in caplog.text
    assert "compiling the train step" not in caplog.text
    schedule = optim.schedule_from_config(extended, data.steps_per_epoch(64, BATCH))
    records = [r for r in metrics.read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["lr"] for r in records[1:]] == pytest.approx([float(schedule(1)), float(schedule(2))], rel=1e-6)
