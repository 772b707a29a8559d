"""Training: pieces without Ray, then real Ray Train runs with 2 workers."""

import dataclasses
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from mnist_ray.images import preprocess
from mnist_ray.plumbing import cluster
from mnist_ray.errors import MnistRayError
from mnist_ray.training.train import (HOLDOUT_BUCKETS, TrainConfig, check_data, assign_split,
                                      decode_for_training, run)
from mnist_ray.training.train_worker import WeightEMA, augment_batch

cluster.configure_process_env()


def test_holdout_is_stable_and_about_a_tenth_of_train():
    ids = [f"train-{i:05d}" for i in range(5000)]
    first = assign_split(ids, ["train"] * 5000, "val", holdout=True)
    again = assign_split(ids, ["train"] * 5000, "val", holdout=True)
    assert (first == again).all()
    assert 0.07 < (first == "val").mean() < 0.13
    assert set(assign_split(ids[:3], ["test"] * 3, "val", holdout=True)) == {"test"}  # test is never touched
    assert HOLDOUT_BUCKETS == 10


def test_decode_for_training_uses_the_shared_preprocessing_and_keeps_its_schema_when_empty(mnist_test_arrays):
    images = mnist_test_arrays[0][:4]
    batch = pa.table({"id": ["a", "b", "c", "d"], "image": preprocess.encode_png(images),
                      "label": pa.array([1, 2, 3, 4], pa.int8()), "split": ["train", "val", "train", "val"]})
    out = decode_for_training(batch, ["train"], "val", holdout=False)
    np.testing.assert_array_equal(out["image"].combine_chunks().to_numpy_ndarray(), preprocess.normalize(images[[0, 2]]))
    assert out["label"].to_pylist() == [1, 3]
    empty = decode_for_training(batch, ["test"], "val", holdout=False)
    assert empty.num_rows == 0 and empty.schema == out.schema
    # With a variant seed: every image also as a degraded picture (augment.degrade), same schema.
    varied = decode_for_training(batch, ["train"], "val", holdout=False, variant_seed=0)
    variant = varied["variant"].combine_chunks().to_numpy_ndarray()
    assert variant.shape == (2, 28, 28, 1) and not np.array_equal(variant, preprocess.normalize(images[[0, 2]]))
    assert decode_for_training(batch, ["test"], "val", holdout=False, variant_seed=0).schema == varied.schema


def test_augmentation_keeps_shape_and_mass_and_varies_with_the_seed():
    import tensorflow as tf

    x = preprocess.normalize(np.pad(np.full((2, 8, 8), 255, np.uint8), ((0, 0), (10, 10), (10, 10))))
    a = augment_batch(tf.constant(x), tf.constant([1, 2])).numpy()
    b = augment_batch(tf.constant(x), tf.constant([1, 3])).numpy()
    assert a.shape == x.shape and not np.allclose(a, b)
    assert 0.7 < a.sum() / x.sum() < 1.4  # a digit stays a digit: rotation/scale/shift only


def test_weight_ema_averages_every_weight_and_survives_a_checkpoint():
    from mnist_ray.model import models

    model = models.create_model("default", seed=0)  # BatchNorm statistics are weights too
    start = [w.copy() for w in model.get_weights()]
    ema = WeightEMA(model, decay=0.9)
    model.set_weights([w + 1.0 for w in start])
    for _ in range(50):
        ema.update()
    restored = WeightEMA(model, decay=0.9, state=ema.state())
    assert restored.steps == 50
    restored.apply()
    for before, after in zip(start, model.get_weights()):
        np.testing.assert_allclose(after, before + 1.0, atol=0.01)  # converged on the new weights
    assert len(ema.shadow) == len(start) > len(model.trainable_weights)


