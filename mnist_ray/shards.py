"""The image-shard format: Parquet files of encoded digits, written by ``sink.ShardSink``.

Schema (version 2): ``id`` string (unique, stable across runs), ``image`` binary (PNG or
JPEG bytes), ``label`` int8 (null when unknown), ``split`` string (null when the source has
none), ``path`` string (the source file, for image folders; null otherwise), ``pixels``
fixed_size_binary(784): the 28x28 uint8 the model sees (``preprocess.prepare_pixels`` of
``image``, row-major, white digit on black), null where that fails (e.g. a blank image); the
manifest's ``preprocess_version`` says which ``preprocess.PREPROCESS_VERSION`` made them.

Why both: ``image`` is the record (lossless, any size, what a person looks at); ``pixels``
takes decoding off inference's hot path (a PNG decode costs about half of a CNN forward
pass on CPU). Version 1 shards (no ``pixels``) are still read: inference decodes ``image``.
"""

from __future__ import annotations

import hashlib
import posixpath
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mnist_ray import preprocess, storage

SCHEMA_VERSION = 2
PIXEL_BYTES = preprocess.MODEL_SIZE * preprocess.MODEL_SIZE
KIND = "image-shards"
SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),
    pa.field("label", pa.int8()),
    pa.field("split", pa.string()),
    pa.field("path", pa.string()),
    pa.field("pixels", pa.binary(PIXEL_BYTES)),
])
PRODUCER = "mnist-ray prepare --source SOURCE --output PATH"


def pixels_column(pixels: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """uint8 (N, 28, 28) -> fixed_size_binary(784), without a copy; null where not ``valid``."""
    n = len(pixels)
    data = pa.py_buffer(np.ascontiguousarray(pixels, dtype=np.uint8).reshape(n * PIXEL_BYTES))
    mask = None if valid is None or valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(PIXEL_BYTES), n, [mask, data],
                                                null_count=-1 if mask is not None else 0)


