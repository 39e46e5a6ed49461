"""The one choice of implementation per operation (shunted_jax.kernels.dispatch) and the
`kernels` field that carries it: its rules, the devices and meshes it runs on, forcing one
operation, bad values, and checkpoints written before the field."""
import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from shunted_jax import models
from shunted_jax.kernels import Choice, common, parse
from shunted_jax.kernels.common import Device
from shunted_jax.kernels.dispatch import choose_attention, choose_depthwise, choose_norm, pad_keys
from shunted_jax.models.layers import LayerNorm
from shunted_jax.train import checkpoint, step

BF16 = jnp.bfloat16
H100 = Device("gpu", "NVIDIA H100 80GB HBM3", (9, 0))
T4 = Device("gpu", "Tesla T4", (7, 5))
CPU = Device("cpu", "cpu")


def test_auto_attention_picks_the_kernel_measured_fastest():
    assert choose_attention("auto", 8, 3136, 49, 32, BF16, H100) == "pallas"
    assert choose_attention("auto", 8, 49, 49, 32, BF16, H100) == "pallas"  # odd queries: cuDNN refuses
    assert choose_attention("auto", 8, 3136, 196, 32, BF16, H100) == "cudnn"  # 196 keys: cuDNN trains faster
    assert choose_attention("auto", 8, 196, 196, 32, BF16, H100) == "cudnn"
    assert choose_attention("auto", 8, 3136, 49, 24, BF16, H100) == "cudnn"  # no power-of-two head dim
    assert choose_attention("auto", 8, 3136, 49, 32, jnp.float32, H100) == "exact"
    assert choose_attention("auto", 8, 3136, 49, 32, BF16, CPU) == "exact"
    assert choose_attention("attention=xla", 8, 49, 49, 32, BF16, CPU) == "xla"
    with pytest.raises(ValueError, match="auto"):
        choose_attention("attention=flash", 8, 49, 49, 32, BF16, H100)


def test_auto_depthwise_uses_pallas_only_for_16_bit_maps_on_a_gpu():
    assert choose_depthwise("auto", 8, 512, BF16, H100) == "pallas"
    assert choose_depthwise("auto", 8, 32, jnp.float16, H100) == "pallas"
    assert choose_depthwise("auto", 8, 512, jnp.float32, H100) == "xla"  # float32 stays exact
    assert choose_depthwise("auto", 8, 512, BF16, CPU) == "xla"
    assert choose_depthwise("auto", 8, 48, BF16, H100) == "xla"  # no 32-channel blocks
    assert choose_depthwise("depthwise=pallas", 8, 512, jnp.float32, CPU) == "pallas"
    with pytest.raises(ValueError, match="multiple of 32 channels.*depthwise=xla or depthwise=auto"):
        choose_depthwise("depthwise=pallas", 8, 48, BF16, H100)
    with pytest.raises(ValueError, match="choose one of"):
        choose_depthwise("depthwise=cudnn", 8, 512, BF16, H100)


def test_auto_norm_uses_pallas_only_for_16_bit_outputs_on_a_gpu():
    assert choose_norm("auto", 8, BF16, H100) == "pallas"
    assert choose_norm("auto", 8, jnp.float32, H100) == "xla"
    assert choose_norm("auto", 8, BF16, CPU) == "xla"
    assert choose_norm("norm=pallas", 8, jnp.float32, CPU) == "pallas"
    with pytest.raises(ValueError, match="choose one of"):
        choose_norm("norm=fused", 8, BF16, H100)


def test_auto_takes_the_kernels_on_a_mesh_whose_devices_divide_the_batch():
    """On a mesh each device runs the kernels on its share of the batch: "auto" chooses as on one
    GPU, and falls back where the batch does not split evenly."""
    for shards in (1, 8):
        assert choose_attention("auto", 16, 784, 49, 32, BF16, H100, shards) == "pallas"
        assert choose_depthwise("auto", 16, 512, BF16, H100, shards) == "pallas"
        assert choose_norm("auto", 16, BF16, H100, shards) == "pallas"
    assert choose_attention("auto", 12, 784, 49, 32, BF16, H100, 8) == "cudnn"
    assert choose_depthwise("auto", 12, 512, BF16, H100, 8) == "xla"
    assert choose_norm("auto", 12, BF16, H100, 8) == "xla"
    for forced in (lambda: choose_norm("norm=pallas", 12, BF16, H100, 8),
                   lambda: choose_depthwise("depthwise=pallas", 12, 512, BF16, CPU, 8),
                   lambda: choose_attention("attention=pallas", 12, 784, 49, 32, BF16, H100, 8)):
        with pytest.raises(ValueError, match="a batch of 12 does not split over the 8 devices"):
            forced()


