"""mnist-ray predict: a few files, the class and ten percentages each."""

import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from mnist_ray.images import preprocess
from mnist_ray.inputs import datasets
from mnist_ray.errors import MnistRayError
from mnist_ray.inference.predict import PredictConfig, run

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
    # --runtime auto, as infer resolves it: tf here (agreement on fewer than 5,000 images).
    assert out["runtime"] == "tf" and "fewer than 5,000" in out["runtime_reason"]
    seen = Image.open(second["preprocessed"])
    assert seen.size == (28, 28) and np.asarray(seen).mean() < 80  # white digit on black, like MNIST


def test_predict_bad_input(trained_model, tmp_path):
    model_dir, _ = trained_model
    with pytest.raises(MnistRayError, match="no such file"):
        run(PredictConfig(images=(str(tmp_path / "nope.png"),), model=model_dir))
    proc = subprocess.run([sys.executable, "-m", "mnist_ray.cli", "predict", "--model", model_dir],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "IMAGE" in proc.stderr  # the files are required


def test_predict_runtime_auto_gives_infers_choice(trained_model, files, tmp_path):
    """The same resolver as infer: a model dir whose int8 model agrees gets the int8 runtime,
    with the same top class as the float model for a clean digit."""
    import json
    import shutil

    model_dir, _ = trained_model
    d, labels = files
    agreeing = tmp_path / "agreeing"
    shutil.copytree(model_dir, agreeing)
    metadata = json.loads((agreeing / "metadata.json").read_text())
    metadata["agreement"].update(images=5000, top1={**metadata["agreement"]["top1"], "tflite-int8": 0.999})
    (agreeing / "metadata.json").write_text(json.dumps(metadata))
    out = run(PredictConfig(images=(str(d / "digit.png"),), model=str(agreeing)))
    assert out["runtime"] == "tflite-int8" and out["results"][0]["prediction"] == str(labels[0])
    with pytest.raises(MnistRayError, match="unknown runtime"):
        run(PredictConfig(images=(str(d / "digit.png"),), model=model_dir, runtime="onnx"))
