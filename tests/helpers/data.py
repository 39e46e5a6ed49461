"""Shared helpers and fixtures of the data tests: natural-looking images, JPEG files, the demo dataset."""
import os

import numpy as np
import pytest

from shunted_jax import data
from benchmarks.data import natural_image as _photo
from shunted_jax.data.tf_import import tensorflow

tf = tensorflow()


def natural_image(height: int = 96, width: int = 128, seed: int = 0) -> np.ndarray:
    """A natural-looking uint8 photo (gradients, objects, texture); see benchmarks/data.py."""
    return _photo(height, width, seed)


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


@pytest.fixture(scope="module")
def demo_data_dir(tmp_path_factory) -> str:
    """The Fashion-MNIST demo dataset, built from the Debian IDX files once per module: a module's
    tests that share a module fixture run on one worker (conftest.work_unit), so it is built once."""
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    data.dataset_info(small_config(data_dir=data_dir))
    return data_dir
