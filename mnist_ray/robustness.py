"""robustness: a model dir's accuracy on four kinds of input it was not trained on (no Ray).

    (a) mnist    the MNIST test set, as stored (28x28 PNG)
    (b) uci      real handwritten digits of another origin: UCI optical digits (scikit-learn's
                 ``load_digits``: 1,797 8x8 scans, 17 grey levels), enlarged to 32 or 64 px,
                 half dark on light
    (c) printed  printed digits in synthetic.MEASURE_FONTS, which training never renders
    (d) photos   synthetic phone photos of MNIST test digits: paper texture, uneven light,
                 noise, blur, a slight turn and perspective, JPEG, and an EXIF rotation

These sets measure; nothing here trains a model or sets a threshold. Every image goes through
the bytes -> pixels path inference uses (``preprocess.prepare_pixels``), so an image it cannot
read counts as an error row (and as wrong in the accuracy), a "blank" one as a blank row.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from PIL import Image, ImageFilter

from mnist_ray import cluster, export, preprocess, runtimes, synthetic
from mnist_ray.errors import MnistRayError

SETS = ("mnist", "uci", "printed", "photos")
# The repo's copy of the MNIST test set (the one place that names it).


@dataclass(frozen=True)
class RobustnessConfig:
    model: str = field(default="out/mnist-sample/model", metadata={"help": "model dir (mnist-ray train)"})
    runtime: str = field(default="tf", metadata={"help": " | ".join(runtimes.RUNTIME_FILES)})
    sets: str = field(default=",".join(SETS), metadata={"help": "which sets: " + ",".join(SETS)})
    limit: int | None = field(default=None, metadata={"help": "at most this many images per set (smoke runs)"})
    photos: int = field(default=2000, metadata={"help": "photos of the first N MNIST test digits (set d)"})
    printed_per_digit: int = field(default=20, metadata={"help": "renderings of each digit in each font (set c)"})
    output: str | None = field(default=None, metadata={"help": "write the report as JSON here"})

    PRESETS: ClassVar[dict] = {"default": {}, "smoke": {"limit": 100, "photos": 100, "printed_per_digit": 2}}

    def set_list(self) -> list[str]:
        return [s for s in self.sets.split(",") if s]

    def validate(self) -> None:
        if not self.set_list() or not set(self.set_list()) <= set(SETS):
            raise MnistRayError(f"--sets {self.sets!r}: choose from {', '.join(SETS)}")
        if (self.limit is not None and self.limit < 1) or self.photos < 1 or self.printed_per_digit < 1:
            raise MnistRayError("--limit, --photos and --printed-per-digit must be positive")


# --- the sets: encoded images and their labels -----------------------------------------------

def mnist_test_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 MNIST test digits (uint8 (N, 28, 28)) and labels: the copy shipped as package data."""
    from mnist_ray import datasets

    data = datasets.mnist_test()
    test = data.splits["test"]
    return test.images, test.labels.astype(np.int64)


def _png(gray: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, format="PNG")
    return buf.getvalue()


def mnist_set() -> tuple[list[bytes], np.ndarray]:
    images, labels = mnist_test_arrays()
    return preprocess.encode_png(np.ascontiguousarray(images)), labels


def uci_set() -> tuple[list[bytes], np.ndarray]:
    """UCI optical digits: 8x8, 0-16 -> 0-255, enlarged to 32 (bilinear) or 64 px (nearest:
    blocky, as a plain upscale shows them), every other pair dark on light."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = []
    for i, image in enumerate(digits.images):
        gray = np.round(image * (255 / 16)).astype(np.uint8)
        side, resample = (32, Image.Resampling.BILINEAR) if i % 2 == 0 else (64, Image.Resampling.NEAREST)
        big = np.asarray(Image.fromarray(gray).resize((side, side), resample))
        out.append(_png(255 - big if (i // 2) % 2 else big))
    return out, digits.target.astype(np.int64)


def printed_set(per_digit: int) -> tuple[list[bytes], np.ndarray]:
    """Every digit ``per_digit`` times in every font of synthetic.MEASURE_FONTS (random size,
    weight, turn, shades, blur, noise, polarity; seeded)."""
    rng = np.random.default_rng(1717)
    images, labels = [], []
    for font in synthetic.MEASURE_FONTS:
        path = synthetic.font_path(font)
        for _ in range(per_digit):
            for digit in range(10):
                images.append(_png(synthetic.render(digit, path, rng)))
                labels.append(digit)
    return images, np.array(labels, np.int64)


def photo_of(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """A phone photo of a 28x28 digit written on paper: JPEG, stored sideways with an EXIF
    orientation that turns it upright, as phones do."""
    side = int(rng.integers(200, 480))
    yy, xx = np.mgrid[0:side, 0:side] / side
    # Paper: a tint, fibres (noise at a few scales), light falling off across the page.
    paper = rng.uniform(175, 235) + rng.uniform(-35, 35) * (xx - 0.5) + rng.uniform(-35, 35) * (yy - 0.5)
    paper -= rng.uniform(0, 30) * ((xx - rng.uniform(0, 1)) ** 2 + (yy - rng.uniform(0, 1)) ** 2)  # a vignette
    for scale in (4, 16):
        grain = rng.normal(0, 1, (side // scale + 1, side // scale + 1)).astype(np.float32)
        paper += rng.uniform(1, 5) * np.asarray(Image.fromarray(grain, "F").resize((side, side), Image.Resampling.BICUBIC))
    size = int(side * rng.uniform(0.35, 0.75))
    ink = Image.fromarray(digit).resize((size, size), Image.Resampling.BICUBIC).rotate(
        rng.uniform(-10, 10), resample=Image.Resampling.BICUBIC)
    ink = np.asarray(ink, np.float32) / 255
    top, left = (int(rng.integers(0, side - size + 1)) for _ in range(2))
    page = paper.copy()
    page[top:top + size, left:left + size] *= 1 - rng.uniform(0.55, 0.9) * ink
    page += rng.normal(0, rng.uniform(2, 7), page.shape)
    rgb = np.clip(page[..., None] * rng.uniform(0.85, 1.0, 3), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb)
    # A slight perspective: the phone not quite parallel to the page.
    d = side * 0.06
    quad = [rng.uniform(0, d), rng.uniform(0, d), rng.uniform(0, d), side - rng.uniform(0, d),
            side - rng.uniform(0, d), side - rng.uniform(0, d), side - rng.uniform(0, d), rng.uniform(0, d)]
    image = image.transform((side, side), Image.Transform.QUAD, quad, Image.Resampling.BILINEAR)
    image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.8)))
    orientation = int(rng.choice([1, 3, 6, 8]))
    stored = {1: image, 3: image.transpose(Image.Transpose.ROTATE_180),
              6: image.transpose(Image.Transpose.ROTATE_90), 8: image.transpose(Image.Transpose.ROTATE_270)}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=int(rng.integers(55, 92)), exif=exif)
    return buf.getvalue()


def photos_set(n: int) -> tuple[list[bytes], np.ndarray]:
    images, labels = mnist_test_arrays()
    return ([photo_of(images[i], np.random.default_rng([17, zlib.crc32(str(i).encode())])) for i in range(n)],
            labels[:n])


def photo_count(cfg: RobustnessConfig) -> int:
    return min(cfg.photos, cfg.limit or cfg.photos)


def load_set(name: str, cfg: RobustnessConfig) -> tuple[list[bytes], np.ndarray]:
    """A set's encoded images and labels (the photos: of the first ``photo_count`` test digits)."""
    encoded, labels = {"mnist": mnist_set, "uci": uci_set,
                       "printed": lambda: printed_set(cfg.printed_per_digit),
                       "photos": lambda: photos_set(photo_count(cfg))}[name]()
    if name != "photos" and cfg.limit is not None and cfg.limit < len(labels):  # evenly spaced: every class of a sorted set
        keep = np.unique(np.linspace(0, len(labels) - 1, cfg.limit).round().astype(np.int64))
        encoded, labels = [encoded[i] for i in keep], labels[keep]
    return encoded, labels


