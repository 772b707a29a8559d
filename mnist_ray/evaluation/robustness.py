"""robustness: a model dir's accuracy on four kinds of input it was not trained on (no Ray).

    (a) mnist    the MNIST test set, as stored (28x28 PNG)
    (b) uci      real handwritten digits of another origin: UCI optical digits (scikit-learn's
                 ``load_digits``: 1,797 8x8 scans, 17 grey levels), enlarged to 32 or 64 px,
                 half dark on light
    (c) printed  printed digits in synthetic.MEASURE_FONTS, which training never renders, or
                 in the font files of ``--fonts`` (faces of training's families left out)
    (d) photos   synthetic phone photos of MNIST test digits: paper texture, uneven light,
                 noise, blur, a slight turn and perspective, JPEG, and an EXIF rotation

These sets measure; nothing here trains a model or sets a threshold. Every image goes through
the bytes -> pixels path inference uses (``preprocess.prepare_pixels``), so an image it cannot
read counts as an error row (and as wrong in the accuracy), a "blank" one as a blank row.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import logging
import os
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
from PIL import Image

from mnist_ray.images import measured_photos, preprocess, synthetic
from mnist_ray.model import export, runtimes
from mnist_ray.plumbing import cluster
from mnist_ray.errors import MnistRayError

log = logging.getLogger(__name__)

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
    fonts: str | None = field(default=None, metadata={"help": (
        "set (c) in these fonts instead of Computer Modern: font files or directories, comma-separated "
        "(e.g. /usr/share/fonts); faces of a family training renders are left out")})
    output: str | None = field(default=None, metadata={"help": "write the report as JSON here"})

    PRESETS: ClassVar[dict] = {"default": {}, "smoke": {"limit": 100, "photos": 100, "printed_per_digit": 2}}

    def set_list(self) -> list[str]:
        return [s for s in self.sets.split(",") if s]

    def validate(self) -> None:
        if not self.set_list() or not set(self.set_list()) <= set(SETS):
            raise MnistRayError(f"--sets {self.sets!r}: choose from {', '.join(SETS)}")
        if (self.limit is not None and self.limit < 1) or self.photos < 1 or self.printed_per_digit < 1:
            raise MnistRayError("--limit, --photos and --printed-per-digit must be positive")
        if self.fonts and "printed" not in self.set_list():
            raise MnistRayError("--fonts chooses the fonts of the printed set: add printed to --sets")


# --- the sets: encoded images and their labels -----------------------------------------------

def mnist_test_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 10,000 MNIST test digits (uint8 (N, 28, 28)) and labels: the copy shipped as package data."""
    from mnist_ray.inputs import datasets

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


def printed_set(per_digit: int, fonts: list[str] | None = None) -> tuple[list[bytes], np.ndarray, list[str]]:
    """Every digit ``per_digit`` times in every font (random size, weight, turn, shades, blur,
    noise, polarity; seeded): synthetic.MEASURE_FONTS, or the font files ``fonts``. Also the
    face of every row: its file name, or its path where two files share a name."""
    rng = np.random.default_rng(1717)
    files = fonts if fonts is not None else [synthetic.font_path(f) for f in synthetic.MEASURE_FONTS]
    shared = Counter(os.path.basename(p) for p in files)
    names = [p if shared[os.path.basename(p)] > 1 else os.path.basename(p) for p in files]
    images, labels, faces = [], [], []
    for path, name in zip(files, names):
        for _ in range(per_digit):
            for digit in range(10):
                images.append(_png(synthetic.render(digit, path, rng)))
                labels.append(digit)
                faces.append(name)
    return images, np.array(labels, np.int64), faces


FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".woff")


def _family_key(family: str) -> str:
    return "".join(c for c in family.lower() if c.isalnum())