def test_a_gpu_older_than_ampere_gets_xla_and_a_forced_kernel_names_the_card():
    assert choose_attention("auto", 8, 3136, 49, 32, BF16, T4) == "cudnn"
    assert choose_depthwise("auto", 8, 512, BF16, T4) == "xla"
    assert choose_norm("auto", 8, BF16, T4) == "xla"
    assert choose_norm("auto", 8, BF16, Device("gpu", "AMD Instinct MI300X")) == "xla"  # not CUDA
    message = r"norm=pallas needs a CUDA GPU of compute capability 8.0 or newer.*Tesla T4 \(compute capability 7.5\)"
    with pytest.raises(ValueError, match=message):
        choose_norm("norm=pallas", 8, BF16, T4)
    with pytest.raises(ValueError, match="depthwise=pallas needs a CUDA GPU.*Tesla T4"):
        choose_depthwise("depthwise=pallas", 8, 512, BF16, T4)
    with pytest.raises(ValueError, match="attention=pallas needs a CUDA GPU.*Tesla T4"):
        choose_attention("attention=pallas", 8, 3136, 49, 32, BF16, T4)


class FakeGpu:
    """What jax.devices() gives on a CUDA machine, as far as `local_device` reads it."""
    platform = "gpu"

    def __init__(self, kind, capability):
        self.device_kind, self.compute_capability = kind, capability
        self.client = type("Client", (), {"platform_version": "PJRT C API\ncuda 12080"})()


@pytest.mark.parametrize("kind, capability, compiles", [("Tesla T4", "7.5", False), ("Tesla V100-SXM2-16GB", "7.0", False),
                                                        ("NVIDIA A100-SXM4-40GB", "8.0", True),
                                                        ("NVIDIA H100 80GB HBM3", "9.0", True)])
def test_the_device_description_decides_whether_the_kernels_compile(monkeypatch, kind, capability, compiles):
    monkeypatch.setattr(jax, "devices", lambda *_: [FakeGpu(kind, capability)])
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    device = common.local_device()
    assert device == Device("gpu", kind, tuple(int(part) for part in capability.split(".")))
    assert device.compiles_pallas == compiles
    assert choose_norm("auto", 8, BF16, device) == ("pallas" if compiles else "xla")
    # a model's LayerNorm on this card: "auto" traces XLA's formulas, a forced kernel stops first
    norm = LayerNorm(1e-6, dtype=BF16, kernels="auto")
    x = jnp.zeros((2, 4, 64), BF16)
    variables = {"params": {"scale": jnp.ones(64), "bias": jnp.zeros(64)}}
    if not compiles:
        assert count_calls(jax.make_jaxpr(lambda v: norm.apply(v, x))(variables).jaxpr, "pallas_call") == 0
        with pytest.raises(ValueError, match=f"norm=pallas needs a CUDA GPU.*{kind}"):
            norm.clone(kernels="norm=pallas").apply(variables, x)


def test_keys_padded_for_cudnn_are_masked_out():
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 12, 2, 8)) for i in range(3))
    k, v = k[:, :7], v[:, :7]
    padded_k, padded_v, lengths = pad_keys(k, v)
    assert padded_k.shape[1] == 64 and list(lengths) == [7, 7]
    masked = jax.nn.dot_product_attention(q, padded_k, padded_v, key_value_seq_lengths=lengths)
    np.testing.assert_allclose(masked, jax.nn.dot_product_attention(q, k, v), atol=1e-6)


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
    assert parse(" attention=xla, depthwise=pallas ,norm=xla") == Choice("xla", "pallas", "xla")
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
    ("auto,devices=8", r"Invalid kernels="),
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
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
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
