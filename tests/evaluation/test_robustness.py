import json

import numpy as np
import pytest

from mnist_ray.evaluation import robustness
from mnist_ray.images import measured_photos, preprocess
from mnist_ray.errors import MnistRayError


def test_the_sets_are_what_they_say():
    cfg = robustness.RobustnessConfig(photos=30, printed_per_digit=2)
    mnist, labels, faces = robustness.load_set("mnist", cfg)
    assert faces is None
    assert len(mnist) == 10_000 and np.bincount(labels).min() > 800
    uci, labels, _ = robustness.load_set("uci", cfg)
    assert len(uci) == 1_797 and np.bincount(labels).tolist()[:2] == [178, 182]
    printed, labels, faces = robustness.load_set("printed", cfg)
    assert len(printed) == 2 * 10 * len(robustness.synthetic.MEASURE_FONTS)
    assert sorted(set(faces)) == sorted(robustness.synthetic.MEASURE_FONTS) and faces[:20] == ["cmr10.ttf"] * 20
    photos, labels, _ = robustness.load_set("photos", cfg)
    assert len(photos) == 30 and labels.tolist() == robustness.mnist_test_arrays()[1][:30].tolist()


@pytest.mark.parametrize("name", ["uci", "printed", "photos"])
def test_no_digit_of_a_measurement_set_is_rejected(name):
    encoded, _, _ = robustness.load_set(name, robustness.RobustnessConfig(photos=200, printed_per_digit=4))
    _, errors = preprocess.prepare_pixels(encoded)
    assert [e for e in errors if e] == []


def test_photos_are_stored_sideways_and_decoded_upright():
    from PIL import Image
    import io

    digit = robustness.mnist_test_arrays()[0][0]
    orientations = set()
    for seed in range(12):
        data = measured_photos.phone_photo(digit, np.random.default_rng(seed))
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


@pytest.fixture
def font_dir(tmp_path):
    """Real font files as a user's font folder holds them: unseen faces, a copy of one in a
    subfolder, training's faces, a font without digits, and a file that is not a font."""
    import os
    import shutil

    import matplotlib

    ttf = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    for name in ("cmr10.ttf", "cmtt10.ttf", "DejaVuSans.ttf", "DejaVuSansDisplay.ttf", "STIXGeneral.ttf"):
        shutil.copy(os.path.join(ttf, name), tmp_path / name)
    (tmp_path / "sub").mkdir()
    shutil.copy(os.path.join(ttf, "cmr10.ttf"), tmp_path / "sub" / "cmr10-copy.ttf")
    (tmp_path / "broken.ttf").write_text("not a font")
    (tmp_path / "notes.txt").write_text("fonts for the report")
    return tmp_path


def test_fonts_measures_unseen_faces_and_leaves_out_training_families(font_dir):
    keep, left_out = robustness.measure_fonts(str(font_dir))
    assert keep == [str(font_dir / "cmr10.ttf"), str(font_dir / "cmtt10.ttf")]
    assert left_out == {"a family training renders": [str(font_dir / n) for n in ("DejaVuSans.ttf", "STIXGeneral.ttf")],
                        "no digits (a symbol or script font)": [str(font_dir / "DejaVuSansDisplay.ttf")],
                        "not a font fontTools can read": [str(font_dir / "broken.ttf")],
                        "the same face as another file": [str(font_dir / "sub" / "cmr10-copy.ttf")]}
    # files and folders mix, comma-separated
    assert robustness.measure_fonts(f"{font_dir / 'cmtt10.ttf'}, {font_dir / 'sub'}")[0] == [
        str(font_dir / "cmtt10.ttf"), str(font_dir / "sub" / "cmr10-copy.ttf")]
    with pytest.raises(MnistRayError, match="no such file or directory"):
        robustness.measure_fonts(str(font_dir / "missing"))
    with pytest.raises(MnistRayError, match=r"no font to measure on \(1 a family training renders\)"):
        robustness.measure_fonts(str(font_dir / "DejaVuSans.ttf"))
    with pytest.raises(MnistRayError, match="add printed to --sets"):
        robustness.RobustnessConfig(sets="mnist", fonts=str(font_dir)).validate()


