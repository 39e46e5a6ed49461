"""The registered preprocessing ops: the host decodes, crops, flips and resizes.

Images are HxWx3 with values in [0, 255]: uint8 from `decode_uint8` and
`decode_and_inception_crop`, float32 from `decode`. The geometric ops (crops, resizes, flip)
keep the dtype, so a uint8 string stays uint8 up to the batch. `value_range` and `normalize`
take either and give float32, for a host string that finishes its images itself. RandAugment and
random erasing have one implementation, data.device_ops, run in the train step (on the CPU when
that is the device).

The decoding ops also take an image that is already decoded (uint8): repeated augmentation
decodes each record once and runs the string on every copy of the decoded image.
"""
import functools
import math

import numpy as np
from PIL import Image

from shunted_jax.data.device_ops import IMAGENET_MEAN, IMAGENET_STD
from shunted_jax.data.registry import register
from shunted_jax.data.tf_import import tensorflow

tf = tensorflow()


def _uniform(seed, minval=0.0, maxval=1.0, shape=()):
    return tf.random.stateless_uniform(shape, seed=seed, minval=minval, maxval=maxval)


def _replace_image(features: dict, image) -> dict:
    return {**features, "image": image}


def _float_image(features: dict):
    return tf.cast(features["image"], tf.float32)


def _pil_bicubic(image: np.ndarray, height, width) -> np.ndarray:
    size = (int(width), int(height))
    if image.dtype == np.uint8:
        return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))
    channels = [Image.fromarray(np.ascontiguousarray(image[..., c])).resize(size, Image.Resampling.BICUBIC)
                for c in range(image.shape[-1])]
    return np.clip(np.stack([np.asarray(c) for c in channels], axis=-1), 0.0, 255.0)


def resize_bicubic(image, height, width):
    """Bicubic with antialiasing by PIL itself, as timm's transforms resize (TF's antialiased
    resize differs from it by up to 20 levels at edges and takes up to twice as long). uint8
    stays uint8, rounded as PIL rounds; float32 comes out clipped to [0, 255] (bicubic overshoots)."""
    resized = tf.numpy_function(_pil_bicubic, [image, height, width], image.dtype, stateful=False)
    return tf.ensure_shape(resized, [None, None, 3])


def decode_to_uint8(image):
    """Encoded bytes (JPEG/PNG/GIF/BMP) or a uint8 array -> uint8 HxWx3; grayscale is repeated."""
    if image.dtype == tf.string:
        image = tf.io.decode_image(image, channels=3, expand_animations=False)
    elif image.shape.rank == 2:
        image = image[..., None]
    image = tf.cond(tf.shape(image)[-1] == 1, lambda: tf.tile(image, [1, 1, 3]), lambda: image[..., :3])
    image.set_shape([None, None, 3])
    return image


def decode_to_rgb(image):
    """Encoded bytes or a uint8 array -> float32 HxWx3 in [0, 255]."""
    return tf.cast(decode_to_uint8(image), tf.float32)


@register("decode")
def decode():
    return lambda features, seed: _replace_image(features, decode_to_rgb(features["image"]))


@register("decode_uint8")
def decode_uint8():
    return lambda features, seed: _replace_image(features, decode_to_uint8(features["image"]))


