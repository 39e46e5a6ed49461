"""Attention over a short key sequence (at most MAX_KEYS keys) as Pallas (Triton) kernels.

Shunted's coarse SSA groups and its last stages attend over few keys (49 or 196 at 224x224), few
enough that one program holds every key and value of a head: the softmax needs no running
maximum, and the forward is one kernel that reads q, k, v once and writes the output (and, when
differentiated, the log-sum-exp). XLA's einsums instead write the logits, read them for the
maximum, the sum and the probabilities, and write the probabilities again; cuDNN's flash kernel
pads such key counts to its tile and refuses odd ones when training.

The backward recomputes the probabilities from the log-sum-exp. Each program walks a few query
blocks of one (image, head), writes their query gradients and sums their key and value gradients
in float32 registers; XLA adds those partial sums over the programs of a head. Softmax's
gradient uses rowsum(p * dp), so the output is not kept for it.

Elsewhere than on a GPU, Pallas' interpreter runs the kernels (for the float64 tests).
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from shunted_jax.kernels.common import Target, accumulator, traced_once

MAX_KEYS = 256


class Tiling(NamedTuple):
    """How a kernel cuts its work: `block_q` queries at a time against all `block_k` (a power of
    two covering the keys), `blocks` query blocks per program (the keys and values are loaded
    once for them), `warps` per program."""
    block_q: int
    block_k: int
    blocks: int
    warps: int


def takes(keys: int, head_dim: int) -> bool:
    """Whether the kernels take this attention: at most MAX_KEYS keys, and a head dim that
    Triton's matrix instructions tile (a power of two from 16)."""
    return keys <= MAX_KEYS and head_dim >= 16 and head_dim & (head_dim - 1) == 0


def tiling(queries: int, keys: int, backward: bool) -> Tiling:
    """The tilings measured fastest on an H100 (bf16, head dim 32). Forward: 64-query blocks, two per
    program. Backward: the key and value gradients live in registers next to the logits, so
    256 keys take 16-query blocks; a program walks up to 256 queries, which loads each head's
    keys and values fewer times."""
    block_k = max(16, pl.next_power_of_2(keys))
    if not backward:
        return Tiling(64, block_k, blocks=min(2, pl.cdiv(queries, 64)), warps=4)
    block_q = 64 if block_k <= 64 else 16
    return Tiling(block_q, block_k, blocks=pl.cdiv(min(queries, 256), block_q), warps=4)


def _load_tokens(ref, batch, head, tokens, count):
    """Rows `tokens` of one head, (len(tokens), head_dim), zero past `count`."""
    dims = jnp.arange(ref.shape[-1])
    mask = jnp.broadcast_to((tokens < count)[:, None], (len(tokens), len(dims)))
    return plt.load(ref.at[batch, jnp.minimum(tokens, count - 1)[:, None], head, dims[None, :]], mask=mask, other=0)


def _store_tokens(ref, batch, head, tokens, count, value):
    dims = jnp.arange(ref.shape[-1])
    plt.store(ref.at[batch, tokens[:, None], head, dims[None, :]], value.astype(ref.dtype),
              mask=(tokens < count)[:, None])


def _logits(q, k, scale):
    return plt.dot(q, k, trans_b=True) * scale


class _Head:
    """Where a program works: one image, one head, and every key of it."""

    def __init__(self, k_ref, v_ref, keys, block_k):
        self.batch, self.head = pl.program_id(1), pl.program_id(2)
        self.columns = jnp.arange(block_k)
        self.keys = keys
        self.k = _load_tokens(k_ref, self.batch, self.head, self.columns, keys)
        self.v = _load_tokens(v_ref, self.batch, self.head, self.columns, keys)

    def mask(self, logits, fill):
        return jnp.where((self.columns < self.keys)[None, :], logits, fill)


def _attention_kernel(q_ref, k_ref, v_ref, o_ref, *lse_ref, scale, queries, keys, tiles: Tiling):
    """softmax(q k^T * scale) v for the program's query blocks; with a second output, the
    log-sum-exp of each query's logits."""
    here = _Head(k_ref, v_ref, keys, tiles.block_k)
    first = pl.program_id(0) * tiles.blocks

    def attend(i, carry):
        rows = (first + i) * tiles.block_q + jnp.arange(tiles.block_q)
        q = _load_tokens(q_ref, here.batch, here.head, rows, queries)
        logits = here.mask(_logits(q, here.k, scale), -jnp.inf)
        peak = jnp.max(logits, axis=1)
        weights = jnp.exp(logits - peak[:, None])
        total = jnp.sum(weights, axis=1)
        probs = weights / total[:, None]
        _store_tokens(o_ref, here.batch, here.head, rows, queries, plt.dot(probs.astype(q.dtype), here.v))
        if lse_ref:
            plt.store(lse_ref[0].at[here.batch, here.head, rows], peak + jnp.log(total), mask=rows < queries)
        return carry

    jax.lax.fori_loop(0, tiles.blocks, attend, 0)


