"""prepare: a dataset source -> Parquet image shards, encoded in parallel by Ray Data.

    source --load--> arrays or a file listing --Ray Data map (PNG encode / check)--> ShardSink
           --> _manifest.json --> _SUCCESS (written last)
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pyarrow as pa

from mnist_ray.formats import shards
from mnist_ray.images import preprocess
from mnist_ray.inputs import archives, datasets, foreign
from mnist_ray.inputs.columns import ColumnChoice
from mnist_ray.plumbing import cluster, lock, storage
from mnist_ray.errors import MnistRayError

log = logging.getLogger(__name__)

BLOCK_ROWS = 5_000  # rows per Ray Data block when encoding arrays: enough blocks to use every core


@dataclass(frozen=True)
class PrepareConfig:
    source: str = field(default="mnist-sample", metadata={
        "help": "mnist-sample | mnist-test | mnist | fashion-mnist | idx:PATH | images:PATH (a folder, or a .zip/.tar/"
                ".tar.gz of class folders, or a glob of WebDataset shards) | parquet:PATH (any image Parquet: "
                "a file, directory or glob) | photos:SOURCE (the digits of SOURCE as photos: JPEG, dark on "
                "light, large, shaded)"})
    image_column: str | None = field(default=None, metadata={
        "help": "parquet:PATH: the image column (default: the only one, or the one named image)"})
    id_column: str | None = field(default=None, metadata={
        "help": "parquet:PATH: the id column (default: id if there is one, else FILE#ROW)"})
    label_column: str | None = field(default=None, metadata={
        "help": "parquet:PATH: the label column (default: a ClassLabel, or one named label/class/target)"})
    image_shape: str | None = field(default=None, metadata={
        "help": "parquet:PATH of flat pixel lists that are not square: HxW or HxWxC"})
    output: str = field(default="out/mnist-sample/shards", metadata={
        "help": "where the shards go: a local directory or a URL such as s3://bucket/prefix"})
    rows_per_shard: int = field(default=50_000, metadata={"help": "rows per Parquet file"})
    max_shard_mb: int = field(default=256, metadata={
        "help": "start a new file past this size (large photos reach it before rows_per_shard)"})
    val_fraction: float = field(default=0.1, metadata={
        "help": "mnist-sample: fraction of each class held out as the val split"})
    seed: int = field(default=0, metadata={"help": "seed of the mnist-sample train/val split"})
    limit: int | None = field(default=None, metadata={
        "help": "keep at most this many rows per split, evenly spaced (smoke runs)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing complete output"})
    address: str | None = field(default=None, metadata={
        "help": "Ray address (default: RAY_ADDRESS, else a local single-node Ray)"})
    shared_storage: bool = field(default=False, metadata={"help": cluster.SHARED_STORAGE_HELP})

    PRESETS: ClassVar[dict] = {"default": {}, "smoke": {"limit": 500, "rows_per_shard": 400}}

    def validate(self) -> None:
        if self.rows_per_shard < 1 or self.max_shard_mb < 1:
            raise MnistRayError("--rows-per-shard and --max-shard-mb must be positive")
        if self.limit is not None and self.limit < 1:
            raise MnistRayError("--limit must be positive")


def evenly_spaced(n: int, limit: int | None) -> np.ndarray:
    """Indices of at most ``limit`` rows spread over all ``n`` (every class of a sorted set)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


# --- worker-side batch functions (run inside Ray Data tasks) ---------------------------------

def encode_array_batch(batch: pa.Table, height: int, width: int, render: str = "png") -> pa.Table:
    """Rows of raw uint8 pixels -> rows of PNG (or photo JPEG) bytes in the shard schema."""
    pixels = batch["pixels"].combine_chunks()
    start, n = pixels.offset * height * width, len(pixels)
    raw = np.frombuffer(pixels.buffers()[1], dtype=np.uint8)[start: start + n * height * width]
    digits = raw.reshape(n, height, width)
    if render == "photo":  # seeded by id: the same photo on every run
        images = [datasets.render_photo(d, np.random.default_rng(zlib.crc32(i.encode())))
                  for d, i in zip(digits, batch["id"].to_pylist())]
    else:
        images = preprocess.encode_png(digits)
    return pa.table({
        "id": batch["id"], "image": pa.array(images, pa.binary()), "label": batch["label"],
        "split": batch["split"], "path": pa.nulls(n, pa.string()),
    })


def check_file_batch(batch: pa.Table, root: str, scheme: str) -> pa.Table:
    """Rows of raw file bytes -> shard rows, or rows with an ``error`` for files that do not decode."""
    rows = datasets.folder_rows(batch, root, scheme)
    checked = [preprocess.normalize_stored_image(data) for data in rows["image"].to_pylist()]
    return rows.set_column(rows.schema.get_field_index("image"), "image",
                           pa.array([image or b"" for image, _ in checked], pa.binary())) \
        .append_column("error", pa.array([error for _, error in checked], pa.string()))


# --- driver ---------------------------------------------------------------------------------

def _array_blocks(data: datasets.ArrayDataset, limit: int | None, block_rows: int) -> tuple[list[pa.Table], int, int]:
    blocks, shape = [], None
    for split_name, split in data.splits.items():
        keep = evenly_spaced(len(split.labels), limit)
        images, labels, ids = split.images[keep], split.labels[keep], split.ids[keep]
        if shape not in (None, images.shape[1:]):
            raise MnistRayError(f"{data.name}: splits have different image sizes")
        shape = images.shape[1:]
        flat = images.reshape(len(images), -1)
        for start in range(0, len(labels), block_rows):
            stop = min(start + block_rows, len(labels))
            chunk = np.ascontiguousarray(flat[start:stop])
            pixels = pa.FixedSizeBinaryArray.from_buffers(
                pa.binary(chunk.shape[1]), len(chunk), [None, pa.py_buffer(chunk.tobytes())])
            blocks.append(pa.table({
                "id": pa.array(ids[start:stop], pa.string()), "pixels": pixels,
                "label": pa.array(labels[start:stop], pa.int8()),
                "split": pa.array([split_name] * (stop - start), pa.string()),
            }))
    return blocks, int(shape[0]), int(shape[1])


