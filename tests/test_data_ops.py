"""Each preprocessing op on real (natural-looking and Fashion-MNIST) images."""
import re

import jax
import numpy as np
import pytest
from PIL import Image
from helpers.data import jpeg_bytes, natural_image

from shunted_jax.data import config, device_ops, ops, registry
from shunted_jax.data.fashion_mnist_demo import DEBIAN_DIR, read_idx
from shunted_jax.data.tf_import import tensorflow

tf = tensorflow()
SEED = tf.constant([3, 4], tf.int64)


def run_op(spec: str, image, seed=SEED) -> np.ndarray:
    (_, op), = registry.parse(spec)
    return op({"image": tf.convert_to_tensor(image)}, tf.constant(seed, tf.int64))["image"].numpy()


def seeds(count: int):
    return [tf.constant([7, index], tf.int64) for index in range(count)]


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return natural_image(96, 128).astype(np.float32)


@pytest.fixture(scope="module")
def fashion_images() -> np.ndarray:
    return read_idx(f"{DEBIAN_DIR}/t10k-images-idx3-ubyte.gz")[:8]


def test_decode_jpeg_gives_float_rgb_close_to_the_original():
    original = natural_image(48, 64)
    decoded = run_op("decode", jpeg_bytes(original))
    assert decoded.shape == (48, 64, 3) and decoded.dtype == np.float32
    assert np.abs(decoded - original).mean() < 6


def test_decode_repeats_grayscale_into_three_channels(fashion_images):
    from_png = run_op("decode", tf.io.encode_png(fashion_images[0][..., None]).numpy())
    from_array = run_op("decode", fashion_images[0][..., None])
    for decoded in (from_png, from_array):
        assert decoded.shape == (28, 28, 3)
        np.testing.assert_array_equal(decoded[..., 0], fashion_images[0])
        np.testing.assert_array_equal(decoded[..., 2], decoded[..., 0])


def test_inception_box_respects_scale_and_ratio_and_varies():
    boxes = [[int(v) for v in ops.sample_inception_box(375, 500, seed)] for seed in seeds(50)]
    for top, left, h, w in boxes:
        assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500
        assert 0.08 * 0.95 <= h * w / (375 * 500) <= 1.0
        assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
    assert len({tuple(box) for box in boxes}) == 50


def test_inception_crop_resizes_the_sampled_box(photo):
    out = run_op("inception_crop(32)", photo)
    top, left, h, w = [int(v) for v in ops.sample_inception_box(96, 128, SEED)]
    assert out.shape == (32, 32, 3) and out.min() >= 0 and out.max() <= 255
    assert (h, w) != (96, 128)
    expected = ops.resize_bicubic(photo[top : top + h, left : left + w], 32, 32).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_inception_crop_falls_back_to_a_central_crop_when_nothing_fits():
    tall = np.zeros((400, 10, 3), np.float32)
    top, left, h, w = [int(v) for v in ops.sample_inception_box(400, 10, SEED, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3))]
    assert (w, h) == (10, round(10 / (3 / 4))) and top == (400 - h) // 2 and left == 0
    assert run_op("inception_crop(16, scale_min=0.9)", tall).shape == (16, 16, 3)


def jpeg_444(image: np.ndarray) -> bytes:
    """A JPEG without chroma subsampling, which decodes a crop exactly as its full decode."""
    return tf.io.encode_jpeg(image, quality=95, chroma_downsampling=False).numpy()


def test_decode_uint8_gives_the_rgb_of_decode():
    original = natural_image(48, 64)
    decoded = run_op("decode_uint8", jpeg_bytes(original))
    assert decoded.shape == (48, 64, 3) and decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, run_op("decode", jpeg_bytes(original)))


def fixed_box(top, left, height, width):
    return lambda image_height, image_width: (top, left, height, width)


