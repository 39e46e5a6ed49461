"""RandAugment, value range, normalisation and random erasing on the accelerator, in the jitted step.

The host hands over uint8 (B, H, W, 3) batches. `build(pp)` turns a "|"-separated string such as
"randaug(2,9,0.5)|value_range(0,1)|normalize|random_erase(0.25)" into one function
`(images_uint8, keys) -> float32 images`. Every op works on one float32 H x W x 3 image and is
vmapped over the batch, so a step sharded along the batch shards the augmentation with it. An
example's randomness comes only from its key, and `example_keys` folds the keys from (seed, step,
global example index): an example is augmented alike on any mesh and after a resume.

The ops are timm's rand-m9-mstd0.5-inc1 and random erasing in mode "pixel": each RandAugment
operation computes the PIL operation timm calls (ImageOps, ImageEnhance, Image.transform) in
float32, and tests/test_device_ops.py compares them op by op on photographs. They differ from PIL
on purpose in three ways: values stay float32 where PIL rounds to uint8, the warps are bilinear
(timm's DeiT recipe asks PIL for bicubic), and a warped pixel near the image's edge blends with
the fill (see `affine`). Without an accelerator they run on the CPU, as they are.

dm-pix does what it has: the bilinear interpolation of Rotate, ShearX/Y and TranslateX/YRel
(`dm_pix.flat_nd_linear_interpolate_constant`; see `affine`) and Solarize (`dm_pix.solarize`).
The rest is written here because dm-pix's ops of similar names compute something else than the
PIL operations timm applies: its adjust_brightness adds where PIL multiplies, its adjust_contrast
blends each channel with that channel's mean where PIL blends with the mean luma, its
adjust_saturation works in HSV where PIL blends with the luma; and it has no AutoContrast,
Equalize, Invert, Posterize, SolarizeAdd, PIL's smoothing kernel for Sharpness, random erasing or
normalisation. Three are written for speed on the GPU (see `_luma`, `_histogram` and
`_per_channel`). This module imports no TensorFlow; the host ops take the constants they share
with it from here.
"""
import math
from typing import Callable, NamedTuple

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

from shunted_jax.data.pp_syntax import parse_ops

MAX_MAGNITUDE = 10.0
APPLY_PROBABILITY = 0.5
# timm fills uncovered pixels of geometric ops with the ImageNet mean in 0..255.
FILL_RGB = (124.0, 116.0, 104.0)
# PIL's convert("L") (ITU-R 601-2: L = R 299/1000 + G 587/1000 + B 114/1000), as ImageEnhance uses it.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The official (DeiT, timm) recipe's device part, for training and for evaluation.
TRAIN_PP = "randaug(2,9,0.5)|value_range(0,1)|normalize|random_erase(0.25)"
EVAL_PP = "value_range(0,1)|normalize"

ImageOp = Callable[[jax.Array, jax.Array], jax.Array]
"""(float32 H x W x 3 image, key) -> float32 H x W x 3 image."""


def example_keys(base_key: jax.Array, step, example_indices: jax.Array) -> jax.Array:
    """The keys of the examples at `example_indices` (their rows in the global batch) of `step`.

    `base_key` is made from the run's seed alone (e.g. `jax.random.key(seed)`); a row's key depends
    only on (base_key, step, index), not on the mesh or on what ran before.
    """
    step_key = jax.random.fold_in(base_key, step)
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, example_indices)


# --- RandAugment's photometric operations on float32 images in [0, 255] ---


