"""predict: a handful of image files -> class and the ten class percentages each (no Ray).

For a few files a user has at hand; millions go through `mnist-ray infer`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from mnist_ray.images import preprocess
from mnist_ray.model import export, runtimes
from mnist_ray.plumbing import cluster
from mnist_ray.errors import MnistRayError


@dataclass(frozen=True)
class PredictConfig:
    images: tuple[str, ...] = field(default=(), metadata={
        "help": "image files (PNG, JPEG, ...; photos and scans welcome)", "metavar": "IMAGE", "positional": True})
    model: str = field(default="out/mnist-sample/model", metadata={"help": "model dir (mnist-ray train)"})
    runtime: str = field(default=runtimes.AUTO, metadata={
        "help": " | ".join(runtimes.CHOICES) + " (auto: as mnist-ray infer picks it, so both give the same answer)"})
    save_preprocessed: str | None = field(default=None, metadata={
        "help": "a folder to save the 28x28 images the model saw (PNG, one per input)"})

    PRESETS: ClassVar[dict] = {}


def run(cfg: PredictConfig) -> dict:
    cluster.configure_process_env()
    files = list(cfg.images)
    if not files:
        raise MnistRayError("give the image files: mnist-ray predict --model MODEL_DIR a.png b.jpg")
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise MnistRayError(f"no such file: {', '.join(missing)}")
    runtimes.check_name(cfg.runtime)
    local, metadata = export.open_model_dir(cfg.model)
    on_gpu = cfg.runtime == runtimes.AUTO and runtimes.local_gpu()  # only auto asks whether there is a GPU
    runtime, reason = runtimes.choose(cfg.runtime, local, on_gpu=on_gpu, metadata=metadata)
    images = []
    for f in files:
        with open(f, "rb") as fh:
            images.append(fh.read())
    pixels, errors = preprocess.prepare_batch(images)
    probs = runtimes.load(local, runtime)(pixels)
    classes = metadata["class_names"]
    if cfg.save_preprocessed:
        from PIL import Image

        os.makedirs(cfg.save_preprocessed, exist_ok=True)
    results = []
    for i, f in enumerate(files):
        if errors[i]:
            print(f"{f}: error: {errors[i]}")
            results.append({"file": f, "error": errors[i]})
            continue
        top = int(probs[i].argmax())
        percents = " ".join(f"{classes[c]}:{probs[i, c] * 100:.1f}%" for c in range(len(classes)))
        print(f"{f}: {classes[top]} ({probs[i, top] * 100:.1f}%)  [{percents}]")
        result = {"file": f, "prediction": classes[top], "confidence": round(float(probs[i, top]), 4),
                  "percentages": {classes[c]: round(float(probs[i, c]) * 100, 2) for c in range(len(classes))}}
        if cfg.save_preprocessed:
            seen = os.path.join(cfg.save_preprocessed, f"{i:03d}-{os.path.splitext(os.path.basename(f))[0]}.png")
            Image.fromarray((pixels[i, :, :, 0] * 255).round().astype(np.uint8)).save(seen)
            result["preprocessed"] = seen
        results.append(result)
    return {"model_version": metadata["version"], "runtime": runtime, "runtime_reason": reason, "results": results}
