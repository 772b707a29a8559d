"""The worker side of inference without Ray: row preparation and the predictor's batches."""

import numpy as np
import pyarrow as pa

from mnist_ray.formats import shards
from mnist_ray.images import preprocess
from mnist_ray.inference.predictor import Predictor, prepare_rows


def _rows(images: list, labels=None, paths=None) -> pa.Table:
    n = len(images)
    return pa.table({"id": [f"r{i}" for i in range(n)], "image": pa.array(images, pa.binary()),
                     "label": pa.array(labels if labels is not None else [None] * n, pa.int8()),
                     "path": pa.array(paths or [None] * n, pa.string())})


def _fake_model(x: np.ndarray) -> np.ndarray:
    """Class = the brightest row band: deterministic, no TensorFlow."""
    scores = x.reshape(len(x), -1)[:, :780].reshape(len(x), 10, 78).mean(axis=2) + 1e-3
    return (scores / scores.sum(1, keepdims=True)).astype(np.float32)


def test_predictor_scores_batches_and_keeps_error_rows(mnist_test_arrays):
    images, labels = mnist_test_arrays
    encoded = preprocess.encode_png(images[:6])
    encoded[2] = b"not an image"
    batch = prepare_rows(_rows(encoded, labels=[int(v) for v in labels[:6]]))
    calls = []
    predictor = Predictor(lambda: lambda x: calls.append(len(x)) or _fake_model(x), "m-1")
    out = predictor(batch)
    assert calls == [5]  # one model call per batch, only for the rows that decoded
    assert out.num_rows == 6 and out["id"].to_pylist() == [f"r{i}" for i in range(6)]
    assert out["error"][2].as_py() == "not an image (starts with 'not an ima')"
    assert out["prediction"][2].as_py() is None and out["confidence"][2].as_py() is None
    expected = _fake_model(preprocess.normalize(images[[0, 1, 3, 4, 5]]))
    assert [out["prediction"][i].as_py() for i in (0, 1, 3, 4, 5)] == expected.argmax(1).tolist()
    probs = np.array(out["probabilities"].to_pylist())
    np.testing.assert_allclose(probs[[0, 1, 3, 4, 5]], expected, rtol=1e-6)
    assert out["label"].to_pylist() == [int(v) for v in labels[:6]]
    assert set(out["model_version"].to_pylist()) == {"m-1"}
    assert out.schema.field("probabilities").type == pa.list_(pa.float32(), 10)


def test_a_model_failure_turns_the_batch_into_error_rows(mnist_test_arrays):
    images, _ = mnist_test_arrays

    def broken(x):
        raise RuntimeError("out of memory")

    out = Predictor(lambda: broken, "m")(prepare_rows(_rows(preprocess.encode_png(images[:3]))))
    assert all("scoring failed: RuntimeError: out of memory" in e for e in out["error"].to_pylist())


def test_prepare_rows_takes_stored_pixels_and_decodes_only_the_rows_without(mnist_test_arrays):
    images, _ = mnist_test_arrays
    rows = _rows(preprocess.encode_png(images[:4]))
    # v2 shards: pixels stored for every row -> passed through untouched (no decoding at all:
    # the image column is absent).
    stored = rows.drop_columns(["image"]).append_column("pixels", shards.pixels_column(images[:4]))
    out = prepare_rows(stored)
    np.testing.assert_array_equal(shards.pixels_numpy(out["pixels"]), images[:4])
    assert out["error"].null_count == 4
    # Rows stored without pixels (prepare could not make them) are decoded from their image,
    # and one that fails again becomes an error row.
    mixed = _rows([*preprocess.encode_png(images[:2]), b"garbage"]).append_column(
        "pixels", shards.pixels_column(np.stack([images[0], images[1], images[2]]), np.array([True, False, False])))
    out = prepare_rows(mixed)
    np.testing.assert_array_equal(shards.pixels_numpy(out["pixels"])[:2], images[:2])  # row 1 decoded
    assert out["error"].to_pylist()[:2] == [None, None] and out["error"][2].as_py() == "not an image (starts with 'garbage')"
    # v1 shards (image only) decode every row, to the same pixels.
    np.testing.assert_array_equal(shards.pixels_numpy(prepare_rows(rows)["pixels"]), images[:4])


def test_rows_that_failed_in_the_read_keep_their_error_and_scored_rows_get_class_names(mnist_test_arrays):
    images, _ = mnist_test_arrays
    rows = _rows(preprocess.encode_png(images[:4]))
    # as archives and foreign Parquet deliver them: an error from the read (no bytes), and pixels
    # made by the read for one row (no image)
    rows = rows.set_column(1, "image", pa.array([rows["image"][0].as_py(), None, None, rows["image"][3].as_py()],
                                                pa.binary()))
    pixels = np.zeros_like(images[:4])
    pixels[2] = images[2]
    rows = rows.append_column("pixels", shards.pixels_column(pixels, np.array([False, False, True, False])))
    rows = rows.append_column("error", pa.array([None, "corrupt archive member: CRC mismatch", None, None]))
    batch = prepare_rows(rows)
    assert batch["error"].to_pylist() == [None, "corrupt archive member: CRC mismatch", None, None]
    np.testing.assert_array_equal(shards.pixels_numpy(batch["pixels"])[[0, 2, 3]], images[[0, 2, 3]])
    names = [f"c{i}" for i in range(10)]
    out = Predictor(lambda: _fake_model, "m", class_names=names)(batch)
    assert out["class_name"].to_pylist() == [None if p is None else names[p] for p in out["prediction"].to_pylist()]
    assert out["class_name"][1].as_py() is None and out["class_name"].null_count == 1
