"""Images/s of the official PyTorch Shunted model, and of timm's PVTv2, measured the way
`benchmarks.step` measures ours, so that the comparison can be made again on any GPU, beside ours.

    python -m benchmarks.torch_reference --official PATH/SSA.py --model shunted_s [--compile [MODE]]
        [--batch 128] [--eval-batch 256] [--steps 20] [--json FILE]
    python -m benchmarks.torch_reference --model pvt_v2_b2 [--compile [MODE]] ...

PATH is a checkout of OliverRensu/Shunted-Transformer (its SSA.py imports timm); none of its code
is in this repository. The PVTv2 models come from timm (`timm.create_model`), which PVT's own
repository builds on. Synthetic data on the device, 224x224, bf16 autocast. The train step: mixup
of the batch with its reverse (soft targets, as the official recipe's mixup gives), forward,
soft-target cross-entropy, backward, fused AdamW (lr 1e-3, weight decay 0.05), parameters and
optimizer state in float32. Inference: eval mode under `torch.inference_mode`. With `--compile`
the model is `torch.compile`d (mode "default"; `--compile reduce-overhead` adds CUDA graphs, each
step marked as one for them) and the first step's extra time is reported as the compile time.
Each part: the same warm-up steps as `benchmarks.step`, then `--steps` timed ones between
device synchronisations. Run it where shunted_jax is importable (installed, or on PYTHONPATH).
"""
import argparse
import importlib.util
import pathlib
import platform
import sys
import time

import torch
import torch.nn.functional as F

from benchmarks.step import WARMUP_STEPS, add_measurement_arguments, append_json_line

NUM_CLASSES = 1000
SHUNTED = ("shunted_t", "shunted_s", "shunted_b")
TIMM = ("pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2", "pvt_v2_b2_li", "pvt_v2_b3", "pvt_v2_b4", "pvt_v2_b5")
MIX = 0.7  # weight of each image against its partner in the reversed batch
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def load_official(path: pathlib.Path):
    """The official module SSA.py, imported from its file."""
    if not path.is_file():
        sys.exit(f"{path} is not a file: pass --official PATH/SSA.py from a checkout of "
                 "OliverRensu/Shunted-Transformer.")
    spec = importlib.util.spec_from_file_location("official_ssa", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # timm's register_model looks its caller up there
    spec.loader.exec_module(module)
    return module


def create_model(name: str, official):
    """The official Shunted model from SSA.py, or timm's PVTv2."""
    if name in SHUNTED:
        if official is None:
            sys.exit(f"--model {name} needs --official PATH/SSA.py from a checkout of OliverRensu/Shunted-Transformer.")
        return getattr(load_official(pathlib.Path(official)), name)(num_classes=NUM_CLASSES)
    import timm
    return timm.create_model(name, num_classes=NUM_CLASSES)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device: torch.device, steps: int) -> tuple[float, float]:
    """(seconds of the first call, seconds per call over `steps` calls after the warm-ups)."""
    start = time.perf_counter()
    step()
    synchronize(device)
    first = time.perf_counter() - start
    for _ in range(WARMUP_STEPS - 1):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return first, (time.perf_counter() - start) / steps


def synthetic_batch(batch: int, image_size: int, device: torch.device):
    """Random images and one-hot labels, on the device."""
    generator = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator).to(device)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator).to(device)
    one_hot = F.one_hot(labels, NUM_CLASSES).float()
    return images, one_hot


def new_step(cuda_graphs: bool) -> None:
    """Tells torch.compile's CUDA graphs that a step begins, so that it may reuse the memory of
    the last step's outputs."""
    if cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()


def train_step_fn(model, optimizer, images, one_hot, device: torch.device, cuda_graphs: bool = False):
    """One step of training; the mixing is in the step, as the JAX step's on-device mixup is."""
    def step():
        new_step(cuda_graphs)
        mixed = MIX * images + (1 - MIX) * images.flip(0)
        targets = MIX * one_hot + (1 - MIX) * one_hot.flip(0)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(mixed)
        loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss
    return step


def measured(batch: int, first: float, per_step: float, compiled: bool, device: torch.device) -> dict:
    result = {"batch": batch, "images_per_s": batch / per_step, "step_ms": 1e3 * per_step,
              "compile_s": first - per_step if compiled else None, "peak_memory_gib": None}
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
    return result


def run(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = create_model(args.model, args.official).to(device)
    runner = torch.compile(model, mode=args.compile) if args.compile else model
    cuda_graphs = args.compile in CUDA_GRAPH_MODES
    result = {"model": args.model, "framework": "torch", "compile": args.compile, "image_size": args.image_size,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "python": platform.python_version()}
    source = "official" if args.model in SHUNTED else "timm"
    how = f"torch.compile mode={args.compile}" if args.compile else "eager"
    print(f"{source} {args.model} (PyTorch {torch.__version__}, {how}) "
          f"bf16 autocast {args.image_size}px on {result['device']}", flush=True)
    if args.eval_batch:
        model.eval()
        images = torch.randn(args.eval_batch, 3, args.image_size, args.image_size, device=device)

        @torch.inference_mode()
        def infer():
            new_step(cuda_graphs)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return runner(images)

        result["inference"] = measured(args.eval_batch, *time_steps(infer, device, args.steps), args.compile, device)
        print(format_part("inference", result["inference"]), flush=True)
    if args.batch:
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05,
                                      fused=device.type == "cuda")
        step = train_step_fn(runner, optimizer, *synthetic_batch(args.batch, args.image_size, device), device,
                             cuda_graphs)
        result["train"] = measured(args.batch, *time_steps(step, device, args.steps), args.compile, device)
        print(format_part("train", result["train"]), flush=True)
    return result


def format_part(kind: str, r: dict) -> str:
    compile_s = f", compile {r['compile_s']:.1f} s" if r["compile_s"] is not None else ""
    memory = f", peak mem {r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else ""
    return (f"  {kind:<9} batch {r['batch']:>4}: {r['images_per_s']:>9,.0f} img/s  "
            f"({r['step_ms']:.1f} ms/step{compile_s}{memory})")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", metavar="PATH/SSA.py", help="the official model file (for the Shunted models)")
    parser.add_argument("--model", required=True, choices=SHUNTED + TIMM)
    parser.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, metavar="MODE",
                        help="torch.compile the model in MODE (default: default; reduce-overhead adds CUDA graphs)")
    add_measurement_arguments(parser)
    return parser


def main(argv=None):
    args = make_parser().parse_args(argv)
    result = run(args)
    append_json_line(args.json, result)
    return result


if __name__ == "__main__":
    main()
