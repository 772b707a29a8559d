"""bench's training throughput: `mnist-ray train` against a plain ``model.fit`` of the same recipe in
one process (1 and 2 workers of the throughput model; the ``default`` recipe in the default
layout); and the load test of `mnist-ray serve`."""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np
import pyarrow as pa

from mnist_ray.bench.work import run_command
from mnist_ray.formats import shards
from mnist_ray.plumbing import storage


def epoch_rates(history: list[dict]) -> float:
    """images/s in the steady state: over the second half of the epochs, or after the first of 3
    (the first pays for tracing, and the next may still warm up)."""
    later = history[max(1, len(history) // 2):]
    return round(sum(h["images_per_s"] for h in later) / len(later), 1)


def beyond_epochs(summary: dict, history: list[dict], wall: float) -> float:
    """A training command's wall time that is not epochs: wall - epochs x the steady epoch time,
    the model's export counted apart (as the training issue defines it)."""
    later = history[max(1, len(history) // 2):]
    steady = sum(h["seconds"] for h in later) / len(later)
    return round(wall - summary["export_seconds"] - len(history) * steady, 1)


def recipe_arrays(cfg, train_data: str) -> dict[str, np.ndarray]:
    """The rows the training command feeds its workers, decoded in this process: the same
    preprocessing, degraded variants and printed digits (``train.decode_for_training``)."""
    from mnist_ray.training import train

    _, manifest = shards.open_shards(train_data)
    splits, holdout, _ = train.check_data(cfg, manifest)
    variants = train.recipe_value(cfg.model, "degrade_rate") or train.recipe_value(cfg.model, "printed_per_class")
    table = train.decode_for_training(shards.read_table(train_data, columns=["id", "image", "label", "split"]),
                                      splits, cfg.val_split, holdout, variant_seed=cfg.seed if variants else None)
    if train.recipe_value(cfg.model, "printed_per_class"):
        table = pa.concat_tables([table, train.printed_rows(train.recipe_value(cfg.model, "printed_per_class"), cfg.seed)])
    table = table.combine_chunks()
    return {c: (table[c].chunk(0).to_numpy_ndarray() if c != "label" else table[c].to_numpy())
            for c in table.column_names}


def plain_fit_rate(model: str, train_data: str, epochs: int, batch_size: int | None, augment: bool | None) -> dict:
    """The training command's recipe (model, optimizer, weight EMA, degraded variants, augmentation,
    input pipeline) in this one process with TensorFlow's default threads: ``model.fit`` on the
    epoch datasets of ``train_worker``, without Ray."""
    import tensorflow as tf

    from mnist_ray.training import feed, train, train_worker

    cfg = train.TrainConfig(data=train_data, model=model, epochs=epochs, batch_size=batch_size, augment=augment,
                            workers=1).resolved()
    arrays = recipe_arrays(cfg, train_data)
    config = train.loop_config(cfg, len(arrays["label"]), cpus=float(os.cpu_count()), feeds={})
    rows = feed.Feed.from_arrays({c: arrays[c] for c in train_worker.train_columns(config)})
    net, _, _ = train_worker.restore_or_build_model(config, tf.distribute.get_strategy(), None)
    ema = train_worker.WeightEMA(net, config["ema_momentum"]) if config["ema_momentum"] else None
    history = []
    for epoch in range(epochs):
        started = time.perf_counter()
        net.fit(train_worker.epoch_dataset(rows, config, epoch, 0), epochs=1, verbose=0,
                callbacks=[ema.callback()] if ema else [])
        seconds = time.perf_counter() - started
        history.append({"epoch": epoch + 1, "images_per_s": rows.rows // cfg.batch_size * cfg.batch_size / seconds})
    return {"how": f"model.fit, one process ({model})", "model": model, "workers": 0,
            "images_per_s": epoch_rates(history), "rows": rows.rows}


def ray_train_rate(model: str, train_data: str, out: str, epochs: int, flags: list[str], how: str) -> dict:
    """`mnist-ray train` in a fresh process: its steady images/s, wall time and time beyond epochs."""
    summary, wall, _ = run_command("train", "--data", train_data, "--model", model, "--output", out,
                                   "--epochs", str(epochs), "--no-tflite", "--overwrite", *flags)
    with open(os.path.join(out, "metadata.json")) as f:
        history = json.load(f)["metrics"]["history"]
    return {"how": how, "model": model, "layout": summary["layout"], "images_per_s": epoch_rates(history),
            "wall_seconds": round(wall, 1), "beyond_epochs_seconds": beyond_epochs(summary, history, wall)}


def train_runs(cfg, train_data: str, work: str) -> list[dict]:
    """Ray Train against a plain fit of the same recipe, run by run in this order: the
    throughput model (``--train-model``, no augmentation) with 1 and 2 workers, then the
    ``default`` recipe with its own flags and the default worker layout."""
    size = ["--batch-size", str(cfg.train_batch_size), "--no-augment"]
    runs = [plain_fit_rate(cfg.train_model, train_data, cfg.train_epochs, cfg.train_batch_size, False)]
    for workers in (1, 2):
        runs.append(ray_train_rate(cfg.train_model, train_data, os.path.join(work, f"train-{workers}w"),
                                   cfg.train_epochs, [*size, "--workers", str(workers)],
                                   f"Ray Train, {workers} worker{'s' * (workers > 1)} ({cfg.train_model})"))
    runs.append(plain_fit_rate("default", train_data, cfg.recipe_epochs, None, None))
    runs.append(ray_train_rate("default", train_data, os.path.join(work, "train-default"), cfg.recipe_epochs, [],
                               "Ray Train, default layout (default)"))
    for r in runs:
        plain = next(p for p in runs if p["model"] == r["model"] and p["workers"] == 0) if "layout" in r else r
        r["vs_plain_fit"] = round(r["images_per_s"] / plain["images_per_s"], 3)
    return runs


FEED_BASE_ROWS = 15_000  # the in-memory run's training rows per split before the 10 % held out


def feed_memory(cfg, work: str) -> dict:
    """Peak worker memory of `mnist-ray train` whose rows fill the feed's memory budget (held in
    memory) against 4x those rows under the same budget (streamed): the streamed feed's memory
    must not grow with the rows."""
    runs = []
    budget_mb = None
    for factor in (1, 4):
        data = os.path.join(work, f"feed-data-{factor}x")
        if not storage.is_complete(storage.resolve(data)):
            run_command("prepare", "--source", cfg.feed_source, "--output", data, "--overwrite",
                        "--limit", str(FEED_BASE_ROWS * factor))
        rows = sum(s["rows"] for name, s in shards.open_shards(data)[1]["splits"].items() if name == "train")
        if budget_mb is None:  # the 1x rows after the holdout, as 28x28 floats, fill the budget
            budget_mb = str(math.ceil(rows * 0.9 * 28 * 28 * 4 / 2**20 * 1.02))
        out = os.path.join(work, f"feed-{factor}x")
        summary, wall, memory = run_command(
            "train", "--data", data, "--model", "cnn", "--epochs", "2", "--batch-size", "64", "--no-augment",
            "--no-tflite", "--overwrite", "--output", out, "--storage-path", os.path.join(work, "feed-runs"),
            "--feed-memory-mb", budget_mb, sample_memory=True)
        with open(os.path.join(out, "metadata.json")) as f:
            feed_mode = json.load(f)["train_config"]["layout"]["feed"]
        runs.append({"rows": rows, "factor": factor, "feed": feed_mode, "budget_mb": float(budget_mb),
                     "wall_seconds": round(wall, 1), **memory})
    for r in runs:  # the training worker's own memory (Ray Data's decode workers are others)
        r["train_worker_uss_peak_mb"] = r["uss_peak_mb_by_kind"].get("RayTrainWorker", 0)
    runs[1]["train_worker_uss_vs_1x"] = round(runs[1]["train_worker_uss_peak_mb"] / runs[0]["train_worker_uss_peak_mb"], 3)
    return {"source": cfg.feed_source, "runs": runs}


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
