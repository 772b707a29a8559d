import io

import numpy as np
import pytest
from PIL import Image

from mnist_ray.images import preprocess


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
    images, _ = mnist_test_arrays  # all 10,000: the pixels the model was trained on, bit for bit
    pixels, errors = preprocess.prepare_pixels(preprocess.encode_png(images))
    assert errors == [None] * len(images)
    np.testing.assert_array_equal(pixels, images)


def test_prepare_batch_gives_errors_not_exceptions():
    blank = _encode(Image.fromarray(np.full((50, 50), 240, np.uint8)), "PNG")
    good = _encode(Image.fromarray(np.zeros((28, 28), np.uint8)), "PNG")
    pixels, errors = preprocess.prepare_batch([good, b"garbage", blank, None])
    assert errors == [None, "not an image (starts with 'garbage')", "blank: no ink found", "no image bytes"]
    assert pixels.shape == (4, 28, 28, 1) and not pixels[1:].any()


# --- pictures as they come: every kind of file made here, each with its pixels or its error ------

def _page(digit: np.ndarray, side: int = 96, dark_ink: bool = True) -> np.ndarray:
    """A 28x28 MNIST digit enlarged onto a page: uint8 (side, side)."""
    ink = np.asarray(Image.fromarray(digit).resize((side * 2 // 3, side * 2 // 3), Image.Resampling.BICUBIC))
    page = np.zeros((side, side), np.uint8)
    o = side // 6
    page[o:o + ink.shape[0], o:o + ink.shape[1]] = ink
    return 255 - page if dark_ink else page


def _same_digit(a: np.ndarray, b: np.ndarray, min_corr: float = 0.95) -> bool:
    """Whether two 28x28 digits look alike: correlated once blurred (a pixel's shift aside)."""
    from PIL import ImageFilter

    a, b = (np.asarray(Image.fromarray(x).filter(ImageFilter.GaussianBlur(1.5)), float).ravel() for x in (a, b))
    return np.corrcoef(a, b)[0, 1] > min_corr


# exif_transpose undoes orientation o; storing the upright picture turned by the inverse makes
# a file that a person sees upright.
_STORED = {1: None, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
           7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}


def test_exif_orientation_is_applied(mnist_test_arrays):
    images, _ = mnist_test_arrays
    upright = Image.fromarray(_page(images[0], side=90)).crop((0, 0, 90, 70))  # not square either
    for orientation, turn in _STORED.items():
        stored = upright if turn is None else upright.transpose(turn)
        exif = Image.Exif()
        exif[0x0112] = orientation
        for fmt in ("JPEG", "PNG"):
            buf = io.BytesIO()
            stored.save(buf, format=fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
            gray = preprocess.decode_for_model(buf.getvalue())
            assert gray.shape == (70, 90), (orientation, fmt)
            assert np.abs(gray.astype(int) - np.asarray(upright, int)).mean() < 3, (orientation, fmt)


def test_16_bit_grey_is_scaled_not_clipped(mnist_test_arrays):
    images, _ = mnist_test_arrays
    page8 = _page(images[0])
    page16 = page8.astype(np.uint16) * 257  # the same picture in 16 bits
    reference = preprocess.mnist_like(page8)
    for fmt in ("PNG", "TIFF"):
        data = _encode(Image.fromarray(page16), fmt)
        gray = preprocess.decode_for_model(data)
        np.testing.assert_array_equal(gray, page8)
        np.testing.assert_array_equal(preprocess.mnist_like(gray), reference)
        stored, error = preprocess.normalize_stored_image(data)  # prepare keeps the 16 bits
        assert error is None and Image.open(io.BytesIO(stored)).mode.startswith("I")
        np.testing.assert_array_equal(preprocess.decode_for_model(stored), page8)


def test_cmyk_palette_la_rgba_and_animation_decode_to_the_digit(mnist_test_arrays):
    images, _ = mnist_test_arrays
    page = _page(images[0])
    reference = preprocess.mnist_like(page)
    rgb = Image.fromarray(np.stack([page] * 3, -1))
    ink = 255 - page  # as alpha: ink opaque, paper transparent
    black = np.zeros_like(page)
    white = np.full_like(page, 255)
    palette = Image.fromarray(page).convert("P")  # a grey palette
    palette_t = Image.fromarray(page, "L").quantize(16)
    paper_index = int(np.asarray(palette_t)[0, 0])
    cases = {
        "CMYK JPEG": _encode(rgb.convert("CMYK"), "JPEG"),
        "palette PNG": _encode(palette, "PNG"),
        "palette with transparency (PNG)": _save(palette_t, "PNG", transparency=paper_index),
        "palette with transparency (GIF)": _save(palette_t, "GIF", transparency=paper_index),
        "LA PNG, dark ink on transparent": _encode(Image.fromarray(np.stack([black, ink], -1), "LA"), "PNG"),
        "RGBA PNG, white ink on transparent": _encode(
            Image.fromarray(np.stack([white, white, white, ink], -1), "RGBA"), "PNG"),
        "animated GIF (first frame)": _save(Image.fromarray(page), "GIF", save_all=True,
                                            append_images=[Image.fromarray(_page(images[1]))]),
        "BMP": _encode(Image.fromarray(page), "BMP"),
        "WebP": _save(rgb, "WEBP", lossless=True),
    }
    for kind, data in cases.items():
        out = preprocess.mnist_like(preprocess.decode_for_model(data))
        assert _same_digit(out, reference), kind
        stored, error = preprocess.normalize_stored_image(data)
        assert error is None, kind
        assert _same_digit(preprocess.mnist_like(preprocess.decode_for_model(stored)), reference), kind


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_large_scans_are_decoded_reduced():
    page = np.full((2400, 3000), 230, np.uint8)
    page[600:1800, 1200:1500] = 20  # a "1", 1,200 px tall
    for fmt in ("JPEG", "PNG"):
        gray = preprocess.decode_for_model(_encode(Image.fromarray(page), fmt))
        assert 512 <= min(gray.shape) < 1024 and gray.shape[1] / gray.shape[0] == pytest.approx(1.25, abs=0.01)
        out = preprocess.mnist_like(gray)
        ys, xs = np.nonzero(out > 128)
        assert ys.max() - ys.min() >= 18 and xs.max() - xs.min() <= 8  # still a tall thin stroke


def test_errors_are_worded():
    png = _encode(Image.fromarray(_page(np.eye(28, dtype=np.uint8) * 255)), "PNG")
    jpeg = _encode(Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")
    huge = _save(Image.new("1", (10_000, 8_100)), "PNG")  # 81 MP, a few kB
    corrupt = bytearray(png)
    corrupt[40:60] = b"x" * 20  # inside the first IDAT chunk: the CRC no longer matches
    cases = {
        b"": "empty file (0 bytes)",
        b"not an image at all": "not an image (starts with 'not an ima')",
        b"\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a": "not an image (starts with bytes 00 01 02 03 04 05 06 07 08 09)",
        png[: len(png) // 2]: "truncated PNG",
        png[:30]: "truncated PNG",
        jpeg[:400]: "truncated JPEG",
        bytes(corrupt): "corrupt PNG",
        huge: "image too large: 10000x8100 is 81 megapixels, the limit is 80",
        _encode(Image.fromarray(np.full((50, 50), 240, np.uint8)), "PNG"): "blank: no ink found",
        None: "no image bytes",
    }
    _, errors = preprocess.prepare_pixels(list(cases))
    for (data, expected), error in zip(cases.items(), errors):
        assert error is not None and error.startswith(expected), (expected, error)
        assert " at 0x" not in error and "<" not in error  # never an object's repr
    for data, expected in cases.items():
        if data is not None and not expected.startswith("blank"):
            stored, error = preprocess.normalize_stored_image(data)
            assert stored is None and error.startswith(expected), (expected, error)


# --- no legible digit is blank; a blank page is ------------------------------------------------

def _tight(digit: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(digit > 0)
    return digit[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1]


def test_legible_digits_are_never_blank(mnist_test_arrays):
    from PIL import ImageFilter, ImageFont

    images, _ = mnist_test_arrays
    font = ImageFont.truetype(str(_font("DejaVuSans-Bold.ttf")), 40)
    for i in range(30):
        digit = images[i]
        reference = preprocess.mnist_like(_page(digit))
        tight = _tight(digit)  # ink on all four sides of the frame
        thick = np.asarray(Image.fromarray(_page(digit, dark_ink=False)).filter(ImageFilter.MaxFilter(7)))
        variants = {"touching the frame": tight, "thick": thick}
        for side in (8, 12, 16, 24, 32):  # scanned SIDE px tall at low resolution, ink to the edges, 17 grey levels
            width = max(2, round(side * tight.shape[1] / tight.shape[0]))
            low = np.asarray(Image.fromarray(tight).resize((width, side), Image.Resampling.BOX))
            variants[f"{side}x{side}"] = (np.round(low / 255 * 16) * (255 / 16)).astype(np.uint8)
            variants[f"{side}x{side} upscaled"] = np.asarray(
                Image.fromarray(variants[f"{side}x{side}"]).resize((width * 64 // side, 64), Image.Resampling.BILINEAR))
        for kind, gray in variants.items():
            for polarity, picture in (("light on dark", gray), ("dark on light", 255 - gray)):
                out = preprocess.mnist_like(picture)  # raises if it were taken for blank
                assert out.max() > 200 and out.mean() < 100, (i, kind, polarity)
                if kind in ("touching the frame", "32x32", "32x32 upscaled"):
                    assert _same_digit(out, reference, 0.8), (i, kind, polarity)
    for ch in "0123456789":  # printed digits, in both polarities
        canvas = Image.new("L", (48, 56), 255)
        from PIL import ImageDraw

        ImageDraw.Draw(canvas).text((8, 2), ch, fill=0, font=font)
        for picture in (np.asarray(canvas), 255 - np.asarray(canvas)):
            out = preprocess.mnist_like(picture)
            assert out.max() == 255 and 5 < out.mean() < 100, ch


def _font(name: str):
    import matplotlib

    from pathlib import Path

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name


def test_a_blank_page_is_blank():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:300, 0:240]
    pages = {
        "white": np.full((300, 240), 255.0),
        "noisy grey": 200 + rng.normal(0, 8, (300, 240)),
        "unevenly lit": 170 + 60 * xx / 240 + 20 * yy / 300 + rng.normal(0, 4, (300, 240)),
        "black": np.zeros((64, 64)),
    }
    for kind, page in pages.items():
        data = _encode(Image.fromarray(np.clip(page, 0, 255).astype(np.uint8)), "JPEG")
        with pytest.raises(preprocess.ImageError, match="^blank: no ink found$"):
            preprocess.mnist_like(preprocess.decode_for_model(data))


def test_otsu_threshold_separates_two_levels():
    img = np.array([[10] * 50 + [200] * 30], np.float32)
    assert 10 < preprocess.otsu_threshold(img) < 200


def test_stored_pixels_are_used_only_with_the_models_preprocessing_version():
    from mnist_ray.formats import shards

    now = {"schema_version": 2, "preprocess_version": preprocess.PREPROCESS_VERSION}
    model = {"preprocessing": {"version": preprocess.PREPROCESS_VERSION}}
    assert shards.pixels_usable(now, model)
    assert not shards.pixels_usable({"schema_version": 2}, model)  # made before versions: v1
    assert not shards.pixels_usable({"schema_version": 1}, model)  # no pixels at all
    assert shards.pixels_usable({"schema_version": 2}, {"preprocessing": {}})  # both v1
    assert not shards.pixels_usable(now, {"preprocessing": {}})
    manifest = shards.build_manifest("r", "test", {"rows": 0, "splits": {}, "files": [], "rejected": [],
                                                   "pixels_missing": 0, "fingerprint": "f"})
    from mnist_ray.model import export

    assert manifest["preprocess_version"] == export.PREPROCESSING["version"] == preprocess.PREPROCESS_VERSION
