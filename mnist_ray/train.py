"""train: image shards -> a Ray Train data-parallel TensorFlow job -> a versioned model dir.

    shards --Ray Data: decode + normalize (preprocess)--> materialized train/val datasets
           --TensorflowTrainer(train_loop_per_worker, MultiWorkerMirroredStrategy)-->
           a checkpoint per epoch (RunConfig storage) --export--> MODEL_DIR
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import posixpath
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from mnist_ray import cluster, models, preprocess, shards, storage
from mnist_ray.errors import MnistRayError

log = logging.getLogger(__name__)

HOLDOUT_BUCKETS = 10  # with no val split in the data, 1 id in 10 (by a stable hash) is held out


@dataclass(frozen=True)
class TrainConfig:
    data: str = field(default="out/mnist-sample/shards", metadata={"help": "image shards (mnist-ray prepare)"})
    output: str = field(default="out/mnist-sample/model", metadata={"help": "the model dir to write"})
    model: str = field(default="default", metadata={"help": "a registered model (--list-models)"})
    epochs: int | None = field(default=None, metadata={"help": "epochs (default: the model's own)"})
    batch_size: int | None = field(default=None, metadata={
        "help": "global batch size, split over the workers (default: the model's own)"})
    learning_rate: float | None = field(default=None, metadata={"help": "peak learning rate (default: the model's own)"})
    augment: bool | None = field(default=None, metadata={"help": "random affine augmentation (default: the model's own)"})
    seed: int = field(default=0, metadata={"help": "seed of weights, shuffling and augmentation"})
    workers: int = field(default=2, metadata={"help": "data-parallel Ray Train workers"})
    cpus_per_worker: float | None = field(default=None, metadata={
        "help": "CPUs reserved per worker (default: 1, less on a small cluster so data tasks keep a CPU)"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per training worker"})
    train_splits: str = field(default="train", metadata={
        "help": "comma-separated splits to train on (e.g. train,val for a final model)"})
    val_split: str = field(default="val", metadata={
        "help": "split for validation; if the data has none, 10%% of train is held out by id"})
    storage_path: str | None = field(default=None, metadata={
        "help": "where Ray Train keeps checkpoints, local or s3:// (default: beside the output)"})
    resume: bool = field(default=False, metadata={"help": "continue the interrupted run of this same config"})
    max_failures: int = field(default=3, metadata={"help": "worker failures to recover from within a run"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing model dir and run"})
    tflite: bool = field(default=True, metadata={"help": "export TFLite float32/float16/dynamic/int8 variants"})
    list_models: bool = field(default=False, metadata={"help": "print the model registry and exit"})
    address: str | None = field(default=None, metadata={"help": "Ray address (default: RAY_ADDRESS, else local)"})

    PRESETS: ClassVar[dict] = {
        "default": {},
        "smoke": {"model": "cnn", "epochs": 2, "workers": 2, "batch_size": 64},
    }

    def resolved(self) -> "TrainConfig":
        """The config with the model's own defaults filled in."""
        spec = models.get_spec(self.model)
        fill = {k: spec.defaults.get(k) for k in ("epochs", "batch_size", "learning_rate", "augment")
                if getattr(self, k) is None}
        cfg = dataclasses.replace(self, **fill)
        if cfg.storage_path is None:
            parent = posixpath.dirname(cfg.output.rstrip("/")) or "."
            cfg = dataclasses.replace(cfg, storage_path=posixpath.join(parent, "train-runs"))
        return cfg

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0:
            raise MnistRayError("--epochs, --batch-size and --learning-rate must be positive")
        if self.workers < 1:
            raise MnistRayError("--workers must be at least 1")
        if self.batch_size < self.workers:
            raise MnistRayError(f"--batch-size {self.batch_size} is smaller than --workers {self.workers}")

    def run_name(self, data_fingerprint: str) -> str:
        """Explicit and deterministic: the same data and settings name the same run (for --resume)."""
        keys = ("model", "epochs", "batch_size", "learning_rate", "augment", "seed", "workers",
                "train_splits", "val_split")
        h = hashlib.sha256(json.dumps([data_fingerprint] + [getattr(self, k) for k in keys]).encode())
        return f"{self.model}-{h.hexdigest()[:12]}"


