"""Isolated timings of the attention core, the detail-specific FFN and the depthwise conv at every
Shunted stage shape.

    python -m benchmarks.kernels [attention|pvt_attention|ffn|depthwise|depthwise_kernels|depthwise_tilings|
                                  device_ops|all]

Each candidate is jitted, run 3 times to warm up, then timed over 20 runs: inference is the
forward at batch 256, training the forward and backward at batch 128, bf16, head dim 32
(BENCHMARKS.md, "Kernels": the attention timings decide what `kernels="auto"` picks). "depthwise"
times the model's DepthwiseConv3x3 (with the FFN's residual) and FeedForward modules with
`kernels="depthwise=xla"` and `"depthwise=pallas"`. "depthwise_tilings" times each depthwise
kernel alone (the forward, the forward that keeps GELU's slope, the weight and the input
gradient) at every stage shape of shunted_s and pvt_v2_b2 under each candidate tiling, against
the card's memory bound (the bytes the kernel must read and write over its peak bandwidth), and
prints the fastest tiling of each; "depthwise_kernels" times them under the tiling the model uses.
"pvt_attention" runs the attention candidates at PVTv2-b2's shapes (head dim 64, 49 keys) and
first prints the Pallas kernels' largest error against float32 einsums, forward and gradients.
"device_ops" times the train step's device preprocessing on a uint8 batch of 128 x 224^2: the
configs' strings whole, then each RandAugment operation alone on every image (the policy computes
every operation for every image in each layer, then selects: their sum is most of its cost).
"""
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

from shunted_jax.data import device_ops
from shunted_jax.kernels import depthwise
from shunted_jax.kernels.common import local_device, target_for
from shunted_jax.kernels.dispatch import pad_keys
from shunted_jax.kernels.short_attention import short_attention
from shunted_jax.models.ffn import FeedForward
from shunted_jax.models.layers import DepthwiseConv3x3

BF16 = jnp.bfloat16
ATTENTION_SHAPES = [(3136, 49, 1), (3136, 196, 1), (784, 49, 2), (784, 196, 2), (196, 49, 4), (196, 196, 4),
                    (49, 49, 16)]  # (queries, keys, heads)
FFN_SHAPES = [(56, 64, 512), (28, 128, 1024), (14, 256, 1024)]  # (side, channels, hidden)
DEPTHWISE_SHAPES = FFN_SHAPES + [(7, 512, 2048)]
PVT_ATTENTION_SHAPES = [(3136, 49, 1), (784, 49, 2), (196, 49, 5), (49, 49, 8)]  # pvt_v2_b2 at 224, head dim 64


def report(name: str, fn, *args, runs: int = 20, bytes_moved: int = 0):
    """Prints and returns the mean milliseconds per call (None if the candidate was refused), with
    the fraction of the card's memory bound when `bytes_moved` is given."""
    try:
        compiled = jax.jit(fn).lower(*args).compile()
        for _ in range(3):
            out = compiled(*args)
        jax.block_until_ready(out)
        start = time.perf_counter()
        for _ in range(runs):
            out = compiled(*args)
        jax.block_until_ready(out)
    except Exception as error:  # a refused shape is a result: cuDNN rejects some lengths
        print(f"{name:60s} refused: {type(error).__name__}: {str(error)[:120]}", flush=True)
        return None
    ms = 1e3 * (time.perf_counter() - start) / runs
    print(f"{name:60s} {ms:8.3f} ms{memory_bound_note(bytes_moved, ms)}", flush=True)
    return ms


PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100-SXM4-80GB": 2.04e12}
"""Bytes/s of the cards' memory by a part of their device name, the first match wins."""


def peak_bandwidth():
    kind = jax.devices()[0].device_kind
    return next((rate for name, rate in PEAK_BANDWIDTH.items() if name in kind), None)


def memory_bound_note(bytes_moved: int, ms: float) -> str:
    """'  (x GB/s, y% of the memory bound)' for a kernel that must move `bytes_moved`."""
    if not bytes_moved:
        return ""
    rate, peak = bytes_moved / (ms * 1e-3), peak_bandwidth()
    bound = f", {100 * rate / peak:.0f}% of the memory bound" if peak else ""
    return f"  ({rate / 1e9:,.0f} GB/s{bound})"


