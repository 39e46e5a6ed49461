"""The Pallas short-key attention (run by Pallas' interpreter on the CPU) against the exact einsums."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.models import fixture_model_and_variables

from shunted_jax.kernels.common import Device, local_device, target_for
from shunted_jax.kernels.dispatch import choose_attention
from shunted_jax.kernels.short_attention import MAX_KEYS, short_attention, tiling


def exact_attention(q, k, v):
    logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=logits_dtype) * q.shape[-1] ** -0.5
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1).astype(v.dtype), v)


def output_and_grads(attention, q, k, v, cotangent):
    out, vjp = jax.vjp(attention, q, k, v)
    return out, vjp(cotangent)


def pallas_attention(q, k, v):
    return short_attention(q, k, v, q.shape[-1] ** -0.5, target_for(q.dtype, local_device()))


@pytest.mark.parametrize("batch, queries, keys, heads, head_dim", [
    (2, 50, 49, 2, 16),   # SSA's 7x7 keys; a last query block that is partly past the queries
    (1, 300, 7, 1, 32),   # several backward programs per head: their key/value partial sums add up
    (2, 20, 130, 3, 16),  # more keys than queries, a key count that is no power of two
    (1, 3, 1, 1, 16),     # one key: every probability is 1
    (1, 70, 49, 2, 64),   # PVTv2's head dim
])
def test_kernels_match_exact_attention_in_float64(batch, queries, keys, heads, head_dim):
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        shapes = [(batch, n, heads, head_dim) for n in (queries, keys, keys, queries)]
        q, k, v, cotangent = (jnp.asarray(rng.standard_normal(s)) for s in shapes)
        want, want_grads = output_and_grads(exact_attention, q, k, v, cotangent)
        got, got_grads = output_and_grads(pallas_attention, q, k, v, cotangent)
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(pallas_attention(q, k, v), want, rtol=1e-12, atol=1e-12)
        for g, w in zip((got,) + got_grads, (want,) + want_grads):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12)


def test_backward_spreads_long_query_sequences_over_programs():
    assert tiling(3136, 49, backward=True).blocks * tiling(3136, 49, backward=True).block_q == 256
    assert tiling(49, 49, backward=True).blocks == 1
    assert tiling(196, 196, backward=True).block_q == 16  # 256-key gradients in registers


def test_kernels_in_bfloat16_stay_close_to_float32():
    """On a GPU this runs the Triton kernels themselves."""
    q, k, v, cotangent = (jax.random.normal(jax.random.key(i), (2, n, 2, 32)).astype(jnp.bfloat16)
                          for i, n in enumerate((70, 49, 49, 70)))
    as_float32 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float32), tree)  # noqa: E731
    want = as_float32(output_and_grads(exact_attention, *as_float32((q, k, v, cotangent))))
    got = output_and_grads(pallas_attention, q, k, v, cotangent)
    assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(got))
    for g, w in zip(jax.tree.leaves(as_float32(got)), jax.tree.leaves(want)):
        assert np.abs(g - w).max() <= 0.02 * np.abs(w).max()


def test_more_keys_than_the_kernels_hold_is_refused_with_what_to_do():
    q = jnp.zeros((1, 4, 1, 16), jnp.bfloat16)
    k = jnp.zeros((1, MAX_KEYS + 1, 1, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match="at most 256 keys"):
        pallas_attention(q, k, k)
    with pytest.raises(ValueError, match="at most 256 keys.*use attention=auto"):
        choose_attention("attention=pallas", 1, 4, MAX_KEYS + 1, 16, jnp.bfloat16, Device("gpu", "H100", (9, 0)))


def test_every_attention_of_the_model_takes_the_pallas_path():
    """The tiny Shunted fixture with kernels="attention=pallas": one kernel call per softmax of the
    exact model, and the official float64 logits still hold to the exact path's 1e-9."""
    with jax.enable_x64(True):
        arrays, model, variables, images = fixture_model_and_variables("tiny_shunted_64x48", jnp.float64)
        pallas = model.clone(kernels="attention=pallas")
        jaxpr = lambda m: str(jax.make_jaxpr(lambda v, x: m.apply(v, x))(variables, images))  # noqa: E731
        softmaxes = jaxpr(model).count("reduce_max")
        assert softmaxes == 7 and "pallas_call" not in jaxpr(model)
        assert jaxpr(pallas).count("pallas_call") == softmaxes
        assert np.abs(np.asarray(jax.jit(pallas.apply)(variables, images)) - arrays["logits_fp64"]).max() <= 1e-9
