"""Shard schema 3 opens in other tools (Hugging Face `datasets`, pandas, DuckDB); earlier schemas
are still read by every mnist-ray reader."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mnist_ray.formats import shards
from mnist_ray.images import preprocess
from mnist_ray.preparation.prepare import PrepareConfig, run


def test_the_features_metadata_is_what_datasets_itself_writes():
    import datasets

    names = ["T-shirt/top", "Trouser"] + [str(i) for i in range(2, 10)]
    theirs = datasets.Features({
        "id": datasets.Value("string"), "image": datasets.Image(), "label": datasets.ClassLabel(names=names),
        "split": datasets.Value("string"), "path": datasets.Value("string"),
        "pixels": datasets.Value("fixed_size_binary[784]")})
    ours = json.loads(shards.schema_for(names).metadata[b"huggingface"])
    assert ours == {"info": {"features": theirs.to_dict()}}
    # and datasets reads our schema back as those features, Arrow types included
    assert datasets.Features.from_arrow_schema(shards.schema_for(names)) == theirs
    assert theirs.arrow_schema.field("image").type == shards.SCHEMA.field("image").type


def test_stored_and_row_forms_round_trip():
    rows = pa.table({"id": ["a", "b"], "image": [b"\x89PNG1", b"\xff\xd8J"], "label": pa.array([3, None], pa.int8()),
                     "split": ["train", None], "path": [None, "x/7/b.jpg"],
                     "pixels": pa.array([b"\0" * 784, None], pa.binary(784))})
    stored = shards.stored_form(rows, ["0", "1", "2", "3"])
    assert stored.schema.equals(shards.SCHEMA) and b"huggingface" in stored.schema.metadata
    assert stored["image"].to_pylist()[1] == {"bytes": b"\xff\xd8J", "path": None}
    back = shards.row_form(stored)
    assert back["image"].to_pylist() == rows["image"].to_pylist()
    assert (shards.row_digests(stored) == shards.row_digests(rows)).all()  # same content, same digest


@pytest.mark.e2e
def test_prepared_shards_open_in_datasets_pandas_and_duckdb(ray_local, tmp_path, mnist_idx_dir, mnist_test_arrays):
    import datasets
    import duckdb
    import pandas as pd

    out = tmp_path / "shards"
    run(PrepareConfig(source=f"idx:{mnist_idx_dir}", output=str(out), limit=200, rows_per_shard=120))
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["schema_version"] == 3 and manifest["class_names"] == [str(i) for i in range(10)]
    files = sorted(str(out / f["path"]) for f in manifest["files"])
    images, labels = mnist_test_arrays
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.features["label"].names == [str(i) for i in range(10)]
    assert isinstance(ds.features["image"], datasets.Image) and len(ds) == 200
    row = ds.sort("id")[0]
    index = int(row["id"].split("-")[1])
    assert row["image"].size == (28, 28)  # a PIL image
    np.testing.assert_array_equal(np.asarray(row["image"]), images[index])
    assert ds.features["label"].int2str(row["label"]) == str(labels[index])

    frame = pd.read_parquet(files[0])
    first = frame.iloc[0]
    np.testing.assert_array_equal(preprocess.decode_gray(first["image"]["bytes"]),
                                  images[int(first["id"].split("-")[1])])

    con = duckdb.connect()
    counts = con.execute(f"SELECT label, count(*) FROM read_parquet({files!r}) GROUP BY label ORDER BY label") \
        .fetchall()
    kept = [int(i.split("-")[1]) for i in shards.read_table(str(out))["id"].to_pylist()]
    assert [c for _, c in counts] == np.bincount(labels[kept]).tolist()
    png = con.execute(f"SELECT image.bytes FROM read_parquet({files!r}) WHERE id = ?", [row["id"]]).fetchone()[0]
    np.testing.assert_array_equal(preprocess.decode_gray(png), images[index])


@pytest.mark.e2e
def test_schema_2_shards_are_still_read_as_before(ray_local, tmp_path, mnist_idx_dir):
    out = tmp_path / "shards"
    run(PrepareConfig(source=f"idx:{mnist_idx_dir}", output=str(out), limit=50))
    manifest = json.loads((out / "_manifest.json").read_text())
    v3 = shards.read_table(str(out)).sort_by("id")
    for f in manifest["files"]:  # rewrite as schema 2 wrote them: image binary, label int8
        t = pq.read_table(out / f["path"])
        t = t.set_column(1, "image", shards.image_bytes(t["image"])).set_column(
            2, "label", t["label"].cast(pa.int8())).replace_schema_metadata(None)
        pq.write_table(t, out / f["path"])
    manifest["schema_version"] = 2
    (out / "_manifest.json").write_text(json.dumps(manifest))
    v2 = shards.read_table(str(out)).sort_by("id")
    assert pa.types.is_binary(v2.schema.field("image").type)
    assert v2["image"].equals(v3["image"]) and v2["id"].equals(v3["id"])
    batch = shards.read_dataset(str(out), columns=["id", "image", "label"]).take_batch(100, batch_format="pyarrow")
    assert pa.types.is_binary(batch.schema.field("image").type) and batch.num_rows == 50
    assert preprocess.decode_gray(v2["image"][0].as_py()).shape == (28, 28)