def training(fn):
    """Forward and backward with respect to every input."""
    return lambda *args: jax.grad(lambda *a: fn(*a).astype(jnp.float32).sum(), argnums=tuple(range(len(args))))(*args)


def einsum_attention(q, k, v, logits_dtype=jnp.float32):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=logits_dtype) * q.shape[-1] ** -0.5
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1).astype(v.dtype), v)


def cudnn_padded(q, k, v):
    k, v, lengths = pad_keys(k, v)
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")


ATTENTION = {
    "exact": einsum_attention,
    "bf16 logits": lambda q, k, v: einsum_attention(q, k, v, BF16),
    "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"),
    "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"),
    "cudnn pad64": cudnn_padded,
    "pallas": lambda q, k, v: short_attention(q, k, v, q.shape[-1] ** -0.5, target_for(q.dtype, local_device())),
}


def check_against_float32(name: str, fn, q, k, v) -> None:
    """Largest |output error| and relative gradient error of a 16-bit attention against float32 einsums."""
    as_float32 = [t.astype(jnp.float32) for t in (q, k, v)]
    out = jax.jit(fn)(q, k, v).astype(jnp.float32)
    want = einsum_attention(*as_float32)
    grads, want_grads = jax.jit(training(fn))(q, k, v), jax.jit(training(einsum_attention))(*as_float32)
    grad_error = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)) / jnp.max(jnp.abs(w)))
                     for g, w in zip(grads, want_grads))
    print(f"check {name}: forward max |error| {float(jnp.max(jnp.abs(out - want))):.4f} "
          f"(outputs up to {float(jnp.max(jnp.abs(want))):.2f}); gradients max relative error {grad_error:.4f}",
          flush=True)


def depthwise_conv(u, w):
    return lax.conv_general_dilated(u, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=u.shape[-1])


