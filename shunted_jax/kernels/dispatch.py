"""The one place that chooses how an operation runs: a Pallas kernel, cuDNN or XLA.

A model holds one string field, `kernels`, and passes it to `attention`, `depthwise_conv3x3` and
`layer_norm`, which choose per call from it, the shapes, the dtype, the backend and the devices
of the mesh. The string (`parse`):

  "auto"   per call: the Pallas kernels on one GPU for 16-bit inputs of shapes they take; cuDNN's
           fused attention on a GPU for 16-bit attentions large enough to gain from it; XLA's
           exact formulas everywhere else (CPU, TPU, float32 and float64 stay exact).
  "exact"  XLA's exact formulas for every operation (attention=exact,depthwise=xla,norm=xla).
  "attention=pallas,norm=xla"   one implementation per named operation, "auto" for the others
           (after a leading "auto" or "exact", that one's): IMPLEMENTATIONS lists them.
  "...,devices=8"   written by `resolve_for_mesh`: the devices of the mesh the model runs on.
           "auto" takes no Pallas kernel over several: a Pallas call has no sharding rule, so XLA
           would gather a batch-sharded input onto every device. Without it: one device.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from shunted_jax.kernels import depthwise, norm, short_attention
from shunted_jax.kernels.common import accumulator, target_for

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
    devices: int = 1


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
    devices = 1
    for position, item in enumerate(part.strip() for part in kernels.split(",")):
        if item in ("auto", "exact") and position == 0:
            choice = dict.fromkeys(IMPLEMENTATIONS, "auto") if item == "auto" else dict(EXACT)
            continue
        key, _, value = item.partition("=")
        if key == "devices" and value.isdigit() and int(value) >= 1:
            devices = int(value)
        elif key in IMPLEMENTATIONS and value in IMPLEMENTATIONS[key]:
            choice[key] = value
        elif key in IMPLEMENTATIONS and value:
            raise ValueError(f"Unknown {key} implementation {value!r} in kernels={kernels!r}; choose one of "
                             f"{', '.join(IMPLEMENTATIONS[key])}.")
        else:
            raise ValueError(_usage(kernels))
    return Choice(**choice, devices=devices)


def _format(choice: Choice) -> str:
    implementations = choice._asdict()
    devices = implementations.pop("devices")
    if set(implementations.values()) == {"auto"}:
        text = "auto"
    elif implementations == EXACT:
        text = "exact"
    else:
        text = ",".join(f"{op}={impl}" for op, impl in implementations.items())
    return text if devices == 1 else f"{text},devices={devices}"


def resolve_for_mesh(kernels: str, mesh: jax.sharding.Mesh | None) -> str:
    """`kernels` for a model whose steps run on `mesh` (None: on one device). Call it before
    creating the model: "auto" then takes the Pallas kernels on a one-device mesh, however many
    devices the host has, and none on a mesh of several."""
    devices = 1 if mesh is None else mesh.devices.size
    return _format(parse(kernels)._replace(devices=devices))


def _pallas_fits(dtype, backend: str, devices: int) -> bool:
    """The rule of every "auto" choice of a Pallas kernel: 16-bit inputs on one GPU."""
    return backend == "gpu" and devices == 1 and jnp.dtype(dtype).itemsize == 2


def choose_attention(kernels: str, queries: int, keys: int, head_dim: int, dtype, backend: str) -> str:
    """The attention implementation for one (queries x keys, head_dim) attention."""
    choice = parse(kernels)
    if choice.attention == "pallas" and keys > short_attention.MAX_KEYS:
        raise ValueError(f"kernels attention=pallas takes at most {short_attention.MAX_KEYS} keys, this layer has "
                         f"{keys}: use attention=auto.")
    if choice.attention != "auto":
        return choice.attention
    if (keys <= PALLAS_AUTO_MAX_KEYS and short_attention.takes(keys, head_dim)
            and _pallas_fits(dtype, backend, choice.devices)):
        return "pallas"
    fused = (backend == "gpu" and jnp.dtype(dtype) in FUSED_DTYPES and queries % 2 == 0
             and queries * keys >= CUDNN_MIN_LOGITS_PER_HEAD)
    return "cudnn" if fused else "exact"


def choose_depthwise(kernels: str, channels: int, dtype, backend: str) -> str:
    """The depthwise-conv implementation for a map of `channels` channels."""
    choice = parse(kernels)
    tiled = depthwise.takes(channels)
    if choice.depthwise == "auto":
        return "pallas" if _pallas_fits(dtype, backend, choice.devices) and tiled else "xla"
    if choice.depthwise == "pallas" and not tiled:
        raise ValueError(f"kernels depthwise=pallas needs a multiple of {depthwise.MIN_CHANNEL_BLOCK} channels, this "
                         f"map has {channels}: use depthwise=xla or depthwise=auto.")
    return choice.depthwise


def choose_norm(kernels: str, dtype, backend: str) -> str:
    """The LayerNorm implementation for an output of `dtype`."""
    choice = parse(kernels)
    if choice.norm == "auto":
        return "pallas" if _pallas_fits(dtype, backend, choice.devices) else "xla"
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
    backend = jax.default_backend()
    implementation = choose_attention(kernels, q.shape[1], k.shape[1], q.shape[-1], q.dtype, backend)
    scale = q.shape[-1] ** -0.5
    if implementation == "exact":
        return exact_attention(q, k, v)[0]
    if implementation == "pallas":
        return short_attention.short_attention(q, k, v, scale, target_for(q.dtype, backend))
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
    backend = jax.default_backend()
    if choose_depthwise(kernels, channels, x.dtype, backend) == "pallas":
        return depthwise.pallas_depthwise(x, kernel.reshape(9, channels), bias, input_bias, residual, apply_gelu,
                                          target_for(x.dtype, backend))
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
    backend = jax.default_backend()
    if choose_norm(kernels, dtype, backend) == "pallas":
        y = norm.pallas_layer_norm(x.reshape(-1, channels), scale, bias, epsilon, apply_gelu, dtype,
                                   target_for(acc, backend))
        return y.reshape(x.shape)
    y = _xla_layer_norm(x, scale, bias, epsilon, acc).astype(dtype)
    return _gelu(y) if apply_gelu else y
