"""Official state dicts -> Flax variables: full key coverage, named errors, the command line."""
import argparse

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.models import RELEASED, TINY_PVT, TINY_SHUNTED, fixture_model_and_variables, load_fixture, official_listing

from shunted_jax import convert, models


def official_state_dict(name):
    """A state dict with exactly the released keys and shapes (zero-filled, no memory per entry)."""
    return {key: np.broadcast_to(np.zeros((), dtype), shape) for key, (shape, dtype) in official_listing(name).items()}


def test_keys_files_cover_every_released_variant():
    assert RELEASED == models.list_models(official_only=True)


@pytest.mark.parametrize("name", RELEASED)
def test_every_official_key_converts(name):
    state = official_state_dict(name)
    variables = convert.torch_to_flax(state, name)
    expected = jax.eval_shape(lambda: models.create(name).init({"params": jax.random.key(0)}, jnp.zeros((1, 64, 64, 3))))
    assert jax.tree_util.tree_structure(variables) == jax.tree_util.tree_structure(dict(expected))
    for got, want in zip(jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(dict(expected))):
        assert got.shape == want.shape
    converted = sum(x.size for x in jax.tree_util.tree_leaves(variables))
    assert converted == sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked"))


@pytest.mark.parametrize("name", ["shunted_t", "pvt_v2_b2_li"])
def test_missing_extra_and_misshaped_keys_are_named(name):
    state = official_state_dict(name)
    missing = dict(state)
    del missing["block2.1.attn.q.weight"]
    with pytest.raises(convert.CheckpointMismatchError, match=r"1 missing key\(s\):\s+block2\.1\.attn\.q\.weight"):
        convert.torch_to_flax(missing, name)
    with pytest.raises(convert.CheckpointMismatchError, match=r"1 unexpected key\(s\):\s+block9\.0\.extra\.weight"):
        convert.torch_to_flax({**state, "block9.0.extra.weight": np.zeros(3)}, name)
    key = "block1.0.mlp.fc1.weight"
    wrong = {**state, key: np.zeros(state[key].shape[::-1], np.float32)}
    with pytest.raises(convert.CheckpointMismatchError, match=r"mis-shaped.*\n\s+block1\.0\.mlp\.fc1\.weight: checkpoint"):
        convert.torch_to_flax(wrong, name)


def test_checkpoint_of_another_model_is_refused():
    with pytest.raises(convert.CheckpointMismatchError, match="unexpected"):
        convert.torch_to_flax(official_state_dict("shunted_s"), "shunted_t")


