"""train: image shards -> a Ray Train data-parallel TensorFlow job -> a versioned model dir.

    shards --Ray Data: decode + normalize (preprocess)--> materialized train/val datasets
           --TensorflowTrainer(train_loop_per_worker, MultiWorkerMirroredStrategy)-->
           a checkpoint per epoch (RunConfig storage) --export--> MODEL_DIR
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import importlib
import json
import logging
import os
import posixpath
import time
import zlib
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from mnist_ray.formats import shards
from mnist_ray.images import augment, preprocess, synthetic
from mnist_ray.model import models
from mnist_ray.plumbing import cluster, lock, logs, storage
from mnist_ray.errors import MnistRayError, raised_in_worker
from mnist_ray.training import feed, workers
from mnist_ray.training.train_worker import train_loop_per_worker

log = logging.getLogger(__name__)

HOLDOUT_BUCKETS = 10  # with no val split in the data, 1 id in 10 (by a stable hash) is held out
# Recipe settings a model spec may set (models.register); not flags, since they belong to the model.
RECIPE_DEFAULTS = {"weight_decay": 0.0, "warmup_epochs": 0, "label_smoothing": 0.0, "ema_momentum": None,
                   # robustness (augment.py, synthetic.py): the share of training images shown as
                   # a degraded picture, and printed digits (per class) added to the training set
                   "degrade_rate": 0.0, "printed_per_class": 0}


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
    width: float = field(default=1.0, metadata={
        "help": "multiplier of every layer's units/filters (1.0: the registered model)"})
    seed: int = field(default=0, metadata={"help": "seed of weights, shuffling and augmentation"})
    workers: int | None = field(default=None, metadata={
        "help": "data-parallel Ray Train workers (default: one per node, with all its cores; one per GPU "
                "with --use-gpu)"})
    cpus_per_worker: float | None = field(default=None, metadata={
        "help": "CPUs reserved per worker (default: its node's share, less what Ray Data's tasks keep)"})
    use_gpu: bool = field(default=False, metadata={"help": "one GPU per training worker"})
    placement: str = field(default="PACK", metadata={
        "help": "PACK (workers share nodes: fastest all-reduce) or SPREAD (one per node where it can: "
                "a lost node takes one worker)"})
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
    shared_storage: bool = field(default=False, metadata={"help": cluster.SHARED_STORAGE_HELP})
    feed_memory_mb: float = field(default=feed.DEFAULT_BUDGET_MB, metadata={
        "help": "training rows a worker may hold in memory (MB); a larger share streams every epoch (0: always)"})

    PRESETS: ClassVar[dict] = {
        "default": {},
        "smoke": {"model": "cnn", "epochs": 2, "batch_size": 64},
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
        if self.epochs < 1 or self.batch_size < 1 or self.learning_rate <= 0 or self.width <= 0:
            raise MnistRayError("--epochs, --batch-size, --learning-rate and --width must be positive")
        if self.workers is not None and self.workers < 1:
            raise MnistRayError("--workers must be at least 1")
        if self.feed_memory_mb < 0:
            raise MnistRayError(f"--feed-memory-mb {self.feed_memory_mb:g}: give 0 (always stream) or more")
        if self.placement not in ("PACK", "SPREAD"):
            raise MnistRayError(f"--placement {self.placement!r}: choose PACK or SPREAD")
        if self.batch_size < (self.workers or 1):
            raise MnistRayError(f"--batch-size {self.batch_size} is smaller than --workers {self.workers}")

    def run_name(self, data_fingerprint: str) -> str:
        """Explicit and deterministic: the same data and settings name the same run (for --resume)."""
        keys = ("model", "epochs", "batch_size", "learning_rate", "augment", "seed", "workers",
                "train_splits", "val_split")
        values = [data_fingerprint] + [getattr(self, k) for k in keys]
        if self.width != 1.0:  # only then: runs named before the width knob keep their names
            values.append(self.width)
        # The model's recipe and the fonts its printed digits come from: a checkpoint of another
        # recipe is never resumed as this one. Models without a recipe keep their names.
        recipe = {key: recipe_value(self.model, key) for key in RECIPE_DEFAULTS}
        if recipe != RECIPE_DEFAULTS:
            values += [recipe, preprocess.PREPROCESS_VERSION]
        if recipe["printed_per_class"]:
            values.append(list(synthetic.TRAIN_FONTS))
        h = hashlib.sha256(json.dumps(values).encode())
        return f"{self.model}-{h.hexdigest()[:12]}"


# --- data (driver side, executed by Ray Data) ------------------------------------------------

def assign_split(ids: list[str], splits: list[str | None], val_split: str, holdout: bool) -> np.ndarray:
    """The split of every row; with ``holdout``, 1 train id in 10 (stable hash) becomes val."""
    out = np.array([s if s is not None else "none" for s in splits], dtype=object)
    if holdout:
        bucket = np.array([zlib.crc32(i.encode()) % HOLDOUT_BUCKETS for i in ids])
        out[(out == "train") & (bucket == 0)] = val_split
    return out


def decode_for_training(batch: pa.Table, keep: list[str], val_split: str, holdout: bool,
                        variant_seed: int | None = None) -> pa.Table:
    """Shard rows of the wanted splits -> normalized model input and int labels (and, with
    ``variant_seed``, a degraded picture of every image: ``augment.degrade_batch``)."""
    from ray.data.extensions import ArrowTensorArray

    split = assign_split(batch["id"].to_pylist(), batch["split"].to_pylist(), val_split, holdout)
    mask = np.isin(split, keep)
    images = [b for b, m in zip(batch["image"].to_pylist(), mask) if m]
    x = preprocess.to_model_input(images)
    # An explicit tensor column: a batch with no wanted row must keep the same schema.
    columns = {"image": ArrowTensorArray.from_numpy(x),
               "label": pa.array(batch["label"].to_numpy(zero_copy_only=False)[mask].astype(np.int32))}
    if variant_seed is not None:
        ids = [i for i, m in zip(batch["id"].to_pylist(), mask) if m]
        pixels = np.round(x[..., 0] * 255).astype(np.uint8)
        columns["variant"] = ArrowTensorArray.from_numpy(preprocess.normalize(
            augment.degrade_batch(pixels, ids, variant_seed)))
    return pa.table(columns)


def _split_dataset(data: str, keep: list[str], val_split: str, holdout: bool, variant_seed: int | None = None):
    ds = shards.read_dataset(data, columns=["id", "image", "label", "split"])
    return ds.map_batches(decode_for_training, batch_format="pyarrow", batch_size=512,
                          fn_kwargs={"keep": keep, "val_split": val_split, "holdout": holdout,
                                     "variant_seed": variant_seed})


def printed_table(per_class: int, seed: int, column: str) -> pa.Table:
    """Printed digits of synthetic.TRAIN_FONTS as one normalized column (and ``label`` with
    ``image``)."""
    from ray.data.extensions import ArrowTensorArray

    images, labels = synthetic.printed_digits(synthetic.TRAIN_FONTS, per_class, seed)
    columns = {column: ArrowTensorArray.from_numpy(preprocess.normalize(images))}
    return pa.table({**columns, "label": pa.array(labels, pa.int32())} if column == "image" else columns)


def printed_rows(per_class: int, seed: int) -> pa.Table:
    """Printed digits in the training schema (image, label, variant: a second rendering)."""
    images, variants = printed_table(per_class, seed, "image"), printed_table(per_class, seed + 1, "variant")
    return images.append_column("variant", variants["variant"])


def printed_dataset(per_class: int, seed: int):
    """``printed_rows`` as a Ray dataset, rendered by two tasks at once (the digits and their second
    rendering, ~5 s each) as the shards decode, not in the driver before."""
    import ray

    def rendered(seed_: int, column: str):
        return ray.data.range(1).map_batches(
            lambda _: printed_table(per_class, seed_, column), batch_format="pyarrow", batch_size=None)

    return rendered(seed, "image").zip(rendered(seed + 1, "variant"))


def recipe_value(model: str, key: str):
    return models.get_spec(model).defaults.get(key, RECIPE_DEFAULTS[key])


def check_data(cfg: TrainConfig, manifest: dict) -> tuple[list[str], bool, int]:
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
    return train_splits, holdout, rows + 10 * recipe_value(cfg.model, "printed_per_class")


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


def load_datasets(cfg: TrainConfig, train_splits: list[str], holdout: bool):
    """The materialized (train, val) datasets: decoded once, for every epoch (and every trial of
    a search)."""
    # Materialized up front: small, and the workers then never wait on read tasks for a CPU.
    # Shuffled once across the whole set: shards are often sorted by label, and a worker whose
    # share holds half the classes computes skewed BatchNorm statistics.
    # In order: Ray Data otherwise hands blocks on as their tasks finish, so the seeded shuffle
    # would permute a different order in every run, and the same seed would train another model.
    import ray

    options = ray.data.DataContext.get_current().execution_options
    previous, options.preserve_order = options.preserve_order, True
    try:
        degrade, printed = recipe_value(cfg.model, "degrade_rate"), recipe_value(cfg.model, "printed_per_class")
        train_ds = _split_dataset(cfg.data, train_splits, cfg.val_split, holdout,
                                  variant_seed=cfg.seed if degrade or printed else None)
        if printed:
            train_ds = train_ds.union(printed_dataset(printed, cfg.seed))
        train_ds = train_ds.random_shuffle(seed=cfg.seed).materialize()
        val_ds = _split_dataset(cfg.data, [cfg.val_split], cfg.val_split, holdout).materialize()
    finally:
        options.preserve_order = previous
    if val_ds.count() == 0:
        raise MnistRayError(f"the {cfg.val_split!r} split of {cfg.data} is empty")
    return train_ds, val_ds


def feed_plans(cfg: TrainConfig, datasets: dict, workers: int) -> dict:
    """How each worker is fed its train and val rows (``feed.plan``), logged once."""
    plans = {split: feed.plan(ds, workers, cfg.feed_memory_mb) for split, ds in datasets.items()}
    log.info("train: feed %s", plans["train"].describe())
    return {split: dataclasses.asdict(p) for split, p in plans.items()}


def loop_config(cfg: TrainConfig, train_rows: int, cpus: float, feeds: dict) -> dict:
    """What ``train_loop_per_worker`` is given: the resolved settings, the model's recipe and the
    feed plans (``feed_plans``)."""
    spec = models.get_spec(cfg.model)
    return {
        "model": cfg.model, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
        "learning_rate": cfg.learning_rate, "augment": cfg.augment, "width": cfg.width, "seed": cfg.seed,
        "steps_per_epoch": train_rows // cfg.batch_size, "train_rows": train_rows, "cpus_per_worker": cpus,
        "use_gpu": cfg.use_gpu, "workers": cfg.workers, "feed": feeds,
        **{key: spec.defaults.get(key, default) for key, default in RECIPE_DEFAULTS.items()},
    }


def make_trainer(cfg: TrainConfig, config: dict, datasets: dict, *, name: str, run_loc: storage.Location,
                 callbacks: list | None = None, checkpoint_config=None):
    """The TensorflowTrainer of one run (also built inside every trial of `mnist-ray tune`)."""
    import ray.train
    from ray.train.tensorflow import TensorflowTrainer

    return TensorflowTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": config["cpus_per_worker"]},
            placement_strategy=cfg.placement),
        run_config=ray.train.RunConfig(
            name=name, storage_path=run_loc.path, storage_filesystem=run_loc.fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=checkpoint_config or ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks),
        datasets=datasets,
    )


def export_checkpoint(checkpoint, cfg: TrainConfig, *, output: str, manifest: dict, datasets: dict,
                      run_name: str, train_seconds: float, overwrite: bool,
                      layout: dict | None = None) -> tuple[dict, list[dict]]:
    """Export a training checkpoint as a model dir at ``output``: (export summary, history)."""
    from mnist_ray.model import export

    with checkpoint.as_directory() as d:
        with open(os.path.join(d, "state.json")) as f:
            history = json.load(f)["history"]
        summary = export.export(
            os.path.join(d, "model.keras"), output, history=history, manifest=manifest,
            val_dataset=datasets["val"], calibration_dataset=datasets["train"],
            train_config={**dataclasses.asdict(cfg), **({"layout": layout} if layout else {})}, run_name=run_name, train_seconds=train_seconds,
            tflite=cfg.tflite, overwrite=overwrite)
    return summary, history


def epochs_done(runs_uri: str, run_name: str, epochs: int):
    """Training progress read from the run's newest checkpoint: (epochs done, epochs, "epoch")."""
    def progress():
        loc = storage.resolve(runs_uri)
        names = sorted(i.base_name for i in loc.fs.get_file_info(pafs.FileSelector(loc.join(run_name)))
                       if i.base_name.startswith("checkpoint_") and i.type == pafs.FileType.Directory)
        if not names:
            return 0, epochs, "epoch"
        state = storage.read_json(storage.resolve(loc.uri_of(f"{run_name}/{names[-1]}")), "state.json")
        return len(state["history"]), epochs, "epoch"
    return progress


