"""The evaluate report on hand-made predictions (no Ray): metrics against hand-computed values,
the figures as images of the expected size, and the refusals."""

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mnist_ray import config
from mnist_ray.formats import predictions, shards
from mnist_ray.images import preprocess
from mnist_ray.plumbing import storage
from mnist_ray.errors import MnistRayError
from mnist_ray.evaluation.evaluate import EvaluateConfig, run

MODEL = {"uri": "models/cnn", "version": "cnn-0123abcd", "runtime": "tf"}
# The first ten MNIST test digits are 7 2 1 0 4 1 4 9 5 9. Row r08 could not be scored, r10 has
# no label (its digit is a 0): both are left out of the accuracy; r10 still counts as a prediction.
PREDICTED = [7, 2, 1, 0, 9, 1, 4, 4, None, 9, 3]
CONFIDENCE = [0.99, 0.96, 0.97, 0.91, 0.82, 0.87, 0.7, 0.6, None, 0.75, 0.5]


def _publish(path: Path, table: pa.Table, manifest: dict) -> str:
    path.mkdir(parents=True)
    pq.write_table(table, path / "part-abc-0.parquet")
    loc = storage.resolve(str(path))
    storage.publish(loc, {**manifest, "files": [{"path": "part-abc-0.parquet"}], "rows": table.num_rows},
                    run_id="abc")
    return str(path)


def _predictions(path: Path, ids, labels, source: dict, paths=None) -> str:
    n = len(ids)
    probs = np.zeros((n, 10), np.float32)
    for i, (p, c) in enumerate(zip(PREDICTED[:n], CONFIDENCE)):
        if p is not None:
            probs[i, p] = c
    table = pa.table({
        "id": ids, "prediction": pa.array(PREDICTED[:n], pa.int8()),
        "class_name": pa.array([None if p is None else str(p) for p in PREDICTED[:n]], pa.string()),
        "confidence": pa.array(CONFIDENCE[:n], pa.float32()),
        "probabilities": pa.FixedSizeListArray.from_arrays(pa.array(probs.ravel()), 10),
        "label": pa.array(labels, pa.int8()), "path": pa.array(paths or [None] * n, pa.string()),
        "model_version": [MODEL["version"]] * n,
        "error": [None if p is not None else "UnidentifiedImageError: cannot identify image file"
                  for p in PREDICTED[:n]],
    }, schema=predictions.SCHEMA)
    return _publish(path, table, {"kind": "predictions", "fingerprint": "sha256:p", "input": source,
                                  "model": MODEL, "error_rows": PREDICTED[:n].count(None)})


def _count(pixels: np.ndarray, rgb: tuple) -> int:
    """Pixels close to a colour (text is antialiased: few are exactly it)."""
    return int((np.abs(pixels.astype(int) - rgb).max(1) < 40).sum())


@pytest.fixture
def labelled(tmp_path, mnist_test_arrays) -> str:
    images, labels = mnist_test_arrays
    ids = [f"r{i:02d}" for i in range(11)]
    shard_rows = shards.stored_form(pa.table({
        "id": ids, "image": preprocess.encode_png(images[:11]), "label": pa.array([int(v) for v in labels[:11]], pa.int8()),
        "split": ["test"] * 11, "path": pa.nulls(11, pa.string()), "pixels": shards.pixels_column(images[:11])}))
    shards_uri = _publish(tmp_path / "shards", shard_rows, {"kind": "image-shards", "fingerprint": "sha256:s"})
    return _predictions(tmp_path / "predictions", ids, [int(v) for v in labels[:10]] + [None],
                        {"kind": "shards", "uri": shards_uri, "fingerprint": "sha256:s"})


@pytest.fixture
def unlabelled(tmp_path, mnist_test_arrays) -> str:
    """Predictions of a folder of image files, as `infer --input FOLDER` writes them: no labels."""
    images, _ = mnist_test_arrays
    folder = tmp_path / "photos"
    folder.mkdir()
    ids = [f"img{i}.png" for i in range(6)]
    for i, name in enumerate(ids):
        Image.fromarray(images[20 + i]).resize((56, 56)).save(folder / name)
    return _predictions(tmp_path / "predictions", ids, [None] * 6,
                        {"kind": "images", "uri": str(folder), "fingerprint": "sha256:f"},
                        paths=[str(folder / name) for name in ids])


