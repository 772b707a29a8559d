"""The model registry (timm style): a model is one decorated function; build it by name.

Every model takes float32 images (batch, 28, 28, 1) in [0, 1], white digit on black (the
MNIST convention), and returns class probabilities (softmax). Models hold no augmentation
or preprocessing layers, so they convert to TFLite (including full-integer int8) and run
under MultiWorkerMirroredStrategy unchanged. Keras 2 (tf-keras) throughout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from mnist_ray.formats.predictions import NUM_CLASSES  # the ten digits: one definition, with the format
from mnist_ray.errors import MnistRayError

INPUT_SHAPE = (28, 28, 1)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable
    description: str
    # Training settings this model was tuned with; `mnist-ray train` flags override them.
    defaults: dict = field(default_factory=dict)


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, description: str, **defaults):
    def wrap(fn):
        _REGISTRY[name] = ModelSpec(name, fn, description, defaults)
        return fn
    return wrap


def keras():
    """tf-keras, imported on first use (TF_USE_LEGACY_KERAS is set by cluster.configure_process_env)."""
    import tf_keras

    return tf_keras


def model_names() -> list[str]:
    return sorted(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        raise MnistRayError(f"unknown model {name!r}: known models are {', '.join(model_names())} "
                            "(mnist-ray train --list-models)")
    return _REGISTRY[name]


def create_model(name: str, seed: int | None = None, width: float = 1.0):
    """A fresh, uncompiled Keras model; ``seed`` makes the initial weights reproducible.

    ``width`` multiplies every layer's units/filters (1.0: the registered model exactly), so a
    search can trade accuracy for size without a new registry entry.
    """
    spec = get_spec(name)
    if not width > 0:
        raise MnistRayError(f"width {width!r} must be positive (1.0 is the model as registered)")
    if seed is not None:
        keras().utils.set_random_seed(seed)
    return spec.build(width=width) if width != 1.0 else spec.build()


def scaled(units: int, width: float) -> int:
    """``units`` times the width multiplier, at least 1."""
    return max(1, round(units * width))


def list_models() -> list[dict]:
    """Name, parameter count and description of every registered model."""
    rows = []
    for name in model_names():
        spec = _REGISTRY[name]
        rows.append({"name": name, "params": int(spec.build().count_params()), "description": spec.description})
    keras().backend.clear_session()
    return rows


@register("mlp", "MLP: Flatten, Dense 128, Dropout 0.2, softmax",
          epochs=5, batch_size=32, learning_rate=1e-3, augment=False)
def mlp(width: float = 1.0):
    k = keras()
    return k.Sequential([
        k.Input(INPUT_SHAPE),
        k.layers.Flatten(),
        k.layers.Dense(scaled(128, width), activation="relu"),
        k.layers.Dropout(0.2),
        k.layers.Dense(NUM_CLASSES, activation="softmax"),
    ], name="mlp")


@register("cnn", "small CNN: Conv 32, Conv 64, MaxPool, Dropout 0.25, softmax",
          epochs=5, batch_size=32, learning_rate=1e-3, augment=False)
def cnn(width: float = 1.0):
    k = keras()
    return k.Sequential([
        k.Input(INPUT_SHAPE),
        k.layers.Conv2D(scaled(32, width), 3, activation="relu"),
        k.layers.Conv2D(scaled(64, width), 3, activation="relu"),
        k.layers.MaxPooling2D(2),
        k.layers.Dropout(0.25),
        k.layers.Flatten(),
        k.layers.Dense(NUM_CLASSES, activation="softmax"),
    ], name="cnn")


@register("tutorial-cnn", "wide CNN: Conv 32, Conv 64, Dense 128, softmax (4.7M parameters)",
          epochs=3, batch_size=32, learning_rate=1e-3, augment=False)
def tutorial_cnn(width: float = 1.0):
    k = keras()
    x0 = k.Input(INPUT_SHAPE)
    x = k.layers.Conv2D(scaled(32, width), 3, activation="relu")(x0)
    x = k.layers.Conv2D(scaled(64, width), 3, activation="relu")(x)
    x = k.layers.Flatten()(x)
    x = k.layers.Dense(scaled(128, width), activation="relu")(x)
    return k.Model(x0, k.layers.Dense(NUM_CLASSES, activation="softmax")(x), name="tutorial_cnn")


@register("default", "recommended: VGG-style BN CNN (32-64-128), global pooling; augmentation (affine; "
          "scans, thick, blurred, photographed; printed digits), label smoothing, AdamW, warmup + cosine, weight EMA",
          epochs=40, batch_size=64, learning_rate=3e-3, augment=True,
          weight_decay=5e-4, warmup_epochs=2, label_smoothing=0.1, ema_momentum=0.998,
          degrade_rate=0.5, printed_per_class=200)
def default(width: float = 1.0, dropout: float = 0.3):
    k = keras()
    L = k.layers
    base = scaled(32, width)

    def conv_bn_relu(x, filters):
        x = L.Conv2D(filters, 3, padding="same", use_bias=False)(x)
        # momentum 0.9, not 0.99: with ~3k steps the slower running stats lag the weights
        x = L.BatchNormalization(momentum=0.9)(x)
        return L.ReLU()(x)

    x0 = k.Input(INPUT_SHAPE, name="image")
    x = conv_bn_relu(conv_bn_relu(x0, base), base)
    x = L.MaxPooling2D()(x)                                    # 14x14
    x = conv_bn_relu(conv_bn_relu(x, 2 * base), 2 * base)
    x = L.MaxPooling2D()(x)                                    # 7x7
    x = conv_bn_relu(conv_bn_relu(x, 4 * base), 4 * base)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dropout(dropout)(x)
    return k.Model(x0, L.Dense(NUM_CLASSES, activation="softmax", name="probs")(x), name="default")
