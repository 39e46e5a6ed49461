"""Attention over a feature map: PVT's spatial-reduction attention and Shunted self-attention.

Every module takes an NHWC map (B, H, W, C) and returns one of the same shape. Tokens are the
map reshaped row-major, heads own contiguous channel blocks ("head-major"), and K/V projections
hold K in their first half and V in their second, as in the official code.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from shunted_jax import kernels
from shunted_jax.models.layers import TORCH_NORM_EPS, ColumnBlockDense, DepthwiseConv3x3, conv, dense, layer_norm

Dtype = Any

POOL_SCOPE = "adaptive_avg_pool"  # a pooling, not a layer: the MAC counter skips it, as torch's does


def multi_head_attention(module: nn.Module, q, k, v):
    """softmax(q k^T / sqrt(d)) v over (B, tokens, heads, head_dim) arrays, run as
    `module.kernels` chooses. With the 'intermediates' collection mutable, the exact einsums
    run and store the attention probabilities there, for pictures of what each head looks at."""
    if not module.is_mutable_collection("intermediates"):
        return kernels.attention(q, k, v, module.kernels)
    out, probs = kernels.exact_attention(q, k, v)
    module.sow("intermediates", "attention_probs", probs)
    return out


def split_heads(x, num_heads: int):
    """(B, ..., C) map or tokens -> (B, tokens, heads, C // heads), head-major channels."""
    return x.reshape(x.shape[0], -1, num_heads, x.shape[-1] // num_heads)


def adaptive_avg_pool(x, size: int):
    """PyTorch's AdaptiveAvgPool2d on NHWC: bin i covers [floor(i L / s), ceil((i + 1) L / s)).

    Bins overlap when s does not divide L and repeat rows when L < s; written as two averaging
    matrices so that it is exact for every size.
    """

    def weights(length):
        w = np.zeros((size, length))
        for i in range(size):
            lo, hi = (i * length) // size, -((-(i + 1) * length) // size)
            w[i, lo:hi] = 1.0 / (hi - lo)
        return jnp.asarray(w, x.dtype)

    with jax.named_scope(POOL_SCOPE):
        return jnp.einsum("ih,bhwc,jw->bijc", weights(x.shape[1]), x, weights(x.shape[2]))


class SpatialReductionAttention(nn.Module):
    """PVT's SRA: keys/values from the map reduced by a stride-r conv, or (linear SRA, PVTv2-li)
    from a 7x7 adaptive average pool followed by a 1x1 conv and GELU."""

    num_heads: int
    sr_ratio: int = 1
    linear: bool = False
    pool_size: int = 7
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = x.shape[-1]
        q = split_heads(dense(dim, name="q", **kw)(x), self.num_heads)
        if self.linear:
            t = conv(dim, 1, name="sr", **kw)(adaptive_avg_pool(x, self.pool_size))
            t = layer_norm(TORCH_NORM_EPS, name="norm", apply_gelu=True, kernels=self.kernels, **kw)(t)
        elif self.sr_ratio > 1:
            t = conv(dim, self.sr_ratio, stride=self.sr_ratio, name="sr", **kw)(x)
            t = layer_norm(TORCH_NORM_EPS, name="norm", kernels=self.kernels, **kw)(t)
        else:
            t = x
        kv = dense(2 * dim, name="kv", **kw)(t)
        k, v = split_heads(kv[..., :dim], self.num_heads), split_heads(kv[..., dim:], self.num_heads)
        out = multi_head_attention(self, q, k, v)
        return dense(dim, name="proj", **kw)(out.reshape(x.shape))


class MultiScaleAttention(nn.Module):
    """The fields of an attention whose keys/values are aggregated at several `rates`."""

    num_heads: int
    rates: Sequence[int]
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernels: str = "auto"


class ShuntedSelfAttention(MultiScaleAttention):
    """Shunted self-attention: heads split into equal groups, group g attending to keys/values
    aggregated at its own rate `rates[g]`.

    For each group: a kernel = stride = rate conv (a 1x1 conv at rate 1), LayerNorm, GELU, a
    K/V projection, and local enhancement (a depthwise 3x3 conv) added to V before attention.
    The official model uses rates (r, r/2) on two halves of the heads for r > 1, and for
    r = 1 the single-group form `rates == (1,)`: plain attention over all tokens with the
    local enhancement of V added to the attention output instead.
    """

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = x.shape[-1]
        groups = len(self.rates)
        if self.num_heads % groups:
            raise ValueError(
                f"{self.num_heads} heads cannot be split into {groups} groups (rates {tuple(self.rates)}): "
                "choose a head count divisible by the number of rates."
            )
        if tuple(self.rates) == (1,):
            out = self._global_attention(x, kw)
        else:
            out = self._grouped_attention(x, kw)
        return dense(dim, name="proj", **kw)(out)

    def _global_attention(self, x, kw):
        dim = x.shape[-1]
        q = split_heads(dense(dim, name="q", **kw)(x), self.num_heads)
        kv = dense(2 * dim, name="kv", **kw)(x)
        k, v = kv[..., :dim], kv[..., dim:]
        out = multi_head_attention(self, q, split_heads(k, self.num_heads), split_heads(v, self.num_heads))
        return out.reshape(x.shape) + DepthwiseConv3x3(dim, kernels=self.kernels, name="local_conv", **kw)(v)

    def _grouped_attention(self, x, kw):
        groups = len(self.rates)
        heads = self.num_heads // groups
        width = x.shape[-1] // groups
        queries = ColumnBlockDense(x.shape[-1], groups, name="q", **kw)(x)
        outputs = []
        for g, (rate, q) in enumerate(zip(self.rates, queries), start=1):
            k, v = aggregated_keys_values(x, rate, width, g, self.kernels, kw)
            outputs.append(multi_head_attention(self, split_heads(q, heads), split_heads(k, heads),
                                                split_heads(v, heads)))
        return jnp.concatenate(outputs, axis=2).reshape(x.shape)


def aggregated_keys_values(x, rate: int, width: int, group: int, execution: str, kw):
    """One SSA scale: kernel = stride = `rate` conv, LayerNorm, GELU, a K/V projection to `width`
    channels each, and V's local enhancement (a depthwise 3x3 conv). Returns NHWC (k, v).

    Called inside a compact `__call__`; its layers are named sr{g}, norm{g}, kv{g}, local_conv{g}
    and run as the `execution` string (the module's `kernels` field) chooses.
    """
    t = conv(x.shape[-1], rate, stride=rate, name=f"sr{group}", **kw)(x)
    t = layer_norm(TORCH_NORM_EPS, name=f"norm{group}", apply_gelu=True, kernels=execution, **kw)(t)
    kv = dense(2 * width, name=f"kv{group}", **kw)(t)
    k, v = kv[..., :width], kv[..., width:]
    return k, DepthwiseConv3x3(width, residual=True, kernels=execution, name=f"local_conv{group}", **kw)(v)


class MultiScaleTokenAggregator(MultiScaleAttention):
    """An ablation of SSA: every scale gets all the heads instead of a share of them.

    Branch g aggregates keys/values at `rates[g]` exactly as an SSA group does, and all
    `num_heads` heads of the shared query attend to them; the branch outputs are concatenated
    (len(rates) x C channels) and projected back to C by one linear layer. It costs about
    len(rates) times SSA's attention, which is the question it answers.
    """

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dim = x.shape[-1]
        q = split_heads(dense(dim, name="q", **kw)(x), self.num_heads)
        outputs = []
        for g, rate in enumerate(self.rates, start=1):
            k, v = aggregated_keys_values(x, rate, dim, g, self.kernels, kw)
            out = multi_head_attention(self, q, split_heads(k, self.num_heads), split_heads(v, self.num_heads))
            outputs.append(out.reshape(x.shape))
        return dense(dim, name="proj", **kw)(jnp.concatenate(outputs, axis=-1))
