"""The one place that chooses how an operation runs: a Pallas kernel, cuDNN or XLA.

A model holds one string field, `kernels`, and passes it to `attention`, `depthwise_conv3x3` and
`layer_norm`, which choose per call from it, the shapes, the dtype and the device (`Device`). The
string (`parse`):

  "auto"   per call: the Pallas kernels on a CUDA GPU of compute capability 8.0 or newer for
           16-bit inputs of shapes they take; cuDNN's fused attention on a GPU for 16-bit
           attentions large enough to gain from it; XLA's exact formulas everywhere else (CPU,
           TPU, older GPUs; float32 and float64 stay exact).
  "exact"  XLA's exact formulas for every operation (attention=exact,depthwise=xla,norm=xla).
  "attention=pallas,norm=xla"   one implementation per named operation, "auto" for the others
           (after a leading "auto" or "exact", that one's): IMPLEMENTATIONS lists them.

A Pallas call has no sharding rule: given a batch sharded over a mesh, XLA would gather it onto
every device. Under a mesh in context (`jax.set_mesh`, or `jax.sharding.use_abstract_mesh` inside
a traced function, as the training code's steps do), each Pallas kernel therefore runs in a
`shard_map` on each device's share of the batch, split along the leading axis over every axis of
the mesh, its weights replicated; without one, on the whole batch, as on one device.
"""
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec

from shunted_jax.kernels import depthwise, norm, short_attention
from shunted_jax.kernels.common import Device, accumulator, local_device, target_for

IMPLEMENTATIONS = {
    "attention": ("auto", "exact", "xla", "cudnn", "pallas"),
    "depthwise": ("auto", "xla", "pallas"),
    "norm": ("auto", "xla", "pallas"),
}
"""Per operation. attention: "exact" einsums with the softmax in float32 (float64 for float64
inputs); "xla" / "cudnn" jax.nn.dot_product_attention with that implementation (its softmax is
always float32); "pallas" the short-key kernels (`short_attention`). depthwise and norm: "xla"
the exact convolution / LayerNorm formulas; "pallas" the kernels of `depthwise` / `norm`."""
EXACT = {"attention": "exact", "depthwise": "xla", "norm": "xla"}

# "auto"'s attention thresholds, from BENCHMARKS.md's kernel tables (bf16, head dim 32): the
# Pallas kernels beat cuDNN and the einsums at 49 keys and lose to cuDNN at 196; cuDNN beats the
# einsums from 784 queries x 49 keys per head up and loses below.
PALLAS_AUTO_MAX_KEYS = 64
CUDNN_MIN_LOGITS_PER_HEAD = 784 * 49
FUSED_DTYPES = (jnp.bfloat16, jnp.float16)


class Choice(NamedTuple):
    """A parsed `kernels` string."""
    attention: str = "auto"
    depthwise: str = "auto"
    norm: str = "auto"


def _usage(kernels: str) -> str:
    choices = "; ".join(f"{op}: {'|'.join(impls)}" for op, impls in IMPLEMENTATIONS.items())
    return (f"Invalid kernels={kernels!r}: write 'auto', 'exact' or comma-separated operation=implementation "
            f"items such as 'attention=pallas,depthwise=xla,norm=auto' ({choices}).")


def parse(kernels: str) -> Choice:
    """The `kernels` string as a Choice; a ValueError that says what to write for anything else."""
    if not isinstance(kernels, str):
        raise ValueError(_usage(kernels))
    return _parse(kernels)


@functools.lru_cache(maxsize=None)
def _parse(kernels: str) -> Choice:
    choice = {}
    for position, item in enumerate(part.strip() for part in kernels.split(",")):
        if item in ("auto", "exact") and position == 0:
            choice = dict.fromkeys(IMPLEMENTATIONS, "auto") if item == "auto" else dict(EXACT)
            continue
        key, _, value = item.partition("=")
        if key in IMPLEMENTATIONS and value in IMPLEMENTATIONS[key]:
            choice[key] = value
        elif key in IMPLEMENTATIONS and value:
            raise ValueError(f"Unknown {key} implementation {value!r} in kernels={kernels!r}; choose one of "
                             f"{', '.join(IMPLEMENTATIONS[key])}.")
        else:
            raise ValueError(_usage(kernels))
    return Choice(**choice)


def _batch_axes() -> tuple[str, ...]:
    """The axes of the mesh in context that the kernels split the batch over: all but those
    already manual (inside a user's shard_map, the kernels see that map's share)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return ()
    return tuple(name for name, kind in zip(mesh.axis_names, mesh.axis_types) if kind != AxisType.Manual)


def _shards() -> int:
    """How many devices share the batch under the mesh in context (1 without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[axis] for axis in _batch_axes())


