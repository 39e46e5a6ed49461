"""The official tiny models' fixtures (tests/data, from ../shared/reference) and how to load them."""
import jax
import jax.numpy as jnp
import numpy as np
from conftest import DATA_DIR

from shunted_jax import models
from shunted_jax.convert import torch_to_flax

def drawn_like(shapes):
    """Arrays of `shapes` (a tree of ShapeDtypeStructs) drawn with numpy, weights about 0.05 and
    vectors about 1 (scales, norms): no initialisation to compile (compiling dominates on CPU)."""
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: (rng.normal(0, 0.05, s.shape) + 1.0 * (len(s.shape) < 2)).astype(s.dtype), shapes)


TINY_SHUNTED = dict(embed_dims=(64, 64, 128, 128), num_heads=(2, 2, 4, 4), mlp_ratios=(2, 2, 2, 2),
                    depths=(1, 1, 2, 1), num_conv=1)
TINY_PVT = dict(embed_dims=(32, 64, 96, 128), num_heads=(1, 2, 3, 4), mlp_ratios=(2, 2, 2, 2), depths=(1, 1, 2, 1))
RELEASED = sorted(p.stem for p in (DATA_DIR / "keys").glob("*.txt"))  # the variants with official checkpoints
FIXTURES = {
    "tiny_shunted_64x48": ("shunted_t", TINY_SHUNTED),
    "tiny_shunted_71x45": ("shunted_t", TINY_SHUNTED),
    "tiny_pvt_v2_64x64": ("pvt_v2_b0", TINY_PVT),
    "tiny_pvt_v2_li_40x56": ("pvt_v2_b2_li", TINY_PVT),
}


def official_listing(name) -> dict:
    """{key: (shape, dtype)} of every entry of the released state dict (tests/data/keys)."""
    listing = {}
    for line in (DATA_DIR / "keys" / f"{name}.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape, dtype = line.split("\t")
        listing[key] = (() if shape == "scalar" else tuple(int(d) for d in shape.split("x")), np.dtype(dtype))
    return listing


def load_fixture(name):
    """(every array of the fixture, the official state dict in it)."""
    with np.load(DATA_DIR / f"{name}.npz") as f:
        arrays = {k: f[k] for k in f.files}
    reserved = {"input", "logits", "logits_fp64", "meta"}
    state = {k: v for k, v in arrays.items() if k not in reserved and not k.startswith("act/")}
    return arrays, state


def fixture_model_and_variables(name, dtype):
    """(fixture arrays, the model, its converted variables, the NHWC input) in `dtype`."""
    arrays, state = load_fixture(name)
    variant, overrides = FIXTURES[name]
    variables = torch_to_flax(state, variant, **overrides)
    model = models.create(variant, num_classes=10, dtype=dtype, param_dtype=dtype, **overrides)
    variables = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), variables)
    images = jnp.asarray(arrays["input"].transpose(0, 2, 3, 1), dtype)
    return arrays, model, variables, images


def outputs_and_grads(module, variables, x, cotangent):
    """The output as inferred (undifferentiated), and as trained (differentiated) with the
    gradients w.r.t. the variables and x (any pytree of arrays) for that cotangent; one jitted
    program (op by op, every operation would compile on its own)."""
    @jax.jit
    def compute(variables, x, cotangent):
        trained, vjp = jax.vjp(module.apply, variables, x)
        return module.apply(variables, x), trained, vjp(cotangent)

    return compute(variables, x, cotangent)