@pytest.mark.parametrize("box", [(0, 0, 97, 131), (8, 16, 40, 64), (13, 21, 37, 51), (50, 77, 47, 54)])
def test_fused_decode_and_crop_of_a_jpeg_equals_decode_then_crop(box):
    """Exact for 4:4:4 JPEGs. With 4:2:0 chroma, libjpeg's smooth chroma upsampling sees no
    neighbour beyond the decoded part, so the outermost pixels of the crop may differ; the
    inside is exact."""
    top, left, height, width = box
    original = natural_image(97, 131, seed=5)
    for encoded, border in ((jpeg_444(original), 0), (jpeg_bytes(original), 1)):
        fused = ops.decode_and_crop(tf.constant(encoded), fixed_box(*box)).numpy()
        whole = run_op("decode_uint8", encoded)[top : top + height, left : left + width]
        assert fused.shape == (height, width, 3) and fused.dtype == np.uint8
        inside = (slice(border, height - border), slice(border, width - border))
        np.testing.assert_array_equal(fused[inside], whole[inside])
        assert np.abs(fused.astype(int) - whole).mean() < 1


def test_decode_and_inception_crop_equals_decode_then_inception_crop(fashion_images):
    """The same box for the same seed whatever the input: a JPEG (fused), a PNG (decoded whole),
    an image already decoded (repeated augmentation's copies)."""
    photo = natural_image(96, 128, seed=2)
    grayscale = fashion_images[0][..., None]
    inputs = (jpeg_444(photo), tf.io.encode_png(grayscale).numpy(), photo, grayscale)
    for image in inputs:
        for seed in seeds(3):
            fused = run_op("decode_and_inception_crop(32)", image, seed)
            assert fused.shape == (32, 32, 3) and fused.dtype == np.uint8
            np.testing.assert_array_equal(fused, run_op("inception_crop(32)", run_op("decode_uint8", image), seed))


def test_geometric_ops_keep_the_dtype_and_agree_across_dtypes(photo):
    """uint8 resizes round and clip between PIL's two passes, float32 ones do not; the second pass
    carries that through weights whose magnitudes sum past 1, so pixels at sharp edges differ by
    several levels, the image on average by well under one."""
    image = photo.astype(np.uint8)
    for spec in ("resize(40)", "resize_shorter(40)", "inception_crop(40)", "center_crop(40)", "flip_lr(1.0)"):
        as_uint8, as_float = run_op(spec, image), run_op(spec, image.astype(np.float32))
        assert as_uint8.dtype == np.uint8 and as_float.dtype == np.float32
        assert as_float.min() >= 0 and as_float.max() <= 255
        difference = np.abs(as_uint8 - as_float)
        assert difference.mean() <= 0.5


