"""The Pallas kernels on a mesh of devices: each device runs them on its share of the batch, so a
train step over a (4, 2) data x FSDP mesh computes what one device computes, and its compiled
program gathers no activations around them. Pallas' interpreter runs the kernels on the CPU."""
import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers.models import drawn_like
from shunted_jax.train import step
from test_train_step import IMAGE_SIZE, NUM_CLASSES, tiny_config

PALLAS = "attention=pallas,depthwise=pallas,norm=pallas"
# 64 channels and 2 heads a stage: every SSA group has 32 channels, a depthwise kernel's block.
MODEL = {"embed_dims": (64, 64, 64, 64), "num_heads": (2, 2, 2, 2), "drop_path_rate": 0.0}
BATCH = 16


def prepare(kernels: str, devices, mesh_shape, dtype: str, batch: int = BATCH):
    """(config, mesh, model, abstract state, state sharding, train step) as the loop builds them."""
    config = tiny_config(kernels=kernels, dtype=dtype, param_dtype=dtype, **MODEL)
    config.global_batch_size = batch
    config.mesh.update({"data": mesh_shape[0], "fsdp": mesh_shape[1]})
    mesh = step.make_mesh(config.mesh, devices)
    model = step.create_model(config.model, NUM_CLASSES)
    abstract_state, sharding, train_step, _ = step.prepare_training(
        config, model, mesh, image_size=IMAGE_SIZE, num_classes=NUM_CLASSES)
    return config, mesh, model, abstract_state, sharding, train_step


def loss_and_grads(mesh, model, weights, sharding, images, targets):
    """The train step's loss, gradients and BatchNorm statistics for `weights` (params, batch_stats),
    jitted on `mesh` as the step is."""
    def compute(weights, images, targets):
        return step._loss_and_grads(model, *weights, images, targets, jax.random.key(1))
    batch = step.batch_sharding(mesh)
    weights_sharding = (sharding.params, sharding.batch_stats)
    return jax.jit(step.on_mesh(compute, mesh), in_shardings=(weights_sharding, batch, batch))(
        jax.device_put(weights, weights_sharding), images, targets)


def test_a_step_on_a_data_fsdp_mesh_equals_one_device_in_float64():
    """Loss, gradients and BatchNorm statistics agree to float64 round-off, relative to each
    array's largest entry (some gradients, such as the keys' biases', are zero but for round-off)."""
    with jax.enable_x64(True):
        runs, weights = {}, None
        for name, devices, mesh_shape in (("mesh", jax.devices(), (4, 2)), ("one", jax.devices()[:1], (1, 1))):
            _, mesh, model, abstract_state, sharding, _ = prepare(PALLAS, devices, mesh_shape, "float64")
            weights = (drawn_like((abstract_state.params, abstract_state.batch_stats)) if weights is None
                       else weights)  # the same for both
            images = jax.random.normal(jax.random.key(0), (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float64)
            targets = jax.nn.one_hot(jnp.arange(BATCH) % NUM_CLASSES, NUM_CLASSES, dtype=jnp.float64)
            runs[name] = jax.device_get(loss_and_grads(mesh, model, weights, sharding, images, targets))
    initial_stats = weights[1]
    loss, stats, grads = runs["mesh"]
    want_loss, want_stats, want_grads = runs["one"]
    assert loss.dtype == np.float64 and loss == pytest.approx(want_loss, rel=1e-13)
    leaves = jax.tree_util.tree_leaves_with_path((grads, stats))
    assert len(leaves) == len(jax.tree.leaves((want_grads, want_stats)))
    for (path, got), want in zip(leaves, jax.tree.leaves((want_grads, want_stats))):
        assert np.max(np.abs(got - want)) <= 1e-12 * np.max(np.abs(want)), jax.tree_util.keystr(path)
    # the statistics moved: the comparison is not of two initial states
    assert not np.allclose(jax.tree.leaves(stats)[0], jax.tree.leaves(initial_stats)[0])


def gathers(kernels: str, per_device: int) -> collections.Counter:
    """The all-gathers and all-to-alls of the compiled float32 train step on the (4, 2) mesh, with
    `per_device` images a device: (kind, "any") counts them all, (kind, shape) those whose
    result's leading dimension is a multiple of `per_device` (of the batch's size: no weight of
    the tiny model has such a dimension when `per_device` is 5)."""
    config, mesh, _, abstract_state, _, train_step = prepare(kernels, jax.devices(), (4, 2), "float32",
                                                                8 * per_device)
    inputs = (step.synthetic_batch(mesh, 8 * per_device, IMAGE_SIZE, NUM_CLASSES),
              step.replicated_schedule(config, mesh, steps_per_epoch=10))
    text = train_step.lower(abstract_state, *inputs).compile().as_text()  # lowering needs no initial state
    found = collections.Counter()
    for shape, leading, kind in re.findall(r"= (\w+\[(\d+)[\d,]*\])\S* (all-gather|all-to-all)(?:-start)?\(", text):
        found[kind, "any"] += 1
        if int(leading) % per_device == 0:
            found[kind, shape] += 1
    return found


def test_the_sharded_kernels_gather_no_activations():
    """The step with the Pallas kernels has no more all-gathers and all-to-alls than the step
    with XLA's formulas, and gathers no batch-sized array that the XLA step does not (XLA's own
    choices for some matmuls). Unsharded, the kernels' inputs were gathered whole (all 40 images
    of f32[40,8,8,64]), which the XLA step never does."""
    pallas, xla = gathers(PALLAS, 5), gathers("exact", 5)
    assert 0 < pallas["all-gather", "any"] <= xla["all-gather", "any"]  # FSDP gathers the weights
    assert pallas["all-to-all", "any"] <= xla["all-to-all", "any"]
    assert not pallas - xla, pallas - xla