def per_device(fn, *arrays, batched: int = 1):
    """fn(*arrays) with the first `batched` arrays split along their leading (batch) axis over the
    mesh in context and the others replicated, each device running fn on its share: a Pallas
    kernel is a per-image computation, so nothing is exchanged inside it, and the gradients of
    the replicated arrays are summed over the devices when differentiated."""
    axes = _batch_axes()
    if not axes:
        return fn(*arrays)
    split = PartitionSpec(axes)
    specs = (split,) * batched + (PartitionSpec(),) * (len(arrays) - batched)
    # A pallas_call states no varying-manual-axes type, so the map is not type-checked for it.
    return jax.shard_map(fn, mesh=jax.sharding.get_abstract_mesh(), in_specs=specs, out_specs=split,
                         check_vma=False)(*arrays)


def _pallas_fits(dtype, batch: int, device: Device, shards: int) -> bool:
    """The rule of every "auto" choice of a Pallas kernel: 16-bit inputs on a GPU that compiles
    the kernels, and a batch that the devices sharing it divide."""
    return device.compiles_pallas and jnp.dtype(dtype).itemsize == 2 and batch % shards == 0


def _check_forced_pallas(operation: str, batch: int, device: Device, shards: int) -> None:
    """A forced Pallas kernel runs where it can, or stops with what to do: compiled on a GPU that
    takes it, through Pallas' interpreter off the GPU."""
    if device.platform == "gpu" and not device.compiles_pallas:
        raise ValueError(f"kernels {operation}=pallas needs a CUDA GPU of compute capability 8.0 or newer (Ampere, "
                         f"Hopper); this one is {device.describe()}: use {operation}=auto.")
    if batch % shards:
        raise ValueError(f"kernels {operation}=pallas runs each device's share of the batch, but a batch of {batch} "
                         f"does not split over the {shards} devices of the mesh: use {operation}=auto or a batch "
                         f"divisible by {shards}.")


def choose_attention(kernels: str, batch: int, queries: int, keys: int, head_dim: int, dtype, device: Device,
                     shards: int = 1) -> str:
    """The attention implementation for a batch of (queries x keys, head_dim) attentions, whose
    batch `shards` devices share."""
    choice = parse(kernels)
    if choice.attention == "pallas":
        if keys > short_attention.MAX_KEYS:
            raise ValueError(f"kernels attention=pallas takes at most {short_attention.MAX_KEYS} keys, this layer has "
                             f"{keys}: use attention=auto.")
        _check_forced_pallas("attention", batch, device, shards)
    if choice.attention != "auto":
        return choice.attention
    if (keys <= PALLAS_AUTO_MAX_KEYS and short_attention.takes(keys, head_dim)
            and _pallas_fits(dtype, batch, device, shards)):
        return "pallas"
    fused = (device.platform == "gpu" and jnp.dtype(dtype) in FUSED_DTYPES and queries % 2 == 0
             and queries * keys >= CUDNN_MIN_LOGITS_PER_HEAD)
    return "cudnn" if fused else "exact"


def choose_depthwise(kernels: str, batch: int, channels: int, dtype, device: Device, shards: int = 1) -> str:
    """The depthwise-conv implementation for a batch of maps of `channels` channels."""
    choice = parse(kernels)
    tiled = depthwise.takes(channels)
    if choice.depthwise == "auto":
        return "pallas" if tiled and _pallas_fits(dtype, batch, device, shards) else "xla"
    if choice.depthwise == "pallas":
        if not tiled:
            raise ValueError(f"kernels depthwise=pallas needs a multiple of {depthwise.MIN_CHANNEL_BLOCK} channels, "
                             f"this map has {channels}: use depthwise=xla or depthwise=auto.")
        _check_forced_pallas("depthwise", batch, device, shards)
    return choice.depthwise


def choose_norm(kernels: str, batch: int, dtype, device: Device, shards: int = 1) -> str:
    """The LayerNorm implementation for a batch whose output is of `dtype`."""
    choice = parse(kernels)
    if choice.norm == "auto":
        return "pallas" if _pallas_fits(dtype, batch, device, shards) else "xla"
    if choice.norm == "pallas":
        _check_forced_pallas("norm", batch, device, shards)
    return choice.norm


def _gelu(x):
    return jax.nn.gelu(x, approximate=False)


