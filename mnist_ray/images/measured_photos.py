"""The phone photos that measure a model (robustness's set (d)), kept apart from training's.

They differ from training's photos (``augment.photo``) on purpose: a measurement must never fall
inside the training distribution, or it measures what the model was shown rather than how it
copes with what it was not. So these pages are larger (200-480 px against 56-128), carry paper
grain and a vignette, are photographed at a slant (perspective) and stored sideways with an EXIF
orientation, none of which training draws; the digit is turned further and drawn smaller.
Training must never import this module (tests/test_layout.py checks it).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter

from mnist_ray.images import photos


def phone_photo(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """A phone photo of a 28x28 digit written on paper: JPEG, stored sideways with an EXIF
    orientation that turns it upright, as phones do."""
    side = int(rng.integers(200, 480))
    paper = photos.lit_paper(rng, side, (175, 235), 35)
    yy, xx = np.mgrid[0:side, 0:side] / side
    # Paper: fibres (noise at a few scales) and a vignette, beside the tint and the light.
    paper -= rng.uniform(0, 30) * ((xx - rng.uniform(0, 1)) ** 2 + (yy - rng.uniform(0, 1)) ** 2)
    for scale in (4, 16):
        grain = rng.normal(0, 1, (side // scale + 1, side // scale + 1)).astype(np.float32)
        paper += rng.uniform(1, 5) * np.asarray(Image.fromarray(grain, "F").resize((side, side), Image.Resampling.BICUBIC))
    page = paper.copy()
    photos.ink(page, digit, rng, size=(0.35, 0.75), turn_deg=10, darkness=(0.55, 0.9),
               resample=Image.Resampling.BICUBIC)
    image = Image.fromarray(photos.sensor_rgb(page, rng, noise=(2, 7)))
    # A slight perspective: the phone not quite parallel to the page.
    d = side * 0.06
    quad = [rng.uniform(0, d), rng.uniform(0, d), rng.uniform(0, d), side - rng.uniform(0, d),
            side - rng.uniform(0, d), side - rng.uniform(0, d), side - rng.uniform(0, d), rng.uniform(0, d)]
    image = image.transform((side, side), Image.Transform.QUAD, quad, Image.Resampling.BILINEAR)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.8)))
    orientation = int(rng.choice([1, 3, 6, 8]))
    stored = {1: image, 3: image.transpose(Image.Transpose.ROTATE_180),
              6: image.transpose(Image.Transpose.ROTATE_90), 8: image.transpose(Image.Transpose.ROTATE_270)}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    return photos.jpeg(stored, rng, (55, 92), exif=exif)