# --- data (driver side, executed by Ray Data) ------------------------------------------------

def assign_split(ids: list[str], splits: list[str | None], val_split: str, holdout: bool) -> np.ndarray:
    """The split of every row; with ``holdout``, 1 train id in 10 (stable hash) becomes val."""
    out = np.array([s if s is not None else "none" for s in splits], dtype=object)
    if holdout:
        bucket = np.array([zlib.crc32(i.encode()) % HOLDOUT_BUCKETS for i in ids])
        out[(out == "train") & (bucket == 0)] = val_split
    return out


def decode_for_training(batch: pa.Table, keep: list[str], val_split: str, holdout: bool) -> pa.Table:
    """Shard rows of the wanted splits -> normalized model input and int labels."""
    from ray.data.extensions import ArrowTensorArray

    split = assign_split(batch["id"].to_pylist(), batch["split"].to_pylist(), val_split, holdout)
    mask = np.isin(split, keep)
    images = [b for b, m in zip(batch["image"].to_pylist(), mask) if m]
    # An explicit tensor column: a batch with no wanted row must keep the same schema.
    return pa.table({"image": ArrowTensorArray.from_numpy(preprocess.to_model_input(images)),
                     "label": pa.array(batch["label"].to_numpy(zero_copy_only=False)[mask].astype(np.int32))})


def _split_dataset(data: str, keep: list[str], val_split: str, holdout: bool):
    ds = shards.read_dataset(data, columns=["id", "image", "label", "split"])
    return ds.map_batches(decode_for_training, batch_format="pyarrow", batch_size=4096,
                          fn_kwargs={"keep": keep, "val_split": val_split, "holdout": holdout})


def _check_data(cfg: TrainConfig, manifest: dict) -> tuple[list[str], bool, int]:
    """Train splits, whether val is held out of train, and the number of training rows."""
    splits = manifest["splits"]
    train_splits = [s.strip() for s in cfg.train_splits.split(",") if s.strip()]
    for s in train_splits:
        if splits.get(s, {}).get("rows", 0) == 0:
            raise MnistRayError(f"{cfg.data} has no rows in split {s!r} (it has {sorted(splits)}): "
                                "choose --train-splits from those")
        if "none" in splits[s]["labels"]:
            raise MnistRayError(f"{cfg.data}: split {s!r} has {splits[s]['labels']['none']} rows without "
                                "labels; training needs labelled shards (class folders, IDX labels)")
    holdout = cfg.val_split not in splits
    if holdout and "train" not in train_splits:
        raise MnistRayError(f"{cfg.data} has no {cfg.val_split!r} split: add one or train on 'train'")
    rows = sum(splits[s]["rows"] for s in train_splits)
    if holdout:
        rows = int(rows * (1 - 1 / HOLDOUT_BUCKETS))
    return train_splits, holdout, rows


MIN_CPUS_PER_WORKER = 0.25
DATA_CPU_RESERVE = 0.5


def _cpus_per_worker(cfg: TrainConfig) -> float:
    """CPUs per worker: 1, or less on a small cluster so Ray Data's tasks keep half a CPU
    (ray-project/ray#44687). Fails in seconds when the workers can never be placed."""
    import ray

    resources = ray.cluster_resources()
    total = resources.get("CPU", 0)
    if cfg.use_gpu and cfg.workers > resources.get("GPU", 0):
        raise MnistRayError(f"{cfg.workers} GPU workers need {cfg.workers} GPUs but the cluster has "
                            f"{resources.get('GPU', 0):g}: lower --workers or drop --use-gpu")
    if cfg.cpus_per_worker is not None:
        need = cfg.cpus_per_worker
    else:
        need = min(1.0, math.floor((total - DATA_CPU_RESERVE) / cfg.workers * 20) / 20)
        need = max(need, MIN_CPUS_PER_WORKER)
    if need * cfg.workers + DATA_CPU_RESERVE > total:
        raise MnistRayError(
            f"{cfg.workers} workers need {need * cfg.workers:g} CPUs ({need:g} each) plus "
            f"{DATA_CPU_RESERVE:g} for data tasks, but the cluster has {total:g} CPUs: lower --workers "
            "or --cpus-per-worker, or add nodes")
    return need