def pixels_numpy(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """fixed_size_binary(784) -> uint8 (N, 28, 28), zero-copy for one chunk (nulls read as 0)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    n = len(column)
    raw = np.frombuffer(column.buffers()[1], dtype=np.uint8, count=(column.offset + n) * PIXEL_BYTES)
    return raw[column.offset * PIXEL_BYTES:].reshape(n, preprocess.MODEL_SIZE, preprocess.MODEL_SIZE)


def with_pixels(table: pa.Table) -> tuple[pa.Table, int]:
    """``table`` with the ``pixels`` column computed from ``image``, and how many are null."""
    pixels, errors = preprocess.prepare_pixels(table["image"].to_pylist())
    valid = np.array([e is None for e in errors], dtype=bool)
    column = pixels_column(pixels, valid)
    if "pixels" in table.column_names:
        table = table.drop_columns(["pixels"])
    return table.append_column("pixels", column), int((~valid).sum())


def has_pixels(manifest: dict) -> bool:
    """Whether a dataset's shards carry the ``pixels`` column (schema version 2 and later)."""
    return manifest.get("schema_version", 1) >= 2


def pixels_usable(manifest: dict, model_metadata: dict) -> bool:
    """Whether a model may take the shards' stored ``pixels`` as its input: the shards carry
    them and made them with the preprocessing version the model was trained with (records
    written before versions existed are version 1); otherwise recompute them from ``image``."""
    stored = manifest.get("preprocess_version", 1)
    trained = model_metadata.get("preprocessing", {}).get("version", 1)
    return has_pixels(manifest) and stored == trained


def row_digests(table: pa.Table) -> np.ndarray:
    """A 32-byte digest per row over everything stored: (N, 32) uint8."""
    ids, images = table["id"].to_pylist(), table["image"].to_pylist()
    labels, splits = table["label"].to_pylist(), table["split"].to_pylist()
    out = np.empty((len(ids), 32), dtype=np.uint8)
    for i, (id_, image, label, split) in enumerate(zip(ids, images, labels, splits)):
        h = hashlib.sha256(f"{id_}\0{label}\0{split}\0".encode())
        h.update(image)
        out[i] = np.frombuffer(h.digest(), dtype=np.uint8)
    return out


def xor_digest(digests: Iterable[np.ndarray]) -> np.ndarray:
    """Order-independent combination of row digests (ids are unique, so rows never cancel)."""
    acc = np.zeros(32, dtype=np.uint8)
    for d in digests:
        if len(d):
            acc ^= np.bitwise_xor.reduce(d, axis=0)
    return acc


def fingerprint(content_xor: np.ndarray, counts: dict) -> str:
    h = hashlib.sha256(f"{KIND}/{SCHEMA_VERSION}\0".encode())
    h.update(content_xor.tobytes())
    h.update(repr(sorted((k, sorted(v["labels"].items())) for k, v in counts.items())).encode())
    return "sha256:" + h.hexdigest()


def summarize(files: list[dict], reports: list[dict]) -> dict:
    """Merge the write tasks' reports into the manifest's files, counts and fingerprint."""
    counts: dict = {}
    for report in reports:
        for split, label, n in report["counts"]:
            entry = counts.setdefault(str(split) if split is not None else "none", {"rows": 0, "labels": {}})
            entry["rows"] += n
            key = str(label) if label is not None else "none"
            entry["labels"][key] = entry["labels"].get(key, 0) + n
    for entry in counts.values():
        entry["labels"] = dict(sorted(entry["labels"].items(), key=lambda kv: (len(kv[0]), kv[0])))
    # A retried write task reports its rejects again: list each file once.
    rejected = sorted({r["path"]: r for rep in reports for r in rep["rejected"]}.values(),
                      key=lambda r: r["path"])
    xor = xor_digest(np.frombuffer(r["xor"], dtype=np.uint8)[None] for r in reports)
    return {
        "rows": sum(c["rows"] for c in counts.values()),
        "splits": dict(sorted(counts.items())),
        "files": files,
        "rejected": rejected,
        "pixels_missing": sum(r.get("pixels_missing", 0) for r in reports),
        "fingerprint": fingerprint(xor, counts),
    }


def build_manifest(run_id: str, source: str, summary: dict, config: dict | None = None) -> dict:
    """The manifest of a shards dataset: written by prepare, and by the bench's replicator."""
    import datetime

    from mnist_ray import __version__

    return {
        "kind": KIND, "schema_version": SCHEMA_VERSION, "preprocess_version": preprocess.PREPROCESS_VERSION,
        "run_id": run_id,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source, **({"config": config} if config is not None else {}), "mnist_ray_version": __version__,
        "schema": {f.name: str(f.type) for f in SCHEMA}, "rejected_count": len(summary["rejected"]), **summary,
    }


def open_shards(uri: str) -> tuple[storage.Location, dict]:
    """A complete shards dataset (refuses anything else with a clear message)."""
    loc, manifest = storage.open_dataset(uri, producer=PRODUCER)
    if manifest.get("kind") != KIND:
        from mnist_ray.errors import MnistRayError

        raise MnistRayError(f"{uri} holds {manifest.get('kind')!r}, not image shards: give a "
                            f"dataset written by `{PRODUCER}`")
    return loc, manifest


def shard_paths(loc: storage.Location, manifest: dict) -> list[str]:
    return [posixpath.join(loc.path, f["path"]) for f in manifest["files"]]


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """The whole dataset as one Arrow table, for small data (tests, reports, the driver)."""
    loc, manifest = open_shards(uri)
    paths = shard_paths(loc, manifest)
    if not paths:
        return SCHEMA.empty_table().select(columns or SCHEMA.names)
    return pa.concat_tables(pq.read_table(p, filesystem=loc.fs, columns=columns) for p in paths)


def read_dataset(uri: str, columns: list[str] | None = None, num_cpus: float | None = None,
                 blocks_per_file: int | None = None):
    """The dataset as a streaming Ray Dataset over exactly the files the manifest lists.

    ``blocks_per_file`` overrides Ray's own choice (it splits a few large files into at least
    200 blocks: thousands of rows each become a few dozen after a filter, see infer).
    """
    import ray

    loc, manifest = open_shards(uri)
    paths = shard_paths(loc, manifest)
    blocks = {"override_num_blocks": max(1, len(paths) * blocks_per_file)} if blocks_per_file else {}
    return ray.data.read_parquet(paths, filesystem=loc.fs, columns=columns, num_cpus=num_cpus,
                                 **blocks)
