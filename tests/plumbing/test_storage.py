import json

import pyarrow.fs as pafs
import pytest

from mnist_ray.plumbing import storage
from mnist_ray.errors import MnistRayError


def _manifest(files):
    return {"kind": "test", "files": [{"path": f} for f in files], "fingerprint": "sha256:x"}


def test_resolve_local_and_s3(tmp_path, s3_server):
    loc = storage.resolve(str(tmp_path / "a"))
    assert loc.is_local and loc.path == str(tmp_path / "a")
    s3 = storage.resolve("s3://bucket/some/prefix/")
    assert isinstance(s3.fs, pafs.S3FileSystem) and s3.path == "bucket/some/prefix"
    assert s3.uri_of("x") == "s3://bucket/some/prefix/x"


def test_publish_then_open(tmp_path):
    loc = storage.prepare_output(str(tmp_path / "ds"), overwrite=False, run_id="aaa")
    with pytest.raises(MnistRayError, match="not a complete dataset"):
        storage.open_dataset(str(tmp_path / "ds"), producer="make it")
    storage.write_bytes(loc, "part-aaa-0.parquet", b"data")
    storage.publish(loc, _manifest(["part-aaa-0.parquet"]), run_id="aaa")
    _, manifest = storage.open_dataset(str(tmp_path / "ds"), producer="make it")
    assert manifest["files"] == [{"path": "part-aaa-0.parquet"}]
    assert json.loads((tmp_path / "ds" / "_SUCCESS").read_text())["run_id"] == "aaa"


def test_refuses_to_overwrite_a_complete_dataset(tmp_path):
    loc = storage.prepare_output(str(tmp_path / "ds"), overwrite=False, run_id="aaa")
    storage.write_bytes(loc, "part-aaa-0.parquet", b"old")
    storage.publish(loc, _manifest(["part-aaa-0.parquet"]), run_id="aaa")
    with pytest.raises(MnistRayError, match="--overwrite"):
        storage.prepare_output(str(tmp_path / "ds"), overwrite=False, run_id="bbb")
    # With overwrite the old dataset stays complete and readable until the new manifest lands.
    loc = storage.prepare_output(str(tmp_path / "ds"), overwrite=True, run_id="bbb")
    storage.write_bytes(loc, "part-bbb-0.parquet", b"new")
    _, manifest = storage.open_dataset(str(tmp_path / "ds"), producer="p")
    assert manifest["files"] == [{"path": "part-aaa-0.parquet"}]
    storage.publish(loc, _manifest(["part-bbb-0.parquet"]), run_id="bbb")
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["_SUCCESS", "_manifest.json", "part-bbb-0.parquet"]


def test_refuses_foreign_directories_files_and_unwritable_paths(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(MnistRayError, match="not an mnist-ray dataset"):
        storage.prepare_output(str(tmp_path / "mine"), overwrite=True, run_id="a")
    (tmp_path / "file").write_text("x")
    with pytest.raises(MnistRayError, match="is a file"):
        storage.prepare_output(str(tmp_path / "file"), overwrite=False, run_id="a")
    with pytest.raises(MnistRayError):
        storage.prepare_output(str(tmp_path / "file" / "below"), overwrite=False, run_id="a")
    with pytest.raises(MnistRayError, match="cannot write|permission|Read-only|/proc"):
        storage.prepare_output("/proc/mnist-ray-out", overwrite=False, run_id="a")


def test_publish_refuses_a_manifest_listing_missing_files(tmp_path):
    loc = storage.prepare_output(str(tmp_path / "ds"), overwrite=False, run_id="a")
    with pytest.raises(MnistRayError, match="missing"):
        storage.publish(loc, _manifest(["part-a-0.parquet"]), run_id="a")
    assert not (tmp_path / "ds" / "_SUCCESS").exists()


def test_s3_bucket_missing_is_a_clear_error(s3_server):
    with pytest.raises(MnistRayError, match="bucket 'no-such-bucket' does not exist"):
        storage.prepare_output("s3://no-such-bucket/x", overwrite=False, run_id="a")
    with pytest.raises(MnistRayError, match="does not exist"):
        storage.open_dataset("s3://no-such-bucket/x", producer="p")


def test_s3_publish_and_open(s3_bucket):
    uri = f"s3://{s3_bucket}/ds"
    loc = storage.prepare_output(uri, overwrite=False, run_id="a")
    storage.write_bytes(loc, "part-a-0.parquet", b"data")
    with pytest.raises(MnistRayError, match="no _SUCCESS"):
        storage.open_dataset(uri, producer="p")
    storage.publish(loc, _manifest(["part-a-0.parquet"]), run_id="a")
    _, manifest = storage.open_dataset(uri, producer="p")
    assert manifest["fingerprint"] == "sha256:x"