def _blend(degenerate, image, factor):
    """PIL's ImageEnhance: factor 0 gives `degenerate`, 1 the image, above 1 extrapolates."""
    return jnp.clip(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _luma(image):
    """ITU-R 601 luma as one channel, with PIL's weights (unrounded). Written as a weighted sum:
    `dm_pix.rgb_to_grayscale` contracts the 3 channels with a tensordot, which XLA:GPU runs as a
    matrix product of its own instead of fusing it with the blend (twice the time of Color)."""
    red, green, blue = (image[..., c:c + 1] for c in range(3))
    return LUMA_WEIGHTS[0] * red + LUMA_WEIGHTS[1] * green + LUMA_WEIGHTS[2] * blue


def _per_channel(reduce, image):
    """`reduce(image, axis=(0, 1), keepdims=True)` for min or max, in two steps: reducing
    H x W x 3 directly keeps a minor dimension of 3, which XLA:GPU vectorises poorly, so the
    H W / g rows of g pixels x C values (g = gcd(H W, 32), 1 when H W is odd) reduce first, then
    the g groups. Exact for min and max, whose result does not depend on the order."""
    height, width, channels = image.shape
    group = math.gcd(height * width, 32)
    rows = reduce(image.reshape(height * width // group, group * channels), axis=0)
    return reduce(rows.reshape(group, channels), axis=0).reshape(1, 1, channels)


def auto_contrast(image):
    """Stretches each channel so its darkest pixel is 0 and brightest 255."""
    low = _per_channel(jnp.min, image)
    high = _per_channel(jnp.max, image)
    stretched = (image - low) * (255.0 / jnp.maximum(high - low, 1e-6))
    return jnp.where(high > low, stretched, image)


def _histogram(values, applied=True, copies: int = 32):
    """The 256-bin histogram of int values in [0, 255], as `jnp.bincount(values.ravel(), length=256)`;
    all zeros unless `applied`.

    Neighbouring pixels often share a value, so a scatter-add into one set of 256 bins makes the
    GPU's atomic adds wait on each other. Pixel i adds into copy i % `copies` of the bins, and the
    copies are summed: the same counts in 0.57x the time of bincount (BENCHMARKS.md). The pixels
    of an image that does not apply Equalize get an index past the bins, which the scatter drops
    without an atomic add: RandAugment computes Equalize for every image but applies it to about
    one in 30.
    """
    flat = values.ravel()
    copy = jnp.arange(flat.size, dtype=flat.dtype) % copies
    index = jnp.where(applied, flat * copies + copy, 256 * copies)
    bins = jnp.zeros((256 * copies,), jnp.int32).at[index].add(1, mode="drop")
    return bins.reshape(256, copies).sum(axis=1)


def _equalize_channel(channel, applied=True):
    """PIL's ImageOps.equalize for one channel (H x W) of values in [0, 255] (unchanged unless `applied`)."""
    values = jnp.clip(jnp.round(channel), 0, 255).astype(jnp.int32)
    histogram = _histogram(values, applied)
    brightest = 255 - jnp.argmax(histogram[::-1] > 0)  # values.max(), without another pass over the image
    step = (histogram.sum() - histogram[brightest]) // 255
    below = jnp.cumsum(histogram) - histogram
    lut = jnp.minimum((below + step // 2) // jnp.maximum(step, 1), 255)
    return jnp.where(step > 0, lut[values].astype(channel.dtype), channel)


def equalize(image, applied=True):
    """PIL's ImageOps.equalize, channel by channel; the image as it is unless `applied`, at less cost."""
    return jax.vmap(_equalize_channel, in_axes=(-1, None), out_axes=-1)(image, applied)


def invert(image):
    return 255.0 - image


def posterize(image, bits):
    """Keeps the top `bits` bits of each value (bits >= 8 leaves the image as it is)."""
    quantum = 2.0 ** (8 - jnp.clip(bits, 0, 8)).astype(image.dtype)
    return jnp.floor(jnp.floor(image) / quantum) * quantum


def solarize(image, threshold):
    """Inverts the values at or above `threshold`."""
    return 255.0 * pix.solarize(image / 255.0, threshold / 255.0)


def solarize_add(image, addition, threshold=128.0):
    """Adds `addition` to the values below `threshold`."""
    return jnp.where(image < threshold, jnp.minimum(image + addition, 255.0), image)


def color(image, factor):
    return _blend(_luma(image), image, factor)


def contrast(image, factor):
    """Blends with the mean luma, rounded as PIL does."""
    return _blend(jnp.floor(_luma(image).mean() + 0.5), image, factor)


def brightness(image, factor):
    return _blend(0.0, image, factor)


def sharpness(image, factor):
    """Blends with PIL's SMOOTH filter (3x3 ones, centre 5, over 13); the one-pixel border stays
    unfiltered, as in PIL."""
    height, width = image.shape[:2]
    window = sum(image[dy : height - 2 + dy, dx : width - 2 + dx] for dy in range(3) for dx in range(3))
    smooth = (window + 4.0 * image[1:-1, 1:-1]) / 13.0
    return _blend(image.at[1:-1, 1:-1].set(smooth), image, factor)


# --- RandAugment's geometric operations: one affine warp ---


def affine(image, transform):
    """Bilinear warp by `transform` = (a0, a1, a2, a3, a4, a5): output pixel (x, y) reads input
    (a0 x + a1 y + a2, a3 x + a4 y + a5), as TF's ImageProjectiveTransform does.

    Every neighbour outside the image counts as FILL_RGB, so an output pixel near the edge blends
    the image with the fill as TF's constant mode does. dm-pix's constant mode fills whole output
    pixels whose position falls outside instead; interpolating (image - FILL_RGB) padded by one
    pixel of zeros gives TF's rule. The coordinates are computed here, elementwise, rather than by
    `dm_pix.affine_transform`'s matrix product, whose rounding depends on how XLA compiles the
    product (a sharded and an unsharded step would differ in the last bits), and each channel is
    interpolated in 2-D (4 neighbours, where a 3-D warp of H x W x 3 reads 8).
    """
    height, width = image.shape[:2]
    a0, a1, a2, a3, a4, a5 = (transform[i] for i in range(6))
    y, x = jnp.meshgrid(jnp.arange(height, dtype=image.dtype), jnp.arange(width, dtype=image.dtype), indexing="ij")
    # Input (y, x) is (y + 1, x + 1) in the padded image.
    coordinates = jnp.stack([a3 * x + a4 * y + (a5 + 1.0), a0 * x + a1 * y + (a2 + 1.0)])
    fill = jnp.asarray(FILL_RGB, image.dtype)
    padded = jnp.pad(image - fill, ((1, 1), (1, 1), (0, 0)))

    def interpolate(channel):
        return pix.flat_nd_linear_interpolate_constant(channel, coordinates, cval=0.0)

    return jax.vmap(interpolate, in_axes=-1, out_axes=-1)(padded) + fill


def rotation(degrees, height, width):
    """The transform of a counter-clockwise rotation by `degrees` about the image centre."""
    center_y, center_x = (height - 1) / 2, (width - 1) / 2
    angle = degrees * (math.pi / 180.0)
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    offset_x = center_x - cos * center_x + sin * center_y
    offset_y = center_y - sin * center_x - cos * center_y
    return jnp.stack([cos, -sin, offset_x, sin, cos, offset_y])


def _transform(a0=1.0, a1=0.0, a2=0.0, a3=0.0, a4=1.0, a5=0.0):
    """The six values of an affine transform as `affine` reads them; the identity by default."""
    return jnp.stack([jnp.asarray(v, jnp.float32) for v in (a0, a1, a2, a3, a4, a5)])


def shear(a1=0.0, a3=0.0):
    """The transform of PIL's affine shear (1, a1, 0, a3, 1, 0). PIL maps pixel centres, at
    half-integer coordinates, so in `affine`'s integer pixel coordinates the shear moves by half its
    factor: x + a1 (y + 1/2), y + a3 (x + 1/2)."""
    return _transform(a1=a1, a2=a1 / 2, a3=a3, a5=a3 / 2)


class Operation(NamedTuple):
    """One of RandAugment's operations. A photometric one has `apply(image, level, sign, applied)`,
    where `applied` says whether its result is used (an operation may skip work where it is not); a
    geometric one has `transform(level, sign, height, width)`, the affine transform it warps by."""

    name: str
    apply: Callable | None = None
    transform: Callable | None = None


def operations(increasing: bool = True) -> list[Operation]:
    """timm's 15 operations in the host's order, each mapping the level in [0, 1] (and a sign) to
    its argument as timm does; `increasing` selects timm's increasing-severity variants."""

    def enhance(level, sign):
        return 1.0 + level * 0.9 * sign if increasing else level * 1.8 + 0.1

    def posterize_bits(level):
        scaled = jnp.floor(level * 4.0).astype(jnp.int32)
        return 4 - scaled if increasing else scaled

    def solarize_threshold(level):
        scaled = jnp.floor(level * 256.0)
        return 256.0 - scaled if increasing else scaled

    return [
        Operation("AutoContrast", apply=lambda image, level, sign, applied: auto_contrast(image)),
        Operation("Equalize", apply=lambda image, level, sign, applied: equalize(image, applied)),
        Operation("Invert", apply=lambda image, level, sign, applied: invert(image)),
        Operation("Rotate", transform=lambda level, sign, h, w: rotation(level * 30.0 * sign, h, w)),
        Operation("Posterize", apply=lambda image, level, sign, applied: posterize(image, posterize_bits(level))),
        Operation("Solarize", apply=lambda image, level, sign, applied: solarize(image, solarize_threshold(level))),
        Operation("SolarizeAdd",
                  apply=lambda image, level, sign, applied: solarize_add(image, jnp.floor(level * 110.0))),
        Operation("Color", apply=lambda image, level, sign, applied: color(image, enhance(level, sign))),
        Operation("Contrast", apply=lambda image, level, sign, applied: contrast(image, enhance(level, sign))),
        Operation("Brightness", apply=lambda image, level, sign, applied: brightness(image, enhance(level, sign))),
        Operation("Sharpness", apply=lambda image, level, sign, applied: sharpness(image, enhance(level, sign))),
        Operation("ShearX", transform=lambda level, sign, h, w: shear(a1=level * 0.3 * sign)),
        Operation("ShearY", transform=lambda level, sign, h, w: shear(a3=level * 0.3 * sign)),
        Operation("TranslateXRel", transform=lambda level, sign, h, w: _transform(a2=level * 0.45 * sign * w)),
        Operation("TranslateYRel", transform=lambda level, sign, h, w: _transform(a5=level * 0.45 * sign * h)),
    ]


OPERATION_NAMES = tuple(op.name for op in operations())


def apply_operation(image, index, level, sign, increasing: bool = True, applied=True):
    """Operation number `index` (of OPERATION_NAMES) at `level` in [0, 1] with `sign` +-1; where
    not `applied`, the result is to be discarded, and operations may skip work.

    Under vmap each example draws its own operation, so all are computed and one is selected; the
    five geometric ones select a transform and share one warp.
    """
    height, width = image.shape[:2]
    transform = _transform()
    photometric = image
    geometric = jnp.zeros((), bool)
    for number, op in enumerate(operations(increasing)):
        chosen = index == number
        if op.transform is not None:
            transform = jnp.where(chosen, op.transform(level, sign, height, width), transform)
            geometric = geometric | chosen
        else:
            photometric = jnp.where(chosen, op.apply(image, level, sign, chosen & applied), photometric)
    return jnp.where(geometric, affine(image, transform), photometric)


class LayerDraws(NamedTuple):
    """RandAugment's random choices for one image, one entry per layer."""

    index: jax.Array  # int32: the operation
    applied: jax.Array  # bool: whether it is applied (probability APPLY_PROBABILITY)
    level: jax.Array  # float32 in [0, 1]: magnitude ~ N(magnitude, magnitude_std), clipped, / 10
    sign: jax.Array  # float32 +-1: the direction of the signed operations


def draw_layers(key, num_layers: int, magnitude: float, magnitude_std: float) -> LayerDraws:
    """timm's draws: an operation uniformly (with replacement), the gate, the magnitude, the sign."""
    choice_key, gate_key, level_key, sign_key = jax.random.split(key, 4)
    shape = (num_layers,)
    noise = jax.random.normal(level_key, shape, jnp.float32) * magnitude_std
    return LayerDraws(
        index=jax.random.randint(choice_key, shape, 0, len(OPERATION_NAMES)),
        applied=jax.random.uniform(gate_key, shape) < APPLY_PROBABILITY,
        level=jnp.clip(magnitude + noise, 0.0, MAX_MAGNITUDE) / MAX_MAGNITUDE,
        sign=jnp.where(jax.random.uniform(sign_key, shape) < 0.5, -1.0, 1.0),
    )


# --- The registered ops: factories of ImageOp ---


def randaug(num_layers=2, magnitude=9, magnitude_std=0.5, increasing=True) -> ImageOp:
    """RandAugment on images in [0, 255]: randaug(2, 9, 0.5) is timm's rand-m9-mstd0.5-inc1."""
    if not 0 <= magnitude <= MAX_MAGNITUDE:
        raise ValueError(f"randaug magnitude must lie in [0, {MAX_MAGNITUDE:g}], got {magnitude}.")
    if num_layers < 0 or magnitude_std < 0:
        raise ValueError("randaug needs num_layers >= 0 and magnitude_std >= 0.")
    num_layers, magnitude, magnitude_std = int(num_layers), float(magnitude), float(magnitude_std)
    increasing = bool(increasing)

    def op(image, key):
        draws = draw_layers(key, num_layers, magnitude, magnitude_std)
        for layer in range(num_layers):
            index, level, sign = draws.index[layer], draws.level[layer], draws.sign[layer]
            applied = draws.applied[layer]
            image = jnp.where(applied, apply_operation(image, index, level, sign, increasing, applied), image)
        return image

    return op


def value_range(low=0.0, high=1.0) -> ImageOp:
    """Maps [0, 255] linearly onto [low, high]."""
    return lambda image, key: low + image * ((high - low) / 255.0)


def normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD) -> ImageOp:
    """(x - mean) / std per channel; by default ImageNet's, for images in [0, 1]. The constants are
    numpy's, so that parsing a string (a config check) touches no JAX backend."""
    mean_a, std_a = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    return lambda image, key: (image - mean_a) / std_a


def erase_box(key, height: int, width: int, area=(0.02, 1 / 3), aspect=(0.3, 3.3), attempts: int = 10):
    """(found, top, left, h, w) of a random box covering an `area` fraction with log-uniform aspect
    h / w in `aspect`; the first of `attempts` draws that fits strictly inside wins, and none may fit."""
    area_key, aspect_key, offset_key = jax.random.split(key, 3)
    target = height * width * jax.random.uniform(area_key, (attempts,), minval=area[0], maxval=area[1])
    log_ratio = jax.random.uniform(aspect_key, (attempts,), minval=math.log(aspect[0]), maxval=math.log(aspect[1]))
    ratio = jnp.exp(log_ratio)
    box_h = jnp.round(jnp.sqrt(target * ratio)).astype(jnp.int32)
    box_w = jnp.round(jnp.sqrt(target / ratio)).astype(jnp.int32)
    fits = (box_h < height) & (box_w < width)
    first = jnp.argmax(fits)
    h, w = box_h[first], box_w[first]
    offsets = jax.random.uniform(offset_key, (2,))
    top = jnp.minimum((offsets[0] * (height - h + 1)).astype(jnp.int32), height - h)
    left = jnp.minimum((offsets[1] * (width - w + 1)).astype(jnp.int32), width - w)
    return fits.any(), top, left, h, w


def random_erase(probability=0.25, area_min=0.02, area_max=1 / 3, aspect_min=0.3, aspect_max=3.3) -> ImageOp:
    """Random erasing, mode "pixel": with probability `probability` one box of the (normalised)
    image is replaced by per-pixel standard-normal values."""

    def op(image, key):
        gate_key, box_key, noise_key = jax.random.split(key, 3)
        height, width = image.shape[:2]
        found, top, left, h, w = erase_box(box_key, height, width, (area_min, area_max), (aspect_min, aspect_max))
        rows, cols = jnp.arange(height)[:, None, None], jnp.arange(width)[None, :, None]
        inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
        erase = inside & found & (jax.random.uniform(gate_key) < probability)
        return jnp.where(erase, jax.random.normal(noise_key, image.shape, image.dtype), image)

    return op


OPS: dict[str, Callable[..., ImageOp]] = {
    "randaug": randaug,
    "value_range": value_range,
    "normalize": normalize,
    "random_erase": random_erase,
}


def parse(pp: str) -> list[tuple[str, ImageOp]]:
    """The "|"-separated device ops of `pp` as (spec, op); unknown names and bad arguments fail here."""
    return parse_ops(pp, OPS, "device", EVAL_PP)


def build(pp: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """One function `(images, keys) -> float32 images` applying the ops of `pp` in order.

    `images` is uint8 (B, H, W, 3) with values in [0, 255]; `keys` holds one key per image (see
    `example_keys`). Op number n of an image draws from fold_in(its key, n).
    """
    ops = parse(pp)

    def augment(images, keys):
        if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"device ops take uint8 (B, H, W, 3) images, got {images.dtype} {images.shape}.")
        if keys.shape[0] != images.shape[0]:
            raise ValueError(f"one key per image is needed: {keys.shape[0]} keys for {images.shape[0]} images.")
        images = images.astype(jnp.float32)
        for number, (_, op) in enumerate(ops):
            op_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, number)
            images = jax.vmap(op)(images, op_keys)
        return images

    return augment
