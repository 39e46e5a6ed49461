"""The Pallas LayerNorm kernels (run by Pallas' interpreter on the CPU) against nn.LayerNorm."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.models import outputs_and_grads

from shunted_jax.models.layers import LayerNorm


class FlaxLayerNormThenGelu(nn.Module):
    """The reference: nn.LayerNorm as the models used it, then GELU."""
    apply_gelu: bool
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=self.dtype, param_dtype=self.dtype,
                         name="norm")(x)
        return nn.gelu(y, approximate=False) if self.apply_gelu else y


def reference_and_pallas(apply_gelu, dtype, param_dtype=None):
    reference = FlaxLayerNormThenGelu(apply_gelu, dtype)
    pallas = LayerNorm(1e-5, apply_gelu, dtype=dtype, param_dtype=param_dtype or dtype, kernels="norm=pallas",
                       name="norm")
    return reference, pallas


@pytest.mark.parametrize("shape, apply_gelu", [
    ((2, 5, 3, 64), False),  # rows that do not fill the last block
    ((3, 7, 320), True),     # channels that are no power of two (PVTv2's 320), masked lanes
    ((1, 1, 1, 32), True),   # one row
])
def test_pallas_layer_norm_matches_flax_in_float64(shape, apply_gelu):
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x, cotangent = (jnp.asarray(rng.standard_normal(shape) * 3 + 1) for _ in range(2))
        reference, pallas = reference_and_pallas(apply_gelu, jnp.float64)
        variables = reference.init(jax.random.key(0), x)
        variables = jax.tree.map(lambda a: a + jnp.asarray(rng.standard_normal(a.shape)), variables)
        # The same parameter tree: the Pallas module's scope stands where nn.LayerNorm's was.
        params = {"params": variables["params"]["norm"]}
        assert jax.tree.structure(params) == jax.tree.structure(pallas.init(jax.random.key(0), x))
        want, _, (want_grads, want_dx) = outputs_and_grads(reference, variables, x, cotangent)
        inferred, trained, (got_grads, got_dx) = outputs_and_grads(pallas, params, x, cotangent)
        assert inferred.dtype == trained.dtype == jnp.float64
        # The fused GELU and its slope use an erfc fit (relative error 1.1e-7 in float64).
        rtol = 2e-7 if apply_gelu else 1e-12
        for got in (inferred, trained):
            np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-12)
        for g, w in [(got_dx, want_dx)] + list(zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads))):
            np.testing.assert_allclose(g, w, atol=rtol * np.abs(w).max() + 1e-11)


def test_pallas_layer_norm_in_bfloat16_stays_close_to_float32():
    """On a GPU this runs the Triton kernels: a bfloat16 map with float32 parameters, as the
    models have them, against nn.LayerNorm in float32 on the same numbers."""
    x, cotangent = (jax.random.normal(jax.random.key(i), (4, 9, 9, 64)).astype(jnp.bfloat16) for i in (1, 2))
    reference, pallas = reference_and_pallas(True, jnp.float32)
    pallas = pallas.clone(dtype=jnp.bfloat16, param_dtype=jnp.float32)
    variables = reference.init(jax.random.key(0), x)
    variables = jax.tree.map(lambda a: a + jax.random.normal(jax.random.key(3), a.shape), variables)
    params = {"params": variables["params"]["norm"]}
    as_float32 = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float32), tree)  # noqa: E731
    want, _, want_grads = outputs_and_grads(reference, variables, *as_float32((x, cotangent)))
    inferred, trained, got_grads = outputs_and_grads(pallas, params, x, cotangent)
    assert inferred.dtype == trained.dtype == jnp.bfloat16
    got = as_float32((inferred, trained, got_grads))
    want_grads = ({"params": want_grads[0]["params"]["norm"]}, want_grads[1])
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves((want, want, want_grads))):
        assert np.abs(g - w).max() <= 0.01 * np.abs(w).max()
