"""The model dir: complete only with _SUCCESS, versioned by its weights."""

import json
import shutil

import pytest

from mnist_ray import cluster, export
from mnist_ray.errors import MnistRayError

cluster.configure_process_env()
pytestmark = pytest.mark.e2e


def test_open_model_dir_reads_a_complete_dir(trained_model):
    model_dir, summary = trained_model
    local, metadata = export.open_model_dir(model_dir)
    assert local == model_dir and metadata["version"] == summary["version"]
    assert metadata["preprocessing"] == export.PREPROCESSING
    variants = json.load(open(f"{model_dir}/variants.json"))
    assert set(variants) == {"tf", "tflite-fp32", "tflite-fp16", "tflite-dynamic", "tflite-int8"}
    assert variants["tflite-int8"]["bytes"] < variants["tflite-fp32"]["bytes"] / 3
    assert all(v["images_per_s"] > 0 and 0 < v["val_accuracy"] <= 1 for v in variants.values())


def test_open_model_dir_refuses_incomplete_or_missing_dirs(trained_model, tmp_path):
    model_dir, _ = trained_model
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    (copy / "_SUCCESS").unlink()
    with pytest.raises(MnistRayError, match="not a complete model dir"):
        export.open_model_dir(str(copy))
    with pytest.raises(MnistRayError, match="no model dir"):
        export.open_model_dir(str(tmp_path / "missing"))


def test_the_version_changes_with_the_weights(trained_model):
    from mnist_ray import models

    model = models.keras().models.load_model(f"{trained_model[0]}/model.keras")
    before = export.weights_version(model)
    weights = model.get_weights()
    weights[0] = weights[0] + 1e-3
    model.set_weights(weights)
    assert export.weights_version(model) != before
