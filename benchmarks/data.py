"""Throughput of the training input pipeline alone (the host's part: decode, crop, flip, resize):

    python -m benchmarks.data             # one preprocessing string (--pp)
    python -m benchmarks.data --compare   # decoding once against a fused decode-and-crop per copy

Writes ImageNet-sized JPEGs (500x375 by default) of natural-looking synthetic photos into a
temporary `folder:` dataset, runs the training pipeline over them (repeated augmentation as
--repeated_aug) and reports images/s in total and per CPU core (images per CPU-second, which
other load on the machine does not distort), and how many cores a given training throughput
needs at that rate. --compare measures, in one run, the uint8 host pipeline with one decode per
record and with a fused decode-and-crop per copy. RandAugment, normalisation and erasing run in
the train step (data.device_ops; benchmarks/step.py measures them on the accelerator);
--device_pp adds them after each batch on JAX's default device, for CPU-only training the CPU.
"""
import argparse
import math
import os
import tempfile
import time

import numpy as np

from shunted_jax.data import config as config_lib


def natural_image(height: int, width: int, seed: int) -> np.ndarray:
    """uint8 HxWx3 with what photos have: smooth colour gradients, solid objects with edges, texture
    (so JPEG sizes and decode costs resemble real photos, unlike uniform noise)."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([60 + 120 * rows / height, 90 + 60 * cols / width, 200 - 80 * rows / height], axis=-1)
    for _ in range(4):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(8, height / 3), rng.uniform(8, width / 3)
        image[((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 < 1] = rng.uniform(0, 255, 3)
    return np.clip(image + rng.normal(0, 8, (height, width, 1)), 0, 255).astype(np.uint8)


def write_folder_dataset(root: str, num_files: int, num_distinct: int, height: int, width: int) -> None:
    """ROOT/train/c<k>/<n>.jpg: `num_distinct` encoded photos, hard-linked up to `num_files` files."""
    from shunted_jax.data.tf_import import tensorflow

    tf = tensorflow()
    originals = []
    for n in range(num_distinct):
        path = os.path.join(root, "originals", f"{n}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tf.io.write_file(path, tf.io.encode_jpeg(natural_image(height, width, seed=n), quality=90))
        originals.append(path)
    for n in range(num_files):
        class_dir = os.path.join(root, "train", f"c{n % 10}")
        os.makedirs(class_dir, exist_ok=True)
        os.link(originals[n % num_distinct], os.path.join(class_dir, f"{n}.jpg"))
    os.makedirs(os.path.join(root, "val"), exist_ok=True)


def device_finish(device_pp: str, batch_size: int):
    """batch -> None: the device ops of `device_pp` on the batch's images, waited for, on JAX's
    default device (the CPU where there is no accelerator, as in CPU-only training); nothing if ""."""
    if not device_pp:
        return lambda batch: None
    import jax

    from shunted_jax.data import device_ops

    augment = jax.jit(device_ops.build(device_pp))
    keys = device_ops.example_keys(jax.random.key(0), 0, np.arange(batch_size))
    return lambda batch: augment(batch["image"], keys).block_until_ready()


def measure(cfg, batch_size: int, warmup: int, batches: int, decode_once: bool = True,
            device_pp: str = "") -> tuple[float, float]:
    """(images per wall-clock second, images per CPU-second of this process) over `batches`
    batches after `warmup` ones (tracing, buffer filling, the device ops' compile), each batch
    finished by the device ops of `device_pp`. The CPU figure is the per-core rate, and unlike the
    wall-clock one it holds on a machine that other work shares."""
    from shunted_jax.data import pipeline

    iterator = pipeline.train_batches(cfg, batch_size, 0, 1, 0, decode_once=decode_once)
    finish = device_finish(device_pp, batch_size)
    for _ in range(warmup):
        finish(next(iterator))
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        finish(next(iterator))
    images = batches * batch_size
    return images / (time.perf_counter() - wall), images / (time.process_time() - cpu)


COMPARED = (
    ("uint8 host pipeline, fused decode-and-crop per copy", config_lib.HOST_PP_TRAIN, False),
    ("uint8 host pipeline, decoded once", config_lib.HOST_PP_TRAIN, True),
)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--jpeg_width", type=int, default=500)
    parser.add_argument("--jpeg_height", type=int, default=375)
    parser.add_argument("--distinct", type=int, default=64, help="distinct JPEGs encoded")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--repeated_aug", type=int, default=3, help="copies per record (3: the official recipe)")
    parser.add_argument("--pp", default=config_lib.HOST_PP_TRAIN, help="training preprocessing string")
    parser.add_argument("--device_pp", default="", help="device ops (data.device_ops, e.g. its TRAIN_PP) applied "
                        "to each batch on JAX's default device: the CPU's share of CPU-only training")
    parser.add_argument("--compare", action="store_true", help="the pipelines of COMPARED instead of --pp")
    parser.add_argument("--rounds", type=int, default=1, help="measurements of each pipeline, interleaved; the median counts")
    parser.add_argument("--target", type=float, default=2000.0, help="images/s a training run needs")
    args = parser.parse_args(argv)
    from shunted_jax.data.pipeline import available_cores

    cores = available_cores()
    runs = COMPARED if args.compare else (("pipeline", args.pp, True),)
    with tempfile.TemporaryDirectory() as root:
        num_files = args.batch * (args.warmup + args.batches)
        write_folder_dataset(root, num_files, min(args.distinct, num_files), args.jpeg_height, args.jpeg_width)
        cfg = config_lib.default_config()
        cfg.update(name=f"folder:{root}", data_dir=os.path.join(root, "cache"), image_size=args.image_size,
                   repeated_aug=args.repeated_aug)
        print(f"JPEG {args.jpeg_width}x{args.jpeg_height} -> {args.image_size}x{args.image_size}, batch {args.batch}, "
              f"repeated_aug {args.repeated_aug}, {cores} cores" + (f", device ops {args.device_pp}" if args.device_pp else ""))
        measured = {name: [] for name, _, _ in runs}
        for _ in range(args.rounds):
            for name, pp, decode_once in runs:
                cfg.pp_train = pp
                measured[name].append(measure(cfg, args.batch, args.warmup, args.batches, decode_once, args.device_pp))
    per_core = {}
    for name, pp, _ in runs:
        rate, per_core[name] = (float(np.median(values)) for values in zip(*measured[name]))
        print(f"{name}: {config_lib.format_pp(pp, cfg)}")
        print(f"  {rate:.0f} images/s on {cores} cores (wall clock, load {os.getloadavg()[0]:.1f})")
        print(f"  {per_core[name]:.0f} images/s per core (images per CPU-second of the pipeline)")
        print(f"  {args.target:.0f} images/s needs {math.ceil(args.target / per_core[name])} cores at this rate")
    if args.compare:
        speed_up = per_core[COMPARED[1][0]] / per_core[COMPARED[0][0]]
        print(f"per-core speed-up of decoding once over a decode-and-crop per copy: {speed_up:.2f}x")


if __name__ == "__main__":
    main()