def test_accuracy_by_face_worst_first():
    wrong = np.array([0, 1, 0, 0, 0, 0, 1, 1], bool)
    faces = ["a.ttf", "a.ttf", "b.ttf", "b.ttf", "c.ttf", "c.ttf", "d.ttf", "d.ttf"]
    accuracy = robustness.by_face(wrong, faces)
    assert list(accuracy.items()) == [("d.ttf", 0.0), ("a.ttf", 0.5), ("b.ttf", 1.0), ("c.ttf", 1.0)]
    assert robustness.format_faces(accuracy, shown=2) == (
        "printed, by face (worst first): d.ttf 0.0 %, a.ttf 50.0 %; 2 more, 100.0-100.0 %")


def test_robustness_on_the_users_fonts_reports_every_face(trained_model, font_dir, tmp_path, caplog):
    model_dir, _ = trained_model
    caplog.set_level("INFO", logger="mnist_ray")
    report = robustness.run(robustness.RobustnessConfig(model=model_dir, sets="printed", printed_per_digit=3,
                                                       fonts=str(font_dir), output=str(tmp_path / "r.json")))
    printed = report["sets"]["printed"]
    assert printed["rows"] == 2 * 3 * 10 and printed["error_rows"] == 0
    assert sorted(printed["by_face"]) == ["cmr10.ttf", "cmtt10.ttf"]
    assert report["fonts"] == {"measured": 2, "left_out": {"a family training renders": 2,
                                                           "no digits (a symbol or script font)": 1,
                                                           "not a font fontTools can read": 1,
                                                           "the same face as another file": 1}}
    saved = json.loads((tmp_path / "r.json").read_text())  # the file names every font file
    assert saved["fonts"]["measured"] == [str(font_dir / "cmr10.ttf"), str(font_dir / "cmtt10.ttf")]
    assert saved["fonts"]["left_out"]["not a font fontTools can read"] == [str(font_dir / "broken.ttf")]
    out = caplog.text  # mnist-ray's log records: what the console shows
    assert "printed: 2 faces from --fonts; 2 left out: a family training renders" in out
    assert "| printed | 60 |" in out
    assert "printed, by face (worst first): cmr10.ttf" in out or "printed, by face (worst first): cmtt10.ttf" in out


def test_the_printed_report_names_the_worst_faces_and_counts_the_files():
    report = {"sets": {"printed": {"rows": 120, "by_face": {f"f{i}.ttf": i / 12 for i in range(12)}}},
              "fonts": {"measured": [f"/x/f{i}.ttf" for i in range(12)], "left_out": {"no digits": ["/x/s.ttf"]}}}
    short = robustness.brief(report, faces=3)
    assert short["sets"]["printed"]["by_face"] == {"f0.ttf": 0.0, "f1.ttf": 1 / 12, "f2.ttf": 2 / 12}
    assert short["sets"]["printed"]["faces"] == 12 and short["fonts"] == {"measured": 12, "left_out": {"no digits": 1}}
    assert len(report["sets"]["printed"]["by_face"]) == 12  # the full report is left as it was


def test_faces_that_share_a_file_name_are_told_apart_by_path(font_dir):
    import shutil

    (font_dir / "other").mkdir()
    shutil.copy(font_dir / "cmtt10.ttf", font_dir / "other" / "cmr10.ttf")  # another face, the same name
    files = [str(font_dir / "cmr10.ttf"), str(font_dir / "other" / "cmr10.ttf"), str(font_dir / "cmtt10.ttf")]
    _, labels, faces = robustness.printed_set(1, files)
    assert sorted(set(faces)) == sorted([files[0], files[1], "cmtt10.ttf"]) and len(labels) == 30
