"""Scoring of `mnist-ray compress`: each variant on a runtime (size, accuracy, images/s, agreement), and the table."""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

import numpy as np

from mnist_ray.model import export, runtimes

BENCH_BATCH = 256  # the batch size of every images/s figure (as export.measure and the README)
MIN_TIMED_IMAGES = 10_240


@dataclass
class ModelInputs:
    """One split of the data a variant is fine-tuned and scored on, as the model takes it."""
    images: np.ndarray  # float32 (N, 28, 28, 1) in [0, 1]
    labels: np.ndarray  # int32 (N,)


def gzip_size(path: str) -> int:
    """Bytes after gzip: what sparsity saves in storage and download (zeros compress)."""
    with open(path, "rb") as f:
        return len(gzip.compress(f.read(), compresslevel=9))


def score(model_dir: str, runtime: str, data: dict[str, ModelInputs],
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
