"""The data configuration: one ConfigDict with every field the input pipelines read."""
import math
import os

import ml_collections

from shunted_jax import config_ranges

DEMO_NAME = "fashion_mnist_demo"
SYNTHETIC_NAME = "synthetic"
FOLDER_PREFIX = "folder:"

# The host's part of the official (DeiT, timm) recipe, uint8 out: decode, crop, flip, resize.
# RandAugment, value range, normalisation and random erasing follow on the accelerator
# (data.device_ops: TRAIN_PP, EVAL_PP). The demo's pair likewise.
HOST_PP_TRAIN = "decode_and_inception_crop({image_size})|flip_lr"
HOST_PP_EVAL = "decode_uint8|resize_shorter({image_size},0.875)|center_crop({image_size})"
HOST_PP_DEMO_TRAIN = "decode_uint8|resize({image_size})|flip_lr"
HOST_PP_DEMO_EVAL = "decode_uint8|resize({image_size})"

_ON_CORRUPT = ("skip", "fail")
# A training config's data section leaves these out: each of its evaluators (config.evals) names its own.
EVAL_FIELDS = ("eval_split", "pp_eval")

SYNTHETIC_DTYPES = ("float32", "uint8")

RANGES = {
    "image_size": config_ranges.AT_LEAST_ONE, "repeated_aug": config_ranges.AT_LEAST_ONE,
    "shuffle_buffer": config_ranges.AT_LEAST_ONE, "seed": config_ranges.NON_NEGATIVE,
    "prefetch": config_ranges.Range(0, special=(-1,)), "num_parallel_calls": config_ranges.Range(1, special=(-1,)),
    "holdout_fraction": config_ranges.BELOW_ONE,
}
SYNTHETIC_RANGES = {"num_classes": config_ranges.AT_LEAST_ONE, "num_train_examples": config_ranges.AT_LEAST_ONE,
                    "num_eval_examples": config_ranges.AT_LEAST_ONE}


def default_data_dir() -> str:
    """Where prepared datasets live: $TFDS_DATA_DIR if set, else ~/tensorflow_datasets (tfds' own default)."""
    return os.environ.get("TFDS_DATA_DIR", os.path.join(os.path.expanduser("~"), "tensorflow_datasets"))


def default_config() -> ml_collections.ConfigDict:
    """Defaults follow the official Shunted/PVTv2 ImageNet recipe at 224 pixels: its host part,
    uint8 batches that the device ops finish (data.device_ops.TRAIN_PP, EVAL_PP)."""
    cfg = ml_collections.ConfigDict()
    cfg.name = DEMO_NAME
    cfg.data_dir = default_data_dir()
    cfg.manual_dir = ""
    cfg.image_size = 224
    cfg.train_split = "train"
    cfg.eval_split = ""  # empty: the first of validation, val, test (then holdout) that the dataset has
    cfg.holdout_fraction = 0.0  # folder: datasets: this fraction of each training class is the split "holdout"
    cfg.pp_train = HOST_PP_TRAIN
    cfg.pp_eval = HOST_PP_EVAL
    cfg.shuffle_buffer = 10_000
    cfg.seed = 0
    cfg.repeated_aug = 1
    cfg.on_corrupt = "skip"
    cfg.prefetch = 2
    cfg.num_parallel_calls = -1
    cfg.num_classes = 1000
    cfg.num_train_examples = 1024
    cfg.num_eval_examples = 256
    cfg.synthetic_dtype = "uint8"
    return cfg


def with_defaults(cfg: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
    """A complete data config: default_config() with `cfg`'s fields, then `fields`, on top."""
    complete = default_config()
    complete.update(cfg)
    complete.update(fields)
    return complete


def problems(cfg: ml_collections.ConfigDict) -> list[str]:
    """Every value of a complete data config that cannot run, one line each naming the field."""
    found = config_ranges.out_of_range(cfg, RANGES, "data.")
    if not isinstance(cfg.name, str) or not cfg.name:
        return [*found, f"data.name must be a non-empty string, got {cfg.name!r}."]
    if cfg.name.startswith(FOLDER_PREFIX) and not cfg.name[len(FOLDER_PREFIX):]:
        found.append('data.name "folder:" needs a path, e.g. "folder:/data/my_images".')
    if cfg.holdout_fraction > 0 and not cfg.name.startswith(FOLDER_PREFIX):
        found.append(
            f"data.holdout_fraction holds out images of folder: datasets, not of {cfg.name!r}; a tfds dataset holds "
            "out a slice of its training split instead, e.g. data.train_split='train[:90%]' and the evaluator's "
            "split 'train[90%:]'."
        )
    if cfg.on_corrupt not in _ON_CORRUPT:
        found.append(f"data.on_corrupt must be one of {_ON_CORRUPT}, got {cfg.on_corrupt!r}.")
    if cfg.name == SYNTHETIC_NAME:
        found += config_ranges.out_of_range(cfg, SYNTHETIC_RANGES, "data.")
    if cfg.synthetic_dtype not in SYNTHETIC_DTYPES:
        found.append(
            f"data.synthetic_dtype must be one of {SYNTHETIC_DTYPES} (what the host pipeline would give), "
            f"got {cfg.synthetic_dtype!r}."
        )
    return found


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Rejects values that would otherwise fail late and obscurely inside tf.data: a ValueError
    with one line per bad field."""
    found = problems(cfg)
    if found:
        raise ValueError("\n".join(found))


def check_batch_size(batch_size: int, process_count: int, devices: int = 1, accumulation_steps: int = 1,
                     name: str = "global_batch_size") -> None:
    """The one check that a global batch splits evenly: into `accumulation_steps` micro-batches, each
    shared by the `devices` devices of the mesh, and into one equal share per process."""
    multiple = math.lcm(accumulation_steps * devices, process_count)
    if batch_size < 1 or batch_size % multiple:
        raise ValueError(
            f"{name}={batch_size} must be a positive multiple of {multiple}: {accumulation_steps} micro-batch(es), "
            f"each split evenly over {devices} devices, and an equal share for each of {process_count} process(es); "
            f"choose e.g. {max(1, math.ceil(batch_size / multiple)) * multiple}."
        )


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    """Each process's share of the global batch: the one place where a global batch size is divided."""
    check_batch_size(global_batch_size, process_count)
    return global_batch_size // process_count


def steps_per_epoch(num_train: int, global_batch_size: int) -> int:
    """Full global batches in an epoch (the few examples left over are dropped). Each process's share
    of the training split holds at least num_train // process_count examples, so it makes its local
    batch for each of these steps."""
    steps = num_train // global_batch_size
    if steps == 0:
        raise ValueError(
            f"the training split has {num_train} examples: too few for one global batch of {global_batch_size}; "
            "lower the batch size."
        )
    return steps


def format_pp(pp: str, cfg: ml_collections.ConfigDict) -> str:
    """Fills the {image_size} placeholder so one pp string serves every resolution."""
    return pp.format(image_size=int(cfg.image_size))
