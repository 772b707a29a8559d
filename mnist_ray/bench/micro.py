"""bench's (a) naive loop, (b) compiled forward pass and every runtime's forward rate, on a few
thousand of the seed images in this process."""

from __future__ import annotations

import os
import time

import numpy as np
import pyarrow as pa

from mnist_ray.formats import shards
from mnist_ray.images import preprocess
from mnist_ray.model import runtimes


def rate(fn, images: int, min_seconds: float = 2.0) -> float:
    """images/s of ``fn()`` (which processes ``images`` images), after one warm-up call."""
    fn()
    runs, started = 0, time.perf_counter()
    while True:
        fn()
        runs += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return runs * images / elapsed


def naive_rate(model_path: str, encoded: list[bytes]) -> float:
    """(a) The seed-000 loop: decode each PNG with Pillow, ``model.predict`` on batches of 32."""
    from mnist_ray.model import models

    model = models.keras().models.load_model(model_path, compile=False)

    def loop():
        for i in range(0, len(encoded), 32):
            batch = np.stack([preprocess.decode_gray(b) for b in encoded[i:i + 32]]).astype("float32") / 255.0
            model.predict(batch[..., None], verbose=0)

    return rate(loop, len(encoded), min_seconds=0)  # one timed pass: it is slow enough


def forward_rate(model_dir: str, runtime: str, pixels: np.ndarray, batch_size: int) -> float:
    """(b) for ``tf``: the compiled forward pass (traced once) on decoded float32 tensors."""
    model = runtimes.load(model_dir, runtime)
    x = preprocess.normalize(pixels)
    return rate(lambda: runtimes.predict_batched(model, x, batch_size), len(x))


def runtime_batch(cfg, runtime: str) -> int:
    """The batch size of ``runtime``: the flag, else what ``mnist-ray infer`` uses by default."""
    from mnist_ray.inference.infer import InferConfig

    return cfg.batch_size or InferConfig(runtime=runtime).batch()


def micro(cfg, model_dir: str, seed: pa.Table) -> dict:
    take = seed.slice(0, cfg.micro_images)
    pixels = shards.pixels_numpy(take["pixels"])
    labels = take["label"].to_numpy()
    forward = {}
    for runtime in cfg.runtimes.split(","):
        forward[runtime] = round(forward_rate(model_dir, runtime, pixels, runtime_batch(cfg, runtime)))
    naive = naive_rate(os.path.join(model_dir, runtimes.RUNTIME_FILES["tf"]), take["image"].to_pylist())
    accuracy = {r: round(float((runtimes.predict_batched(runtimes.load(model_dir, r), preprocess.normalize(pixels))
                                .argmax(1) == labels).mean()), 4) for r in cfg.runtimes.split(",")}
    return {"images": take.num_rows, "naive_images_per_s": round(naive), "ceiling_images_per_s": forward["tf"]
            if "tf" in forward else round(forward_rate(model_dir, "tf", pixels, runtime_batch(cfg, "tf"))),
            "forward_images_per_s": forward, "accuracy": accuracy,
            "batch_sizes": {r: runtime_batch(cfg, r) for r in {*cfg.runtimes.split(","), "tf"}}}
