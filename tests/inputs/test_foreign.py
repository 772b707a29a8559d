"""foreign: Parquet mnist-ray did not write, as Hugging Face `datasets` and Ray Data write it."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mnist_ray.formats import shards
from mnist_ray.images import preprocess
from mnist_ray.inputs import columns, files, foreign
from mnist_ray.inputs.rows import ROW_FORM
from mnist_ray.errors import MnistRayError


def _pngs(images):
    return preprocess.encode_png(np.ascontiguousarray(images))


def _model_pixels(images):
    return np.stack([preprocess.mnist_like(i) for i in images])


@pytest.fixture
def hf_parquet(tmp_path, mnist_test_arrays):
    """60 MNIST test digits written by `datasets` itself: Image struct, ClassLabel, no id."""
    import datasets

    images, labels = mnist_test_arrays
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[f"digit {i}" for i in range(10)])})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in _pngs(images[:60])],
                                     "label": labels[:60].tolist()}, features=features)
    path = tmp_path / "hf" / "test-00000-of-00001.parquet"
    path.parent.mkdir()
    ds.to_parquet(str(path), batch_size=25)  # several row groups
    return path


def test_a_datasets_parquet_is_read_with_its_class_names_and_stable_ids(hf_parquet, mnist_test_arrays):
    images, labels = mnist_test_arrays
    plan = foreign.open_parquet(str(hf_parquet.parent))
    cols = plan.columns
    assert (cols.image, cols.image_kind, cols.label, cols.id) == ("image", "hf", "label", None)
    assert cols.label_names == tuple(f"digit {i}" for i in range(10))
    assert plan.rows == 60 and [p.rows for p in plan.pieces] == [60]  # small row groups merged
    rows = pa.concat_tables([t for p in plan.pieces for t in plan.read_piece(p)])
    assert rows.schema.equals(ROW_FORM)
    assert rows["id"].to_pylist() == [f"test-00000-of-00001.parquet#{i}" for i in range(60)]
    assert rows["label"].to_pylist() == labels[:60].tolist()
    assert rows["error"].null_count == 60
    # infer decodes these bytes exactly as it decodes a shard's image
    decoded, errs = preprocess.prepare_pixels(rows["image"].to_pylist())
    assert not any(errs)
    np.testing.assert_array_equal(decoded, images[:60])
    again = foreign.open_parquet(str(hf_parquet))  # the file itself: same ids, same fingerprint
    assert pa.concat_arrays(list(again.ids())).equals(rows["id"].combine_chunks())
    assert again.fingerprint == plan.fingerprint


def test_binary_images_with_an_id_and_a_target_column(tmp_path, mnist_test_arrays):
    images, labels = mnist_test_arrays
    pngs = _pngs(images[:10])
    pngs[3] = b"not an image"
    pq.write_table(pa.table({"uid": pa.array(range(100, 110), pa.int64()), "png": pa.array(pngs, pa.binary()),
                             "target": pa.array(labels[:10].astype(np.int64)), "note": ["x"] * 10}),
                   tmp_path / "a.parquet")
    plan = foreign.open_parquet(str(tmp_path / "a.parquet"))
    assert (plan.columns.image, plan.columns.image_kind, plan.columns.id, plan.columns.label) == \
        ("png", "encoded", "uid", "target")
    rows = next(plan.read_piece(plan.pieces[0], encode=True))  # prepare checks every image
    assert rows["id"].to_pylist() == [str(i) for i in range(100, 110)]
    errors = rows["error"].to_pylist()
    assert errors[3] and errors[3] == "not an image (starts with 'not an ima')" and errors.count(None) == 9


@pytest.mark.parametrize("kind", ["fixed_size_list", "nested", "fixed_size_binary"])
def test_pixel_columns_of_every_layout_become_the_model_pixels(tmp_path, mnist_test_arrays, kind):
    images, labels = mnist_test_arrays
    flat = images[:12].reshape(12, -1)
    if kind == "fixed_size_list":
        column = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1), pa.uint8()), 784)
    elif kind == "nested":
        column = pa.array([[list(r) for r in img] for img in images[:12]], pa.list_(pa.list_(pa.uint8())))
    else:
        column = pa.array([r.tobytes() for r in flat], pa.binary(784))
    pq.write_table(pa.table({"pixels": column, "label": labels[:12].astype(np.int8)}), tmp_path / "p.parquet")
    plan = foreign.open_parquet(str(tmp_path))
    assert plan.columns.image_kind == "pixels" and plan.columns.image == "pixels"
    rows = next(plan.read_piece(plan.pieces[0], encode=True))
    np.testing.assert_array_equal(shards.pixels_numpy(rows["pixels"]), _model_pixels(images[:12]))
    np.testing.assert_array_equal(preprocess.decode_gray_batch(rows["image"].to_pylist()), images[:12])
    assert rows["error"].null_count == 12


def test_variable_pixel_lists_need_a_square_or_an_image_shape(tmp_path, mnist_test_arrays):
    images, _ = mnist_test_arrays
    wide = np.zeros((2, 14, 50), np.uint8)
    wide[:, :, 11:39] = images[:2, ::2, :]  # a digit in a 14x50 strip (700 pixels)
    column = pa.array([list(w.reshape(-1)) for w in wide], pa.list_(pa.uint8()))
    pq.write_table(pa.table({"data": column}), tmp_path / "w.parquet")
    plain = foreign.open_parquet(str(tmp_path))
    rows = next(plain.read_piece(plain.pieces[0]))
    assert all("not a square image" in e for e in rows["error"].to_pylist())
    shaped = foreign.open_parquet(str(tmp_path), image_shape="14x50")
    rows = next(shaped.read_piece(shaped.pieces[0]))
    assert rows["error"].null_count == 2
    np.testing.assert_array_equal(shards.pixels_numpy(rows["pixels"]), _model_pixels(wide))
    with pytest.raises(MnistRayError, match="--image-shape"):
        foreign.open_parquet(str(tmp_path), image_shape="14by50")


def test_ray_tensor_columns_from_numpy_and_read_images(ray_local, tmp_path, mnist_test_arrays):
    import ray

    images, _ = mnist_test_arrays
    ray.data.from_numpy(np.ascontiguousarray(images[:20])).write_parquet(str(tmp_path / "np"))
    plan = foreign.open_parquet(str(tmp_path / "np"))
    assert (plan.columns.image, plan.columns.image_kind, plan.columns.shape) == ("data", "pixels", (28, 28))
    rows = plan.dataset().take_batch(100, batch_format="pyarrow")  # through the Ray read tasks
    assert rows.num_rows == 20 and rows["error"].null_count == 20 and len(set(rows["id"].to_pylist())) == 20
    got = shards.pixels_numpy(rows["pixels"])
    assert {g.tobytes() for g in got} == {m.tobytes() for m in _model_pixels(images[:20])}

    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, png in enumerate(_pngs(images[:6])):
        (folder / f"{i}.png").write_bytes(png)
    ray.data.read_images(str(folder), mode="RGB").write_parquet(str(tmp_path / "ri"))
    plan = foreign.open_parquet(str(tmp_path / "ri"))
    assert (plan.columns.image, plan.columns.shape) == ("image", (28, 28, 3))
    rows = pa.concat_tables(t for p in plan.pieces for t in plan.read_piece(p))
    assert rows.num_rows == 6
    assert {g.tobytes() for g in shards.pixels_numpy(rows["pixels"])} == \
        {m.tobytes() for m in _model_pixels(images[:6])}  # RGB -> L exactly as Pillow does


RAY_WRITTEN_READER = """
import sys
import pyarrow as pa, pyarrow.parquet as pq
from mnist_ray.inputs import foreign
assert "ray" not in sys.modules
for path in sys.argv[1:]:
    plan = foreign.open_parquet(path)
    rows = pa.concat_tables(t for p in plan.pieces for t in plan.read_piece(p))
    pq.write_table(rows.drop_columns(["image"]), path + ".rows.parquet")
    print(plan.columns.shape)
