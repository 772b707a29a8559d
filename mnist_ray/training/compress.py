"""compress: a trained model dir -> smaller variants, each a model dir, compared in one table.

    MODEL_DIR --reuse tflite/{float16,dynamic,int8}--> ptq-float16/ ptq-dynamic/ ptq-int8/
              --quantize_model + fine-tune --> int8 TFLite -----> qat-int8/
              --prune_low_magnitude + fine-tune, strip_pruning --> pruned/     (export.export)
              --teacher soft targets (temperature) --> student --> distilled/  (export.export)
    every variant x runtime --measured in one run--> compression.json, compression.md

    OUTPUT/
      <variant>/             a model dir: `mnist-ray infer --model OUTPUT/<variant> --runtime R`
      compression.json       the table: sizes (raw, gzip), val/test accuracy, images/s, agreement
      compression.md         the same table for people
      _SUCCESS               written last: a failed run leaves no OUTPUT (or the old one)

Everything runs in this process with plain Keras ``fit``, no Ray: the data is the model's own
training shards (thousands of 28x28 images, decoded in a second) and each fine-tune takes
seconds to a minute on a CPU; a Ray Train job would cost more in start-up than it saves.
"""

from __future__ import annotations

import dataclasses
import datetime
import gzip
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from mnist_ray.formats import shards
from mnist_ray.images import preprocess
from mnist_ray.model import export, models, runtimes
from mnist_ray.plumbing import cluster, storage
from mnist_ray.errors import MnistRayError

log = logging.getLogger(__name__)

PRODUCER = "mnist-ray compress --model MODEL_DIR --output DIR"
# Post-training variants reused from the training export: runtime -> variant dir name.
PTQ_VARIANTS = {"tflite-fp16": "ptq-float16", "tflite-dynamic": "ptq-dynamic", "tflite-int8": "ptq-int8"}
METHODS = ("ptq", "qat", "prune", "distill")
BENCH_BATCH = 256  # the batch size of every images/s figure (as export.measure and the README)
MIN_TIMED_IMAGES = 10_240


