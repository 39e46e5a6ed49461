"""The model library against the official PyTorch models (fixtures in tests/data, from ../shared/reference)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.models import FIXTURES, drawn_like, fixture_model_and_variables

from shunted_jax import models
from shunted_jax.models.attention import MultiScaleTokenAggregator
from shunted_jax.models.flops import count_macs
from shunted_jax.models.layers import space_to_depth_conv
from shunted_jax.models.pyramid import ConvStem

OFFICIAL_PARAMS = {
    "shunted_t": 11_553_576, "shunted_s": 22_401_256, "shunted_b": 39_614_376,
    "pvt_v2_b0": 3_666_760, "pvt_v2_b1": 14_009_000, "pvt_v2_b2": 25_362_856, "pvt_v2_b2_li": 22_553_512,
    "pvt_v2_b3": 45_238_696, "pvt_v2_b4": 62_556_072, "pvt_v2_b5": 81_956_008,
}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_float64_logits_match_official(name):
    with jax.enable_x64(True):
        arrays, model, variables, images = fixture_model_and_variables(name, jnp.float64)
        logits = jax.jit(model.apply)(variables, images)  # one program: op by op compiles far more
        assert logits.dtype == jnp.float64
        assert np.abs(np.asarray(logits) - arrays["logits_fp64"]).max() <= 1e-9


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_float32_logits_and_features_match_official(name):
    arrays, model, variables, images = fixture_model_and_variables(name, jnp.float32)
    logits, features = jax.jit(lambda v, x: (model.apply(v, x), model.apply(v, x, method="features")))(
        variables, images)
    assert np.abs(np.asarray(logits) - arrays["logits"]).max() <= 5e-5
    grids = json.loads(str(arrays["meta"]))["stage_hw"]
    for i, feature in enumerate(features, start=1):
        assert feature.shape[1:3] == tuple(grids[f"patch_embed{i}"])
        tokens = np.asarray(feature).reshape(feature.shape[0], -1, feature.shape[-1])
        np.testing.assert_allclose(tokens, arrays[f"act/norm{i}"], atol=5e-5)


def test_fused_attention_path_matches_exact_path():
    arrays, model, variables, images = fixture_model_and_variables("tiny_shunted_64x48", jnp.float32)
    fused, exact = jax.jit(lambda v, x: (model.clone(kernels="attention=xla").apply(v, x), model.apply(v, x)))(
        variables, images)
    np.testing.assert_allclose(fused, exact, atol=1e-5)


def test_multiply_adds_do_not_depend_on_the_kernels():
    """Fused and Pallas kernels are calls the count cannot see into: counting uses the exact path."""
    model = models.create("shunted_t", num_classes=10)
    exact = count_macs(model, (64, 64))
    # The cuDNN path cannot even be traced on a CPU.
    assert count_macs(model.clone(kernels="attention=cudnn"), (64, 64)) == exact
    # Pallas' depthwise kernels hide their convolutions from the jaxpr.
    assert count_macs(model.clone(kernels="depthwise=pallas"), (64, 64)) == exact


@pytest.mark.parametrize("name", sorted(OFFICIAL_PARAMS))
def test_parameter_count_is_official(name):
    shapes = jax.eval_shape(lambda: models.create(name).init({"params": jax.random.key(0)}, jnp.zeros((1, 64, 64, 3))))
    assert sum(x.size for x in jax.tree_util.tree_leaves(shapes["params"])) == OFFICIAL_PARAMS[name]


@pytest.mark.parametrize("name, gmacs", [("shunted_t", 2.147), ("shunted_s", 4.993), ("shunted_b", 8.150)])
def test_multiply_adds_match_paper(name, gmacs):
    assert count_macs(models.create(name))["total"]["all"] / 1e9 == pytest.approx(gmacs, rel=0.01)


def test_multiply_adds_split_like_torch_counter():
    macs = count_macs(models.create("shunted_s"))["total"]
    assert macs["conv"] / 1e9 == pytest.approx(1.3523, abs=1e-4)
    assert macs["linear"] / 1e9 == pytest.approx(3.2941, abs=1e-4)
    assert macs["attention"] / 1e9 == pytest.approx(0.3467, abs=1e-4)


def random_variables(model, images):
    """Variables of the model's shapes for `images`, drawn with numpy."""
    return drawn_like(jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, images)))