def _face(path: str) -> tuple[str, str] | str:
    """(family, style) of a font file that maps all ten digits, or why it is left out."""
    from fontTools.ttLib import TTFont

    try:
        with TTFont(path, fontNumber=0, lazy=True) as font:
            cmap = font.getBestCmap() or {}
            names = font["name"]
            face = (names.getBestFamilyName() or os.path.basename(path), names.getBestSubFamilyName() or "")
    except Exception:  # noqa: BLE001 - fontTools raises many kinds for a file that is not a font
        return "not a font fontTools can read"
    if not all(ord(c) in cmap for c in "0123456789"):
        return "no digits (a symbol or script font)"
    return face


def measure_fonts(spec: str) -> tuple[list[str], dict[str, list[str]]]:
    """The font files of ``--fonts`` to measure on, and those left out, by reason.

    Left out: files that are not fonts or lack digits, a second file of the same face, and
    every face of a family that training renders (synthetic.TRAIN_FONTS). A family counts as
    training's when one name, letters and figures only, starts the other ("EB Garamond 12" is EB
    Garamond, "DejaVu Sans Condensed" DejaVu Sans, "Roboto Slab" Roboto): set (c) must be faces
    the model has never seen, so near names are left out rather than measured.
    """
    files = []
    for part in (p.strip() for p in spec.split(",")):
        if os.path.isdir(part):
            files += sorted(f for f in glob.glob(os.path.join(part, "**", "*"), recursive=True)
                            if f.lower().endswith(FONT_SUFFIXES) and os.path.isfile(f))
        elif os.path.isfile(part):
            files.append(part)
        elif part:
            raise MnistRayError(f"--fonts {part}: no such file or directory (give font files or directories)")
    trained = {_family_key(f[0]) for f in map(_face, map(synthetic.font_path, synthetic.TRAIN_FONTS))
               if isinstance(f, tuple)}
    keep, seen, left_out = [], set(), {}
    for path in files:
        face = _face(path)
        if isinstance(face, tuple):
            family = _family_key(face[0])
            if any(family.startswith(t) or t.startswith(family) for t in trained):
                face = "a family training renders"
            elif (family, face[1].lower()) in seen:
                face = "the same face as another file"
            else:
                seen.add((family, face[1].lower()))
                keep.append(path)
                continue
        left_out.setdefault(face, []).append(path)
    if not keep:
        why = "; ".join(f"{len(v)} {k}" for k, v in left_out.items()) or "no font files there"
        raise MnistRayError(f"--fonts {spec}: no font to measure on ({why}); give font files of "
                            "families the model was not trained on")
    return keep, left_out


def photos_set(n: int) -> tuple[list[bytes], np.ndarray]:
    images, labels = mnist_test_arrays()
    return ([measured_photos.phone_photo(images[i], np.random.default_rng([17, zlib.crc32(str(i).encode())])) for i in range(n)],
            labels[:n])


def photo_count(cfg: RobustnessConfig) -> int:
    return min(cfg.photos, cfg.limit or cfg.photos)


def load_set(name: str, cfg: RobustnessConfig,
             fonts: list[str] | None = None) -> tuple[list[bytes], np.ndarray, list[str] | None]:
    """A set's encoded images, labels and, for the printed set, the face of every row (the
    photos: of the first ``photo_count`` test digits; printed: in ``fonts``, or Computer Modern)."""
    encoded, labels, faces = {"mnist": lambda: (*mnist_set(), None), "uci": lambda: (*uci_set(), None),
                              "printed": lambda: printed_set(cfg.printed_per_digit, fonts),
                              "photos": lambda: (*photos_set(photo_count(cfg)), None)}[name]()
    if name != "photos" and cfg.limit is not None and cfg.limit < len(labels):  # evenly spaced: every class of a sorted set
        keep = np.unique(np.linspace(0, len(labels) - 1, cfg.limit).round().astype(np.int64))
        encoded, labels = [encoded[i] for i in keep], labels[keep]
        faces = [faces[i] for i in keep] if faces is not None else None
    return encoded, labels, faces


# --- scoring ---------------------------------------------------------------------------------

