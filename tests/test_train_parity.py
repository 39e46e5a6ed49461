"""Training against the official PyTorch recipe: K float64 steps of `train.py`'s jitted step equal
the official training code's losses, final parameters and BatchNorm statistics to 1e-9.

Runs on every `tests/data/train_*.npz` (schema: ../shared/reference/train/README.md).
"""
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import DATA_DIR
from flax import traverse_util

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from configs import common  # noqa: E402
from shunted_jax.convert import torch_to_flax  # noqa: E402
from shunted_jax.train import optim, step  # noqa: E402

FIXTURES = sorted(DATA_DIR.glob("train_*.npz"))
NOT_STATE = {"images", "labels", "lrs", "loss_fp64", "logits_fp64", "grad_norm_fp64", "meta"}
TOLERANCE = 1e-9


def load(path):
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    return arrays, json.loads(str(arrays["meta"]))


def model_fields(meta) -> dict:
    """Our model fields for the official constructor call recorded in the fixture."""
    kwargs = meta["constructor_kwargs"]
    if not kwargs.get("qkv_bias", True) or any(kwargs.get(k, 0) for k in ("drop_rate", "attn_drop_rate")):
        raise ValueError(f"{meta['model']}: the port always has qkv biases and no dropout, got {kwargs}")
    fields = {k: tuple(kwargs[k]) for k in ("embed_dims", "depths", "num_heads", "mlp_ratios", "sr_ratios")}
    fields["drop_path_rate"] = kwargs["drop_path_rate"]
    if "num_conv" in kwargs:
        fields["num_conv"] = kwargs["num_conv"]
    if "linear" in kwargs:
        linear = kwargs["linear"]
        fields.update(attention="linear_sra" if linear else "sra", ffn="pvt_linear" if linear else "pvt")
    return fields


def to_flax(state_dict, meta, dtype) -> dict:
    """The converter's Flax variables, in `dtype` (the converter keeps the arrays' own dtype)."""
    variables = torch_to_flax(state_dict, meta["model"], num_classes=meta["num_classes"], **model_fields(meta))
    return jax.tree.map(lambda a: np.asarray(a, dtype), variables)


def fixture_config(meta):
    """train.py's ImageNet config for the fixture: its model in float64, its AdamW settings and
    clipping, label smoothing, mixup/CutMix and drop path off."""
    if meta["clip"] and meta["clip_epsilon"] != 1e-6:
        raise ValueError(f"clipping here divides by the norm + 1e-6, the fixture by + {meta['clip_epsilon']}")
    config = common.imagenet_config(meta["model"], drop_path_rate=0.0, grad_clip_norm=meta["clip"] or 0.0)
    config.model.update({**model_fields(meta), "dtype": "float64", "param_dtype": "float64"})
    config.mixup.update({"mixup_alpha": 0.0, "cutmix_alpha": 0.0})
    config.data.device_pp_train = ""  # the fixture's images are finished float64
    config.label_smoothing = meta["label_smoothing"]
    config.optimizer.update({"b1": meta["betas"][0], "b2": meta["betas"][1], "eps": meta["eps"],
                             "weight_decay": meta["weight_decay"]})
    return config


def build_train_step(config, meta, variables):
    """train.py's model, optimizer and jitted step (`create_model`, `make_optimizer`,
    `make_train_step`) on one CPU device, with the fixture's learning rate at each step as the
    step's schedule. Returns (initial state, the step on that schedule)."""
    mesh = step.make_mesh(config.mesh, jax.devices()[:1])
    model = step.create_model(config.model, meta["num_classes"])
    schedule = jax.tree_util.Partial(lambda lrs, count: lrs[count], jnp.asarray(meta["lrs"], jnp.float64))
    tx = optim.make_optimizer(config.optimizer, schedule)
    params = variables["params"]
    state = step.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                            batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))
    state_sharding = step.state_sharding(state, mesh)
    train_step = step.make_train_step(model, config, mesh, state_sharding, meta["num_classes"], {})
    return jax.device_put(state, state_sharding), lambda state, batch: train_step(state, batch, schedule)


