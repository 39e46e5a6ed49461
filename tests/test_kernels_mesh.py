"""The Pallas kernels on a mesh of devices: each device runs them on its share of the batch, so the
train step's loss and gradients over a (4, 2) data x FSDP mesh are what XLA's own formulas give
there, and the compiled program gathers no activations around them. Pallas' interpreter runs the
kernels on the CPU."""
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
MESH = (4, 2)
# Images a device on MESH: no weight of the tiny model has a dimension that is a multiple of 5, so a
# gathered array with one is batch-sized, an activation.
PER_DEVICE = 5
BATCH = PER_DEVICE * MESH[0] * MESH[1]


def compile_loss_and_grads(kernels: str, mesh_shape) -> dict:
    """The train step's loss, gradients and BatchNorm statistics (`step._loss_and_grads`) in
    float64 on a mesh of `mesh_shape` (the first devices), jitted and sharded as the step is, then
    compiled: {"compiled", "weights" (abstract), "weights_sharding", "batch_sharding"}."""
    with jax.enable_x64(True):
        config = tiny_config(kernels=kernels, dtype="float64", param_dtype="float64", **MODEL)
        config.global_batch_size = BATCH
        config.mesh.update({"data": mesh_shape[0], "fsdp": mesh_shape[1]})
        mesh = step.make_mesh(config.mesh, jax.devices()[:mesh_shape[0] * mesh_shape[1]])
        model = step.create_model(config.model, NUM_CLASSES)
        abstract_state, sharding, _, _ = step.prepare_training(
            config, model, mesh, image_size=IMAGE_SIZE, num_classes=NUM_CLASSES)

        def compute(weights, images, targets):
            return step._loss_and_grads(model, *weights, images, targets, jax.random.key(1))

        batch, weights_sharding = step.batch_sharding(mesh), (sharding.params, sharding.batch_stats)
        weights = (abstract_state.params, abstract_state.batch_stats)
        jitted = jax.jit(step.on_mesh(compute, mesh), in_shardings=(weights_sharding, batch, batch))
        compiled = jitted.lower(weights, jax.ShapeDtypeStruct((BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float64),
                                jax.ShapeDtypeStruct((BATCH, NUM_CLASSES), jnp.float64)).compile()
    return {"compiled": compiled, "weights": weights, "weights_sharding": weights_sharding, "batch_sharding": batch}


@pytest.fixture(scope="module")
def on_the_mesh() -> dict:
    """The programs of the kernels ("pallas") and of XLA's formulas ("xla") on the (4, 2) data x
    FSDP mesh, compiled once for both tests."""
    return {"pallas": compile_loss_and_grads(PALLAS, MESH), "xla": compile_loss_and_grads("exact", MESH)}


def run(program: dict, weights, images, targets):
    with jax.enable_x64(True):
        placed = (jax.device_put(weights, program["weights_sharding"]),
                  *jax.device_put((images, targets), program["batch_sharding"]))
        return jax.device_get(program["compiled"](*placed))


def test_the_kernels_on_a_data_fsdp_mesh_compute_what_xla_does_in_float64(on_the_mesh):
    """Loss, gradients and BatchNorm statistics agree with XLA's own program on the same mesh,
    relative to each array's largest entry, to within the kernels' GELU approximation (2e-7,
    tests/test_kernels_depthwise.py): measured 1.2e-7. A kernel that saw another device's share
    of the batch, only part of its own, or that missed a sum over the devices would be off by
    far more."""
    weights = drawn_like(on_the_mesh["pallas"]["weights"])
    images = np.random.default_rng(0).normal(size=(BATCH, IMAGE_SIZE, IMAGE_SIZE, 3))
    targets = np.eye(NUM_CLASSES)[np.arange(BATCH) % NUM_CLASSES]
    loss, stats, grads = run(on_the_mesh["pallas"], weights, images, targets)
    want_loss, want_stats, want_grads = run(on_the_mesh["xla"], weights, images, targets)
    assert loss.dtype == np.float64 and loss == pytest.approx(want_loss, rel=1e-6)
    leaves = jax.tree_util.tree_leaves_with_path((grads, stats))
    assert len(leaves) == len(jax.tree.leaves((want_grads, want_stats)))
    for (path, got), want in zip(leaves, jax.tree.leaves((want_grads, want_stats))):
        assert np.max(np.abs(got - want)) <= 1e-6 * np.max(np.abs(want)), jax.tree_util.keystr(path)
    # the statistics moved: the comparison is not of two initial states
    assert not np.allclose(jax.tree.leaves(stats)[0], jax.tree.leaves(weights[1])[0])


def gathers(program: dict) -> tuple[collections.Counter, collections.Counter]:
    """The all-gathers and all-to-alls of a compiled program on MESH: (their count by kind, the
    (kind, shape) of those whose result's leading dimension is a multiple of PER_DEVICE)."""
    every, batch_sized = collections.Counter(), collections.Counter()
    text = program["compiled"].as_text()
    for shape, leading, kind in re.findall(r"= (\w+\[(\d+)[\d,]*\])\S* (all-gather|all-to-all)(?:-start)?\(", text):
        every[kind] += 1
        if int(leading) % PER_DEVICE == 0:
            batch_sized[kind, shape] += 1
    return every, batch_sized


def test_the_sharded_kernels_gather_no_activations(on_the_mesh):
    """The kernels' program gathers weights (FSDP), no batch-sized array that the program with
    XLA's formulas does not (XLA's own choices for some matmuls), and has no more all-to-alls.
    Unsharded, the kernels' inputs were gathered whole (all 40 images of a [40,8,8,64] map), which
    XLA's program never does."""
    (pallas, pallas_batch_sized), (xla, xla_batch_sized) = gathers(on_the_mesh["pallas"]), gathers(on_the_mesh["xla"])
    assert pallas["all-gather"] > 0
    assert pallas["all-to-all"] <= xla["all-to-all"]
    assert not pallas_batch_sized - xla_batch_sized, pallas_batch_sized - xla_batch_sized
