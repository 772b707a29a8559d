"""infer: shards or image files -> Ray Data actor pool with a preloaded model -> predictions.

    input --read (Parquet shards | binary files)--> map_batches(prepare: decode, MNIST-style
          crop/centre, normalize; tasks) --> map_batches(PredictorActor, ActorPoolStrategy)
          --> ParquetPartSink --> reconcile ids --> _manifest.json --> _SUCCESS
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from mnist_ray import __version__, cluster, datasets, export, preprocess, runtimes, shards, storage
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
    batch_size: int = field(default=512, metadata={"help": "images per model call"})
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

    def validate(self) -> None:
        self.pool()
        if self.runtime not in runtimes.RUNTIME_FILES:
            raise MnistRayError(f"unknown runtime {self.runtime!r}: choose one of {', '.join(runtimes.RUNTIME_FILES)}")
        if self.batch_size < 1 or self.rows_per_file < 1:
            raise MnistRayError("--batch-size and --rows-per-file must be positive")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise MnistRayError("--max-error-rate must be between 0 and 1")


# --- worker side ----------------------------------------------------------------------------

def prepare_rows(batch: pa.Table) -> pa.Table:
    """Encoded images -> model input and per-row errors (a Ray Data task: no model here).

    Typed Arrow columns throughout: an all-null column must stay a string column.
    """
    from ray.data.extensions import ArrowTensorArray

    pixels, errors = preprocess.prepare_batch(batch["image"].to_pylist())
    return pa.table({"id": batch["id"], "pixels": ArrowTensorArray.from_numpy(pixels),
                     "label": batch["label"].cast(pa.int8()), "path": batch["path"].cast(pa.string()),
                     "error": pa.array(errors, pa.string())})


class Predictor:
    """Scores whole batches with a model loaded once; rows that failed earlier keep their error.

    The model loader is injected, so the batch logic is tested without Ray or a model dir.
    """

    def __init__(self, load_model: Callable[[], Callable[[np.ndarray], np.ndarray]], model_version: str):
        self.model = load_model()
        self.model_version = model_version

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        errors = batch["error"].to_pylist()
        ok = np.array([e is None for e in errors], dtype=bool)
        probs = np.zeros((n, NUM_CLASSES), np.float32)
        if ok.any():
            pixels = batch["pixels"].combine_chunks().to_numpy_ndarray()
            try:
                probs[ok] = self.model(np.ascontiguousarray(pixels[ok]))
            except Exception as e:  # noqa: BLE001 - a batch the model rejects becomes error rows
                errors = [err or f"scoring failed: {type(e).__name__}: {e}" for err in errors]
                ok[:] = False
        return pa.table({
            "id": batch["id"],
            "prediction": pa.array(probs.argmax(1).astype(np.int8), pa.int8(), mask=~ok),
            "confidence": pa.array(probs.max(1), pa.float32(), mask=~ok),
            "probabilities": pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1)), NUM_CLASSES),
            "label": batch["label"],
            "path": batch["path"],
            "model_version": pa.array([self.model_version] * n, pa.string()),
            "error": pa.array(errors, pa.string()),
        })


class PredictorActor(Predictor):
    """The Ray actor: opens the model dir (downloading it when remote) and loads it once."""

    def __init__(self, model_uri: str, runtime: str, model_version: str, use_gpu: bool):
        if use_gpu:
            import tensorflow as tf

            for gpu in tf.config.list_physical_devices("GPU"):
                # Several actors may share a GPU (fractional --gpus-per-actor): grow, don't grab.
                tf.config.experimental.set_memory_growth(gpu, True)

        def load():
            local, _ = export.open_model_dir(model_uri)
            return runtimes.load(local, runtime)

        super().__init__(load, model_version)


# --- driver ---------------------------------------------------------------------------------

def _is_shards(uri: str) -> bool:
    loc = storage.resolve(uri)
    try:
        return loc.fs.get_file_info(loc.join(storage.MANIFEST)).type == pafs.FileType.File
    except OSError as e:
        raise MnistRayError(storage.describe_error(e, uri)) from e


def _open_input(uri: str):
    """A Ray Dataset of (id, image, label, path) rows, the expected ids, and a description."""
    import ray

    if _is_shards(uri):
        loc, manifest = shards.open_shards(uri)
        ds = shards.read_dataset(uri, columns=["id", "image", "label", "path"])
        ids = shards.read_table(uri, columns=["id"])["id"]
        return ds, ids, {"kind": "shards", "uri": uri, "fingerprint": manifest["fingerprint"]}
    folder = datasets.image_folder(uri)
    paths = [folder.root.join(rel) for rel, _ in folder.files]
    listing = hashlib.sha256("\n".join(f"{rel}\t{size}" for rel, size in folder.files).encode())

    ds = ray.data.read_binary_files(paths, filesystem=folder.root.fs, include_paths=True).map_batches(
        datasets.folder_rows, batch_format="pyarrow", batch_size=256,
        fn_kwargs={"root": folder.root.path, "root_uri": folder.root.uri})
    ids = pa.array([rel for rel, _ in folder.files], pa.string())
    return ds, ids, {"kind": "images", "uri": uri, "files": len(paths),
                     "fingerprint": "sha256:" + listing.hexdigest()}


def open_predictions(uri: str) -> tuple[storage.Location, dict]:
    """A complete predictions dataset (refuses anything else with a clear message)."""
    loc, manifest = storage.open_dataset(uri, producer=PRODUCER)
    if manifest.get("kind") != KIND:
        raise MnistRayError(f"{uri} holds {manifest.get('kind')!r}, not predictions")
    return loc, manifest


def _pool_resources(cfg: InferConfig) -> tuple[int, int, float]:
    """Actor pool size and GPUs per actor; refuses a pool that would starve the read tasks."""
    import ray

    lo, hi = cfg.pool()
    resources = ray.cluster_resources()
    gpus = cfg.gpus_per_actor
    if gpus > 0 and resources.get("GPU", 0) == 0:
        if cfg.require_gpu:
            raise MnistRayError("--require-gpu: the cluster has no GPU")
        log.warning("the cluster has no GPU: running the predictor actors on CPU")
        gpus = 0.0
    cpus = resources.get("CPU", 0)
    if gpus == 0 and hi * cfg.cpus_per_actor >= cpus:
        # ray-project/ray#44687: with every CPU held by actors, the read tasks never run.
        raise MnistRayError(
            f"{hi} actors x {cfg.cpus_per_actor:g} CPU would take all {cpus:g} CPUs and starve the read "
            "and decode tasks: lower --actors or --cpus-per-actor")
    return lo, hi, gpus


def reconcile(expected_ids: pa.Array, files: list[dict], loc: storage.Location) -> None:
    """Every input id exactly once in the output, or nothing is published."""
    import pyarrow.parquet as pq

    written = pa.concat_arrays([pq.read_table(loc.join(f["path"]), columns=["id"], filesystem=loc.fs)["id"]
                                .combine_chunks() for f in files]) if files else pa.array([], pa.string())
    expected = expected_ids.combine_chunks() if isinstance(expected_ids, pa.ChunkedArray) else expected_ids
    if len(written) != len(expected) or not pc.all(pc.is_in(expected, written)).as_py() \
            or len(pc.unique(written)) != len(written):
        raise MnistRayError(f"reconciliation failed: {len(expected)} input rows, {len(written)} output rows "
                            f"({len(pc.unique(written))} distinct ids); nothing was published")


def _smoke_test(model_local: str, cfg: InferConfig, ds) -> None:
    """Score one real batch in the driver: a broken model fails in seconds, not in the pool."""
    sample = ds.take_batch(8, batch_format="pyarrow")
    pixels, _ = preprocess.prepare_batch(sample["image"].to_pylist())
    try:
        probs = runtimes.load(model_local, cfg.runtime)(pixels)
    except MnistRayError:
        raise
    except Exception as e:  # noqa: BLE001
        raise MnistRayError(f"the model in {cfg.model} fails on real input: {type(e).__name__}: {e}") from e
    if probs.shape != (len(pixels), NUM_CLASSES) or not np.allclose(probs.sum(1), 1, atol=1e-2):
        raise MnistRayError(f"the model in {cfg.model} returns {probs.shape}, not class probabilities")


def run(cfg: InferConfig) -> dict:
    """Score ``cfg.input`` with the model dir ``cfg.model``; publish predictions at ``cfg.output``."""
    cluster.configure_process_env()
    cfg.validate()
    started = time.perf_counter()
    model_local, metadata = export.open_model_dir(cfg.model)
    runtimes.check(model_local, cfg.runtime)
    run_id = uuid.uuid4().hex[:12]
    loc = storage.prepare_output(cfg.output, overwrite=cfg.overwrite, run_id=run_id)
    cluster.connect(cfg.address)
    lo, hi, gpus = _pool_resources(cfg)
    import ray

    from mnist_ray.sink import ParquetPartSink

    ds, expected_ids, source = _open_input(cfg.input)
    _smoke_test(model_local, cfg, ds)
    startup = time.perf_counter() - started
    predictions = ds.map_batches(prepare_rows, batch_format="pyarrow", batch_size=cfg.batch_size).map_batches(
        PredictorActor, batch_size=cfg.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
        num_cpus=cfg.cpus_per_actor if gpus == 0 else 0.5, num_gpus=gpus,
        fn_constructor_kwargs={"model_uri": cfg.model, "runtime": cfg.runtime,
                               "model_version": metadata["version"], "use_gpu": gpus > 0})
    sink = ParquetPartSink(loc, run_id, SCHEMA, cfg.rows_per_file)

    scoring_started = time.perf_counter()
    try:
        predictions.write_datasink(sink)
    except OSError as e:
        raise MnistRayError(storage.describe_error(e, cfg.output)) from e
    seconds = time.perf_counter() - scoring_started
    files = sink.files()
    reconcile(expected_ids, files, loc)
    import pyarrow.parquet as pq

    # Only the failed rows come back to the driver (a pushed-down filter), however many rows.
    bad = pa.concat_tables(pq.read_table(loc.join(f["path"]), columns=["id", "path", "error"],
                                         filesystem=loc.fs, filters=pc.field("error").is_valid())
                           for f in files) if files else None
    rows = len(expected_ids)
    error_rows = bad.num_rows if bad is not None else 0
    if rows and error_rows / rows > cfg.max_error_rate:
        examples = "; ".join(f"{i}: {e}" for i, e in zip(bad["id"].to_pylist()[:3], bad["error"].to_pylist()[:3]))
        raise MnistRayError(f"{error_rows} of {rows} rows could not be scored (> --max-error-rate "
                            f"{cfg.max_error_rate:g}), nothing was published; e.g. {examples}")
    manifest = {
        "kind": KIND, "schema_version": SCHEMA_VERSION, "run_id": run_id,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "input": source, "model": {"uri": cfg.model, "version": metadata["version"], "runtime": cfg.runtime},
        "config": dataclasses.asdict(cfg), "mnist_ray_version": __version__,
        "rows": rows, "error_rows": error_rows,
        "quarantine": [{"id": i, "path": p, "error": e} for i, p, e in
                       zip(bad["id"].to_pylist(), bad["path"].to_pylist(), bad["error"].to_pylist())]
        if bad is not None else [],
        "files": files, "seconds": round(seconds, 2), "images_per_s": round(rows / seconds, 1),
        "fingerprint": f"{source['fingerprint']}/{metadata['version']}/{cfg.runtime}",
    }
    storage.publish(loc, manifest, run_id=run_id)
    return {"output": cfg.output, "rows": rows, "errors": error_rows, "model_version": metadata["version"],
            "runtime": cfg.runtime, "actors": f"{lo}..{hi}", "gpus_per_actor": gpus,
            "startup_seconds": round(startup, 2), "scoring_seconds": round(seconds, 2),
            "images_per_s": round(rows / seconds, 1),
            "wall_seconds": round(time.perf_counter() - started, 2)}
