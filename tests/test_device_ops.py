"""The device augmentation (shunted_jax.data.device_ops) against the host's TensorFlow ops it
replaces, on real images; its random draws against timm's policy; its batches on 1 and 8 devices."""
import inspect
import math

import jax
import jax.numpy as jnp
import matplotlib.cbook
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from helpers.data import natural_image

from shunted_jax.data import device_ops, ops, randaug, registry
from shunted_jax.data.fashion_mnist_demo import DEBIAN_DIR, read_idx
from shunted_jax.data.tf_import import tensorflow

tf = tensorflow()

SIZE = (40, 48)  # not square, so that a swapped height and width shows
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def _resized(image) -> np.ndarray:
    return np.round(ops.resize_bicubic(tf.cast(image, tf.float32), *SIZE).numpy())


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """float32 (4, 40, 48, 3) in [0, 255]: a photo (matplotlib's grace_hopper.jpg), the data tests'
    natural-looking image, a Fashion-MNIST test image, and the photo rotated by the host op (values
    between integers and fill in the corners, as a second RandAugment layer sees them)."""
    photo_file = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    photo = _resized(tf.io.decode_jpeg(tf.io.read_file(str(photo_file))))
    fashion = _resized(np.repeat(read_idx(f"{DEBIAN_DIR}/t10k-images-idx3-ubyte.gz")[0][..., None], 3, axis=-1))
    rotated = randaug.rotate(tf.constant(photo, tf.float32), 23.0).numpy()
    return np.stack([photo, natural_image(*SIZE), fashion, rotated]).astype(np.float32)


@pytest.fixture(scope="module")
def apply_operation():
    """Per-example operation, level and sign, as RandAugment applies them in a batch."""
    return jax.jit(jax.vmap(device_ops.apply_operation))


def _host_operation(image, index: int, level: float, sign: float) -> np.ndarray:
    host = randaug.RandAugment()
    return host.apply_operation(tf.constant(image), tf.constant(index), tf.constant(level), tf.constant(sign)).numpy()


@pytest.mark.parametrize("name", device_ops.OPERATION_NAMES)
def test_each_operation_matches_the_host_op(name, images, apply_operation):
    """Photometric ops: within one level of 255 on average, and at most 1% of the values more than
    half a level apart (the arithmetic is the same in float32; dm-pix's luma weights differ from
    PIL's by 1e-4, and a rounding that decides between integers, as in Contrast's rounded mean or
    Posterize's floor, may move a few values by a level or more). Geometric ops interpolate
    bilinearly at the same coordinates with the same per-neighbour fill as TF, so only float32
    rounding of the coordinates (about 1e-5 pixel, times a gradient of at most 255 levels per
    pixel) separates them: at most 0.05 levels anywhere; a half-pixel shift, another fill value or
    a fill rule per output pixel moves edge pixels by tens of levels."""
    index = device_ops.OPERATION_NAMES.index(name)
    batch = len(images)
    for level, sign in [(0.9, 1.0), (0.9, -1.0), (0.37, 1.0), (1.0, -1.0)]:
        expected = np.stack([_host_operation(image, index, level, sign) for image in images])
        levels, signs = np.full(batch, level, np.float32), np.full(batch, sign, np.float32)
        actual = np.asarray(apply_operation(images, np.full(batch, index), levels, signs))
        assert np.abs(expected - images).mean() > 0.5, "the case leaves the images as they are"
        diff = np.abs(actual - expected)
        if name in GEOMETRIC:
            assert diff.max() <= 0.05, (name, level, sign, diff.max())
        else:
            assert diff.mean() <= 1.0 and (diff > 0.5).mean() <= 0.01, (name, level, sign, diff.mean())


def test_geometric_operations_fill_with_timms_imagenet_mean(images, apply_operation):
    index = device_ops.OPERATION_NAMES.index("TranslateXRel")
    shifted = np.asarray(apply_operation(images, np.full(4, index), np.ones(4, np.float32), np.ones(4, np.float32)))
    shift = 0.45 * SIZE[1]  # level 1: output column x reads input column x + shift
    uncovered = shifted[:, :, math.ceil(SIZE[1] - shift) :]
    fill = np.broadcast_to(np.array([124.0, 116.0, 104.0], np.float32), uncovered.shape)
    np.testing.assert_array_equal(uncovered, fill)
    np.testing.assert_allclose(shifted[:, :, :10], 0.4 * images[:, :, 21:31] + 0.6 * images[:, :, 22:32], atol=1e-3)