# One model per attention design (SSA, SRA, linear SRA), narrow and shallow: every width and depth
# runs the same code (a stage of two blocks: the stacked blocks' scan), and a full-size model costs
# about a minute of compiling on CPU.
NARROW_MODEL = {"embed_dims": (16, 32, 32, 64), "depths": (1, 2, 1, 1), "num_heads": (2, 2, 2, 2),
                "mlp_ratios": (2, 2, 2, 2)}


@pytest.mark.parametrize("name", ["shunted_t", "pvt_v2_b0", "pvt_v2_b2_li"])
def test_bfloat16_forward_and_backward_are_finite(name):
    model = models.create(name, num_classes=10, dtype=jnp.bfloat16, drop_path_rate=0.1, **NARROW_MODEL)
    size = model.min_input_size() if model.attention != "linear_sra" else 32
    images = jax.random.normal(jax.random.key(0), (2, size, size + 3, 3))
    variables = random_variables(model, images)

    @jax.jit
    def loss_and_grads(variables):
        def loss(params):
            logits, _ = model.apply({**variables, "params": params}, images, train=True,
                                    rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"])
            assert logits.dtype == jnp.bfloat16
            return jnp.mean(jax.nn.log_softmax(logits.astype(jnp.float32))[:, 0])

        return jax.value_and_grad(loss)(variables["params"])

    value, grads = jax.device_get(loss_and_grads(variables))  # checked in numpy: no program per leaf
    assert np.isfinite(value)
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert any(np.any(g != 0) for g in leaves)


def test_too_small_input_says_the_minimum():
    model = models.create("shunted_t", num_classes=3)
    assert model.min_input_size() == 31
    # Tracing meets the size check: the shapes say it all, nothing needs compiling.
    variables = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 31, 33, 3))))
    with pytest.raises(ValueError, match=">= 31"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 30, 64, 3)))
    assert models.create("pvt_v2_b0").min_input_size() == 29


@pytest.mark.parametrize("name, channels", [("shunted_s", (64, 128, 256, 512)), ("pvt_v2_b2", (64, 128, 320, 512))])
def test_feature_info_gives_the_channels_and_strides_of_the_feature_maps(name, channels):
    info = models.feature_info(name)
    assert [(i["num_chs"], i["reduction"]) for i in info] == list(zip(channels, (4, 8, 16, 32)))
    model = models.create(name)
    images = jnp.zeros((1, 224, 161, 3))
    variables = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, images))

    def shapes(**kwargs):
        return [f.shape for f in jax.eval_shape(lambda v: model.apply(v, images, method="features", **kwargs), variables)]

    assert shapes() == [(1, *grid, i["num_chs"]) for grid, i in zip(model.stage_grids(224, 161), info)]
    assert [grid[0] for grid in model.stage_grids(224, 161)] == [224 // i["reduction"] for i in info]
    assert shapes(out_indices=(3, 1)) == [shapes()[3], shapes()[1]]
    for wrong in ((), (4,), (-1, 2)):
        with pytest.raises(ValueError, match="must name stages 0 to 3"):
            shapes(out_indices=wrong)
    with pytest.raises(ValueError, match="single-scale"):
        models.feature_info("vit_ti16")


def test_selected_feature_maps_are_those_of_all_stages():
    _, model, variables, images = fixture_model_and_variables("tiny_pvt_v2_64x64", jnp.float32)
    every, selected = jax.jit(lambda v, x: (model.apply(v, x, method="features"),
                                            model.apply(v, x, method="features", out_indices=(2, 0))))(
        variables, images)
    np.testing.assert_array_equal(selected[0], every[2])
    np.testing.assert_array_equal(selected[1], every[0])


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="shunted_s") as error:
        models.create("shunted_xl")
    assert "pvt_v2_b2_li" in str(error.value)
    with pytest.raises(ValueError, match="embed_dim"):
        models.create("shunted_t", embed_dim=64)


def test_general_ssa_splits_heads_over_any_number_of_scales():
    model = models.create("shunted_t", num_classes=4, num_heads=(3, 3, 6, 6), embed_dims=(48, 48, 96, 96),
                          depths=(1, 1, 1, 1), ssa_rates=((8, 4, 2), (4, 2, 1), (2, 1, 1), (1,)))
    images = jnp.ones((1, 64, 64, 3))
    # Only shapes are checked: traced, not compiled.
    variables = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, images))
    attn = variables["params"]["block1"]["attn"]
    assert [attn[f"sr{g}"]["kernel"].shape[1] for g in (1, 2, 3)] == [8, 4, 2]
    assert attn["kv1"]["kernel"].shape[-1] == 2 * 16  # 1 of 3 heads, head_dim 16, K and V
    _, state = jax.eval_shape(lambda v: model.apply(v, images, mutable=["intermediates"]), variables)
    probs = state["intermediates"]["block1"]["attn"]["attention_probs"]
    assert [p.shape[-1] for p in probs] == [2 * 2, 4 * 4, 8 * 8]  # keys per group at 16x16 tokens
    with pytest.raises(ValueError, match="divisible"):
        unsplittable = models.create("shunted_t", ssa_rates=((8, 4, 2), (4, 2, 1), (2, 1, 1), (1,)))
        jax.eval_shape(lambda: unsplittable.init({"params": jax.random.key(0)}, images))


