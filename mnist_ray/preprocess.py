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


def to_model_input(images: list[bytes]) -> np.ndarray:
    """Encoded images -> the model's input: float32 (N, 28, 28, 1) in [0, 1], white on black.

    Shared by training and inference, so the two cannot drift.
    """
    out = np.empty((len(images), MODEL_SIZE, MODEL_SIZE), dtype=np.uint8)
    for i, data in enumerate(images):
        with Image.open(io.BytesIO(data)) as image:
            gray = image.convert("L")
            if gray.size != (MODEL_SIZE, MODEL_SIZE):
                gray = gray.resize((MODEL_SIZE, MODEL_SIZE), Image.Resampling.BILINEAR)
            out[i] = np.asarray(gray)
    return normalize(out)


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
