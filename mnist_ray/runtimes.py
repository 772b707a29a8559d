"""Batched model runtimes over a model dir: the Keras model (TensorFlow) and its TFLite variants.

Each runtime is a callable: float32 images (N, 28, 28, 1) -> float32 probabilities (N, 10).
Used by the export table, by inference actors, and by the benchmarks.
"""

from __future__ import annotations

import os

import numpy as np

from mnist_ray import preprocess
from mnist_ray.errors import MnistRayError

# runtime name -> file inside the model dir
RUNTIME_FILES = {
    "tf": "model.keras",
    "tflite-fp32": "tflite/float32.tflite",
    "tflite-fp16": "tflite/float16.tflite",
    "tflite-dynamic": "tflite/dynamic.tflite",
    "tflite-int8": "tflite/int8.tflite",
}


class KerasRuntime:
    """The Keras model as one compiled function with a fixed signature: traced once, never again."""

    def __init__(self, path: str):
        import tensorflow as tf

        from mnist_ray import models

        self.model = models.keras().models.load_model(path, compile=False)
        spec = tf.TensorSpec([None, *self.model.input_shape[1:]], tf.float32)
        self._forward = tf.function(lambda x: self.model(x, training=False), input_signature=[spec])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self._forward(images).numpy()


class TFLiteRuntime:
    """A TFLite model run on whole batches; int8 models get quantized input.

    The input is resized to each batch's size: reallocating costs ~15 µs here, while padding
    the short batch at the end of every Ray block (212 rows of a 12,500-row block at batch
    1024) to the full size cost 5x its own time, 6 % of all int8 compute."""

    def __init__(self, path: str, num_threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        self.interpreter = Interpreter(model_path=path, num_threads=num_threads or os.cpu_count())
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        self._batch = 0
        self._lut = None

    def _allocate(self, batch: int) -> None:
        self.interpreter.resize_tensor_input(self._input["index"], [batch, *self._input["shape"][1:]])
        self.interpreter.allocate_tensors()
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        self._batch = batch

    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, 28, 28) -> probabilities. A full-integer model's input is quantized with a
        256-entry table (one gather, the same values as quantizing the normalized floats)."""
        if self._input["dtype"] == np.float32:
            return self(preprocess.normalize(pixels))
        if self._lut is None:
            self._lut = self._quantize(preprocess.normalize(np.arange(256, dtype=np.uint8)[None])[0, :, 0])
        return self._run(self._lut[pixels][..., None])

    def _quantize(self, images: np.ndarray) -> np.ndarray:
        scale, zero = self._input["quantization"]
        info = np.iinfo(self._input["dtype"])
        return np.clip(np.round(images / scale + zero), info.min, info.max).astype(self._input["dtype"])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """float32 (N, 28, 28, 1) in [0, 1] -> probabilities."""
        return self._run(images if self._input["dtype"] == np.float32 else self._quantize(images))

    def _run(self, x: np.ndarray) -> np.ndarray:
        """Model-typed input (N, 28, 28, 1) -> float32 probabilities."""
        n = len(x)
        if n != self._batch:
            self._allocate(n)
        self.interpreter.set_tensor(self._input["index"], x)
        self.interpreter.invoke()
        y = self.interpreter.get_tensor(self._output["index"])
        if self._output["dtype"] != np.float32:
            scale, zero = self._output["quantization"]
            y = (y.astype(np.float32) - zero) * scale
        return y.astype(np.float32)


def predict_pixels(runtime, pixels: np.ndarray) -> np.ndarray:
    """uint8 pixels (N, 28, 28) -> probabilities, through the runtime's own fast path if it
    has one (full-integer TFLite skips the float detour), else its float32 input."""
    fast = getattr(runtime, "predict_pixels", None)
    return fast(pixels) if fast is not None else runtime(preprocess.normalize(pixels))


def check(model_dir: str, runtime: str) -> str:
    """The file of ``runtime`` in a local model dir, or a clear error."""
    if runtime not in RUNTIME_FILES:
        raise MnistRayError(f"unknown runtime {runtime!r}: choose one of {', '.join(RUNTIME_FILES)}")
    path = os.path.join(model_dir, RUNTIME_FILES[runtime])
    if not os.path.exists(path):
        raise MnistRayError(f"{model_dir} has no {runtime} variant ({RUNTIME_FILES[runtime]} is missing): "
                            "retrain with TFLite export on, or pick another --runtime")
    return path


def load(model_dir: str, runtime: str = "tf", num_threads: int | None = None):
    """The runtime ``runtime`` of a local model dir."""
    path = check(model_dir, runtime)
    return KerasRuntime(path) if runtime == "tf" else TFLiteRuntime(path, num_threads)


def predict_batched(runtime, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return np.concatenate([runtime(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]) \
        if len(images) else np.zeros((0, 10), np.float32)
