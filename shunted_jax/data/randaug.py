"""RandAugment as in timm's "rand-m{M}-mstd{S}-inc1", written with stateless TF ops.

Per layer one of 15 operations is drawn uniformly (with replacement) and applied with
probability 0.5, at a magnitude drawn from N(M, S) clipped to [0, 10]. "inc1" selects the
variants whose severity grows with the magnitude (Posterize, Solarize and the enhancements).
Images are float32 HxWx3 in [0, 255].
"""
import math

from shunted_jax.data.tf_import import tensorflow

tf = tensorflow()

MAX_MAGNITUDE = 10.0
APPLY_PROBABILITY = 0.5
# timm fills uncovered pixels of geometric ops with the ImageNet mean in 0..255.
FILL_RGB = (124.0, 116.0, 104.0)
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def _blend(degenerate, image, factor):
    """PIL's ImageEnhance: factor 0 gives `degenerate`, 1 the image, above 1 extrapolates."""
    return tf.clip_by_value(degenerate + factor * (image - degenerate), 0.0, 255.0)


def _gray(image):
    return tf.reduce_sum(image * tf.constant(_GRAY_WEIGHTS), axis=-1, keepdims=True)


def auto_contrast(image):
    """Stretches each channel so its darkest pixel is 0 and brightest 255."""
    low = tf.reduce_min(image, axis=[0, 1], keepdims=True)
    high = tf.reduce_max(image, axis=[0, 1], keepdims=True)
    stretched = (image - low) * (255.0 / tf.maximum(high - low, 1e-6))
    return tf.where(high > low, stretched, image)


def _equalize_channel(channel):
    """PIL's ImageOps.equalize for one uint8-valued channel (values HxW)."""
    values = tf.cast(tf.clip_by_value(tf.round(channel), 0, 255), tf.int32)
    histogram = tf.math.bincount(tf.reshape(values, [-1]), minlength=256, maxlength=256)
    last_count = tf.gather(histogram, tf.reduce_max(tf.where(histogram > 0)))
    step = (tf.reduce_sum(histogram) - tf.cast(last_count, tf.int32)) // 255
    below = tf.cumsum(histogram, exclusive=True)
    lut = tf.minimum((below + step // 2) // tf.maximum(step, 1), 255)
    return tf.where(step > 0, tf.cast(tf.gather(lut, values), tf.float32), channel)


def equalize(image):
    return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def invert(image):
    return 255.0 - image


def posterize(image, bits):
    """Keeps the top `bits` bits of each value (bits >= 8 leaves the image as it is)."""
    shift = tf.cast(8 - tf.clip_by_value(bits, 0, 8), tf.float32)
    quantum = tf.pow(2.0, shift)
    return tf.floor(tf.floor(image) / quantum) * quantum


def solarize(image, threshold):
    """Inverts the values at or above `threshold`."""
    return tf.where(image >= threshold, 255.0 - image, image)


def solarize_add(image, addition, threshold=128.0):
    """Adds `addition` to the values below `threshold`."""
    return tf.where(image < threshold, tf.minimum(image + addition, 255.0), image)


def color(image, factor):
    return _blend(tf.tile(_gray(image), [1, 1, 3]), image, factor)


def contrast(image, factor):
    """Blends with the mean gray level, rounded as PIL does."""
    mean = tf.floor(tf.reduce_mean(_gray(image)) + 0.5)
    return _blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image, factor):
    return _blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
    """Blends with PIL's SMOOTH-filtered image; the one-pixel border stays unfiltered, as in PIL."""
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(image[None], kernel, strides=[1, 1, 1, 1], padding="VALID")[0]
    shape = tf.shape(image)
    interior = tf.pad(tf.ones(shape[:2] - 2, tf.bool), [[1, 1], [1, 1]])[..., None]
    degenerate = tf.where(interior, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), image)
    return _blend(degenerate, image, factor)


def affine(image, transform):
    """Warps with a projective `transform` (8 values, output pixel -> input pixel, as
    ImageProjectiveTransform reads it), bilinear; uncovered pixels get FILL_RGB."""
    shape = tf.shape(image)
    with_coverage = tf.concat([image, tf.ones_like(image[..., :1])], axis=-1)
    warped = tf.raw_ops.ImageProjectiveTransformV3(
        images=with_coverage[None],
        transforms=tf.cast(tf.reshape(transform, [1, 8]), tf.float32),
        output_shape=shape[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT",
    )[0]
    coverage = warped[..., 3:]
    return warped[..., :3] + (1.0 - coverage) * tf.constant(FILL_RGB)


def rotate(image, degrees):
    """Counter-clockwise rotation about the image centre."""
    shape = tf.cast(tf.shape(image), tf.float32)
    center_y, center_x = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    angle = degrees * (math.pi / 180.0)
    cos, sin = tf.cos(angle), tf.sin(angle)
    offset_x = center_x - cos * center_x + sin * center_y
    offset_y = center_y - sin * center_x - cos * center_y
    return affine(image, tf.stack([cos, -sin, offset_x, sin, cos, offset_y, 0.0, 0.0]))


def shear_x(image, shear):
    return affine(image, tf.stack([1.0, shear, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]))


def shear_y(image, shear):
    return affine(image, tf.stack([1.0, 0.0, 0.0, shear, 1.0, 0.0, 0.0, 0.0]))


def translate_x(image, pixels):
    return affine(image, tf.stack([1.0, 0.0, pixels, 0.0, 1.0, 0.0, 0.0, 0.0]))


def translate_y(image, pixels):
    return affine(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, pixels, 0.0, 0.0]))


