"""The compression methods of `mnist-ray compress` (QAT, pruning, distillation): each a plain Keras fine-tune."""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np

from mnist_ray.model import models, runtimes
from mnist_ray.errors import MnistRayError
from mnist_ray.training.compress_scoring import BENCH_BATCH, ModelInputs


class FineTuneFlags(Protocol):
    """The flags of `mnist-ray compress` that the methods read (CompressConfig has them)."""
    alpha: float
    batch_size: int
    epochs: int
    learning_rate: float
    seed: int
    sparsity: float
    student: str
    student_epochs: int
    student_learning_rate: float
    temperature: float


def _one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(models.NUM_CLASSES, dtype=np.float32)[labels]


def _history(fit, start_epoch: int = 0) -> list[dict]:
    """Keras fit history -> the per-epoch records export.export plots and stores."""
    h = fit.history
    keys = ("loss", "accuracy", "val_loss", "val_accuracy")
    return [{"epoch": start_epoch + i + 1, **{k: float(h[k][i]) for k in keys}}
            for i in range(len(h["loss"]))]


def _tfmot():
    import tensorflow_model_optimization as tfmot

    return tfmot


def _load_teacher(model_local: str):
    return models.keras().models.load_model(os.path.join(model_local, "model.keras"), compile=False)


def quantization_aware(cfg: FineTuneFlags, model_local: str, data: dict[str, ModelInputs], out_dir: str) -> dict:
    """Fine-tune with fake-quantized weights and activations, then convert to a full-integer TFLite."""
    import tensorflow as tf

    k = models.keras()
    k.utils.set_random_seed(cfg.seed)
    qat = _tfmot().quantization.keras.quantize_model(_load_teacher(model_local))
    qat.compile(optimizer=k.optimizers.Adam(cfg.learning_rate), loss="categorical_crossentropy", metrics=["accuracy"])
    tr, va = data["train"], data["val"]
    fit = qat.fit(tr.images, _one_hot(tr.labels), batch_size=cfg.batch_size, epochs=cfg.epochs, verbose=0,
                  validation_data=(va.images, _one_hot(va.labels)), shuffle=True)
    converter = tf.lite.TFLiteConverter.from_keras_model(qat)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    # The ranges were learned during training; the representative data only covers any op
    # the fake-quant layers did not (and keeps int8 input/output like export's int8 variant).
    calibration = tr.images[:500]
    converter.representative_dataset = lambda: ([calibration[i:i + 1]] for i in range(len(calibration)))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    path = os.path.join(out_dir, runtimes.RUNTIME_FILES["tflite-int8"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(converter.convert())
    return {"history": _history(fit)}


def kernel_sparsity(model) -> float:
    """Fraction of zeros in the kernels of Conv and Dense layers (what magnitude pruning prunes)."""
    zeros = total = 0
    for layer in model.layers:
        kernel = getattr(layer, "kernel", None)
        if kernel is not None:
            w = kernel.numpy()
            zeros += int((w == 0).sum())
            total += w.size
    return zeros / total if total else 0.0


def prune(cfg: FineTuneFlags, model_local: str, data: dict[str, ModelInputs], keras_path: str) -> dict:
    """Magnitude pruning to ``cfg.sparsity`` during a short fine-tune; the stripped model is saved."""
    k, tfmot = models.keras(), _tfmot()
    k.utils.set_random_seed(cfg.seed)
    tr, va = data["train"], data["val"]
    steps = -(-len(tr.labels) // cfg.batch_size) * cfg.epochs
    # Gradual: sparsity ramps from 0 to the target over the first two thirds of the steps, so
    # the remaining weights can take over before pruning ends; end_step lands on a pruning
    # step (they come every `frequency` steps) so the last mask has exactly the target.
    frequency = max(1, steps // 10)
    end_step = max(frequency, (2 * steps // 3) // frequency * frequency)
    schedule = tfmot.sparsity.keras.PolynomialDecay(initial_sparsity=0.0, final_sparsity=cfg.sparsity,
                                                   begin_step=0, end_step=end_step, frequency=frequency)
    pruned = tfmot.sparsity.keras.prune_low_magnitude(_load_teacher(model_local), pruning_schedule=schedule)
    pruned.compile(optimizer=k.optimizers.Adam(cfg.learning_rate), loss="categorical_crossentropy",
                   metrics=["accuracy"])
    fit = pruned.fit(tr.images, _one_hot(tr.labels), batch_size=cfg.batch_size, epochs=cfg.epochs, verbose=0,
                     validation_data=(va.images, _one_hot(va.labels)), shuffle=True,
                     callbacks=[tfmot.sparsity.keras.UpdatePruningStep()])
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    sparsity = kernel_sparsity(stripped)
    if sparsity < cfg.sparsity - 0.01:  # a fine-tune shorter than one pruning step, say
        raise MnistRayError(f"pruning reached {sparsity:.2f} sparsity, not {cfg.sparsity}: "
                            "fine-tune longer (--epochs) or on more data")
    stripped.save(keras_path)
    return {"history": _history(fit), "sparsity": round(sparsity, 4)}


def soft_targets(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities softened by ``temperature``: softmax(log p / T) (log p are logits up to a constant)."""
    z = np.log(np.clip(probs, 1e-12, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def distillation_loss(temperature: float, alpha: float):
    """Loss on targets packed as [one-hot label | teacher soft targets] (20 columns), so a plain
    Keras ``fit`` trains the registered student model unchanged (it keeps its softmax output)."""
    import tensorflow as tf

    n, losses = models.NUM_CLASSES, models.keras().losses

    def loss(y_true, y_pred):
        hard, soft = y_true[:, :n], y_true[:, n:]
        p = tf.clip_by_value(y_pred, 1e-7, 1.0)
        soft_student = tf.nn.softmax(tf.math.log(p) / temperature)
        # T^2 keeps the soft term's gradients on the scale of the hard term's (Hinton et al.)
        soft_loss = losses.categorical_crossentropy(soft, soft_student) * temperature ** 2
        return alpha * losses.categorical_crossentropy(hard, p) + (1 - alpha) * soft_loss
    return loss


def accuracy(y_true, y_pred):
    """Top-1 accuracy against the one-hot half of the packed distillation targets."""
    import tensorflow as tf

    return tf.cast(tf.equal(tf.argmax(y_true[:, :models.NUM_CLASSES], 1), tf.argmax(y_pred, 1)), tf.float32)


def distill(cfg: FineTuneFlags, teacher, data: dict[str, ModelInputs], keras_path: str) -> dict:
    """Train ``cfg.student`` from scratch on the teacher's softened outputs and the labels."""
    k = models.keras()
    tr, va = data["train"], data["val"]

    def targets(split: ModelInputs) -> np.ndarray:
        # The teacher is fixed and the data not augmented: its outputs are computed once.
        probs = runtimes.predict_batched(teacher, split.images, BENCH_BATCH)
        return np.concatenate([_one_hot(split.labels), soft_targets(probs, cfg.temperature)], axis=1)

    student = models.create_model(cfg.student, seed=cfg.seed)
    student.compile(optimizer=k.optimizers.Adam(cfg.student_learning_rate),
                    loss=distillation_loss(cfg.temperature, cfg.alpha), metrics=[accuracy])
    fit = student.fit(tr.images, targets(tr), batch_size=cfg.batch_size, epochs=cfg.student_epochs, verbose=0,
                      validation_data=(va.images, targets(va)), shuffle=True)
    # Saved without the custom loss: serving loads it like any trained model.
    student.compile(optimizer=k.optimizers.Adam(cfg.student_learning_rate), loss="categorical_crossentropy",
                    metrics=["accuracy"])
    student.save(keras_path)
    return {"history": _history(fit), "params": int(student.count_params())}