def test_weight_ema_on_the_device_equals_the_host_average_step_for_step(monkeypatch):
    """Real optimizer steps under MultiWorkerMirroredStrategy's variables (BatchNorm statistics
    are SyncOnRead there): the device average equals the host one (float64 numpy, every weight
    copied out each step), and an update makes no host copy."""
    import tensorflow as tf

    from mnist_ray.model import models

    k = models.keras()
    with tf.distribute.MultiWorkerMirroredStrategy().scope():  # one local worker
        model = models.create_model("default", seed=0, width=0.25)
        model.compile(optimizer=k.optimizers.Adam(1e-2), loss="categorical_crossentropy")
    ema = WeightEMA(model, decay=0.998)
    host, steps = [np.array(w, np.float64) for w in model.get_weights()], [0]

    def host_update(batch, logs):
        steps[0] += 1
        d = min(0.998, (1.0 + steps[0]) / (10.0 + steps[0]))
        for s, w in zip(host, model.get_weights()):
            s *= d
            s += (1.0 - d) * w

    rng = np.random.default_rng(0)
    x = rng.random((192, 28, 28, 1), np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 192)]
    model.fit(x, y, batch_size=32, epochs=2, verbose=0,
              callbacks=[ema.callback(), k.callbacks.LambdaCallback(on_train_batch_end=host_update)])
    assert ema.steps == steps[0] == 12
    moved = max(float(np.abs(h - w).max()) for h, w in zip(host, model.get_weights()))
    assert moved > 1e-2  # the average lags the weights: the comparison below is not trivial
    for got, want in zip(ema.shadow, host):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    ema.apply()
    for w, want in zip(model.weights, host):
        np.testing.assert_allclose(w.numpy(), want, rtol=1e-5, atol=1e-5)

    def host_copy(*_):
        raise AssertionError("a host copy of the weights")

    monkeypatch.setattr(model, "get_weights", host_copy)
    monkeypatch.setattr(model, "set_weights", host_copy)
    ema.update()
    ema.apply()
    assert ema.steps == 13


def test_config_takes_the_models_defaults_and_names_runs_deterministically():
    cfg = TrainConfig(model="cnn").resolved()
    assert cfg.epochs == 5 and cfg.batch_size == 32 and cfg.augment is False
    assert cfg.storage_path.endswith("train-runs")
    assert TrainConfig(model="cnn", epochs=9).resolved().epochs == 9
    assert cfg.run_name("sha256:a") == cfg.run_name("sha256:a") != cfg.run_name("sha256:b")
    assert TrainConfig(model="cnn", seed=1).resolved().run_name("sha256:a") != cfg.run_name("sha256:a")


def test_a_run_is_named_by_the_models_recipe_and_training_fonts_too(monkeypatch):
    """--resume never continues a checkpoint trained with another recipe or other fonts."""
    from mnist_ray.images import synthetic
    from mnist_ray.model import models

    cfg = TrainConfig(model="default").resolved()
    name = cfg.run_name("sha256:a")
    plain = TrainConfig(model="cnn").resolved().run_name("sha256:a")
    monkeypatch.setattr(synthetic, "TRAIN_FONTS", synthetic.TRAIN_FONTS[:-1])
    assert cfg.run_name("sha256:a") != name
    monkeypatch.undo()
    spec = models.get_spec("default")
    monkeypatch.setitem(models._REGISTRY, "default", dataclasses.replace(
        spec, defaults={**spec.defaults, "printed_per_class": spec.defaults["printed_per_class"] + 1}))
    assert cfg.run_name("sha256:a") != name
    monkeypatch.undo()
    assert cfg.run_name("sha256:a") == name
    monkeypatch.setattr(synthetic, "TRAIN_FONTS", ())  # a model without printed digits ...
    assert TrainConfig(model="cnn").resolved().run_name("sha256:a") == plain  # ... is named as before


def test_data_checks_catch_unlabelled_and_missing_splits():
    manifest = {"splits": {"train": {"rows": 10, "labels": {"1": 5, "none": 5}}}}
    with pytest.raises(MnistRayError, match="without labels"):
        check_data(TrainConfig(), manifest)
    with pytest.raises(MnistRayError, match="no rows in split 'train'"):
        check_data(TrainConfig(), {"splits": {"test": {"rows": 10, "labels": {"1": 10}}}})
    splits, holdout, rows = check_data(TrainConfig(model="cnn"), {"splits": {"train": {"rows": 100, "labels": {"1": 100}}}})
    assert splits == ["train"] and holdout and rows == 90
    # The default model's recipe adds 200 printed digits of every class to the training rows.
    assert check_data(TrainConfig(), {"splits": {"train": {"rows": 100, "labels": {"1": 100}}}})[2] == 90 + 2000


# --- real Ray Train ------------------------------------------------------------------------


@pytest.mark.e2e
def test_two_workers_learn_and_export_a_complete_model_dir(trained_model):
    out, summary = trained_model
    metadata = json.loads((Path(out) / "metadata.json").read_text())
    assert summary["epochs"] == 3 and metadata["metrics"]["final"]["epoch"] == 3
    assert metadata["metrics"]["val_accuracy"] >= 0.85  # 1,000 digits, 3 epochs
    assert metadata["version"].startswith("cnn-") and len(metadata["version"]) == 16
    assert metadata["data"]["fingerprint"].startswith("sha256:")
    assert metadata["class_names"] == [str(i) for i in range(10)]
    assert {"tensorflow", "tf_keras", "ray", "numpy"} <= set(metadata["versions"])
    for name in ("model.keras", "saved_model/saved_model.pb", "curves.png", "variants.json", "_SUCCESS"):
        assert (Path(out) / name).exists(), name
    assert not list(Path(out).parent.glob(".*staging*"))


