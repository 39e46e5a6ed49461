"""The jitted train step: mesh independence, gradient accumulation, recipe pieces, checkpoints."""
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from configs import common, shunted_t, vit  # noqa: E402
from shunted_jax import convert, models  # noqa: E402
from shunted_jax.train import checkpoint, evaluators, finetune, mixup, optim, step  # noqa: E402

TINY_MODEL = {"embed_dims": (16, 16, 32, 32), "depths": (1, 1, 1, 1), "num_heads": (2, 2, 2, 2),
              "mlp_ratios": (2, 2, 2, 2)}
# A ViT for what needs a model without BatchNorm, and compiles quickest: one stage, a 4x4 grid.
TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2, "patch_size": 8}
IMAGE_SIZE, NUM_CLASSES, BATCH = 32, 10, 16


def tiny_config(vit_model=False, **model_fields):
    """A tiny float32 Shunted-T (or ViT) on the demo settings, with mixup, drop path and clipping
    all on."""
    config = vit.get_config() if vit_model else shunted_t.get_config()
    common.to_demo(config, {**(TINY_VIT if vit_model else TINY_MODEL), "drop_path_rate": 0.1, **model_fields})
    config.unlock()
    config.global_batch_size = BATCH
    config.mixup.update({"mixup_alpha": 0.8, "cutmix_alpha": 1.0})
    config.optimizer.update({"warmup_steps": 2, "grad_clip_norm": 1.0})
    return config


def build(config, devices, mesh=(-1, 1), num_classes=NUM_CLASSES):
    """(mesh, model, (state, state_sharding, train_step, schedule)) as the training loop builds them."""
    config.mesh.update({"data": mesh[0], "fsdp": mesh[1]})
    device_mesh = step.make_mesh(config.mesh, devices)
    model = step.create_model(config.model, num_classes)
    return device_mesh, model, step.init_training(config, model, device_mesh, image_size=IMAGE_SIZE,
                                                  num_classes=num_classes, steps_per_epoch=10)


def steps(built, num_steps):
    """Yields (state, loss) after each of `num_steps` steps on one fixed synthetic batch; a state
    is donated to the next step, so read it before taking the next."""
    mesh, _, (train_state, _, train_step, schedule) = built
    batch = step.synthetic_batch(mesh, BATCH, IMAGE_SIZE, NUM_CLASSES)
    for _ in range(num_steps):
        train_state, metrics = train_step(train_state, batch, schedule)
        yield train_state, float(metrics["loss"])


def train(built, num_steps):
    """Runs `num_steps` steps on one fixed synthetic batch; returns the final state and the losses."""
    states, losses = zip(*steps(built, num_steps))
    return states[-1], list(losses)


def head_kernel(train_state) -> np.ndarray:
    return np.asarray(train_state.params["head"]["kernel"])


@pytest.fixture(scope="module")
def runs():
    """Three steps of tiny Shunted-T on a (4, 2) data x FSDP mesh of 8 devices and on 1 device."""
    results = {}
    for name, devices, mesh in (("fsdp", jax.devices(), (4, 2)), ("single", jax.devices()[:1], (-1, 1))):
        built = build(tiny_config(), devices, mesh)
        results[name] = (built, *train(built, 3))
    return results


def test_fsdp_mesh_and_single_device_give_the_same_losses(runs):
    _, fsdp_state, fsdp_losses = runs["fsdp"]
    _, single_state, single_losses = runs["single"]
    assert any("fsdp" in leaf.sharding.spec for leaf in jax.tree.leaves(fsdp_state.params))
    assert any("fsdp" in leaf.sharding.spec for leaf in jax.tree.leaves(fsdp_state.opt_state))
    np.testing.assert_allclose(fsdp_losses, single_losses, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(fsdp_state.params["head"]["kernel"]),
                               np.asarray(single_state.params["head"]["kernel"]), atol=1e-5)
    assert int(fsdp_state.step) == 3 and fsdp_losses[0] != fsdp_losses[2]