# --- scoring ---------------------------------------------------------------------------------

def score(runtime, encoded: list[bytes], labels: np.ndarray) -> dict:
    """Accuracy over all rows (an error row counts as wrong), error and blank rows, the classes
    most often mistaken for others."""
    pixels, errors = preprocess.prepare_pixels(encoded)
    ok = np.array([e is None for e in errors])
    predictions = np.full(len(labels), -1)
    if ok.any():
        predictions[ok] = runtimes.predict_batched(runtime, preprocess.normalize(pixels[ok])).argmax(1)
    wrong = predictions != labels
    confused = np.bincount(predictions[wrong & ok], minlength=10)
    return {"rows": int(len(labels)), "accuracy": round(float((~wrong).mean()), 4),
            "accuracy_of_readable": round(float((~wrong[ok]).mean()), 4) if ok.any() else None,
            "error_rows": int((~ok).sum()),
            "blank_rows": sum(1 for e in errors if e and e.startswith("blank")),
            "errors": sorted({e for e in errors if e})[:5],
            "most_read_as": {str(c): int(confused[c]) for c in np.argsort(-confused)[:3] if confused[c]}}


TABLE_HEADER = ("| set | rows | accuracy | error rows | of them blank | wrong answers most often read as |\n"
                "| --- | ---: | ---: | ---: | ---: | --- |")


def format_row(name: str, r: dict) -> str:
    common = ", ".join(f"{c} ({n})" for c, n in r["most_read_as"].items())
    return (f"| {name} | {r['rows']:,} | {r['accuracy'] * 100:.2f} % | {r['error_rows']} | "
            f"{r['blank_rows']} | {common} |")


def format_table(report: dict) -> str:
    return "\n".join([TABLE_HEADER] + [format_row(n, r) for n, r in report["sets"].items()])


def run(cfg: RobustnessConfig) -> dict:
    """Score ``cfg.model`` on every set of ``cfg.sets``; print the table, return the report."""
    cfg.validate()
    cluster.configure_process_env()
    local, metadata = export.open_model_dir(cfg.model)
    runtime = runtimes.load(local, cfg.runtime)
    report = {"model": cfg.model, "model_version": metadata["version"], "runtime": cfg.runtime,
              "preprocess_version": preprocess.PREPROCESS_VERSION, "config": dataclasses.asdict(cfg), "sets": {}}
    print(TABLE_HEADER, flush=True)  # a row per set as it is scored: the photos take minutes
    for name in cfg.set_list():
        started = time.perf_counter()
        encoded, labels = load_set(name, cfg)
        report["sets"][name] = {**score(runtime, encoded, labels), "seconds": round(time.perf_counter() - started, 1)}
        print(format_row(name, report["sets"][name]), flush=True)
        if name == "photos":  # (a) on the very digits photographed, to compare (d) with
            images, all_labels = mnist_test_arrays()
            n = photo_count(cfg)
            same = "mnist, the photographed digits"
            report["sets"][same] = score(runtime, preprocess.encode_png(np.ascontiguousarray(images[:n])),
                                         all_labels[:n])
            print(format_row(same, report["sets"][same]), flush=True)
    if cfg.output:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.output)), exist_ok=True)
        with open(cfg.output, "w") as f:
            json.dump(report, f, indent=2)
    return report
