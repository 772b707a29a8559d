"""mnist-ray predict: a few files, the class and ten percentages each."""

import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from mnist_ray import datasets, preprocess
from mnist_ray.errors import MnistRayError
from mnist_ray.predict import PredictConfig, run

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def files(tmp_path_factory, mnist_test_arrays):
    images, labels = mnist_test_arrays
    d = tmp_path_factory.mktemp("predict")
    (d / "digit.png").write_bytes(preprocess.encode_png(images[:1])[0])
    (d / "photo.jpg").write_bytes(datasets.render_photo(images[1], np.random.default_rng(zlib.crc32(b"x"))))
    (d / "broken.png").write_bytes(b"\x89PNG nothing")
    return d, [int(labels[0]), int(labels[1])]


def test_predict_prints_class_and_percentages_and_saves_what_the_model_saw(trained_model, files, capsys):
    model_dir, _ = trained_model
    d, labels = files
    out = run(PredictConfig(images=(str(d / "digit.png"), str(d / "photo.jpg"), str(d / "broken.png")),
                            model=model_dir, save_preprocessed=str(d / "seen")))
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and "error:" in printed[2]
    first, second, broken = out["results"]
    assert first["prediction"] == str(labels[0]) and second["prediction"] == str(labels[1])
    assert abs(sum(first["percentages"].values()) - 100) < 0.1 and len(first["percentages"]) == 10
    assert "error" in broken
    seen = Image.open(second["preprocessed"])
    assert seen.size == (28, 28) and np.asarray(seen).mean() < 80  # white digit on black, like MNIST


def test_predict_bad_input(trained_model, tmp_path):
    model_dir, _ = trained_model
    with pytest.raises(MnistRayError, match="no such file"):
        run(PredictConfig(images=(str(tmp_path / "nope.png"),), model=model_dir))
    proc = subprocess.run([sys.executable, "-m", "mnist_ray.cli", "predict", "--model", model_dir],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "IMAGE" in proc.stderr  # the files are required
