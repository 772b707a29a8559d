"""The training loop that runs inside every Ray Train worker, with its epoch datasets, optimizer and weight EMA."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time

import numpy as np

from mnist_ray.images import augment
from mnist_ray.model import models
from mnist_ray.plumbing import compat, gpu
from mnist_ray.training import feed

augment_batch = augment.affine_batch  # the per-batch affine augmentation (its home: augment.py)


def build_optimizer(config: dict):
    """AdamW: an optional linear warmup, then cosine decay to 0 (the weight EMA is WeightEMA)."""
    k = models.keras()
    steps = config["steps_per_epoch"]
    warmup = config["warmup_epochs"] * steps
    decay = max(config["epochs"] * steps - warmup, 1)
    lr = config["learning_rate"]
    if warmup:
        schedule = k.optimizers.schedules.CosineDecay(lr / 10, decay, alpha=0.0, warmup_target=lr,
                                                      warmup_steps=warmup)
    else:
        schedule = k.optimizers.schedules.CosineDecay(lr, decay, alpha=0.0)
    # Not the optimizer's own EMA: Model.fit copies it into the weights at the end of every
    # fit() call, i.e. every epoch here, and it leaves BatchNorm statistics out.
    return k.optimizers.AdamW(schedule, weight_decay=config["weight_decay"])


class WeightEMA:
    """Exponential moving average of all weights, BatchNorm statistics included, kept across
    epochs and checkpoints; the exported model is the average.

    The shadow weights are variables beside the model's (on its GPU when it has one), moved by
    one compiled update per step: nothing crosses to the host but once an epoch (``state``).
    """

    def __init__(self, model, decay: float, state: dict | None = None):
        import tensorflow as tf

        self.model, self.decay = model, decay
        values = [state[f"w{i}"] for i in range(len(state) - 1)] if state is not None else \
            [w.value() for w in model.weights]
        self.shadow = [tf.Variable(tf.cast(v, w.dtype), trainable=False, name=f"ema_{i}")
                       for i, (v, w) in enumerate(zip(values, model.weights))]
        self._steps = tf.Variable(int(state["steps"]) if state is not None else 0, dtype=tf.int64,
                                  trainable=False, name="ema_steps")
        self._update = tf.function(self._update_step)

    def _update_step(self) -> None:
        import tensorflow as tf

        self._steps.assign_add(1)
        steps = tf.cast(self._steps, tf.float32)
        d = tf.minimum(self.decay, (1.0 + steps) / (10.0 + steps))  # warm up from the start
        for s, w in zip(self.shadow, self.model.weights):
            s.assign(s * tf.cast(d, s.dtype) + w.value() * tf.cast(1.0 - d, s.dtype))

    @property
    def steps(self) -> int:
        return int(self._steps.numpy())

    def update(self) -> None:
        self._update()

    def callback(self):
        return models.keras().callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: self.update())

    def state(self) -> dict:
        """The average as numpy arrays, for a checkpoint."""
        return {"steps": np.array(self.steps), **{f"w{i}": s.numpy() for i, s in enumerate(self.shadow)}}

    def apply(self) -> None:
        for w, s in zip(self.model.weights, self.shadow):
            w.assign(s)


def train_loop_per_worker(config: dict) -> None:
    """One data-parallel worker: build or restore the model, train epoch by epoch, report."""
    import ray.train
    import tensorflow as tf

    set_worker_threads(config["cpus_per_worker"])
    rank = ray.train.get_context().get_world_rank()
    use_gpu = config.get("use_gpu", False)
    if use_gpu:
        gpu.check_tf_sees_gpu()  # a GPU worker on the CPU would train, slowly, without a word
    # NCCL between GPU workers, ring between CPU workers; one all-reduce for all gradients.
    strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=gpu.communication_options(use_gpu))
    model, history, ema_state = restore_or_build_model(config, strategy, ray.train.get_checkpoint())
    ema = WeightEMA(model, config["ema_momentum"], ema_state) if config["ema_momentum"] else None
    train_feed = feed.Feed(ray.train.get_dataset_shard("train"), config["feed"]["train"], train_columns(config))
    val_feed = feed.Feed(ray.train.get_dataset_shard("val"), config["feed"]["val"], ["image", "label"])
    # Every worker runs the same steps (Ray Data splits the rows evenly): the collectives match.
    train_steps = config["feed"]["train"]["rows_per_worker"] // (config["batch_size"] // config["workers"])
    val_steps = -(-config["feed"]["val"]["rows_per_worker"] // val_batch_size(config["workers"]))
    start_epoch = len(history)
    if start_epoch and rank == 0:
        print(f"resuming from the checkpoint of epoch {start_epoch}", flush=True)
    for epoch in range(start_epoch, config["epochs"]):  # never past the requested count
        started = time.perf_counter()
        # Each worker's own batches, as they are: the strategy neither shards nor rebatches them.
        ds = strategy.distribute_datasets_from_function(lambda _: epoch_dataset(train_feed, config, epoch, rank))
        steps_before = int(model.optimizer.iterations.numpy())
        callbacks = [compat.mmap_threshold_callback(), *([ema.callback()] if ema else [])]
        fit = model.fit(ds, epochs=1, steps_per_epoch=train_steps, verbose=0, callbacks=callbacks)
        seconds = time.perf_counter() - started
        steps = int(model.optimizer.iterations.numpy()) - steps_before
        last = epoch + 1 == config["epochs"]
        if last and ema:
            ema.apply()  # the model to keep is the average; earlier epochs validate raw weights
        val = model.evaluate(strategy.distribute_datasets_from_function(
            lambda _: val_dataset(val_feed, config["workers"])), steps=val_steps, verbose=0, return_dict=True)
        metrics = {"epoch": epoch + 1, "loss": float(fit.history["loss"][-1]),
                   "accuracy": float(fit.history["accuracy"][-1]),
                   "val_loss": float(val["loss"]), "val_accuracy": float(val["accuracy"]),
                   "steps": steps, "seconds": round(seconds, 2), "resumed_at_epoch": start_epoch,
                   "images_per_s": round(steps * config["batch_size"] / seconds, 1)}
        history.append(metrics)
        if rank == 0:
            print(f"epoch {epoch + 1}/{config['epochs']}: loss {metrics['loss']:.4f} "
                  f"acc {metrics['accuracy']:.4f} val_acc {metrics['val_accuracy']:.4f} "
                  f"{metrics['images_per_s']:.0f} img/s ({steps} steps)", flush=True)
        report_epoch(model, history, ema if ema and not last else None, metrics, rank)


def set_worker_threads(cpus_per_worker: float) -> None:
    """TF's pools at twice the CPUs reserved, at most the node's cores. A worker waits at every
    step's all-reduce, and meanwhile another worker on its node can compute on both cores:
    measured with 2 workers of 0.75 CPUs on 2 cores (cnn, batch 64), 940 images/s with 1 thread
    each, 1,105 with 2. A worker alone on 2 cores (1.5 CPUs: Ray Data's tasks keep the rest)
    computes on both, as a plain fit does."""
    import tensorflow as tf

    threads = worker_threads(cpus_per_worker, len(os.sched_getaffinity(0)))
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    compat.without_device_autotune()


def worker_threads(cpus_per_worker: float, node_cores: int) -> int:
    return max(1, min(node_cores, math.ceil(2 * cpus_per_worker)))


def restore_or_build_model(config: dict, strategy, checkpoint) -> tuple:
    """The worker's model in ``strategy``'s scope, with its history and EMA state: restored from
    ``checkpoint`` when there is one, else created from the seed and compiled."""
    k = models.keras()
    history: list[dict] = []
    ema_state = None
    with strategy.scope():
        if checkpoint:
            with checkpoint.as_directory() as d:
                model = k.models.load_model(os.path.join(d, "model.keras"))
                with open(os.path.join(d, "state.json")) as f:
                    history = json.load(f)["history"]
                if os.path.exists(os.path.join(d, "ema.npz")):
                    with np.load(os.path.join(d, "ema.npz")) as z:
                        ema_state = dict(z)
        else:
            model = models.create_model(config["model"], seed=config["seed"], width=config.get("width", 1.0))
            model.compile(optimizer=build_optimizer(config),
                          loss=k.losses.CategoricalCrossentropy(label_smoothing=config["label_smoothing"]),
                          metrics=["accuracy"])
    return model, history, ema_state


def train_columns(config: dict) -> list[str]:
    """The columns the recipe trains on: a degraded ``variant`` beside each image when it uses them."""
    return ["image", "label", *(["variant"] if config["degrade_rate"] or config["printed_per_class"] else [])]


def epoch_dataset(train_feed: feed.Feed, config: dict, epoch: int, rank: int):
    """This worker's training batches of ``epoch``: shuffled, one-hot, degraded and augmented as
    the recipe says, each random choice seeded by (seed, epoch, rank, batch)."""
    import tensorflow as tf

    # drop_last: a tiny last batch would drag BatchNorm's moving variance towards 0.
    offset = (config["seed"] * 1000 + epoch) * 100_000 + rank * 10_000
    rate = config["degrade_rate"]
    # --batch-size is global: each worker (one replica) takes its share of every step.
    ds = train_feed.batches(config["batch_size"] // config["workers"], seed=config["seed"] + epoch).enumerate()
    if "variant" in train_feed.columns:
        # Each image, or (with probability `rate`, new every epoch) its degraded picture.
        ds = ds.map(lambda i, b: (i, {**b, "image": augment.pick_variants(
            b["image"], b["variant"], tf.stack([tf.constant(offset + 5000, tf.int64), i]), rate)}))
    if config["augment"]:
        ds = ds.map(lambda i, b: (i, {**b, "image": augment_batch(
            b["image"], tf.stack([tf.constant(offset, tf.int64), i]))}), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.map(lambda i, b: (b["image"], tf.one_hot(b["label"], models.NUM_CLASSES)))
    return compat.without_autotune(ds.prefetch(tf.data.AUTOTUNE))  # a GPU step is short: keep batches ready


def val_batch_size(workers: int) -> int:
    return max(1, 1024 // workers)


def val_dataset(val_feed: feed.Feed, workers: int):
    """This worker's validation batches, one-hot."""
    import tensorflow as tf

    ds = val_feed.batches(val_batch_size(workers), seed=None, drop_remainder=False)
    return compat.without_autotune(ds.map(lambda b: (b["image"], tf.one_hot(b["label"], models.NUM_CLASSES))))


def report_epoch(model, history: list[dict], ema_to_save, metrics: dict, rank: int) -> None:
    """Checkpoint the model, its history and (``ema_to_save``) the running average; report the
    epoch's metrics to Ray Train with rank 0's checkpoint."""
    import ray.train

    # Every worker saves (MultiWorkerMirroredStrategy expects it); rank 0's copy is kept.
    with tempfile.TemporaryDirectory() as d:
        model.save(os.path.join(d, "model.keras"))
        with open(os.path.join(d, "state.json"), "w") as f:
            json.dump({"history": history}, f)
        if ema_to_save:
            np.savez(os.path.join(d, "ema.npz"), **ema_to_save.state())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d) if rank == 0 else None)