assert "ray" not in sys.modules
"""


def _ray_written(tmp_path, images, labels):
    """Every tensor-column form Ray Data 2.60 writes, with the digits each holds."""
    import ray
    from PIL import Image

    grey = [np.ascontiguousarray(images[i]) for i in range(8)]
    forms = {
        "items": ([{"image": g, "label": int(labels[i])} for i, g in enumerate(grey)], grey),
        "items_hw1": ([{"image": g[..., None]} for g in grey], grey),
        "items_hw3": ([{"image": np.repeat(g[..., None], 3, -1)} for g in grey], grey),
    }
    written = {}
    for name, (items, digits) in forms.items():
        ray.data.from_items(items).write_parquet(str(tmp_path / name))
        written[name] = digits
    ray.data.from_numpy(np.stack(grey)).write_parquet(str(tmp_path / "numpy"))
    written["numpy"] = grey
    folder = tmp_path / "pngs"
    folder.mkdir()
    sized = [np.asarray(Image.fromarray(g).resize((28 + 3 * i, 28 + i))) for i, g in enumerate(grey[:5])]
    for i, img in enumerate(sized):
        Image.fromarray(img).save(folder / f"{i}.png")
    ray.data.read_images(str(folder)).write_parquet(str(tmp_path / "images_sizes"))
    ray.data.read_images(str(folder), mode="RGB").write_parquet(str(tmp_path / "images_sizes_rgb"))
    written["images_sizes"] = written["images_sizes_rgb"] = sized
    return written


def test_every_tensor_column_ray_writes_is_read_with_or_without_ray_imported(ray_local, tmp_path, mnist_test_arrays):
    """Ray 2.60's Parquet (from_items, from_numpy, read_images of one size or of several): its
    tensor metadata is JSON, a list for a fixed shape, a number of dimensions for a variable one."""
    import subprocess
    import sys

    images, labels = mnist_test_arrays
    written = _ray_written(tmp_path, images, labels)
    schema = pq.read_schema(next((tmp_path / "items").glob("*.parquet")))
    assert schema.field("image").type.extension_name == "ray.data.arrow_tensor_v2"
    paths = [str(tmp_path / name) for name in written]
    # A user's `mnist-ray infer` plans the read before Ray is imported: Ray's types unregistered.
    done = subprocess.run([sys.executable, "-c", RAY_WRITTEN_READER, *paths], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:4] == ["(28, 28)", "(28, 28, 1)", "(28, 28, 3)", "(28, 28)"]
    for name, digits in written.items():
        expected = {m.tobytes() for m in _model_pixels(digits)}
        unregistered = pq.read_table(str(tmp_path / name) + ".rows.parquet")
        plan = foreign.open_parquet(str(tmp_path / name))  # here Ray's types are registered
        registered = plan.dataset().take_batch(100, batch_format="pyarrow")  # through Ray's read tasks
        for rows in (unregistered, registered):
            assert rows.num_rows == len(digits) and rows["error"].null_count == len(digits), name
            assert {g.tobytes() for g in shards.pixels_numpy(rows["pixels"])} == expected, name
    assert foreign.open_parquet(str(tmp_path / "items")).columns.label == "label"


def test_ray_tensor_metadata_of_any_version_gives_a_shape_or_none():
    v2, var = b"ray.data.arrow_tensor_v2", b"ray.data.arrow_variable_shaped_tensor"
    assert columns.ray_tensor_shape(v2, b"[28, 28]") == (28, 28)
    assert columns.ray_tensor_shape(b"ray.data.arrow_tensor", b'{"shape": [28, 28, 3]}') == (28, 28, 3)
    assert columns.ray_tensor_shape(var, b"2") is None
    assert columns.ray_tensor_shape(v2, b"\x80\x05\x95 cloudpickle") is None  # Ray 2.49-2.54: never unpickled
    assert columns.ray_tensor_shape(v2, b"[]") is None and columns.ray_tensor_shape(v2, b'"x"') is None
    assert columns.ray_tensor_shape(b"other", b"[28, 28]") is None
    meta = {b"ARROW:extension:name": v2, b"ARROW:extension:metadata": b"[2, 2]"}
    floats = pa.schema([pa.field("image", pa.large_list(pa.float32()), metadata=meta)])
    with pytest.raises(MnistRayError, match=r"no image column .*image \(large_list<item: float>\)") as e:
        columns.detect(floats)
    assert "\n" not in str(e.value)
    with pytest.raises(MnistRayError, match=r"--image-column 'image' is large_list<item: float>, not images"):
        columns.detect(floats, image_column="image")


def test_bad_parquet_gives_one_line_errors(tmp_path):
    pq.write_table(pa.table({"a": [1, 2], "name": ["x", "y"]}), tmp_path / "none.parquet")
    with pytest.raises(MnistRayError, match=r"no image column .*columns: a \(int64\), name \(string\)") as e:
        foreign.open_parquet(str(tmp_path / "none.parquet"))
    assert "\n" not in str(e.value)
    pq.write_table(pa.table({"front": [b"1"], "back": [b"2"]}), tmp_path / "two.parquet")
    with pytest.raises(MnistRayError, match=r"several image columns \(front, back\).*--image-column"):
        foreign.open_parquet(str(tmp_path / "two.parquet"))
    assert foreign.open_parquet(str(tmp_path / "two.parquet"), image_column="back").columns.image == "back"
    with pytest.raises(MnistRayError, match="--image-column 'a' is int64, not images"):
        foreign.open_parquet(str(tmp_path / "none.parquet"), image_column="a")
    with pytest.raises(MnistRayError, match="--image-column 'nope': no such column"):
        foreign.open_parquet(str(tmp_path / "two.parquet"), image_column="nope")
    pq.write_table(pa.table({"image": [b"1"], "label": [1], "class": [2]}), tmp_path / "labels.parquet")
    with pytest.raises(MnistRayError, match="several label columns"):
        foreign.open_parquet(str(tmp_path / "labels.parquet"))
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(MnistRayError, match="not a readable Parquet file"):
        foreign.open_parquet(str(tmp_path / "junk.parquet"))
    with pytest.raises(MnistRayError, match="nothing at"):
        foreign.open_parquet(str(tmp_path / "missing"))


def test_a_glob_and_the_fingerprint_of_files_without_a_manifest(tmp_path):
    for name in ("a", "b", "c"):
        pq.write_table(pa.table({"image": [b"x" * 3]}), tmp_path / f"{name}.parquet")
    (tmp_path / "_SUCCESS").write_bytes(b"")
    plan = foreign.open_parquet(str(tmp_path / "[ab].parquet"))
    assert [files.FileSet.rel(plan.files, f) for f in plan.files.files] == ["a.parquet", "b.parquet"]
    before = foreign.open_parquet(str(tmp_path)).fingerprint
    assert foreign.open_parquet(str(tmp_path)).fingerprint == before  # stable
    assert foreign.open_parquet(str(tmp_path), image_column="image", id_column=None).fingerprint == before
    pq.write_table(pa.table({"image": [b"y" * 3]}), tmp_path / "c.parquet")  # same size, new content
    stat = os.stat(tmp_path / "c.parquet")
    os.utime(tmp_path / "c.parquet", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert foreign.open_parquet(str(tmp_path)).fingerprint != before


# --- end to end: infer and prepare on foreign input ------------------------------------------

def _write_hf(path, images, labels, ids=None):
    import datasets

    columns = {"image": [{"bytes": b, "path": None} for b in _pngs(images)], "label": [int(v) for v in labels]}
    features = {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])}
    if ids is not None:
        columns, features = {"id": list(ids), **columns}, {"id": datasets.Value("string"), **features}
    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).to_parquet(str(path))
    return path


def _by_index(table, index_of):
    keys = np.array([index_of(i) for i in table["id"].to_pylist()])
    return table.take(pa.array(np.argsort(keys))), np.sort(keys)


@pytest.mark.e2e
def test_hf_parquet_zip_and_shards_give_identical_predictions(trained_model, tmp_path, mnist_idx_dir,
                                                             mnist_test_arrays):
    """The same 200 MNIST test digits as mnist-ray shards, as a `datasets` Parquet and as a zip of
    PNG class folders: one prediction per image, identical whatever the input."""
    import zipfile

    import duckdb
    import pandas as pd

    from mnist_ray.formats import predictions
    from mnist_ray.inference.infer import InferConfig, run
    from mnist_ray.preparation.prepare import PrepareConfig
    from mnist_ray.preparation.prepare import run as prepare

    model_dir, _ = trained_model
    images, labels = mnist_test_arrays
    prepare(PrepareConfig(source=f"idx:{mnist_idx_dir}", output=str(tmp_path / "shards"), limit=200))
    ids = sorted(shards.read_table(str(tmp_path / "shards"))["id"].to_pylist())
    index = np.array([int(i.split("-")[1]) for i in ids])
    _write_hf(tmp_path / "hf" / "data" / "test.parquet", images[index], labels[index])  # no id: FILE#ROW
    with zipfile.ZipFile(tmp_path / "digits.zip", "w") as z:
        for i, png in zip(index, _pngs(images[index])):
            z.writestr(f"mnist/{labels[i]}/{i:05d}.png", png)

    out = {}
    for name, source in (("shards", tmp_path / "shards"), ("hf", tmp_path / "hf"), ("zip", tmp_path / "digits.zip")):
        summary = run(InferConfig(model=model_dir, input=str(source), output=str(tmp_path / f"p-{name}")))
        assert summary["rows"] == 200 and summary["errors"] == 0, name
        out[name] = predictions.read_predictions(str(tmp_path / f"p-{name}"))
    shard_p, keys = _by_index(out["shards"], lambda i: int(i.split("-")[1]))
    hf_p, hf_keys = _by_index(out["hf"], lambda i: index[int(i.split("#")[1])])
    zip_p, zip_keys = _by_index(out["zip"], lambda i: int(i.rsplit("/", 1)[1][:5]))
    assert out["hf"]["id"][0].as_py().startswith("data/test.parquet#")
    assert keys.tolist() == hf_keys.tolist() == zip_keys.tolist() == index.tolist()
    for other in (hf_p, zip_p):
        assert other["prediction"].equals(shard_p["prediction"])
        assert other["label"].equals(shard_p["label"])
        np.testing.assert_allclose(np.array(other["probabilities"].to_pylist()),
                                   np.array(shard_p["probabilities"].to_pylist()), atol=1e-6)
    assert shard_p["class_name"].to_pylist() == [str(p) for p in shard_p["prediction"].to_pylist()]
    assert (np.array(shard_p["prediction"]) == labels[index]).mean() > 0.8  # a real model on real digits

    # the predictions open in pandas, DuckDB and datasets
    manifest = json.loads((tmp_path / "p-zip" / "_manifest.json").read_text())
    assert manifest["input"]["kind"] == "archive"
    files = [str(tmp_path / "p-zip" / f["path"]) for f in manifest["files"]]
    frame = pd.concat(pd.read_parquet(f) for f in files)
    assert len(frame) == 200 and set(frame["class_name"]) <= {str(i) for i in range(10)}
    hits = duckdb.connect().execute(
        f"SELECT count(*) FROM read_parquet({files!r}) WHERE prediction = label").fetchone()[0]
    assert hits == int((np.array(zip_p["prediction"]) == np.array(zip_p["label"])).sum())
    import datasets

    loaded = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hfc"))
    assert len(loaded) == 200 and loaded[0]["class_name"] == str(loaded[0]["prediction"])


@pytest.mark.e2e
def test_infer_from_parquet_on_s3_with_an_id_column_and_bad_rows(trained_model, s3_bucket, tmp_path, mnist_test_arrays):
    import boto3

    from mnist_ray.inference.infer import InferConfig, run
    from mnist_ray.formats import predictions

    model_dir, _ = trained_model
    images, labels = mnist_test_arrays
    pngs = _pngs(images[:40])
    pngs[5] = b"garbage"
    local = tmp_path / "x.parquet"
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(40)], "img": pa.array(pngs, pa.binary()),
                             "digit": labels[:40].astype(np.int64)}), local, row_group_size=16)
    boto3.client("s3").upload_file(str(local), s3_bucket, "in/x.parquet")
    with pytest.raises(MnistRayError, match=r"--image-column 'key' is string, not images"):
        run(InferConfig(model=model_dir, input=f"s3://{s3_bucket}/in/x.parquet", output=str(tmp_path / "p0"),
                        image_column="key"))
    assert not (tmp_path / "p0" / "_SUCCESS").exists()
    summary = run(InferConfig(model=model_dir, input=f"s3://{s3_bucket}/in/x.parquet", output=f"s3://{s3_bucket}/p",
                              image_column="img", id_column="key", label_column="digit", max_error_rate=0.1))
    assert summary["rows"] == 40 and summary["errors"] == 1
    table = predictions.read_predictions(f"s3://{s3_bucket}/p").sort_by("id")
    bad = table.filter(table["error"].is_valid())
    assert bad["id"].to_pylist() == ["k5"] and bad["class_name"].null_count == 1
    assert set(table["label"].to_pylist()) == set(labels[:40].tolist())


@pytest.mark.e2e
def test_infer_on_the_parquet_ray_data_itself_writes(trained_model, tmp_path, mnist_test_arrays):
    """A user's MNIST test set from ``ray.data.from_items(...).write_parquet``: a tensor column
    whose metadata is the JSON list [28, 28]; one prediction per input row."""
    import ray

    from mnist_ray.formats import predictions
    from mnist_ray.inference.infer import InferConfig, run

    model_dir, _ = trained_model
    images, labels = mnist_test_arrays
    ray.data.from_items([{"image": np.ascontiguousarray(images[i]), "label": int(labels[i])}
                         for i in range(100)]).write_parquet(str(tmp_path / "mine"))
    summary = run(InferConfig(model=model_dir, input=str(tmp_path / "mine"), output=str(tmp_path / "p")))
    assert summary["rows"] == 100 and summary["errors"] == 0
    table = predictions.read_predictions(str(tmp_path / "p"))
    assert table.num_rows == 100 and len(set(table["id"].to_pylist())) == 100
    assert sorted(table["label"].to_pylist()) == sorted(labels[:100].tolist())
    assert (np.array(table["prediction"]) == np.array(table["label"])).mean() > 0.8


@pytest.mark.e2e
def test_prepare_from_parquet_keeps_class_names_and_publishes_nothing_from_garbage(ray_local, tmp_path,
                                                                                    mnist_test_arrays):
    import datasets

    from mnist_ray.preparation.prepare import PrepareConfig, run as prepare

    images, labels = mnist_test_arrays
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    (tmp_path / "hf").mkdir()
    datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in _pngs(images[:50])],
                                "label": labels[:50].tolist()}, features=features).to_parquet(
        str(tmp_path / "hf" / "a.parquet"))
    summary = prepare(PrepareConfig(source=f"parquet:{tmp_path}/hf/*.parquet", output=str(tmp_path / "shards")))
    assert summary["rows"] == 50 and summary["rejected"] == 0
    table = shards.read_table(str(tmp_path / "shards")).sort_by("label")
    assert set(table["id"].to_pylist()) == {f"a.parquet#{i}" for i in range(50)}
    files = [str(p) for p in (tmp_path / "shards").glob("part-*.parquet")]
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hfc"))
    assert ds.features["label"].names == names
    assert ds.features["label"].int2str(ds[0]["label"]) == names[labels[int(ds[0]["id"].split("#")[1])]]

    pq.write_table(pa.table({"image": [b"garbage"] * 5}), tmp_path / "bad.parquet")
    with pytest.raises(MnistRayError, match="could be decoded"):
        prepare(PrepareConfig(source=f"parquet:{tmp_path}/bad.parquet", output=str(tmp_path / "never")))
    assert not (tmp_path / "never" / "_SUCCESS").exists()
    with pytest.raises(MnistRayError, match="are for --source parquet:PATH"):
        prepare(PrepareConfig(source="mnist-sample", output=str(tmp_path / "never2"), image_column="x"))