def test_official_initialisation():
    @jax.jit
    def checked_params():
        """The initialised arrays the test looks at: XLA drops the rest of the init (compiled whole,
        or run op by op, it costs ten times as much)."""
        params = models.create("shunted_t").init({"params": jax.random.key(0)}, jnp.zeros((1, 64, 64, 3)))["params"]
        return {"depthwise": params["block1"]["mlp"]["dwconv"]["kernel"],  # (depth, 3, 3, 1, 512)
                "stem": params["patch_embed1"]["conv_0"]["kernel"], "q": params["block3"]["attn"]["q"],
                "head": params["head"]["kernel"], "norm4": params["norm4"]["scale"]}

    params = checked_params()
    assert np.std(params["depthwise"]) == pytest.approx(np.sqrt(2 / 9), rel=0.02)
    assert np.std(params["stem"]) == pytest.approx(np.sqrt(2 / (49 * 64)), rel=0.05)
    assert np.std(params["q"]["kernel"]) == pytest.approx(0.02, rel=0.02)
    assert np.std(params["head"]) == pytest.approx(0.02, rel=0.02)
    assert not np.any(params["q"]["bias"])
    assert np.all(params["norm4"] == 1)


def test_drop_path_only_in_training():
    model = models.create("pvt_v2_b0", num_classes=3, depths=(1, 1, 1, 1), drop_path_rate=0.0)
    images = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    variables = random_variables(model, images)
    droppy = model.clone(drop_path_rate=0.9)

    @jax.jit
    def logits(variables):
        """Without and with drop path, in inference and in training: one program, not four."""
        rngs = {"dropout": jax.random.key(2)}
        return {(rate, train): m.apply(variables, images, train=train, rngs=rngs)
                for rate, m in ((0.0, model), (0.9, droppy)) for train in (False, True)}

    out = logits(variables)
    eval_logits = out[0.0, False]
    np.testing.assert_allclose(out[0.0, True], eval_logits, atol=1e-6)
    np.testing.assert_allclose(out[0.9, False], eval_logits, atol=1e-6)
    assert np.abs(np.asarray(out[0.9, True]) - np.asarray(eval_logits)).max() > 1e-3


def test_token_aggregator_is_the_sum_of_its_branches_through_one_projection():
    """Aggregator(rates=(4, 2)) == branch 1 and branch 2 each alone, with the projection split by rows."""
    fields = dict(num_classes=4, embed_dims=(32, 32, 32, 32), num_heads=(2, 2, 2, 2), depths=(1, 1, 1, 1),
                  attention="aggregator")
    both = models.create("shunted_t", ssa_rates=((4, 2), (2, 1), (2, 1), (1,)), **fields)
    images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    variables = random_variables(both, images)
    attn = variables["params"]["block1"]["attn"]
    assert attn["proj"]["kernel"].shape == (1, 64, 32)  # (depth, 2 branches x C, C)
    assert attn["kv2"]["kernel"].shape == (1, 32, 64)  # every branch has all heads: K and V of width C

    def one_branch(g, bias):
        params = {"q": attn["q"], "proj": {"kernel": attn["proj"]["kernel"][:, (g - 1) * 32 : g * 32],
                                           "bias": attn["proj"]["bias"] * bias}}
        params.update({f"{layer}1": attn[f"{layer}{g}"] for layer in ("sr", "norm", "kv", "local_conv")})
        return params

    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 32))
    unbatched = lambda p: jax.tree_util.tree_map(lambda a: a[0], p)

    @jax.jit
    def full_and_parts(attn):
        full = MultiScaleTokenAggregator(2, (4, 2)).apply({"params": unbatched(attn)}, x)
        return full, [MultiScaleTokenAggregator(2, (rate,)).apply({"params": unbatched(one_branch(g, g == 1))}, x)
                      for g, rate in ((1, 4), (2, 2))]

    full, parts = full_and_parts(attn)
    np.testing.assert_allclose(full, parts[0] + parts[1], atol=1e-5)
    assert np.abs(np.asarray(parts[1])).max() > 1e-3  # the second branch contributes


