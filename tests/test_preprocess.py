import io

import numpy as np
from PIL import Image

from mnist_ray import preprocess


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_png_round_trip_is_pixel_exact():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    encoded = preprocess.encode_png(images)
    assert all(b.startswith(b"\x89PNG") for b in encoded)
    np.testing.assert_array_equal(preprocess.decode_gray_batch(encoded), images)


def test_encode_png_rejects_wrong_dtype():
    import pytest

    with pytest.raises(ValueError, match="uint8"):
        preprocess.encode_png(np.zeros((1, 28, 28), np.float32))


def test_png_and_jpeg_are_stored_byte_for_byte():
    rgb = Image.fromarray(np.full((40, 30, 3), 200, np.uint8))
    for fmt in ("PNG", "JPEG"):
        data = _encode(rgb, fmt)
        stored, error = preprocess.normalize_stored_image(data)
        assert error is None and stored == data


def test_other_formats_become_png():
    data = _encode(Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)), "BMP")
    stored, error = preprocess.normalize_stored_image(data)
    assert error is None and stored.startswith(b"\x89PNG")
    np.testing.assert_array_equal(preprocess.decode_gray(stored), np.arange(64).reshape(8, 8))


def test_corrupt_and_truncated_images_give_an_error():
    png = _encode(Image.fromarray(np.zeros((64, 64), np.uint8)), "PNG")
    jpeg = _encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")
    for bad in (b"not an image at all", png[: len(png) // 2], jpeg[:200], b""):
        stored, error = preprocess.normalize_stored_image(bad)
        assert stored is None and error
