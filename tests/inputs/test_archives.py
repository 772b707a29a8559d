"""archives: zip, tar, tar.gz and WebDataset shards of image folders, read without unpacking."""

import io
import json
import tarfile
import zipfile

import numpy as np
import pyarrow as pa
import pytest

from mnist_ray.images import preprocess
from mnist_ray.inputs import archives
from mnist_ray.errors import MnistRayError

N = 200


@pytest.fixture(scope="module")
def members(mnist_test_arrays):
    """{member name: PNG bytes} of 200 real MNIST test digits in class folders, and the labels."""
    images, labels = mnist_test_arrays
    pngs = preprocess.encode_png(np.ascontiguousarray(images[:N]))
    return {f"digits/{labels[i]}/t{i:04d}.png": pngs[i] for i in range(N)}


def _zip(path, members, method=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression=method) as z:
        z.writestr("digits/", b"")  # a directory entry
        z.writestr("__MACOSX/digits/._x.png", b"junk")
        z.writestr("digits/README.txt", b"not an image")
        for name, data in members.items():
            z.writestr(name, data)
    return path


def _tar(path, members, mode="w"):
    with tarfile.open(path, mode) as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def _rows(plan):
    return pa.concat_tables(t for p in plan.pieces for t in plan.read_piece(p)).sort_by("id")


def _expect(rows, members, prefix=""):
    names = sorted(members)
    assert rows["id"].to_pylist() == [prefix + n for n in names]
    assert rows["image"].to_pylist() == [members[n] for n in names]
    assert rows["label"].to_pylist() == [int(n.split("/")[1]) for n in names]
    assert rows["error"].null_count == rows.num_rows


@pytest.mark.parametrize("kind", ["zip-deflate", "zip-stored", "tar", "tar.gz"])
def test_every_archive_kind_gives_every_member_with_its_class(tmp_path, members, kind, monkeypatch):
    monkeypatch.setattr(archives, "PIECE_MEMBERS", 64)
    if kind.startswith("zip"):
        path = _zip(tmp_path / "d.zip", members, zipfile.ZIP_STORED if kind == "zip-stored" else zipfile.ZIP_DEFLATED)
    else:
        path = _tar(tmp_path / f"d.{kind}", members, "w:gz" if kind == "tar.gz" else "w")
    plan = archives.open_archives(str(path))
    assert plan.rows == N
    # zip and tar: ranges of 64 members read in parallel; tar.gz: one streaming task
    assert len(plan.pieces) == (1 if kind == "tar.gz" else 4)
    rows = _rows(plan)
    _expect(rows, members)
    assert rows["path"][0].as_py() == f"{path}/{sorted(members)[0]}"
    assert pa.concat_arrays(list(plan.ids())).sort().equals(rows["id"].combine_chunks())
    assert plan.sample().num_rows == 8


def test_a_corrupt_member_is_one_error_row_and_the_rest_are_read(tmp_path, members):
    path = _zip(tmp_path / "d.zip", members)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        victim = z.getinfo("digits/7/t0000.png")
    at = victim.header_offset + 30 + len(victim.filename) + 10
    raw[at: at + 8] = b"\xff" * 8  # inside the deflated data
    path.write_bytes(bytes(raw))
    rows = _rows(archives.open_archives(str(path)))
    assert rows.num_rows == N
    bad = rows.filter(rows["error"].is_valid())
    assert bad["id"].to_pylist() == ["digits/7/t0000.png"]
    assert bad["error"][0].as_py().startswith("corrupt archive member")


def test_tar_members_that_are_not_images_become_error_rows_in_prepare(tmp_path, members):
    broken = dict(members)
    broken["digits/3/broken.png"] = b"\x89PNG\r\n\x1a\n not really"
    plan = archives.open_archives(str(_tar(tmp_path / "d.tar", broken)))
    rows = pa.concat_tables(t for p in plan.pieces for t in plan.read_piece(p, encode=True))
    bad = rows.filter(rows["error"].is_valid())
    assert bad["id"].to_pylist() == ["digits/3/broken.png"] and rows.num_rows == N + 1


def test_webdataset_shards_by_glob(tmp_path, members):
    names = sorted(members)
    for shard in range(2):
        part = {}
        for i, name in enumerate(names[shard * 100:(shard + 1) * 100]):
            key = f"sample{shard * 100 + i:06d}"
            part[f"{key}.png"] = members[name]
            part[f"{key}.cls"] = name.split("/")[1].encode()
            part[f"{key}.json"] = b"{}"
        _tar(tmp_path / f"shard-{shard:04d}.tar", part)
    plan = archives.open_archives(str(tmp_path / "shard-*.tar"))
    assert plan.rows == N and all(p.webdataset for p in plan.pieces)
    rows = _rows(plan)
    assert rows["id"].to_pylist()[:2] == ["shard-0000.tar/sample000000", "shard-0000.tar/sample000001"]
    assert rows["image"].to_pylist() == [members[n] for n in names]
    assert rows["label"].to_pylist() == [int(n.split("/")[1]) for n in names]


