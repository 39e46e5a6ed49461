"""The device's part of the preprocessing inside the train and eval steps: uint8 in, the same
augmented batch on any mesh and at any resumed step, normalisation in the eval step, and a clear
error for a float batch that would be normalised twice."""
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from configs import common, shunted_t  # noqa: E402
from shunted_jax.data import device_ops  # noqa: E402
from shunted_jax.train import evaluators, step  # noqa: E402

TINY_MODEL = {"embed_dims": (16, 16, 32, 32), "depths": (1, 1, 1, 1), "num_heads": (2, 2, 2, 2),
              "mlp_ratios": (2, 2, 2, 2)}
IMAGE_SIZE, NUM_CLASSES, BATCH = 32, 10, 16


def tiny_config(device_pp_train=device_ops.TRAIN_PP):
    config = shunted_t.get_config("demo")
    config.unlock()
    common.to_demo(config, TINY_MODEL)
    config.global_batch_size = BATCH
    config.data.device_pp_train = device_pp_train
    return config


def uint8_images(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)


def augmenter(config, devices):
    """`(images, step_number) -> augmented`: the train step's device preprocessing, jitted over a
    mesh of `devices`."""
    mesh = step.make_mesh(config.mesh, devices)
    preprocess = jax.jit(lambda x, s: step.device_preprocess(config, x, s),
                         in_shardings=(step.batch_sharding(mesh), step.replicated(mesh)),
                         out_shardings=step.batch_sharding(mesh))
    return lambda images, step_number: np.asarray(
        preprocess(jax.device_put(images, step.batch_sharding(mesh)), jnp.int32(step_number)))


def test_the_augmented_batch_depends_only_on_seed_step_and_row():
    config = tiny_config()
    images = uint8_images()
    one_device = augmenter(config, jax.devices()[:1])(images, 7)
    on_eight_devices = augmenter(config, jax.devices())
    np.testing.assert_allclose(on_eight_devices(images, 7), one_device, atol=1e-5)
    # A resumed run calls the step with the restored step number: nothing else goes in, so a
    # program of its own, without a mesh, gives the same batch.
    resumed = np.asarray(jax.jit(lambda x, s: step.device_preprocess(config, x, s))(jnp.asarray(images), 7))
    np.testing.assert_allclose(resumed, one_device, atol=1e-5)
    assert one_device.dtype == np.float32 and abs(one_device.mean()) < 3  # normalised
    assert not np.allclose(on_eight_devices(images, 8), one_device)
    same_image = np.repeat(images[:1], BATCH, axis=0)
    rows = on_eight_devices(same_image, 7)
    assert not np.allclose(rows[0], rows[1])  # each row draws from its own key
    config.seed = 1
    assert not np.allclose(augmenter(config, jax.devices())(images, 7), one_device)


def test_train_step_preprocesses_uint8_on_device_before_mixup(monkeypatch):
    config = tiny_config()
    mesh = step.make_mesh(config.mesh, jax.devices()[:1])
    model = step.create_model(config.model, NUM_CLASSES)
    state, _, train_step, _ = step.prepare_training(config, model, mesh, image_size=IMAGE_SIZE,
                                                    num_classes=NUM_CLASSES)
    schedule = step.replicated_schedule(config, mesh, steps_per_epoch=10)
    seen = []
    real = step.device_preprocess

    def recording(config, images, step_number):
        seen.append(images.dtype)
        return real(config, images, step_number)

    monkeypatch.setattr(step, "device_preprocess", recording)
    batch = step.synthetic_batch(mesh, BATCH, IMAGE_SIZE, NUM_CLASSES)
    train_step.lower(state, batch, schedule)
    assert seen == [jnp.uint8]
    float_batch = {**batch, "image": batch["image"].astype(jnp.float32)}
    with pytest.raises(ValueError, match="takes uint8 images.*device_pp_train=''"):
        train_step.lower(state, float_batch, schedule)


def test_a_bad_device_pp_fails_before_the_slow_init():
    config = tiny_config("randaug(2,9,0.5)|normalise")
    with pytest.raises(ValueError, match="unknown device op 'normalise'"):
        step.init_training(config, None, None, image_size=IMAGE_SIZE, num_classes=NUM_CLASSES,
                           steps_per_epoch=10)


def test_an_empty_device_pp_casts_uint8_and_keeps_float():
    images = uint8_images()
    as_float = step.apply_device_pp("", jnp.asarray(images), jax.random.key(0), 0)
    assert as_float.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(as_float), images.astype(np.float32))
    with jax.enable_x64(True):
        float64 = jnp.asarray(images, jnp.float64)
        assert step.apply_device_pp("", float64, jax.random.key(0), 0).dtype == jnp.float64


def test_eval_step_normalises_on_device_as_the_host_did():
    config = tiny_config()
    mesh = step.make_mesh(config.mesh, jax.devices())
    model = step.create_model(config.model, NUM_CLASSES)
    state, sharding, _, _ = step.init_training(config, model, mesh, image_size=IMAGE_SIZE,
                                               num_classes=NUM_CLASSES, steps_per_epoch=10)
    images = uint8_images(1)
    labels = np.arange(BATCH, dtype=np.int32) % NUM_CLASSES
    mask = np.arange(BATCH) < BATCH - 3
    host_normalised = ((images / 255.0 - np.asarray(device_ops.IMAGENET_MEAN))
                       / np.asarray(device_ops.IMAGENET_STD)).astype(np.float32)

    def sums(device_pp, batch_images):
        eval_step = evaluators.make_eval_step(model, mesh, sharding, False, {}, device_pp)
        batch = step.global_batch({"image": batch_images, "label": labels, "mask": mask}, mesh, 1)
        return jax.device_get(eval_step(state, batch))

    on_device = sums(device_ops.EVAL_PP, images)
    on_host = sums("", host_normalised)
    assert on_device["count"] == on_host["count"] == BATCH - 3
    assert (on_device["top1"], on_device["top5"]) == (on_host["top1"], on_host["top5"])
    np.testing.assert_allclose(on_device["loss"], on_host["loss"], rtol=1e-5)
    assert not np.isclose(sums("", images.astype(np.float32))["loss"], on_host["loss"], rtol=1e-3)
    with pytest.raises(ValueError, match="takes uint8 images"):
        sums(device_ops.EVAL_PP, host_normalised)
