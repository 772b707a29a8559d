"""export: a trained Keras model -> a versioned model dir, written aside and published last.

    MODEL_DIR/
      model.keras            the Keras model (tf-keras)
      saved_model/           inference SavedModel (TF Serving, `tf.saved_model.load`)
      tflite/{float32,float16,dynamic,int8}.tflite
      variants.json          size, validation accuracy, images/s and top-1 agreement of every variant
      curves.png             loss and accuracy per epoch
      metadata.json          name, version, classes, input and preprocessing spec, metrics, data, versions
      _SUCCESS               written last: readers refuse a model dir without it
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import os
import platform
import shutil
import tempfile
import time

import numpy as np
import pyarrow.fs as pafs

from mnist_ray import __version__
from mnist_ray.images import preprocess
from mnist_ray.model import models, runtimes
from mnist_ray.plumbing import storage
from mnist_ray.errors import MnistRayError

FORMAT_VERSION = 1
CLASS_NAMES = {
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
}
DIGITS = [str(i) for i in range(10)]
# What inference must do to an image before the model sees it (read by `mnist-ray infer`).
# ``version`` is preprocess.PREPROCESS_VERSION: stored pixels of another version are recomputed.
PREPROCESSING = {"color": "grayscale", "size": [28, 28], "polarity": "white-on-black",
                 "scale": "pixels / 255", "dtype": "float32", "layout": "NHWC",
                 "version": preprocess.PREPROCESS_VERSION}
PRODUCER = "mnist-ray train --data SHARDS --output MODEL_DIR"
MODEL_FILES = ("model.keras", "metadata.json")


def check_output(uri: str, *, overwrite: bool) -> storage.Location:
    """Fail before training if the model dir exists (without --overwrite) or cannot be written."""
    return storage.prepare_directory_output(uri, overwrite=overwrite, marker="metadata.json", what="model dir")


def open_model_dir(uri: str) -> tuple[str, dict]:
    """A complete model dir as a local directory (downloaded when remote) and its metadata."""
    loc = storage.resolve(uri)
    try:
        if loc.fs.get_file_info(loc.path).type == pafs.FileType.NotFound:
            raise MnistRayError(f"no model dir at {uri}: train one with `{PRODUCER}`")
        if not storage.is_complete(loc):
            raise MnistRayError(f"{uri} is not a complete model dir (no _SUCCESS): its export did not "
                                f"finish; rerun `{PRODUCER}` with --overwrite")
        if loc.is_local:
            local = loc.path
        else:
            local = tempfile.mkdtemp(prefix="mnist-ray-model-")
            pafs.copy_files(loc.path, local, source_filesystem=loc.fs,
                            destination_filesystem=pafs.LocalFileSystem())
        with open(os.path.join(local, "metadata.json")) as f:
            metadata = json.load(f)
    except MnistRayError:
        raise
    except (OSError, json.JSONDecodeError) as e:
        raise MnistRayError(f"cannot read the model dir {uri}: {e}") from e
    if metadata.get("format_version") != FORMAT_VERSION:
        raise MnistRayError(f"{uri} has model dir format {metadata.get('format_version')}, this mnist-ray "
                            f"reads format {FORMAT_VERSION}: re-export it with this version")
    return local, metadata


def weights_version(model) -> str:
    """Changes whenever any weight changes."""
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()[:12]


def _numpy(dataset, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for batch in dataset.iter_batches(batch_size=4096, batch_format="numpy"):
        images.append(batch["image"])
        labels.append(batch["label"])
        if limit and sum(len(x) for x in images) >= limit:
            break
    images, labels = np.concatenate(images), np.concatenate(labels)
    return (images[:limit], labels[:limit]) if limit else (images, labels)


def convert_tflite(model, calibration: np.ndarray) -> dict[str, bytes]:
    """The four post-training TFLite variants of a Keras model, by runtime name."""
    import tensorflow as tf

    def converter():
        return tf.lite.TFLiteConverter.from_keras_model(model)

    out = {"tflite-fp32": converter().convert()}
    c = converter()
    c.optimizations = [tf.lite.Optimize.DEFAULT]
    c.target_spec.supported_types = [tf.float16]
    out["tflite-fp16"] = c.convert()
    c = converter()
    c.optimizations = [tf.lite.Optimize.DEFAULT]  # int8 weights, float activations
    out["tflite-dynamic"] = c.convert()
    c = converter()
    c.optimizations = [tf.lite.Optimize.DEFAULT]
    c.representative_dataset = lambda: ([calibration[i:i + 1]] for i in range(len(calibration)))
    c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    c.inference_input_type = tf.int8
    c.inference_output_type = tf.int8
    out["tflite-int8"] = c.convert()
    return out


def agreement_images(val_images: np.ndarray, train_dataset) -> np.ndarray:
    """The images agreement is measured on: every validation image, then training images up to
    ``runtimes.MIN_AGREEMENT_IMAGES`` (agreement compares two models, so no labels are needed)."""
    need = runtimes.MIN_AGREEMENT_IMAGES - len(val_images)
    if need <= 0 or train_dataset is None:
        return val_images
    extra, _ = _numpy(train_dataset, limit=need)
    return np.concatenate([val_images, extra])


def top1_agreement(runtime, images: np.ndarray, reference: np.ndarray) -> float:
    """Share of ``images`` on which ``runtime``'s top class is ``reference``'s (top classes)."""
    return round(float((runtimes.predict_batched(runtime, images).argmax(1) == reference).mean()), 5)


def measure(runtime, images: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> dict:
    runtime(images[:batch_size])  # warm-up: allocation, tracing
    started = time.perf_counter()
    probs = runtimes.predict_batched(runtime, images, batch_size)
    seconds = time.perf_counter() - started
    return {"val_accuracy": round(float((probs.argmax(1) == labels).mean()), 5),
            "images_per_s": round(len(images) / seconds, 1)}, probs


def plot_curves(history: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["loss"] for h in history], "o-", label="train")
    ax1.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    ax1.set(title="loss", xlabel="epoch")
    ax2.plot(epochs, [h["accuracy"] for h in history], "o-", label="train")
    ax2.plot(epochs, [h["val_accuracy"] for h in history], "o-", label="val")
    ax2.set(title="accuracy", xlabel="epoch")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(variants: dict) -> str:
    lines = [f"{'variant':<16}{'size':>12}{'val acc':>10}{'images/s':>12}{'agreement':>11}"]
    for name, v in variants.items():
        lines.append(f"{name:<16}{v['bytes'] / 1024:>10.0f}kB{v['val_accuracy'] * 100:>9.2f}%"
                     f"{v['images_per_s']:>12,.0f}{v.get('agreement', 1.0) * 100:>10.2f}%")
    return "\n".join(lines)


def _versions() -> dict:
    import ray
    import tensorflow as tf
    import tf_keras

    return {"mnist_ray": __version__, "tensorflow": tf.__version__, "tf_keras": tf_keras.__version__,
            "ray": ray.__version__, "numpy": np.__version__, "python": platform.python_version()}


def export(keras_path: str, output: str, *, history: list[dict], manifest: dict, val_dataset,
           calibration_dataset, train_config: dict, run_name: str, train_seconds: float,
           tflite: bool = True, overwrite: bool = False) -> dict:
    """Write the model dir for ``keras_path`` to ``output`` and publish it atomically."""
    model = models.keras().models.load_model(keras_path)
    val_images, val_labels = _numpy(val_dataset)
    loc = check_output(output, overwrite=overwrite)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(loc.path.rstrip('/'))}.staging-",
                               dir=os.path.dirname(loc.path) if loc.is_local else None)
    try:
        shutil.copy(keras_path, os.path.join(staging, "model.keras"))
        with contextlib.redirect_stdout(io.StringIO()):  # it prints the whole signature
            model.export(os.path.join(staging, "saved_model"))
        variants = {"tf": {"file": "model.keras", "bytes": os.path.getsize(keras_path)}}
        keras_runtime = runtimes.KerasRuntime(keras_path)
        m, _ = measure(keras_runtime, val_images, val_labels)
        variants["tf"].update(m, agreement=1.0)
        # Top-1 agreement of each variant with the float model, on >= 5,000 images when the data
        # has them: what `--runtime auto` decides by (runtimes.resolve).
        agreement = {"reference": "tf", "images": 0, "top1": {}}
        if tflite:
            calibration, _ = _numpy(calibration_dataset, limit=500)
            compared = agreement_images(val_images, calibration_dataset)
            reference = runtimes.predict_batched(keras_runtime, compared).argmax(1)
            agreement["images"] = int(len(compared))
            os.makedirs(os.path.join(staging, "tflite"))
            for runtime, data in convert_tflite(model, calibration).items():
                rel = runtimes.RUNTIME_FILES[runtime]
                with open(os.path.join(staging, rel), "wb") as f:
                    f.write(data)
                variant = runtimes.TFLiteRuntime(os.path.join(staging, rel))
                m, _ = measure(variant, val_images, val_labels)
                agreement["top1"][runtime] = top1_agreement(variant, compared, reference)
                variants[runtime] = {"file": rel, "bytes": len(data), **m, "agreement": agreement["top1"][runtime],
                                     "agreement_images": agreement["images"]}
        with open(os.path.join(staging, "variants.json"), "w") as f:
            json.dump(variants, f, indent=2)
        plot_curves(history, os.path.join(staging, "curves.png"))
        source = manifest.get("source", "")
        metadata = {
            "format_version": FORMAT_VERSION,
            "model": train_config["model"],
            "version": f"{train_config['model']}-{weights_version(model)}",
            "class_names": CLASS_NAMES.get(source, DIGITS),
            "input": {"shape": [None, 28, 28, 1], "dtype": "float32", "range": [0.0, 1.0]},
            "output": {"shape": [None, 10], "kind": "probabilities"},
            "preprocessing": PREPROCESSING,
            "metrics": {"final": history[-1], "history": history,
                        "val_accuracy": variants["tf"]["val_accuracy"], "val_rows": int(len(val_labels)),
                        "train_seconds": round(train_seconds, 1)},
            "data": {"uri": train_config["data"], "source": source, "fingerprint": manifest["fingerprint"]},
            "params": int(model.count_params()),
            "variants": variants,
            "agreement": agreement,
            "train_config": train_config,
            "run_name": run_name,
            "versions": _versions(),
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        with open(os.path.join(staging, "metadata.json"), "w") as f:
            json.dump(metadata, f, indent=2)
        auto = runtimes.resolve(staging, on_gpu=False, metadata=metadata)
        print(format_table(variants) + f"\n--runtime auto on CPU: {auto[0]} ({auto[1]})", flush=True)
        storage.publish_directory(staging, loc, run_id=metadata["version"])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"version": metadata["version"], "val_accuracy": variants["tf"]["val_accuracy"],
            "agreement": agreement, "auto_runtime_on_cpu": {"runtime": auto[0], "reason": auto[1]},
            "variants": {k: {x: v[x] for x in ("bytes", "val_accuracy", "images_per_s")}
                         for k, v in variants.items()}}
