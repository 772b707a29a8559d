"""The image-shard format: Parquet files of encoded digits, written by ``sink.ShardSink``.

Schema (version 3): ``id`` string (unique, stable across runs), ``image`` struct {bytes:
binary (PNG or JPEG), path: string} (Hugging Face's ``Image`` feature), ``label`` int64 (null
when unknown; a ``ClassLabel``), ``split`` string (null when the source has none), ``path``
string (the source file, for image folders; null otherwise), ``pixels``
fixed_size_binary(784): the 28x28 uint8 the model sees (``preprocess.prepare_pixels`` of
``image``, row-major, white digit on black), null where that fails (e.g. a blank image); the
manifest's ``preprocess_version`` says which ``preprocess.PREPROCESS_VERSION`` made them.
The Parquet schema metadata declares every column's ``datasets`` feature (key
``huggingface``), so ``datasets.load_dataset("parquet", ...)`` gives images and class names.

Why both: ``image`` is the record (lossless, any size, what a person looks at); ``pixels``
takes decoding off inference's hot path (a PNG decode costs about half of a CNN forward
pass on CPU). Earlier schemas are still read, by their column types: version 2 (``image``
binary, ``label`` int8) and version 1 (no ``pixels``: inference decodes ``image``). Readers
here hand every consumer the same row form: ``image`` as binary, whatever the version.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mnist_ray.images import preprocess
from mnist_ray.plumbing import storage

SCHEMA_VERSION = 3
PIXEL_BYTES = preprocess.MODEL_SIZE * preprocess.MODEL_SIZE
KIND = "image-shards"
HF_IMAGE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
# Every field nullable, though ``id`` and ``image`` never are null: ``datasets`` applies a
# feature from the metadata only to a field equal to its own (nullable) one.
SCHEMA = pa.schema([
    pa.field("id", pa.string()),
    pa.field("image", HF_IMAGE),
    pa.field("label", pa.int64()),
    pa.field("split", pa.string()),
    pa.field("path", pa.string()),
    pa.field("pixels", pa.binary(PIXEL_BYTES)),
])
PRODUCER = "mnist-ray prepare --source SOURCE --output PATH"
DIGIT_NAMES = [str(i) for i in range(10)]
HF_METADATA_KEY = b"huggingface"


def hf_features(class_names: list[str]) -> dict:
    """Every column's ``datasets`` feature, as ``datasets`` itself serializes them."""
    def value(dtype):
        return {"dtype": dtype, "_type": "Value"}

    return {"id": value("string"), "image": {"_type": "Image"},
            "label": {"names": list(class_names), "_type": "ClassLabel"},
            "split": value("string"), "path": value("string"), "pixels": value(f"fixed_size_binary[{PIXEL_BYTES}]")}


def schema_for(class_names: list[str]) -> pa.Schema:
    """The shard schema with the ``huggingface`` metadata naming the classes."""
    info = {"info": {"features": hf_features(class_names)}}
    return SCHEMA.with_metadata({HF_METADATA_KEY: json.dumps(info)})


def class_names_for(labels: Iterable[int | None], known: list[str] | None = None) -> list[str]:
    """Class names covering every label: ``known`` (a source's names), else digits, else "N"."""
    names = list(known or DIGIT_NAMES)
    top = max((int(v) for v in labels if v is not None), default=-1)
    return names + [str(i) for i in range(len(names), top + 1)]


