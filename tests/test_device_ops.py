"""The device augmentation (shunted_jax.data.device_ops) against PIL, the library timm's RandAugment
calls, operation by operation on photographs; its random draws against timm's policy; its batches
on 1 and 8 devices."""
import inspect
import math

import jax
import jax.numpy as jnp
import matplotlib.cbook
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from PIL import Image, ImageEnhance, ImageOps
from helpers.data import natural_image

from shunted_jax.data import device_ops, ops, registry
from shunted_jax.data.fashion_mnist_demo import DEBIAN_DIR, read_idx
from shunted_jax.data.tf_import import tensorflow

tf = tensorflow()

SIZE = (40, 48)  # not square, so that a swapped height and width shows
FILL = (124, 116, 104)  # timm's fill: the ImageNet mean in 0..255
# (level in [0, 1], sign): a strong, a weak and the strongest magnitude, both directions.
CASES = ((0.9, 1.0), (0.9, -1.0), (0.37, 1.0), (1.0, -1.0))


def _resized(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize(SIZE[::-1], Image.Resampling.BICUBIC))


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """uint8 (3, 40, 48, 3): photographs as RandAugment sees them after the crop: matplotlib's
    grace_hopper.jpg downscaled, a 40 x 48 window of it at full resolution (fine texture), and a
    Fashion-MNIST product photo (grey)."""
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as photo:
        photo = photo.convert("RGB")
    window = np.asarray(photo)[200:240, 250:298]
    fashion = Image.fromarray(read_idx(f"{DEBIAN_DIR}/t10k-images-idx3-ubyte.gz")[0])
    return np.stack([_resized(photo), window, _resized(fashion)])


def _enhance_factor(level, sign):
    return 1.0 + level * 0.9 * sign


def _posterize(image, bits):
    """ImageOps.posterize; 0 bits (level 10) keeps none, which Pillow 13 refuses to compute."""
    return ImageOps.posterize(image, bits) if bits else Image.new(image.mode, image.size)


def _affine(image, data):
    return image.transform(image.size, Image.Transform.AFFINE, data, Image.Resampling.BILINEAR, fillcolor=FILL)


# timm's operations (timm.data.auto_augment, increasing variants), each as (PIL image, level in
# [0, 1], sign) -> PIL image: the PIL call timm makes with the argument its level mapping gives.
PIL_OPERATIONS = {
    "AutoContrast": lambda image, level, sign: ImageOps.autocontrast(image),
    "Equalize": lambda image, level, sign: ImageOps.equalize(image),
    "Invert": lambda image, level, sign: ImageOps.invert(image),
    "Rotate": lambda image, level, sign: image.rotate(
        level * 30.0 * sign, resample=Image.Resampling.BILINEAR, fillcolor=FILL),
    "Posterize": lambda image, level, sign: _posterize(image, 4 - int(level * 4)),
    "Solarize": lambda image, level, sign: ImageOps.solarize(image, 256 - int(level * 256)),
    "SolarizeAdd": lambda image, level, sign: image.point(
        [min(255, i + int(level * 110)) if i < 128 else i for i in range(256)] * 3),
    "Color": lambda image, level, sign: ImageEnhance.Color(image).enhance(_enhance_factor(level, sign)),
    "Contrast": lambda image, level, sign: ImageEnhance.Contrast(image).enhance(_enhance_factor(level, sign)),
    "Brightness": lambda image, level, sign: ImageEnhance.Brightness(image).enhance(_enhance_factor(level, sign)),
    "Sharpness": lambda image, level, sign: ImageEnhance.Sharpness(image).enhance(_enhance_factor(level, sign)),
    "ShearX": lambda image, level, sign: _affine(image, (1, level * 0.3 * sign, 0, 0, 1, 0)),
    "ShearY": lambda image, level, sign: _affine(image, (1, 0, 0, level * 0.3 * sign, 1, 0)),
    "TranslateXRel": lambda image, level, sign: _affine(image, (1, 0, level * 0.45 * sign * image.size[0], 0, 1, 0)),
    "TranslateYRel": lambda image, level, sign: _affine(image, (1, 0, 0, 0, 1, level * 0.45 * sign * image.size[1])),
}
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
# Integer in, integer out: the device op on PIL's uint8 values gives PIL's values.
EXACT = ("Equalize", "Invert", "Posterize", "Solarize", "SolarizeAdd")


@pytest.fixture(scope="module")
def apply_operation():
    """Per-example operation, level and sign, as RandAugment applies them in a batch; jitted once."""
    return jax.jit(jax.vmap(device_ops.apply_operation))


@pytest.fixture(scope="module")
def images(photos) -> np.ndarray:
    """float32 (4, 40, 48, 3): the photos, and the first rotated by 23 degrees (values between
    integers and fill in the corners, as a second RandAugment layer sees them)."""
    rotate = jax.jit(lambda image: device_ops.affine(image, device_ops.rotation(23.0, *SIZE)))
    rotated = np.asarray(rotate(photos[0].astype(np.float32)))
    return np.concatenate([photos, rotated[None]]).astype(np.float32)


def _run_cases(apply_operation, name, images):
    """(inputs, device outputs, PIL outputs, enhance factors) of operation `name` over CASES x images."""
    inputs = np.concatenate([images] * len(CASES))
    levels = np.repeat([level for level, _ in CASES], len(images)).astype(np.float32)
    signs = np.repeat([sign for _, sign in CASES], len(images)).astype(np.float32)
    index = np.full(len(inputs), device_ops.OPERATION_NAMES.index(name))
    device = np.asarray(apply_operation(inputs.astype(np.float32), index, levels, signs))
    expected = np.stack([np.asarray(PIL_OPERATIONS[name](Image.fromarray(image), level, sign))
                         for level, sign in CASES for image in images])
    return inputs, device, expected.astype(np.float32), _enhance_factor(levels, signs)[:, None, None, None]


