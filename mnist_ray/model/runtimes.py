"""Batched model runtimes over a model dir: the Keras model (TensorFlow) and its TFLite variants.

Each runtime is a callable: float32 images (N, 28, 28, 1) -> float32 probabilities (N, 10), and
``predict_pixels`` takes uint8 pixels (N, 28, 28) through the runtime's own fast path.
Used by the export table, by inference actors, and by the benchmarks. ``resolve`` picks the
runtime of ``--runtime auto`` for every consumer (infer, predict, a server), so one image gets
the same answer everywhere by default.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np

from mnist_ray.images import preprocess
from mnist_ray.errors import MnistRayError

# runtime name -> file inside the model dir
RUNTIME_FILES = {
    "tf": "model.keras",
    "tflite-fp32": "tflite/float32.tflite",
    "tflite-fp16": "tflite/float16.tflite",
    "tflite-dynamic": "tflite/dynamic.tflite",
    "tflite-int8": "tflite/int8.tflite",
}
AUTO = "auto"
CHOICES = (AUTO, *RUNTIME_FILES)
# --runtime auto takes a TFLite variant on CPU only if its top-1 prediction equals the float
# model's on at least this share of at least this many images, measured at export (export.py).
MIN_AGREEMENT = 0.995
MIN_AGREEMENT_IMAGES = 5000
FULL_INTEGER = "tflite-int8"


class KerasRuntime:
    """The Keras model as one compiled function with a fixed signature: traced once, never again."""

    def __init__(self, path: str):
        import tensorflow as tf

        from mnist_ray.model import models

        self.model = models.keras().models.load_model(path, compile=False)
        spec = tf.TensorSpec([None, *self.model.input_shape[1:]], tf.float32)
        self._forward = tf.function(lambda x: self.model(x, training=False), input_signature=[spec])
        # uint8 pixels in, normalized inside the compiled call: on a GPU the cast runs there and
        # 4x fewer bytes cross to the device (the same values as preprocess.normalize).
        pixels = tf.TensorSpec([None, *self.model.input_shape[1:3]], tf.uint8)
        self._forward_pixels = tf.function(
            lambda p: self.model(tf.cast(p, tf.float32)[..., None] * (1.0 / 255.0), training=False),
            input_signature=[pixels])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self._forward(images).numpy()

    def predict_pixels(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 (N, 28, 28) -> probabilities."""
        return self._forward_pixels(pixels).numpy()


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
        self.allocated_batch = 0  # the batch size the interpreter is allocated for
        self._lut = None

    def _allocate(self, batch: int) -> None:
        self.interpreter.resize_tensor_input(self._input["index"], [batch, *self._input["shape"][1:]])
        self.interpreter.allocate_tensors()
        self._input = self.interpreter.get_input_details()[0]
        self._output = self.interpreter.get_output_details()[0]
        self.allocated_batch = batch

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
        if n != self.allocated_batch:
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


def check_name(runtime: str, choices: tuple[str, ...] = CHOICES) -> None:
    """A ``--runtime`` value that is one of ``choices`` (by default ``auto`` or a runtime), or a clear error."""
    if runtime not in choices:
        raise MnistRayError(f"unknown runtime {runtime!r}: choose one of {', '.join(choices)}")


def choose(runtime: str, model_dir: str, on_gpu: bool, metadata: dict | None = None) -> tuple[str, str]:
    """The runtime to load for ``--runtime runtime``, and why: the one given, or ``resolve``'s for
    auto. Every consumer (infer's plan, predict, serve) chooses here, so they agree."""
    if runtime != AUTO:
        return runtime, f"--runtime {runtime}"
    return resolve(model_dir, on_gpu, metadata)


def check(model_dir: str, runtime: str) -> str:
    """The file of ``runtime`` in a local model dir, or a clear error."""
    check_name(runtime, tuple(RUNTIME_FILES))
    path = os.path.join(model_dir, RUNTIME_FILES[runtime])
    if not os.path.exists(path):
        raise MnistRayError(f"{model_dir} has no {runtime} variant ({RUNTIME_FILES[runtime]} is missing): "
                            "retrain with TFLite export on, or pick another --runtime")
    return path


def load(model_dir: str, runtime: str = "tf", num_threads: int | None = None):
    """The runtime ``runtime`` of a local model dir."""
    path = check(model_dir, runtime)
    return KerasRuntime(path) if runtime == "tf" else TFLiteRuntime(path, num_threads)


def tflite_threads(cpus_reserved: float) -> int:
    """TFLite interpreter threads for a process that reserved ``cpus_reserved`` CPUs (not the
    node's core count, which several actors on one node would oversubscribe)."""
    return max(1, math.floor(cpus_reserved + 1e-9))


def predict_batched(runtime, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    return np.concatenate([runtime(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]) \
        if len(images) else np.zeros((0, 10), np.float32)


def predict_pixels_batched(runtime, pixels: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """uint8 pixels in batches, through each runtime's pixel path (on a GPU the cast runs there)."""
    return np.concatenate([predict_pixels(runtime, pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)]) \
        if len(pixels) else np.zeros((0, 10), np.float32)


def resolve(model_dir: str, on_gpu: bool, metadata: dict | None = None) -> tuple[str, str]:
    """The runtime of ``--runtime auto`` for a local model dir, and why.

    On a GPU: the TF runtime (TFLite runs on the CPU). On CPU: the full-integer TFLite model if
    its top-1 agreement with the float model, measured at export on at least 5,000 images, is
    at least 99.5 %; else the fastest variant (images/s at export) that agrees that well; else tf.
    """
    if on_gpu:
        return "tf", "GPU actors: TensorFlow runs the model on the GPU, TFLite would not"
    if metadata is None:
        with open(os.path.join(model_dir, "metadata.json")) as f:
            metadata = json.load(f)
    agreement = metadata.get("agreement")
    if not agreement:
        return "tf", "the model dir records no TFLite agreement (exported before it was measured): re-export it"
    images = agreement.get("images", 0)
    if images < MIN_AGREEMENT_IMAGES:
        return "tf", f"TFLite agreement was measured on {images:,} images, fewer than {MIN_AGREEMENT_IMAGES:,}"
    top1 = {name: share for name, share in agreement.get("top1", {}).items()
            if name in RUNTIME_FILES and name != "tf" and os.path.exists(os.path.join(model_dir, RUNTIME_FILES[name]))}
    good = {name: share for name, share in top1.items() if share >= MIN_AGREEMENT}
    on = f"of {images:,} images (>= {MIN_AGREEMENT:.1%})"
    if FULL_INTEGER in good:
        return FULL_INTEGER, f"full-integer TFLite agrees with the float model on {good[FULL_INTEGER]:.2%} {on}"
    if not good:
        return "tf", f"no TFLite variant agrees with the float model on {MIN_AGREEMENT:.1%} of {images:,} images"
    speed = {name: metadata.get("variants", {}).get(name, {}).get("images_per_s", 0.0) for name in good}
    fastest = max(good, key=lambda name: speed[name])
    int8 = f"{FULL_INTEGER} agrees on {top1[FULL_INTEGER]:.2%}" if FULL_INTEGER in top1 else f"no {FULL_INTEGER}"
    return fastest, f"{int8}; {fastest} is the fastest variant that agrees: {good[fastest]:.2%} {on}"


def local_gpu() -> bool:
    """Whether this process can run TensorFlow on a GPU (TensorFlow is imported only when an
    NVIDIA driver is installed, so a CPU machine answers at once)."""
    if shutil.which("nvidia-smi") is None:
        return False
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))
