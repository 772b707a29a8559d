"""Every variant of an exported model dir loads and agrees with the Keras model; the runtime
`--runtime auto` picks, from what the model dir records (no Ray, no TensorFlow)."""

import json

import numpy as np
import pytest

from mnist_ray.images import preprocess
from mnist_ray.model import runtimes
from mnist_ray.plumbing import cluster
from mnist_ray.errors import MnistRayError

cluster.configure_process_env()

# Top-1 agreement with the Keras model on real MNIST test digits.
AGREEMENT = {"tflite-fp32": 0.999, "tflite-fp16": 0.995, "tflite-dynamic": 0.98, "tflite-int8": 0.97}


@pytest.fixture(scope="module")
def test_images(mnist_test_arrays):
    images, labels = mnist_test_arrays
    return preprocess.normalize(images[:1000]), labels[:1000]


@pytest.mark.e2e
def test_every_variant_agrees_with_the_keras_model(trained_model, test_images):
    model_dir, _ = trained_model
    x, _ = test_images
    reference = runtimes.predict_batched(runtimes.load(model_dir, "tf"), x).argmax(1)
    for name, threshold in AGREEMENT.items():
        probs = runtimes.predict_batched(runtimes.load(model_dir, name), x, batch_size=256)
        assert probs.shape == (1000, 10) and probs.dtype == np.float32
        agreement = (probs.argmax(1) == reference).mean()
        assert agreement >= threshold, f"{name}: {agreement:.4f} < {threshold}"


@pytest.mark.e2e
def test_the_saved_model_serves_the_same_probabilities(trained_model, test_images):
    import tensorflow as tf

    model_dir, _ = trained_model
    x, _ = test_images
    loaded = tf.saved_model.load(f"{model_dir}/saved_model")  # keep a reference: it owns the variables
    served = loaded.serve(tf.constant(x[:64])).numpy()
    np.testing.assert_allclose(served, runtimes.load(model_dir, "tf")(x[:64]), atol=1e-5)


@pytest.mark.e2e
def test_tflite_runs_each_batch_at_its_own_size(trained_model, test_images):
    """No padding: a short batch (the end of every Ray block) is computed at its own size,
    with the same probabilities as inside a larger batch, and the next full batch still works."""
    model_dir, _ = trained_model
    x, _ = test_images
    runtime = runtimes.load(model_dir, "tflite-int8")
    full = runtime(x[:256])
    short = runtime(x[:37])
    assert runtime.allocated_batch == 37 and short.shape == (37, 10)
    np.testing.assert_allclose(short, full[:37], atol=1e-6)
    np.testing.assert_allclose(runtime(x[:256]), full, atol=1e-6)


@pytest.mark.e2e
def test_unknown_or_missing_runtime_is_a_clear_error(trained_model, tmp_path):
    model_dir, _ = trained_model
    with pytest.raises(MnistRayError, match="unknown runtime"):
        runtimes.load(model_dir, "onnx")
    with pytest.raises(MnistRayError, match="no tflite-int8 variant"):
        runtimes.load(str(tmp_path), "tflite-int8")


@pytest.mark.e2e
def test_pixels_in_gives_the_same_probabilities_as_floats_in(trained_model, mnist_test_arrays):
    """uint8 pixels go straight to every runtime; the int8 model's lookup table quantizes
    exactly as the float path does (bit-identical input, so identical output)."""
    model_dir, _ = trained_model
    pixels = mnist_test_arrays[0][:300]
    for name in ("tf", "tflite-fp32", "tflite-int8"):
        runtime = runtimes.load(model_dir, name)
        assert hasattr(runtime, "predict_pixels")  # tf too: the cast runs inside its compiled call
        np.testing.assert_array_equal(runtimes.predict_pixels(runtime, pixels),
                                      runtime(preprocess.normalize(pixels)))


def test_tflite_runs_as_many_threads_as_the_cpus_reserved():
    assert [runtimes.tflite_threads(c) for c in (0.25, 1.0, 2.0, 3.7)] == [1, 1, 2, 3]


# --- --runtime auto ---------------------------------------------------------------------------

SPEED = {"tf": 13_500, "tflite-fp32": 16_200, "tflite-fp16": 16_400, "tflite-dynamic": 22_500, "tflite-int8": 52_700}


def _model_dir(tmp_path, top1: dict | None, images: int = 5000, files=tuple(runtimes.RUNTIME_FILES)) -> str:
    """A model dir as far as the resolver reads it: the variant files and metadata.json."""
    for name in files:
        path = tmp_path / runtimes.RUNTIME_FILES[name]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
    metadata = {"variants": {name: {"images_per_s": SPEED[name]} for name in files}}
    if top1 is not None:
        metadata["agreement"] = {"reference": "tf", "images": images, "top1": top1}
    (tmp_path / "metadata.json").write_text(json.dumps(metadata))
    return str(tmp_path)


AGREES = {"tflite-fp32": 1.0, "tflite-fp16": 1.0, "tflite-dynamic": 0.9992, "tflite-int8": 0.9978}


def test_auto_takes_full_integer_on_cpu_when_it_agrees_and_tf_on_gpu(tmp_path):
    model_dir = _model_dir(tmp_path, AGREES)
    runtime, reason = runtimes.resolve(model_dir, on_gpu=False)
    assert runtime == "tflite-int8" and "99.78%" in reason and "5,000 images" in reason
    runtime, reason = runtimes.resolve(model_dir, on_gpu=True)
    assert runtime == "tf" and "GPU" in reason


def test_auto_takes_the_fastest_variant_that_agrees_when_int8_does_not(tmp_path):
    runtime, reason = runtimes.resolve(_model_dir(tmp_path, {**AGREES, "tflite-int8": 0.9949}), on_gpu=False)
    assert runtime == "tflite-dynamic" and "tflite-int8 agrees on 99.49%" in reason  # 22.5k beats fp16's 16.4k
    runtime, _ = runtimes.resolve(_model_dir(tmp_path, {**AGREES, "tflite-int8": 0.99, "tflite-dynamic": 0.99}),
                                  on_gpu=False)
    assert runtime == "tflite-fp16"
    exactly = runtimes.resolve(_model_dir(tmp_path, {**AGREES, "tflite-int8": 0.995}), on_gpu=False)
    assert exactly[0] == "tflite-int8"  # 99.5 % is enough


def test_auto_falls_back_to_tf_with_the_reason(tmp_path):
    none_agree = {name: 0.98 for name in AGREES}
    assert runtimes.resolve(_model_dir(tmp_path / "a", none_agree), on_gpu=False)[0] == "tf"
    runtime, reason = runtimes.resolve(_model_dir(tmp_path / "b", None), on_gpu=False)
    assert runtime == "tf" and "exported before" in reason  # model dirs from before the agreement
    runtime, reason = runtimes.resolve(_model_dir(tmp_path / "c", AGREES, images=1200), on_gpu=False)
    assert runtime == "tf" and "1,200 images" in reason
    # A variant whose file is missing is never chosen.
    runtime, _ = runtimes.resolve(_model_dir(tmp_path / "d", AGREES, files=("tf", "tflite-fp32")), on_gpu=False)
    assert runtime == "tflite-fp32"
    assert runtimes.resolve(_model_dir(tmp_path / "e", AGREES, files=("tf",)), on_gpu=False)[0] == "tf"


def test_no_nvidia_driver_means_no_gpu_without_importing_tensorflow(monkeypatch):
    import sys

    monkeypatch.setenv("PATH", "")
    monkeypatch.delitem(sys.modules, "tensorflow", raising=False)
    assert runtimes.local_gpu() is False and "tensorflow" not in sys.modules