def _normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def test_the_drawn_operations_and_magnitudes_follow_the_policy():
    """2 layers per image; each layer one of 15 operations uniformly, applied with probability 0.5,
    at a magnitude N(9, 0.5) clipped to [0, 10], with a fair sign. Frequencies are held to 4
    binomial standard deviations; the clipped magnitude's mean and std to 4 standard errors of
    their exact values (clipping at 10, two std above 9, lowers both a little)."""
    keys = device_ops.example_keys(jax.random.key(1), 0, jnp.arange(4000))
    draws = jax.jit(jax.vmap(lambda key: device_ops.draw_layers(key, 2, 9.0, 0.5)))(keys)
    index, applied, level, sign = (np.asarray(field) for field in draws)
    assert index.shape == (4000, 2)
    count = index.size

    def assert_frequency(hits, p):
        assert abs(hits.mean() - p) <= 4 * math.sqrt(p * (1 - p) / hits.size), (hits.mean(), p)

    for number in range(15):
        assert_frequency(index == number, 1 / 15)
    assert_frequency(index[:, 0] == index[:, 1], 1 / 15)
    assert_frequency(applied, 0.5)
    assert_frequency(sign > 0, 0.5)
    assert set(np.unique(sign)) == {-1.0, 1.0}

    magnitude = level * 10
    above = 1 - _normal_cdf(2.0)  # mass of N(9, 0.5) above 10
    density = math.exp(-2.0) / math.sqrt(2 * math.pi)  # standard normal density at 2
    clipped_mean = -(density - 2 * above)  # E[min(Z, 2)]
    clipped_square = (1 - above) - 2 * density + 4 * above  # E[min(Z, 2)^2]
    expected_mean = 9 + 0.5 * clipped_mean
    expected_std = 0.5 * math.sqrt(clipped_square - clipped_mean**2)
    assert abs(magnitude.mean() - expected_mean) <= 4 * expected_std / math.sqrt(count)
    assert abs(magnitude.std() - expected_std) <= 4 * expected_std / math.sqrt(2 * count)
    assert magnitude.min() >= 0 and magnitude.max() == 10.0
    assert_frequency(magnitude == 10.0, above)


def test_equalize_leaves_the_images_it_is_not_applied_to(images):
    """RandAugment's Equalize skips its histogram for images that do not apply it."""
    applied = jnp.array([True, False, True, False])
    out = np.asarray(jax.jit(jax.vmap(device_ops.equalize))(images, applied))
    full = np.asarray(jax.jit(jax.vmap(device_ops.equalize))(images))
    np.testing.assert_array_equal(out[::2], full[::2])
    np.testing.assert_array_equal(out[1::2], images[1::2])
    assert np.abs(full[1::2] - images[1::2]).mean() > 1


def test_randaug_applies_the_drawn_operations_in_order(images, apply_operation):
    """build's randaug is its drawn layers applied in turn, each only where its gate is open; over
    enough steps that every operation has been applied (those that skip work where they are not
    applied among them)."""
    augment = jax.jit(device_ops.build("randaug(2,9,0.5)"))
    draw = jax.jit(jax.vmap(lambda key: device_ops.draw_layers(key, 2, 9.0, 0.5)))
    originals = images.round().astype(np.uint8)
    gates, applied_operations = [], set()
    for step in range(200):
        if len(applied_operations) == len(device_ops.OPERATION_NAMES):
            break
        keys = device_ops.example_keys(jax.random.key(2), step, jnp.arange(len(images)))
        draws = draw(jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, 0))
        expected = originals.astype(np.float32)
        for layer in range(2):
            augmented = apply_operation(expected, draws.index[:, layer], draws.level[:, layer], draws.sign[:, layer])
            expected = np.where(np.asarray(draws.applied[:, layer])[:, None, None, None], augmented, expected)
        gates.append(np.asarray(draws.applied))
        applied_operations.update(np.asarray(draws.index)[np.asarray(draws.applied)].tolist())
        np.testing.assert_allclose(np.asarray(augment(originals, keys)), expected, atol=1e-4)
    assert len(applied_operations) == len(device_ops.OPERATION_NAMES)
    assert 0 < np.mean(gates) < 1


