"""The one choice of implementation per operation (shunted_jax.kernels.dispatch) and the
`kernels` field that carries it: its rules, its mesh, forcing one operation, bad values, and
checkpoints written before the field."""
import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from shunted_jax import models
from shunted_jax.kernels import Choice, parse, resolve_for_mesh
from shunted_jax.kernels.dispatch import choose_attention, choose_depthwise, choose_norm, pad_keys
from shunted_jax.train import checkpoint, step

BF16 = jnp.bfloat16


def test_auto_attention_picks_the_kernel_measured_fastest():
    assert choose_attention("auto", 3136, 49, 32, BF16, "gpu") == "pallas"
    assert choose_attention("auto", 49, 49, 32, BF16, "gpu") == "pallas"  # odd queries: cuDNN refuses
    assert choose_attention("auto", 3136, 196, 32, BF16, "gpu") == "cudnn"  # 196 keys: cuDNN trains faster
    assert choose_attention("auto", 196, 196, 32, BF16, "gpu") == "cudnn"
    assert choose_attention("auto,devices=2", 196, 49, 32, BF16, "gpu") == "exact"  # Pallas: one device
    assert choose_attention("auto", 3136, 49, 24, BF16, "gpu") == "cudnn"  # no power-of-two head dim
    assert choose_attention("auto", 3136, 49, 32, jnp.float32, "gpu") == "exact"
    assert choose_attention("auto", 3136, 49, 32, BF16, "cpu") == "exact"
    assert choose_attention("attention=xla", 49, 49, 32, BF16, "cpu") == "xla"
    with pytest.raises(ValueError, match="auto"):
        choose_attention("attention=flash", 49, 49, 32, BF16, "gpu")


def test_auto_depthwise_uses_pallas_only_for_16_bit_maps_on_a_gpu():
    assert choose_depthwise("auto", 512, BF16, "gpu") == "pallas"
    assert choose_depthwise("auto", 32, jnp.float16, "gpu") == "pallas"
    assert choose_depthwise("auto", 512, jnp.float32, "gpu") == "xla"  # float32 stays exact
    assert choose_depthwise("auto", 512, BF16, "cpu") == "xla"
    assert choose_depthwise("auto", 48, BF16, "gpu") == "xla"  # no 32-channel blocks
    assert choose_depthwise("auto,devices=8", 512, BF16, "gpu") == "xla"  # a Pallas call cannot be sharded
    assert choose_depthwise("depthwise=pallas", 512, jnp.float32, "cpu") == "pallas"
    with pytest.raises(ValueError, match="multiple of 32 channels.*depthwise=xla or depthwise=auto"):
        choose_depthwise("depthwise=pallas", 48, BF16, "gpu")
    with pytest.raises(ValueError, match="choose one of"):
        choose_depthwise("depthwise=cudnn", 512, BF16, "gpu")


def test_auto_norm_uses_pallas_only_for_16_bit_outputs_on_one_gpu():
    assert choose_norm("auto", BF16, "gpu") == "pallas"
    assert choose_norm("auto", jnp.float32, "gpu") == "xla"
    assert choose_norm("auto", BF16, "cpu") == "xla"
    assert choose_norm("auto,devices=8", BF16, "gpu") == "xla"
    assert choose_norm("norm=pallas", jnp.float32, "cpu") == "pallas"
    with pytest.raises(ValueError, match="choose one of"):
        choose_norm("norm=fused", BF16, "gpu")


def test_keys_padded_for_cudnn_are_masked_out():
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 12, 2, 8)) for i in range(3))
    k, v = k[:, :7], v[:, :7]
    padded_k, padded_v, lengths = pad_keys(k, v)
    assert padded_k.shape[1] == 64 and list(lengths) == [7, 7]
    masked = jax.nn.dot_product_attention(q, padded_k, padded_v, key_value_seq_lengths=lengths)
    np.testing.assert_allclose(masked, jax.nn.dot_product_attention(q, k, v), atol=1e-6)


def meshes():
    devices = jax.devices()
    assert len(devices) == 8  # tests/conftest.py's simulated host
    return (jax.sharding.Mesh(np.array(devices[:1]), ("data",)),
            jax.sharding.Mesh(np.array(devices).reshape(4, 2), ("data", "fsdp")))


def test_auto_is_resolved_for_the_mesh_not_the_host():
    """On a host of 8 devices, a model for a one-device mesh gets the Pallas kernels that one GPU
    would, and a model for the 8-device mesh gets XLA (and cuDNN where it fits)."""
    one, eight = meshes()
    on_one, on_eight = resolve_for_mesh("auto", one), resolve_for_mesh("auto", eight)
    assert on_one == resolve_for_mesh("auto", None) == "auto"
    assert parse(on_eight) == Choice(devices=8)
    for kernels, want in ((on_one, "pallas"), (on_eight, "xla")):
        assert choose_depthwise(kernels, 512, BF16, "gpu") == want
        assert choose_norm(kernels, BF16, "gpu") == want
    assert choose_attention(on_one, 784, 49, 32, BF16, "gpu") == "pallas"
    assert choose_attention(on_eight, 784, 49, 32, BF16, "gpu") == "cudnn"
    assert choose_attention(on_eight, 196, 49, 32, BF16, "gpu") == "exact"
    # forced implementations stay forced
    assert parse(resolve_for_mesh("attention=pallas,depthwise=xla", eight)) == Choice("pallas", "xla", "auto", 8)
    # the training code's model carries its mesh
    config = ml_collections.ConfigDict({"name": "shunted_t", "kernels": "auto", "dtype": "bfloat16"})
    assert step.create_model(config, 10, eight).kernels == on_eight
    assert step.create_model(config, 10, one).kernels == on_one