@pytest.mark.e2e
def test_refuses_to_overwrite_a_model_dir(trained_model, small_shards):
    out, _ = trained_model
    with pytest.raises(MnistRayError, match="--overwrite"):
        run(TrainConfig(data=small_shards, output=out, model="cnn", epochs=1))


@pytest.mark.e2e
def test_bad_input_fails_before_training(ray_local, small_shards, tmp_path):
    with pytest.raises(MnistRayError, match="unknown model 'resnet'"):
        run(TrainConfig(data=small_shards, output=str(tmp_path / "m"), model="resnet"))
    with pytest.raises(MnistRayError, match="need .* CPUs"):
        run(TrainConfig(data=small_shards, output=str(tmp_path / "m"), model="cnn", workers=8))
    with pytest.raises(MnistRayError, match="GPU"):
        run(TrainConfig(data=small_shards, output=str(tmp_path / "m"), model="cnn", use_gpu=True))
    with pytest.raises(MnistRayError, match="no rows in split 'extra'"):
        run(TrainConfig(data=small_shards, output=str(tmp_path / "m"), model="cnn", train_splits="extra"))
    with pytest.raises(MnistRayError, match="nothing to resume"):
        run(TrainConfig(data=small_shards, output=str(tmp_path / "m"), model="cnn", resume=True,
                        storage_path=str(tmp_path / "runs")))
    with pytest.raises(MnistRayError, match="no dataset"):
        run(TrainConfig(data=str(tmp_path / "nothing"), output=str(tmp_path / "m"), model="cnn"))
    assert not (tmp_path / "m").exists()


@pytest.mark.e2e
def test_the_training_rows_come_in_one_order_whichever_task_finishes_first(small_shards):
    """The seeded shuffle permutes rows built in order (the printed digits after the shards'),
    so one seed names one model; Ray Data's own setting is left as it was."""
    import ray

    from mnist_ray.training.train import load_datasets

    cfg = TrainConfig(data=small_shards, model="default").resolved()
    options = ray.data.DataContext.get_current().execution_options
    before, orders = options.preserve_order, []
    for _ in range(2):
        train_ds, val_ds = load_datasets(cfg, ["train"], holdout=False)
        assert train_ds.context.execution_options.preserve_order and val_ds.context.execution_options.preserve_order
        batches = list(train_ds.iter_batches(batch_size=None, batch_format="numpy"))
        orders.append((np.concatenate([b["label"] for b in batches]), np.concatenate([b["image"] for b in batches])))
    assert options.preserve_order == before
    (labels, images), (labels_again, images_again) = orders
    assert len(labels) > 2000 and not (np.diff(labels) == 0).all()  # the shards' rows and 2,000 printed, shuffled
    np.testing.assert_array_equal(labels, labels_again)
    np.testing.assert_array_equal(images, images_again)


def _train_worker_pids() -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and p.info["cmdline"][0].startswith("ray::RayTrainWorker")]


@pytest.mark.e2e
def test_a_killed_worker_resumes_from_the_last_checkpoint(small_shards, tmp_path):
    runs = tmp_path / "runs"
    cfg = TrainConfig(data=small_shards, output=str(tmp_path / "model"), model="mlp", epochs=4,
                      workers=2, batch_size=32, storage_path=str(runs), max_failures=2)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run(cfg)))
    thread.start()
    deadline = time.monotonic() + 300
    # The controller writes its snapshot once a checkpoint is registered: kill after that,
    # while the next epoch runs (killing during the report would rightly restart from zero).
    while not list(runs.glob("*/checkpoint_manager_snapshot.json")):
        assert thread.is_alive() and time.monotonic() < deadline, "no checkpoint was ever registered"
        time.sleep(0.2)
    pids = _train_worker_pids()
    assert pids, "found no Ray Train worker to kill"
    os.kill(pids[0], signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive() and result, "training did not finish after the worker was killed"
    metadata = json.loads((tmp_path / "model" / "metadata.json").read_text())
    history = metadata["metrics"]["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]  # exactly the requested epochs, none twice
    assert history[0]["resumed_at_epoch"] == 0
    assert history[-1]["resumed_at_epoch"] >= 1  # the restarted workers continued from a checkpoint
