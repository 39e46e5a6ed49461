"""Flax variables -> the official PyTorch state dict: the exact inverse of convert for every
released variant, the files and the command line, train.py workdirs and their EMA, the models the
official code cannot express, and, where timm or the official code is at hand, the official
PyTorch models loading the export with strict=True."""
import importlib.util
import json
import os
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.models import (FIXTURES, RELEASED, TINY_PVT, TINY_SHUNTED, fixture_model_and_variables, load_fixture,
                            official_listing)
from safetensors.numpy import load_file

from configs import shunted_t as shunted_t_config
from shunted_jax import convert, export, models
from shunted_jax.train import checkpoint
from shunted_jax.train.step import TrainState

PVT_V2 = [name for name in RELEASED if name.startswith("pvt_v2")]
SHUNTED = [name for name in RELEASED if name.startswith("shunted")]
TRAINED_STEPS = 7
# Where the official Shunted code is (PATH/SSA.py of a checkout of OliverRensu/Shunted-Transformer).
OFFICIAL_SSA = os.environ.get("SHUNTED_OFFICIAL_SSA", "")


def random_official_state(name: str, seed: int = 0) -> dict:
    """A state dict of the released keys, shapes and dtypes, every float drawn at random and the
    BatchNorm counters at a released checkpoint's value."""
    rng = np.random.default_rng(seed)
    return {key: np.asarray(375_300, dtype) if key.endswith(convert.BATCHES_TRACKED)
            else rng.standard_normal(shape, dtype=dtype) for key, (shape, dtype) in official_listing(name).items()}


