"""Pure image functions shared by prepare, training and inference: numpy/bytes in, out.

No I/O and no Ray here, so every function is unit-tested directly and runs the same in
the driver, in a Ray Data task, or inside a training worker.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The version of "the pixels the model sees" (decode_for_model + mnist_like). Shards' manifests
# and model dirs record it; stored pixels of another version are recomputed from the image.
# Bump it whenever a change here can change a single output pixel.
PREPROCESS_VERSION = 2

# Formats stored as they are; anything else Pillow reads is re-encoded to PNG.
STORED_FORMATS = {"PNG", "JPEG"}
MODEL_SIZE = 28
DIGIT_BOX = 20  # MNIST fits each digit in 20x20 and centres its mass in 28x28
# Decompression-bomb limit, below Pillow's own warning (89 MP): a 600 dpi A4 scan is 35 MP.
MAX_PIXELS = 80_000_000
# Larger pictures are decoded (JPEG: DCT scaling) or box-reduced to about this shorter side:
# a digit filling a tenth of a photo still keeps ~50 px, and the normalisation stays fast.
DECODE_SIDE = 512
# Ink must stand out of the paper by this much (of 255) to count: paper noise, JPEG artefacts
# and uneven light stay below it, the faintest pencil scans tried are above 40.
BLANK_CONTRAST = 24.0
# 28x28 pictures whose paper is at most this dark grey are MNIST-like already (MNIST: 0).
MNIST_PAPER = 8.0
_MAGIC = ((b"\x89PNG", "PNG"), (b"\xff\xd8", "JPEG"), (b"GIF8", "GIF"), (b"II*\x00", "TIFF"),
          (b"MM\x00*", "TIFF"), (b"BM", "BMP"), (b"RIFF", "WEBP"))


class ImageError(ValueError):
    """An image that cannot become model input; the message says why, in words."""


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
    """Decode PNG/JPEG/... bytes to a uint8 grayscale array (H, W) (our own 8-bit shards)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("L"))


def decode_gray_batch(images: list[bytes] | np.ndarray) -> np.ndarray:
    """Decode equally sized images to a uint8 array (N, H, W)."""
    return np.stack([decode_gray(b) for b in images]) if len(images) else np.zeros((0, 28, 28), np.uint8)


# --- decoding pictures as they come ----------------------------------------------------------

def _kind(data: bytes) -> str:
    return next((name for magic, name in _MAGIC if data.startswith(magic)), "image")


def _head(data: bytes) -> str:
    """The first bytes of a file, readable: text as text, anything else in hex."""
    head = data[:10]
    if all(32 <= b < 127 for b in head):
        return repr(head.decode("ascii"))
    return "bytes " + head.hex(" ")


def _words(e: BaseException) -> str:
    """Pillow's message without object reprs (``<_io.BytesIO object at 0x...>``)."""
    return re.sub(r"\s*<[^>]* at 0x[0-9a-f]+>", "", str(e).splitlines()[0] if str(e) else type(e).__name__)


def _broken(kind: str, e: BaseException) -> str:
    text = _words(e)
    if isinstance(e, EOFError) or re.search(r"truncat|not enough data|unexpected end|premature", text, re.I):
        return f"truncated {kind}"
    return f"corrupt {kind} ({text})"


def _too_large(width: int, height: int) -> str:
    return (f"image too large: {width}x{height} is {width * height / 1e6:.0f} megapixels, the limit is "
            f"{MAX_PIXELS / 1e6:.0f} (a decompression-bomb guard): scale it down first")


