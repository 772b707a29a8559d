"""evaluate: predictions -> a report dir of metrics and figures (no Ray, the driver alone).

    REPORT_DIR/
      metrics.json           accuracy, per-class precision/recall/F1, confusion matrix, counts,
                             confidence summary, error rows, model and input (labelled rows)
      confusion_matrix.png   true vs predicted counts            (when some rows have a label)
      confidence.png         predicted class counts, confidence  (when no row has a label)
      samples.png            evenly spaced rows, then the most confident mistakes
      _SUCCESS               written last: the dir is written aside and published whole

Metrics read only the small columns of the predictions; the grid's images are read for the
chosen ids alone, from the input recorded in the predictions' manifest.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mnist_ray.formats import predictions, shards
from mnist_ray.images import preprocess
from mnist_ray.plumbing import storage
from mnist_ray.errors import MnistRayError

CLASSES = list(range(predictions.NUM_CLASSES))
# Figures are matplotlib ``Figure`` objects, not pyplot: no global backend or figure state, so
# a notebook importing this keeps its backend. Sizes in inches are exact in binary, so every
# PNG's pixel size is exact: 12 tiles of 1 x 1.25 in per row at 100 dpi.
COLS, TILE_W, TILE_H, HEADING_H, DPI = 12, 1.0, 1.25, 0.5, 100
MISTAKES = COLS
HISTOGRAM_BINS = 20


@dataclass(frozen=True)
class EvaluateConfig:
    predictions: str = field(default="out/mnist-sample/predictions", metadata={
        "help": "predictions (mnist-ray infer)"})
    output: str = field(default="out/mnist-sample/report", metadata={"help": "report dir to write"})
    samples: int = field(default=36, metadata={"help": "images in the sample grid"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing report dir"})
    # Accepted so every job takes the same flags under `ray job submit`; evaluate needs no Ray.
    address: str | None = field(default=None, metadata={"help": "ignored: evaluate runs without Ray"})

    PRESETS: ClassVar[dict] = {"default": {}, "smoke": {"samples": 12}}


def check_output(uri: str, *, overwrite: bool) -> storage.Location:
    """Fail before any work if the report dir exists (without --overwrite) or cannot be written."""
    return storage.prepare_directory_output(uri, overwrite=overwrite, marker="metrics.json", what="report dir")


def compute_metrics(table: pa.Table) -> dict:
    """Counts and confidence over scored rows; accuracy and per-class figures over labelled ones."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    scored = table.filter(pc.is_null(table["error"]))
    pred, conf = scored["prediction"].to_numpy(), scored["confidence"].to_numpy().astype(np.float64)
    counts, edges = np.histogram(conf, bins=HISTOGRAM_BINS, range=(0.0, 1.0))
    out = {
        "rows": table.num_rows, "error_rows": table.num_rows - scored.num_rows, "scored_rows": scored.num_rows,
        "class_counts": {str(c): int((pred == c).sum()) for c in CLASSES},
        "confidence": {name: round(float(f(conf)), 4) if len(conf) else None
                       for name, f in (("mean", np.mean), ("median", np.median), ("min", np.min))}
                      | {"histogram": {"edges": edges.round(3).tolist(), "counts": counts.tolist()}},
        "accuracy": None, "per_class": None, "confusion_matrix": None,
    }
    labelled = scored.filter(pc.is_valid(scored["label"]))
    out["labelled_rows"] = labelled.num_rows
    if labelled.num_rows:
        y_true, y_pred = labelled["label"].to_numpy(), labelled["prediction"].to_numpy()
        precision, recall, f1, support = precision_recall_fscore_support(
            y_true, y_pred, labels=CLASSES, zero_division=0)
        out["accuracy"] = float(accuracy_score(y_true, y_pred))
        out["per_class"] = {str(c): {"precision": float(precision[c]), "recall": float(recall[c]),
                                     "f1": float(f1[c]), "support": int(support[c])} for c in CLASSES}
        # Rows are the true class, columns the predicted one (scikit-learn's convention).
        out["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=CLASSES).tolist()
    return out


def accuracy_by_split(table: pa.Table, source: dict) -> dict | None:
    """Accuracy per split of the input shards (train, val, test): the held-out figure that
    matters when the predictions cover the training data too. None for image folders."""
    if source["kind"] != "shards":
        return None
    try:
        splits = shards.read_table(source["uri"], columns=["id", "split"])
    except (MnistRayError, OSError) as e:
        why = e if isinstance(e, MnistRayError) else storage.describe_error(e, source["uri"])
        raise MnistRayError(f"cannot read the input of these predictions (for accuracy per split and "
                            f"the sample grid): {why}") from e
    scored = table.filter(pc.and_(pc.is_null(table["error"]), pc.is_valid(table["label"])))
    joined = scored.select(["id", "prediction", "label"]).join(splits, "id")
    out = {}
    for split in sorted(s for s in pc.unique(joined["split"]).to_pylist() if s is not None):
        rows = joined.filter(pc.equal(joined["split"], split))
        out[split] = round(float(pc.mean(pc.equal(rows["prediction"], rows["label"]).cast(pa.float64())).as_py()), 4)
    return out


def pick_samples(table: pa.Table, k: int) -> tuple[pa.Table, pa.Table]:
    """``k`` scored rows evenly spaced over the sorted ids, and the most confident mistakes."""
    scored = table.filter(pc.is_null(table["error"])).sort_by("id")
    spread = scored.take(np.unique(np.linspace(0, scored.num_rows - 1, min(k, scored.num_rows)).round().astype(int)))
    wrong = scored.filter(pc.and_(pc.is_valid(scored["label"]), pc.not_equal(scored["prediction"], scored["label"])))
    return spread, wrong.sort_by([("confidence", "descending"), ("id", "ascending")]).slice(0, MISTAKES)


def read_images(source: dict, rows: pa.Table) -> dict[str, bytes]:
    """Encoded images of ``rows`` (by id), read from the predictions' input, nothing else."""
    if not rows.num_rows:
        return {}
    try:
        if source["kind"] == "shards":
            import pyarrow.dataset as pads

            loc, manifest = shards.open_shards(source["uri"])
            found = pads.dataset(shards.shard_paths(loc, manifest), filesystem=loc.fs, format="parquet").to_table(
                columns=["id", "image"], filter=pc.field("id").isin(pa.array(rows["id"].to_pylist(), pa.string())))
            return dict(zip(found["id"].to_pylist(), shards.image_bytes(found["image"]).to_pylist()))
        root = storage.resolve(source["uri"])  # ``path`` is this folder's scheme + a path on its fs
        images = {}
        for id_, uri in zip(rows["id"].to_pylist(), rows["path"].to_pylist()):
            with root.fs.open_input_stream(uri.removeprefix(root.scheme)) as f:
                images[id_] = f.read()
        return images
    except (MnistRayError, OSError) as e:
        why = e if isinstance(e, MnistRayError) else storage.describe_error(e, source["uri"])
        raise MnistRayError(f"cannot read the images for the sample grid: {why}") from e


def _tile_title(row: dict) -> tuple[str, str]:
    text = f"pred {row['prediction']}  {row['confidence']:.0%}"
    if row["label"] is None:
        return text, "black"
    return f"{text}\ntrue {row['label']}", "green" if row["prediction"] == row["label"] else "red"


def plot_samples(path: str, sections: list[tuple[str, pa.Table, int]], images: dict[str, bytes]) -> None:
    """One titled block of tiles per (heading, rows, capacity); the size depends on capacities only."""
    from matplotlib.figure import Figure

    rows_of = [-(-capacity // COLS) for _, _, capacity in sections]
    fig = Figure(figsize=(COLS * TILE_W, sum(r * TILE_H + HEADING_H for r in rows_of)), dpi=DPI)
    subfigs = np.atleast_1d(fig.subfigures(len(sections), 1, height_ratios=[r * TILE_H + HEADING_H for r in rows_of]))
    for sub, (heading, table, _), n_rows in zip(subfigs, sections, rows_of):
        sub.suptitle(heading if table.num_rows else f"{heading}: none", fontsize=10)
        height = n_rows * TILE_H + HEADING_H
        sub.subplots_adjust(left=0.005, right=0.995, bottom=0.02, top=1 - HEADING_H / height, hspace=0.45)
        pixels, _ = preprocess.prepare_batch([images.get(i) for i in table["id"].to_pylist()])
        for i, ax in enumerate(np.atleast_1d(sub.subplots(n_rows, COLS)).ravel()):
            ax.set_axis_off()
            if i < table.num_rows:
                title, color = _tile_title(table.slice(i, 1).to_pylist()[0])
                ax.imshow(pixels[i, :, :, 0], cmap="gray", vmin=0.0, vmax=1.0)
                ax.set_title(title, color=color, fontsize=7)
    fig.savefig(path, dpi=DPI)  # no bbox_inches="tight": it would change the size


def plot_confusion(path: str, metrics: dict) -> None:
    from matplotlib.figure import Figure
    from sklearn.metrics import ConfusionMatrixDisplay

    fig = Figure(figsize=(7, 6), dpi=DPI, layout="tight")
    ax = fig.subplots()
    ConfusionMatrixDisplay(np.array(metrics["confusion_matrix"]), display_labels=CLASSES).plot(
        ax=ax, cmap="Blues", colorbar=False, values_format="d")
    ax.set_title(f"accuracy {metrics['accuracy']:.2%} over {metrics['labelled_rows']:,} labelled rows")
    fig.savefig(path, dpi=DPI)


def plot_confidence(path: str, metrics: dict) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=DPI, layout="tight")
    left, right = fig.subplots(1, 2)
    left.bar([str(c) for c in CLASSES], list(metrics["class_counts"].values()), color="tab:blue")
    left.set(title=f"predicted class ({metrics['scored_rows']:,} rows)", xlabel="class", ylabel="rows")
    left.yaxis.get_major_locator().set_params(integer=True)
    hist = metrics["confidence"]["histogram"]
    right.stairs(hist["counts"], hist["edges"], fill=True, color="tab:orange")
    right.set(title="confidence of the prediction", xlabel="confidence", ylabel="rows", xlim=(0, 1))
    right.yaxis.get_major_locator().set_params(integer=True)
    fig.savefig(path, dpi=DPI)


def run(cfg: EvaluateConfig) -> dict:
    """Write the report dir for ``cfg.predictions``; returns a short summary."""
    if cfg.samples < 1:
        raise MnistRayError("--samples must be positive")
    _, manifest = predictions.open_predictions(cfg.predictions)
    loc = check_output(cfg.output, overwrite=cfg.overwrite)
    source = manifest["input"]
    columns = ["id", "prediction", "confidence", "label", "error"] + (["path"] if source["kind"] == "images" else [])
    table = predictions.read_predictions(cfg.predictions, columns=columns)
    metrics = compute_metrics(table)
    metrics["accuracy_by_split"] = accuracy_by_split(table, source)
    labelled = metrics["accuracy"] is not None
    spread, mistakes = pick_samples(table, cfg.samples)
    images = read_images(source, pa.concat_tables([spread, mistakes]))

    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(loc.path.rstrip('/'))}.staging-",
                               dir=os.path.dirname(loc.path) if loc.is_local else None)
    try:
        sections = [("rows evenly spaced by id", spread, cfg.samples)]
        if labelled:
            sections.append(("most confident mistakes", mistakes, MISTAKES))
            plot_confusion(os.path.join(staging, "confusion_matrix.png"), metrics)
        else:
            plot_confidence(os.path.join(staging, "confidence.png"), metrics)
        plot_samples(os.path.join(staging, "samples.png"), sections, images)
        bad = table.filter(pc.is_valid(table["error"])).slice(0, 10)
        report = {
            **metrics, "predictions": cfg.predictions, "predictions_fingerprint": manifest.get("fingerprint"),
            "input": {"kind": source["kind"], "uri": source["uri"], "fingerprint": source.get("fingerprint")},
            "model": manifest.get("model", {}),
            "errors": bad.select(["id", "error"]).to_pylist(),  # examples; the manifest lists all
            "mistakes": [{**m, "confidence": round(m["confidence"], 4)}
                         for m in mistakes.select(["id", "prediction", "label", "confidence"]).to_pylist()],
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        with open(os.path.join(staging, "metrics.json"), "w") as f:
            json.dump(report, f, indent=2)
        files = sorted(os.listdir(staging))
        storage.publish_directory(staging, loc, run_id=uuid.uuid4().hex[:12])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"output": cfg.output, "accuracy": metrics["accuracy"], "rows": metrics["rows"],
            "errors": metrics["error_rows"], "labelled_rows": metrics["labelled_rows"],
            "model_version": report["model"].get("version"), "files": files}