def test_value_range_and_normalize_are_the_host_ops(images):
    originals = images.round().astype(np.uint8)
    keys = device_ops.example_keys(jax.random.key(0), 0, jnp.arange(len(images)))
    for pp in (device_ops.EVAL_PP, "value_range(-1,1)", "value_range(0,1)|normalize((0.5,0.5,0.5),(0.2,0.3,0.4))"):
        host = registry.build(pp)
        seed = tf.constant([0, 0], tf.int64)
        expected = [host({"image": tf.constant(image, tf.float32)}, seed)["image"].numpy() for image in originals]
        actual = np.asarray(jax.jit(device_ops.build(pp))(originals, keys))
        assert actual.dtype == np.float32
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)


ERASE_SHAPE = (24, 20)


def _erase_box_statistics(found, h, w) -> dict:
    found, h, w = np.asarray(found, bool), np.asarray(h), np.asarray(w)
    return {
        "found": found.mean(),
        "area": (h * w)[found].mean() / math.prod(ERASE_SHAPE),
        "log_aspect": np.log(h[found] / w[found]).mean(),
    }


def test_erase_boxes_are_drawn_as_the_host_draws_them():
    """Same area fraction (0.02..1/3), log-uniform aspect (0.3..3.3) and 10 attempts: the mean area
    and log aspect of the boxes agree within 4 standard errors of the difference of the means."""
    host_boxes = [ops.sample_erase_box(*ERASE_SHAPE, tf.constant([9, i], tf.int64)) for i in range(400)]
    host = _erase_box_statistics(*([int(box[k]) for box in host_boxes] for k in (0, 3, 4)))
    keys = device_ops.example_keys(jax.random.key(4), 0, jnp.arange(4000))
    found, _, _, h, w = jax.jit(jax.vmap(lambda key: device_ops.erase_box(key, *ERASE_SHAPE)))(keys)
    device = _erase_box_statistics(found, h, w)
    # Std of the area fraction (uniform over 0.02..1/3) is 0.09, of the log aspect (uniform) 0.69.
    standard_error = math.sqrt(1 / 400 + 1 / 4000)
    assert host["found"] == 1 and device["found"] == 1
    assert abs(host["area"] - device["area"]) <= 4 * 0.09 * standard_error, (host, device)
    assert abs(host["log_aspect"] - device["log_aspect"]) <= 4 * 0.69 * standard_error, (host, device)
    assert abs(device["area"] - (0.02 + 1 / 3) / 2) <= 0.01
    assert abs(device["log_aspect"] - math.log(0.3 * 3.3) / 2) <= 0.05


def test_random_erase_puts_one_box_of_standard_normal_noise_in_a_quarter_of_the_images():
    count = 2000
    flat = np.full((count, *ERASE_SHAPE, 3), 5.0, np.float32)
    keys = device_ops.example_keys(jax.random.key(3), 0, jnp.arange(count))
    erased = np.asarray(jax.jit(jax.vmap(device_ops.random_erase(0.25)))(flat, keys))
    changed = erased != 5.0
    hit = changed.any(axis=(1, 2, 3))
    assert abs(hit.mean() - 0.25) <= 4 * math.sqrt(0.25 * 0.75 / count)
    for mask in changed[hit]:
        rows, cols = np.flatnonzero(mask.any(axis=(1, 2))), np.flatnonzero(mask.any(axis=(0, 2)))
        h, w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert mask.sum() == h * w * 3, "the erased pixels are not one box over all channels"
        assert 0.02 * 0.7 <= h * w / math.prod(ERASE_SHAPE) <= 1 / 3 * 1.3 and 0.3 * 0.6 <= h / w <= 3.3 / 0.6
    noise = erased[changed]
    assert abs(noise.mean()) <= 0.02 and abs(noise.std() - 1) <= 0.02
    normal_tails = 2 * (1 - _normal_cdf(2.0))
    assert abs((np.abs(noise) > 2).mean() - normal_tails) <= 0.01


