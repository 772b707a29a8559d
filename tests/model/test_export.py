"""The model dir: complete only with _SUCCESS, versioned by its weights."""

import json
import shutil

import numpy as np
import pytest

from mnist_ray.model import export
from mnist_ray.plumbing import cluster
from mnist_ray.errors import MnistRayError

cluster.configure_process_env()


@pytest.mark.e2e
def test_open_model_dir_reads_a_complete_dir(trained_model):
    model_dir, summary = trained_model
    local, metadata = export.open_model_dir(model_dir)
    assert local == model_dir and metadata["version"] == summary["version"]
    assert metadata["preprocessing"] == export.PREPROCESSING
    variants = json.load(open(f"{model_dir}/variants.json"))
    assert set(variants) == {"tf", "tflite-fp32", "tflite-fp16", "tflite-dynamic", "tflite-int8"}
    assert variants["tflite-int8"]["bytes"] < variants["tflite-fp32"]["bytes"] / 3
    assert all(v["images_per_s"] > 0 and 0 < v["val_accuracy"] <= 1 for v in variants.values())


@pytest.mark.e2e
def test_open_model_dir_refuses_incomplete_or_missing_dirs(trained_model, tmp_path):
    model_dir, _ = trained_model
    copy = tmp_path / "copy"
    shutil.copytree(model_dir, copy)
    (copy / "_SUCCESS").unlink()
    with pytest.raises(MnistRayError, match="not a complete model dir"):
        export.open_model_dir(str(copy))
    with pytest.raises(MnistRayError, match="no model dir"):
        export.open_model_dir(str(tmp_path / "missing"))


@pytest.mark.e2e
def test_the_version_changes_with_the_weights(trained_model):
    from mnist_ray.model import models

    model = models.keras().models.load_model(f"{trained_model[0]}/model.keras")
    before = export.weights_version(model)
    weights = model.get_weights()
    weights[0] = weights[0] + 1e-3
    model.set_weights(weights)
    assert export.weights_version(model) != before


@pytest.mark.e2e
def test_agreement_is_recorded_for_every_variant_on_all_images_up_to_5000(trained_model):
    model_dir, summary = trained_model
    metadata = json.load(open(f"{model_dir}/metadata.json"))
    agreement = metadata["agreement"]
    val_rows = metadata["metrics"]["val_rows"]
    assert agreement["reference"] == "tf" and val_rows < agreement["images"] <= 5000  # val, then train images
    assert set(agreement["top1"]) == {"tflite-fp32", "tflite-fp16", "tflite-dynamic", "tflite-int8"}
    assert agreement["top1"]["tflite-fp32"] >= 0.999 and all(0.9 < a <= 1 for a in agreement["top1"].values())
    variants = json.load(open(f"{model_dir}/variants.json"))
    assert variants["tflite-int8"]["agreement"] == agreement["top1"]["tflite-int8"]
    # Fewer than 5,000 images in this small data set: auto keeps tf, and says why.
    assert summary["auto_runtime_on_cpu"]["runtime"] == "tf"
    assert f"{agreement['images']:,} images" in summary["auto_runtime_on_cpu"]["reason"]


class _Batches:
    """The one method export reads of a dataset."""

    def __init__(self, n: int):
        self.images = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1)

    def iter_batches(self, batch_size: int, batch_format: str = "numpy"):
        for i in range(0, len(self.images), batch_size):
            yield {"image": self.images[i:i + batch_size], "label": np.zeros(len(self.images[i:i + batch_size]))}


def test_agreement_images_are_the_validation_set_topped_up_from_training():
    val = np.full((300, 1, 1, 1), -1, np.float32)
    images = export.agreement_images(val, _Batches(9000))
    assert len(images) == 5000 and (images[:300] == -1).all() and images[300:, 0, 0, 0].tolist() == list(range(4700))
    assert len(export.agreement_images(val, _Batches(100))) == 400  # small data: all there is
    assert len(export.agreement_images(np.zeros((6000, 1, 1, 1), np.float32), _Batches(10))) == 6000