def image_bytes(column: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """The encoded images of an ``image`` column of any schema: binary, or the HF struct's bytes."""
    if pa.types.is_struct(column.type):
        if isinstance(column, pa.ChunkedArray):
            return pa.chunked_array([c.field("bytes") for c in column.chunks], pa.binary())
        return column.field("bytes")
    return column


def hf_image(images: pa.Array | pa.ChunkedArray, paths: pa.Array | None = None) -> pa.Array:
    """Encoded images (binary) -> the HF Image struct {bytes, path}."""
    if isinstance(images, pa.ChunkedArray):
        images = images.combine_chunks()
    images = images.cast(pa.binary())
    paths = pa.nulls(len(images), pa.string()) if paths is None else paths
    return pa.StructArray.from_arrays([images, paths], fields=list(HF_IMAGE))


def row_form(table: pa.Table) -> pa.Table:
    """Shard rows as every consumer takes them: ``image`` binary (any schema version)."""
    if "image" in table.column_names and pa.types.is_struct(table.schema.field("image").type):
        table = table.set_column(table.schema.get_field_index("image"), "image", image_bytes(table["image"]))
    return table.replace_schema_metadata(None)


def stored_form(rows: pa.Table, class_names: list[str] | None = None) -> pa.Table:
    """Rows (``image`` binary) -> the current shard schema, metadata included."""
    rows = rows.select(SCHEMA.names)
    image = rows["image"] if pa.types.is_struct(rows.schema.field("image").type) else hf_image(rows["image"])
    rows = rows.set_column(1, "image", image)
    return rows.cast(SCHEMA).replace_schema_metadata(schema_for(class_names or DIGIT_NAMES).metadata)


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
    pixels, errors = preprocess.prepare_pixels(image_bytes(table["image"]).to_pylist())
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
    ids, images = table["id"].to_pylist(), image_bytes(table["image"]).to_pylist()
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


ID_HASH_KEY = "mnist-ray-ckpt-3"  # SipHash key (16 bytes) of the resume filter: not IdDigest's keys


def id_hashes(ids: pa.Array | pa.ChunkedArray | np.ndarray, key: str = ID_HASH_KEY) -> np.ndarray:
    """A 64-bit keyed hash (SipHash, via pandas) per id: uint64, the same in every process."""
    from pandas.util import hash_array

    values = ids if isinstance(ids, np.ndarray) else ids.to_numpy(zero_copy_only=False)
    return hash_array(values, hash_key=key, categorize=False) if len(values) else np.zeros(0, np.uint64)


class IdDigest:
    """An order-independent digest of a multiset of ids: their count and two sums of 64-bit
    keyed hashes (SipHash, via pandas), modulo 2**64; infer reconciles its output by it.

    Equal digests mean the same ids the same number of times (a lost row and a duplicated
    one cancel only if their hashes collide under both keys). Sums, not the XOR the shard
    fingerprint combines its row digests with: under XOR a row written twice cancels out. It is
    built one file at a time, so reconciling 100M rows needs no more memory than reconciling
    70k (the set of ids it replaces grew ~170 MB per million rows in the driver).
    """

    KEYS = ("mnist-ray-ids-a1", "mnist-ray-ids-b2")  # SipHash keys: 16 bytes each

    def __init__(self):
        self.rows = 0
        self.sums = [0] * len(self.KEYS)

    def add(self, ids: pa.Array | pa.ChunkedArray) -> None:
        values = ids.to_numpy(zero_copy_only=False)  # once, for both keys
        self.rows += len(values)
        for i, key in enumerate(self.KEYS):
            total = int(id_hashes(values, key).sum(dtype=np.uint64))
            self.sums[i] = (self.sums[i] + total) % 2**64

    def __eq__(self, other) -> bool:
        return isinstance(other, IdDigest) and (self.rows, self.sums) == (other.rows, other.sums)


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
    rejected = sorted({(r["path"], r["id"]): r for rep in reports for r in rep["rejected"]}.values(),
                      key=lambda r: (r["path"] or "", r["id"] or ""))
    xor = xor_digest(np.frombuffer(r["xor"], dtype=np.uint8)[None] for r in reports)
    return {
        "rows": sum(c["rows"] for c in counts.values()),
        "splits": dict(sorted(counts.items())),
        "files": files,
        "rejected": rejected,
        "pixels_missing": sum(r.get("pixels_missing", 0) for r in reports),
        "fingerprint": fingerprint(xor, counts),
    }


def build_manifest(run_id: str, source: str, summary: dict, config: dict | None = None,
                   class_names: list[str] | None = None) -> dict:
    """The manifest of a shards dataset: written by prepare, and by the bench's replicator."""
    import datetime

    from mnist_ray import __version__

    return {
        "kind": KIND, "schema_version": SCHEMA_VERSION, "preprocess_version": preprocess.PREPROCESS_VERSION,
        "run_id": run_id,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source": source, **({"config": config} if config is not None else {}), "mnist_ray_version": __version__,
        "schema": {f.name: str(f.type) for f in SCHEMA}, "class_names": list(class_names or DIGIT_NAMES),
        "rejected_count": len(summary["rejected"]), **summary,
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
        return row_form(SCHEMA.empty_table().select(columns or SCHEMA.names))
    # Shards of several schema versions may sit side by side (a v2 copy beside v3): promote.
    return pa.concat_tables([row_form(pq.read_table(p, filesystem=loc.fs, columns=columns)) for p in paths],
                            promote_options="permissive")


# Blocks per shard file: a one-file input still feeds several actors, and a resumed run's
# checkpoint filter leaves blocks of thousands of rows, not dozens (a model call each).
READ_BLOCKS_PER_FILE = 4
READ_BATCH_ROWS = 10_000  # rows a read task decodes at a time


@dataclass(frozen=True)
class ShardFile:
    """One shard file as its read task gets it: what the manifest says of it."""

    path: str
    rows: int
    bytes: int


def read_dataset(uri: str, columns: list[str] | None = None, num_cpus: float | None = None):
    """The dataset as a streaming Ray Dataset over exactly the files the manifest lists: one
    read task per file, READ_BLOCKS_PER_FILE blocks of it, in the row form.

    Not ``ray.data.read_parquet``: the manifest already knows every file's rows and bytes, and
    Ray's Parquet reader first samples files in a task of its own (on a warm cluster, a worker
    importing Ray Data before the job starts: seconds of every job's fixed cost); in its V2
    form it also lists files in a task that takes a whole CPU.
    """
    import functools

    from mnist_ray.formats import readers

    loc, manifest = open_shards(uri)
    files = [ShardFile(path, f["rows"], f["bytes"]) for path, f in zip(shard_paths(loc, manifest), manifest["files"])]
    schema = row_form(SCHEMA.empty_table().select(columns or SCHEMA.names)).schema
    read = functools.partial(read_file, fs=loc.fs, columns=columns)
    # Ray splits each task's output into blocks to make this many (SplitBlocks), and without it
    # into at least DataContext.read_op_min_num_blocks (200).
    return readers.read_pieces(files, read, "Shards", schema, num_cpus=num_cpus,
                               override_num_blocks=max(1, len(files) * READ_BLOCKS_PER_FILE))


def read_file(file: ShardFile, fs, columns: list[str] | None) -> Iterable[pa.Table]:
    """One shard file, READ_BATCH_ROWS rows at a time (what a read task runs)."""
    with fs.open_input_file(file.path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=READ_BATCH_ROWS, columns=columns):
            yield row_form(pa.Table.from_batches([batch]))
