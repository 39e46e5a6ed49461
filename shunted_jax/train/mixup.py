"""Mixup / CutMix and label smoothing, computed on device inside the jitted step (timm's batch mode)."""
import jax
import jax.numpy as jnp


def smooth_one_hot(labels, num_classes: int, smoothing: float):
    """One-hot targets with `smoothing` spread uniformly over all classes (timm's on/off values)."""
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def cutmix_box(rng, lam, height: int, width: int):
    """A box covering about 1 - lam of the image, clipped at the border, and the lambda it really gives.

    Follows timm's rand_bbox: side = int(size * sqrt(1 - lam)), a uniformly drawn centre, clipping,
    then lambda = 1 - clipped box area / image area.
    """
    cut_ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * cut_ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * cut_ratio).astype(jnp.int32)
    key_y, key_x = jax.random.split(rng)
    centre_y = jax.random.randint(key_y, (), 0, height)
    centre_x = jax.random.randint(key_x, (), 0, width)
    top = jnp.clip(centre_y - cut_h // 2, 0, height)
    bottom = jnp.clip(centre_y + cut_h // 2, 0, height)
    left = jnp.clip(centre_x - cut_w // 2, 0, width)
    right = jnp.clip(centre_x + cut_w // 2, 0, width)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    corrected_lam = 1.0 - ((bottom - top) * (right - left)) / (height * width)
    return inside, corrected_lam.astype(jnp.float32)


def mix_batch(rng, images, labels, *, num_classes: int, mixup_alpha: float, cutmix_alpha: float,
              prob: float, switch_prob: float, label_smoothing: float):
    """Mixes the whole batch with its reverse, with one lambda per batch, and returns soft targets.

    With probability `prob` a mix happens; it is CutMix with probability `switch_prob` when both
    alphas are positive, otherwise whichever alpha is positive. Targets are the lambda-weighted
    smoothed one-hots of each image and its partner, as timm's mixup_target.
    """
    targets = smooth_one_hot(labels, num_classes, label_smoothing)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, targets
    key_apply, key_switch, key_mixup, key_cutmix, key_box = jax.random.split(rng, 5)
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(key_switch) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    lam_mixup = jax.random.beta(key_mixup, max(mixup_alpha, 1e-6), max(mixup_alpha, 1e-6))
    lam_cutmix = jax.random.beta(key_cutmix, max(cutmix_alpha, 1e-6), max(cutmix_alpha, 1e-6))
    box, lam_box = cutmix_box(key_box, lam_cutmix, images.shape[1], images.shape[2])

    partners = images[::-1]
    lam_mixup_images = lam_mixup.astype(images.dtype)
    mixed = jnp.where(use_cutmix,
                      jnp.where(box[None, :, :, None], partners, images),
                      images * lam_mixup_images + partners * (1 - lam_mixup_images))
    lam = jnp.where(use_cutmix, lam_box, lam_mixup)
    apply = jax.random.uniform(key_apply) < prob
    lam = jnp.where(apply, lam, 1.0)
    images = jnp.where(apply, mixed, images)
    return images, targets * lam + targets[::-1] * (1.0 - lam)