def pallas_calls(kernels: str) -> int:
    """Pallas calls in the forward of a one-block-per-stage Shunted-T: per stage, SSA's rates
    (8, 4), (4, 2), (2, 1) and the global (1,)."""
    model = models.create("shunted_t", num_classes=3, embed_dims=(64, 64, 64, 64), num_heads=(2, 2, 2, 2),
                          depths=(1, 1, 1, 1), kernels=kernels)
    images = jnp.zeros((1, 32, 32, 3))
    variables = jax.eval_shape(lambda: model.init({"params": jax.random.key(0)}, images))
    return count_calls(jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, images).jaxpr, "pallas_call")


def count_calls(jaxpr, primitive: str) -> int:
    """How many times `primitive` runs in `jaxpr`: each call site of a nested (e.g. jitted) jaxpr
    counts its calls again, however the printed jaxpr shares it."""
    total = 0
    for eqn in jaxpr.eqns:
        total += eqn.primitive.name == primitive
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    total += count_calls(sub.jaxpr, primitive)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    total += count_calls(sub, primitive)
    return total


def test_each_operation_can_be_forced_alone():
    assert parse("attention=pallas") == Choice("pallas", "auto", "auto")
    assert parse("exact") == Choice("exact", "xla", "xla")
    assert parse("exact,norm=pallas") == Choice("exact", "xla", "pallas")
    assert parse(" attention=xla, depthwise=pallas ,norm=xla,devices=2") == Choice("xla", "pallas", "xla", 2)
    # On the CPU "auto" is XLA everywhere: each forced operation, and only it, turns into Pallas calls.
    groups, blocks, stages = 2 + 2 + 2 + 1, 4, 4
    want = {"attention": groups,  # one softmax per head group
            "depthwise": groups + blocks,  # V's local enhancement per group, the FFN's conv per block
            "norm": (groups - 1) + 2 * blocks + 2 * stages}  # per group at a rate > 1, per block, patch embed, stage
    counts = {op: pallas_calls(f"{op}=pallas") for op in want}
    assert pallas_calls("auto") == pallas_calls("exact") == 0
    assert counts == want
    assert pallas_calls("attention=pallas,depthwise=pallas,norm=pallas") == sum(want.values())


@pytest.mark.parametrize("kernels, message", [
    ("fast", r"Invalid kernels='fast': write 'auto', 'exact' or comma-separated operation=implementation"),
    ("attention=flash", r"Unknown attention implementation 'flash'.*choose one of auto, exact, xla, cudnn, pallas"),
    ("depthwise=cudnn", r"Unknown depthwise implementation 'cudnn'.*choose one of auto, xla, pallas"),
    ("conv=xla", r"Invalid kernels='conv=xla'.*attention: auto\|exact\|xla\|cudnn\|pallas"),
    ("norm=pallas,exact", r"Invalid kernels="),
    ("auto,devices=0", r"Invalid kernels="),
    ("", r"Invalid kernels=''"),
])
def test_an_invalid_kernels_value_says_what_to_write(kernels, message):
    with pytest.raises(ValueError, match=message):
        parse(kernels)
    with pytest.raises(ValueError, match=message):
        models.create("shunted_t", kernels=kernels)


def test_checkpoints_written_with_the_old_execution_fields_still_restore(tmp_path):
    """Runs before the `kernels` field wrote `attention_impl` and `depthwise_impl` into the
    checkpoint's meta: they resume, and another architecture is still refused."""
    mesh = meshes()[0]
    train_state = step.TrainState(step=jnp.asarray(3, jnp.int32), params={"w": jnp.arange(4.0)}, batch_stats={},
                                  opt_state={})
    manager = checkpoint.make_checkpoint_manager(tmp_path, ml_collections.ConfigDict({"keep": 1,
                                                                                     "asynchronous": False}))
    old = {"model": {"name": "shunted_t", "attention_impl": "exact", "depthwise_impl": "xla", "scan_unroll": 1}}
    checkpoint.save(manager, train_state, old)
    manager.wait_until_finished()
    sharding = jax.tree.map(lambda _: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), train_state)
    abstract = step.abstract_like(train_state, sharding)
    restored = checkpoint.restore(manager, abstract, {"model": {"name": "shunted_t", "kernels": "auto",
                                                                "scan_unroll": 64}})
    np.testing.assert_array_equal(restored.params["w"], np.arange(4.0))
    with pytest.raises(ValueError, match="another model"):
        checkpoint.restore(manager, abstract, {"model": {"name": "shunted_s", "kernels": "auto"}})
    manager.close()