def test_single_branch_aggregator_is_single_group_ssa():
    fields = dict(num_classes=4, embed_dims=(32, 32, 32, 32), num_heads=(2, 2, 2, 2), depths=(1, 1, 1, 1),
                  ssa_rates=((4,), (2,), (2,), (1,)))
    images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    ssa = models.create("shunted_t", **{**fields, "ssa_rates": ((4,), (2,), (2,), (2,))})
    variables = random_variables(ssa, images)
    aggregator = ssa.clone(attention="aggregator")
    got, want = jax.jit(lambda v: (aggregator.apply(v, images), ssa.apply(v, images)))(variables)
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_vit_baseline_has_deit_tiny_shape_and_refuses_other_grids():
    model = models.create("vit_ti16")
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 224, 224, 3))))
    # DeiT-Ti's 5,717,416 parameters less its class token and the class token's position (2 x 192).
    assert sum(x.size for x in jax.tree_util.tree_leaves(shapes["params"])) == 5_717_416 - 2 * 192
    assert count_macs(model)["total"]["all"] / 1e9 == pytest.approx(1.25, abs=0.01)  # DeiT-Ti: 1.3 GFLOPs
    small = models.create("vit_ti16", num_classes=3, embed_dim=32, depth=2, num_heads=2, patch_size=8)
    # Shapes only: traced, not compiled.
    variables = jax.eval_shape(lambda: small.init({"params": jax.random.key(0)}, jnp.zeros((1, 32, 32, 3))))
    assert variables["params"]["block1"]["attn"]["q"]["kernel"].shape == (2, 32, 32)
    _, state = jax.eval_shape(lambda v: small.apply(v, jnp.ones((1, 32, 32, 3)), mutable=["intermediates"]), variables)
    assert state["intermediates"]["block1"]["attn"]["attention_probs"][0].shape == (2, 1, 2, 16, 16)
    with pytest.raises(ValueError, match="4x4 patch grid"):
        jax.eval_shape(small.apply, variables, jnp.zeros((1, 48, 48, 3)))


@pytest.mark.parametrize("height, width, channels, size, padding", [
    (17, 22, 3, 7, 3),  # the stem's conv on an odd height
    (8, 9, 5, 3, 1),
    (10, 11, 4, 4, 1),  # an even kernel
    (6, 7, 2, 1, 0),
])
def test_space_to_depth_conv_is_the_strided_conv(height, width, channels, size, padding):
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((2, height, width, channels)))
        kernel = jnp.asarray(rng.standard_normal((size, size, channels, 6)))
        want = jax.lax.conv_general_dilated(x, kernel, (2, 2), ((padding, padding),) * 2,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        np.testing.assert_allclose(space_to_depth_conv(x, kernel, padding), want, rtol=1e-12, atol=1e-12)


def test_conv_stem_trains_the_same_with_space_to_depth():
    """Training runs the stem unfolded: the same outputs, batch statistics and kernel gradients
    with the 7x7/2 conv as a space-to-depth conv (inference, folded, is checked against the
    official model by the fixtures)."""
    with jax.enable_x64(True):
        images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 19, 24, 3)))
        stems = [ConvStem(16, num_conv=1, space_to_depth=s2d, dtype=jnp.float64, param_dtype=jnp.float64)
                 for s2d in (True, False)]
        variables = stems[0].init(jax.random.key(0), images, train=False)

        def train(stem, params):
            out, stats = stem.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats"])
            return jnp.sum(out ** 2), stats

        @jax.jit
        def both(params):
            """Both stems' loss, statistics and gradients: one program."""
            return [jax.value_and_grad(lambda p: train(stem, p), has_aux=True)(params) for stem in stems]

        ((got, got_stats), got_grads), ((want, want_stats), want_grads) = both(variables["params"])
        for g, w in zip(jax.tree.leaves((got, got_stats, got_grads)), jax.tree.leaves((want, want_stats, want_grads))):
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def test_conv_stem_inference_asks_for_its_batch_stats():
    images = jnp.ones((1, 32, 32, 3))
    stem = ConvStem(8)
    params = stem.init(jax.random.key(0), images, train=False)["params"]
    with pytest.raises(ValueError, match="batch_stats"):
        stem.apply({"params": params}, images, train=False)