def max_difference(ours: dict, official: dict) -> tuple:
    """(largest |difference|, its path) over every leaf of two Flax variable trees of one structure."""
    ours, official = traverse_util.flatten_dict(ours), traverse_util.flatten_dict(official)
    assert ours.keys() == official.keys()
    return max((float(np.abs(np.asarray(ours[p]) - official[p]).max()), "/".join(p)) for p in official)


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_float64_training_steps_match_official(path):
    arrays, meta = load(path)
    with jax.enable_x64(True):
        initial = to_flax({k: v for k, v in arrays.items() if k not in NOT_STATE and "/" not in k}, meta,
                          np.float64)
        state, train_step = build_train_step(fixture_config(meta), meta, initial)
        loss_differences, grad_norm_differences = [], []
        for k in range(meta["steps"]):
            batch = {"image": jnp.asarray(arrays["images"][k].transpose(0, 2, 3, 1), jnp.float64),
                     "label": jnp.asarray(arrays["labels"][k], jnp.int32)}
            state, metrics = train_step(state, batch)
            assert metrics["loss"].dtype == jnp.float64
            loss_differences.append(abs(float(metrics["loss"]) - arrays["loss_fp64"][k]))
            grad_norm_differences.append(abs(float(metrics["grad_norm"]) / arrays["grad_norm_fp64"][k] - 1))

    final_state = {k[len("final/"):]: v for k, v in arrays.items() if k.startswith("final/")}
    assert all(int(v) == meta["steps"] for k, v in final_state.items() if k.endswith("num_batches_tracked"))
    official = to_flax(final_state, meta, np.float64)
    ours = {"params": state.params, **({"batch_stats": state.batch_stats} if state.batch_stats else {})}
    final_difference, where = max_difference(ours, official)
    report = (f"{path.stem}: max |d loss| {max(loss_differences):.2e} (per step "
              f"{', '.join(f'{d:.1e}' for d in loss_differences)}), max |d final| {final_difference:.2e} at "
              f"{where}, max relative d grad norm {max(grad_norm_differences):.1e}")
    print(report)
    assert max(loss_differences) <= TOLERANCE, report
    assert final_difference <= TOLERANCE, report
    assert max(grad_norm_differences) <= TOLERANCE, report


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_weight_decay_mask_is_official(path):
    """`weight_decay_mask` decays exactly the official decay group: the converter maps a state dict
    flagging each official parameter's group onto our leaves."""
    arrays, meta = load(path)
    no_decay = set(meta["no_weight_decay_params"])
    assert no_decay.isdisjoint(meta["decay_params"])
    flags = {k: np.full(v.shape, k in meta["decay_params"]) for k, v in arrays.items()
             if k not in NOT_STATE and "/" not in k}
    official = to_flax(flags, meta, bool)["params"]
    assert all(v.all() or not v.any() for v in jax.tree.leaves(official))
    ours = optim.weight_decay_mask(official)
    assert jax.tree.map(lambda flag: bool(flag.all()), official) == ours
    assert sum(jax.tree.leaves(ours)) > 0 and not all(jax.tree.leaves(ours))


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clipping_is_torch_clip_grad_norm(max_norm):
    """Gradients are scaled by min(1, c / (G + 1e-6)), as torch.nn.utils.clip_grad_norm_."""
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        grads = {"a": rng.standard_normal((3, 4)), "b": {"c": rng.standard_normal(5)}}
        norm = np.sqrt(sum(np.sum(g ** 2) for g in jax.tree.leaves(grads)))
        expected = jax.tree.map(lambda g: g * min(1.0, max_norm / (norm + 1e-6)), grads)
        clip = optim.clip_by_global_norm_as_torch(max_norm)
        clipped, _ = clip.update(jax.tree.map(jnp.asarray, grads), clip.init(grads))
        difference = max(float(np.abs(np.asarray(c) - e).max())
                         for c, e in zip(jax.tree.leaves(clipped), jax.tree.leaves(expected)))
        assert difference <= 1e-15