def assert_same_bits(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, array in want.items():
        assert (got[key].dtype, got[key].shape) == (array.dtype, array.shape), key
        assert got[key].tobytes() == array.tobytes(), key


@pytest.mark.parametrize("name", RELEASED)
def test_convert_then_export_gives_back_every_official_tensor_bit_for_bit(name):
    state = random_official_state(name)
    exported = convert.flax_to_torch(convert.torch_to_flax(state, name), name, convert.batches_tracked(state))
    assert {key: (a.shape, a.dtype) for key, a in exported.items()} == official_listing(name)
    assert_same_bits(exported, state)


@pytest.fixture(scope="module")
def exported_through_the_command_lines(tmp_path_factory):
    """A released shunted_t checkpoint (random weights) -> `convert` -> `export`, through disk."""
    tmp = tmp_path_factory.mktemp("commands")
    state = random_official_state("shunted_t")
    np.savez(tmp / "shunted_t.npz", **state)
    convert.main(["--model", "shunted_t", str(tmp / "shunted_t.npz"), str(tmp / "converted")])
    message = export.export(tmp / "converted", "shunted_t", tmp / "exported" / "shunted_t")
    return state, tmp / "exported" / "shunted_t", message


def test_the_command_lines_give_back_the_released_checkpoint_as_safetensors(exported_through_the_command_lines):
    state, stem, message = exported_through_the_command_lines
    assert_same_bits(load_file(f"{stem}.safetensors"), state)
    assert "shunted_t (converted checkpoint, 11,553,576 parameters, 260 tensors)" in message
    has_torch = importlib.util.find_spec("torch") is not None
    assert pathlib.Path(f"{stem}.pth").exists() == has_torch
    assert ("no .pth: PyTorch is not installed" in message) != has_torch


def test_the_pth_file_holds_the_same_tensors(exported_through_the_command_lines):
    torch = pytest.importorskip("torch", reason="the .pth file is written where PyTorch is installed")
    state, stem, _ = exported_through_the_command_lines
    loaded = torch.load(f"{stem}.pth", map_location="cpu", weights_only=True)
    assert_same_bits({key: tensor.numpy() for key, tensor in loaded.items()}, state)


def save_run(workdir: pathlib.Path, model_fields: dict, variables: dict, ema_params=None) -> None:
    """A checkpoint as train.py writes it: the whole TrainState and the model config as its meta."""
    params = jax.tree.map(jnp.asarray, variables["params"])
    state = TrainState(step=jnp.asarray(TRAINED_STEPS, jnp.int32), params=params,
                       batch_stats=jax.tree.map(jnp.asarray, variables.get("batch_stats", {})),
                       opt_state=optax.adamw(1e-3).init(params), ema_params=ema_params)
    options = types.SimpleNamespace(keep=1, asynchronous=False)
    with checkpoint.make_checkpoint_manager(workdir / "checkpoints", options) as manager:
        checkpoint.save(manager, state, {"model": json.loads(json.dumps(model_fields))})
        checkpoint.wait_for_saves(manager)


def run_model_fields(**fields) -> dict:
    """config.model of a train.py run of shunted_t (the demo's config) with `fields` changed."""
    config = shunted_t_config.get_config("demo")
    return {**config.model.to_dict(), **fields}


def test_a_train_py_workdir_exports_its_ema_or_its_trained_weights(tmp_path):
    _, trained = load_fixture("tiny_shunted_64x48")
    _, other = load_fixture("tiny_shunted_71x45")
    variables = convert.torch_to_flax(trained, "shunted_t", **TINY_SHUNTED)
    ema_params = jax.tree.map(jnp.asarray, convert.torch_to_flax(other, "shunted_t", **TINY_SHUNTED)["params"])
    save_run(tmp_path / "run", run_model_fields(**TINY_SHUNTED), variables, ema_params)
    counters = {key: np.asarray(TRAINED_STEPS, np.int64) for key in trained if key.endswith(convert.BATCHES_TRACKED)}

    export.main(["--model", "shunted_t", "--no-ema", str(tmp_path / "run"), str(tmp_path / "trained")])
    assert_same_bits(load_file(tmp_path / "trained.safetensors"), {**trained, **counters})

    message = export.export(tmp_path / "run", "shunted_t", tmp_path / "ema.safetensors")
    assert f"EMA weights of step {TRAINED_STEPS}" in message
    ema = load_file(tmp_path / "ema.safetensors")
    statistics = ("running_mean", "running_var", convert.BATCHES_TRACKED)
    assert_same_bits({k: v for k, v in ema.items() if not k.endswith(statistics)},
                     {k: v for k, v in other.items() if not k.endswith(statistics)})
    assert_same_bits({k: v for k, v in ema.items() if k.endswith(statistics)},
                     {k: v for k, v in {**trained, **counters}.items() if k.endswith(statistics)})


def test_a_run_without_ema_or_of_another_model_says_what_to_pass(tmp_path):
    _, state = load_fixture("tiny_pvt_v2_64x64")
    save_run(tmp_path / "run", {**run_model_fields(), **models.variant_fields("pvt_v2_b0"), "name": "pvt_v2_b0",
                                **TINY_PVT}, convert.torch_to_flax(state, "pvt_v2_b0", **TINY_PVT))
    with pytest.raises(SystemExit, match="kept no EMA .* export without --ema"):
        export.main(["--model", "pvt_v2_b0", "--ema", str(tmp_path / "run"), str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="trained 'pvt_v2_b0', not 'shunted_t': pass --model pvt_v2_b0"):
        export.main(["--model", "shunted_t", str(tmp_path / "run"), str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="neither a train.py workdir"):
        export.main(["--model", "shunted_t", str(tmp_path), str(tmp_path / "out")])
    assert not list(tmp_path.glob("out*"))


UNOFFICIAL = [
    ("shunted_t", {"attention": "sra"}, r"attention='sra' .*the official shunted_t has attention='ssa'"),
    ("shunted_t", {"ssa_rates": ((8, 4), (4, 2, 1), (2, 1), (1,)), "embed_dims": (64, 96, 128, 128),
                   "num_heads": (2, 3, 4, 4)}, r"ssa_rates=\(\(8, 4\), \(4, 2, 1\).*official shunted_t"),
    ("shunted_t", {"ssa_rates": ((4, 8), (2, 4), (1, 2), (1,))}, r"ssa_rates=\(\(4, 8\).*rates \(\(8, 4\), \(4, 2\)"),
    ("shunted_t", {"ffn": "plain"}, r"ffn='plain' .*the official shunted_t has ffn='detail'"),
    ("shunted_t", {"embed_dims": (32, 64, 128, 128)}, r"embed_dims=\(32, 64, 128, 128\) .*conv stem is 64 channels"),
    ("shunted_t", {"sr_ratios": (16, 4, 2, 1)}, r"sr_ratios=\(16, 4, 2, 1\) .*ratios \(1, 2, 4, 8\) only"),
    ("pvt_v2_b2", {"attention": "aggregator", "ssa_rates": ((8, 4), (4, 2), (2, 1), (1,))},
     r"attention='aggregator' .*the official pvt_v2_b2 has attention='sra'"),
]


@pytest.mark.parametrize("name, fields, message", UNOFFICIAL, ids=[f"{n}-{next(iter(f))}" for n, f, _ in UNOFFICIAL])
def test_a_run_the_official_code_cannot_express_is_refused_naming_the_field(tmp_path, name, fields, message):
    model_fields = {**run_model_fields(), **models.variant_fields(name), "name": name, **TINY_SHUNTED, **fields}
    model = models.create(name, **{k: v for k, v in model_fields.items() if k != "name"})
    shapes = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 64, 64, 3))))
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), dict(shapes))
    save_run(tmp_path / "run", model_fields, variables)
    with pytest.raises(SystemExit, match=message):
        export.main(["--model", name, str(tmp_path / "run"), str(tmp_path / "out")])
    assert not list(tmp_path.glob("out*"))
    overrides = export.layout_overrides(model_fields)
    with pytest.raises(convert.NoOfficialLayoutError, match=message):
        convert.flax_to_torch(variables, name, **overrides)
    with pytest.raises(convert.NoOfficialLayoutError, match=message):
        convert.torch_to_flax({}, name, **overrides)