def test_files_that_are_not_archives_give_one_line_errors(tmp_path, members):
    for name in ("fake.zip", "fake.tar", "fake.tar.gz"):
        (tmp_path / name).write_bytes(b"this is not an archive at all" * 40)
        with pytest.raises(MnistRayError, match="is not a readable .*archive") as e:
            archives.open_archives(str(tmp_path / name))
        assert "\n" not in str(e.value)
    good = _tar(tmp_path / "d.tar.gz", members, "w:gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(good[: len(good) // 2])
    with pytest.raises(MnistRayError, match="not a readable gzipped tar archive"):
        archives.open_archives(str(tmp_path / "cut.tar.gz"))
    _zip(tmp_path / "empty.zip", {"a/notes.txt": b"x"})
    with pytest.raises(MnistRayError, match="no image files"):
        archives.open_archives(str(tmp_path / "empty.zip"))


@pytest.mark.e2e
def test_a_zip_on_s3_through_ray_read_tasks(ray_local, s3_bucket, tmp_path, members, monkeypatch):
    import boto3

    monkeypatch.setattr(archives, "PIECE_MEMBERS", 50)
    path = _zip(tmp_path / "d.zip", members)
    boto3.client("s3").upload_file(str(path), s3_bucket, "in/d.zip")
    plan = archives.open_archives(f"s3://{s3_bucket}/in/d.zip")
    assert len(plan.pieces) == 4
    rows = plan.dataset().take_batch(1000, batch_format="pyarrow").sort_by("id")
    _expect(rows, members)
    assert rows["path"][0].as_py() == f"s3://{s3_bucket}/in/d.zip/{sorted(members)[0]}"


def _corrupt(path, member):
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(member)
    at = info.header_offset + 30 + len(info.filename) + 10
    raw[at: at + 8] = b"\xff" * 8
    path.write_bytes(bytes(raw))


@pytest.mark.e2e
def test_prepare_and_infer_on_a_zip_with_a_corrupt_member(trained_model, tmp_path, members):
    from mnist_ray.formats import predictions, shards
    from mnist_ray.inference.infer import InferConfig, run as infer
    from mnist_ray.preparation.prepare import PrepareConfig, run as prepare

    model_dir, _ = trained_model
    path = _zip(tmp_path / "d.zip", members)
    _corrupt(path, "digits/7/t0000.png")
    summary = prepare(PrepareConfig(source=f"images:{path}", output=str(tmp_path / "shards"), rows_per_shard=80))
    assert summary["rows"] == N - 1 and summary["rejected"] == 1 and summary["shards"] >= 3  # <= 80 rows each
    table = shards.read_table(str(tmp_path / "shards")).sort_by("id")
    kept = sorted(n for n in members if n != "digits/7/t0000.png")
    assert table["id"].to_pylist() == kept and table["image"].to_pylist() == [members[n] for n in kept]
    assert table["label"].to_pylist() == [int(n.split("/")[1]) for n in kept]
    manifest = json.loads((tmp_path / "shards" / "_manifest.json").read_text())
    assert manifest["rejected"][0]["id"] == "digits/7/t0000.png"
    assert manifest["rejected"][0]["error"].startswith("corrupt archive member")

    result = infer(InferConfig(model=model_dir, input=str(path), output=str(tmp_path / "p")))
    assert result["rows"] == N and result["errors"] == 1  # one error row, the rest scored
    scored = predictions.read_predictions(str(tmp_path / "p"))
    bad = scored.filter(scored["error"].is_valid())
    assert bad["id"].to_pylist() == ["digits/7/t0000.png"] and bad["error"][0].as_py().startswith("corrupt archive")


@pytest.mark.e2e
def test_prepare_webdataset_shards_and_refuse_a_non_archive(ray_local, tmp_path, members):
    from mnist_ray.formats import shards
    from mnist_ray.preparation.prepare import PrepareConfig, run as prepare

    names = sorted(members)
    for shard in range(2):
        part = {}
        for i, name in enumerate(names[shard * 100:(shard + 1) * 100]):
            part[f"s{shard}/{i:04d}.png"] = members[name]
            part[f"s{shard}/{i:04d}.cls"] = name.split("/")[1].encode()
        _tar(tmp_path / f"shard-{shard}.tar", part)
    summary = prepare(PrepareConfig(source=f"images:{tmp_path}/shard-*.tar", output=str(tmp_path / "shards")))
    assert summary["rows"] == N and summary["rejected"] == 0
    table = shards.read_table(str(tmp_path / "shards")).sort_by("id")
    assert table["id"][0].as_py() == "shard-0.tar/s0/0000"
    assert sorted(table["label"].to_pylist()) == sorted(int(n.split("/")[1]) for n in names)
    (tmp_path / "fake.zip").write_bytes(b"nope" * 100)
    with pytest.raises(MnistRayError, match="is not a readable zip archive"):
        prepare(PrepareConfig(source=f"images:{tmp_path}/fake.zip", output=str(tmp_path / "never")))
    assert not (tmp_path / "never" / "_SUCCESS").exists()
