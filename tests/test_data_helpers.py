"""Shared helpers and fixtures of the data tests: natural-looking images, JPEG files, the demo dataset."""
import os

import numpy as np
import pytest

from shunted_jax import data
from shunted_jax.data.tf_import import tensorflow

tf = tensorflow()


def natural_image(height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """uint8 HxWx3 with what photos have: smooth colour gradients, solid objects with edges, texture."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    sky = np.stack([60 + 120 * rows / height, 90 + 60 * cols / width, 200 - 80 * rows / height], axis=-1)
    for _ in range(4):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(8, height / 3), rng.uniform(8, width / 3)
        inside = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 < 1
        sky[inside] = rng.uniform(0, 255, 3)
    texture = rng.normal(0, 8, (height, width, 1))
    return np.clip(sky + texture, 0, 255).astype(np.uint8)


def jpeg_bytes(image: np.ndarray) -> bytes:
    return tf.io.encode_jpeg(image, quality=95).numpy()


def write_jpeg(path: str, image: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(jpeg_bytes(image))


def small_config(**overrides):
    """A data config with small images so the tests stay fast."""
    cfg = data.default_config()
    cfg.image_size = 32
    cfg.shuffle_buffer = 64
    cfg.num_parallel_calls = 2
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory) -> str:
    """The Fashion-MNIST demo dataset, built once per test session from the Debian IDX files."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    data.dataset_info(small_config(data_dir=data_dir))
    return data_dir
