"""infer: shards or image files -> Ray Data actor pool with a preloaded model -> predictions.

    input --read (Parquet shards | binary files)--> map_batches(prepare: decode, MNIST-style
          crop/centre, normalize; tasks) --> map_batches(PredictorActor, ActorPoolStrategy)
          --> write_parquet(OUTPUT/run-KEY/data) --> reconcile (id digests) --> _manifest.json --> _SUCCESS

Resume is Ray Data's own checkpointing (``ray.data.checkpoint``): each write task records the
ids it wrote in OUTPUT/run-KEY/checkpoint (two-phase, so a killed task's file is deleted on
the next start), and a rerun filters those rows out right after the read. KEY hashes the input
fingerprint, the model version and the runtime (and the run being replaced, with --overwrite),
so another model or input never reuses partial work. Readers only see the manifest's files.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import logging
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from mnist_ray import __version__, cluster, datasets, export, lock, preprocess, runtimes, shards, storage
from mnist_ray.errors import MnistRayError

log = logging.getLogger(__name__)

KIND = "predictions"
SCHEMA_VERSION = 1
NUM_CLASSES = 10
SCHEMA = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("prediction", pa.int8()),
    pa.field("confidence", pa.float32()),
    pa.field("probabilities", pa.list_(pa.float32(), NUM_CLASSES)),
    pa.field("label", pa.int8()),
    pa.field("path", pa.string()),
    pa.field("model_version", pa.string()),
    pa.field("error", pa.string()),
])
PRODUCER = "mnist-ray infer --model MODEL_DIR --input PATH --output PATH"


@dataclass(frozen=True)
class InferConfig:
    model: str = field(default="out/mnist-sample/model", metadata={"help": "model dir (mnist-ray train)"})
    input: str = field(default="out/mnist-sample/shards", metadata={
        "help": "image shards, or a folder of image files (local or s3://)"})
    output: str = field(default="out/mnist-sample/predictions", metadata={"help": "where predictions go"})
    runtime: str = field(default="tf", metadata={"help": " | ".join(runtimes.RUNTIME_FILES)})
    batch_size: int | None = field(default=None, metadata={
        "help": "images per model call (default: 4096 for tf; 1024 for TFLite, whose int8 "
                "activations then stay in cache: measured by mnist-ray bench)"})
    actors: str = field(default="1", metadata={
        "help": "predictor actors: N, or MIN..MAX for an autoscaling pool"})
    cpus_per_actor: float = field(default=1.0, metadata={"help": "CPUs reserved per actor"})
    gpus_per_actor: float = field(default=0.0, metadata={
        "help": "GPUs per actor (fractions share a GPU); without GPUs the job runs on CPU"})
    require_gpu: bool = field(default=False, metadata={"help": "fail instead of running on CPU"})
    max_error_rate: float = field(default=0.05, metadata={
        "help": "fail (and publish nothing) when more than this fraction of rows cannot be scored"})
    rows_per_file: int = field(default=200_000, metadata={"help": "rows per output Parquet file"})
    overwrite: bool = field(default=False, metadata={"help": "replace existing predictions"})
    address: str | None = field(default=None, metadata={"help": "Ray address (default: RAY_ADDRESS, else local)"})
    shared_storage: bool = field(default=False, metadata={"help": cluster.SHARED_STORAGE_HELP})

    PRESETS: ClassVar[dict] = {"default": {}, "smoke": {"batch_size": 128, "actors": "1"}}

    def pool(self) -> tuple[int, int]:
        try:
            low, _, high = self.actors.partition("..")
            lo, hi = int(low), int(high or low)
        except ValueError:
            raise MnistRayError(f"--actors {self.actors!r}: give N or MIN..MAX, e.g. 1..4") from None
        if not 1 <= lo <= hi:
            raise MnistRayError(f"--actors {self.actors!r}: need 1 <= MIN <= MAX")
        return lo, hi

    def batch(self) -> int:
        return self.batch_size or (4096 if self.runtime == "tf" else 1024)

    def validate(self) -> None:
        self.pool()
        if self.runtime not in runtimes.RUNTIME_FILES:
            raise MnistRayError(f"unknown runtime {self.runtime!r}: choose one of {', '.join(runtimes.RUNTIME_FILES)}")
        if self.batch() < 1 or self.rows_per_file < 1:
            raise MnistRayError("--batch-size and --rows-per-file must be positive")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise MnistRayError("--max-error-rate must be between 0 and 1")


# --- worker side ----------------------------------------------------------------------------

def prepare_rows(batch: pa.Table) -> pa.Table:
    """Input rows -> the model's 28x28 uint8 pixels and per-row errors (no model here).

    Shards of schema 2 carry ``pixels`` already: they pass through without a copy, and only
    rows stored without pixels (or raw files, v1 shards) are decoded. Pixels stay uint8
    (fixed_size_binary(784)) until the predictor: 4x less to move between operators than
    float32. Typed Arrow columns throughout: an all-null column must stay a string column.
    """
    n = batch.num_rows
    if "pixels" in batch.column_names and batch["pixels"].null_count == 0:
        pixels, errors = batch["pixels"], pa.nulls(n, pa.string())
    else:
        todo = np.arange(n)
        pixels = np.zeros((n, preprocess.MODEL_SIZE, preprocess.MODEL_SIZE), np.uint8)
        if "pixels" in batch.column_names:
            stored = batch["pixels"].is_valid().to_numpy(zero_copy_only=False)
            pixels[stored] = shards.pixels_numpy(batch["pixels"])[stored]
            todo = np.flatnonzero(~stored)
        decoded, decode_errors = preprocess.prepare_pixels(batch["image"].take(todo).to_pylist())
        pixels[todo] = decoded
        error_list: list[str | None] = [None] * n
        for i, e in zip(todo, decode_errors):
            error_list[i] = e
        pixels, errors = shards.pixels_column(pixels), pa.array(error_list, pa.string())
    return pa.table({"id": batch["id"], "pixels": pixels,
                     "label": batch["label"].cast(pa.int8()), "path": batch["path"].cast(pa.string()),
                     "error": errors})


class Predictor:
    """Scores whole batches with a model loaded once; rows that failed earlier keep their error.

    The model loader is injected, so the batch logic is tested without Ray or a model dir.
    """

    def __init__(self, load_model: Callable[[], Callable[[np.ndarray], np.ndarray]], model_version: str):
        self.model = load_model()
        self.model_version = pa.scalar(model_version, pa.string())

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        errors = batch["error"]
        ok = np.ones(n, bool) if errors.null_count == n else errors.is_null().to_numpy(zero_copy_only=False)
        probs = np.zeros((n, NUM_CLASSES), np.float32)
        if ok.any():
            pixels = shards.pixels_numpy(batch["pixels"])
            try:
                probs[ok] = runtimes.predict_pixels(self.model, pixels if ok.all() else pixels[ok])
            except Exception as e:  # noqa: BLE001 - a batch the model rejects becomes error rows
                message = f"scoring failed: {type(e).__name__}: {e}"
                errors = pc.coalesce(errors, pa.scalar(message, pa.string()))
                ok[:] = False
        return pa.table({
            "id": batch["id"],
            "prediction": pa.array(probs.argmax(1).astype(np.int8), pa.int8(), mask=~ok),
            "confidence": pa.array(probs.max(1), pa.float32(), mask=~ok),
            "probabilities": pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), NUM_CLASSES),
            "label": batch["label"],
            "path": batch["path"],
            "model_version": pa.repeat(self.model_version, n),
            "error": errors,
        })


class PredictorActor(Predictor):
    """The Ray actor: opens the model dir (downloading it when remote) and loads it once."""

    def __init__(self, model_uri: str, runtime: str, model_version: str, use_gpu: bool, progress=None):
        import ray

        started = time.perf_counter()
        self.progress, self.unreported, self.reported_at = progress, 0, 0.0
        self.node = ray.get_runtime_context().get_node_id()  # rows are counted by node
        if use_gpu:
            import tensorflow as tf

            for gpu in tf.config.list_physical_devices("GPU"):
                # Several actors may share a GPU (fractional --gpus-per-actor): grow, don't grab.
                tf.config.experimental.set_memory_growth(gpu, True)

        def load():
            local, _ = export.open_model_dir(model_uri)
            return runtimes.load(local, runtime)

        super().__init__(load, model_version)
        if progress is not None:
            progress.actor_ready.remote(time.time(), time.perf_counter() - started, self.node)

    # Rows scored are reported at most once a second (and at once for the first batch, the
    # figure "first prediction"): one call per batch cost the progress actor ~3 % of a core.
    REPORT_EVERY_S = 1.0

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = super().__call__(batch)
        if self.progress is not None:
            self.unreported += out.num_rows
            now = time.time()
            if now - self.reported_at >= self.REPORT_EVERY_S:
                self.progress.scored.remote(self.unreported, now, self.node)  # fire and forget
                self.unreported, self.reported_at = 0, now
        return out

    def __del__(self):
        """The rows not reported yet (Ray Data calls this when the pool ends): waited for, since
        the process exits next."""
        if getattr(self, "progress", None) is not None and self.unreported:
            import ray

            try:
                ray.get(self.progress.scored.remote(self.unreported, time.time(), self.node), timeout=10)
            except Exception:  # noqa: BLE001 - the driver may be gone already
                pass


class Progress:
    """A zero-CPU actor the predictors report to: when each became ready, rows scored so far.

    The driver turns it into periodic progress lines and the start-up figures of the summary.
    """

    def __init__(self):
        self.rows, self.ready, self.load_seconds, self.first_at = 0, [], [], None
        self.nodes: dict[str, dict] = {}  # node id -> actors started there, rows scored there

    def _node(self, node: str | None) -> dict:
        return self.nodes.setdefault(node or "unknown", {"actors": 0, "rows": 0})

    def actor_ready(self, at: float, load_seconds: float, node: str | None = None) -> None:
        self.ready.append(at)
        self.load_seconds.append(load_seconds)
        self._node(node)["actors"] += 1

    def scored(self, rows: int, at: float, node: str | None = None) -> None:
        self.rows += rows
        self.first_at = self.first_at or at
        self._node(node)["rows"] += rows

    def state(self) -> dict:
        return {"rows": self.rows, "ready": self.ready, "load_seconds": self.load_seconds,
                "first_at": self.first_at, "nodes": self.nodes}


def _checkpoint_filter_cls():
    from ray.data.checkpoint.checkpoint_filter import NumpyArrayBasedCheckpointFilter

    class UriCheckpointFilter(NumpyArrayBasedCheckpointFilter):
        """Files are checkpointed by URI (``s3://b/k``, the ``path`` column written); the
        reader's rows hold the filesystem path (``b/k``): compare them with the scheme added."""

        def filter_rows_for_block(self, block):
            scheme = self.ckpt_config.path_scheme
            if not scheme or len(self.checkpointed_ids) == 0 or block.num_rows == 0:
                return super().filter_rows_for_block(block)
            if not hasattr(self, "done"):
                self.done = pa.array(self.checkpointed_ids, pa.string())
            uris = pc.binary_join_element_wise(scheme, block["path"], "")
            return block.filter(pc.invert(pc.is_in(uris, value_set=self.done)))

    return UriCheckpointFilter


# --- driver ---------------------------------------------------------------------------------

PROGRESS_EVERY_S = 10.0


def _is_shards(uri: str) -> bool:
    loc = storage.resolve(uri)
    try:
        return loc.fs.get_file_info(loc.join(storage.MANIFEST)).type == pafs.FileType.File
    except OSError as e:
        raise MnistRayError(storage.describe_error(e, uri)) from e


def _shard_columns(manifest: dict) -> list[str]:
    """The columns inference reads: the stored pixels where the shards have them (then the
    encoded image only if some rows have no pixels), else the encoded image."""
    if not shards.has_pixels(manifest):
        return ["id", "image", "label", "path"]
    return ["id", "pixels", "label", "path"] + (["image"] if manifest.get("pixels_missing", 0) else [])


def _open_input(uri: str):
    """Everything about the input that needs no Ray: (description, a function that digests its
    ids, a few real rows for the smoke test, a function that makes the streaming Ray Dataset).

    The description's ``resume_key`` names the column Ray Data's checkpoint filter sees right
    after the read: ``id`` in shards, ``path`` for raw files (the read has no id yet).
    """
    import pyarrow.parquet as pq

    if _is_shards(uri):
        loc, manifest = shards.open_shards(uri)
        columns = _shard_columns(manifest)
        paths = shards.shard_paths(loc, manifest)
        sample = None
        if paths:
            with pq.ParquetFile(paths[0], filesystem=loc.fs) as first:
                if first.num_row_groups:
                    sample = first.read_row_group(0, columns=columns).slice(0, 8)

        def dataset():
            import ray

            # The V1 Parquet read: V2 adds a ListFiles task that reserves a whole CPU with no
            # way to ask for less, and beside the checkpoint filter and predictor actors of a
            # resumed run on a 2-CPU node it never gets one (the job hangs).
            context = ray.data.DataContext.get_current()
            v2, context.use_datasource_v2 = context.use_datasource_v2, False
            try:
                # Blocks of whole row groups: Ray's default split of a few files into >= 200
                # blocks left a resumed run's checkpoint filter emitting blocks of a few dozen
                # rows, one model call each (459 images/s instead of thousands).
                return shards.read_dataset(uri, columns=columns, num_cpus=IO_CPUS,
                                           blocks_per_file=BLOCKS_PER_FILE)
            finally:
                context.use_datasource_v2 = v2

        def digest(stop: threading.Event) -> IdDigest | None:
            ids = IdDigest()
            for path in paths:  # one file's ids in memory at a time
                if stop.is_set():
                    return None
                ids.add(pq.read_table(path, columns=["id"], filesystem=loc.fs)["id"])
            return ids

        return ({"kind": "shards", "uri": uri, "fingerprint": manifest["fingerprint"], "rows": manifest["rows"],
                 "resume_key": "id", "scheme": ""}, digest, sample, dataset)
    folder = datasets.image_folder(uri)
    paths = [folder.root.join(rel) for rel, _ in folder.files]
    listing = hashlib.sha256("\n".join(f"{rel}\t{size}" for rel, size in folder.files).encode())
    first = paths[:8]
    raw = []
    for path in first:
        with folder.root.fs.open_input_file(path) as f:
            raw.append(f.readall())
    sample = datasets.folder_rows(pa.table({"bytes": pa.array(raw, pa.binary()), "path": pa.array(first, pa.string())}),
                                  folder.root.path, folder.root.scheme)

    def dataset():
        import ray

        return ray.data.read_binary_files(paths, filesystem=folder.root.fs, include_paths=True,
                                          num_cpus=IO_CPUS).map_batches(
            datasets.folder_rows, batch_format="pyarrow", batch_size=256,
            fn_kwargs={"root": folder.root.path, "scheme": folder.root.scheme})

    def digest(stop: threading.Event) -> IdDigest:
        ids = IdDigest()
        ids.add(pa.array([rel for rel, _ in folder.files], pa.string()))
        return ids

    return ({"kind": "images", "uri": uri, "files": len(paths), "rows": len(paths),
             "fingerprint": "sha256:" + listing.hexdigest(), "resume_key": "path", "scheme": folder.root.scheme},
            digest, sample, dataset)


def open_predictions(uri: str) -> tuple[storage.Location, dict]:
    """A complete predictions dataset (refuses anything else with a clear message)."""
    loc, manifest = storage.open_dataset(uri, producer=PRODUCER)
    if manifest.get("kind") != KIND:
        raise MnistRayError(f"{uri} holds {manifest.get('kind')!r}, not predictions")
    return loc, manifest


def read_predictions(uri: str, columns: list[str] | None = None) -> pa.Table:
    """A complete predictions dataset as one Arrow table (reports, tests: small data)."""
    import pyarrow.parquet as pq

    loc, manifest = open_predictions(uri)
    tables = [pq.read_table(loc.join(f["path"]), columns=columns, filesystem=loc.fs) for f in manifest["files"]]
    return pa.concat_tables(tables).cast(SCHEMA if columns is None else pa.schema([SCHEMA.field(c) for c in columns])) \
        if tables else SCHEMA.empty_table().select(columns or SCHEMA.names)


# Read and write tasks mostly wait on storage: they reserve a quarter of a CPU, so both still
# fit beside actors that reserve whole ones (ray-project/ray#44687: starved reads hang the
# job), and beside the checkpoint filter actor of a resumed run.
IO_CPUS = 0.25
BLOCKS_PER_FILE = 4
# Ray Data's checkpoint filter (ray.data.checkpoint, on a resumed run) is an actor that
# reserves one CPU, and Ray offers no setting for it.
CHECKPOINT_FILTER_CPUS = 1.0


# Blocks in flight, whatever N: Ray Data's default budget is a fraction of the object store
# (GiBs), and reads are far faster than scoring, so at 1M images ~600 MB of pixels sat queued in
# front of one actor (memory grew with N) and the reads competed with the actor's start-up.
# A few blocks per actor keep it fed (a block is ~10 MB of pixels).
READ_AHEAD_BYTES_PER_ACTOR = 96 * 2**20
READ_AHEAD_BYTES_MIN = 256 * 2**20


def read_ahead_limit(actors: int):
    """The object store budget of one inference run: flat in N, grows with the pool."""
    from ray.data import ExecutionResources

    return ExecutionResources.for_limits(
        object_store_memory=max(READ_AHEAD_BYTES_MIN, actors * READ_AHEAD_BYTES_PER_ACTOR))


def _pool_resources(cfg: InferConfig, resuming: bool = False) -> tuple[int, int, float, float]:
    """Actor pool size, GPUs and CPUs per actor; refuses a pool that would starve the reads."""
    import ray

    lo, hi = cfg.pool()
    resources = ray.cluster_resources()
    gpus = cfg.gpus_per_actor
    cpus = resources.get("CPU", 0)
    if cpus == 0:
        # An autoscaling cluster scaled to zero (cluster.yaml's head has CPU 0): nothing to
        # measure yet, so trust the flags and let the autoscaler bring the nodes they ask for.
        log.info("the cluster has no worker nodes yet: the actor pool will wait for the autoscaler")
        return lo, hi, gpus, cfg.cpus_per_actor if gpus == 0 else min(cfg.cpus_per_actor, 0.5)
    if gpus > 0 and resources.get("GPU", 0) == 0:
        if cfg.require_gpu:
            raise MnistRayError("--require-gpu: the cluster has no GPU")
        log.warning("the cluster has no GPU: running the predictor actors on CPU")
        gpus = 0.0
    # A GPU actor still feeds its GPU from the CPU, but half a core does that.
    cpus_per_actor = cfg.cpus_per_actor if gpus == 0 else min(cfg.cpus_per_actor, 0.5)
    # The reads, the writes, and on a resumed run Ray's checkpoint filter actor must all fit
    # beside the pool, or one of them waits for a CPU that never frees (ray-project/ray#44687).
    others = 2 * IO_CPUS + (CHECKPOINT_FILTER_CPUS if resuming else 0.0)
    if hi * cpus_per_actor + others > cpus and resuming:
        # Small nodes only: make room for the filter actor rather than hang.
        fitted = (cpus - others) / hi
        if fitted >= 0.25:
            log.info("resuming: Ray's checkpoint filter actor takes %g CPU, so each predictor actor "
                     "reserves %.2g CPU instead of %g", CHECKPOINT_FILTER_CPUS, fitted, cpus_per_actor)
            cpus_per_actor = fitted
    if hi * cpus_per_actor + others > cpus:
        raise MnistRayError(
            f"{hi} actors x {cpus_per_actor:g} CPU would take {hi * cpus_per_actor + others - 2 * IO_CPUS:g} of "
            f"{cpus:g} CPUs and starve the read and write tasks: lower --actors or --cpus-per-actor")
    return lo, hi, gpus, cpus_per_actor


def work_dir(loc: storage.Location, source: dict, model_version: str, runtime: str) -> str:
    """``run-KEY``: where this job's data files and checkpoint live until published.

    Only a rerun of the same job (same input, model and runtime) lands in the same directory;
    with --overwrite the published run is part of the key, so the data being replaced is
    never mistaken for finished work.
    """
    replacing = storage.read_json(loc, storage.MANIFEST).get("run_id") if storage.is_complete(loc) else None
    key = json.dumps([source["fingerprint"], model_version, runtime, replacing])
    return "run-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _checkpoint_config(loc: storage.Location, work: str, source: dict):
    from ray.data.checkpoint import CheckpointConfig

    config = CheckpointConfig(
        id_column=source["resume_key"], checkpoint_path=loc.join(work, "checkpoint"),
        override_filesystem=loc.fs, checkpoint_filter_cls=_checkpoint_filter_cls(),
        # Kept until the predictions are published: a driver that dies after the last write
        # but before publishing must not rescore everything on the rerun.
        delete_checkpoint_on_success=False)
    config.path_scheme = source["scheme"]
    # Ray's default of up to 10 filter actors x 1 GiB reserved is sized for big clusters.
    config.checkpoint_actor_pool_max_size = 2
    return config


def _checkpointed_rows(loc: storage.Location, work: str) -> int:
    """Rows an earlier attempt of this job committed (Ray's committed checkpoint files)."""
    import pyarrow.parquet as pq

    selector = pafs.FileSelector(loc.join(work, "checkpoint"), allow_not_found=True)
    rows = 0
    for info in loc.fs.get_file_info(selector):
        if info.path.endswith(".parquet") and not info.path.endswith(".pending.parquet"):
            with loc.fs.open_input_file(info.path) as f:
                rows += pq.ParquetFile(f).metadata.num_rows
    return rows


class IdDigest:
    """An order-independent digest of a multiset of ids: their count and two sums of 64-bit
    keyed hashes (SipHash, via pandas), modulo 2**64.

    Equal digests mean the same ids the same number of times (a lost row and a duplicated
    one cancel only if their hashes collide under both keys). Sums, not the XOR the shard
    fingerprint combines its row digests with: under XOR a row written twice cancels out. It is built one file at a time, so
    reconciling 100M rows needs no more memory than reconciling 70k (the set of ids it
    replaces grew ~170 MB per million rows in the driver).
    """

    KEYS = ("mnist-ray-ids-a1", "mnist-ray-ids-b2")  # SipHash keys: 16 bytes each

    def __init__(self):
        self.rows = 0
        self.sums = [0] * len(self.KEYS)

    def add(self, ids: pa.Array | pa.ChunkedArray) -> None:
        from pandas.util import hash_array

        values = ids.to_numpy(zero_copy_only=False)
        self.rows += len(values)
        for i, key in enumerate(self.KEYS):
            total = int(hash_array(values, hash_key=key, categorize=False).sum(dtype=np.uint64))
            self.sums[i] = (self.sums[i] + total) % 2**64

    def __eq__(self, other) -> bool:
        return isinstance(other, IdDigest) and (self.rows, self.sums) == (other.rows, other.sums)


def _written_files(loc: storage.Location, work: str) -> tuple[list[dict], IdDigest, pa.Table]:
    """The data files of ``work`` (manifest entries), the digest of their ids, and the failed rows.

    One file at a time over two small columns; the failed rows' paths are read (with a
    pushed-down filter) only from files that have some.
    """
    import pyarrow.parquet as pq

    selector = pafs.FileSelector(loc.join(work, "data"), allow_not_found=True)
    files, ids, bad = [], IdDigest(), []
    for info in sorted(loc.fs.get_file_info(selector), key=lambda i: i.path):
        if info.type != pafs.FileType.File or not info.base_name.endswith(".parquet"):
            continue
        table = pq.read_table(info.path, columns=["id", "error"], filesystem=loc.fs)
        files.append({"path": f"{work}/data/{info.base_name}", "rows": table.num_rows, "bytes": info.size})
        ids.add(table["id"])
        if table["error"].null_count < table.num_rows:
            bad.append(pq.read_table(info.path, columns=["id", "path", "error"], filesystem=loc.fs,
                                     filters=pc.field("error").is_valid()).cast(
                pa.schema([SCHEMA.field("id"), SCHEMA.field("path"), SCHEMA.field("error")])))
    empty = pa.schema([SCHEMA.field(c) for c in ("id", "path", "error")]).empty_table()
    return files, ids, pa.concat_tables(bad) if bad else empty


def reconcile(expected: IdDigest, written: IdDigest) -> None:
    """Every input id exactly once in the output, or nothing is published."""
    if written != expected:
        why = "" if written.rows != expected.rows else " (as many rows, but not the same ids: some are missing, some twice)"
        raise MnistRayError(f"reconciliation failed: {expected.rows:,} input rows, {written.rows:,} output rows"
                            f"{why}; nothing was published")


def _smoke_test(model_local: str, cfg: InferConfig, sample: pa.Table | None) -> None:
    """Score a few real rows in the driver: a broken model fails in seconds, not in the pool."""
    if sample is None or sample.num_rows == 0:
        return
    rows = prepare_rows(sample)
    try:
        probs = runtimes.predict_pixels(runtimes.load(model_local, cfg.runtime), shards.pixels_numpy(rows["pixels"]))
    except MnistRayError:
        raise
    except Exception as e:  # noqa: BLE001
        raise MnistRayError(f"the model in {cfg.model} fails on real input: {type(e).__name__}: {e}") from e
    # A full-integer model's softmax comes out in steps of 1/256: its sums are off by up to ~0.02.
    if probs.shape != (rows.num_rows, NUM_CLASSES) or not np.allclose(probs.sum(1), 1, atol=0.05):
        raise MnistRayError(f"the model in {cfg.model} returns {probs.shape}, not class probabilities")


class _ProgressLines(threading.Thread):
    """Plain ``rows done, rate, ETA`` lines for logs (``ray job submit``, CI); a terminal gets
    Ray's own progress bars instead."""

    def __init__(self, progress, todo: int):
        super().__init__(daemon=True, name="infer-progress")
        self.progress, self.todo, self.stopped = progress, todo, threading.Event()

    def run(self) -> None:
        import ray

        started = time.time()
        while not self.stopped.wait(PROGRESS_EVERY_S):
            try:
                done = ray.get(self.progress.state.remote(), timeout=5)["rows"]
            except Exception:  # noqa: BLE001 - progress must never break the job
                continue
            rate = done / (time.time() - started)
            eta = f"{(self.todo - done) / rate:.0f} s" if rate > 0 else "?"
            log.info("infer: %s of %s rows (%.0f%%), %.0f images/s, ETA %s",
                     f"{done:,}", f"{self.todo:,}", 100 * done / max(self.todo, 1), rate, eta)


def _final_progress(progress, rows: int, wait_s: float = 5.0) -> dict:
    """The progress actor's state once the actors reported their last rows (they do as the pool
    shuts down, a moment after the write returns), or after ``wait_s`` what has arrived."""
    import ray

    deadline = time.monotonic() + wait_s
    while True:
        state = ray.get(progress.state.remote())
        if state["rows"] >= rows or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def run(cfg: InferConfig) -> dict:
    """Score ``cfg.input`` with the model dir ``cfg.model``; publish predictions at ``cfg.output``."""
    cluster.configure_process_env()
    cfg.validate()
    started = time.perf_counter()
    model_local, metadata = export.open_model_dir(cfg.model)
    runtimes.check(model_local, cfg.runtime)
    with lock.output_lock(cfg.output):
        loc = storage.prepare_output(cfg.output, overwrite=cfg.overwrite, run_id=uuid.uuid4().hex[:12])
        source, digest_input, sample, dataset = _open_input(cfg.input)
        # Beside the main thread: the smoke test (it imports TensorFlow and loads the model) while
        # Ray starts and the read is planned, then the digest of the input ids (it reads every id
        # once) while the job runs; beside ray.init it held the GIL and slowed Ray's start-up.
        background = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="infer")
        stop = threading.Event()
        try:
            smoke = background.submit(_smoke_test, model_local, cfg, sample)
            connecting = time.perf_counter()
            try:
                cluster.connect(cfg.address, paths=(cfg.model, cfg.input, cfg.output),
                                shared_storage=cfg.shared_storage)
                ray_startup = time.perf_counter() - connecting
                ds = dataset()
            finally:
                smoke.result()
            expected = background.submit(digest_input, stop)
            return _score(cfg, started, ray_startup, loc, source, metadata, ds, expected)
        finally:
            stop.set()  # a failed run does not wait for the digest of 100M ids
            background.shutdown(wait=False, cancel_futures=True)


