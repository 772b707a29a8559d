import numpy as np
import pytest

from mnist_ray import preprocess, robustness
from mnist_ray.errors import MnistRayError


def test_the_sets_are_what_they_say():
    cfg = robustness.RobustnessConfig(photos=30, printed_per_digit=2)
    mnist, labels = robustness.load_set("mnist", cfg)
    assert len(mnist) == 10_000 and np.bincount(labels).min() > 800
    uci, labels = robustness.load_set("uci", cfg)
    assert len(uci) == 1_797 and np.bincount(labels).tolist()[:2] == [178, 182]
    printed, labels = robustness.load_set("printed", cfg)
    assert len(printed) == 2 * 10 * len(robustness.synthetic.MEASURE_FONTS)
    photos, labels = robustness.load_set("photos", cfg)
    assert len(photos) == 30 and labels.tolist() == robustness.mnist_test_arrays()[1][:30].tolist()


@pytest.mark.parametrize("name", ["uci", "printed", "photos"])
def test_no_digit_of_a_measurement_set_is_rejected(name):
    encoded, _ = robustness.load_set(name, robustness.RobustnessConfig(photos=200, printed_per_digit=4))
    _, errors = preprocess.prepare_pixels(encoded)
    assert [e for e in errors if e] == []


def test_photos_are_stored_sideways_and_decoded_upright():
    from PIL import Image
    import io

    digit = robustness.mnist_test_arrays()[0][0]
    orientations = set()
    for seed in range(12):
        data = robustness.photo_of(digit, np.random.default_rng(seed))
        orientations.add(Image.open(io.BytesIO(data)).getexif().get(0x0112))
        out = preprocess.mnist_like(preprocess.decode_for_model(data))
        corr = np.corrcoef(out.ravel().astype(float), digit.ravel().astype(float))[0, 1]
        assert corr > 0.6, seed
    assert len(orientations) > 2


def test_score_counts_error_rows_as_wrong_and_names_them():
    encoded = preprocess.encode_png(robustness.mnist_test_arrays()[0][:9]) + [b"", b"not an image"]
    labels = np.array([0] * 5 + [1] * 6)
    always_zero = lambda x: np.tile(np.eye(10, dtype=np.float32)[0], (len(x), 1))  # noqa: E731
    r = robustness.score(always_zero, encoded, labels)
    assert r["rows"] == 11 and r["accuracy"] == round(5 / 11, 4) and r["error_rows"] == 2
    assert r["blank_rows"] == 0 and r["errors"] == ["empty file (0 bytes)", "not an image (starts with 'not an ima')"]
    assert r["most_read_as"] == {"0": 4}
    assert robustness.format_row("x", r) == "| x | 11 | 45.45 % | 2 | 0 | 0 (4) |"


def test_bad_sets_are_refused():
    with pytest.raises(MnistRayError, match="--sets"):
        robustness.RobustnessConfig(sets="mnist,imagenet").validate()