def exact_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v as einsums, the logits and softmax in float32 (float64 for
    float64 inputs); returns the output and the probabilities (B, heads, queries, keys)."""
    logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=logits_dtype) * q.shape[-1] ** -0.5
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v), probs


def pad_keys(k, v, multiple: int = 64):
    """K and V padded along the keys to a multiple of `multiple`, and the true key count per
    example (for `key_value_seq_lengths`, which masks the padding out of the softmax)."""
    keys = k.shape[1]
    pad = ((0, 0), (0, -(-keys // multiple) * multiple - keys), (0, 0), (0, 0))
    return jnp.pad(k, pad), jnp.pad(v, pad), jnp.full((k.shape[0],), keys, jnp.int32)


def _fused_attention(q, k, v, scale: float, implementation: str):
    """jax.nn.dot_product_attention. For cuDNN an odd key count (49) is padded and masked by
    length, because its training kernels refuse odd sequence lengths."""
    lengths = None
    if implementation == "cudnn" and k.shape[1] % 2:
        k, v, lengths = pad_keys(k, v)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, key_value_seq_lengths=lengths,
                                        implementation=implementation)


def attention(q, k, v, kernels: str = "auto"):
    """softmax(q k^T / sqrt(d)) v over (B, tokens, heads, head_dim) arrays."""
    device = local_device()
    implementation = choose_attention(kernels, q.shape[0], q.shape[1], k.shape[1], q.shape[-1], q.dtype, device,
                                      _shards())
    scale = q.shape[-1] ** -0.5
    if implementation == "exact":
        return exact_attention(q, k, v)[0]
    if implementation == "pallas":
        kernel = functools.partial(short_attention.short_attention, scale=scale, target=target_for(q.dtype, device))
        return per_device(kernel, q, k, v, batched=3)
    return _fused_attention(q, k, v, scale, implementation)


class PendingBias(NamedTuple):
    """A map whose bias is still to be added: `map + bias`, left to the depthwise conv that reads
    it, whose Pallas kernel folds the bias into its own (no pass over the map adds it)."""
    map: jax.Array
    bias: jax.Array

    @property
    def shape(self):
        return self.map.shape

    @property
    def ndim(self):
        return self.map.ndim


def depthwise_conv3x3(x, kernel, bias, kernels: str = "auto", *, residual: bool = False, apply_gelu: bool = False):
    """z = DWConv3x3(u) + bias (+ u with `residual`), then GELU(z) with `apply_gelu`: stride 1,
    padding 1, `kernel` (3, 3, 1, C) and `bias` (C,) in the compute dtype. u is x, an NHWC map
    (cast to the kernel's dtype), or x.map + x.bias for a PendingBias."""
    input_bias = None
    if isinstance(x, PendingBias):
        x, input_bias = x
    x = jnp.asarray(x, kernel.dtype)
    if input_bias is not None:
        input_bias = jnp.asarray(input_bias, x.dtype)
    channels = kernel.shape[-1]
    device = local_device()
    if choose_depthwise(kernels, x.shape[0], channels, x.dtype, device, _shards()) == "pallas":
        conv = functools.partial(depthwise.pallas_depthwise, residual=residual, apply_gelu=apply_gelu,
                                 target=target_for(x.dtype, device))
        return per_device(conv, x, kernel.reshape(9, channels), bias, input_bias)
    if input_bias is not None:
        x = x + input_bias
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)
    y = y + bias
    if residual:
        y = x + y
    return _gelu(y) if apply_gelu else y


def _xla_layer_norm(x, scale, bias, epsilon, acc):
    """nn.LayerNorm's formulas (use_fast_variance=False)."""
    x = x.astype(acc)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias


def layer_norm(x, scale, bias, kernels: str = "auto", *, epsilon: float, dtype, apply_gelu: bool = False):
    """LayerNorm over the last axis in `dtype`, then the exact GELU with `apply_gelu`: float32
    statistics (float64 for float64) with the two-pass variance, as torch computes it, and
    'scale' and 'bias' used in that accumulator dtype."""
    channels = x.shape[-1]
    acc = accumulator(jnp.promote_types(x.dtype, dtype))
    scale, bias = scale.astype(jnp.promote_types(scale.dtype, acc)), bias.astype(jnp.promote_types(bias.dtype, acc))
    device = local_device()
    if choose_norm(kernels, x.shape[0], dtype, device, _shards()) == "pallas":
        target = target_for(acc, device)

        def rows(x, scale, bias):
            y = norm.pallas_layer_norm(x.reshape(-1, channels), scale, bias, epsilon, apply_gelu, dtype, target)
            return y.reshape(x.shape)
        return per_device(rows, x, scale, bias)
    y = _xla_layer_norm(x, scale, bias, epsilon, acc).astype(dtype)
    return _gelu(y) if apply_gelu else y
