"""Isolated timings of the attention core, the detail-specific FFN and the depthwise conv at every
Shunted stage shape.

    python -m benchmarks.kernels [attention|pvt_attention|ffn|depthwise|device_ops|all]

Each candidate is jitted, run 3 times to warm up, then timed over 20 runs: inference is the
forward at batch 256, training the forward and backward at batch 128, bf16, head dim 32
(BENCHMARKS.md, "Kernels": the attention timings decide what `kernels="auto"` picks). "depthwise"
times the model's DepthwiseConv3x3 (with the FFN's residual) and FeedForward modules with
`kernels="depthwise=xla"` and `"depthwise=pallas"`.
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


def report(name: str, fn, *args, runs: int = 20) -> None:
    """Mean milliseconds per call, or why the candidate was refused."""
    try:
        compiled = jax.jit(fn).lower(*args).compile()
        for _ in range(3):
            out = compiled(*args)
        jax.block_until_ready(out)
        start = time.perf_counter()
        for _ in range(runs):
            out = compiled(*args)
        jax.block_until_ready(out)
        print(f"{name:60s} {1e3 * (time.perf_counter() - start) / runs:8.3f} ms", flush=True)
    except Exception as error:  # a refused shape is a result: cuDNN rejects some lengths
        print(f"{name:60s} refused: {type(error).__name__}: {str(error)[:120]}", flush=True)


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
    if part in ("device_ops", "all"):
        device_ops_timings()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "all")
