"""Images/s of the full train step and of inference, on synthetic in-memory data.

    python -m benchmarks.step --model shunted_s [--batch 128] [--eval-batch 256]
        [--dtype bfloat16] [--steps 20] [--profile DIR] [--json FILE] [--set FIELD=VALUE ...]
        [--compiler-options 'xla_name=value ...'] [--device-pp PP] [--plain-device-pp PP]

The train step is the one `train.py` runs (device augmentation, mixup, forward, backward, AdamW,
on the device mesh), fed a synthetic uint8 batch as the host pipeline gives it. It is measured
twice: with the training config's device ops (`data.device_pp_train`, RandAugment, normalisation
and random erasing; --device-pp to change) and with normalisation alone (--plain-device-pp, ''
skips this second measurement), so the difference is what the device augmentation costs.
Inference is the jitted forward in eval mode. Reports compile time, peak device memory and the
model FLOP utilisation from the project's own MAC count (a backward counted as two forwards).
The persistent compilation cache (--cache-dir) lets a second run skip most of the compiling.
Models and XLA options are the model's training config (configs/), with --set and
--compiler-options on top; the header and JSON record the model's `kernels`
(`shunted_jax.kernels`), scan_unroll and compiler options.
"""
import argparse
import json
import pathlib
import platform
import time

import jax
import numpy as np

from shunted_jax import models
from shunted_jax.data import device_ops
from shunted_jax.models.flops import count_macs

# Dense bf16 tensor-core peak (TFLOP/s) by jax device_kind, for the utilisation figure.
PEAK_BF16_TFLOPS = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100": 989.0, "NVIDIA H200": 989.0,
                    "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100-SXM4-40GB": 312.0, "TPU v4": 275.0,
                    "TPU v5 lite": 197.0, "TPU v5p": 459.0}
_CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"
WARMUP_STEPS = 3


def load_training_config(model_name: str):
    """The model's training config file (configs/NAME.py, or configs/FAMILY.py:variant=V for
    pvt_v2_V and vit_V), unlocked."""
    from shunted_jax.train import load_config_file

    spec = str(_CONFIGS / f"{model_name}.py")
    for prefix in ("pvt_v2", "vit"):
        if model_name.startswith(prefix + "_"):
            spec = f"{_CONFIGS / prefix}.py:variant={model_name[len(prefix) + 1:]}"
    config = load_config_file(spec)
    config.unlock()
    return config


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    return out, time.perf_counter() - start


def _peak_memory_gib():
    """Peak bytes of the process so far: inference is measured first so that its figure is its own."""
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use", 0) / 2 ** 30 or None


def bench_train(config, model, batch: int, image_size: int, steps: int, profile_dir=None) -> dict:
    """The train step on one synthetic uint8 batch, with the device ops of `config.data.device_pp_train`."""
    from shunted_jax.train import step

    config.global_batch_size = batch
    mesh = step.make_mesh(config.mesh)
    state, _, train_step, schedule = step.init_training(config, model, mesh, image_size=image_size,
                                                        num_classes=model.num_classes, steps_per_epoch=1000)
    images = step.synthetic_batch(mesh, batch, image_size, model.num_classes)
    start = time.perf_counter()
    compiled = train_step.lower(state, images, schedule).compile()
    compile_s = time.perf_counter() - start
    for _ in range(WARMUP_STEPS):
        state, metrics = compiled(state, images, schedule)
    jax.block_until_ready(metrics)
    if profile_dir:
        with jax.profiler.trace(str(profile_dir), create_perfetto_trace=True):
            for _ in range(WARMUP_STEPS):
                state, metrics = compiled(state, images, schedule)
            jax.block_until_ready(metrics)
        print_profile(profile_dir, "train")
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, images, schedule)
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
    return {"batch": batch, "images_per_s": batch * steps / seconds, "step_ms": 1e3 * seconds / steps,
            "compile_s": compile_s, "loss": float(metrics["loss"]), "device_pp": config.data.device_pp_train}