def sample_inception_box(height, width, seed, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), attempts=10):
    """(top, left, crop_height, crop_width) of a random-resized crop: a random area fraction in
    `scale` and log-uniform aspect ratio in `ratio`; the first of `attempts` draws that fits wins,
    else the central crop with the aspect ratio clamped into `ratio`."""
    area_seed, ratio_seed, offset_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    height_f, width_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    target_area = height_f * width_f * _uniform(area_seed, scale[0], scale[1], [attempts])
    aspect = tf.exp(_uniform(ratio_seed, math.log(ratio[0]), math.log(ratio[1]), [attempts]))
    crop_w = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
    crop_h = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
    fits = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)

    def random_box():
        h, w = crop_h[first], crop_w[first]
        offsets = _uniform(offset_seed, shape=[2])
        top = tf.cast(offsets[0] * tf.cast(height - h + 1, tf.float32), tf.int32)
        left = tf.cast(offsets[1] * tf.cast(width - w + 1, tf.float32), tf.int32)
        return tf.stack([tf.minimum(top, height - h), tf.minimum(left, width - w), h, w])

    def central_box():
        image_ratio = width_f / height_f
        w = tf.where(image_ratio > ratio[1], tf.round(height_f * ratio[1]), width_f)
        h = tf.where(image_ratio < ratio[0], tf.round(width_f / ratio[0]), height_f)
        h, w = tf.cast(h, tf.int32), tf.cast(w, tf.int32)
        return tf.stack([(height - h) // 2, (width - w) // 2, h, w])

    return tf.unstack(tf.cond(tf.reduce_any(fits), random_box, central_box))


def _crop(image, box):
    top, left, h, w = box
    return image[top : top + h, left : left + w]


def _square(image, size):
    return tf.ensure_shape(resize_bicubic(image, size, size), [size, size, 3])


@register("inception_crop")
def inception_crop(size, scale_min=0.08, scale_max=1.0, ratio_min=3 / 4, ratio_max=4 / 3):
    """Random-resized (Inception) crop, resized bicubic to size x size."""

    def op(features, seed):
        image = features["image"]
        shape = tf.shape(image)
        box = sample_inception_box(shape[0], shape[1], seed, (scale_min, scale_max), (ratio_min, ratio_max))
        return _replace_image(features, _square(_crop(image, box), size))

    return op


def decode_and_crop(image, box_of_shape):
    """uint8 crop at the box `box_of_shape(height, width)` picks, of encoded bytes or of a decoded
    image. A JPEG decodes only the rows and blocks the box needs (tf.image.decode_and_crop_jpeg);
    anything else decodes whole, then is cropped. The JPEG crop equals the crop of the whole
    decode but for 4:2:0 chroma, where the crop's outermost pixels may differ: libjpeg's smooth
    chroma upsampling sees no neighbour beyond the decoded part."""

    def whole():
        decoded = decode_to_uint8(image)
        shape = tf.shape(decoded)
        return _crop(decoded, box_of_shape(shape[0], shape[1]))

    if image.dtype != tf.string:
        return whole()

    def jpeg():
        shape = tf.image.extract_jpeg_shape(image)
        return tf.image.decode_and_crop_jpeg(image, tf.stack(box_of_shape(shape[0], shape[1])), channels=3)

    crop = tf.cond(tf.io.is_jpeg(image), jpeg, whole)
    crop.set_shape([None, None, 3])
    return crop


@register("decode_and_inception_crop")
def decode_and_inception_crop(size, scale_min=0.08, scale_max=1.0, ratio_min=3 / 4, ratio_max=4 / 3):
    """decode_uint8|inception_crop(...): the same crop for the same seed, uint8 size x size, but a
    JPEG decodes only the crop's part (see decode_and_crop)."""

    def op(features, seed):
        box_of_shape = functools.partial(
            sample_inception_box, seed=seed, scale=(scale_min, scale_max), ratio=(ratio_min, ratio_max)
        )
        return _replace_image(features, _square(decode_and_crop(features["image"], box_of_shape), size))

    return op


@register("flip_lr")
def flip_lr(probability=0.5):
    def op(features, seed):
        image = features["image"]
        flipped = tf.cond(_uniform(seed) < probability, lambda: tf.reverse(image, axis=[1]), lambda: image)
        return _replace_image(features, flipped)

    return op


@register("resize")
def resize(size):
    """Resize to size x size, ignoring the aspect ratio."""
    return lambda features, seed: _replace_image(features, _square(features["image"], size))


def shorter_side_target(size: int, crop_pct: float) -> int:
    """The evaluation rule: the shorter side becomes floor(size / crop_pct) (224 / 0.875 -> 256)."""
    return int(math.floor(size / crop_pct))


@register("resize_shorter")
def resize_shorter(size, crop_pct=1.0):
    """Resize keeping the aspect ratio so the shorter side is floor(size / crop_pct)."""
    target = shorter_side_target(size, crop_pct)

    def op(features, seed):
        image = features["image"]
        shape = tf.shape(image)
        height, width = shape[0], shape[1]
        longer = lambda long_side, short_side: tf.cast(  # noqa: E731
            tf.cast(target, tf.int64) * tf.cast(long_side, tf.int64) // tf.cast(short_side, tf.int64), tf.int32
        )
        new_h = tf.where(height <= width, target, longer(height, width))
        new_w = tf.where(height <= width, longer(width, height), target)
        return _replace_image(features, resize_bicubic(image, new_h, new_w))

    return op


@register("center_crop")
def center_crop(size):
    """The central size x size window (rounded as torchvision does); the image must be large enough."""

    def op(features, seed):
        image = features["image"]
        shape = tf.shape(image)
        tf.debugging.assert_greater_equal(tf.reduce_min(shape[:2]), size, message=f"center_crop({size}) needs a larger image")
        top = tf.cast(tf.round(tf.cast(shape[0] - size, tf.float32) / 2), tf.int32)
        left = tf.cast(tf.round(tf.cast(shape[1] - size, tf.float32) / 2), tf.int32)
        return _replace_image(features, tf.ensure_shape(image[top : top + size, left : left + size], [size, size, 3]))

    return op


@register("value_range")
def value_range(low=0.0, high=1.0):
    """Maps [0, 255] linearly onto [low, high]."""
    return lambda features, seed: _replace_image(features, low + _float_image(features) * ((high - low) / 255.0))


@register("normalize")
def normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """(x - mean) / std per channel; by default ImageNet's, for images in [0, 1]."""
    mean_t, std_t = tf.constant(mean, tf.float32), tf.constant(std, tf.float32)
    return lambda features, seed: _replace_image(features, (_float_image(features) - mean_t) / std_t)