def run(cfg: TrainConfig) -> dict:
    """Train ``cfg.model`` on ``cfg.data`` with Ray Train and export it to ``cfg.output``."""
    cluster.configure_process_env()
    if cfg.list_models:
        return {"models": len(print_model_table())}
    cfg = cfg.resolved()
    cfg.validate()
    _, manifest = shards.open_shards(cfg.data)
    train_splits, holdout, train_rows = check_data(cfg, manifest)
    from mnist_ray.model import export

    with lock.output_lock(cfg.output, beside=True):  # a model dir is replaced whole
        export.check_output(cfg.output, overwrite=cfg.overwrite)
        name = cfg.run_name(manifest["fingerprint"])
        run_loc = _prepare_run_storage(cfg, name)
        cluster.connect(cfg.address, paths=(cfg.data, cfg.output, cfg.storage_path), shared_storage=cfg.shared_storage)

        import ray.train

        # scale from zero: GPU nodes are asked for, not refused
        with workers.gpus_for(dataclasses.replace(cfg, workers=cfg.workers or 1)):
            layout = workers.choose_layout(cfg)
            cfg = dataclasses.replace(cfg, workers=layout.workers, placement=layout.placement)
            log.info("train: %s", layout.describe())
            workers.warn_small_gpu_batches(cfg)
            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                # TensorFlow's import (~4 s; Ray's TensorflowTrainer needs it) while Ray Data decodes.
                imported = pool.submit(importlib.import_module, "ray.train.tensorflow")
                train_ds, val_ds = load_datasets(cfg, train_splits, holdout)
                imported.result()
            datasets = {"train": train_ds, "val": val_ds}
            config = loop_config(cfg, train_rows, layout.cpus_per_worker, feed_plans(cfg, datasets, layout.workers))
            trainer = make_trainer(cfg, config, datasets, name=name, run_loc=run_loc)
            try:
                with logs.stage("train", epochs_done(cfg.storage_path, name, cfg.epochs)):
                    result = trainer.fit()
            except ray.train.TrainingFailedError as e:
                reason = raised_in_worker(e) or str(e).splitlines()[0].rstrip(":")  # a worker's own sentence
                raise MnistRayError(f"training failed after {cfg.max_failures} retries: {reason}; "
                                    f"rerun with --resume to continue from the last epoch (run {name})") from e
        train_seconds = time.perf_counter() - started
        exported = time.perf_counter()
        summary, history = export_checkpoint(result.checkpoint, cfg, output=cfg.output, manifest=manifest,
                                             datasets=datasets, run_name=name, train_seconds=train_seconds,
                                             overwrite=cfg.overwrite,
                                             layout={**dataclasses.asdict(layout), "threads": layout.threads,
                                                     "feed": config["feed"]["train"]["mode"]})
        return {"output": cfg.output, "model": cfg.model, "run": name, "epochs": len(history),
                "train_seconds": round(train_seconds, 1), "export_seconds": round(time.perf_counter() - exported, 1),
                "layout": layout.describe(), **summary}