def print_profile(profile_dir, kind: str) -> None:
    """The GPU kernel time per step by kind, from the trace of WARMUP_STEPS steps just written."""
    from benchmarks import profile_summary

    rows = profile_summary.summarise(profile_dir, WARMUP_STEPS)
    if not rows:
        print(f"{kind}: the trace in {profile_dir} holds no GPU kernels", flush=True)
        return
    print(profile_summary.format_summary(rows, f"{kind}: GPU kernel time per step ({profile_dir})"), flush=True)


def bench_inference(model, mesh, batch: int, image_size: int, steps: int, compiler_options: dict,
                    profile_dir=None) -> dict:
    """The eval-mode forward on `mesh` (the batch split over it, the weights replicated), compiled
    with XLA `compiler_options` (`train.step.parse_compiler_options`)."""
    from shunted_jax.train import step

    images = np.random.default_rng(0).standard_normal((batch, image_size, image_size, 3)).astype(np.float32)
    images = jax.device_put(images, step.batch_sharding(mesh))
    variables = jax.device_put(step.run_on_host(lambda seed: step.initial_variables(model, image_size, seed), 0),
                               step.replicated(mesh))

    def inference(model_variables, batch_images):
        return model.apply(model_variables, batch_images)

    forward = jax.jit(step.on_mesh(inference, mesh), compiler_options=compiler_options)
    start = time.perf_counter()
    compiled = forward.lower(variables, images).compile()
    compile_s = time.perf_counter() - start
    for _ in range(WARMUP_STEPS):
        _timed(compiled, variables, images)
    if profile_dir:
        with jax.profiler.trace(str(profile_dir), create_perfetto_trace=True):
            for _ in range(WARMUP_STEPS):
                logits = compiled(variables, images)
            jax.block_until_ready(logits)
        print_profile(profile_dir, "inference")
    start = time.perf_counter()
    for _ in range(steps):
        logits = compiled(variables, images)
    jax.block_until_ready(logits)
    seconds = time.perf_counter() - start
    return {"batch": batch, "images_per_s": batch * steps / seconds, "step_ms": 1e3 * seconds / steps,
            "compile_s": compile_s}


def utilisation(images_per_s: float, macs_per_image: int, passes: int):
    """Fraction of the device's bf16 peak: 2 FLOPs per MAC, `passes` forwards' worth of work."""
    peak = PEAK_BF16_TFLOPS.get(jax.devices()[0].device_kind)
    return None if peak is None else images_per_s * macs_per_image * 2 * passes / (peak * 1e12)


def run(args) -> dict:
    from shunted_jax.train import step

    overrides = models.parse_overrides(args.set)
    config = load_training_config(args.model)
    config.model.update({"dtype": args.dtype, **overrides})
    if args.compiler_options is not None:
        config.compiler_options = args.compiler_options
    compiler_options = step.parse_compiler_options(config.compiler_options)  # a malformed one fails here
    config.checkpoint.asynchronous = False
    model = step.create_model(config.model, num_classes=1000)
    macs = count_macs(model, (args.image_size, args.image_size))["total"]["all"]
    result = {
        "model": args.model, "overrides": overrides, "dtype": args.dtype, "image_size": args.image_size,
        "kernels": model.kernels, "scan_unroll": config.model.get("scan_unroll"),
        "stem_space_to_depth": config.model.get("stem_space_to_depth"),
        "compiler_options": config.compiler_options,
        "device": jax.devices()[0].device_kind, "device_count": jax.device_count(),
        "jax": jax.__version__, "python": platform.python_version(), "gmacs_per_image": macs / 1e9,
    }
    print(format_header(result), flush=True)
    if args.eval_batch:
        profile = args.profile and f"{args.profile}/inference"
        inference = bench_inference(model, step.make_mesh(config.mesh), args.eval_batch, args.image_size,
                                    args.steps, compiler_options, profile)
        inference["peak_memory_gib"] = _peak_memory_gib()
        inference["mfu"] = utilisation(inference["images_per_s"], macs, passes=1)
        result["inference"] = inference
        print(format_part("inference", inference), flush=True)
    if args.batch:
        parts = {"train": args.device_pp if args.device_pp is not None else config.data.device_pp_train}
        if args.plain_device_pp:
            parts["train_plain"] = args.plain_device_pp
        for kind, device_pp in parts.items():
            config.data.device_pp_train = device_pp
            profile = args.profile and kind == "train" and f"{args.profile}/train"
            train = bench_train(config, model, args.batch, args.image_size, args.steps, profile)
            train["peak_memory_gib"] = _peak_memory_gib()
            train["mfu"] = utilisation(train["images_per_s"], macs, passes=3)
            result[kind] = train
            print(format_part(kind, train), flush=True)
        if "train_plain" in result:
            result["device_augment_cost"] = 1.0 - result["train_plain"]["step_ms"] / result["train"]["step_ms"]
            print(f"  device augmentation: {100 * result['device_augment_cost']:.1f}% of the train step", flush=True)
    return result