@pytest.fixture(scope="module")
def augment_step():
    """The training augmentation as the train step calls it: keys from (seed, step, row indices)."""
    augment = device_ops.build(device_ops.TRAIN_PP)
    return lambda images, base_key, step, indices: augment(images, device_ops.example_keys(base_key, step, indices))


def _photos(count: int, first_seed: int = 0) -> np.ndarray:
    return np.stack([natural_image(32, 32, seed=first_seed + n) for n in range(count)])


def test_the_augmented_batch_is_the_same_on_one_and_on_eight_devices(augment_step):
    images, indices, base_key = _photos(16), np.arange(16), jax.random.key(0)
    one = np.asarray(jax.jit(augment_step)(images, base_key, 3, indices))
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    sharded = jax.jit(augment_step, out_shardings=sharding)(
        jax.device_put(images, sharding), base_key, 3, jax.device_put(indices, sharding)
    )
    assert len(mesh.devices) == 8 and sharded.addressable_shards[0].data.shape == (2, 32, 32, 3)
    np.testing.assert_array_equal(np.asarray(sharded), one)
    keys = device_ops.example_keys(base_key, 3, indices)
    normalised = np.asarray(jax.jit(device_ops.build(device_ops.EVAL_PP))(images, keys))
    assert (np.abs(one - normalised) > 1e-3).mean() > 0.1, "the batch is hardly augmented"


def test_an_example_is_augmented_by_seed_step_and_index_alone(augment_step):
    images, base_key = _photos(16), jax.random.key(0)
    augment = jax.jit(augment_step)
    full = np.asarray(augment(images, base_key, 3, np.arange(16)))
    # The second half with its indices, next to other examples, as another process or mesh sees it.
    elsewhere = np.concatenate([images[8:], _photos(8, first_seed=100)])
    np.testing.assert_array_equal(np.asarray(augment(elsewhere, base_key, 3, np.arange(8, 24)))[:8], full[8:])
    for other in (augment(images, base_key, 4, np.arange(16)), augment(images, jax.random.key(1), 3, np.arange(16))):
        assert (np.asarray(other) != full).any(axis=(1, 2, 3)).mean() > 0.5


def test_bad_strings_and_inputs_fail_early_and_say_what_to_do():
    known = "known ops: normalize, randaug, random_erase, value_range"
    with pytest.raises(ValueError, match=f"unknown device op 'blur'.*{known}"):
        device_ops.build("randaug|blur")
    with pytest.raises(ValueError, match="empty"):
        device_ops.build(" | ")
    with pytest.raises(ValueError, match="magnitude"):
        device_ops.build("randaug(2, 11)")
    with pytest.raises(ValueError, match="bad arguments"):
        device_ops.build("normalize(1, 2, 3)")
    with pytest.raises(ValueError, match="cannot parse device op"):
        device_ops.build("randaug(2,")
    augment = device_ops.build(device_ops.EVAL_PP)
    keys = device_ops.example_keys(jax.random.key(0), 0, jnp.arange(2))
    with pytest.raises(ValueError, match="uint8"):
        augment(np.zeros((2, 8, 8, 3), np.float32), keys)
    with pytest.raises(ValueError, match="one key per image"):
        augment(np.zeros((3, 8, 8, 3), np.uint8), keys)


def test_the_device_ops_take_the_host_ops_arguments_and_constants():
    """The same op string means the same on either side."""
    host_factories = {
        "randaug": ops.randaug_op,
        "value_range": ops.value_range,
        "normalize": ops.normalize,
        "random_erase": ops.random_erase,
    }
    for name, factory in host_factories.items():
        device_parameters = inspect.signature(getattr(device_ops, name)).parameters
        host_parameters = inspect.signature(factory).parameters
        assert [(p.name, p.default) for p in device_parameters.values()] == [
            (p.name, p.default) for p in host_parameters.values()
        ], name
    assert device_ops.OPERATION_NAMES == randaug.OPERATION_NAMES
    assert (device_ops.FILL_RGB, device_ops.MAX_MAGNITUDE, device_ops.APPLY_PROBABILITY) == (
        randaug.FILL_RGB,
        randaug.MAX_MAGNITUDE,
        randaug.APPLY_PROBABILITY,
    )
    assert (device_ops.IMAGENET_MEAN, device_ops.IMAGENET_STD) == (ops.IMAGENET_MEAN, ops.IMAGENET_STD)