def _attention_backward_kernel(q_ref, k_ref, v_ref, lse_ref, do_ref, dq_ref, dk_ref, dv_ref, *, scale, queries, keys,
                               tiles: Tiling):
    """Query gradients of the program's query blocks, and their share of the key and value
    gradients (float32 partial sums, one slot per program)."""
    here = _Head(k_ref, v_ref, keys, tiles.block_k)
    first = pl.program_id(0) * tiles.blocks

    def add_block(i, sums):
        d_keys, d_values = sums
        rows = (first + i) * tiles.block_q + jnp.arange(tiles.block_q)
        q = _load_tokens(q_ref, here.batch, here.head, rows, queries)
        do = _load_tokens(do_ref, here.batch, here.head, rows, queries)
        lse = plt.load(lse_ref.at[here.batch, here.head, jnp.minimum(rows, queries - 1)], mask=rows < queries,
                       other=0)
        probs = here.mask(jnp.exp(_logits(q, here.k, scale) - lse[:, None]), 0)
        d_probs = plt.dot(do, here.v, trans_b=True)
        d_logits = probs * (d_probs - jnp.sum(probs * d_probs, axis=1)[:, None]) * scale
        d_logits_low = d_logits.astype(q.dtype)
        _store_tokens(dq_ref, here.batch, here.head, rows, queries, plt.dot(d_logits_low, here.k))
        return (d_keys + plt.dot(d_logits_low, q, trans_a=True),
                d_values + plt.dot(probs.astype(q.dtype), do, trans_a=True))

    zeros = jnp.zeros((tiles.block_k, q_ref.shape[-1]), dk_ref.dtype)
    d_keys, d_values = jax.lax.fori_loop(0, tiles.blocks, add_block, (zeros, zeros))
    program = pl.program_id(0)
    for ref, value in ((dk_ref, d_keys), (dv_ref, d_values)):
        dims = jnp.arange(ref.shape[-1])
        plt.store(ref.at[program, here.batch, here.columns[:, None], here.head, dims[None, :]], value,
                  mask=(here.columns < keys)[:, None])


def _programs(queries: int, tiles: Tiling) -> int:
    return pl.cdiv(pl.cdiv(queries, tiles.block_q), tiles.blocks)


@traced_once("scale", "target", "with_lse", "tiles")
def call_forward(q, k, v, scale: float, target: Target, with_lse: bool, tiles: Tiling):
    """The forward kernel: the output, and with `with_lse` the log-sum-exp (B, heads, queries)."""
    batch, queries, heads, _ = q.shape
    keys = k.shape[1]
    kernel = functools.partial(_attention_kernel, scale=scale, queries=queries, keys=keys, tiles=tiles)
    out = jax.ShapeDtypeStruct(q.shape, q.dtype)
    lse = jax.ShapeDtypeStruct((batch, heads, queries), accumulator(q.dtype))
    return pl.pallas_call(kernel, out_shape=(out, lse) if with_lse else out,
                          grid=(_programs(queries, tiles), batch, heads), interpret=target.interpret,
                          compiler_params=plt.CompilerParams(num_warps=tiles.warps))(q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def short_attention(q, k, v, scale: float, target: Target):
    """softmax(q k^T * scale) v over (B, tokens, heads, head_dim) arrays with at most MAX_KEYS keys;
    the logits and softmax in float32 (float64 for float64 inputs), the probabilities rounded to
    the input dtype before they weight v, as the exact einsums do."""
    if k.shape[1] > MAX_KEYS:
        raise ValueError(f"short_attention takes at most {MAX_KEYS} keys, got {k.shape[1]}: use another "
                         "attention implementation for this layer.")
    return call_forward(q, k, v, scale, target, False, tiling(q.shape[1], k.shape[1], backward=False))


def _forward(q, k, v, scale, target):
    out, lse = call_forward(q, k, v, scale, target, True, tiling(q.shape[1], k.shape[1], backward=False))
    return out, (q, k, v, lse)


def _backward(scale, target, saved, d_out):
    q, k, v, lse = saved
    return call_backward(q, k, v, lse, d_out, scale, target, tiling(q.shape[1], k.shape[1], backward=True))


@traced_once("scale", "target", "tiles")
def call_backward(q, k, v, lse, d_out, scale: float, target: Target, tiles: Tiling):
    """The backward kernel: (dq, dk, dv), the partial key and value gradients summed by XLA."""
    batch, queries, heads, _ = q.shape
    keys = k.shape[1]
    programs = _programs(queries, tiles)
    kernel = functools.partial(_attention_backward_kernel, scale=scale, queries=queries, keys=keys, tiles=tiles)
    partial = jax.ShapeDtypeStruct((programs,) + k.shape, accumulator(q.dtype))
    dq, dk, dv = pl.pallas_call(kernel, out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype), partial, partial),
                                grid=(programs, batch, heads), interpret=target.interpret,
                                compiler_params=plt.CompilerParams(num_warps=tiles.warps))(q, k, v, lse, d_out)
    return dq, jnp.sum(dk, 0).astype(k.dtype), jnp.sum(dv, 0).astype(v.dtype)


short_attention.defvjp(_forward, _backward)