def open_image(data: bytes | None) -> tuple[Image.Image, str]:
    """Bytes -> (a loaded, upright Pillow image (its first frame), its format), or an ImageError
    saying what is wrong."""
    if data is None:
        raise ImageError("no image bytes")
    if len(data) == 0:
        raise ImageError("empty file (0 bytes)")
    kind = _kind(data)
    try:
        with warnings.catch_warnings():  # the size is checked below, with a sentence
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        if kind != "image":  # a known signature that Pillow cannot parse: cut short or damaged
            raise ImageError(f"truncated {kind}" if len(data) < 64 else f"corrupt {kind}") from None
        raise ImageError(f"not an image (starts with {_head(data)})") from None
    except Image.DecompressionBombError:
        raise ImageError(f"image too large: over {MAX_PIXELS / 1e6:.0f} megapixels (a decompression-bomb "
                         "guard): scale it down first") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(_broken(kind, e)) from None
    kind = image.format or kind
    if image.width * image.height > MAX_PIXELS:
        raise ImageError(_too_large(image.width, image.height))
    if kind == "JPEG":  # DCT scaling: a 12 MP photo decodes at 1/4 or 1/8 of the work
        image.draft("L" if image.mode in ("L", "RGB") else None, (DECODE_SIDE, DECODE_SIDE))
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(_broken(kind, e)) from None
    try:
        # Phones store pictures sideways and say so in EXIF: a person sees the turned picture.
        image = ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, KeyError, TypeError):
        pass  # a damaged EXIF block: the pixels are still the picture as stored
    return image, kind


def to_gray(image: Image.Image) -> np.ndarray:
    """A Pillow image of any mode -> uint8 grayscale (H, W), as it looks to a person."""
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16-bit (and 32-bit) grey is scaled to 8 bits, not clipped: clipping turns a 16-bit
        # scan into a white page with a few dark dots.
        arr = np.asarray(image).astype(np.float64)
        top = arr.max(initial=0.0)
        if mode == "F" and top <= 1.0:
            arr = arr * 255.0
        elif not (mode in ("I", "F") and top <= 255):
            arr = arr / (65535.0 / 255.0) if top <= 65535 else arr * (255.0 / top)
        return np.clip(np.round(arr), 0, 255).astype(np.uint8)
    if "A" in image.getbands() or mode == "PA" or (mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA"), np.float32)
        alpha = rgba[..., 3] / 255.0
        lum = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)
        drawn = alpha > 0.5
        # Transparent pixels are paper, of the shade opposite to what is drawn: dark ink on a
        # transparent canvas lands on white, white ink on black (on white it would vanish).
        paper = 0.0 if drawn.any() and lum[drawn].mean() > 127 else 255.0
        return np.clip(np.round(lum * alpha + paper * (1.0 - alpha)), 0, 255).astype(np.uint8)
    return np.asarray(image.convert("L"))


def decode_for_model(data: bytes) -> np.ndarray:
    """Image bytes -> uint8 grayscale (H, W): EXIF orientation applied, 16-bit scaled, alpha on
    paper, the first frame of an animation, large pictures reduced to about DECODE_SIDE."""
    image, _ = open_image(data)
    with image:
        gray = to_gray(image)
    factor = min(gray.shape) // DECODE_SIDE
    if factor >= 2:  # box filter: thin strokes fade instead of disappearing between samples
        gray = np.asarray(Image.fromarray(gray).reduce(factor))
    return gray


# --- the MNIST-style normalisation -------------------------------------------------------------

def otsu_threshold(img: np.ndarray) -> float:
    """The grey level that best separates two classes of pixels (Otsu 1979), on 256 bins."""
    hist = np.bincount(np.clip(img, 0, 255).astype(np.uint8).ravel(), minlength=256).astype(np.float64)
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * levels)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(np.argmax(between[:-1])) + 0.5  # the class boundary lies between two levels


def _paper(img: np.ndarray) -> np.ndarray:
    """A mask of the paper class: the Otsu class that ``ink_is_dark`` says is not ink."""
    threshold = otsu_threshold(img)
    bright = img > threshold
    return bright if ink_is_dark(img, threshold) else ~bright


def _spread(values: np.ndarray) -> float:
    return float(np.median(np.abs(values - np.median(values)))) if values.size else 0.0


