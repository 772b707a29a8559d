"""What every rendered phone photo of a digit is made of: lit paper, a digit inked on it, sensor
noise and a tint, and a JPEG. Pure functions of a digit and a seeded generator; each draws from
``rng`` in a fixed order, so a renderer built of them makes the same bytes on every run.

The renderers: training's (``augment.photo``), the ``photos:`` source's (``datasets.render_photo``)
and the robustness measurement's (``measured_photos.phone_photo``), each with its own ranges.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def lit_paper(rng: np.random.Generator, side: int, shade: tuple[float, float], slope: float,
              dtype=None) -> np.ndarray:
    """A (side, side) page of one grey ``shade`` (drawn from the range) under light that falls off
    by up to ``slope`` across each axis. ``dtype``: a page of that dtype, lit in place (float32:
    the ``photos:`` source's pages are made so); None: float64."""
    yy, xx = np.mgrid[0:side, 0:side] / side
    if dtype is None:
        return rng.uniform(*shade) + rng.uniform(-slope, slope) * (xx - 0.5) + rng.uniform(-slope, slope) * (yy - 0.5)
    page = np.full((side, side), rng.uniform(*shade), dtype)
    page += rng.uniform(-slope, slope) * (xx - 0.5) + rng.uniform(-slope, slope) * (yy - 0.5)
    return page


def ink(page: np.ndarray, digit: np.ndarray, rng: np.random.Generator, size: tuple[float, float],
        turn_deg: float, darkness: tuple[float, float], resample=Image.Resampling.BILINEAR,
        aspect: tuple[float, float] | None = None) -> None:
    """Writes the 28x28 ``digit`` on ``page`` in dark ink, in place: ``size`` of the page's side
    (a range), its height times ``aspect`` if given, turned by up to ``turn_deg`` (``resample``),
    somewhere on the page, ``darkness`` (a range) at full stroke."""
    side = page.shape[0]
    width = int(side * rng.uniform(*size))
    height = int(width * rng.uniform(*aspect)) if aspect else width
    drawn = Image.fromarray(digit).resize((width, height), Image.Resampling.BICUBIC)
    strokes = np.asarray(drawn.rotate(rng.uniform(-turn_deg, turn_deg), resample=resample), np.float32) / 255.0
    h, w = min(strokes.shape[0], side), min(strokes.shape[1], side)
    top, left = int(rng.integers(0, side - h + 1)), int(rng.integers(0, side - w + 1))
    page[top:top + h, left:left + w] *= 1 - rng.uniform(*darkness) * strokes[:h, :w]


def sensor_rgb(page: np.ndarray, rng: np.random.Generator, noise: tuple[float, float]) -> np.ndarray:
    """The page as a camera gives it: Gaussian noise of a strength in ``noise`` (added to ``page``
    in place), a colour tint, uint8 RGB."""
    page += rng.normal(0, rng.uniform(*noise), page.shape)
    return np.clip(page[..., None] * rng.uniform(0.85, 1.0, 3), 0, 255).astype(np.uint8)


def jpeg(image: Image.Image, rng: np.random.Generator, quality: tuple[int, int], **save) -> bytes:
    """``image`` as a JPEG of a quality drawn from ``quality`` (``save``: more of Pillow's options, e.g. exif)."""
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=int(rng.integers(*quality)), **save)
    return buf.getvalue()