def test_randaug_draws_from_exactly_the_operations_checked_against_pil():
    """timm's increasing transforms, each once: a missing, extra or repeated operation fails."""
    assert sorted(device_ops.OPERATION_NAMES) == sorted(PIL_OPERATIONS)


@pytest.mark.parametrize("name", [name for name in PIL_OPERATIONS if name not in GEOMETRIC])
def test_each_photometric_operation_is_pils(name, photos, apply_operation):
    """On uint8 photos, at each of CASES. Equalize, Invert, Posterize, Solarize and SolarizeAdd are
    exact (Solarize up to float32 rounding, 2e-5). The device keeps float32 where PIL truncates to uint8: AutoContrast's table and
    Brightness's product are truncated by PIL (0 <= device - PIL <= 1, float64 against float32). Color, Contrast and Sharpness
    also blend with a degenerate image PIL has rounded to uint8 (the luma, the mean luma, the
    smoothed image; up to half a level, the mean luma up to one), weighted by |1 - factor|. A wrong
    factor, sign or degenerate image moves the photos' values by several levels."""
    inputs, device, expected, factor = _run_cases(apply_operation, name, photos)
    assert np.abs(expected - inputs).mean() > 0.5, "the cases leave the photos as they are"
    diff = device - expected
    if name in EXACT:
        np.testing.assert_allclose(device, expected, rtol=0, atol=1e-4, err_msg=name)
    elif name in ("AutoContrast", "Brightness"):
        assert diff.min() >= -1e-3 and diff.max() <= 1 + 1e-3, (name, diff.min(), diff.max())
    else:
        rounding = (1.0 if name == "Contrast" else 0.5) * np.abs(1 - factor)
        excess = np.abs(diff - 0.5) - (0.5 + rounding)
        assert excess.max() <= 1e-3, (name, excess.max())


@pytest.mark.parametrize("name", GEOMETRIC)
def test_each_geometric_operation_is_pils_bilinear_warp(name, photos, apply_operation):
    """PIL's bilinear warp at the same coordinates (PIL rounds to uint8: within one level) wherever
    all four neighbours of the source point lie in the image, and the fill (124, 116, 104) wherever
    none does. They deliberately differ in the band between, at most about a pixel wide along the
    warped image's edges: PIL repeats the edge pixel there and fills whole pixels whose source
    centre is outside, the device op blends the neighbours outside the image with the fill
    (TensorFlow's constant mode). timm's DeiT recipe asks PIL for bicubic; the device op is
    bilinear, and so is the PIL call here. A wrong sign, magnitude or half-pixel shift moves the
    photos' edges by tens of levels."""
    inputs, device, expected, _ = _run_cases(apply_operation, name, photos)
    assert np.abs(expected - inputs).mean() > 0.5, "the cases leave the photos as they are"
    constant = np.full_like(photos, 200)
    _, warped_constant, _, _ = _run_cases(apply_operation, name, constant)
    inside = (warped_constant == 200).all(axis=-1)
    outside = (warped_constant == np.array(FILL, np.float32)).all(axis=-1)
    band = ~(inside | outside)
    assert inside.mean() > 0.5 and band.mean() < 0.1, (name, inside.mean(), band.mean())
    assert np.abs(device - expected)[inside].max() <= 1.0 + 1e-3, (name, np.abs(device - expected)[inside].max())
    np.testing.assert_array_equal(device[outside], expected[outside])


def test_color_and_contrast_weigh_the_channels_as_pils_grey_conversion():
    """PIL's convert("L") weighs R, G, B by 299, 587, 114 per mille (ImageEnhance's degenerate
    image). On every colour with red 255, the device's luma rounds as PIL's on all but 0.06%
    (PIL computes in 16-bit fixed point); weights of 0.2989 for red would round 2.5% apart."""
    green, blue = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    colours = np.stack([np.full_like(green, 255), green, blue], axis=-1).astype(np.uint8)
    grey = np.asarray(ImageEnhance.Color(Image.fromarray(colours)).enhance(0.0))
    device = np.asarray(jax.jit(device_ops.color)(colours.astype(np.float32), 0.0))
    assert (np.round(device) != grey).mean() <= 0.002


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


def test_erase_boxes_are_drawn_by_timms_rule():
    """timm's RandomErasing: an area fraction uniform in 0.02..1/3 and a log-uniform aspect in
    0.3..3.3, the first of 10 draws that fits; on 24 x 20 nearly every first draw fits, so the
    mean area fraction and log aspect are those of the uniform draws (4 standard errors are 0.006
    and 0.04; the rounding of the box's sides adds a little)."""
    count = 4000
    keys = device_ops.example_keys(jax.random.key(4), 0, jnp.arange(count))
    found, _, _, h, w = (np.asarray(v) for v in jax.jit(jax.vmap(lambda key: device_ops.erase_box(key, *ERASE_SHAPE)))(keys))
    assert found.all()
    area, log_aspect = h * w / math.prod(ERASE_SHAPE), np.log(h / w)
    assert abs(area.mean() - (0.02 + 1 / 3) / 2) <= 0.01, area.mean()
    assert abs(log_aspect.mean() - math.log(0.3 * 3.3) / 2) <= 0.05, log_aspect.mean()


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


def test_value_range_and_normalize_take_the_host_ops_arguments():
    """The same op string means the same on either side."""
    for name in ("value_range", "normalize"):
        device_parameters = inspect.signature(getattr(device_ops, name)).parameters
        host_parameters = inspect.signature(getattr(ops, name)).parameters
        assert [(p.name, p.default) for p in device_parameters.values()] == [
            (p.name, p.default) for p in host_parameters.values()
        ], name
