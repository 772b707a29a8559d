"""prepare end to end on a real local Ray, real files and a real S3 server."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mnist_ray.formats import shards
from mnist_ray.images import preprocess
from mnist_ray.errors import MnistRayError
from mnist_ray.inputs.arrays import evenly_spaced
from mnist_ray.preparation.prepare import PrepareConfig, run

pytestmark = pytest.mark.e2e


def _table(uri):
    return shards.read_table(uri).sort_by("id")


def test_evenly_spaced_covers_the_whole_range():
    assert evenly_spaced(10, None).tolist() == list(range(10))
    picked = evenly_spaced(5000, 100)
    assert len(picked) == 100 and picked[0] == 0 and picked[-1] == 4999


def test_idx_round_trip_is_pixel_exact(ray_local, tmp_path, mnist_idx_dir, mnist_test_arrays):
    out = str(tmp_path / "idx")
    summary = run(PrepareConfig(source=f"idx:{mnist_idx_dir}", output=out, rows_per_shard=4000))
    assert summary["rows"] == 10_000 and summary["splits"] == {"test": 10_000}
    assert summary["shards"] == 3  # 10k rows at 4k rows per shard
    table = _table(out)
    ids = table["id"].to_pylist()
    assert len(set(ids)) == 10_000
    order = np.array([int(i.split("-")[1]) for i in ids])
    images, labels = mnist_test_arrays
    np.testing.assert_array_equal(preprocess.decode_gray_batch(table["image"].to_pylist()), images[order])
    np.testing.assert_array_equal(table["label"].to_numpy(), labels[order])
    assert set(table["split"].to_pylist()) == {"test"}
    # Since schema 2: the model's 28x28 input is stored beside the PNG (MNIST digits pass unchanged).
    np.testing.assert_array_equal(shards.pixels_numpy(table["pixels"]), images[order])
    manifest = json.loads((tmp_path / "idx" / "_manifest.json").read_text())
    assert manifest["schema_version"] == 3 and manifest["pixels_missing"] == 0
    assert manifest["splits"]["test"]["labels"] == {str(k): int(v) for k, v in enumerate(np.bincount(labels))}


def test_mnist_sample_gives_5000_rows_500_per_class_with_a_stable_fingerprint(ray_local, tmp_path):
    first = run(PrepareConfig(output=str(tmp_path / "a")))
    assert first["rows"] == 5000 and first["splits"] == {"train": 4500, "val": 500}
    table = _table(str(tmp_path / "a"))
    assert np.bincount(table["label"].to_numpy()).tolist() == [500] * 10
    second = run(PrepareConfig(output=str(tmp_path / "b"), rows_per_shard=1000))
    assert second["shards"] == 5
    assert second["fingerprint"] == first["fingerprint"]  # same content, however it is sharded
    assert _table(str(tmp_path / "b"))["id"].equals(table["id"])
    other = run(PrepareConfig(output=str(tmp_path / "c"), seed=1, limit=100))
    assert other["fingerprint"] != first["fingerprint"]


def test_image_folder_keeps_every_decodable_file_and_lists_the_rest(ray_local, tmp_path, digit_folder):
    root, good = digit_folder
    out = tmp_path / "folder"
    summary = run(PrepareConfig(source=f"images:{root}", output=str(out)))
    assert summary["rows"] == len(good) and summary["rejected"] == 2
    table = _table(str(out))
    assert dict(zip(table["id"].to_pylist(), table["label"].to_pylist())) == good
    assert all(p.startswith(str(root)) for p in table["path"].to_pylist())
    for image in table["image"].to_pylist():
        assert image[:4] == b"\x89PNG" or image[:2] == b"\xff\xd8"  # BMP became PNG
    # Stored pixels are exactly what inference would compute from the stored image.
    expected, errors = preprocess.prepare_pixels(table["image"].to_pylist())
    assert errors == [None] * table.num_rows
    np.testing.assert_array_equal(shards.pixels_numpy(table["pixels"]), expected)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert [r["id"] for r in manifest["rejected"]] == ["3/broken.png", "5/truncated.jpg"]
    assert manifest["rejected"][0]["path"] == f"{root}/3/broken.png"
    assert manifest["rejected_count"] == 2 and all(r["error"] for r in manifest["rejected"])


def test_prepare_to_s3_and_read_back(ray_local, s3_bucket, tmp_path, digit_folder):
    uri = f"s3://{s3_bucket}/shards/mnist-sample"
    summary = run(PrepareConfig(output=uri, limit=300, rows_per_shard=250))
    assert summary["rows"] == 600
    _, manifest = shards.open_shards(uri)
    assert sum(f["rows"] for f in manifest["files"]) == 600
    assert all(0 < f["rows"] <= 250 for f in manifest["files"])
    table = shards.read_table(uri)
    assert table.num_rows == 600 and len(set(table["id"].to_pylist())) == 600
    ds = shards.read_dataset(uri, columns=["id", "label"])
    assert ds.count() == 600
    # An image folder on S3 is read by Ray workers, which get the endpoint from the environment.
    import boto3

    s3 = boto3.client("s3")
    root, good = digit_folder
    for rel in list(good)[:10] + ["3/broken.png"]:
        s3.upload_file(str(root / rel), s3_bucket, f"raw/{rel}")
    out = f"s3://{s3_bucket}/shards/raw"
    summary = run(PrepareConfig(source=f"images:s3://{s3_bucket}/raw", output=out))
    assert summary["rows"] == 10 and summary["rejected"] == 1
    assert shards.read_table(out)["path"].to_pylist()[0].startswith(f"s3://{s3_bucket}/raw/")


def test_refuses_to_overwrite_and_replaces_with_overwrite(ray_local, tmp_path):
    out = str(tmp_path / "ds")
    first = run(PrepareConfig(output=out, limit=50))
    with pytest.raises(MnistRayError, match="--overwrite"):
        run(PrepareConfig(output=out, limit=60))
    assert _table(out).num_rows == first["rows"]
    second = run(PrepareConfig(output=out, limit=60, overwrite=True))
    assert _table(out).num_rows == second["rows"] == 120
    assert len(list((tmp_path / "ds").glob("part-*.parquet"))) == second["shards"]


def test_a_killed_prepare_leaves_nothing_that_looks_complete(ray_local, tmp_path, mnist_idx_dir):
    out = tmp_path / "killed"
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mnist_ray.cli", "prepare", "--source", f"idx:{mnist_idx_dir}",
         "--output", str(out), "--rows-per-shard", "50"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("part-*.parquet")):
            assert proc.poll() is None, "prepare ended before it could be killed"
            assert time.monotonic() < deadline, "prepare never started writing"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started
        proc.wait()
    assert list(out.glob("part-*.parquet"))
    assert not (out / "_SUCCESS").exists() and not (out / "_manifest.json").exists()
    with pytest.raises(MnistRayError, match="not a complete dataset"):
        shards.read_table(str(out))
    # Rerunning finishes the job and removes the killed run's files.
    summary = run(PrepareConfig(source=f"idx:{mnist_idx_dir}", output=str(out), rows_per_shard=5000))
    assert _table(str(out)).num_rows == 10_000
    assert len(list(out.glob("part-*.parquet"))) == summary["shards"] == 2


def test_photos_source_stores_jpeg_photos_with_the_same_ids_and_labels(ray_local, tmp_path, mnist_idx_dir):
    out = str(tmp_path / "photos")
    summary = run(PrepareConfig(source=f"photos:idx:{mnist_idx_dir}", output=out, limit=60))
    plain = run(PrepareConfig(source=f"idx:{mnist_idx_dir}", output=str(tmp_path / "plain"), limit=60))
    photos, digits = _table(out), _table(str(tmp_path / "plain"))
    assert summary["rows"] == plain["rows"] == 60 and photos["id"].equals(digits["id"])
    assert photos["label"].equals(digits["label"])
    assert all(image[:2] == b"\xff\xd8" and len(image) > 2000 for image in photos["image"].to_pylist())