def test_wrapped_and_ddp_prefixed_state_dicts_are_accepted():
    state = official_state_dict("pvt_v2_b0")
    wrapped = {"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    assert convert.torch_to_flax(wrapped, "pvt_v2_b0")["params"]["head"]["kernel"].shape == (256, 1000)


def test_converted_checkpoint_round_trips_through_disk(tmp_path):
    arrays, state = load_fixture("tiny_pvt_v2_64x64")
    checkpoint = tmp_path / "official.npz"
    np.savez(checkpoint, **state)
    _, model, _, images = fixture_model_and_variables("tiny_pvt_v2_64x64", jnp.float32)
    variables = convert.torch_to_flax(convert.read_state_dict(checkpoint), "pvt_v2_b0", **TINY_PVT)
    convert.save_variables(variables, tmp_path / "out", "pvt_v2_b0")
    loaded = convert.load_variables(tmp_path / "out", expected_model="pvt_v2_b0")
    np.testing.assert_allclose(model.apply(loaded, images), arrays["logits"], atol=5e-5)
    with pytest.raises(convert.CheckpointMismatchError, match="pvt_v2_b0"):
        convert.load_variables(tmp_path / "out", expected_model="shunted_t")


def test_command_line_on_a_released_layout(tmp_path, capsys):
    checkpoint = tmp_path / "pvt_v2_b0.npz"
    np.savez(checkpoint, **official_state_dict("pvt_v2_b0"))
    convert.main(["--model", "pvt_v2_b0", str(checkpoint), str(tmp_path / "out")])
    assert "3,666,760 parameters" in capsys.readouterr().out
    loaded = convert.load_variables(tmp_path / "out")
    assert loaded["params"]["block4"]["attn"]["q"]["kernel"].shape == (2, 256, 256)
    with pytest.raises(FileNotFoundError, match="shunted_jax.convert"):
        convert.load_variables(tmp_path)


def test_released_pth_file_converts_to_the_official_logits(tmp_path):
    torch = pytest.importorskip("torch", reason="reading .pth files needs the optional PyTorch extra")
    arrays, state = load_fixture("tiny_shunted_71x45")
    checkpoint = tmp_path / "released.pth"
    official_layout = {"model": {k: torch.from_numpy(np.array(v)) for k, v in state.items()}, "epoch": 299,
                       "args": argparse.Namespace(model="shunted_t", lr=5e-4)}  # as the official main.py saves
    torch.save(official_layout, checkpoint)
    variables = convert.torch_to_flax(convert.read_state_dict(checkpoint), "shunted_t", **TINY_SHUNTED)
    _, model, _, images = fixture_model_and_variables("tiny_shunted_71x45", jnp.float32)
    np.testing.assert_allclose(model.apply(variables, images), arrays["logits"], atol=5e-5)


def test_same_shaped_keys_land_at_their_own_flax_leaves():
    """Every key gets its own constant value, so swapped same-shaped keys (stem units, the two
    SSA branches) would show up as wrong values, not just wrong shapes."""
    state = official_state_dict("shunted_b")
    marks = {key: float(i) for i, key in enumerate(state)}
    variables = convert.torch_to_flax({k: np.full(v.shape, marks[k], np.float32) for k, v in state.items()}, "shunted_b")
    params, stats = variables["params"], variables["batch_stats"]
    stem = params["patch_embed1"]
    expected = [
        (stem["conv_0"]["kernel"], "patch_embed1.conv.0.weight"),
        (stem["bn_0"]["scale"], "patch_embed1.conv.1.weight"),
        (stem["conv_1"]["kernel"], "patch_embed1.conv.3.weight"),
        (stem["bn_1"]["bias"], "patch_embed1.conv.4.bias"),
        (stats["patch_embed1"]["bn_1"]["mean"], "patch_embed1.conv.4.running_mean"),
        (stem["conv_2"]["kernel"], "patch_embed1.conv.6.weight"),
        (stats["patch_embed1"]["bn_2"]["var"], "patch_embed1.conv.7.running_var"),
        (stem["proj"]["kernel"], "patch_embed1.conv.9.weight"),
        (params["block3"]["attn"]["kv1"]["kernel"][5], "block3.5.attn.kv1.weight"),
        (params["block3"]["attn"]["kv2"]["kernel"][5], "block3.5.attn.kv2.weight"),
        (params["block3"]["attn"]["local_conv1"]["bias"][23], "block3.23.attn.local_conv1.bias"),
        (params["block3"]["attn"]["local_conv2"]["bias"][23], "block3.23.attn.local_conv2.bias"),
        (params["block1"]["attn"]["norm1"]["scale"][2], "block1.2.attn.norm1.weight"),
        (params["block1"]["attn"]["norm2"]["scale"][2], "block1.2.attn.norm2.weight"),
        (params["block1"]["norm2"]["scale"][2], "block1.2.norm2.weight"),
        (params["block4"]["attn"]["local_conv"]["kernel"][1], "block4.1.attn.local_conv.weight"),
    ]
    for leaf, key in expected:
        assert np.all(leaf == marks[key]), key


@pytest.mark.parametrize("suffix, content", [(".safetensors", b""), (".npz", b""), (".npz", b"PK\x03\x04 truncated"),
                                             (".pth", b"not a torch file")])
def test_an_unreadable_checkpoint_is_named_in_one_line(tmp_path, capsys, suffix, content):
    if suffix == ".pth":
        pytest.importorskip("torch", reason="reading .pth files needs the optional PyTorch extra")
    checkpoint = tmp_path / f"shunted_t{suffix}"
    checkpoint.write_bytes(content)
    with pytest.raises(convert.UnreadableCheckpointError, match=f"{checkpoint} .* is not a readable {suffix} checkpoint: "):
        convert.read_state_dict(checkpoint)
    with pytest.raises(SystemExit) as stopped:
        convert.main(["--model", "shunted_t", str(checkpoint), str(tmp_path / "out")])
    message = str(stopped.value.code)
    assert message.startswith(f"error: {checkpoint} ") and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_a_damaged_converted_checkpoint_is_named(tmp_path):
    np.savez(tmp_path / "pvt_v2_b0.npz", **official_state_dict("pvt_v2_b0"))
    convert.main(["--model", "pvt_v2_b0", str(tmp_path / "pvt_v2_b0.npz"), str(tmp_path / "out")])
    (tmp_path / "out" / "model.json").write_text("{garbled")
    with pytest.raises(convert.UnreadableCheckpointError, match="model.json of a converted checkpoint"):
        convert.load_variables(tmp_path / "out")
    (tmp_path / "out" / "model.json").write_text('{"model": "pvt_v2_b0"}')
    (tmp_path / "out" / "variables" / "_METADATA").write_text("{garbled")
    with pytest.raises(convert.UnreadableCheckpointError, match=f"{tmp_path / 'out' / 'variables'} cannot be restored"):
        convert.load_variables(tmp_path / "out")