# --- the training loop (runs inside every Ray Train worker) ------------------------------------

def augment_batch(images, seed):
    """Random affine jitter of a batch (rotation, scale, shift), as handwriting varies."""
    import tensorflow as tf

    n = tf.shape(images)[0]
    rng = tf.random.stateless_uniform
    angle = rng([n], seed, -0.2, 0.2)  # radians, about +-11 degrees
    scale = rng([n], seed + 1, 0.9, 1.1)
    shift = rng([n, 2], seed + 2, -2.5, 2.5)
    cos, sin = tf.cos(angle) / scale, tf.sin(angle) / scale
    c = 13.5  # rotate and scale about the image centre
    tx = c - cos * c + sin * c - shift[:, 0]
    ty = c - (-sin) * c - cos * c - shift[:, 1]
    zeros = tf.zeros([n])
    transforms = tf.stack([cos, -sin, tx, sin, cos, ty, zeros, zeros], axis=1)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.shape(images)[1:3],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")


def build_optimizer(learning_rate: float, total_steps: int):
    k = models.keras()
    schedule = k.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(total_steps, 1), alpha=0.01)
    return k.optimizers.Adam(schedule)


def train_loop_per_worker(config: dict) -> None:
    """One data-parallel worker: build or restore the model, train epoch by epoch, report."""
    import ray.train
    import tensorflow as tf

    k = models.keras()
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    # One all-reduce per step for all gradients, not one per variable: on CPU clusters the
    # per-collective latency, not bandwidth, is what costs.
    strategy = tf.distribute.MultiWorkerMirroredStrategy(
        communication_options=tf.distribute.experimental.CommunicationOptions(bytes_per_pack=64 << 20))
    checkpoint = ray.train.get_checkpoint()
    history: list[dict] = []
    with strategy.scope():
        if checkpoint:
            with checkpoint.as_directory() as d:
                model = k.models.load_model(os.path.join(d, "model.keras"))
                with open(os.path.join(d, "state.json")) as f:
                    history = json.load(f)["history"]
        else:
            model = models.create_model(config["model"], seed=config["seed"])
            model.compile(optimizer=build_optimizer(config["learning_rate"], config["total_steps"]),
                          loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    start_epoch = len(history)
    if start_epoch and rank == 0:
        print(f"resuming from the checkpoint of epoch {start_epoch}", flush=True)
    for epoch in range(start_epoch, config["epochs"]):  # never past the requested count
        started = time.perf_counter()
        ds = train_shard.to_tf("image", "label", batch_size=config["batch_size"],
                               local_shuffle_buffer_size=4096, local_shuffle_seed=config["seed"] + epoch)
        if config["augment"]:
            seed = tf.constant([config["seed"], epoch], tf.int32)
            ds = ds.enumerate().map(lambda i, xy: (augment_batch(xy[0], seed + tf.cast(i, tf.int32) * 3), xy[1]),
                                    num_parallel_calls=tf.data.AUTOTUNE)
        steps_before = int(model.optimizer.iterations.numpy())
        fit = model.fit(ds, epochs=1, verbose=0)
        seconds = time.perf_counter() - started
        steps = int(model.optimizer.iterations.numpy()) - steps_before
        val = model.evaluate(val_shard.to_tf("image", "label", batch_size=1024), verbose=0, return_dict=True)
        metrics = {"epoch": epoch + 1, "loss": float(fit.history["loss"][-1]),
                   "accuracy": float(fit.history["accuracy"][-1]),
                   "val_loss": float(val["loss"]), "val_accuracy": float(val["accuracy"]),
                   "steps": steps, "seconds": round(seconds, 2), "resumed_at_epoch": start_epoch,
                   "images_per_s": round(config["train_rows"] / seconds, 1)}
        history.append(metrics)
        if rank == 0:
            print(f"epoch {epoch + 1}/{config['epochs']}: loss {metrics['loss']:.4f} "
                  f"acc {metrics['accuracy']:.4f} val_acc {metrics['val_accuracy']:.4f} "
                  f"{metrics['images_per_s']:.0f} img/s ({steps} steps)", flush=True)
        # Every worker saves (MultiWorkerMirroredStrategy expects it); rank 0's copy is kept.
        with tempfile.TemporaryDirectory() as d:
            model.save(os.path.join(d, "model.keras"))
            with open(os.path.join(d, "state.json"), "w") as f:
                json.dump({"history": history}, f)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)