def _score(cfg: InferConfig, started: float, ray_startup: float, loc: storage.Location, source: dict,
           metadata: dict, ds, expected: concurrent.futures.Future) -> dict:
    import ray

    work = work_dir(loc, source, metadata["version"], cfg.runtime)
    resumed = _checkpointed_rows(loc, work)
    lo, hi, gpus, actor_cpus = _pool_resources(cfg, resuming=resumed > 0)
    if resumed:
        log.info("resuming: %s of %s rows were scored by an earlier attempt (%s)",
                 f"{resumed:,}", f"{source['rows']:,}", loc.uri_of(work))
    startup = time.perf_counter() - started

    progress = ray.remote(num_cpus=0)(Progress).remote()
    # prepare_rows asks for what the actor asks for, so Ray fuses it into the actor (no copy of
    # the decoded pixels between processes); a GPU actor's decoding stays in CPU tasks instead.
    predictions = ds.map_batches(prepare_rows, batch_format="pyarrow", batch_size=cfg.batch(),
                                 num_cpus=actor_cpus if gpus == 0 else IO_CPUS).map_batches(
        PredictorActor, batch_size=cfg.batch(), batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
        num_cpus=actor_cpus, num_gpus=gpus,
        fn_constructor_kwargs={"model_uri": cfg.model, "runtime": cfg.runtime, "progress": progress,
                               "model_version": metadata["version"], "use_gpu": gpus > 0})
    predictions.context.checkpoint_config = _checkpoint_config(loc, work, source)
    predictions.context.execution_options.resource_limits = read_ahead_limit(hi)

    lines = _ProgressLines(progress, source["rows"] - resumed)
    if not sys.stderr.isatty():
        lines.start()
    scoring_started, scoring_wall = time.perf_counter(), time.time()
    try:
        predictions.write_parquet(loc.join(work, "data"), filesystem=loc.fs, min_rows_per_file=cfg.rows_per_file,
                                  ray_remote_args={"num_cpus": IO_CPUS})
        seconds = time.perf_counter() - scoring_started
        timing = _final_progress(progress, source["rows"] - resumed)
    except OSError as e:
        raise MnistRayError(storage.describe_error(e, cfg.output)) from e
    finally:
        lines.stopped.set()
        ray.kill(progress)  # also when the write fails: the driver may live on (tests, notebooks)

    # Only the ids and the failed rows come back to the driver, however many rows.
    files, written, bad = _written_files(loc, work)
    try:
        reconcile(expected.result(), written)
    except OSError as e:
        raise MnistRayError(storage.describe_error(e, cfg.input)) from e
    rows = written.rows
    error_rows = bad.num_rows
    if rows and error_rows / rows > cfg.max_error_rate:
        examples = "; ".join(f"{i}: {e}" for i, e in zip(bad["id"].to_pylist()[:3], bad["error"].to_pylist()[:3]))
        raise MnistRayError(f"{error_rows} of {rows} rows could not be scored (> --max-error-rate "
                            f"{cfg.max_error_rate:g}), nothing was published (rerun with a higher limit to "
                            f"publish without scoring again); e.g. {examples}")
    scored = rows - resumed
    figures = {
        "rows": rows, "errors": error_rows, "resumed_rows": resumed, "scored_rows": scored,
        "scoring_seconds": round(seconds, 2), "images_per_s": round(scored / seconds, 1),
        "startup_seconds": round(startup, 2), "ray_startup_seconds": round(ray_startup, 2),
        "actor_startup_seconds": round(max(timing["ready"]) - scoring_wall, 2) if timing["ready"] else None,
        "model_load_seconds": round(max(timing["load_seconds"]), 2) if timing["load_seconds"] else None,
        "first_prediction_seconds": round(timing["first_at"] - scoring_wall, 2) if timing["first_at"] else None,
        # Where the predictor actors ran: node id -> actors started, rows scored (retried work included).
        "nodes": timing["nodes"],
    }
    manifest = {
        "kind": KIND, "schema_version": SCHEMA_VERSION, "run_id": work.removeprefix("run-"),
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "input": {k: v for k, v in source.items() if k not in ("resume_key", "scheme")},
        "model": {"uri": cfg.model, "version": metadata["version"], "runtime": cfg.runtime},
        "config": dataclasses.asdict(cfg), "mnist_ray_version": __version__,
        "rows": rows, "error_rows": error_rows, "figures": figures,
        "quarantine": bad.to_pylist(),
        "files": files, "seconds": round(seconds, 2), "images_per_s": figures["images_per_s"],
        "fingerprint": f"{source['fingerprint']}/{metadata['version']}/{cfg.runtime}",
    }
    try:
        storage.publish(loc, manifest, run_id=manifest["run_id"])
        loc.fs.delete_dir(loc.join(work, "checkpoint"))
    except OSError as e:
        raise MnistRayError(storage.describe_error(e, cfg.output)) from e
    return {"output": cfg.output, **figures, "model_version": metadata["version"], "runtime": cfg.runtime,
            "actors": f"{lo}..{hi}", "gpus_per_actor": gpus, "cpus_per_actor": actor_cpus,
            "wall_seconds": round(time.perf_counter() - started, 2)}
