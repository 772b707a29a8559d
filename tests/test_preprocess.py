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


def _photo_of(digit: np.ndarray, seed: int = 0) -> bytes:
    """A digit as a user would photograph it: dark ink on light, shaded, noisy paper, in colour,
    large, off centre, JPEG."""
    rng = np.random.default_rng(seed)
    ink = Image.fromarray(255 - digit).resize((160, 160), Image.Resampling.BICUBIC)
    page = np.full((300, 240), 225, np.float32) + np.linspace(-20, 20, 240)[None, :]  # uneven light
    page[60:220, 30:190] = np.minimum(page[60:220, 30:190], np.asarray(ink, np.float32) * 0.85 + 20)
    page += rng.normal(0, 6, page.shape)
    rgb = np.stack([page, page * 0.97, page * 0.9], axis=-1).clip(0, 255).astype(np.uint8)
    return _encode(Image.fromarray(rgb), "JPEG")


def test_a_photo_of_a_digit_becomes_an_mnist_like_digit(mnist_test_arrays):
    images, _ = mnist_test_arrays
    for i in range(5):
        out = preprocess.mnist_like(preprocess.decode_for_model(_photo_of(images[i], seed=i)))
        assert out.shape == (28, 28) and out.dtype == np.uint8
        assert out.mean() < 60 and out.max() > 200  # white digit on a black background
        ys, xs = np.nonzero(out > 64)
        assert ys.max() - ys.min() <= 20 and xs.max() - xs.min() <= 20  # fit in the 20x20 box
        mass = out.astype(float) / out.sum()
        com = (mass.sum(1) @ np.arange(28), mass.sum(0) @ np.arange(28))
        assert abs(com[0] - 14) < 1.5 and abs(com[1] - 14) < 1.5  # centred by its mass, as MNIST
        corr = np.corrcoef(out.ravel().astype(float), images[i].ravel().astype(float))[0, 1]
        assert corr > 0.75, f"digit {i}: correlation with the original {corr:.2f}"


def test_mnist_images_pass_through_unchanged(mnist_test_arrays):
    images, _ = mnist_test_arrays
    pixels, errors = preprocess.prepare_batch(preprocess.encode_png(images[:20]))
    assert errors == [None] * 20
    np.testing.assert_array_equal(pixels, preprocess.normalize(images[:20]))


def test_prepare_batch_gives_errors_not_exceptions():
    blank = _encode(Image.fromarray(np.full((50, 50), 240, np.uint8)), "PNG")
    good = _encode(Image.fromarray(np.zeros((28, 28), np.uint8)), "PNG")
    pixels, errors = preprocess.prepare_batch([good, b"garbage", blank, None])
    assert errors[0] is None and all(errors[1:]) and "blank" in errors[2]
    assert pixels.shape == (4, 28, 28, 1) and not pixels[1:].any()