# --- driver ----------------------------------------------------------------------------------

def print_model_table() -> list[dict]:
    rows = models.list_models()
    print(f"{'model':<14}{'params':>12}  description")
    for r in rows:
        print(f"{r['name']:<14}{r['params']:>12,}  {r['description']}")
    return rows


def _prepare_run_storage(cfg: TrainConfig, name: str) -> storage.Location:
    """The checkpoint storage; refuses to silently reuse (or silently ignore) an earlier run."""
    loc = storage.resolve(cfg.storage_path)
    try:
        exists = loc.fs.get_file_info(loc.join(name)).type != pafs.FileType.NotFound
        if cfg.resume and not exists:
            raise MnistRayError(f"nothing to resume: no run {name} in {cfg.storage_path} for this data "
                                "and these settings; drop --resume to start a new run")
        if exists and not cfg.resume:
            if not cfg.overwrite:
                raise MnistRayError(f"run {name} already exists in {cfg.storage_path}: pass --resume to "
                                    "continue it, or --overwrite to start over")
            loc.fs.delete_dir(loc.join(name))
        loc.fs.create_dir(loc.path, recursive=True)
    except OSError as e:
        raise MnistRayError(storage.describe_error(e, cfg.storage_path)) from e
    return loc


def run(cfg: TrainConfig) -> dict:
    """Train ``cfg.model`` on ``cfg.data`` with Ray Train and export it to ``cfg.output``."""
    cluster.configure_process_env()
    if cfg.list_models:
        return {"models": len(print_model_table())}
    cfg = cfg.resolved()
    cfg.validate()
    _, manifest = shards.open_shards(cfg.data)
    train_splits, holdout, train_rows = _check_data(cfg, manifest)
    from mnist_ray import export

    export.check_output(cfg.output, overwrite=cfg.overwrite)
    name = cfg.run_name(manifest["fingerprint"])
    run_loc = _prepare_run_storage(cfg, name)
    cluster.connect(cfg.address)
    cpus = _cpus_per_worker(cfg)

    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    started = time.perf_counter()
    # Materialized up front: small, and the workers then never wait on read tasks for a CPU.
    train_ds = _split_dataset(cfg.data, train_splits, cfg.val_split, holdout).materialize()
    val_ds = _split_dataset(cfg.data, [cfg.val_split], cfg.val_split, holdout).materialize()
    if val_ds.count() == 0:
        raise MnistRayError(f"the {cfg.val_split!r} split of {cfg.data} is empty")
    steps = math.ceil(train_rows / cfg.batch_size)
    trainer = TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config={
            "model": cfg.model, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
            "learning_rate": cfg.learning_rate, "augment": cfg.augment, "seed": cfg.seed,
            "total_steps": steps * cfg.epochs, "train_rows": train_rows,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cpus}),
        run_config=ray.train.RunConfig(
            name=name, storage_path=run_loc.path, storage_filesystem=run_loc.fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        datasets={"train": train_ds, "val": val_ds},
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise MnistRayError(f"training failed after {cfg.max_failures} retries: {str(e).splitlines()[0]}; "
                            f"rerun with --resume to continue from the last epoch (run {name})") from e
    train_seconds = time.perf_counter() - started
    with result.checkpoint.as_directory() as d:
        with open(os.path.join(d, "state.json")) as f:
            history = json.load(f)["history"]
        summary = export.export(
            os.path.join(d, "model.keras"), cfg.output, history=history, manifest=manifest,
            val_dataset=val_ds, calibration_dataset=train_ds, train_config=dataclasses.asdict(cfg),
            run_name=name, train_seconds=train_seconds, tflite=cfg.tflite, overwrite=cfg.overwrite)
    return {"output": cfg.output, "model": cfg.model, "run": name, "epochs": len(history),
            "train_seconds": round(train_seconds, 1), **summary}