@pytest.mark.parametrize("size", [(40, 56), (130, 170)])
def test_uint8_resizes_are_pils_bicubic_resize(photo, size):
    """timm resizes PIL images: a uint8 resize, down or up, gives PIL's pixels exactly."""
    image = photo.astype(np.uint8)
    expected = np.asarray(Image.fromarray(image).resize(size[::-1], Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(ops.resize_bicubic(tf.constant(image), *size).numpy(), expected)


def test_float_ops_take_uint8_images(photo):
    image = photo.astype(np.uint8)
    for spec in ("value_range(0, 1)", "normalize"):
        np.testing.assert_array_equal(run_op(spec, image), run_op(spec, image.astype(np.float32)))


def test_host_strings_give_uint8_at_the_size(fashion_images):
    photo = jpeg_bytes(natural_image(150, 200, seed=3))
    mnist = tf.io.encode_png(fashion_images[0][..., None]).numpy()
    for pp, image in ((config.HOST_PP_TRAIN, photo), (config.HOST_PP_EVAL, photo),
                      (config.HOST_PP_DEMO_TRAIN, mnist), (config.HOST_PP_DEMO_EVAL, mnist)):
        out = registry.build(pp.format(image_size=32))({"image": tf.constant(image)}, SEED)["image"]
        assert out.shape == (32, 32, 3) and out.dtype == tf.uint8, pp


def test_flip_lr_mirrors_the_image(photo):
    np.testing.assert_array_equal(run_op("flip_lr(1.0)", photo), photo[:, ::-1])
    np.testing.assert_array_equal(run_op("flip_lr(0.0)", photo), photo)
    flipped = [not np.array_equal(run_op("flip_lr", photo, seed), photo) for seed in seeds(40)]
    assert 8 < sum(flipped) < 32


def test_eval_resize_follows_the_crop_pct_rule():
    assert ops.shorter_side_target(224, 0.875) == 256
    landscape = np.zeros((375, 500, 3), np.float32)
    assert run_op("resize_shorter(224, 0.875)", landscape).shape == (256, 341, 3)
    assert run_op("resize_shorter(224, 0.875)", landscape.transpose(1, 0, 2)).shape == (341, 256, 3)


def test_center_crop_takes_the_middle(photo):
    out = run_op("center_crop(32)", photo)
    np.testing.assert_array_equal(out, photo[32:64, 48:80])


def finish_on_device(device_pp: str, images: np.ndarray, step: int = 0) -> np.ndarray:
    """The device ops of `device_pp` on a uint8 batch, as the train or eval step applies them."""
    keys = device_ops.example_keys(jax.random.key(0), step, np.arange(len(images)))
    return np.asarray(device_ops.build(device_pp)(images, keys))


def test_default_eval_strings_are_resize_center_crop_then_normalize_on_the_device():
    original = natural_image(150, 200, seed=3)
    cfg = config.default_config()
    host = registry.build(cfg.pp_eval.format(image_size=112))
    cropped = host({"image": tf.constant(jpeg_bytes(original))}, SEED)["image"].numpy()
    decoded = ops.decode_to_uint8(tf.constant(jpeg_bytes(original)))
    resized = ops.resize_bicubic(decoded, 128, 170).numpy()
    np.testing.assert_array_equal(cropped, resized[8:120, 29:141])
    expected = (resized[8:120, 29:141] / 255.0 - ops.IMAGENET_MEAN) / ops.IMAGENET_STD
    np.testing.assert_allclose(finish_on_device(device_ops.EVAL_PP, cropped[None])[0], expected, atol=1e-5)


def test_value_range_and_normalize(photo):
    unit = run_op("value_range(0, 1)", photo)
    assert unit.min() >= 0 and unit.max() <= 1
    np.testing.assert_allclose(unit * 255, photo, rtol=1e-5)
    mean_image = np.broadcast_to(np.array(ops.IMAGENET_MEAN, np.float32), (4, 4, 3))
    np.testing.assert_allclose(run_op("normalize", mean_image), 0, atol=1e-6)
    np.testing.assert_allclose(run_op("normalize", mean_image + np.array(ops.IMAGENET_STD, np.float32)), 1, atol=1e-5)


def test_default_training_strings_augment_on_the_device(photo):
    """data.default_config()'s host string gives uint8 crops; TRAIN_PP on the device finishes them:
    float32, RandAugment and erasing differing per example, normalised values where not erased."""
    encoded = tf.constant(jpeg_bytes(photo.astype(np.uint8)))
    host = registry.build(config.default_config().pp_train.format(image_size=64))
    crops = np.stack([host({"image": encoded}, seed)["image"].numpy() for seed in seeds(3)])
    assert crops.shape == (3, 64, 64, 3) and crops.dtype == np.uint8
    outs = finish_on_device(device_ops.TRAIN_PP, crops)
    assert outs.dtype == np.float32 and np.isfinite(outs).all()
    normalised = finish_on_device(device_ops.EVAL_PP, crops)
    assert (np.abs(outs - normalised) > 1e-3).any(axis=(1, 2, 3)).mean() > 0.5, "hardly augmented"


def test_parse_rejects_bad_strings_early():
    with pytest.raises(ValueError, match="unknown preprocessing op 'no_such_op'"):
        registry.parse("decode|no_such_op(3)")
    with pytest.raises(ValueError, match="cannot parse"):
        registry.parse("decode|resize(")
    with pytest.raises(ValueError, match="bad arguments"):
        registry.parse("flip_lr(1, 2, 3)")
    with pytest.raises(ValueError, match="empty"):
        registry.parse(" | ")
    for device_op in ("randaug(2,9,0.5)", "random_erase(0.25)"):
        with pytest.raises(ValueError, match=rf"^'{re.escape(device_op)}' in .* is not a preprocessing op: put it in "
                                             r"the device ops, data\.device_pp_train"):
            registry.parse(f"decode_uint8|{device_op}")
    names = [spec for spec, _ in registry.parse("decode|inception_crop(224, scale_min=0.5)|flip_lr")]
    assert names == ["decode", "inception_crop(224, scale_min=0.5)", "flip_lr"]