def format_header(result: dict) -> str:
    return (f"{result['model']} {result['dtype']} {result['image_size']}px on {result['device_count']} x "
            f"{result['device']} (jax {result['jax']}), {result['gmacs_per_image']:.3f} GMACs/image\n"
            f"  kernels={result['kernels']} scan_unroll={result['scan_unroll']} "
            f"compiler_options={result['compiler_options']!r}")


def format_part(kind: str, r: dict) -> str:
    """One measured part, printed as soon as it is measured (a long compile may outlast the run)."""
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
    memory = f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] else "n/a"
    device_pp = f"\n              device_pp={r['device_pp']!r}" if "device_pp" in r else ""
    return (f"  {kind:<11} batch {r['batch']:>4}: {r['images_per_s']:>9,.0f} img/s  "
            f"({r['step_ms']:.1f} ms/step, compile {r['compile_s']:.1f} s, peak mem {memory}, MFU {mfu}){device_pp}")


def add_measurement_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that say what is measured; benchmarks/torch_reference.py takes them too, so that
    the official PyTorch model is timed as this project's is."""
    parser.add_argument("--batch", type=int, default=128, help="train-step batch (0 skips training)")
    parser.add_argument("--eval-batch", type=int, default=256, help="inference batch (0 skips inference)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20, help=f"timed steps after {WARMUP_STEPS} warm-up steps")
    parser.add_argument("--json", metavar="FILE", help="append the result as one JSON line")


def append_json_line(path, result: dict) -> None:
    """`result` as one line of the JSON-lines file `path` (nothing when `path` is None)."""
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(result) + "\n")


def make_parser() -> argparse.ArgumentParser:
    from configs import common

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=models.list_models())
    add_measurement_arguments(parser)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--profile", metavar="DIR",
                        help="write jax.profiler traces of 3 inference and 3 train steps (with --device-pp's ops) "
                             "under DIR and print their GPU kernel time by kind")
    parser.add_argument("--cache-dir", default=common.COMPILATION_CACHE_DIR,
                        help="persistent compilation cache ('' leaves JAX's own setting: off unless $JAX_COMPILATION_CACHE_DIR)")
    parser.add_argument("--device-pp", metavar="PP",
                        help="the train step's device ops (data.device_ops), instead of the config's data.device_pp_train")
    parser.add_argument("--plain-device-pp", metavar="PP", default=device_ops.EVAL_PP,
                        help="the device ops of the second train measurement, without augmentation ('' skips it)")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="model field overrides")
    parser.add_argument("--compiler-options", metavar="'xla_name=value ...'",
                        help="XLA options of the jitted programs, instead of the config's ('' for XLA's defaults)")
    return parser


def main(argv=None):
    from shunted_jax.train import compilation_cache

    args = make_parser().parse_args(argv)
    compilation_cache.enable(args.cache_dir)
    result = run(args)
    append_json_line(args.json, result)
    return result


if __name__ == "__main__":
    main()