def score(runtime, encoded: list[bytes], labels: np.ndarray, faces: list[str] | None = None) -> dict:
    """Accuracy over all rows (an error row counts as wrong), error and blank rows, the classes
    most often mistaken for others; with ``faces``, the accuracy of each, worst first."""
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
            "most_read_as": {str(c): int(confused[c]) for c in np.argsort(-confused)[:3] if confused[c]},
            **({"by_face": by_face(wrong, faces)} if faces is not None else {})}


def by_face(wrong: np.ndarray, faces: list[str]) -> dict[str, float]:
    """Accuracy of every face, worst first."""
    names, index = np.unique(np.asarray(faces), return_inverse=True)
    right = np.bincount(index, weights=~wrong, minlength=len(names)) / np.bincount(index, minlength=len(names))
    accuracy = {f: round(float(a), 4) for f, a in zip(names.tolist(), right)}
    return dict(sorted(accuracy.items(), key=lambda kv: (kv[1], kv[0])))


def format_faces(accuracy: dict[str, float], shown: int = 5) -> str:
    """One line: the worst faces and how the rest did."""
    items = list(accuracy.items())
    line = ", ".join(f"{f} {a * 100:.1f} %" for f, a in items[:shown])
    if len(items) > shown:
        rest = [a for _, a in items[shown:]]
        line += f"; {len(rest)} more, {min(rest) * 100:.1f}-{max(rest) * 100:.1f} %"
    return f"printed, by face (worst first): {line}"


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
    fonts, left_out = measure_fonts(cfg.fonts) if cfg.fonts else (None, {})  # validate: printed is in the sets
    local, metadata = export.open_model_dir(cfg.model)
    runtime = runtimes.load(local, cfg.runtime)
    report = {"model": cfg.model, "model_version": metadata["version"], "runtime": cfg.runtime,
              "preprocess_version": preprocess.PREPROCESS_VERSION, "config": dataclasses.asdict(cfg), "sets": {}}
    if fonts is not None:
        report["fonts"] = {"measured": fonts, "left_out": left_out}
        log.info("printed: %d faces from --fonts%s", len(fonts),
                 "".join(f"; {len(v)} left out: {k}" for k, v in left_out.items()))
    for line in TABLE_HEADER.splitlines():  # the console, a row per set as it is scored: the photos take minutes
        log.info("%s", line)
    for name in cfg.set_list():
        started = time.perf_counter()
        encoded, labels, faces = load_set(name, cfg, fonts)
        report["sets"][name] = {**score(runtime, encoded, labels, faces),
                                "seconds": round(time.perf_counter() - started, 1)}
        log.info("%s", format_row(name, report["sets"][name]))
        if name == "photos":  # (a) on the very digits photographed, to compare (d) with
            images, all_labels = mnist_test_arrays()
            n = photo_count(cfg)
            same = "mnist, the photographed digits"
            report["sets"][same] = score(runtime, preprocess.encode_png(np.ascontiguousarray(images[:n])),
                                         all_labels[:n])
            log.info("%s", format_row(same, report["sets"][same]))
    if "by_face" in report["sets"].get("printed", {}):
        log.info("%s", format_faces(report["sets"]["printed"]["by_face"]))
    if cfg.output:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.output)), exist_ok=True)
        with open(cfg.output, "w") as f:
            json.dump(report, f, indent=2)
    return brief(report)


def brief(report: dict, faces: int = 10) -> dict:
    """The report as printed: the worst ``faces`` faces and counts of font files; the --output
    file keeps every face and every file's path."""
    out = {**report, "sets": dict(report["sets"])}
    printed = out["sets"].get("printed")
    if printed and len(printed.get("by_face", {})) > faces:
        out["sets"]["printed"] = {**printed, "faces": len(printed["by_face"]),
                                  "by_face": dict(list(printed["by_face"].items())[:faces])}
    if "fonts" in out:
        out["fonts"] = {"measured": len(report["fonts"]["measured"]),
                        "left_out": {k: len(v) for k, v in report["fonts"]["left_out"].items()}}
    return out