def test_missing_and_misshaped_variables_are_named():
    _, state = load_fixture("tiny_pvt_v2_64x64")
    variables = convert.torch_to_flax(state, "pvt_v2_b0", **TINY_PVT)
    with pytest.raises(convert.CheckpointMismatchError, match=r"The variables do not match 'pvt_v2_b0':\n89 mis-shaped"
                                                              r".*\n\s+params/block1/attn/kv/bias: variables \(1, 64\), "
                                                              r"model expects \(2, 64\)"):
        convert.flax_to_torch(variables, "pvt_v2_b0")
    del variables["params"]["block2"]["attn"]["q"]
    with pytest.raises(convert.CheckpointMismatchError, match=r"2 missing key\(s\):\n\s+params/block2/attn/q/bias\n"
                                                              r"\s+params/block2/attn/q/kernel"):
        convert.flax_to_torch(variables, "pvt_v2_b0", **TINY_PVT)


def as_torch(exported: dict, torch):
    return {key: torch.from_numpy(array) for key, array in exported.items()}


def assert_loaded(model, exported: dict, rename=lambda state: state) -> None:
    """The model's state is the export's (under the model's own names, `rename`d)."""
    want = rename(exported)
    got = {key: tensor.numpy() for key, tensor in model.state_dict().items()}
    assert_same_bits(got, {key: np.asarray(value) for key, value in want.items()})


@pytest.mark.parametrize("name", PVT_V2)
def test_timm_loads_the_export_strictly(name, tmp_path):
    timm = pytest.importorskip("timm", reason="timm's pvt_v2 models are the PyTorch PVTv2 (pip install timm)")
    from timm.models.pvt_v2 import checkpoint_filter_fn

    state = random_official_state(name)
    export.write_state_dict(convert.flax_to_torch(convert.torch_to_flax(state, name), name), tmp_path / name)
    # timm reads the official names through its checkpoint filter, strictly
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(tmp_path / f"{name}.safetensors")})
    assert_loaded(model, state, lambda s: checkpoint_filter_fn(s, model))


def official_shunted():
    """The official Shunted module SSA.py (it imports timm), or a skip saying how to get it."""
    pytest.importorskip("timm", reason="the official Shunted code imports timm (pip install timm)")
    if not pathlib.Path(OFFICIAL_SSA).is_file():
        # The official code may not be copied into this repository, so only a user's checkout can
        # provide it; without one, the key set, shapes and bit-for-bit round trip still run.
        pytest.skip("set SHUNTED_OFFICIAL_SSA=PATH/SSA.py from a checkout of OliverRensu/Shunted-Transformer")
    from benchmarks.torch_reference import load_official
    return load_official(pathlib.Path(OFFICIAL_SSA))


@pytest.mark.parametrize("name", SHUNTED)
def test_the_official_shunted_model_loads_the_export_strictly(name):
    torch = pytest.importorskip("torch", reason="the official model is PyTorch's")
    official = official_shunted()
    state = random_official_state(name)
    model = getattr(official, name)()
    model.load_state_dict(as_torch(convert.flax_to_torch(convert.torch_to_flax(state, name), name,
                                                               convert.batches_tracked(state)), torch), strict=True)
    assert_loaded(model, state)


def official_tiny_model(fixture: str):
    """The official PyTorch model of a tiny fixture: the official Shunted class, or timm's PVTv2."""
    import torch
    if fixture.startswith("tiny_shunted"):
        return official_shunted().ShuntedTransformer(
            num_classes=10, qkv_bias=True, sr_ratios=[8, 4, 2, 1],
            norm_layer=lambda dim: torch.nn.LayerNorm(dim, eps=1e-6), **TINY_SHUNTED)
    timm = pytest.importorskip("timm", reason="timm's pvt_v2 models are the PyTorch PVTv2 (pip install timm)")
    from timm.models.pvt_v2 import PyramidVisionTransformerV2
    return PyramidVisionTransformerV2(num_classes=10, linear="li" in fixture, **TINY_PVT)


@pytest.mark.parametrize("fixture", sorted(FIXTURES))
def test_the_official_model_on_the_export_gives_the_official_logits(fixture):
    torch = pytest.importorskip("torch", reason="the official model is PyTorch's")
    arrays, model, variables, images = fixture_model_and_variables(fixture, jnp.float32)
    name, overrides = FIXTURES[fixture]
    exported = convert.flax_to_torch(variables, name, **overrides)
    official = official_tiny_model(fixture).eval()
    if name.startswith("pvt_v2"):
        from timm.models.pvt_v2 import checkpoint_filter_fn
        official.load_state_dict(checkpoint_filter_fn(as_torch(exported, torch), official), strict=True)
    else:
        official.load_state_dict(as_torch(exported, torch), strict=True)
    with torch.no_grad():
        logits = official(torch.from_numpy(arrays["input"])).numpy()
    np.testing.assert_allclose(logits, arrays["logits"], atol=5e-5)
    np.testing.assert_allclose(logits, model.apply(variables, images), atol=5e-5)
