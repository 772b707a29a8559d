"""Every variant of an exported model dir loads and agrees with the Keras model."""

import numpy as np
import pytest

from mnist_ray import cluster, preprocess, runtimes
from mnist_ray.errors import MnistRayError

cluster.configure_process_env()
pytestmark = pytest.mark.e2e

# Top-1 agreement with the Keras model on real MNIST test digits.
AGREEMENT = {"tflite-fp32": 0.999, "tflite-fp16": 0.995, "tflite-dynamic": 0.98, "tflite-int8": 0.97}


@pytest.fixture(scope="module")
def test_images(mnist_test_arrays):
    images, labels = mnist_test_arrays
    return preprocess.normalize(images[:1000]), labels[:1000]


def test_every_variant_agrees_with_the_keras_model(trained_model, test_images):
    model_dir, _ = trained_model
    x, _ = test_images
    reference = runtimes.predict_batched(runtimes.load(model_dir, "tf"), x).argmax(1)
    for name, threshold in AGREEMENT.items():
        probs = runtimes.predict_batched(runtimes.load(model_dir, name), x, batch_size=256)
        assert probs.shape == (1000, 10) and probs.dtype == np.float32
        agreement = (probs.argmax(1) == reference).mean()
        assert agreement >= threshold, f"{name}: {agreement:.4f} < {threshold}"


def test_the_saved_model_serves_the_same_probabilities(trained_model, test_images):
    import tensorflow as tf

    model_dir, _ = trained_model
    x, _ = test_images
    loaded = tf.saved_model.load(f"{model_dir}/saved_model")  # keep a reference: it owns the variables
    served = loaded.serve(tf.constant(x[:64])).numpy()
    np.testing.assert_allclose(served, runtimes.load(model_dir, "tf")(x[:64]), atol=1e-5)


def test_tflite_runs_each_batch_at_its_own_size(trained_model, test_images):
    """No padding: a short batch (the end of every Ray block) is computed at its own size,
    with the same probabilities as inside a larger batch, and the next full batch still works."""
    model_dir, _ = trained_model
    x, _ = test_images
    runtime = runtimes.load(model_dir, "tflite-int8")
    full = runtime(x[:256])
    short = runtime(x[:37])
    assert runtime._batch == 37 and short.shape == (37, 10)
    np.testing.assert_allclose(short, full[:37], atol=1e-6)
    np.testing.assert_allclose(runtime(x[:256]), full, atol=1e-6)


def test_unknown_or_missing_runtime_is_a_clear_error(trained_model, tmp_path):
    model_dir, _ = trained_model
    with pytest.raises(MnistRayError, match="unknown runtime"):
        runtimes.load(model_dir, "onnx")
    with pytest.raises(MnistRayError, match="no tflite-int8 variant"):
        runtimes.load(str(tmp_path), "tflite-int8")


def test_pixels_in_gives_the_same_probabilities_as_floats_in(trained_model, mnist_test_arrays):
    """uint8 pixels go straight to every runtime; the int8 model's lookup table quantizes
    exactly as the float path does (bit-identical input, so identical output)."""
    model_dir, _ = trained_model
    pixels = mnist_test_arrays[0][:300]
    for name in ("tf", "tflite-fp32", "tflite-int8"):
        runtime = runtimes.load(model_dir, name)
        np.testing.assert_array_equal(runtimes.predict_pixels(runtime, pixels),
                                      runtime(preprocess.normalize(pixels)))
