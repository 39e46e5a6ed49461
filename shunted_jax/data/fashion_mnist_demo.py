"""The embedded demo dataset: Fashion-MNIST as a real tfds dataset, built from the IDX files
of the Debian package `dataset-fashion-mnist` (tfds' own `fashion_mnist` builder downloads
from the internet and checks checksums that these files do not match)."""
import gzip
import os

import numpy as np

from shunted_jax.data.tf_import import tensorflow, tensorflow_datasets

tf = tensorflow()
tfds = tensorflow_datasets()

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASS_NAMES = ("t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
_IDX_MAGIC = {1: 2049, 3: 2051}  # the IDX magic number by number of dimensions
_ENCODE_BATCH = 1024
_REPLACE = "reinstall dataset-fashion-mnist, or give data.manual_dir a folder of intact files"


def read_idx(path: str) -> np.ndarray:
    """Reads a gzipped big-endian IDX file of uint8 values (the MNIST format); a file that is not
    one (not gzip, truncated, another magic number) is named in a ValueError saying what is wrong."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"{path} is not a readable gzip file ({type(err).__name__}: {err}); {_REPLACE}") from err
    if len(raw) < 4:
        raise ValueError(f"{path} holds {len(raw)} bytes once decompressed, no IDX header; {_REPLACE}")
    magic, ndim = int.from_bytes(raw[:4], "big"), raw[3]
    if _IDX_MAGIC.get(ndim) != magic:
        raise ValueError(f"{path} is not a uint8 IDX file (magic number {magic}).")
    offset = 4 + 4 * ndim
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(raw) != offset + int(np.prod(shape)):
        raise ValueError(f"{path} holds {len(raw) - offset} values where its header promises {int(np.prod(shape))} "
                         f"{shape}: it is truncated or damaged; {_REPLACE}")
    return np.frombuffer(raw, np.uint8, offset=offset).reshape(shape)


def encode_pngs(images: np.ndarray):
    """PNG bytes of each HxW uint8 image, encoded in parallel by tf.data (much faster than one by one)."""
    encoded = (
        tf.data.Dataset.from_tensor_slices(images[..., None])
        .map(tf.io.encode_png, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(_ENCODE_BATCH)
    )
    for batch in encoded.as_numpy_iterator():
        yield from batch


def source_dir(manual_dir: str) -> str:
    """The folder with the IDX files: `manual_dir` if given, else the Debian package's folder."""
    folder = manual_dir or DEBIAN_DIR
    missing = [name for pair in SPLIT_FILES.values() for name in pair if not os.path.exists(os.path.join(folder, name))]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST IDX files {missing} are missing from {folder}. Install them with "
            "`apt-get install dataset-fashion-mnist` (they go to /usr/share/datasets/fashion-mnist), "
            "or set data.manual_dir to a folder holding the four *-ubyte.gz files."
        )
    return folder


class FashionMnistDemo(tfds.core.GeneratorBasedBuilder):
    """Fashion-MNIST (28x28 grayscale, 10 classes, 60k train / 10k test) from local IDX files."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Built from the Debian package dataset-fashion-mnist."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = "Run `apt-get install dataset-fashion-mnist`, or put the four IDX .gz files in manual_dir."

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(28, 28, 1), encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://github.com/zalandoresearch/fashion-mnist",
        )

    def _split_generators(self, dl_manager):
        folder = source_dir(str(dl_manager.manual_dir))
        return {
            split: self._generate_examples(os.path.join(folder, images), os.path.join(folder, labels))
            for split, (images, labels) in SPLIT_FILES.items()
        }

    def _generate_examples(self, images_path, labels_path):
        images, labels = read_idx(images_path), read_idx(labels_path)
        if len(images) != len(labels):
            raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels.")
        for index, (png, label) in enumerate(zip(encode_pngs(images), labels)):
            yield index, {"image": png, "label": int(label)}
