"""bench's training throughput: a plain ``model.fit`` against 1 and 2 Ray Train workers, same model,
data and batch; and the load test of `mnist-ray serve`."""

from __future__ import annotations

import json
import os
import time

import pyarrow as pa
import pyarrow.compute as pc

from mnist_ray.bench.work import run_command
from mnist_ray.formats import shards
from mnist_ray.images import preprocess


def epoch_rates(history: list[dict]) -> float:
    """images/s over the epochs after the first (the first pays for tracing and warm-up)."""
    later = history[1:]
    return round(sum(h["images_per_s"] for h in later) / len(later), 1)


def plain_fit_rate(cfg, train_data: str) -> dict:
    """The same model, data and batch size as the Ray Train runs, in one process: ``model.fit``."""
    import tensorflow as tf

    from mnist_ray.model import models

    table = shards.read_table(train_data, columns=["pixels", "label", "split"])
    table = table.filter(pc.equal(table["split"], "train"))
    x, y = preprocess.normalize(shards.pixels_numpy(table["pixels"])), table["label"].to_numpy().astype("int64")
    model = models.create_model(cfg.train_model, seed=0)
    model.compile(optimizer=models.keras().optimizers.Adam(1e-3),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    ds = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=0).batch(cfg.train_batch_size).prefetch(2)
    history = []
    for epoch in range(cfg.train_epochs):
        started = time.perf_counter()
        model.fit(ds, epochs=1, verbose=0)
        history.append({"epoch": epoch + 1, "images_per_s": len(x) / (time.perf_counter() - started)})
    return {"how": "model.fit, one process", "workers": 0, "images_per_s": epoch_rates(history), "rows": len(x)}


def train_runs(cfg, train_data: str, work: str) -> list[dict]:
    results = [plain_fit_rate(cfg, train_data)]
    for workers in (1, 2):
        out = os.path.join(work, f"train-{workers}w")
        summary, wall, _ = run_command("train", "--data", train_data, "--model", cfg.train_model, "--output", out,
                                    "--epochs", str(cfg.train_epochs), "--batch-size", str(cfg.train_batch_size),
                                    "--workers", str(workers), "--no-tflite", "--overwrite", "--no-augment")
        with open(os.path.join(out, "metadata.json")) as f:
            history = json.load(f)["metrics"]["history"]
        results.append({"how": f"Ray Train, {workers} worker{'s' * (workers > 1)}", "workers": workers,
                        "images_per_s": epoch_rates(history), "wall_seconds": round(wall, 1)})
    return results


# --- online serving -------------------------------------------------------------------------------

def serving(cfg, model_dir: str, seed: pa.Table, work: str) -> dict:
    """The load test of `mnist-ray serve` (with and without batching) against the naive server."""
    from mnist_ray.serving import loadtest

    image_dir = os.path.join(work, "serve-images")
    os.makedirs(image_dir, exist_ok=True)
    for i, data in enumerate(seed["image"].slice(0, 200).to_pylist()):  # real test digits, PNG
        with open(os.path.join(image_dir, f"{i:03d}.png"), "wb") as f:
            f.write(data)
    return {"model": cfg.serve_model, **loadtest.compare(model_dir, image_dir, cfg.serve_requests,
                                                          cfg.concurrency_list(), replicas=cfg.serve_replicas)}