def test_checkpoint_restores_onto_another_mesh(runs, tmp_path):
    _, fsdp_state, _ = runs["fsdp"]
    _, _, (single_state, single_sharding, _, _) = runs["single"][0]
    meta = {"model": {"name": "shunted_t"}}
    config = tiny_config().checkpoint
    manager = checkpoint.make_checkpoint_manager(tmp_path, config)
    checkpoint.save(manager, fsdp_state, meta)
    manager.wait_until_finished()
    # An interrupted save leaves only orbax's temporary directory; it is never listed or restored.
    (tmp_path / "9.orbax-checkpoint-tmp-123").mkdir()
    manager.reload()
    assert manager.latest_step() == 3

    abstract = step.abstract_like(single_state, single_sharding)
    restored = checkpoint.restore(manager, abstract, meta)
    assert restored.params["head"]["kernel"].sharding.mesh.devices.size == 1
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(fsdp_state)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    with pytest.raises(ValueError, match="another model.*name: 'shunted_t' != 'shunted_s'"):
        checkpoint.restore(manager, abstract, {"model": {"name": "shunted_s"}})
    # A run resumes with another layout, attention, depthwise kernel or stem conv: the parameters are the same.
    checkpoint.restore(manager, abstract, {"model": {"name": "shunted_t", "scan_unroll": 1,
                                                     "kernels": "attention=xla,depthwise=pallas",
                                                     "stem_space_to_depth": False}})
    manager.close()


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory):
    """The tiny ViT (no BatchNorm) without drop path on 2 devices, with an EMA of decay 0.5,
    trained for 2 steps in 1 and in 4 micro-batches: {micro-batches: (heads, state, losses)}, heads
    being the head's kernel before and after each step. The one-batch run is compiled with XLA's
    dumps on, into "dumps", and is kept built under "built"."""
    results = {"dumps": tmp_path_factory.mktemp("dumps")}
    for micro_batches in (1, 4):
        config = tiny_config(vit_model=True, drop_path_rate=0.0)
        config.update({"accumulation_steps": micro_batches, "ema_decay": 0.5})
        if micro_batches == 1:
            config.compiler_options = f"--xla_dump_to={results['dumps']} xla_dump_hlo_module_re=(train|eval)_step"
        built = build(config, jax.devices()[:2])
        heads, losses = [head_kernel(built[2][0])], []
        for train_state, loss in steps(built, 2):
            heads.append(head_kernel(train_state))
            losses.append(loss)
        results[micro_batches] = (heads, train_state, losses)
        if micro_batches == 1:
            results["built"] = (config, built)
    return results


def test_accumulated_micro_batches_equal_one_large_batch(accumulated):
    """The ViT has no BatchNorm; without drop path the two must agree to float32 rounding."""
    (_, state_1, losses_1), (_, state_4, losses_4) = accumulated[1], accumulated[4]
    assert not state_1.batch_stats
    np.testing.assert_allclose(losses_1, losses_4, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(state_4.params), jax.tree.leaves(state_1.params)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


def test_ema_tracks_the_weights_and_is_what_eval_uses(accumulated):
    heads, train_state, _ = accumulated[1]
    assert not np.allclose(heads[1], heads[0]) and not np.allclose(heads[2], heads[1])
    ema = heads[0]
    for trained in heads[1:]:
        ema = 0.5 * trained + 0.5 * ema
    np.testing.assert_allclose(np.asarray(train_state.ema_params["head"]["kernel"]), ema, atol=1e-6)
    assert train_state.variables(use_ema=True)["params"] is train_state.ema_params


def test_compiler_options_of_the_config_reach_xla(accumulated):
    config, (mesh, model, (_, state_sharding, _, _)) = accumulated["built"]
    eval_step = evaluators.from_config(config, model, mesh, state_sharding, 10)[0].eval_step
    batch = {**step.synthetic_batch(mesh, BATCH, IMAGE_SIZE, NUM_CLASSES), "mask": np.ones(BATCH, bool)}
    eval_step.lower(step.abstract_like(accumulated[1][1], state_sharding), batch).compile()
    dumped = {path.name.split(".")[1] for path in accumulated["dumps"].iterdir() if path.name.startswith("module_")}
    assert {"jit_train_step", "jit_eval_step"} <= dumped


def test_compiler_options_parse_like_xla_flags():
    assert step.parse_compiler_options("") == {}
    assert step.parse_compiler_options("--xla_a=1 xla_b=false xla_c=TRUE xla_d=x,y") == {
        "xla_a": "1", "xla_b": False, "xla_c": True, "xla_d": "x,y"}
    with pytest.raises(ValueError, match="xla_name=value"):
        step.parse_compiler_options("xla_dump_to /tmp")
    with pytest.raises(ValueError, match="twice"):
        step.parse_compiler_options("xla_a=1 xla_a=2")


def test_schedule_follows_the_recipe():
    assert optim.peak_learning_rate(5e-4, 1024) == pytest.approx(1e-3)
    schedule = optim.WarmupCosine(peak_lr=1e-3, total_steps=300, warmup_steps=5, warmup_init_lr=1e-6, min_lr=1e-5)
    assert float(schedule(0)) == pytest.approx(1e-6)
    assert float(schedule(4)) == pytest.approx(1e-6 + 4 / 5 * (1e-3 - 1e-6), rel=1e-5)
    # timm (warmup_prefix=False): the cosine is measured from step 0, not from the warm-up's end.
    assert float(schedule(5)) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + np.cos(np.pi * 5 / 300)),
                                               rel=1e-5)
    assert float(schedule(150)) == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-5)
    assert float(schedule(300)) == pytest.approx(1e-5, rel=1e-5)