def load_source(cfg: PrepareConfig):
    """``cfg.source`` -> arrays, an image folder listing, or a planned read (Parquet, archives)."""
    columns = ColumnChoice(cfg.image_column, cfg.id_column, cfg.label_column, cfg.image_shape)
    kind, _, rest = cfg.source.partition(":")
    if kind == "parquet":
        return foreign.open_parquet(rest, **columns.as_kwargs())
    if columns != ColumnChoice():
        raise MnistRayError("--image-column, --id-column, --label-column and --image-shape are for "
                            "--source parquet:PATH")
    if kind == "images" and archives.is_archive(rest):
        return archives.open_archives(rest)
    return datasets.load(cfg.source, val_fraction=cfg.val_fraction, seed=cfg.seed)


def class_names(data) -> list[str]:
    """The names of the classes the shards declare (Hugging Face ClassLabel): the source's own
    names (Fashion-MNIST, a Parquet's ClassLabel), else digits, extended to cover every label."""
    from mnist_ray.model import export

    if isinstance(data, datasets.ArrayDataset):
        labels = [int(s.labels.max()) for s in data.splits.values() if len(s.labels)]
        return shards.class_names_for(labels, export.CLASS_NAMES.get(data.name.removeprefix("photos:")))
    if isinstance(data, datasets.ImageFolder):
        return shards.class_names_for(datasets.label_from_path(rel) for rel, _ in data.files)
    if isinstance(data, archives.ArchiveInput):
        return shards.class_names_for(data.labels())
    names = data.columns.label_names
    return list(names) if names else shards.class_names_for([])


def _build_dataset(data, cfg: PrepareConfig):
    import ray

    if isinstance(data, (foreign.ParquetInput, archives.ArchiveInput)):
        ds = data.dataset(encode=True)
        if cfg.limit is not None and cfg.limit < data.rows:
            return ds.limit(cfg.limit), cfg.limit  # the first rows: a planned read has no splits to spread over
        return ds, data.rows

    if isinstance(data, datasets.ArrayDataset):
        blocks, height, width = _array_blocks(data, cfg.limit, min(BLOCK_ROWS, cfg.rows_per_shard))
        expected = sum(b.num_rows for b in blocks)
        ds = ray.data.from_arrow(blocks).map_batches(
            encode_array_batch, batch_format="pyarrow", batch_size=None,
            fn_kwargs={"height": height, "width": width, "render": data.render})
        return ds, expected
    files = [data.files[i] for i in evenly_spaced(len(data.files), cfg.limit)]
    paths = [data.root.join(rel) for rel, _ in files]
    ds = ray.data.read_binary_files(paths, filesystem=data.root.fs, include_paths=True).map_batches(
        check_file_batch, batch_format="pyarrow", batch_size=64,
        fn_kwargs={"root": data.root.path, "scheme": data.root.scheme})
    return ds, len(paths)


def _source_path(source: str) -> str:
    """The path inside ``idx:PATH``, ``images:PATH``, ``photos:idx:PATH``; "" for named sources."""
    kind, _, rest = source.partition(":")
    if kind == "photos":
        return _source_path(rest)
    return rest if kind in ("idx", "images", "parquet") else ""


def run(cfg: PrepareConfig) -> dict:
    """Write ``cfg.source`` as image shards to ``cfg.output``; returns the summary."""
    cfg.validate()
    started = time.perf_counter()
    data = load_source(cfg)
    run_id = uuid.uuid4().hex[:12]
    with lock.output_lock(cfg.output):
        loc = storage.prepare_output(cfg.output, overwrite=cfg.overwrite, run_id=run_id)
        cluster.connect(cfg.address, paths=(_source_path(cfg.source), cfg.output),
                        shared_storage=cfg.shared_storage)

        ds, expected = _build_dataset(data, cfg)
        from mnist_ray.formats.sink import ShardSink

        names = class_names(data)
        sink = ShardSink(loc, run_id, cfg.rows_per_shard, cfg.max_shard_mb << 20, class_names=names)
        try:
            ds.write_datasink(sink)
        except OSError as e:
            raise MnistRayError(storage.describe_error(e, cfg.output)) from e
        summary = shards.summarize(sink.files(), sink.reports())
        if summary["rows"] + len(summary["rejected"]) != expected:
            raise MnistRayError(f"prepare lost rows: {expected} in, {summary['rows']} written, "
                                f"{len(summary['rejected'])} rejected; nothing was published")
        if summary["rows"] == 0:
            first = summary["rejected"][0]
            raise MnistRayError(f"no image in {cfg.source} could be decoded "
                                f"(e.g. {first['path'] or first['id']}: {first['error']})")
        manifest = shards.build_manifest(run_id, cfg.source, summary, config=dataclasses.asdict(cfg), class_names=names)
        storage.publish(loc, manifest, run_id=run_id)
        return {
            "output": cfg.output, "rows": summary["rows"],
            "splits": {k: v["rows"] for k, v in summary["splits"].items()},
            "rejected": len(summary["rejected"]), "shards": len(summary["files"]),
            "shard_bytes": [f["bytes"] for f in summary["files"]],
            "fingerprint": summary["fingerprint"], "seconds": round(time.perf_counter() - started, 2),
        }
