"""prepare: any input it reads -> Parquet image shards, encoded in parallel by Ray Data.

    source --registry.open_input--> rows of encoded images (Ray Data) --> ShardSink
           --> _manifest.json --> _SUCCESS (written last)
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import ClassVar

from mnist_ray.formats import shards
from mnist_ray.inputs import registry
from mnist_ray.inputs.columns import ColumnChoice
from mnist_ray.plumbing import cluster, lock, storage
from mnist_ray.errors import MnistRayError

log = logging.getLogger(__name__)


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
    source = registry.open_input(cfg.source, registry.PREPARE, registry.Options(
        columns=ColumnChoice(cfg.image_column, cfg.id_column, cfg.label_column, cfg.image_shape),
        val_fraction=cfg.val_fraction, seed=cfg.seed))
    run_id = uuid.uuid4().hex[:12]
    with lock.output_lock(cfg.output):
        loc = storage.prepare_output(cfg.output, overwrite=cfg.overwrite, run_id=run_id)
        cluster.connect(cfg.address, paths=(_source_path(cfg.source), cfg.output),
                        shared_storage=cfg.shared_storage)

        ds, expected = source.shard_rows(cfg.limit, cfg.rows_per_shard)
        from mnist_ray.formats.sink import ShardSink

        names = source.class_names()
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
