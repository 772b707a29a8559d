"""Inference's inputs behind one interface: shards and image folders, then their Ray datasets."""

import threading

import pyarrow as pa
import pytest

from mnist_ray.formats import shards
from mnist_ray.inputs import registry, sources
from mnist_ray.inputs.columns import ColumnChoice
from mnist_ray.errors import MnistRayError


def test_an_image_folder_describes_samples_and_digests_its_files_without_ray(digit_folder):
    root, good = digit_folder
    source = registry.open_input(str(root), registry.INFER)
    assert isinstance(source, sources.ImageFolderSource)
    files = len(good) + 2  # the corrupt and the truncated file are inputs too
    assert source.describe() == {"kind": "images", "uri": str(root), "files": files, "rows": files,
                                 "fingerprint": source.fingerprint}
    assert source.resume_key == "path" and source.scheme == ""
    sample = source.sample()
    assert sample.num_rows == sources.SAMPLE_ROWS and set(sample.column_names) >= {"id", "image", "label", "path"}
    expected = shards.IdDigest()
    expected.add(pa.array(sorted([*good, "3/broken.png", "5/truncated.jpg"]), pa.string()))
    assert source.digest(threading.Event()) == expected
    with pytest.raises(MnistRayError, match="no folder"):
        registry.open_input(str(root / "nothing-here"), registry.INFER)


def test_shards_are_claimed_by_their_manifest_and_read_by_it(ray_local, small_shards):
    source = registry.open_input(small_shards, registry.INFER)
    assert isinstance(source, sources.ShardSource) and source.resume_key == "id"
    table = shards.read_table(small_shards)
    assert source.describe()["rows"] == table.num_rows and source.describe()["kind"] == "shards"
    assert source.columns() == ["id", "pixels", "label", "path"]  # schema 2: stored pixels, no decode
    assert source.sample().column_names == source.columns()
    expected = shards.IdDigest()
    expected.add(table["id"])
    assert source.digest(threading.Event()) == expected
    stopped = threading.Event()
    stopped.set()
    assert source.digest(stopped) is None  # a failed run does not wait for the digest
    ds = source.dataset(read_cpus=0.25)
    assert ds.count() == table.num_rows and ds.columns() == source.columns()


def test_an_image_folder_dataset_yields_shard_like_rows(ray_local, digit_folder):
    root, good = digit_folder
    source = registry.open_input(str(root), registry.INFER)
    rows = source.dataset(read_cpus=0.25).take_all()
    assert len(rows) == source.rows
    by_id = {r["id"]: r for r in rows}
    assert all(by_id[k]["label"] == v for k, v in good.items())
    assert by_id["loose.png"]["path"] == str(root / "loose.png")


def test_every_kind_implements_the_interface():
    for command, methods in ((registry.INFER, ("claims", "sample", "digest", "dataset")),
                             (registry.PREPARE, ("shard_rows",))):
        for kind in (registry.KINDS[name] for name in command.kinds):
            for method in methods:
                assert getattr(kind, method) is not getattr(sources.Source, method), f"{kind.__name__}.{method}"
        assert registry.KINDS[command.kinds[-1]].claims("anything")  # the catch-all is last


def test_each_command_opens_only_the_kinds_it_reads(digit_folder, tmp_path):
    root, _ = digit_folder
    assert registry.kind_of(f"images:{root}", registry.PREPARE) is sources.ImageFolderSource
    assert registry.kind_of(f"images:{tmp_path}/d.zip", registry.PREPARE) is sources.ArchiveSource
    assert registry.kind_of("parquet:x", registry.PREPARE) is sources.ParquetSource
    assert registry.kind_of("mnist-test", registry.PREPARE) is sources.DatasetSource
    assert registry.kind_of(str(root), registry.INFER) is sources.ImageFolderSource
    assert registry.kind_of("mnist-test", registry.INFER) is sources.ImageFolderSource  # infer reads no datasets
    with pytest.raises(MnistRayError, match="are for --source parquet:PATH"):
        registry.open_input(f"images:{root}", registry.PREPARE,
                            registry.Options(columns=ColumnChoice(image_column="x")))
    with pytest.raises(MnistRayError, match=f"are for Parquet input; {root} is images"):
        registry.open_input(str(root), registry.INFER, registry.Options(columns=ColumnChoice(image_column="x")))