def test_a_step_built_for_one_schedule_trains_on_another_given_as_its_input(runs):
    """The schedule's numbers are an input, not constants of the program: the step built from
    config A lowers to the program of config B's step, and given B's schedule it reports B's
    learning rate and trains exactly as B's own step does. (A is the `runs` fixture's single-device
    configuration, on its mesh and model: JAX's cache holds the program that fixture compiled.)"""
    mesh, model, _ = runs["single"][0]
    config_a, config_b = tiny_config(), tiny_config()
    config_b.num_train_steps = 7
    config_b.optimizer.update({"base_lr": 3e-3, "warmup_steps": 1, "warmup_init_lr": 1e-5, "min_lr": 1e-4})
    batch = step.synthetic_batch(mesh, BATCH, IMAGE_SIZE, NUM_CLASSES)
    schedule_b = step.replicated_schedule(config_b, mesh, steps_per_epoch=10)
    programs, trained = {}, {}
    for name, config in (("a", config_a), ("b", config_b)):
        _, _, train_step, initialise = step.prepare_training(config, model, mesh, image_size=IMAGE_SIZE,
                                                             num_classes=NUM_CLASSES)
        train_state = initialise()
        lowered = train_step.lower(train_state, batch, schedule_b)
        programs[name], compiled, lrs = lowered.as_text(), lowered.compile(), []
        for _ in range(2):
            train_state, metrics = compiled(train_state, batch, schedule_b)
            lrs.append(float(metrics["lr"]))
        trained[name] = train_state, lrs
    assert programs["a"] == programs["b"]
    wanted = [float(optim.schedule_from_config(config_b, 10)(count)) for count in range(2)]
    assert trained["a"][1] == pytest.approx(wanted, rel=1e-6)
    assert wanted != pytest.approx([float(optim.schedule_from_config(config_a, 10)(count)) for count in range(2)])
    for got, want in zip(jax.tree.leaves(trained["a"][0]), jax.tree.leaves(trained["b"][0])):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_weight_decay_goes_to_kernels_only_even_in_stacked_blocks():
    model = models.create("shunted_t", num_classes=NUM_CLASSES, **TINY_MODEL)
    variables = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)},
                                                  jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)), train=False))
    mask = optim.weight_decay_mask(variables["params"])
    flat = {jax.tree_util.keystr(path): decay
            for path, decay in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat["['head']['kernel']"] and not flat["['head']['bias']"]
    stacked_bias = "['block1']['mlp']['fc1']['bias']"
    assert variables["params"]["block1"]["mlp"]["fc1"]["bias"].ndim == 2 and not flat[stacked_bias]
    assert all(decay == key.endswith("['kernel']") for key, decay in flat.items())


def test_fsdp_shards_the_largest_divisible_dim_but_not_the_depth_axis():
    block = (jax.tree_util.DictKey("block3"), jax.tree_util.DictKey("fc1"), jax.tree_util.DictKey("kernel"))
    plain = (jax.tree_util.DictKey("head"), jax.tree_util.DictKey("kernel"))
    assert step.fsdp_spec(plain, (512, 1000), 4, 1) == jax.sharding.PartitionSpec(None, "fsdp")
    assert step.fsdp_spec(block, (8, 64, 256), 4, 1) == jax.sharding.PartitionSpec(None, None, "fsdp")
    assert step.fsdp_spec(block, (8, 3, 5), 4, 1) == jax.sharding.PartitionSpec("fsdp")
    assert step.fsdp_spec(block, (3, 3, 5), 4, 1) == jax.sharding.PartitionSpec()
    assert step.fsdp_spec(plain, (512, 1000), 4, 10 ** 6) == jax.sharding.PartitionSpec()
    assert step.fsdp_spec(plain, (512, 1000), 1, 1) == jax.sharding.PartitionSpec()


def test_cutmix_lambda_is_the_area_really_kept():
    images = jnp.stack([jnp.zeros((16, 16, 3)), jnp.ones((16, 16, 3))])
    labels = jnp.array([0, 1])
    for seed in range(5):
        mixed, targets = mixup.mix_batch(jax.random.key(seed), images, labels, num_classes=2,
                                         mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5,
                                         label_smoothing=0.0)
        pasted = float(mixed[0].mean())  # image 0 is zeros: the mean is the pasted fraction
        np.testing.assert_allclose(targets[0], [1 - pasted, pasted], atol=1e-6)
        np.testing.assert_allclose(targets.sum(-1), 1.0, atol=1e-6)


def test_mixup_blends_images_and_smoothed_targets_alike():
    images = jnp.stack([jnp.zeros((4, 4, 3)), jnp.ones((4, 4, 3))])
    mixed, targets = mixup.mix_batch(jax.random.key(0), images, jnp.array([0, 1]), num_classes=4,
                                     mixup_alpha=0.8, cutmix_alpha=0.0, prob=1.0, switch_prob=0.5,
                                     label_smoothing=0.1)
    lam = 1.0 - float(mixed[0, 0, 0, 0])
    np.testing.assert_allclose(mixed[0], 1.0 - lam, atol=1e-6)
    on, off = 0.9 + 0.025, 0.025
    np.testing.assert_allclose(targets[0], [lam * on + (1 - lam) * off, lam * off + (1 - lam) * on, off, off],
                               atol=1e-6)
    unmixed, plain = mixup.mix_batch(jax.random.key(0), images, jnp.array([0, 1]), num_classes=4,
                                     mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.0, switch_prob=0.5,
                                     label_smoothing=0.1)
    np.testing.assert_array_equal(unmixed, images)
    np.testing.assert_allclose(plain[1], [off, on, off, off], atol=1e-6)


def test_fine_tuning_keeps_the_weights_and_renews_a_head_of_another_size(runs, tmp_path):
    _, source_state, _ = runs["single"]
    convert.save_variables(jax.device_get(source_state.variables()), tmp_path / "converted", "shunted_t")
    _, _, (target_state, target_sharding, _, _) = build(tiny_config(), jax.devices()[:1], num_classes=5)
    loaded = finetune.load_pretrained(target_state, target_sharding, str(tmp_path / "converted"))
    np.testing.assert_array_equal(np.asarray(loaded.params["block1"]["mlp"]["fc1"]["kernel"]),
                                  np.asarray(source_state.params["block1"]["mlp"]["fc1"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(loaded.batch_stats["patch_embed1"]["bn_0"]["mean"]),
                                  np.asarray(source_state.batch_stats["patch_embed1"]["bn_0"]["mean"]))
    np.testing.assert_array_equal(np.asarray(loaded.params["head"]["kernel"]),
                                  np.asarray(target_state.params["head"]["kernel"]))
    assert loaded.params["head"]["kernel"].shape[-1] == 5


def test_fine_tuning_from_another_model_names_the_mismatching_keys():
    def shapes(name):
        model = models.create(name, num_classes=NUM_CLASSES, **TINY_MODEL)
        return jax.eval_shape(lambda: model.init({"params": jax.random.key(0)},
                                                 jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)), train=False))
    pretrained = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), shapes("pvt_v2_b0"))
    with pytest.raises(ValueError, match="pvt.ckpt does not match.*missing keys: .*batch_stats/patch_embed1"):
        finetune.merge_pretrained(shapes("shunted_t"), pretrained, "pvt.ckpt")
