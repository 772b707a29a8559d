"""Pure image functions shared by prepare, training and inference: numpy/bytes in, out.

No I/O and no Ray here, so every function is unit-tested directly and runs the same in
the driver, in a Ray Data task, or inside a training worker.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

# Formats stored as they are; anything else Pillow reads is re-encoded to PNG.
STORED_FORMATS = {"PNG", "JPEG"}


def encode_png(images: np.ndarray) -> list[bytes]:
    """Encode a batch of uint8 grayscale images (N, H, W) as PNG bytes, one per image."""
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    out = []
    for image in images:  # Pillow has no batch encoder; callers parallelize across Ray tasks
        buf = io.BytesIO()
        Image.fromarray(image, mode="L").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def decode_gray(data: bytes) -> np.ndarray:
    """Decode PNG/JPEG/... bytes to a uint8 grayscale array (H, W)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("L"))


def decode_gray_batch(images: list[bytes] | np.ndarray) -> np.ndarray:
    """Decode equally sized images to a uint8 array (N, H, W)."""
    return np.stack([decode_gray(b) for b in images]) if len(images) else np.zeros((0, 28, 28), np.uint8)


MODEL_SIZE = 28
DIGIT_BOX = 20  # MNIST fits each digit in 20x20 and centres its mass in 28x28


def decode_for_model(data: bytes) -> np.ndarray:
    """Image bytes -> uint8 grayscale (H, W); large JPEGs are decoded at a reduced scale."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG":
            image.draft("L", (8 * MODEL_SIZE, 8 * MODEL_SIZE))  # DCT scaling: photos decode fast
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            # Transparent pixels are paper: composite on white before dropping alpha.
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return np.asarray(image.convert("L"))


def mnist_like(gray: np.ndarray) -> np.ndarray:
    """A grayscale picture of one digit -> 28x28 uint8 the way MNIST digits look: white on black,
    the digit cropped, fit in a 20x20 box (aspect kept) and centred by its centre of mass.

    28x28 input is taken as already MNIST-like (only the polarity is checked), so MNIST and
    Fashion-MNIST images pass through unchanged.
    """
    img = gray.astype(np.float32)
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    if np.median(border) > 127:  # dark ink on light paper
        img, border = 255.0 - img, 255.0 - border
    if img.shape == (MODEL_SIZE, MODEL_SIZE):
        return np.clip(img, 0, 255).astype(np.uint8)
    img = np.clip(img - np.percentile(border, 90), 0, None)  # paper texture and shading -> 0
    peak = img.max()
    if peak < 16:
        raise ValueError("blank image: no digit found")
    img *= 255.0 / peak
    ys, xs = np.nonzero(img > 0.25 * 255)
    crop = img[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]
    h, w = crop.shape
    scale = DIGIT_BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    digit = np.asarray(Image.fromarray(crop.astype(np.uint8)).resize(size, Image.Resampling.LANCZOS),
                       dtype=np.float32)
    total = digit.sum()
    cy, cx = ((np.arange(digit.shape[0]) @ digit.sum(1)) / total, (np.arange(digit.shape[1]) @ digit.sum(0)) / total) \
        if total > 0 else (digit.shape[0] / 2, digit.shape[1] / 2)
    top = int(np.clip(round(MODEL_SIZE / 2 - cy), 0, MODEL_SIZE - digit.shape[0]))
    left = int(np.clip(round(MODEL_SIZE / 2 - cx), 0, MODEL_SIZE - digit.shape[1]))
    out = np.zeros((MODEL_SIZE, MODEL_SIZE), np.float32)
    out[top: top + digit.shape[0], left: left + digit.shape[1]] = digit
    return np.clip(out, 0, 255).astype(np.uint8)


def prepare_pixels(images: list[bytes]) -> tuple[np.ndarray, list[str | None]]:
    """Encoded images -> MNIST-like uint8 (N, 28, 28) and one error (or None) per image.

    A row that cannot be decoded gets zeros and its error: the batch goes on. This is the one
    definition of "the pixels the model sees": prepare stores it in the shards, inference
    recomputes it only for images stored without it.
    """
    pixels = np.zeros((len(images), MODEL_SIZE, MODEL_SIZE), dtype=np.uint8)
    errors: list[str | None] = [None] * len(images)
    for i, data in enumerate(images):
        try:
            if data is None:
                raise ValueError("no image bytes")
            pixels[i] = mnist_like(decode_for_model(data))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            errors[i] = f"{type(e).__name__}: {e}"
    return pixels, errors


def prepare_batch(images: list[bytes]) -> tuple[np.ndarray, list[str | None]]:
    """Encoded images -> model input (N, 28, 28, 1) float32 and one error (or None) per image."""
    pixels, errors = prepare_pixels(images)
    return normalize(pixels), errors


def to_model_input(images: list[bytes]) -> np.ndarray:
    """Encoded images -> the model's input: float32 (N, 28, 28, 1) in [0, 1], white on black.

    Shared by training and inference, so the two cannot drift. Raises on an undecodable image.
    """
    pixels, errors = prepare_batch(images)
    bad = next((e for e in errors if e), None)
    if bad:
        raise ValueError(f"cannot prepare an image for the model: {bad}")
    return pixels


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W) -> float32 (N, H, W, 1) in [0, 1]."""
    return (pixels.astype(np.float32) * (1.0 / 255.0))[..., None]


def normalize_stored_image(data: bytes) -> tuple[bytes | None, str | None]:
    """Check that ``data`` is a decodable image and return the bytes to store, or an error.

    PNG and JPEG are kept byte for byte (no quality loss); other formats (BMP, TIFF, WebP,
    GIF...) become PNG so every reader only needs to handle two formats.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt = image.format
            image.load()  # a truncated or corrupt file fails here, not at training time
            if fmt in STORED_FORMATS:
                return data, None
            if image.mode not in ("L", "RGB", "RGBA", "LA"):
                image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            return buf.getvalue(), None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return None, f"{type(e).__name__}: {e}"