@dataclass(frozen=True)
class CompressConfig:
    model: str = field(default="out/mnist-sample/model", metadata={"help": "the trained model dir to compress"})
    output: str = field(default="out/mnist-sample/compressed", metadata={
        "help": "where the variant model dirs and the comparison table go"})
    data: str | None = field(default=None, metadata={
        "help": "shards to fine-tune and validate on (default: the shards the model's metadata names)"})
    test_data: str | None = field(default=None, metadata={
        "help": "extra labelled shards scored as test data (default: the 'test' split of --data, if any)"})
    methods: str = field(default=",".join(METHODS), metadata={
        "help": "comma-separated subset of " + ", ".join(METHODS)})
    epochs: int = field(default=4, metadata={"help": "fine-tune epochs of quantization-aware training and pruning"})
    learning_rate: float = field(default=3e-4, metadata={
        "help": "fine-tune learning rate (small: the weights are already trained)"})
    batch_size: int = field(default=64, metadata={"help": "fine-tune and distillation batch size"})
    sparsity: float = field(default=0.8, metadata={"help": "pruning: fraction of kernel weights set to zero"})
    student: str = field(default="mlp", metadata={"help": "distillation: a registered model (train --list-models)"})
    student_epochs: int = field(default=10, metadata={"help": "distillation: student epochs"})
    student_learning_rate: float = field(default=1e-3, metadata={"help": "distillation: student learning rate"})
    temperature: float = field(default=4.0, metadata={"help": "distillation: softmax temperature of the soft targets"})
    alpha: float = field(default=0.1, metadata={
        "help": "distillation: weight of the hard-label loss (1 - alpha on the teacher's soft targets)"})
    seed: int = field(default=0, metadata={"help": "seed of weights and shuffling"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing output"})

    PRESETS: ClassVar[dict] = {
        "default": {},
        "smoke": {"epochs": 1, "student_epochs": 1, "batch_size": 64},
    }

    def method_list(self) -> list[str]:
        chosen = [m.strip() for m in self.methods.split(",") if m.strip()]
        unknown = [m for m in chosen if m not in METHODS]
        if unknown or not chosen:
            raise MnistRayError(f"--methods {self.methods!r}: choose from {', '.join(METHODS)}")
        return chosen

    def validate(self) -> None:
        self.method_list()
        if not 0.0 < self.sparsity < 1.0:
            raise MnistRayError(f"--sparsity {self.sparsity}: give a fraction strictly between 0 and 1, e.g. 0.8")
        try:
            models.get_spec(self.student)  # an unknown student fails here, before any work
        except MnistRayError as e:
            raise MnistRayError(f"--student: {e}") from None
        if self.epochs < 1 or self.student_epochs < 1 or self.batch_size < 1:
            raise MnistRayError("--epochs, --student-epochs and --batch-size must be at least 1")
        if self.learning_rate <= 0 or self.student_learning_rate <= 0 or self.temperature <= 0:
            raise MnistRayError("--learning-rate, --student-learning-rate and --temperature must be positive")
        if not 0.0 <= self.alpha <= 1.0:
            raise MnistRayError("--alpha must be between 0 and 1")


# --- data --------------------------------------------------------------------------------------

@dataclass
class Split:
    images: np.ndarray  # float32 (N, 28, 28, 1) in [0, 1]
    labels: np.ndarray  # int32 (N,)


class ArraysDataset:
    """Numpy arrays behind the one method export.export reads (``iter_batches``), so the variants
    that are Keras models go through the same export as a trained model, without Ray."""

    def __init__(self, split: Split):
        self.split = split

    def iter_batches(self, batch_size: int, batch_format: str = "numpy"):
        for i in range(0, len(self.split.labels), batch_size):
            yield {"image": self.split.images[i:i + batch_size], "label": self.split.labels[i:i + batch_size]}


def _decode(table) -> Split:
    labels = table["label"].to_numpy(zero_copy_only=False)
    keep = ~np.isnan(labels.astype(np.float64)) if labels.dtype.kind == "f" else np.ones(len(labels), bool)
    images = [b for b, k in zip(table["image"].to_pylist(), keep) if k]
    return Split(preprocess.to_model_input(images), labels[keep].astype(np.int32))


def load_data(cfg: CompressConfig, metadata: dict) -> tuple[str, dict, dict[str, Split]]:
    """The model's own train/val splits (as training assigned them) and test data, decoded."""
    from mnist_ray.training import train

    uri = cfg.data or metadata.get("data", {}).get("uri")
    if not uri:
        raise MnistRayError(f"{cfg.model} names no training data: pass --data SHARDS")
    try:
        _, manifest = shards.open_shards(uri)
    except MnistRayError as e:
        if cfg.data:
            raise
        raise MnistRayError(f"cannot open the model's training shards {uri} ({e}): pass --data SHARDS") from e
    if manifest["fingerprint"] != metadata.get("data", {}).get("fingerprint"):
        log.warning("%s is not the data %s was trained on (fingerprints differ): fine-tuning and "
                    "validating on it anyway", uri, cfg.model)
    tc = metadata.get("train_config", {})
    train_splits = [s.strip() for s in tc.get("train_splits", "train").split(",") if s.strip()]
    val_split = tc.get("val_split", "val")
    holdout = val_split not in manifest["splits"]
    table = shards.read_table(uri, columns=["id", "image", "label", "split"])
    assigned = train.assign_split(table["id"].to_pylist(), table["split"].to_pylist(), val_split, holdout)
    data = {}
    for name, wanted in (("train", train_splits), ("val", [val_split]), ("test", ["test"])):
        rows = np.flatnonzero(np.isin(assigned, wanted))
        if len(rows):
            data[name] = _decode(table.take(rows))
    for name in ("train", "val"):
        if name not in data or len(data[name].labels) == 0:
            raise MnistRayError(f"{uri} has no labelled {name} rows (splits {sorted(manifest['splits'])}): "
                                "pass --data with the shards the model was trained on")
    if cfg.test_data:
        test = _decode(shards.read_table(cfg.test_data, columns=["image", "label"]))
        if len(test.labels) == 0:
            raise MnistRayError(f"{cfg.test_data} has no labelled rows to test on")
        data["test"] = test
    return uri, manifest, data


# --- the compression methods (each returns the files it wrote) ---------------------------------

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


def quantization_aware(cfg: CompressConfig, model_local: str, data: dict[str, Split], out_dir: str) -> dict:
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


def prune(cfg: CompressConfig, model_local: str, data: dict[str, Split], keras_path: str) -> dict:
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


def distill(cfg: CompressConfig, teacher, data: dict[str, Split], keras_path: str) -> dict:
    """Train ``cfg.student`` from scratch on the teacher's softened outputs and the labels."""
    k = models.keras()
    tr, va = data["train"], data["val"]

    def targets(split: Split) -> np.ndarray:
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


# --- model dirs ----------------------------------------------------------------------------------

def _sha(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


def _link_or_copy(src: str, dst: str) -> None:
    """Reuse the training export's file: a hard link on the same filesystem, else a copy."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def write_tflite_model_dir(out_dir: str, runtime: str, teacher_meta: dict, compression: dict, row: dict) -> None:
    """Finish a model dir holding one TFLite file: the teacher's metadata (same input and
    preprocessing spec), a version of its own, and _SUCCESS last."""
    rel = runtimes.RUNTIME_FILES[runtime]
    variant = {runtime: {"file": rel, "bytes": row["bytes"], "val_accuracy": row["val_accuracy"],
                         "images_per_s": row["images_per_s"], "agreement": row["agreement"]}}
    metadata = {
        **teacher_meta,
        "version": f"{teacher_meta['model']}-{compression['variant']}-{_sha(os.path.join(out_dir, rel))}",
        "metrics": {"val_accuracy": row["val_accuracy"], "test_accuracy": row["test_accuracy"],
                    "val_rows": row["val_rows"]},
        "variants": variant,
        "compression": compression,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    with open(os.path.join(out_dir, "variants.json"), "w") as f:
        json.dump(variant, f, indent=2)
    with open(os.path.join(out_dir, "metadata.json"), "w") as f:
        json.dump(metadata, f, indent=2)
    with open(os.path.join(out_dir, storage.SUCCESS), "w") as f:
        json.dump({"run_id": metadata["version"]}, f)


def export_keras_variant(keras_path: str, out_dir: str, *, model_name: str, manifest: dict, data_uri: str,
                         data: dict[str, Split], history: list[dict], compression: dict, seconds: float) -> dict:
    """A Keras variant through the training export: model.keras, SavedModel, all TFLite variants."""
    train_config = {"model": model_name, "data": data_uri, "compression": compression}
    return export.export(keras_path, out_dir, history=history, manifest=manifest,
                         val_dataset=ArraysDataset(data["val"]), calibration_dataset=ArraysDataset(data["train"]),
                         train_config=train_config, run_name=f"compress-{compression['variant']}",
                         train_seconds=seconds)


# --- the comparison ------------------------------------------------------------------------------

def gzip_size(path: str) -> int:
    """Bytes after gzip: what sparsity saves in storage and download (zeros compress)."""
    with open(path, "rb") as f:
        return len(gzip.compress(f.read(), compresslevel=9))


def score(model_dir: str, runtime: str, data: dict[str, Split],
          reference: np.ndarray | None) -> tuple[dict, np.ndarray]:
    """One row: sizes, val/test accuracy, images/s at batch 256 and top-1 agreement with ``reference``."""
    path = runtimes.check(model_dir, runtime)
    parts = [s for s in ("val", "test") if s in data]
    images = np.concatenate([data[s].images for s in parts])
    labels = np.concatenate([data[s].labels for s in parts])
    model = runtimes.load(model_dir, runtime)
    measured, probs = export.measure(model, images, labels, BENCH_BATCH)
    if len(images) < MIN_TIMED_IMAGES:
        # A few hundred images time a fast runtime in milliseconds, mostly noise: time enough
        # repeats of them (accuracy and agreement still come from the real rows above).
        measured, _ = export.measure(model, np.resize(images, (MIN_TIMED_IMAGES, *images.shape[1:])),
                                     np.resize(labels, MIN_TIMED_IMAGES), BENCH_BATCH)
    top1 = probs.argmax(1)
    row = {"runtime": runtime, "file": runtimes.RUNTIME_FILES[runtime], "bytes": os.path.getsize(path),
           "gzip_bytes": gzip_size(path), "images_per_s": measured["images_per_s"]}
    start = 0
    for s in ("val", "test"):
        n = len(data[s].labels) if s in data else 0
        row[f"{s}_accuracy"] = round(float((top1[start:start + n] == labels[start:start + n]).mean()), 5) if n else None
        row[f"{s}_rows"] = n
        start += n
    row["agreement"] = 1.0 if reference is None else round(float((top1 == reference).mean()), 5)
    return row, top1


def format_markdown(rows: list[dict]) -> str:
    lines = ["| variant | runtime | size | gzip | val acc | test acc | images/s | agreement |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        test = f"{r['test_accuracy'] * 100:.2f}%" if r["test_accuracy"] is not None else "-"
        lines.append(f"| {r['variant']} | {r['runtime']} | {r['bytes'] / 1024:,.0f} kB "
                     f"| {r['gzip_bytes'] / 1024:,.0f} kB | {r['val_accuracy'] * 100:.2f}% | {test} "
                     f"| {r['images_per_s']:,.0f} | {r['agreement'] * 100:.2f}% |")
    return "\n".join(lines)


# --- driver --------------------------------------------------------------------------------------

def run(cfg: CompressConfig) -> dict:
    """Compress the model dir ``cfg.model`` into variant model dirs and a table at ``cfg.output``."""
    cluster.configure_process_env()  # tf-keras: tfmot needs Keras 2, like the training job
    cfg.validate()
    methods = cfg.method_list()
    model_local, teacher_meta = export.open_model_dir(cfg.model)
    runtimes.check(model_local, "tf")
    loc = storage.prepare_directory_output(cfg.output, overwrite=cfg.overwrite, marker="compression.json",
                                           what="compression output")
    data_uri, manifest, data = load_data(cfg, teacher_meta)
    started = time.perf_counter()
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(loc.path.rstrip('/'))}.staging-",
                               dir=os.path.dirname(loc.path.rstrip("/")) if loc.is_local else None)
    source = {"uri": cfg.model, "version": teacher_meta["version"]}
    try:
        # (variant, runtime, model dir, compression facts, write a tflite-only dir after scoring)
        plan: list[tuple[str, str, str, dict, bool]] = [
            ("original", "tf", model_local, {"method": "none"}, False)]
        if os.path.exists(os.path.join(model_local, runtimes.RUNTIME_FILES["tflite-fp32"])):
            plan.append(("original", "tflite-fp32", model_local, {"method": "none"}, False))
        skipped = {}
        if "ptq" in methods:
            for runtime, name in PTQ_VARIANTS.items():
                src = os.path.join(model_local, runtimes.RUNTIME_FILES[runtime])
                if not os.path.exists(src):
                    skipped[name] = f"{cfg.model} has no {runtime} variant (trained with --no-tflite?)"
                    continue
                out = os.path.join(staging, name)
                _link_or_copy(src, os.path.join(out, runtimes.RUNTIME_FILES[runtime]))
                plan.append((name, runtime, out, {"method": "post-training quantization",
                                                  "reused": runtimes.RUNTIME_FILES[runtime]}, True))
        if "qat" in methods:
            t = time.perf_counter()
            out = os.path.join(staging, "qat-int8")
            facts = quantization_aware(cfg, model_local, data, out)
            log.info("quantization-aware training: %.0f s", time.perf_counter() - t)
            plan.append(("qat-int8", "tflite-int8", out, {
                "method": "quantization-aware training", "epochs": cfg.epochs, "learning_rate": cfg.learning_rate,
                "history": facts["history"], "seconds": round(time.perf_counter() - t, 1)}, True))
        work = tempfile.mkdtemp(prefix="mnist-ray-compress-")
        try:
            if "prune" in methods:
                t = time.perf_counter()
                keras_path = os.path.join(work, "pruned.keras")
                facts = prune(cfg, model_local, data, keras_path)
                compression = {"variant": "pruned", "method": "magnitude pruning", "from": source,
                               "target_sparsity": cfg.sparsity, "kernel_sparsity": facts["sparsity"],
                               "epochs": cfg.epochs, "learning_rate": cfg.learning_rate}
                export_keras_variant(keras_path, os.path.join(staging, "pruned"),
                                     model_name=teacher_meta["model"], manifest=manifest,
                                     data_uri=data_uri, data=data, history=facts["history"], compression=compression,
                                     seconds=time.perf_counter() - t)
                log.info("pruning to %.0f%% sparsity: %.0f s", 100 * facts["sparsity"], time.perf_counter() - t)
                for runtime in ("tf", "tflite-fp32", "tflite-int8"):  # int8: pruned and quantized
                    plan.append(("pruned", runtime, os.path.join(staging, "pruned"), compression, False))
            if "distill" in methods:
                t = time.perf_counter()
                keras_path = os.path.join(work, "student.keras")
                facts = distill(cfg, runtimes.load(model_local, "tf"), data, keras_path)
                compression = {"variant": "distilled", "method": "knowledge distillation", "from": source,
                               "student": cfg.student, "params": facts["params"],
                               "teacher_params": teacher_meta.get("params"),
                               "temperature": cfg.temperature, "alpha": cfg.alpha, "epochs": cfg.student_epochs,
                               "learning_rate": cfg.student_learning_rate}
                export_keras_variant(keras_path, os.path.join(staging, "distilled"), model_name=cfg.student,
                                     manifest=manifest, data_uri=data_uri, data=data,
                                     history=facts["history"], compression=compression,
                                     seconds=time.perf_counter() - t)
                log.info("distillation into %s: %.0f s", cfg.student, time.perf_counter() - t)
                for runtime in ("tf", "tflite-fp32", "tflite-int8"):
                    plan.append(("distilled", runtime, os.path.join(staging, "distilled"), compression, False))
        finally:
            shutil.rmtree(work, ignore_errors=True)

        # Every row measured here, one after the other in one process: comparable images/s.
        rows, reference = [], None
        for variant, runtime, model_dir, compression, tflite_dir in plan:
            row, top1 = score(model_dir, runtime, data, reference)
            if reference is None:
                reference = top1  # the original model on the tf runtime
            rel = "" if model_dir == model_local else os.path.relpath(model_dir, staging)
            rows.append({"variant": variant, "model_dir": loc.uri_of(rel) if rel else cfg.model, **row})
            if tflite_dir:
                write_tflite_model_dir(model_dir, runtime, teacher_meta,
                                       {"variant": variant, "from": source, **compression}, row)
        for r in rows:
            r["size_vs_original"] = round(r["bytes"] / rows[0]["bytes"], 4)
        table = format_markdown(rows)
        summary = {
            "model": source, "data": data_uri,
            "test_data": cfg.test_data or ("split 'test'" if "test" in data else None),
            "rows": {s: int(len(v.labels)) for s, v in data.items()}, "batch_size": BENCH_BATCH,
            "config": dataclasses.asdict(cfg), "skipped": skipped, "variants": rows,
            "seconds": round(time.perf_counter() - started, 1),
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        with open(os.path.join(staging, "compression.json"), "w") as f:
            json.dump(summary, f, indent=2)
        with open(os.path.join(staging, "compression.md"), "w") as f:
            f.write(f"Compression of `{cfg.model}` ({teacher_meta['version']}); images/s at batch {BENCH_BATCH}, "
                    f"agreement = same top-1 as the original on the tf runtime.\n\n{table}\n")
        print(table, flush=True)
        storage.publish_directory(staging, loc, run_id=teacher_meta["version"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    keys = ("bytes", "gzip_bytes", "val_accuracy", "test_accuracy", "images_per_s", "agreement")
    return {"output": cfg.output, "model_version": teacher_meta["version"], "seconds": summary["seconds"],
            "variants": {f"{r['variant']}/{r['runtime']}": {k: r[k] for k in keys} for r in rows},
            "skipped": skipped}