def flatten_light(img: np.ndarray, rounds: int = 3) -> np.ndarray:
    """``img`` (float32) without its uneven light: a quadratic surface fitted to the paper.

    Each round fits the surface to the paper class only (so ink never pulls it) and is kept
    only if it halves the paper's spread (its median absolute deviation): a gradient is
    removed, an evenly lit scan or a tight crop (paper at one level already) is left as it
    is. Even when the first split is wrong (the bright half of an unevenly lit page taken for
    ink), the fit on the other half extrapolates the gradient and the next split is right.
    """
    h, w = img.shape
    if min(h, w) < 16:  # a few pixels of paper between the strokes: nothing to fit a light to
        return img
    step = max(1, max(h, w) // 64)  # a 64x64 grid of samples fits a quadratic well enough

    def basis(y, x):
        y, x = 2.0 * y / max(h - 1, 1) - 1.0, 2.0 * x / max(w - 1, 1) - 1.0
        return np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=-1)

    ys, xs = np.mgrid[0:h:step, 0:w:step]
    a = basis(ys.ravel().astype(np.float64), xs.ravel().astype(np.float64))
    sample = img[::step, ::step].ravel().astype(np.float64)
    flat = img
    for _ in range(rounds):
        paper = _paper(flat)
        spread = _spread(flat[paper])
        fit = paper[::step, ::step].ravel()
        if fit.sum() < 12 or spread < 2.0:
            break
        c = np.linalg.lstsq(a[fit], sample[fit], rcond=None)[0]
        y, x = (np.linspace(-1.0, 1.0, h)[:, None], np.linspace(-1.0, 1.0, w)[None, :])
        surface = c[0] + c[1] * x + c[2] * y + c[3] * x * x + c[4] * x * y + c[5] * y * y
        candidate = np.clip(img - surface + surface.mean(), 0, 255).astype(np.float32)
        if _spread(candidate[_paper(candidate)]) > 0.5 * spread:
            break
        flat = candidate
    return flat


def _frame(mask: np.ndarray) -> np.ndarray:
    return np.concatenate([mask[0], mask[-1], mask[1:-1, 0], mask[1:-1, -1]])


def ink_is_dark(img: np.ndarray, threshold: float) -> bool:
    """Whether the ink is darker than the paper.

    Ink is the minority of the two Otsu classes, in the whole picture and on its frame together:
    a photo's paper fills most of both, and a digit cropped right to its strokes still does not
    (the mean of the two ink shares is under 0.5 for 99.9 % of the MNIST training digits cut to
    their bounding box; a tight "1" is mostly ink, but its frame is not). The border alone (its
    median, as before) fails as soon as ink touches the frame; the picture alone, for a large
    digit on a small page.
    """
    bright = img > threshold
    return (bright.mean() + _frame(bright).mean()) / 2 > 0.5