def _operations(increasing: bool):
    """(name, fn(image, level in [0, 1], sign in {-1, 1})) for the 15 operations of timm's
    RandAugment; each maps the normalised level to its argument as timm does."""

    def enhance(level, sign):
        return 1.0 + level * 0.9 * sign if increasing else level * 1.8 + 0.1

    def posterize_bits(level):
        scaled = tf.cast(tf.floor(level * 4.0), tf.int32)
        return 4 - scaled if increasing else scaled

    def solarize_threshold(level):
        scaled = tf.floor(level * 256.0)
        return 256.0 - scaled if increasing else scaled

    def width(image):
        return tf.cast(tf.shape(image)[1], tf.float32)

    def height(image):
        return tf.cast(tf.shape(image)[0], tf.float32)

    return [
        ("AutoContrast", lambda image, level, sign: auto_contrast(image)),
        ("Equalize", lambda image, level, sign: equalize(image)),
        ("Invert", lambda image, level, sign: invert(image)),
        ("Rotate", lambda image, level, sign: rotate(image, level * 30.0 * sign)),
        ("Posterize", lambda image, level, sign: posterize(image, posterize_bits(level))),
        ("Solarize", lambda image, level, sign: solarize(image, solarize_threshold(level))),
        ("SolarizeAdd", lambda image, level, sign: solarize_add(image, tf.floor(level * 110.0))),
        ("Color", lambda image, level, sign: color(image, enhance(level, sign))),
        ("Contrast", lambda image, level, sign: contrast(image, enhance(level, sign))),
        ("Brightness", lambda image, level, sign: brightness(image, enhance(level, sign))),
        ("Sharpness", lambda image, level, sign: sharpness(image, enhance(level, sign))),
        ("ShearX", lambda image, level, sign: shear_x(image, level * 0.3 * sign)),
        ("ShearY", lambda image, level, sign: shear_y(image, level * 0.3 * sign)),
        ("TranslateXRel", lambda image, level, sign: translate_x(image, level * 0.45 * sign * width(image))),
        ("TranslateYRel", lambda image, level, sign: translate_y(image, level * 0.45 * sign * height(image))),
    ]


OPERATION_NAMES = tuple(name for name, _ in _operations(True))


class RandAugment:
    """`num_layers` random operations at magnitude ~ N(magnitude, magnitude_std) out of 10."""

    def __init__(self, num_layers=2, magnitude=9.0, magnitude_std=0.5, increasing=True):
        if not 0 <= magnitude <= MAX_MAGNITUDE:
            raise ValueError(f"randaug magnitude must lie in [0, {MAX_MAGNITUDE:g}], got {magnitude}.")
        if num_layers < 0 or magnitude_std < 0:
            raise ValueError("randaug needs num_layers >= 0 and magnitude_std >= 0.")
        self.num_layers = int(num_layers)
        self.magnitude = float(magnitude)
        self.magnitude_std = float(magnitude_std)
        self.operations = [fn for _, fn in _operations(bool(increasing))]

    def apply_operation(self, image, index, level, sign):
        """Applies operation number `index` (a scalar tensor) at `level` in [0, 1]."""
        branches = [lambda fn=fn: fn(image, level, sign) for fn in self.operations]
        return tf.ensure_shape(tf.switch_case(index, branches), image.shape)

    def __call__(self, image, seed):
        if self.num_layers == 0:
            return image
        for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, self.num_layers)):
            choice_seed, gate_seed, level_seed, sign_seed = tf.unstack(tf.random.experimental.stateless_split(layer_seed, 4))
            index = tf.random.stateless_uniform([], choice_seed, 0, len(self.operations), dtype=tf.int32)
            noise = tf.random.stateless_normal([], level_seed) * self.magnitude_std
            level = tf.clip_by_value(self.magnitude + noise, 0.0, MAX_MAGNITUDE) / MAX_MAGNITUDE
            sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1.0, 1.0)
            apply = tf.random.stateless_uniform([], gate_seed) < APPLY_PROBABILITY
            image = tf.cond(apply, lambda: self.apply_operation(image, index, level, sign), lambda: image)
        return image