def test_metrics_match_hand_computed_values(labelled, tmp_path):
    summary = run(EvaluateConfig(predictions=labelled, output=str(tmp_path / "report")))
    report = tmp_path / "report"
    assert sorted(os.listdir(report)) == ["_SUCCESS", "confusion_matrix.png", "metrics.json", "samples.png"]
    assert summary["files"] == ["confusion_matrix.png", "metrics.json", "samples.png"]
    m = json.loads((report / "metrics.json").read_text())

    # 9 labelled, scored rows (r00-r07, r09); wrong: r04 (4 -> 9) and r07 (9 -> 4).
    assert m["accuracy"] == pytest.approx(7 / 9) and summary["accuracy"] == pytest.approx(7 / 9)
    assert (m["rows"], m["error_rows"], m["scored_rows"], m["labelled_rows"]) == (11, 1, 10, 9)
    assert (summary["rows"], summary["errors"], summary["model_version"]) == (11, 1, "cnn-0123abcd")
    # 4: predicted for r06 (right) and r07 (wrong), true for r04 and r06. 9 mirrors it.
    for c in ("4", "9"):
        assert m["per_class"][c] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert m["per_class"]["1"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
    assert m["per_class"]["7"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    # 5 was only in the error row; 3 only predicted for the unlabelled row: no support, zeros.
    for c in ("3", "5", "6", "8"):
        assert m["per_class"][c] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    expected = np.zeros((10, 10), int)
    for true, pred in [(7, 7), (2, 2), (1, 1), (0, 0), (4, 9), (1, 1), (4, 4), (9, 4), (9, 9)]:
        expected[true, pred] += 1
    assert m["confusion_matrix"] == expected.tolist()
    assert m["class_counts"] == {"0": 1, "1": 2, "2": 1, "3": 1, "4": 2, "5": 0, "6": 0, "7": 1, "8": 0, "9": 2}
    assert m["confidence"]["min"] == pytest.approx(0.5) and sum(m["confidence"]["histogram"]["counts"]) == 10
    assert [(x["id"], x["prediction"], x["label"]) for x in m["mistakes"]] == [("r04", 9, 4), ("r07", 4, 9)]
    assert m["errors"] == [{"id": "r08", "error": "UnidentifiedImageError: cannot identify image file"}]
    assert m["model"] == MODEL and m["predictions"] == labelled and m["input"]["kind"] == "shards"

    with Image.open(report / "samples.png") as grid, Image.open(report / "confusion_matrix.png") as cm:
        assert grid.size == (1200, 600)  # 3 rows of 12 samples + 1 row of mistakes, 100 dpi
        assert cm.size == (700, 600)
        pixels = np.asarray(grid.convert("RGB")).reshape(-1, 3)
    # Titles: green when right, red when wrong.
    assert _count(pixels, (255, 0, 0)) > 50 and _count(pixels, (0, 128, 0)) > 50


def test_unlabelled_predictions_get_counts_and_a_confidence_histogram(unlabelled, tmp_path):
    summary = run(EvaluateConfig(predictions=unlabelled, output=str(tmp_path / "report"), samples=12))
    report = tmp_path / "report"
    assert sorted(os.listdir(report)) == ["_SUCCESS", "confidence.png", "metrics.json", "samples.png"]
    m = json.loads((report / "metrics.json").read_text())
    assert summary["accuracy"] is None and m["accuracy"] is None
    assert m["per_class"] is None and m["confusion_matrix"] is None and m["labelled_rows"] == 0
    # The first six predictions: 7 2 1 0 9 1.
    assert m["class_counts"] == {"0": 1, "1": 2, "2": 1, "3": 0, "4": 0, "5": 0, "6": 0, "7": 1, "8": 0, "9": 1}
    # Confidences 0.99 0.96 0.97 0.91 0.82 0.87 in 20 bins of 0.05: [0.80, 0.85) holds 0.82, and so on.
    hist = m["confidence"]["histogram"]
    assert len(hist["edges"]) == 21 and hist["counts"] == [0] * 16 + [1, 1, 1, 3]
    assert m["confidence"]["mean"] == pytest.approx((0.99 + 0.96 + 0.97 + 0.91 + 0.82 + 0.87) / 6, abs=1e-4)
    assert summary["files"] == ["confidence.png", "metrics.json", "samples.png"]
    with Image.open(report / "samples.png") as grid, Image.open(report / "confidence.png") as conf:
        assert grid.size == (1200, 175)  # one row of 12, no mistakes section
        assert conf.size == (1000, 400)
        pixels = np.asarray(grid.convert("RGB")).reshape(-1, 3)
        assert _count(pixels, (255, 0, 0)) == _count(pixels, (0, 128, 0)) == 0  # no labels: black
        # The tiles show the digits the model saw (white on black), not blank squares.
        assert np.asarray(grid.convert("L")).max() == 255


def test_predictions_without_success_are_refused(labelled, tmp_path):
    os.remove(os.path.join(labelled, storage.SUCCESS))
    with pytest.raises(MnistRayError, match="_SUCCESS"):
        run(EvaluateConfig(predictions=labelled, output=str(tmp_path / "report")))
    assert not (tmp_path / "report").exists()


def test_an_existing_report_needs_overwrite(labelled, tmp_path):
    out = str(tmp_path / "report")
    run(EvaluateConfig(predictions=labelled, output=out))
    with pytest.raises(MnistRayError, match="--overwrite"):
        run(EvaluateConfig(predictions=labelled, output=out))
    assert run(EvaluateConfig(predictions=labelled, output=out, overwrite=True))["accuracy"] == pytest.approx(7 / 9)
    assert sorted(os.listdir(tmp_path)) == ["predictions", "report", "shards"]  # no staging or old dirs left


def test_overwrite_never_replaces_a_folder_that_is_not_a_report(labelled, tmp_path):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(MnistRayError, match="not a report dir"):
        run(EvaluateConfig(predictions=labelled, output=str(other), overwrite=True))
    assert (other / "todo.txt").read_text() == "keep me"


def test_missing_input_images_are_a_clear_error(labelled, tmp_path):
    os.remove(tmp_path / "shards" / storage.SUCCESS)
    with pytest.raises(MnistRayError, match="sample grid"):
        run(EvaluateConfig(predictions=labelled, output=str(tmp_path / "report")))


def test_flags_come_from_the_config():
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, EvaluateConfig)
    cfg = config.from_args(EvaluateConfig, parser.parse_args(
        ["--predictions", "s3://b/p", "--output", "s3://b/r", "--preset", "smoke", "--overwrite"]))
    assert cfg == EvaluateConfig(predictions="s3://b/p", output="s3://b/r", samples=12, overwrite=True)


def test_images_and_report_on_s3(s3_bucket, tmp_path, mnist_test_arrays):
    """Images read from object storage by the URI in ``path``; the report uploaded, _SUCCESS last."""
    import io

    images, _ = mnist_test_arrays
    folder = storage.resolve(f"s3://{s3_bucket}/photos")
    ids = [f"{d}/img{i}.png" for i, d in enumerate([7, 2, 1])]
    for i, name in enumerate(ids):
        buf = io.BytesIO()
        Image.fromarray(images[i]).save(buf, format="PNG")
        storage.write_bytes(folder, name, buf.getvalue())
    predictions_uri = _predictions(tmp_path / "predictions", ids, [7, 2, 1],
                               {"kind": "images", "uri": folder.uri, "fingerprint": "sha256:f"},
                               paths=[folder.uri_of(name) for name in ids])
    out = f"s3://{s3_bucket}/reports/first"
    assert run(EvaluateConfig(predictions=predictions_uri, output=out, samples=12))["accuracy"] == 1.0
    report = storage.resolve(out)
    assert storage.is_complete(report) and storage.read_json(report, "metrics.json")["labelled_rows"] == 3
    with report.fs.open_input_stream(report.join("samples.png")) as f:
        assert Image.open(io.BytesIO(f.read())).size == (1200, 350)  # 1 row of samples, 1 of mistakes
    with pytest.raises(MnistRayError, match="--overwrite"):
        run(EvaluateConfig(predictions=predictions_uri, output=out))