def depthwise_shifts(u, w):
    height, width = u.shape[1:3]
    padded = jnp.pad(u, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(padded[:, i:i + height, j:j + width] * w[i, j, 0] for i in range(3) for j in range(3))


@jax.custom_vjp
def depthwise_shifts_conv_backward(u, w):
    return depthwise_shifts(u, w)


depthwise_shifts_conv_backward.defvjp(lambda u, w: (depthwise_shifts(u, w), (u, w)),
                                      lambda res, g: jax.vjp(depthwise_conv, *res)[1](g))

HIDDEN = {
    "conv": lambda u, w, b: u + depthwise_conv(u, w) + b,
    "identity folded into the kernel": lambda u, w, b: depthwise_conv(u, w.at[1, 1, 0].add(1)) + b,
    "9 shifted multiply-adds": lambda u, w, b: u + depthwise_shifts(u, w) + b,
    "shifts forward, conv backward": lambda u, w, b: u + depthwise_shifts_conv_backward(u, w) + b,
}


def detail_ffn(hidden):
    def ffn(x, w1, b1, wd, bd, w2, b2):
        return jax.nn.gelu(hidden(x @ w1 + b1, wd, bd), approximate=False) @ w2 + b2
    return ffn


def module_timings(name: str, module, x) -> None:
    """A Flax module's forward at batch 256 and forward + backward (parameters and input) at 128."""
    variables = module.init(jax.random.key(0), x[:1])
    report(f"{name} fwd b256", module.apply, variables, x)
    report(f"{name} train b128", training(module.apply), variables, x[:128])


SHUNTED_S_MAPS = [(56, 512), (28, 1024), (14, 1024), (7, 2048)]  # (side, hidden) of the FFNs' convs
PVT_V2_B2_MAPS = [(14, 1280)]  # the one FFN map shunted_s does not have
LOCAL_ENHANCEMENT_MAPS = [(56, 64)]  # V's conv in shunted_s' first stage: no GELU, no residual


def conv_tilings(side: int, channels: int):
    """Candidate tilings of the forward and input-gradient kernels: columns per program from the
    whole (padded) row down to 8, 32 to 128 channels, 8 or 16 elements per thread."""
    full = 1 << (side - 1).bit_length()
    found = {depthwise.conv_tiling((1, side, side, channels))}
    for block_w in sorted({full, 32, 16, 8}):
        for block_c in (32, 64, 128):
            for warps in (2, 4, 8):
                if block_w <= full and channels % block_c == 0 and block_w * block_c // (32 * warps) in (8, 16):
                    found.add(depthwise.Tiling(block_w, block_c, warps))
    return sorted(found)


def weight_grad_tilings(side: int, channels: int):
    """Candidate tilings of the weight gradient: whole images or strips of 7 or 8 rows, whole rows
    or strips of 16 columns, 4 to 16 elements of each of the 10 accumulators per thread."""
    full = 1 << (side - 1).bit_length()
    found = {depthwise.weight_grad_tiling((1, side, side, channels))}
    rows = {side} | {next((r for r in (8, 7) if side % r == 0 and r < side), side)}
    for block_h in rows:
        for block_w in sorted({full, 16}):
            for block_c in (32, 64):
                for warps in (4, 8):
                    if block_w <= full and channels % block_c == 0 and block_w * block_c // (32 * warps) in (4, 8, 16):
                        found.add(depthwise.Tiling(block_w, block_c, warps, block_h))
    return sorted(found)


def depthwise_tiling_timings(sweep: bool = True) -> None:
    """Each depthwise kernel alone at each map shape under each candidate tiling (`sweep`) or the
    model's; the fastest of each last."""
    target = target_for(BF16, local_device())
    best = []
    for side, channels in SHUNTED_S_MAPS + PVT_V2_B2_MAPS + LOCAL_ENHANCEMENT_MAPS:
        ffn = (side, channels) not in LOCAL_ENHANCEMENT_MAPS
        keys = jax.random.split(jax.random.key(side * channels), 4)
        x = jax.random.normal(keys[0], (256, side, side, channels), BF16)
        g, slope = (jax.random.normal(k, (128, side, side, channels), BF16) for k in keys[1:3])
        taps = 0.1 * jax.random.normal(keys[3], (9, channels), BF16)
        bias = depthwise._edge_table(taps, taps[0], taps[1], residual=ffn) if ffn else taps[0]
        zeros = jnp.zeros((channels,), BF16)
        element_bytes = 2 * side * side * channels  # bytes of one bf16 map of one image
        kernels = {
            "forward b256": (lambda t: lambda x: depthwise._pallas_conv(x, taps, bias, ffn, target, ffn, tiling=t),
                             (x,), 2 * 256, conv_tilings),
            "input gradient b128": (lambda t: lambda g: depthwise._pallas_conv(g, taps, zeros, ffn, target, tiling=t),
                                    (g,), 2 * 128, conv_tilings),
        }
        if ffn:
            kernels["forward keeping the slope b128"] = (
                lambda t: lambda x: depthwise._pallas_conv(x, taps, bias, True, target, True, True, tiling=t),
                (x[:128],), 3 * 128, conv_tilings)
            kernels["weight gradient with the slope b128"] = (
                lambda t: lambda x, g, s: depthwise._pallas_weight_grad(x, g, s, target, t),
                (x[:128], g, slope), 4 * 128, weight_grad_tilings)
        else:
            kernels["weight gradient b128"] = (lambda t: lambda x, g: depthwise._pallas_weight_grad(x, g, None, target, t),
                                               (x[:128], g), 2 * 128, weight_grad_tilings)
        for kernel, (make, args, maps, tilings) in kernels.items():
            bytes_moved = maps * element_bytes
            model_tiling = (depthwise.weight_grad_tiling if "weight" in kernel else depthwise.conv_tiling)(args[0].shape)
            timed = [(report(f"{side}x{side}x{channels} {kernel} {tuple(t)}", make(t), *args, bytes_moved=bytes_moved), t)
                     for t in (tilings(side, channels) if sweep else [model_tiling])]
            default = timed[[t for _, t in timed].index(model_tiling)][0]
            ms, tiling = min((ms, t) for ms, t in timed if ms is not None)
            best.append(f"{side}x{side}x{channels} {kernel}: {tuple(tiling)} {ms:.3f} ms"
                        f"{memory_bound_note(bytes_moved, ms)}; the default tiling {default:.3f} ms")
    print("fastest tilings (block_w, block_c, warps, block_h):", *best, sep="\n  ")


def device_ops_timings(batch: int = 128, size: int = 224, level: float = 0.9) -> None:
    images = jax.random.randint(jax.random.key(0), (batch, size, size, 3), 0, 256).astype(jnp.uint8)
    keys = device_ops.example_keys(jax.random.key(0), 1, jnp.arange(batch))
    for pp in (device_ops.TRAIN_PP, "randaug(2,9,0.5)", device_ops.EVAL_PP):
        report(f"device ops {pp}", device_ops.build(pp), images, keys)
    floats = images.astype(jnp.float32)
    for op in device_ops.operations():
        if op.apply is not None:
            report(f"operation {op.name}", jax.vmap(lambda image, op=op: op.apply(image, level, 1.0, True)), floats)
    applied = jnp.arange(batch) % 30 == 0  # as often as RandAugment applies an operation
    report("operation Equalize, applied to 1 image in 30", jax.vmap(device_ops.equalize), floats, applied)
    rotate = device_ops.rotation(level * 30.0, size, size)
    report("operation affine warp (Rotate, ShearX/Y, TranslateX/YRel)",
           jax.vmap(lambda image: device_ops.affine(image, rotate)), floats)


def main(part: str) -> None:
    key = jax.random.key(0)
    if part in ("attention", "all"):
        for queries, keys, heads in ATTENTION_SHAPES:
            q = jax.random.normal(key, (256, queries, heads, 32), BF16)
            k = jax.random.normal(key, (256, keys, heads, 32), BF16)
            for name, fn in ATTENTION.items():
                report(f"attention {name} {queries}x{keys} h{heads} fwd b256", fn, q, k, k)
                report(f"attention {name} {queries}x{keys} h{heads} train b128", training(fn), q[:128], k[:128], k[:128])
    if part in ("pvt_attention", "all"):
        for queries, keys, heads in PVT_ATTENTION_SHAPES:
            q, k, v = (jax.random.normal(part_key, (256, n, heads, 64), BF16)
                       for part_key, n in zip(jax.random.split(key, 3), (queries, keys, keys)))
            check_against_float32(f"{queries}x{keys} h{heads} d64", ATTENTION["pallas"], q[:32], k[:32], v[:32])
            for name in ("exact", "xla", "cudnn", "cudnn pad64", "pallas"):
                report(f"attention {name} {queries}x{keys} h{heads} d64 fwd b256", ATTENTION[name], q, k, v)
                report(f"attention {name} {queries}x{keys} h{heads} d64 train b128", training(ATTENTION[name]),
                       q[:128], k[:128], v[:128])
    if part in ("ffn", "all"):
        for side, channels, hidden in FFN_SHAPES:
            shapes = [(channels, hidden), (hidden,), (3, 3, 1, hidden), (hidden,), (hidden, channels), (channels,)]
            params = [0.05 * jax.random.normal(key, s, BF16) for s in shapes]
            x = jax.random.normal(key, (256, side, side, channels), BF16)
            for name, fn in HIDDEN.items():
                report(f"ffn {name} {side}x{side}x{channels}->{hidden} fwd b256", detail_ffn(fn), x, *params)
                report(f"ffn {name} {side}x{side}x{channels}->{hidden} train b128", training(detail_ffn(fn)),
                       x[:128], *params)
    if part in ("depthwise", "all"):
        for side, channels, hidden in DEPTHWISE_SHAPES:
            for impl in ("xla", "pallas"):
                module_timings(f"depthwise {impl} {side}x{side}x{hidden}",
                               DepthwiseConv3x3(hidden, residual=True, dtype=BF16, kernels=f"depthwise={impl}"),
                               jax.random.normal(key, (256, side, side, hidden), BF16))
                module_timings(f"ffn module, depthwise {impl} {side}x{side}x{channels}->{hidden}",
                               FeedForward(hidden, dtype=BF16, kernels=f"depthwise={impl}"),
                               jax.random.normal(key, (256, side, side, channels), BF16))
    if part in ("depthwise_tilings", "depthwise_kernels", "all"):
        depthwise_tiling_timings(sweep=part != "depthwise_kernels")
    if part in ("device_ops", "all"):
        device_ops_timings()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "all")
