"""Training augmentation: MNIST digits as scans and photos would show them, and random affine maps.

``degrade`` (numpy, once per training image when the data is loaded) makes the digit a
picture of another kind — scanned at low resolution with few grey levels, thick-stroked,
blurred, or photographed — and brings it back through ``preprocess.mnist_like``, the very
normalisation inference applies, so the model learns what real inputs look like after it.
``affine_batch`` (TensorFlow, every batch) varies the geometry as handwriting does.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
from PIL import Image, ImageFilter

from mnist_ray.images import photos, preprocess

KINDS = ("low-resolution", "thick", "blurred", "photo")


def _tight(digit: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(digit > 32)
    if not len(ys):
        return digit
    return digit[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]


def low_resolution(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A scan of few pixels: the digit cut to its strokes, squeezed or stretched to fill a small
    grid (6-16 px tall), often 17 grey levels (UCI style), enlarged again, either polarity."""
    tight = _tight(digit)
    h = int(rng.integers(6, 17))
    aspect = tight.shape[1] / tight.shape[0] * rng.uniform(0.8, 1.8)  # scanners fill the box
    w = int(np.clip(round(h * aspect), 2, h))
    small = np.asarray(Image.fromarray(tight).resize((w, h), Image.Resampling.BOX), np.float32)
    if rng.random() < 0.6:
        small = np.round(small / 255 * 16) * (255 / 16)
    pad = int(rng.integers(0, 2))  # a pixel of paper around it, or none: ink touches the frame
    small = np.pad(small, pad)
    scale = int(rng.integers(2, 9))
    resample = Image.Resampling.NEAREST if rng.random() < 0.4 else Image.Resampling.BILINEAR
    big = Image.fromarray(small.astype(np.uint8)).resize((small.shape[1] * scale, small.shape[0] * scale),
                                                         resample)
    return np.asarray(big)


def thick(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A felt pen or a bold marker: strokes dilated by 1-3 px at twice MNIST's size, maybe soft."""
    big = Image.fromarray(digit).resize((56, 56), Image.Resampling.BICUBIC)
    big = big.filter(ImageFilter.MaxFilter(int(rng.choice([3, 5, 7]))))
    if rng.random() < 0.5:
        big = big.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    return np.asarray(big)


def blurred(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Out of focus and low in contrast: grey paper, grey ink, Gaussian blur, sensor noise."""
    side = int(rng.integers(40, 100))
    big = Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC)
    big = np.asarray(big.filter(ImageFilter.GaussianBlur(rng.uniform(0.8, 3.0) * side / 56)), np.float32) / 255
    paper, ink = rng.uniform(140, 250), rng.uniform(0, 110)
    picture = paper + (ink - paper) * big + rng.normal(0, rng.uniform(0, 6), big.shape)
    return np.clip(picture, 0, 255).astype(np.uint8)


def photo(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A small phone photo of the digit: tinted paper under uneven light, dark ink, slightly
    turned, noisy, blurred, JPEG-compressed, then decoded as inference decodes. (Robustness
    measures on photos of another make: ``measured_photos``.)"""
    side = int(rng.integers(56, 129))
    page = photos.lit_paper(rng, side, (150, 240), 30)
    photos.ink(page, digit, rng, size=(0.45, 0.85), turn_deg=8, darkness=(0.5, 0.85))
    image = Image.fromarray(photos.sensor_rgb(page, rng, noise=(2, 8)))
    return preprocess.decode_for_model(photos.jpeg(image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2))),
                                                   rng, (50, 92)))


def degrade(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 28x28 MNIST digit -> the 28x28 pixels inference would make of a picture of it of a random
    kind (KINDS); the digit itself if that picture came out blank."""
    kind = KINDS[int(rng.integers(len(KINDS)))]
    picture = {"low-resolution": low_resolution, "thick": thick, "blurred": blurred, "photo": photo}[kind](digit, rng)
    try:
        return preprocess.mnist_like(picture)
    except preprocess.ImageError:
        return digit


def degrade_batch(pixels: np.ndarray, ids: list[str], seed: int) -> np.ndarray:
    """``degrade`` of every image of a batch, seeded by id (the same variant on every run)."""
    out = np.empty_like(pixels)
    for i, (digit, id_) in enumerate(zip(pixels, ids)):
        out[i] = degrade(digit, np.random.default_rng([seed, zlib.crc32(id_.encode())]))
    return out


def affine_batch(images, seed, max_rotation_deg=12.0, max_scale=0.12, max_shear_deg=8.0, max_shift=2.5):
    """A random affine map per image (rotation, scale, shear, shift), as handwriting varies.

    ``images``: float32 (B, 28, 28, 1) in [0, 1]; ``seed``: int tensor of shape [2] (stateless,
    so a restarted epoch sees the same augmentation).
    """
    import tensorflow as tf

    images = tf.convert_to_tensor(images, tf.float32)
    b = tf.shape(images)[0]
    h, w = tf.cast(tf.shape(images)[1], tf.float32), tf.cast(tf.shape(images)[2], tf.float32)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 5)

    def uniform(i, limit, center=0.0):
        return tf.random.stateless_uniform([b], seeds[i], center - limit, center + limit)

    rad = math.pi / 180.0
    rotation, shear = uniform(0, max_rotation_deg) * rad, uniform(1, max_shear_deg) * rad
    inv_scale = 1.0 / uniform(2, max_scale, 1.0)
    tx, ty = uniform(3, max_shift), uniform(4, max_shift)
    cos, sin = tf.cos(rotation), tf.sin(rotation)
    a0, a1 = cos * inv_scale, (-sin + cos * tf.tan(shear)) * inv_scale
    b0, b1 = sin * inv_scale, (cos + sin * tf.tan(shear)) * inv_scale
    cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0  # about the image centre
    a2, b2 = cx - a0 * cx - a1 * cy - tx, cy - b0 * cx - b1 * cy - ty
    zeros = tf.zeros_like(a0)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=tf.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1),
        output_shape=tf.shape(images)[1:3], fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")
    return tf.clip_by_value(out, 0.0, 1.0)


def pick_variants(images, variants, seed, rate: float):
    """Per image, its degraded variant with probability ``rate``, else the image (stateless seed)."""
    import tensorflow as tf

    take = tf.random.stateless_uniform([tf.shape(images)[0], 1, 1, 1], tf.cast(seed, tf.int64)) < rate
    return tf.where(take, variants, images)
