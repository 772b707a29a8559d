import gzip
import logging
import time

import numpy as np
import pytest

from mnist_ray.inputs import datasets
from mnist_ray.errors import MnistRayError


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_parse_idx_plain_and_gzipped():
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(datasets.parse_idx(_idx(images)), images)
    np.testing.assert_array_equal(datasets.parse_idx(gzip.compress(_idx(images))), images)


def test_parse_idx_rejects_truncated_and_foreign_files():
    data = _idx(np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(MnistRayError, match="truncated"):
        datasets.parse_idx(data[:-10])
    with pytest.raises(MnistRayError, match="not an IDX file"):
        datasets.parse_idx(b"\x89PNG\r\n\x1a\n....")


def test_idx_folder_reads_the_complete_pair_and_warns_about_the_lone_labels(mnist_idx_dir, mnist_test_arrays,
                                                                           tmp_path, caplog):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (tmp_path / name).write_bytes((mnist_idx_dir / name).read_bytes())
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(np.zeros(3, np.uint8)))
    with caplog.at_level(logging.WARNING):
        data = datasets.idx_folder(str(tmp_path), name="idx")
    assert list(data.splits) == ["test"]  # train has labels only
    assert "skipping the train split" in caplog.text
    images, labels = mnist_test_arrays
    np.testing.assert_array_equal(data.splits["test"].images, images)
    np.testing.assert_array_equal(data.splits["test"].labels, labels)
    assert len(set(data.splits["test"].ids)) == 10_000


def test_mnist_test_is_the_packaged_test_set_checked_by_md5(mnist_test_arrays, monkeypatch):
    data = datasets.load("mnist-test")
    assert data.name == "mnist-test" and list(data.splits) == ["test"]
    images, labels = mnist_test_arrays
    np.testing.assert_array_equal(data.splits["test"].images, images)
    np.testing.assert_array_equal(data.splits["test"].labels, labels)
    monkeypatch.setitem(datasets.MNIST_TEST_MD5, "t10k-labels-idx1-ubyte.gz", "0" * 32)
    with pytest.raises(MnistRayError, match="packaged MNIST test set is corrupt"):
        datasets.load("mnist-test")


def test_idx_folder_without_a_pair_is_an_error(tmp_path):
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx(np.zeros(3, np.uint8)))
    with pytest.raises(MnistRayError, match="no complete pair"):
        datasets.idx_folder(str(tmp_path), name="idx")
    with pytest.raises(MnistRayError, match="no folder"):
        datasets.idx_folder(str(tmp_path / "missing"), name="idx")


def test_mnist_sample_is_5000_digits_500_per_class_split_stratified():
    data = datasets.mnist_sample(val_fraction=0.1, seed=0)
    assert data.num_rows == 5000
    labels = np.concatenate([s.labels for s in data.splits.values()])
    assert np.bincount(labels).tolist() == [500] * 10
    assert np.bincount(data.splits["val"].labels).tolist() == [50] * 10
    assert data.splits["train"].images.shape == (4500, 28, 28)
    ids = np.concatenate([s.ids for s in data.splits.values()])
    assert len(set(ids)) == 5000
    again = datasets.mnist_sample(val_fraction=0.1, seed=0)
    np.testing.assert_array_equal(again.splits["val"].ids, data.splits["val"].ids)
    other = datasets.mnist_sample(val_fraction=0.1, seed=1)
    assert set(other.splits["val"].ids) != set(data.splits["val"].ids)


def test_unknown_source_lists_the_known_ones():
    with pytest.raises(MnistRayError, match="mnist-sample"):
        datasets.load("cifar")


def test_full_sets_without_network_or_files_fail_fast_naming_offline_alternatives(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(datasets, "FASHION_DEBIAN_DIR", str(tmp_path / "no-debian-files"))
    # An unroutable URL stands in for "no network": the test must not depend on the internet.
    monkeypatch.setattr(datasets, "KERAS_URL", "http://127.0.0.1:9/")
    for source in ("mnist", "fashion-mnist"):
        started = time.monotonic()
        with pytest.raises(MnistRayError, match="offline alternatives: --source mnist-sample"):
            datasets.load(source)
        assert time.monotonic() - started < 15
    assert not list(tmp_path.rglob("*.part-*"))  # no partial download left behind


def test_paths_give_labels_and_splits():
    assert datasets.label_from_path("7/x.png") == 7
    assert datasets.label_from_path("train/3/a/b.jpg") is None
    assert datasets.label_from_path("x.png") is None
    assert datasets.split_from_path("train/7/x.png") == "train"
    assert datasets.split_from_path("7/x.png") is None
    assert datasets.split_from_path("test.png") is None


def test_image_folder_lists_images_only(tmp_path):
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "a.png").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    folder = datasets.image_folder(str(tmp_path))
    assert [rel for rel, _ in folder.files] == ["7/a.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MnistRayError, match="no image files"):
        datasets.image_folder(str(empty))


def test_render_photo_makes_a_large_dark_on_light_jpeg_deterministically(mnist_test_arrays):
    import io

    from PIL import Image

    images, _ = mnist_test_arrays
    a = datasets.render_photo(images[0], np.random.default_rng(7))
    assert a == datasets.render_photo(images[0], np.random.default_rng(7))
    photo = Image.open(io.BytesIO(a))
    assert photo.format == "JPEG" and photo.mode == "RGB" and min(photo.size) >= 160
    assert np.asarray(photo.convert("L")).mean() > 127  # light paper


def test_photos_source_wraps_array_sources_only(tmp_path):
    data = datasets.load("photos:mnist-sample")
    assert data.render == "photo" and data.num_rows == 5000
    (tmp_path / "7").mkdir()
    (tmp_path / "7" / "a.png").write_bytes(b"x")
    with pytest.raises(MnistRayError, match="not image folders"):
        datasets.load(f"photos:images:{tmp_path}")