def mnist_like(gray: np.ndarray) -> np.ndarray:
    """A grayscale picture of one digit -> 28x28 uint8 the way MNIST digits look: white on black,
    the digit cropped, fit in a 20x20 box (aspect kept) and centred by its centre of mass.

    28x28 input on black paper (after the polarity check) is taken as already MNIST-like, so
    MNIST and Fashion-MNIST images pass through unchanged. Raises ImageError for a picture without ink.
    """
    from scipy import ndimage

    img = gray.astype(np.float32)
    if img.shape == (MODEL_SIZE, MODEL_SIZE):
        threshold = otsu_threshold(img)
        if ink_is_dark(img, threshold):
            img, threshold = 255.0 - img, 255.0 - threshold
        paper = img[img <= threshold]
        if not paper.size or np.median(paper) <= MNIST_PAPER:
            return np.clip(img, 0, 255).astype(np.uint8)
        img = gray.astype(np.float32)  # 28x28 but on grey paper (a small print, a crop): normalised
    img = flatten_light(img)
    threshold = otsu_threshold(img)
    if ink_is_dark(img, threshold):
        img, threshold = 255.0 - img, 255.0 - threshold
    # The paper's level from the paper class itself (median + 3 robust sigmas: noise, grain and
    # a lighting gradient go to 0), not from the border, where touching ink would raise it.
    paper = img[img <= threshold]
    if paper.size:
        median = float(np.median(paper))
        level = min(threshold, median + 3 * 1.4826 * float(np.median(np.abs(paper - median))))
    else:
        level = float(img.min())
    ink = np.clip(img - level, 0, None)
    strong = ink[img > threshold]
    peak = float(np.percentile(strong, 99)) if strong.size else 0.0  # dust and hot pixels aside
    if peak < BLANK_CONTRAST:
        raise ImageError("blank: no ink found")
    # The digit is the connected strokes above a quarter of the ink's peak; specks under a tenth
    # of the largest stroke (dust, noise, a dot of JPEG ringing) do not widen the crop.
    mask = ink > 0.25 * peak
    labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        small = np.flatnonzero(sizes < 0.1 * sizes.max()) + 1
        ink[np.isin(labels, small)] = 0.0
        mask &= ~np.isin(labels, small)
    ys, xs = np.nonzero(mask)
    crop = np.clip(ink[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1] * (255.0 / peak), 0, 255)
    h, w = crop.shape
    scale = DIGIT_BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    # Lanczos when shrinking (no aliasing), bilinear when enlarging a low-resolution scan
    # (Lanczos rings around the blocky strokes of an 8x8 digit).
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.BILINEAR
    digit = np.asarray(Image.fromarray(crop.astype(np.uint8)).resize(size, resample), dtype=np.float32)
    total = digit.sum()
    cy, cx = ((np.arange(digit.shape[0]) @ digit.sum(1)) / total, (np.arange(digit.shape[1]) @ digit.sum(0)) / total) \
        if total > 0 else (digit.shape[0] / 2, digit.shape[1] / 2)
    top = int(np.clip(round(MODEL_SIZE / 2 - cy), 0, MODEL_SIZE - digit.shape[0]))
    left = int(np.clip(round(MODEL_SIZE / 2 - cx), 0, MODEL_SIZE - digit.shape[1]))
    out = np.zeros((MODEL_SIZE, MODEL_SIZE), np.float32)
    out[top: top + digit.shape[0], left: left + digit.shape[1]] = digit
    return np.clip(out, 0, 255).astype(np.uint8)


def describe_error(e: BaseException) -> str:
    """An error row's text: what is wrong with the image, in words (never an object's repr)."""
    return str(e) if isinstance(e, ImageError) else f"unreadable image ({_words(e)})"


def prepare_pixels(images: list[bytes]) -> tuple[np.ndarray, list[str | None]]:
    """Encoded images -> MNIST-like uint8 (N, 28, 28) and one error (or None) per image.

    A row that cannot be decoded gets zeros and its error: the batch goes on. This is the one
    definition of "the pixels the model sees": prepare stores it in the shards, inference
    recomputes it for images stored without it (or with another PREPROCESS_VERSION).
    """
    pixels = np.zeros((len(images), MODEL_SIZE, MODEL_SIZE), dtype=np.uint8)
    errors: list[str | None] = [None] * len(images)
    for i, data in enumerate(images):
        try:
            pixels[i] = mnist_like(decode_for_model(data))
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
            errors[i] = describe_error(e)
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

    PNG and JPEG are kept byte for byte (no quality loss; JPEG keeps its EXIF orientation);
    other formats (BMP, TIFF, WebP, GIF...) become PNG, upright and with 16-bit grey kept, so
    every reader only needs to handle two formats.
    """
    try:
        image, kind = open_image(data)
        with image:
            if kind in STORED_FORMATS:
                return data, None
            if image.mode in ("I", "F"):
                image = Image.fromarray(to_gray(image))
            elif image.mode not in ("L", "RGB", "RGBA", "LA", "I;16"):
                image = image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info
                                      else "RGB")
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            return buf.getvalue(), None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        return None, describe_error(e)
